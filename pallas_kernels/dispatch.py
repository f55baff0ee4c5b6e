"""Which attention implementation runs: ``resolve_impl("auto")`` picks the fastest one the
backend has.

Every attention entry point (``sparse_decode``, ``dense_decode``, ``sparse_prefill``) takes
``impl=``:

  ``"xla"``     the plain-jnp reference (any backend; the test oracle).
  ``"pallas"``  the Pallas Triton kernels (GPU; interpret mode, slow but exact, on CPU).
  ``"mosaic"``  Pallas Mosaic GPU kernels (Hopper, compute capability >= 9.0) -- only once
                an implementation is registered with ``register_mosaic()``; until then
                ``"auto"`` never picks it and passing it is an error.

``"auto"`` resolves on the host, before anything is traced: on a GPU, ``"mosaic"`` when
the first device has compute capability >= 9.0 and Mosaic kernels are registered,
otherwise ``"pallas"``; on any other backend (CPU, TPU) ``"xla"``.  Callers resolve once
(``model1.generate`` does) and pass the concrete name down, so it becomes part of a jit
cache key.
"""
from __future__ import annotations

import jax

AUTO = "auto"
IMPLS = ("xla", "pallas")
MOSAIC_MIN_CAPABILITY = 9.0

_mosaic_registered = False


def register_mosaic(available: bool = True) -> None:
  """Mark the Mosaic GPU kernels as implemented (the module that defines them calls this)."""
  global _mosaic_registered
  _mosaic_registered = bool(available)


def mosaic_registered() -> bool:
  return _mosaic_registered


def available_impls() -> tuple[str, ...]:
  """Concrete implementation names accepted now (``"mosaic"`` only once registered)."""
  return IMPLS + (("mosaic",) if _mosaic_registered else ())


def _compute_capability() -> float | None:
  """The first device's CUDA compute capability (e.g. 9.0 for H100/H200), None if unknown."""
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(cc) if cc is not None else None
  except (TypeError, ValueError):
    return None


def resolve_impl(impl: str) -> str:
  """``"auto"`` -> the fastest available implementation for the default backend; a
  concrete name passes through.  ValueError for anything else."""
  expected = (AUTO,) + available_impls()
  if not isinstance(impl, str) or impl not in expected:
    raise ValueError(f"impl={impl!r}: expected one of {expected}")
  if impl != AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return "xla"
  cc = _compute_capability()
  if _mosaic_registered and cc is not None and cc >= MOSAIC_MIN_CAPABILITY:
    return "mosaic"
  return "pallas"


# The first Pallas interpret-mode call imports ``jax._src.pallas.fuser``, which defines a
# config option that is part of every jit's trace context: every function jitted before
# that moment would then be traced and compiled again (jax 0.11.2). Importing it up front
# keeps one compilation per function whichever implementation runs first.
import jax.experimental.pallas.fuser  # noqa: E402,F401
