"""The one attention function every path calls: masked softmax(q k^T * scale) v.

``attend`` is grouped-query attention in plain XLA: q [B,T,N,H], k [B,S,K,H],
v [B,S,K,Hv] with N a multiple of K (MLA's MODEL1 form and the absorbed V32 form use
K = 1: one shared vector is every head's key). An optional per-head ``sink_N`` logit joins
the softmax denominator with a zero value (DeepSeek-V4 / FlashMLA ``attn_sink``).
Rows with no visible key return 0. Logits and the softmax are fp32 whatever the
compute dtype.

``mask_BTS`` is built from segment ids (packed documents never attend across their
boundary) and causal order by ``causal_segment_mask``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_segment_mask(segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array | None = None,
                        q_index_BT: jax.Array | None = None,
                        kv_index_BS: jax.Array | None = None) -> jax.Array:
  """[B,T,S] bool: key s visible to query t iff same non-zero segment and s <= t."""
  kv_seg = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
  T, S = segment_ids_BT.shape[1], kv_seg.shape[1]
  qi = jnp.arange(T)[None, :] if q_index_BT is None else q_index_BT
  ki = jnp.arange(S)[None, :] if kv_index_BS is None else kv_index_BS
  same = (segment_ids_BT[:, :, None] == kv_seg[:, None, :]) & (segment_ids_BT[:, :, None] != 0)
  return same & (ki[:, None, :] <= qi[:, :, None])


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKV: jax.Array, mask_BTS: jax.Array,
           scale: float, sink_N: jax.Array | None = None) -> jax.Array:
  """Softmax attention; returns [B,T,N,Hv] in q's dtype."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  m_BTS = mask_BTS[:, None, None]
  logits_BKGTS = jnp.where(m_BTS, logits_BKGTS, -jnp.inf)
  mx = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
  if sink_N is not None:
    sink_KG = sink_N.astype(jnp.float32).reshape(K, N // K)[None, :, :, None, None]
    mx = jnp.maximum(mx, sink_KG)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)  # fully masked row: keep exp() finite
  p = jnp.exp(logits_BKGTS - mx)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sink_N is not None:
    denom = denom + jnp.exp(sink_KG - mx)
  p = p / jnp.where(denom == 0, 1.0, denom)
  o_BTKGV = jnp.einsum("bkgts,bskv->btkgv", p.astype(v_BSKV.dtype), v_BSKV,
                       preferred_element_type=jnp.float32)
  return o_BTKGV.reshape(B, T, N, v_BSKV.shape[-1]).astype(q_BTNH.dtype)
