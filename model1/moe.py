"""DeepSeekMoE as in DeepSeek-V4: sqrt-softplus router, hash-routed first layers,
aux-loss-free bias balancing, a small sequence-wise balance loss, SwiGLU experts.

What. Per token x (U = B·T flattened tokens):

  s = sqrt(softplus(x · gate)) in fp32                                  s_UE
  hash layer (layer_id < n_hash_layers): idx = tid2eid[token_id]        idx_UX
  other layers: idx = top-k(s + bias)   (bias only selects, never weights)
  w = s[idx] / Σ s[idx] · route_scale                                   w_UX
  y = Σ_x expert_idx[x](x; w[x]) + shared_experts(x)

Expert (V4 ``Expert.forward``): g = x·w1, u = x·w3 in fp32; routed experts clamp
u to [−limit, limit] and g to ≤ limit (limit = ``swiglu_limit``, 10 in V4); the
routing weight multiplies silu(g)·u before w2. The shared expert is unclamped (V4:
``Expert(dim, moe_inter_dim)`` without ``swiglu_limit``); its width is
``n_shared_experts · moe_inter_dim`` (V4: n_shared_experts = 1).

Source. Official DeepSeek-V4-Flash ``inference/model.py`` (``Gate``, ``Expert``,
``MoE``; public copy Mockingjay1316/deepseek-v4-flash-spark). Balancing: DeepSeek-V3
report §2.1.2 (bias b_i += γ·sign(mean load − load_i) after each step; sequence-wise
loss L = α Σ_i f_i P_i with f_i = E/(K·T) · #{t: i ∈ topk(t)}, P_i = mean_t s'_{t,i},
s' = s / Σ_j s_j). Peer: MaxText ``layers/moe.py``.

Balancing in training (the train step's side; see ``apply_bias_updates``):
  * forward returns ``(y, MoEAux)``; add ``aux.seq_aux_loss`` (already × weight) to the
    loss. It is 0 in hash layers, whose routing is fixed.
  * forward also adds this batch's per-expert token counts into ``MoE.load`` (a
    ``MoEStats`` variable, not a Param). After the optimizer step call
    ``apply_bias_updates(model)``: every non-hash MoE moves ``bias`` (a ``RouterBias``
    variable) by rate·sign(mean(load) − load) and zeroes ``load``. Counts accumulate
    over micro-batches until then; call ``reset_moe_stats(model)`` after eval forwards.

Dispatch (dropless, no capacity): the U·X (token, expert) assignments are sorted by
expert and run through grouped matmuls; activation memory grows with U·X·D, not U·E·D
(the router's [U, E] scores aside).
``dispatch="blocked"`` (default) pads each expert's group to a multiple of
``block_size`` rows (at most U·X + min(E, U·X)·(block_size − 1) rows in all) and scans
over the blocks, one dense [block, D]·[D, F] product per block with that block's
expert weights; it is memory-proportional on every backend. ``dispatch="ragged_dot"``
uses ``jax.lax.ragged_dot``. On CPU jax lowers that to a masked dense product whose
memory is U·X·E·D, and upstream reports (marin-community/marin #5394, #7012) show the
CUDA lowering of jaxlib 0.9–0.10 densifying the same way. It lowers to XLA's
ragged-dot instruction on TPU, and to a Pallas grouped matmul on GPU after
``jax.config.update('jax_ragged_dot_use_gpu_pallas_triton_lowering', True)`` (neither
tried here). Both paths agree with a per-token loop (tests).

Expert parallelism. When the active mesh (``model1.sharding.use_mesh``) has an
``expert`` axis of size > 1, the expert weights [E, ...] are split over it
(logical axis "exp") and the routed computation runs in a ``shard_map`` manual over
``expert`` only: each expert shard all-gathers the tokens of its expert group, computes
the assignments that hit its own E/ep experts, and reduce-scatters the partial outputs
back (psum when the token count does not divide). Simple all-gather EP rather than
all-to-all: per-shard memory is (tokens of the group)·X·D.

Shapes: B batch, T positions, D model width, F expert hidden, E experts, X top-k
(letter key in ``model1``); new here: U = B·T flattened tokens, A = U·X assignments.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from model1 import sharding

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
DISPATCHES = ("blocked", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE settings (V4-Flash values in brackets where they exist).

  n_routed_experts: E routed experts.  n_activated_experts: X, top-k per token.
  n_shared_experts: shared experts (0 = none) [1]; one SwiGLU of width n·moe_inter_dim.
  moe_inter_dim: F, hidden width of each expert.
  route_scale: multiplies the normalised routing weights.
  n_hash_layers: blocks with layer_id < n_hash_layers route by ``tid2eid`` [3].
  score_func: "sqrtsoftplus" [V4], "sigmoid" [V3] or "softmax" (not renormalised).
  bias_update_rate: γ of the aux-loss-free bias update (V3: 0.001).
  seq_aux_loss_weight: α of the sequence-wise balance loss (V3: 1e-4).
  swiglu_limit: clamp of the routed experts' SwiGLU [10]; 0 = no clamp.
  hash_seed: seed of the deterministic tid2eid tables (layer l uses hash_seed + l).
  dispatch: "blocked" or "ragged_dot" (module docstring).  block_size: rows per block.
  init_std: std of router and expert weights; None = fan-in (1/sqrt(fan_in)).
  """
  n_routed_experts: int = 8
  n_activated_experts: int = 2
  n_shared_experts: int = 1
  moe_inter_dim: int = 128
  route_scale: float = 1.0
  n_hash_layers: int = 0
  score_func: str = "sqrtsoftplus"
  bias_update_rate: float = 1e-3
  seq_aux_loss_weight: float = 1e-4
  swiglu_limit: float = 10.0
  hash_seed: int = 0
  dispatch: str = "blocked"
  block_size: int = 128
  init_std: float | None = None

  def __post_init__(self):
    def need(ok, name, expected):
      if not ok:
        raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r}; expected {expected}")
    need(isinstance(self.n_routed_experts, int) and self.n_routed_experts >= 1,
         "n_routed_experts", "an int >= 1")
    need(isinstance(self.n_activated_experts, int)
         and 1 <= self.n_activated_experts <= self.n_routed_experts,
         "n_activated_experts", f"an int in [1, n_routed_experts={self.n_routed_experts}]")
    need(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
         "n_shared_experts", "an int >= 0")
    need(isinstance(self.moe_inter_dim, int) and self.moe_inter_dim >= 1,
         "moe_inter_dim", "an int >= 1")
    need(isinstance(self.n_hash_layers, int) and self.n_hash_layers >= 0,
         "n_hash_layers", "an int >= 0")
    need(self.score_func in SCORE_FUNCS, "score_func", f"one of {SCORE_FUNCS}")
    need(self.dispatch in DISPATCHES, "dispatch", f"one of {DISPATCHES}")
    need(isinstance(self.block_size, int) and self.block_size >= 1, "block_size",
         "an int >= 1")
    need(self.route_scale > 0, "route_scale", "a float > 0")
    need(self.bias_update_rate >= 0, "bias_update_rate", "a float >= 0")
    need(self.seq_aux_loss_weight >= 0, "seq_aux_loss_weight", "a float >= 0")
    need(self.swiglu_limit >= 0, "swiglu_limit", "a float >= 0 (0 = no clamp)")
    need(self.init_std is None or self.init_std >= 0, "init_std", "None or a float >= 0")

  def validate(self, n_moe_layers: int, expert_axis_size: int = 1) -> None:
    """Checks that need the model and mesh: hash layers must be MoE layers, and the
    experts must split evenly over the ``expert`` mesh axis."""
    if self.n_hash_layers > n_moe_layers:
      raise ValueError(f"MoEConfig.n_hash_layers={self.n_hash_layers}; expected <= the "
                       f"number of MoE layers ({n_moe_layers})")
    if expert_axis_size < 1 or self.n_routed_experts % expert_axis_size:
      raise ValueError(f"MoEConfig.n_routed_experts={self.n_routed_experts}; expected a "
                       f"multiple of the 'expert' mesh axis size ({expert_axis_size})")


class MoEAux(NamedTuple):
  """Per-call balance information (all fp32).

  seq_aux_loss: α·mean_b Σ_i f_bi P_bi — add to the training loss (0 in hash layers).
  load: [E] tokens routed to each expert in this call (valid tokens only).
  load_frac: [E] load / (valid tokens · X); sums to 1.
  """
  seq_aux_loss: jax.Array
  load: jax.Array
  load_frac: jax.Array


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias [E]: added to scores for top-k selection only.
  Updated outside the gradient by ``apply_bias_updates``."""


class MoEStats(nnx.Variable):
  """Per-expert token counts [E] accumulated by forwards since the last bias update."""


class HashRoutingTable(nnx.Variable):
  """``tid2eid`` [vocab, X] int32: fixed token-id -> experts table of a hash layer."""


# ------------------------------------------------------------------------------ math


def swiglu_hidden(g: jax.Array, u: jax.Array, limit: float) -> jax.Array:
  """silu(g)·u in fp32; V4's clamps when limit > 0: u to [−limit, limit], g to ≤ limit."""
  g = g.astype(jnp.float32)
  u = u.astype(jnp.float32)
  if limit > 0:
    u = jnp.clip(u, -limit, limit)
    g = jnp.minimum(g, limit)
  return jax.nn.silu(g) * u


def router_scores(logits: jax.Array, score_func: str) -> jax.Array:
  logits = logits.astype(jnp.float32)
  if score_func == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jnp.sqrt(jax.nn.softplus(logits))


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free step: bias_i += rate · sign(mean(load) − load_i).
  Overloaded experts lose selection priority, underloaded ones gain it. Leading axes
  (a scanned slot's stacked layers) are independent layers: the mean is per layer."""
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def make_tid2eid(vocab_size: int, n_experts: int, topk: int, seed: int) -> np.ndarray:
  """Deterministic [vocab, topk] int32 table: each token id gets ``topk`` distinct
  experts drawn uniformly (host numpy; V4 ships its table in the checkpoint)."""
  rng = np.random.default_rng(seed)
  out = np.empty((vocab_size, topk), np.int32)
  chunk = max(1, (1 << 22) // n_experts)   # bound the [rows, E] random block to ~16 MB
  for s in range(0, vocab_size, chunk):
    r = rng.random((min(chunk, vocab_size - s), n_experts))
    out[s:s + r.shape[0]] = np.argpartition(r, topk - 1, axis=1)[:, :topk]
  return out


def _dot(x, w):
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _routed_local(x_UD, idx_UX, w_UX, w1, w2, w3, offset, *, limit, dispatch, block):
  """Routed experts for the E_l experts [offset, offset + E_l) held in w1/w2/w3.
  Assignments to other experts contribute 0. Returns y_UD in fp32."""
  u, k = idx_UX.shape
  n_local = w1.shape[0]
  a = u * k
  e = idx_UX.reshape(-1) - offset
  local = (e >= 0) & (e < n_local)
  key = jnp.where(local, e, n_local)                      # foreign assignments sort last
  order = jnp.argsort(key, stable=True)                   # [A] sorted by expert
  key_s = key[order]
  tok_s = order // k
  w_s = jnp.where(local[order], w_UX.reshape(-1)[order], 0.0)
  counts = jnp.zeros((n_local + 1,), jnp.int32).at[key].add(1)[:n_local]
  dt = x_UD.dtype

  if dispatch == "ragged_dot":
    xs = x_UD[tok_s]                                      # [A, D]; rows past groups -> 0
    g = jax.lax.ragged_dot(xs, w1.astype(dt), counts, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, w3.astype(dt), counts, preferred_element_type=jnp.float32)
    h = (swiglu_hidden(g, up, limit) * w_s[:, None]).astype(dt)
    ys = jax.lax.ragged_dot(h, w2.astype(dt), counts, preferred_element_type=jnp.float32)
    ys = jnp.where((key_s < n_local)[:, None], ys, 0.0)
    y_assign = jnp.zeros_like(ys).at[order].set(ys)       # back to (token, slot) order
    return y_assign.reshape(u, k, -1).sum(axis=1)

  # blocked: pad every expert's group to a multiple of `block` rows, scan over blocks.
  n_rows = -(-(a + min(n_local, a) * (block - 1)) // block) * block
  n_blocks = n_rows // block
  starts = jnp.cumsum(counts) - counts
  padded = -(-counts // block) * block
  pends = jnp.cumsum(padded)
  pstarts = pends - padded
  kc = jnp.minimum(key_s, n_local - 1)
  pos_s = jnp.where(key_s < n_local, pstarts[kc] + jnp.arange(a) - starts[kc], n_rows)
  xp = jnp.zeros((n_rows, x_UD.shape[1]), dt).at[pos_s].set(x_UD[tok_s], mode="drop")
  wp = jnp.zeros((n_rows,), jnp.float32).at[pos_s].set(w_s, mode="drop")
  block_start = jnp.arange(n_blocks) * block
  # expert of each block = #groups ending at or before its first row (a searchsorted;
  # jnp.searchsorted fails inside shard_map in jax 0.10.2, and this is [blocks, E_l])
  block_e = jnp.sum(pends[None, :] <= block_start[:, None], axis=1)
  block_used = block_e < n_local
  block_e = jnp.minimum(block_e, n_local - 1)

  def step(_, blk):
    xb, wb, eb, used = blk
    def run(_):
      h = swiglu_hidden(_dot(xb, w1[eb]), _dot(xb, w3[eb]), limit) * wb[:, None]
      return _dot(h.astype(dt), w2[eb])
    # trailing blocks past the last group hold no rows: skip their three matmuls
    # (zeros_like(xb), not jnp.zeros: inside shard_map both branches must vary alike)
    yb = jax.lax.cond(used, run, lambda _: jnp.zeros_like(xb, jnp.float32), None)
    return None, yb

  _, yp = jax.lax.scan(step, None, (xp.reshape(n_blocks, block, -1),
                                    wp.reshape(n_blocks, block), block_e, block_used))
  yp = yp.reshape(n_rows, -1)
  pos = jnp.zeros((a,), jnp.int32).at[order].set(pos_s)  # padded row of each assignment
  y_assign = jnp.where(local[:, None], yp[jnp.minimum(pos, n_rows - 1)], 0.0)
  return y_assign.reshape(u, k, -1).sum(axis=1)


def routed_experts(x_UD, idx_UX, w_UX, w1, w2, w3, *, limit: float,
                   dispatch: str = "blocked", block: int = 128) -> jax.Array:
  """Dropless routed-expert output y_UD (fp32) for all U tokens; expert-parallel via
  shard_map when the active mesh has an ``expert`` axis of size > 1."""
  fn = partial(_routed_local, limit=limit, dispatch=dispatch, block=block)
  mesh = sharding.active_mesh()
  ep = mesh.shape.get("expert", 1) if mesh is not None else 1
  if ep == 1:
    return fn(x_UD, idx_UX, w_UX, w1, w2, w3, 0)
  if w1.shape[0] % ep:
    raise ValueError(f"n_routed_experts={w1.shape[0]}; expected a multiple of the 'expert' "
                     f"mesh axis size ({ep})")
  n_local = w1.shape[0] // ep
  scatter = x_UD.shape[0] % ep == 0

  def body(x, idx, w, w1, w2, w3):
    if scatter:   # each shard holds 1/ep of the tokens: gather the expert group's tokens
      x = jax.lax.all_gather(x, "expert", tiled=True)
      idx = jax.lax.all_gather(idx, "expert", tiled=True)
      w = jax.lax.all_gather(w, "expert", tiled=True)
    y = fn(x, idx, w, w1, w2, w3, jax.lax.axis_index("expert") * n_local)
    if scatter:
      return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, "expert")

  tok = P("expert") if scatter else P()
  return jax.shard_map(body, mesh=mesh, axis_names={"expert"},
                       in_specs=(tok, tok, tok, P("expert"), P("expert"), P("expert")),
                       out_specs=tok)(x_UD, idx_UX, w_UX, w1, w2, w3)


# ------------------------------------------------------------------------------ modules


def _init(std, fan_in_axis=-2, batch_axis=()):
  if std is not None:
    return jax.nn.initializers.normal(std)
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=fan_in_axis,
                                              out_axis=-1, batch_axis=batch_axis)


class SwiGLU(nnx.Module):
  """Dense SwiGLU FFN (V4 ``Expert``): y = (silu(x·w1) · (x·w3) [· weights]) · w2.

  ``swiglu_limit`` > 0 adds V4's clamps (routed experts); 0 = unclamped (shared expert,
  dense FFN). Parameters w1 [D, F], w3 [D, F], w2 [F, D].
  """

  def __init__(self, d_model: int, hidden: int, *, swiglu_limit: float = 0.0,
               init_std: float | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.swiglu_limit = swiglu_limit
    self.w1 = sharding.param(_init(init_std), rngs.params(), (d_model, hidden),
                             ("embed", "mlp"), param_dtype)
    self.w3 = sharding.param(_init(init_std), rngs.params(), (d_model, hidden),
                             ("embed", "mlp"), param_dtype)
    self.w2 = sharding.param(_init(init_std), rngs.params(), (hidden, d_model),
                             ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    h = swiglu_hidden(_dot(x, self.w1[...]), _dot(x, self.w3[...]), self.swiglu_limit)
    if weights is not None:
      h = weights.astype(jnp.float32) * h
    return _dot(h.astype(x.dtype), self.w2[...]).astype(x.dtype)


class Experts(nnx.Module):
  """Routed expert weights, stacked: w1 [E, D, F], w3 [E, D, F], w2 [E, F, D] (logical
  axes "exp", "embed", "mlp")."""

  def __init__(self, n_experts: int, d_model: int, hidden: int, *,
               init_std: float | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = _init(init_std, batch_axis=(0,))
    self.w1 = sharding.param(init, rngs.params(), (n_experts, d_model, hidden),
                             ("exp", "embed", "mlp"), param_dtype)
    self.w3 = sharding.param(init, rngs.params(), (n_experts, d_model, hidden),
                             ("exp", "embed", "mlp"), param_dtype)
    self.w2 = sharding.param(init, rngs.params(), (n_experts, hidden, d_model),
                             ("exp", "mlp", "embed"), param_dtype)


class MoE(nnx.Module):
  """DeepSeek-V4 MoE layer (V4 ``MoE`` + ``Gate``).

  Parameters: ``gate`` [D, E] (V4 Gate.weight, transposed to x·W layout), ``experts``
  (w1, w2, w3 stacked over E), ``shared_experts`` (SwiGLU, if n_shared_experts > 0).
  Non-trainable: ``bias`` (RouterBias [E], score layers only), ``tid2eid``
  (HashRoutingTable [vocab, X], hash layers only), ``load`` (MoEStats [E]).

  ``__call__(x_BTD, token_ids_BT=None, mask_BT=None) -> (y_BTD, MoEAux)``; token ids are
  required in hash layers; ``mask_BT`` (1 = real token) keeps padding out of the load
  counts and the balance loss (padding is still computed, like any token).
  """

  def __init__(self, cfg: MoEConfig, d_model: int, layer_id: int,
               vocab_size: int | None = None, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.d_model = d_model
    self.layer_id = layer_id
    self.is_hash = layer_id < cfg.n_hash_layers
    e = cfg.n_routed_experts
    self.gate = sharding.param(_init(cfg.init_std), rngs.params(), (d_model, e),
                               ("embed", None), jnp.float32)
    if self.is_hash:
      if not vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} for hash layer layer_id={layer_id} "
                         f"(n_hash_layers={cfg.n_hash_layers}); expected a positive int "
                         f"for the tid2eid table")
      self.tid2eid = HashRoutingTable(jnp.asarray(make_tid2eid(
          vocab_size, e, cfg.n_activated_experts, cfg.hash_seed + layer_id)))
      self.bias = None
    else:
      self.tid2eid = None
      self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
    self.load = MoEStats(jnp.zeros((e,), jnp.float32))
    self.experts = Experts(e, d_model, cfg.moe_inter_dim, init_std=cfg.init_std,
                           param_dtype=param_dtype, rngs=rngs)
    self.shared_experts = (
        SwiGLU(d_model, cfg.n_shared_experts * cfg.moe_inter_dim, swiglu_limit=0.0,
               init_std=cfg.init_std, param_dtype=param_dtype, rngs=rngs)
        if cfg.n_shared_experts > 0 else None)

  def route(self, x_UD: jax.Array, token_ids_U: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """V4 Gate: returns (scores_UE fp32, idx_UX int32, weights_UX fp32)."""
    cfg = self.cfg
    logits = jnp.dot(x_UD.astype(jnp.float32), self.gate[...].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    s = router_scores(logits, cfg.score_func)
    if self.is_hash:
      if token_ids_U is None:
        raise ValueError(f"token_ids=None in hash-routed MoE layer_id={self.layer_id}; "
                         f"expected the input token ids [B, T]")
      idx = self.tid2eid[...][token_ids_U]
    else:
      # bias steers selection only; the weights below come from the unbiased scores
      _, idx = jax.lax.top_k(s + self.bias[...], cfg.n_activated_experts)
    idx = idx.astype(jnp.int32)
    w = jnp.take_along_axis(s, idx, axis=-1)
    if cfg.score_func != "softmax":
      w = w / jnp.sum(w, axis=-1, keepdims=True)
    return s, idx, w * cfg.route_scale

  def __call__(self, x_BTD: jax.Array, token_ids_BT: jax.Array | None = None,
               mask_BT: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    cfg = self.cfg
    b, t, d = x_BTD.shape
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    x = x_BTD.reshape(b * t, d)
    ids = None if token_ids_BT is None else token_ids_BT.reshape(b * t)
    s, idx, w = self.route(x, ids)

    ws = (self.experts.w1[...], self.experts.w2[...], self.experts.w3[...])
    if getattr(self, "fp4_qat", False):  # V4 FP4 routed experts (model1.quant.enable_qat)
      from model1.quant import fake_quant_weight_fp4
      ws = tuple(fake_quant_weight_fp4(v) for v in ws)
    y = routed_experts(x, idx, w, *ws, limit=cfg.swiglu_limit,
                       dispatch=cfg.dispatch, block=cfg.block_size)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x).astype(jnp.float32)
    y = y.astype(x_BTD.dtype).reshape(b, t, d)

    # balance statistics (no gradient through counts)
    m = (jnp.ones((b, t), jnp.float32) if mask_BT is None
         else mask_BT.astype(jnp.float32))
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, t, k)).reshape(-1)
    mk = jnp.broadcast_to(m[:, :, None], (b, t, k)).reshape(-1)
    counts_BE = jnp.zeros((b, e), jnp.float32).at[rows, idx.reshape(-1)].add(mk)
    load = counts_BE.sum(0)
    load_frac = load / jnp.maximum(load.sum(), 1.0)
    self.load[...] = self.load[...] + jax.lax.stop_gradient(load)

    if self.is_hash or cfg.seq_aux_loss_weight == 0:
      aux_loss = jnp.zeros((), jnp.float32)
    else:
      n_tok = jnp.maximum(m.sum(1), 1.0)                               # [B]
      f = counts_BE * (e / (k * n_tok))[:, None]                       # f_bi
      s_norm = (s / jnp.sum(s, axis=-1, keepdims=True)).reshape(b, t, e)
      p = jnp.einsum("bt,bte->be", m, s_norm) / n_tok[:, None]         # P_bi
      aux_loss = cfg.seq_aux_loss_weight * jnp.mean(jnp.sum(f * p, axis=-1))
    return y, MoEAux(aux_loss, jax.lax.stop_gradient(load),
                     jax.lax.stop_gradient(load_frac))


# ------------------------------------------------------------------------- train-step API


def _moe_layers(model: nnx.Module):
  return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, MoE)]


def apply_bias_updates(model: nnx.Module, rate: float | None = None) -> None:
  """After the optimizer step: for every score-routed MoE in ``model``,
  bias += rate · sign(mean(load) − load) from the counts accumulated in ``load`` since
  the last call (rate defaults to each layer's ``bias_update_rate``); then zero
  ``load`` in every MoE (hash layers included). Works eagerly or inside nnx.jit."""
  for _, m in _moe_layers(model):
    if m.bias is not None:
      r = m.cfg.bias_update_rate if rate is None else rate
      # an all-zero load (nothing counted) gives sign(0) = 0: bias unchanged
      m.bias[...] = update_bias(m.bias[...], m.load[...], r)
    m.load[...] = jnp.zeros_like(m.load[...])


def reset_moe_stats(model: nnx.Module) -> None:
  """Zero every MoE's accumulated ``load`` (e.g. after evaluation forwards)."""
  for _, m in _moe_layers(model):
    m.load[...] = jnp.zeros_like(m.load[...])
