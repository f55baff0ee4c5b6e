"""The one attention function every path calls: masked softmax(q k^T * scale) v.

``attend`` is grouped-query attention in plain XLA: q [B,T,N,H], k [B,S,K,H],
v [B,S,K,Hv] with N a multiple of K (MLA's MODEL1 form and the absorbed V32 form use
K = 1: one shared vector is every head's key). An optional per-head ``sink_N`` logit joins
the softmax denominator with a zero value (DeepSeek-V4 / FlashMLA ``attn_sink``).
Rows with no visible key return 0.  The masked softmax itself (sink, empty rows) is
``pallas_kernels.softmax.masked_softmax``, shared with the kernels and their references. Logits and the softmax are fp32 whatever the
compute dtype.

``mask_BTS`` is built from segment ids (packed documents never attend across their
boundary) and causal order by ``causal_segment_mask``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.softmax import masked_softmax


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
  sink_KG = None if sink_N is None else sink_N.reshape(K, N // K)[None, :, :, None]
  p, _, _ = masked_softmax(logits_BKGTS, m_BTS, sink_KG)
  o_BTKGV = jnp.einsum("bkgts,bskv->btkgv", p.astype(v_BSKV.dtype), v_BSKV,
                       preferred_element_type=jnp.float32)
  return o_BTKGV.reshape(B, T, N, v_BSKV.shape[-1]).astype(q_BTNH.dtype)


# ---------------------------------------------------------------- sparse (chunked) attention
#
# The sparse paths (DSA top-k, V4 window + compressed entries) never build a [T, S] score
# matrix. Queries are processed in chunks of C rows (``over_query_chunks``: a ``lax.map``
# whose body is rematerialised, so the backward pass keeps only its inputs); each chunk
# attends over one or more key *sources*, all in one softmax (with the sink):
#   band(W)   the sliding window: one slice of C+W-1 key rows shared by the chunk
#   dense     every key of a short list (HCA's T/r compressed entries), masked causally
#   gathered  per-query keys picked by index (DSA top-k tokens, CSA top-k entries)
# Memory is O(C x keys per query) per chunk and O(T x keys per query) overall.


def visible(q_row_A: jax.Array, q_seg_BA: jax.Array, k_row_U: jax.Array, k_seg_BU: jax.Array,
            window: int | None = None) -> jax.Array:
  """[B,A,U] bool: key visible iff same non-zero segment, its last row <= the query row
  (a compressed entry's last row is that of its block's last token) and, with a window,
  the key row > query row - window."""
  ok = (q_seg_BA[:, :, None] == k_seg_BU[:, None, :]) & (q_seg_BA[:, :, None] != 0)
  ok &= k_row_U[None, None, :] <= q_row_A[None, :, None]
  if window is not None:
    ok &= k_row_U[None, None, :] > q_row_A[None, :, None] - window
  return ok


def over_query_chunks(fn: Callable, q_side: dict, T: int, chunk: int):
  """Run ``fn(c0, q_chunk) -> pytree of [B, A, ...]`` over query chunks of ``chunk`` rows.

  ``q_side`` holds the query-indexed inputs [B, T, ...] (padded to a multiple of C with
  zeros: segment 0 rows see nothing); outputs are stitched back to [B, T, ...]."""
  C = min(chunk, T)
  n = -(-T // C)
  if n == 1:
    return fn(0, q_side)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, n * C - T)] + [(0, 0)] * (a.ndim - 2))
  q_side = jax.tree.map(pad, q_side)

  def body(c0):
    sl = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, c0, C, axis=1), q_side)
    return fn(c0, sl)

  out = jax.lax.map(jax.checkpoint(body), jnp.arange(n) * C)
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(
      (a.shape[1], n * C) + a.shape[3:])[:, :T], out)


def band_keys(kv_BSH: jax.Array, seg_BS: jax.Array, window: int, T_pad: int):
  """Pad keys for ``band_slice``: W-1 empty rows in front, enough at the back."""
  S = kv_BSH.shape[1]
  back = max(T_pad - S, 0)
  return (jnp.pad(kv_BSH, ((0, 0), (window - 1, back), (0, 0))),
          jnp.pad(seg_BS, ((0, 0), (window - 1, back))))


def band_slice(padded, window: int, c0, C: int):
  """Keys of rows [c0-W+1, c0+C) (shared by the chunk) and their rows."""
  kv_pad, seg_pad = padded
  L = C + window - 1
  k_BUH = jax.lax.dynamic_slice_in_dim(kv_pad, c0, L, axis=1)
  seg_BU = jax.lax.dynamic_slice_in_dim(seg_pad, c0, L, axis=1)
  return k_BUH, seg_BU, c0 - window + 1 + jnp.arange(L)


def attend_sources(q_BANH: jax.Array, sources, scale: float, sink_N: jax.Array | None,
                   d_v: int):
  """One softmax over several key sources, value = the key's first ``d_v`` dims.

  ``sources``: list of (keys, mask_BAU): keys [B,U,H] shared by all queries of the chunk
  or [B,A,U,H] per query. Returns (out [B,A,N,d_v] in q's dtype, per-source attention
  summed over heads [B,A,U] fp32 — the indexer's KL target)."""
  logits = []
  for k, m in sources:
    spec = "banh,buh->banu" if k.ndim == 3 else "banh,bauh->banu"
    lg = jnp.einsum(spec, q_BANH, k, preferred_element_type=jnp.float32) * scale
    logits.append(jnp.where(m[:, :, None, :], lg, -jnp.inf))
  lg = jnp.concatenate(logits, axis=-1)
  p, _, _ = masked_softmax(lg, None, None if sink_N is None else sink_N[None, None, :])
  out, probs, start = 0.0, [], 0
  for k, _ in sources:
    L = k.shape[-2]
    p_s = p[..., start:start + L]
    start += L
    spec = "banu,buv->banv" if k.ndim == 3 else "banu,bauv->banv"
    out = out + jnp.einsum(spec, p_s.astype(k.dtype), k[..., :d_v],
                           preferred_element_type=jnp.float32)
    probs.append(jnp.sum(p_s, axis=2))
  return out.astype(q_BANH.dtype), probs


def gather_rows(kv_BSH: jax.Array, idx_BAX: jax.Array) -> jax.Array:
  """kv rows picked per query: [B,A,X,H] (indices clipped; callers mask invalid ones)."""
  B, C, X = idx_BAX.shape
  flat = jnp.clip(idx_BAX, 0, kv_BSH.shape[1] - 1).reshape(B, C * X)
  return jnp.take_along_axis(kv_BSH, flat[..., None], axis=1).reshape(B, C, X, -1)
