"""Layers run under ``jax.lax.scan``, grouped by the pattern they repeat in.

Why. A Python loop over the blocks makes JAX trace (and XLA compile) every layer on its
own, so the first step of a deep model takes minutes and the compiler's memory grows
with depth. Here each run of structurally identical layers is traced once.

What. ``layer_plan(cfg)`` reads each layer's *kind* from the config (compression ratio,
dense or MoE FFN, hash-routed MoE; an Engram layer is a kind of its own because its
table size is per layer) and cuts the stack into segments: a segment of ``period`` p
and ``repeats`` k covers layers [start, start + p·k) whose kinds repeat with period p.
Segments with k > 1 run as one ``lax.scan`` of k steps whose body applies the p
different blocks in order (a "super-block": V4's [CSA 4, HCA 128] x 20 is one segment of
period 2); k = 1 layers run unrolled. A dynamic programme picks the cut with the fewest
traced block bodies, e.g. ``v4_tiny_peer`` (43 layers):
  layers 0-1 (window, hash MoE) scan x2 | layer 2 (CSA, hash MoE) | 3-42 [HCA, CSA] x20.

Storage. A scanned slot's layers are kept stacked between steps: ``Transformer.scanned``
holds one module per slot whose Variables carry a leading axis of its k layers (logical
axis "layers", replicated by default), so parameters, gradients and optimizer moments are
one array per slot and name, not one per layer (the 43-layer peer config: 122 parameter
arrays, not 1,285), and the scan reads them as they are. Unrolled layers stay in
``Transformer.layers`` (None where a layer is stacked). The state a forward changes (MoE
load counters, sown ``AuxLoss``/``Metric`` values) comes out of the scan stacked and is
written back to the slot; ``steps.collect`` names sown values per layer again
(``layers/7/moe_seq_aux``). ``to_per_layer``/``to_stacked`` convert any pure state
(model or optimizer) between this layout and DeepSeek's per-layer names
(``layers.7.attn.wq_a``): checkpoints record their layout and restore into either,
conversion from DeepSeek checkpoints and per-layer tools use the per-layer form.
Layer-id-dependent *data* (a hash layer's ``tid2eid`` table) is stacked like any other
state; layer-id-dependent *structure* is part of the kind (building a slot refuses
blocks that differ in anything but ``layer_id``).

Remat (``ModelConfig.remat``): each block call is wrapped in ``jax.checkpoint`` with the
chosen policy (``REMAT_POLICIES``), scanned or not.

Decode takes and returns one cache per layer (``PagedKVCache.layers``); a scanned slot's
caches are stacked into the scan's inputs and its new caches unstacked from its outputs,
inside the jitted step. That costs copies of those caches per step (cheap next to the
attention at the sizes this project decodes on CPU); keeping the caches stacked across
steps is the next step for long-context GPU decoding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# ModelConfig.remat -> jax.checkpoint policy ("none": no rematerialisation at all)
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers [start, start + period·repeats): step r of the scan applies the blocks
  start + r·period + j, j = 0 .. period-1 (the slots)."""
  start: int
  period: int
  repeats: int

  @property
  def stop(self) -> int:
    return self.start + self.period * self.repeats

  def layer(self, rep: int, slot: int) -> int:
    return self.start + rep * self.period + slot


def layer_kind(cfg, i: int) -> tuple:
  """What makes layer i structurally different from another layer."""
  moe = cfg.is_moe_layer(i)
  hash_layer = moe and i - cfg.n_dense_layers < cfg.moe.n_hash_layers
  kind = (cfg.attention.compress_ratio(i), moe, hash_layer)
  if cfg.use_engram and i in cfg.engram.layer_ids:
    kind += (("engram", i),)  # per-layer table sizes: never stacked with another layer
  return kind


def plan(kinds: Sequence[Any]) -> tuple[Segment, ...]:
  """Cut ``kinds`` into segments minimising the traced block bodies (an unrolled layer
  costs 1, a scanned segment its period), then the number of segments."""
  L = len(kinds)
  best: list[tuple[int, int, tuple]] = [(0, 0, ())] + [None] * L  # type: ignore[list-item]
  for i in range(L):
    cost, nseg, segs = best[i]
    cands = [(i + 1, Segment(i, 1, 1), 1)]
    for p in range(1, (L - i) // 2 + 1):
      run = p  # layers from i matching their predecessor one period back
      while i + run < L and kinds[i + run] == kinds[i + run - p]:
        run += 1
      cands += [(i + p * k, Segment(i, p, k), p) for k in range(2, run // p + 1)]
    for j, seg, c in cands:
      cand = (cost + c, nseg + 1, segs + (seg,))
      if best[j] is None or cand[:2] < best[j][:2]:
        best[j] = cand
  return best[L][2]


@functools.lru_cache(maxsize=64)
def layer_plan(cfg) -> tuple[Segment, ...]:
  """The segments of ``cfg``'s layer stack (all unrolled when ``scan_layers`` is off)."""
  if not cfg.scan_layers:
    return tuple(Segment(i, 1, 1) for i in range(cfg.n_layers))
  return plan([layer_kind(cfg, i) for i in range(cfg.n_layers)])


def describe(cfg) -> str:
  """One line per segment, e.g. for logs: 'layers 3-42: [4, 128] x 20 (scanned)'."""
  out = []
  for s in layer_plan(cfg):
    kinds = [layer_kind(cfg, s.start + j) for j in range(s.period)]
    span = f"layer {s.start}" if s.stop - s.start == 1 else f"layers {s.start}-{s.stop - 1}"
    how = f" x {s.repeats} (scanned)" if s.repeats > 1 else ""
    out.append(f"{span}: {[k[0] for k in kinds]}{how}")
  return "; ".join(out)


# --------------------------------------------------------------------------- execution

Call = Callable[[nnx.Module, jax.Array, Any], tuple]


def _checkpointed(fn: Callable, policy_name: str) -> Callable:
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name])


def _static_attrs(block) -> list:
  """Every non-state attribute of the block's module graph except ``layer_id``."""
  out = []
  for path, node in nnx.iter_graph(block):
    if isinstance(node, nnx.Module):
      for k, v in sorted(vars(node).items()):
        if k == "layer_id" or k.startswith("_") or isinstance(v, (nnx.Module, nnx.Variable,
                                                                   nnx.List, nnx.Dict)):
          continue
        if isinstance(v, (jax.Array, np.ndarray)):
          v = (v.shape, str(v.dtype), np.asarray(v).tobytes())
        out.append((path, k, v))
  return out


def _check_same_structure(blocks, layer_ids) -> None:
  ref = _static_attrs(blocks[0])
  for b, i in zip(blocks[1:], layer_ids[1:]):
    if _static_attrs(b) != ref:
      raise ValueError(f"layers {layer_ids[0]} and {i} were planned into one scanned slot "
                       f"but differ in structure; expected identical blocks (set "
                       f"model.scan_layers=False, and report the config)")


def _leaves(state: nnx.State) -> dict:
  """{path: leaf values} of a state, taken now (a forward mutates Variables in place)."""
  return {path: jax.tree.leaves(var.get_value()) for path, var in nnx.to_flat_state(state)}


def _changed(before: dict, after: nnx.State) -> nnx.State:
  """The variables of ``after`` that are new or hold other values than ``before``."""
  keep = {}
  for path, var in nnx.to_flat_state(after):
    prev = before.get(path)
    if prev is None or any(a is not b for a, b in zip(jax.tree.leaves(var.get_value()), prev)):
      keep[path] = var
  return nnx.State.from_flat_path(keep)


def _writeback(block, changed: nnx.State, old_sown: nnx.State) -> None:
  """Put a scanned step's changed state into ``block``; sown values are appended to
  what the block held before the call (as ``Module.sow`` does)."""
  prev = dict(nnx.to_flat_state(old_sown))
  flat = {}
  for path, var in nnx.to_flat_state(changed):
    if isinstance(var, nnx.Intermediate) and path in prev:
      var = var.replace(tuple(prev.pop(path).get_value()) + tuple(var.get_value()))
    flat[path] = var
  flat.update(prev)
  nnx.update(block, nnx.State.from_flat_path(flat))



# --------------------------------------------------------------------------- storage

STACK = "scanned"     # Transformer attribute (and state path component) of stacked slots


def slots(cfg) -> tuple[tuple[int, ...], ...]:
  """The layer ids each stacked slot holds, in ``Transformer.scanned`` order: one slot
  per position j of every scanned segment, holding layers start + r·period + j."""
  out = []
  for seg in layer_plan(cfg):
    if seg.repeats > 1:
      out += [tuple(seg.layer(r, j) for r in range(seg.repeats)) for j in range(seg.period)]
  return tuple(out)


def stack_blocks(blocks: Sequence[nnx.Module], layer_ids: Sequence[int]) -> nnx.Module:
  """One module whose every Variable holds the given blocks' values stacked along a new
  leading axis (logical axis "layers", replicated by default); its static attributes
  are the first block's."""
  _check_same_structure(blocks, layer_ids)
  graphdef = nnx.graphdef(blocks[0])

  def one(*vs):
    axes = vs[0].get_metadata().get("logical_axes")
    meta = {} if axes is None else {"logical_axes": ("layers",) + tuple(axes)}
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **meta)
  state = jax.tree.map(one, *[nnx.state(b) for b in blocks],
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def layer_view(stacked: nnx.Module, r: int, layer_id: int) -> nnx.Module:
  """Layer ``layer_id`` (entry ``r``) of a stacked slot as a plain Block: a copy for
  eager per-layer tools (diagnostics, conversion checks); writes to it do not reach the
  stacked storage."""
  graphdef, state = nnx.split(stacked)

  def one(v):
    axes = v.get_metadata().get("logical_axes")
    meta = {} if axes is None else {"logical_axes": tuple(axes)[1:]}
    return v.replace(v.get_value()[r], **meta)
  m = nnx.merge(graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  for _, node in nnx.iter_graph(m):
    if isinstance(node, nnx.Module) and hasattr(node, "layer_id"):
      node.layer_id = layer_id
  return m


def _is_layer_dict(d) -> bool:
  return isinstance(d, dict) and bool(d) and all(isinstance(k, int) for k in d)


def to_per_layer(tree: Any, slot_ids: Sequence[Sequence[int]], strip=None) -> Any:
  """A pure nested-dict state (``nnx.State.to_pure_dict()``: the model's, or an
  optimizer's whose moments mirror it) with stacked slots under ``scanned`` -> the same
  with every layer under ``layers`` (``layers.7.attn.wq_a``). Leaves are arrays or
  ``jax.ShapeDtypeStruct``; ``strip(leaf, r)`` takes entry r (default ``leaf[r]``)."""
  strip = strip or (lambda x, r: x[r])
  if not isinstance(tree, dict):
    return tree
  out = {k: to_per_layer(v, slot_ids, strip) for k, v in tree.items() if k != STACK}
  if STACK in tree:
    layers = dict(out.get("layers") or {})
    for s, sub in tree[STACK].items():
      for r, i in enumerate(slot_ids[s]):
        layers[i] = jax.tree.map(lambda x, r=r: strip(x, r), sub)
    out["layers"] = dict(sorted(layers.items()))
  return out


def to_stacked(tree: Any, slot_ids: Sequence[Sequence[int]], stack=None) -> Any:
  """Inverse of ``to_per_layer``: the layers of each slot leave ``layers`` and are
  stacked under ``scanned.s`` (``stack(list_of_leaves)``, default ``jnp.stack``)."""
  stack = stack or (lambda xs: jnp.stack(xs))
  if not isinstance(tree, dict):
    return tree
  out = {k: to_stacked(v, slot_ids, stack) for k, v in tree.items()}
  layers = out.get("layers")
  if slot_ids and _is_layer_dict(layers) and all(i in layers for s in slot_ids for i in s):
    layers = dict(layers)
    out[STACK] = {s: jax.tree.map(lambda *xs: stack(list(xs)), *[layers.pop(i) for i in ids])
                  for s, ids in enumerate(slot_ids)}
    out["layers"] = layers
  return out


# --------------------------------------------------------------------------- execution


def run_layers(layers: Sequence[nnx.Module | None], scanned: Sequence[nnx.Module],
               segments: Sequence[Segment], h, call: Call, xs: Sequence[Any] | None = None,
               remat: str = "none"):
  """Apply the blocks to the carry ``h`` segment by segment: ``layers[i]`` for unrolled
  layers, the stacked slots ``scanned`` (in ``slots`` order) for scanned segments.

  ``call(block, h, x) -> (h, y, extra)``: ``x`` is the layer's own input (e.g. its decode
  cache; None when ``xs`` is None), ``y`` its per-layer output (cache vectors, new
  cache), ``extra`` a per-layer value that only unrolled layers may return (Engram conv
  states; None elsewhere). Returns (h, [y per layer], [extra per layer])."""
  n = len(layers)
  xs = [None] * n if xs is None else list(xs)
  ys, extras = [None] * n, [None] * n
  slot = 0
  for seg in segments:
    if seg.repeats == 1:
      for i in range(seg.start, seg.stop):
        fn = lambda m, h, x: call(m, h, x)  # noqa: E731
        if remat != "none":
          fn = nnx.remat(fn, policy=REMAT_POLICIES[remat])
        h, ys[i], extras[i] = fn(layers[i], h, xs[i])
      continue
    h = _scan_segment(scanned[slot:slot + seg.period], seg, h, call, xs, ys, remat)
    slot += seg.period
  return h, ys, extras


def _scan_segment(stacks, seg: Segment, h, call: Call, xs, ys, remat: str):
  p, k = seg.period, seg.repeats
  ids = [[seg.layer(r, j) for r in range(k)] for j in range(p)]
  sown = [nnx.pop(m, nnx.Intermediate) for m in stacks]  # the body sows afresh; appended below
  graphdefs = [nnx.graphdef(m) for m in stacks]
  states = [nnx.state(m) for m in stacks]
  x_in = [jax.tree.map(lambda *a: jnp.stack(a), *[xs[i] for i in ids[j]])
          if xs[ids[j][0]] is not None else None for j in range(p)]

  def apply(j):
    def f(state, h, x):
      before = _leaves(state)
      m = nnx.merge(graphdefs[j], state)
      h, y, extra = call(m, h, x)
      if extra is not None:
        raise ValueError(f"layer {ids[j][0]} returned per-layer extra state inside a scanned "
                         f"segment; expected such layers (e.g. Engram) to stay unrolled")
      return h, y, _changed(before, nnx.state(m))
    return _checkpointed(f, remat)

  fns = [apply(j) for j in range(p)]

  def body(h, step):
    st, x = step
    outs = []
    for j in range(p):
      h, y, changed = fns[j](st[j], h, x[j])
      outs.append((y, changed))
    return h, outs

  h, outs = jax.lax.scan(body, h, (states, x_in))
  for j in range(p):
    y_j, changed_j = outs[j]
    for r, i in enumerate(ids[j]):
      ys[i] = jax.tree.map(lambda a, r=r: a[r], y_j)
    _writeback(stacks[j], changed_j, sown[j])
  return h
