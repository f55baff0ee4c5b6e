"""Log-sum-exp bookkeeping shared by the attention references, and the split-KV combine.

What: attention over a key set split into parts (split-KV decode, main + extra cache, or
kernel tiles) is exact if each part returns its normalised output o_i and its
log-sum-exp lse_i of the scaled logits; then
    lse = log sum_i exp(lse_i),    o = sum_i exp(lse_i - lse) * o_i.
Source: FlashMLA's ``flash_fwd_mla_combine`` kernel and ``tests/ref.py`` (``_merge_two_lse``).

Conventions (FlashMLA's, natural log throughout):
  * an empty part (no valid key) has o = 0 and lse = -inf internally; the public functions
    return lse = +inf for an empty row, and ``combine_splits`` accepts either as "empty";
  * the attention sink is a virtual logit with zero value: o *= 1 / (1 + exp(sink - lse));
    the returned lse excludes it; sink = -inf has no effect, sink = +inf zeroes the row.

Shapes: ``[..., X]`` logits over X keys; partials ``[n_splits, ..., d_v]`` with lse
``[n_splits, ...]`` (the output shape without d_v; callers transpose FlashMLA's
``[b, h_q, s_q]`` lse to ``[b, s_q, h_q]`` first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def masked_softmax(logits_NX: jax.Array, valid_NX: jax.Array):
  """Softmax over valid keys only, safe for rows with no valid key.

  Returns (p ``[..., X]`` fp32 with exact zeros at invalid keys, lse ``[...]`` (-inf for an
  empty row), max logit ``[...]`` (-inf for an empty row)).  Invalid entries are removed with
  selects, so NaN/inf there never propagate.
  """
  neg_inf = jnp.float32(-jnp.inf)
  logits_NX = jnp.where(valid_NX, logits_NX.astype(jnp.float32), neg_inf)
  max_N = jnp.max(logits_NX, axis=-1)
  safe_max_N = jnp.where(jnp.isfinite(max_N), max_N, 0.0)          # empty row: avoid inf - inf
  e_NX = jnp.where(valid_NX, jnp.exp(logits_NX - safe_max_N[..., None]), 0.0)
  sum_N = jnp.sum(e_NX, axis=-1)
  lse_N = jnp.where(sum_N > 0, safe_max_N + jnp.log(sum_N), neg_inf)
  p_NX = e_NX / jnp.where(sum_N > 0, sum_N, 1.0)[..., None]
  return p_NX, lse_N, max_N


def sink_factor(lse_N: jax.Array, attn_sink_N: jax.Array | None) -> jax.Array:
  """1 / (1 + exp(sink - lse)); 1 without a sink.  Broadcasts sink over lse's shape."""
  if attn_sink_N is None:
    return jnp.ones_like(lse_N)
  return 1.0 / (1.0 + jnp.exp(attn_sink_N.astype(jnp.float32) - lse_N))


def finalize(out_NV: jax.Array, lse_N: jax.Array, attn_sink_N: jax.Array | None = None,
             out_dtype=jnp.bfloat16):
  """Apply the sink and FlashMLA's empty-row rule: out 0 and lse +inf where lse = -inf."""
  empty_N = lse_N == -jnp.inf
  out_NV = out_NV * sink_factor(lse_N, attn_sink_N)[..., None]
  out_NV = jnp.where(empty_N[..., None], 0.0, out_NV)
  return out_NV.astype(out_dtype), jnp.where(empty_N, jnp.inf, lse_N)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def combine_splits(out_SNV: jax.Array, lse_SN: jax.Array, *, attn_sink_N: jax.Array | None = None,
                   out_dtype=jnp.float32):
  """Merge split-KV partials: out ``[n_splits, ..., d_v]``, lse ``[n_splits, ...]``.

  A split whose lse is -inf or +inf (FlashMLA's returned "empty") gets weight exactly 0,
  whatever its output holds.  Returns (out ``[..., d_v]`` in out_dtype, lse ``[...]`` with
  +inf for rows empty in every split); the optional sink is applied after merging.
  """
  lse_SN = lse_SN.astype(jnp.float32)
  live_SN = jnp.isfinite(lse_SN)
  lse_SN = jnp.where(live_SN, lse_SN, -jnp.inf)
  max_N = jnp.max(lse_SN, axis=0)
  safe_max_N = jnp.where(jnp.isfinite(max_N), max_N, 0.0)
  w_SN = jnp.where(live_SN, jnp.exp(lse_SN - safe_max_N), 0.0)
  sum_N = jnp.sum(w_SN, axis=0)
  lse_N = jnp.where(sum_N > 0, safe_max_N + jnp.log(sum_N), -jnp.inf)
  w_SN = w_SN / jnp.where(sum_N > 0, sum_N, 1.0)
  out_SNV = jnp.where(live_SN[..., None], out_SNV.astype(jnp.float32), 0.0)
  out_NV = jnp.sum(w_SN[..., None] * out_SNV, axis=0)
  return finalize(out_NV, lse_N, attn_sink_N, out_dtype)
