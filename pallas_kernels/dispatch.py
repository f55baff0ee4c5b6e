"""Which attention implementation runs: ``resolve_impl("auto")`` picks the fastest one the
backend has, per kernel.

Every attention entry point (``sparse_decode``, ``dense_decode``, ``sparse_prefill``) takes
``impl=``:

  ``"xla"``     the plain-jnp reference (any backend; the test oracle).
  ``"pallas"``  the Pallas Triton kernels (GPU; interpret mode, slow but exact, on CPU).
  ``"mosaic"``  Pallas Mosaic GPU kernels (Hopper, compute capability >= 9.0), for the
                kernels that have one (``register_mosaic(kernel)``; today sparse decode
                over the FP8 caches, dense decode over FP8 and bf16 caches, sparse prefill
                over bf16 keys).  Asking a kernel without one for it is an error.

``resolve_impl("auto", kernel=...)`` resolves on the host, before anything is traced: on a
GPU, ``"mosaic"`` when the first device has compute capability >= 9.0 and that kernel has
a Mosaic GPU implementation, otherwise ``"pallas"``; on any other backend (CPU, TPU)
``"xla"``.  Without ``kernel`` the answer must serve every kernel (a whole model passes one
name down): ``"mosaic"`` only once all of ``KERNELS`` have one.  Callers resolve once
(``model1.generate`` does) and pass the concrete name down, so it becomes part of a jit
cache key.
"""
from __future__ import annotations

import jax

AUTO = "auto"
IMPLS = ("xla", "pallas")
KERNELS = ("sparse_decode", "dense_decode", "sparse_prefill")
MOSAIC_MIN_CAPABILITY = 9.0

_mosaic_kernels: set[str] = set()


def _check_kernel(kernel: str | None) -> None:
  if kernel is not None and kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected None or one of {KERNELS}")


def register_mosaic(kernel: str, available: bool = True) -> None:
  """Mark ``kernel`` (one of ``KERNELS``) as having a Mosaic GPU implementation (the
  module that routes ``impl="mosaic"`` to it calls this at import)."""
  _check_kernel(kernel)
  (_mosaic_kernels.add if available else _mosaic_kernels.discard)(kernel)


def mosaic_registered(kernel: str | None = None) -> bool:
  """Whether ``kernel`` has a Mosaic GPU implementation; ``None``: every kernel has one."""
  _check_kernel(kernel)
  return kernel in _mosaic_kernels if kernel else set(KERNELS) <= _mosaic_kernels


def available_impls(kernel: str | None = None) -> tuple[str, ...]:
  """Concrete implementation names accepted now for ``kernel`` (None: for every kernel)."""
  return IMPLS + (("mosaic",) if mosaic_registered(kernel) else ())


def _compute_capability() -> float | None:
  """The first device's CUDA compute capability (e.g. 9.0 for H100/H200), None if unknown."""
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(cc) if cc is not None else None
  except (TypeError, ValueError):
    return None


def resolve_impl(impl: str, kernel: str | None = None) -> str:
  """``"auto"`` -> the fastest available implementation of ``kernel`` (None: one name
  for every kernel) on the default backend; a concrete name passes through.  ValueError
  for anything else (``"mosaic"`` where that kernel has no Mosaic GPU version)."""
  expected = (AUTO,) + available_impls(kernel)
  if not isinstance(impl, str) or impl not in expected:
    raise ValueError(f"impl={impl!r}: expected one of {expected}"
                     + (f" for {kernel}" if kernel else ""))
  if impl != AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return "xla"
  cc = _compute_capability()
  if mosaic_registered(kernel) and cc is not None and cc >= MOSAIC_MIN_CAPABILITY:
    return "mosaic"
  return "pallas"


def model_kernel_impl(impl: str, covered) -> str:
  """What a whole model (one resolved name for every kernel) passes to one kernel call:
  its ``"mosaic"`` means the Mosaic GPU kernel where that kernel covers the call
  (``covered()``: the kernel module's ``supports``) and the Triton kernel elsewhere (a bf16
  sparse-decode cache, a head geometry outside FlashMLA's), so choosing Mosaic for a model
  never turns a case the Triton kernels run into an error.  Other names pass through."""
  return "pallas" if impl == "mosaic" and not covered() else impl


# The first Pallas interpret-mode call imports ``jax._src.pallas.fuser``, which defines a
# config option that is part of every jit's trace context: every function jitted before
# that moment would then be traced and compiled again (jax 0.11.2). Importing it up front
# keeps one compilation per function whichever implementation runs first.
import jax.experimental.pallas.fuser  # noqa: E402,F401
