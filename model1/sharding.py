"""Logical-axis sharding: one rules table maps the names layers use to mesh axes.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (a tuple of names,
one per dimension, ``None`` = never sharded). ``RULES`` maps each logical name to mesh
axes; ``logical_to_spec`` turns a name tuple into a ``PartitionSpec`` for a concrete mesh,
dropping mesh axes of size 1 and any mapping whose mesh size does not divide the dimension
(that dimension is then replicated instead of failing). Activations are constrained with
``constrain(x, names)``, a no-op outside a mesh.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter sharding),
``tensor`` (heads / ffn hidden), ``expert`` (MoE experts). The batch is split over
``data`` x ``fsdp`` (and ``expert`` when experts are not being sharded there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axes (tuple), in priority order. The only table in the project.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "activation_length": (),
    "activation_embed": (),
    "activation_heads": ("tensor",),
    "activation_mlp": ("tensor",),
    "activation_vocab": ("tensor",),
    "activation_exp": ("expert",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "head_dim": (),
    "q_lora": (),
    "kv_lora": (),            # MLA's single shared KV head is never split over tensor
    "o_groups": ("tensor",),
    "o_lora": (),
    "norm": (),
    "exp": ("expert",),
    "streams": (),
    "engram_rows": ("fsdp", "tensor"),
    "engram_dim": (),
    "indexer_heads": (),
    # the leading axis of per-layer states stacked for a scanned layer group
    # (model1.scan); replicated: every device runs every layer
    "layers": (),
    None: (),
}


def param(init: Callable, key: jax.Array, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """Create an ``nnx.Param`` annotated with its logical axes (one name per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"axes={tuple(axes)} has {len(axes)} names but shape={tuple(shape)}"
                     f" has {len(shape)} dimensions; expected one name per dimension")
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None,
                    shape: Sequence[int] | None = None,
                    rules: dict = RULES) -> PartitionSpec:
  """Map logical names to a PartitionSpec; skip mesh axes that are absent, size 1,
  already used by an earlier dimension, or that do not divide the dimension."""
  if mesh is None:
    return PartitionSpec()
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    if name not in rules:
      raise ValueError(f"logical axis name={name!r} is not in model1.sharding.RULES;"
                       f" expected one of {sorted(k for k in rules if k)}")
    chosen = []
    size = 1
    for ax in rules[name]:
      if ax not in mesh.shape or mesh.shape[ax] == 1 or ax in used:
        continue
      if shape is not None and shape[i] % (size * mesh.shape[ax]) != 0:
        continue
      chosen.append(ax)
      size *= mesh.shape[ax]
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*out)


_ACTIVE_MESH: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Activate ``mesh`` for activation constraints and ``jax.set_mesh``."""
  if mesh is None:
    yield
    return
  _ACTIVE_MESH.append(mesh)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
  return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without a mesh)."""
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(axes, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None, num_devices: int = 0) -> Mesh:
  """Build a 4-axis Auto mesh; one axis may be -1 (= the remaining devices).
  ``num_devices`` > 0 uses only the first that many devices (0 = all)."""
  devices = list(devices if devices is not None else jax.devices())
  if not isinstance(num_devices, int) or not 0 <= num_devices <= len(devices):
    raise ValueError(f"mesh.num_devices={num_devices!r}; expected an int in [0, "
                     f"{len(devices)}] (0 = all devices)")
  devices = devices[:num_devices or len(devices)]
  dims = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  for k, v in dims.items():
    if not isinstance(v, int) or (v < 1 and v != -1):
      raise ValueError(f"mesh.{k}={v!r}; expected a positive int or -1 (fill)")
  free = [k for k, v in dims.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; expected at most one axis set to -1")
  known = math.prod(v for v in dims.values() if v != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"mesh {dims} cannot fill {len(devices)} devices: the fixed axes "
                       f"multiply to {known}, which does not divide the device count")
    dims[free[0]] = len(devices) // known
  total = math.prod(dims.values())
  if total != len(devices):
    raise ValueError(f"mesh {dims} has {total} devices but {len(devices)} are available;"
                     f" expected the mesh axes to multiply to {len(devices)}")
  arr = np.asarray(devices).reshape([dims[a] for a in MESH_AXES])
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of an nnx State, from its ``logical_axes`` metadata
  (leaves without it are replicated)."""
  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("logical_axes")
      val = v.get_value() if hasattr(v, "get_value") else v.value
      if axes is None:
        spec = PartitionSpec()
      else:
        spec = logical_to_spec(axes, mesh, val.shape)
      # keep host-offloaded tables (e.g. Engram's, memory_kind='pinned_host') on the host
      return v.replace(NamedSharding(mesh, spec,
                                     memory_kind=v.get_metadata().get("memory_kind")))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
  """Construct a module with every parameter created directly in its sharded layout.

  On a one-device mesh nothing needs laying out: the module is built op by op (each
  initializer compiled once per shape and reused across layers) and then placed. One
  jitted init of a deep model is one XLA program of thousands of RNG kernels, and its
  CPU compile time grows faster than the depth (206 s for the 43-layer
  ``v4_tiny_peer`` on 2 CPU cores, against ~10 s op by op)."""
  if mesh is None:
    return build()
  if mesh.size == 1:
    graphdef, state = nnx.split(build())
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  shardings = state_shardings(state, mesh)

  @jax.jit
  def init():
    return nnx.split(build())[1]

  with use_mesh(mesh):
    st = jax.jit(init.__wrapped__ if hasattr(init, "__wrapped__") else init,
                 out_shardings=shardings)()
  return nnx.merge(graphdef, st)


def batch_sharding(mesh: Mesh | None, shape: Sequence[int]) -> NamedSharding | None:
  """Batch-axis sharding over data x fsdp (x expert); an axis that does not divide the
  batch is left out (replicated) rather than failing."""
  if mesh is None:
    return None
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), mesh,
                                             shape))
