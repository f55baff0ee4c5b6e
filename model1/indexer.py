"""Lightning indexers: which keys each query attends to (DeepSeek-V3.2 DSA, V4 CSA).

What: a cheap multi-head scorer over all visible keys,
    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]),
with I_H heads of J dims (64 x 128 at full size), ONE key per token shared by the heads,
and per-query head weights w = weights_proj(x) * J^-0.5 * I_H^-0.5. Each query keeps the
top-k visible keys (causal, same segment); the main attention then runs over those only.

  * ``DSAIndexer`` (V3.2, every layer, over tokens): q = wq_b(qr) from the attention's
    query low-rank state qr; k = LayerNorm(wk x). RoPE is NeoX-style (rotate-half pairs
    (x_i, x_{i+R/2})) on the FIRST R = 64 dims (DeepSeek-V3.2-Exp commit 8631a81; older
    copies were interleaved). Reference: Hadamard rotation + FP8 (128 tiles) of q and k.
  * ``CSAIndexer`` (V4 CSA layers, over compressed entries): keys are the entries of its
    own overlapping ratio-4 ``Compressor`` (J dims); RoPE is V4's (interleaved, LAST 64
    dims, the layer's YaRN RoPE); reference: Hadamard + FP4 (32 blocks) of q and k.
Both always apply the Hadamard rotation to q and k, as DeepSeek does (so cached indexer
keys match its cache); it is orthogonal, so q.k is unchanged in exact arithmetic, and the
FP8/FP4 rounding after it is on only with ``AttentionConfig.qat``.

Training (V3.2 recipe, docs/design.md §2): the indexer learns from L_I = KL(p_t || softmax(I_t))
where p_t is the main attention summed over heads and L1-normalised (``kl_loss``). Dense
warm-up: attention stays dense, L_I over all visible keys, and only indexer parameters
are optimised (``is_indexer_param`` / ``INDEXER_PARAMS`` for the optimizer). Sparse stage:
L_I over the selected set only. In both, the indexer's inputs are detached (no L_I
gradient into the main model) and p_t is a stop-gradient target; the top-k indices are
integers, so the LM loss never reaches the indexer.

Source: DeepSeek-V3.2-Exp and DeepSeek-V4-Flash ``inference/model.py`` (``Indexer``),
the V3.2 paper (arXiv 2512.02556) §2. Shapes: q [B,T,I,J], k [B,S,J], w [B,T,I],
scores [B,T,S], selected indices [B,T,X].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import qat
from model1.attention_core import over_query_chunks
from model1.compressor import Compressor
from model1.config import AttentionConfig, RopeConfig
from model1.layers import Dense, apply_rope, rope_frequencies

INDEXER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("indexer"))


def is_indexer_param(path) -> bool:
  """True for parameters under an ``indexer`` module (path: tuple of keys or 'a/b/c')."""
  parts = path.split("/") if isinstance(path, str) else path
  return any(str(getattr(p, "key", p)) == "indexer" for p in parts)


def apply_rope_neox_first(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
  """V3.2 indexer RoPE: rotate pairs (x_i, x_{i+R/2}), i < R/2, of the first R dims."""
  r = cfg.dim
  ang = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
  ang = ang.reshape(ang.shape[:-1] + (1,) * (x.ndim - positions.ndim - 1) + ang.shape[-1:])
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  a, b = x[..., :r // 2].astype(jnp.float32), x[..., r // 2:r].astype(jnp.float32)
  rot = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)
  return jnp.concatenate([rot, x[..., r:]], axis=-1)


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias (V3.2's indexer ``k_norm``), fp32 statistics."""

  def __init__(self, d: int, eps: float = 1e-6):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
    return y.astype(x.dtype)


class _IndexerQuery(nnx.Module):
  def _init_query(self, cfg: AttentionConfig, d_model: int, rngs: nnx.Rngs):
    self.n_heads, self.head_dim, self.qat = cfg.index_n_heads, cfg.index_head_dim, cfg.qat
    self.wq_b = Dense(cfg.q_lora_rank, (cfg.index_n_heads, cfg.index_head_dim),
                      ("q_lora", "indexer_heads", None), rngs)
    self.weights_proj = Dense(d_model, cfg.index_n_heads, ("embed", "indexer_heads"), rngs)

  def weights(self, x_BTD):
    w_BTI = self.weights_proj(x_BTD.astype(jnp.float32))
    return w_BTI * (self.head_dim ** -0.5 * self.n_heads ** -0.5)


class DSAIndexer(_IndexerQuery):
  """V3.2 lightning indexer over tokens (params: wq_b, wk, k_norm, weights_proj)."""

  def __init__(self, cfg: AttentionConfig, d_model: int, rngs: nnx.Rngs):
    self._init_query(cfg, d_model, rngs)
    self.rope = cfg.rope
    self.wk = Dense(d_model, cfg.index_head_dim, ("embed", None), rngs)
    self.k_norm = LayerNorm(cfg.index_head_dim)

  def keys(self, x_BSD, positions_BS):
    k_BSJ = apply_rope_neox_first(self.k_norm(self.wk(x_BSD)), positions_BS, self.rope)
    return qat.indexer_quant(k_BSJ, "fp8" if self.qat else None)

  def queries(self, x_BTD, qr_BTQ, positions_BT):
    q_BTIJ = apply_rope_neox_first(self.wq_b(qr_BTQ), positions_BT, self.rope)
    q_BTIJ = qat.indexer_quant(q_BTIJ, "fp8" if self.qat else None)
    return q_BTIJ, self.weights(x_BTD)


class CSAIndexer(_IndexerQuery):
  """V4 indexer over compressed entries (params: wq_b, weights_proj, compressor)."""

  def __init__(self, cfg: AttentionConfig, d_model: int, rope: RopeConfig, ratio: int,
               rngs: nnx.Rngs):
    self._init_query(cfg, d_model, rngs)
    self.rope = rope
    self.compressor = Compressor(d_model, cfg.index_head_dim, ratio, rope, cfg.norm_eps,
                                 rngs, quant="fp4" if cfg.qat else "hadamard")

  def queries(self, x_BTD, qr_BTQ, positions_BT):
    q_BTIJ = apply_rope(self.wq_b(qr_BTQ), positions_BT, self.rope)
    q_BTIJ = qat.indexer_quant(q_BTIJ, "fp4" if self.qat else None)
    return q_BTIJ, self.weights(x_BTD)


# ---------------------------------------------------------------- scores and selection

def index_scores(q_BAIJ, k_BSJ, w_BAI) -> jax.Array:
  """I[c, s] = sum_h w[c, h] ReLU(q[c, h] . k[s]) -> [B,A,S] fp32 (k may be [B,A,S,J])."""
  spec = "baij,bsj->bais" if k_BSJ.ndim == 3 else "baij,basj->bais"
  dots = jnp.einsum(spec, q_BAIJ.astype(jnp.float32), k_BSJ.astype(jnp.float32))
  return jnp.einsum("bais,bai->bas", jax.nn.relu(dots), w_BAI.astype(jnp.float32))


def select_topk(q_BTIJ, k_BSJ, w_BTI, seg_BT, visible_fn, topk: int, chunk: int):
  """Top-k visible keys per query, chunked over queries (memory O(C x S) per chunk).

  ``visible_fn(c0, C, seg_BA) -> [B,A,S]``. Returns (indices [B,T,X] int32, valid [B,T,X])
  with X = min(topk, S); a query with fewer than X visible keys gets invalid slots."""
  X = min(topk, k_BSJ.shape[1])
  q_BTIJ, k_BSJ, w_BTI = jax.lax.stop_gradient((q_BTIJ, k_BSJ, w_BTI))

  def chunk_fn(c0, qs):
    s_BAS = index_scores(qs["q"], k_BSJ, qs["w"])
    s_BAS = jnp.where(visible_fn(c0, qs["q"].shape[1], qs["seg"]), s_BAS, -jnp.inf)
    val_BAX, idx_BAX = jax.lax.top_k(s_BAS, X)
    return idx_BAX.astype(jnp.int32), val_BAX > -jnp.inf

  return over_query_chunks(chunk_fn, {"q": q_BTIJ, "w": w_BTI, "seg": seg_BT},
                           q_BTIJ.shape[1], chunk)


def kl_loss(p_BTU: jax.Array, scores_BTU: jax.Array, valid_BTU: jax.Array) -> jax.Array:
  """mean_t KL(p_t || softmax(I_t)) over the keys in ``valid`` (the KL target p is the
  main attention summed over heads; it is L1-normalised here and never differentiated)."""
  p = jax.lax.stop_gradient(jnp.where(valid_BTU, p_BTU, 0.0))
  tot = jnp.sum(p, -1, keepdims=True)
  p = p / jnp.where(tot > 0, tot, 1.0)
  s = jnp.where(valid_BTU, scores_BTU, -jnp.inf)
  mx = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  logz = mx + jnp.log(jnp.sum(jnp.where(valid_BTU, jnp.exp(s - mx), 0.0), -1, keepdims=True)
                      + 1e-30)
  logq = jnp.where(valid_BTU, s - logz, 0.0)
  kl_BT = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), -1)
  rows = (tot[..., 0] > 0).astype(jnp.float32)
  return jnp.sum(kl_BT * rows) / jnp.maximum(jnp.sum(rows), 1.0)
