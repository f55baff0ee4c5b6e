"""The split-KV combine: merge partial attention results by their log-sum-exp.

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

The softmax arithmetic itself (masking, sink, empty rows) lives in ``softmax``; the
combine is that masked softmax taken over the splits' lse values.  ``masked_softmax``,
``sink_factor`` and ``finalize`` are re-exported here for existing callers.

Shapes: partials ``[n_splits, ..., d_v]`` with lse
``[n_splits, ...]`` (the output shape without d_v; callers transpose FlashMLA's
``[b, h_q, s_q]`` lse to ``[b, s_q, h_q]`` first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_cache import require
from pallas_kernels.softmax import finalize, masked_softmax, sink_factor  # noqa: F401 (re-exported)


def combine_splits(out_SNV: jax.Array, lse_SN: jax.Array, *, attn_sink_N: jax.Array | None = None,
                   out_dtype=jnp.float32):
  """Merge split-KV partials: out ``[n_splits, ..., d_v]``, lse ``[n_splits, ...]``.

  A split whose lse is -inf or +inf (FlashMLA's returned "empty") gets weight exactly 0,
  whatever its output holds.  Returns (out ``[..., d_v]`` in out_dtype, lse ``[...]`` with
  +inf for rows empty in every split); the optional sink (broadcastable to lse's shape
  without the split axis) is applied after merging.  Shapes and dtypes are checked
  (ValueError) before anything runs.
  """
  _check_combine_args(out_SNV, lse_SN, attn_sink_N, out_dtype)
  return _combine_core(out_SNV, lse_SN, attn_sink_N=attn_sink_N, out_dtype=out_dtype)


def _check_combine_args(out, lse, sink, out_dtype) -> None:
  shape = lambda x: getattr(x, "shape", None)
  dtype = lambda x: getattr(x, "dtype", None)
  floating = lambda x: x is not None and jnp.issubdtype(x, jnp.floating)
  require(hasattr(out, "shape") and out.ndim >= 2 and floating(dtype(out)),
          f"out_SNV shape={shape(out)} dtype={dtype(out)}: expected a float array "
          "[n_splits, ..., d_v]")
  require(hasattr(lse, "shape") and tuple(lse.shape) == tuple(out.shape[:-1])
          and floating(dtype(lse)),
          f"lse_SN shape={shape(lse)} dtype={dtype(lse)}: expected a float array of "
          f"shape {tuple(out.shape[:-1])} (out_SNV's shape without d_v)")
  require(out.shape[0] >= 1, f"out_SNV shape={shape(out)}: expected at least one split")
  if sink is not None:
    ok = hasattr(sink, "shape") and floating(dtype(sink))
    if ok:
      try:
        ok = np.broadcast_shapes(tuple(sink.shape), tuple(lse.shape[1:])) == tuple(lse.shape[1:])
      except ValueError:
        ok = False
    require(ok, f"attn_sink_N shape={shape(sink)} dtype={dtype(sink)}: expected a float "
                f"array broadcastable to {tuple(lse.shape[1:])}")
  require(out_dtype is not None and floating(jnp.dtype(out_dtype)),
          f"out_dtype={out_dtype!r}: expected a float dtype")


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _combine_core(out_SNV, lse_SN, *, attn_sink_N=None, out_dtype=jnp.float32):
  # The split weights are a masked softmax over the splits' lse values.
  lse_NS = jnp.moveaxis(lse_SN.astype(jnp.float32), 0, -1)
  w_NS, lse_N, _ = masked_softmax(lse_NS, jnp.isfinite(lse_NS))
  w_SN = jnp.moveaxis(w_NS, -1, 0)
  live_SN = jnp.isfinite(lse_SN)
  out_SNV = jnp.where(live_SN[..., None], out_SNV.astype(jnp.float32), 0.0)
  out_NV = jnp.sum(w_SN[..., None] * out_SNV, axis=0)
  return finalize(out_NV, lse_N, attn_sink_N, out_dtype)
