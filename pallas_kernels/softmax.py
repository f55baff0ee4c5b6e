"""The sink-aware masked softmax and its log-sum-exp, written once for every attention
path: the plain-jnp references, the split-KV combine, the Pallas kernels (online form)
and ``model1``'s XLA attention.

What (FlashMLA's conventions, natural log):
  * keys outside ``valid`` contribute exactly nothing, even when their logits are NaN or
    inf (they are removed with selects, never multiplied by a zero probability);
  * lse = log sum_valid exp(logit); a row with no valid key has lse = -inf internally
    (the public functions report +inf, FlashMLA's "empty row") and output 0;
  * the attention sink is a virtual logit with zero value in the softmax denominator:
    out *= 1 / (1 + exp(sink - lse)); lse excludes it; sink = -inf is an exact no-op and
    sink = +inf zeroes the row.
Source: FlashMLA ``tests/ref.py`` (``ref_sparse_attn_decode``, ``_merge_two_lse``) and the
DeepSeek-V4 ``inference/model.py`` sink (exp(sink - max) added to the denominator only).

Two forms of the same arithmetic:
  ``masked_softmax``   one shot over all keys ``[..., X]``: the references, the combine
                       (a softmax over splits' lse values) and ``model1.attention_core``;
  ``online_step`` /    flash attention's running (max, sum) recurrence over key blocks,
  ``online_finish``    used inside the kernels (plain jnp, so it lowers to Triton and runs
                       in interpret mode); ``online_finish`` applies the sink and the
                       empty-row rule exactly as ``finalize`` does for the one-shot form.
Letter key: N rows (any leading shape), X keys, M rows of a kernel program, V value dims.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def masked_softmax(logits_NX: jax.Array, valid_NX: jax.Array | None = None,
                   sink_N: jax.Array | None = None):
  """Softmax over the valid keys, with an optional sink in the denominator.

  Args:
    logits_NX: scaled logits ``[..., X]`` (any float dtype; computed in fp32).
    valid_NX: bool, broadcastable to logits; None = every finite-or--inf logit counts
      (callers that already wrote -inf at masked keys).
    sink_N: optional per-row sink logit, broadcastable to ``logits[..., 0]``.
  Returns:
    p ``[..., X]`` fp32 (exact zeros at invalid keys; sums to 1 / (1 + exp(sink - lse))
    with a sink, to 1 without, to 0 on an empty row), lse ``[...]`` of the valid keys
    (sink excluded; -inf on an empty row), max logit ``[...]`` (-inf on an empty row).

  With a sink, lse is computed against max(max logit, sink); if every key is more than
  ~87 below the sink its exp underflows and lse reads -inf (the probabilities are then
  exactly what fp32 can represent: zero).
  """
  logits_NX = logits_NX.astype(jnp.float32)
  if valid_NX is not None:
    logits_NX = jnp.where(valid_NX, logits_NX, NEG_INF)
  max_N = jnp.max(logits_NX, axis=-1)
  m_N = max_N if sink_N is None else jnp.maximum(max_N, sink_N.astype(jnp.float32))
  m_N = jnp.where(jnp.isfinite(m_N), m_N, 0.0)           # empty row / inf sink: avoid inf - inf
  e_NX = jnp.exp(logits_NX - m_N[..., None])
  if valid_NX is not None:
    e_NX = jnp.where(valid_NX, e_NX, 0.0)
  sum_N = jnp.sum(e_NX, axis=-1)
  denom_N = sum_N if sink_N is None else sum_N + jnp.exp(sink_N.astype(jnp.float32) - m_N)
  p_NX = e_NX / jnp.where(denom_N == 0, 1.0, denom_N)[..., None]
  lse_N = jnp.where(sum_N > 0, m_N + jnp.log(jnp.where(sum_N > 0, sum_N, 1.0)), NEG_INF)
  return p_NX, lse_N, max_N


def sink_factor(lse_N: jax.Array, attn_sink_N: jax.Array | None) -> jax.Array:
  """1 / (1 + exp(sink - lse)); 1 without a sink.  Broadcasts sink over lse's shape."""
  if attn_sink_N is None:
    return jnp.ones_like(lse_N)
  return 1.0 / (1.0 + jnp.exp(attn_sink_N.astype(jnp.float32) - lse_N))


def finalize(out_NV: jax.Array, lse_N: jax.Array, attn_sink_N: jax.Array | None = None,
             out_dtype=jnp.bfloat16):
  """Sink and FlashMLA's empty-row rule on a sink-free result: out 0, lse +inf where lse = -inf."""
  empty_N = lse_N == NEG_INF
  out_NV = out_NV * sink_factor(lse_N, attn_sink_N)[..., None]
  out_NV = jnp.where(empty_N[..., None], 0.0, out_NV)
  return out_NV.astype(out_dtype), jnp.where(empty_N, jnp.inf, lse_N)


# ----------------------------------------------------------------------------- online form


def online_init(m: int):
  """Running (max, sum) for ``m`` rows that have seen nothing: (-inf, 0)."""
  return jnp.full((m,), NEG_INF, jnp.float32), jnp.zeros((m,), jnp.float32)


def online_step(m_M: jax.Array, l_M: jax.Array, s_MX: jax.Array):
  """One key block of the online softmax.  ``s_MX``: scaled fp32 logits, -inf at keys the
  row must not see.  Returns (new max, alpha = rescale factor of the old accumulators,
  p ``[M, X]`` fp32 (exact 0 at -inf logits), new sum)."""
  m_new = jnp.maximum(m_M, jnp.max(s_MX, axis=1))
  m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)       # empty so far: avoid -inf - -inf
  alpha_M = jnp.exp(m_M - m_safe)                        # -inf -> 0
  p_MX = jnp.exp(s_MX - m_safe[:, None])                 # masked -> exactly 0
  return m_new, alpha_M, p_MX, l_M * alpha_M + jnp.sum(p_MX, axis=1)


def online_finish(m_M: jax.Array, l_M: jax.Array, sink_M: jax.Array | None, final: bool):
  """(factor, lse): the accumulators times ``factor`` are the output.

  final=True (every key was seen): the sink and the empty-row rule (factor 0, lse +inf),
  as ``finalize``.  final=False (a split-KV partial): out = acc / l, lse -inf for an
  empty part; the combine applies the sink once, after merging."""
  live_M = l_M > 0
  lse_M = jnp.where(live_M, m_M + jnp.log(jnp.where(live_M, l_M, 1.0)), NEG_INF)
  factor_M = jnp.where(live_M, 1.0 / jnp.where(live_M, l_M, 1.0), 0.0)
  if final:
    if sink_M is not None:
      sink_f = 1.0 / (1.0 + jnp.exp(sink_M - jnp.where(live_M, lse_M, 0.0)))
      factor_M = jnp.where(live_M, factor_M * sink_f, 0.0)
    lse_M = jnp.where(live_M, lse_M, float("inf"))
  return factor_M, lse_M
