"""Optimisers: AdamW, or Muon for weight matrices with AdamW for everything else.

What. ``make_optimizer(cfg)`` returns one optax ``GradientTransformation`` for the whole
parameter tree (use it as ``nnx.Optimizer(model, tx, wrt=nnx.Param)``):

  clip_by_global_norm(clip)                        (on the whole gradient, both branches)
  -> AdamW(lr_schedule, b1, b2, eps, weight_decay)   every leaf, or with ``muon=True``:
  -> partition by parameter path and shape:
       Muon leaves: optax.contrib.scale_by_muon (Nesterov momentum + Newton–Schulz
         orthogonalisation) -> shape scaling -> decoupled weight decay -> muon_lr schedule
       other leaves: AdamW as above
  -> optax.MultiSteps(every_k_schedule=grad_accum)    when grad_accum > 1

Schedule: linear warm-up from peak/warmup_steps to the peak over ``warmup_steps``, then
cosine decay to ``min_lr_ratio``·peak at ``total_steps`` (optax's schedule); Muon uses
the same shape with its own peak ``muon_lr``. Steps count optimizer updates (with
accumulation: one per ``grad_accum`` micro-batches).

Muon partition (``muon_mask``). A leaf goes to Muon iff it has ≥ 2 dimensions and is not
excluded by name or logical axis:
  * excluded names — any path component equal to one of ``cfg.adamw_names`` (default:
    embed, embedding, head, gate, norm, norms, scale, bias, ape, attn_sink, sink, conv):
    embeddings, the output head, the MoE router (V4 calls it ``gate``), norms (Engram's
    per-stream ``norms`` are 2-D), mHC's static biases and gating factors, the
    compressor's positional bias ``ape``, attention sinks and Engram's depthwise conv. Exact component match: ``hc_head.fn`` (a path component
    ``hc_head``) is not the output ``head``.
  * excluded axes — a leaf whose ``logical_axes`` metadata contains "vocab" or
    "engram_rows" (token embedding / output head / Engram tables, however named); only
    visible when the tree holds ``nnx.Variable`` leaves (optimizer init), so names must
    also catch them for the update pass — a mismatch raises at ``init``.
  * how Muon sees a leaf (``muon_dimension_numbers``): stacked matrices — a path
    component in BATCHED_NAMES (``experts`` [E, D, F], ``wo_a`` [G, in, out]) — have
    leading batch axes, each matrix orthogonalised on its own; everything else follows
    the project's Dense layout [in, *out]: axis 0 is the fan-in, the remaining axes
    together the fan-out (``wq_b`` [q_lora, heads, head_dim] is one matrix). At init the
    logical axes are cross-checked ("exp"/"o_groups" leading axes <=> batched name).
  Everything 1-D (norm weights, biases, mHC base/scale, sinks) is AdamW by shape.
  * stacked layers — a path component in STACKED_NAMES (``scanned``: model1.scan's
    slots) adds one leading axis that counts as neither fan-in nor 1-D-ness: each
    layer's matrix is orthogonalised on its own, each layer's norm stays on AdamW.
This follows the DeepSeek-V4 report (Muon for most matrices; AdamW for the embedding,
prediction head, mHC static biases and gating factors, RMSNorm weights) plus the router
on AdamW; mHC's dynamic projections ``fn`` are matrices and go to Muon.

Gradient accumulation: ``optax.MultiSteps`` inside the returned transformation. Call
``optimizer.update(model, grads)`` on every micro-batch; parameters move on every
``grad_accum``-th call with the mean gradient. ``is_accumulation_boundary(opt_state)``
tells the train step when that happened (e.g. to apply MoE bias updates then).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

DEFAULT_ADAMW_NAMES = ("embed", "embedding", "head", "gate", "norm", "norms", "scale", "bias",
                       "ape", "attn_sink", "sink", "conv")
ADAMW_AXES = ("vocab", "engram_rows")
# Leading axes with these logical names index independent matrices (MoE experts, V4's
# grouped output projection); parameters holding them are named by BATCHED_NAMES.
BATCH_AXES = ("exp", "o_groups", "layers")
BATCHED_NAMES = ("experts", "wo_a")
# A path component naming stacked layers (model1.scan's slots): one more leading axis,
# each layer's matrix (and each layer's norm vector) its own.
STACKED_NAMES = ("scanned",)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser settings.

  lr: AdamW peak learning rate.  warmup_steps / total_steps: schedule length in
  optimizer steps.  min_lr_ratio: final lr / peak.  weight_decay: decoupled, both
  branches (1-D leaves — norms, biases — are not decayed unless ``wd_1d``).
  b1, b2, eps: Adam moments.  clip: global-norm clip (0 = off).
  muon: route matrices to Muon.  muon_lr: Muon peak lr.  muon_beta: Muon momentum.
  muon_ns_steps: Newton–Schulz iterations.  muon_consistent_rms: None = Keller Jordan's
  sqrt(max(1, fan_out/fan_in)) scaling; 0.2 = Moonlight's AdamW-matched RMS.
  grad_accum: micro-batches per optimizer step.  adamw_names: path components kept on
  AdamW (see module docstring).  wd_1d: also decay 1-D leaves (norms, biases).
  """
  lr: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 10_000
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip: float = 1.0
  muon: bool = False
  muon_lr: float = 0.02
  muon_beta: float = 0.95
  muon_ns_steps: int = 5
  muon_consistent_rms: float | None = None
  grad_accum: int = 1
  adamw_names: tuple[str, ...] = DEFAULT_ADAMW_NAMES
  wd_1d: bool = False

  def __post_init__(self):
    def need(ok, name, expected):
      if not ok:
        raise ValueError(f"OptimConfig.{name}={getattr(self, name)!r}; expected {expected}")
    need(self.lr > 0, "lr", "a float > 0")
    need(self.muon_lr > 0, "muon_lr", "a float > 0")
    need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
         "an int >= 0")
    need(isinstance(self.total_steps, int) and self.total_steps > self.warmup_steps,
         "total_steps", f"an int > warmup_steps={self.warmup_steps}")
    need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]")
    need(self.weight_decay >= 0, "weight_decay", "a float >= 0")
    need(0 <= self.b1 < 1, "b1", "a float in [0, 1)")
    need(0 <= self.b2 < 1, "b2", "a float in [0, 1)")
    need(self.clip >= 0, "clip", "a float >= 0 (0 = no clipping)")
    need(isinstance(self.grad_accum, int) and self.grad_accum >= 1, "grad_accum",
         "an int >= 1")
    need(isinstance(self.muon_ns_steps, int) and self.muon_ns_steps >= 1, "muon_ns_steps",
         "an int >= 1")


def lr_schedule(cfg: OptimConfig, peak: float | None = None) -> optax.Schedule:
  """Warm-up + cosine schedule (peak = cfg.lr unless given). Starts at peak/warmup_steps,
  not 0, so the first optimizer step is not a no-op."""
  peak = cfg.lr if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / max(cfg.warmup_steps, 1), peak_value=peak,
      warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps, end_value=peak * cfg.min_lr_ratio)


# ------------------------------------------------------------------------------ partition


def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    else:
      out.append(str(k))
  return tuple(out)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _value(x):
  return x.get_value() if _is_var(x) else x


def _n_stacked(path) -> int:
  """1 for a leaf of a scanned slot (leading axis = its layers), else 0."""
  return int(any(n in STACKED_NAMES for n in _names(path)))


def _n_batch(path, ndim: int) -> int:
  """Leading batch axes of a Muon leaf: ndim − 2 for stacked matrices (a path component
  in BATCHED_NAMES), else the layer axis of a scanned slot (0 or 1)."""
  return ndim - 2 if any(n in BATCHED_NAMES for n in _names(path)) else _n_stacked(path)


def _leaf_is_muon(path, leaf, adamw_names) -> bool:
  val = _value(leaf)
  if getattr(val, "ndim", 0) - _n_stacked(path) < 2:
    return False
  if any(n in adamw_names for n in _names(path)):
    return False
  if _is_var(leaf):
    # Only optimizer init sees the metadata; the update pass decides by names alone, so
    # refuse here any leaf whose metadata disagrees with what its name implies.
    where = "/".join(_names(path))
    axes = tuple(leaf.get_metadata().get("logical_axes") or ())
    if any(a in ADAMW_AXES for a in axes):
      raise ValueError(
          f"parameter {where} has logical_axes={axes} (an embedding/head-like axis) but a "
          f"name that would send it to Muon; expected a path component in "
          f"OptimConfig.adamw_names={adamw_names} (rename the parameter or add its name)")
    lead = next((i for i, a in enumerate(axes) if a not in BATCH_AXES), len(axes))
    if axes and lead != _n_batch(path, val.ndim):
      raise ValueError(
          f"parameter {where} has logical_axes={axes} ({lead} leading batch axes of "
          f"{BATCH_AXES}) but its name implies {_n_batch(path, val.ndim)}; expected stacked "
          f"matrices to be named by one of {BATCHED_NAMES} and nothing else")
  return True


def muon_dimension_numbers(path, ndim: int) -> MuonDimensionNumbers:
  """How Muon sees a leaf: leading batch axes (stacked experts / output groups) are
  orthogonalised independently; of the rest, the first axis is the fan-in (reduction)
  and all later axes together the fan-out — the project's Dense layout [in, *out]
  (e.g. wq_b [q_lora, heads, head_dim] is one [q_lora, heads·head_dim] matrix)."""
  nb = _n_batch(path, ndim)
  return MuonDimensionNumbers(reduction_axis=nb, output_axis=tuple(range(nb + 1, ndim)))


def muon_mask(params: Any, adamw_names: tuple[str, ...] = DEFAULT_ADAMW_NAMES) -> Any:
  """Bool tree (same structure as ``params``, nnx.Variable leaves kept as leaves): True
  where the leaf goes to Muon. ``params``: an nnx.State (Variables or pure arrays)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _leaf_is_muon(p, x, adamw_names), params, is_leaf=_is_var)


def _labels(params, adamw_names):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: "muon" if _leaf_is_muon(p, x, adamw_names) else "adamw",
      params, is_leaf=_is_var)


def _wd_mask(cfg: OptimConfig):
  if cfg.wd_1d:
    return None
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda p, x: _value(x).ndim - _n_stacked(p) >= 2, params, is_leaf=_is_var)


# ------------------------------------------------------------------------------ optimizer


def _adamw(cfg: OptimConfig) -> optax.GradientTransformation:
  return optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=_wd_mask(cfg))


def _scale_by_shape(consistent_rms: float | None) -> optax.GradientTransformation:
  """Muon's shape scaling (what optax.contrib.muon does with a private helper), with
  fan-in/fan-out from ``muon_dimension_numbers``: sqrt(max(1, fan_out/fan_in)), or
  consistent_rms·sqrt(max(fan_in, fan_out)) when given."""
  def scale(path, u):
    dn = muon_dimension_numbers(path, u.ndim)
    fan_in = u.shape[dn.reduction_axis]
    fan_out = math.prod(u.shape[a] for a in dn.output_axis)
    if consistent_rms is None:
      return u * max(1.0, fan_out / fan_in) ** 0.5
    return u * (consistent_rms * max(fan_in, fan_out) ** 0.5)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon(cfg: OptimConfig) -> optax.GradientTransformation:
  def dims(params):
    # inside optax.partition the Muon branch sees a masked tree (MaskedNode elsewhere);
    # a MaskedNode is an empty pytree, so mapping over it leaves it in place.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: muon_dimension_numbers(p, _value(x).ndim), params, is_leaf=_is_var)

  return optax.chain(
      scale_by_muon(ns_steps=cfg.muon_ns_steps, beta=cfg.muon_beta, nesterov=True,
                    weight_dimension_numbers=dims),
      _scale_by_shape(cfg.muon_consistent_rms),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.scale_by_learning_rate(lr_schedule(cfg, cfg.muon_lr)),
  )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """The full transformation (clip -> AdamW | Muon+AdamW partition -> MultiSteps).

  Memoised on the (frozen, hashable) config: optax transformations are stateless, and
  ``nnx.Optimizer`` keeps ``tx`` as a static graph attribute, so returning the same
  object for equal configs makes optimizers built for several seeds / runs in one
  process compare equal and reuse one compiled train step (model1.ablate relies on it)."""
  try:
    return _make_optimizer_cached(cfg)
  except TypeError:  # an unhashable field (e.g. a list of names): build uncached
    return _make_optimizer(cfg)


@functools.lru_cache(maxsize=32)
def _make_optimizer_cached(cfg: OptimConfig) -> optax.GradientTransformation:
  return _make_optimizer(cfg)


def _make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  if cfg.muon:
    names = cfg.adamw_names
    body = optax.partition({"muon": _muon(cfg), "adamw": _adamw(cfg)},
                           lambda params: _labels(params, names))
  else:
    body = _adamw(cfg)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip), body) if cfg.clip > 0 else body
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def is_accumulation_boundary(opt_state: Any) -> jax.Array | bool:
  """True when the last ``update`` applied parameters (always, without accumulation).
  ``opt_state`` is ``nnx.Optimizer.opt_state`` or a raw optax state."""
  st = opt_state
  if isinstance(st, (nnx.State, nnx.Variable)):
    st = nnx.as_pure(st)
  if isinstance(st, optax.MultiStepsState):
    return st.mini_step == 0
  return True
