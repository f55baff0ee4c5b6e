"""Sparse prefill attention over a bf16 KV buffer: FlashMLA's ``flash_mla_sparse_fwd``
Public entry point plus the plain-jnp reference for the kernels.

What it computes, per query position t and head n, over the keys the indices pick:
    valid x:   0 <= indices[t, 0, x] < s_kv  and  x < topk_length[t]
    logits     l_x = sm_scale * q[t, n] . kv[indices[t, 0, x], 0]     (fp32 accumulate)
    max_logits = max_x l_x            (-inf if nothing is valid)
    lse        = log sum_x exp(l_x)   (+inf if nothing is valid; natural log)
    out        = softmax(l) @ kv[..., :d_v] * 1 / (1 + exp(attn_sink[n] - lse))   (0 if none)
max_logits and lse are those of the *scaled* logits (sm_scale applied), natural log: this is
FlashMLA's ``tests/ref.py`` (``ref_sparse_attn_fwd``) and kernels; its README's "base 2" is
wrong, and "unscaled" means not multiplied by log2(e).  The sink changes out
only; +-inf sinks behave as in decode.  Invalid slots are removed with selects, so a NaN key
behind an invalid index (or past topk_length) never reaches the output.

Shapes (letter key: T query positions, N query heads, S key positions, X top-k, H head
dim, V value dim): q ``[T, N, H]`` bf16; kv ``[S, 1, H]`` bf16 (one KV head); indices
``[T, 1, X]`` int32; attn_sink ``[N]`` fp32; topk_length ``[T]`` int32.
Returns out ``[T, N, V]`` bf16, max_logits ``[T, N]`` fp32, lse ``[T, N]`` fp32.

The kernel (FlashMLA's ``sm90/prefill/sparse``, in Triton): grid ``(s_q, h_q / block_h)``;
a program holds one query position's ``block_h`` heads (64 by default, padded to >= 16),
walks its index list in ``block_k`` blocks up to ``topk_length`` (fori_loop), gathers the
selected rows of kv as the same 512/64 or 7x64/64 column tiles as the decoders (``_tiles``;
kv is bf16, so no dequantisation), and runs the online softmax with bf16 operands and fp32
accumulation.  max_logits is the running max; the sink and the empty-row rule are applied
in the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.experimental import pallas as pl

from pallas_kernels import _tiles, cache_view, dispatch, softmax
from pallas_kernels.fp8_cache import host_value, require
from pallas_kernels.tuning import KernelTuning, SparsePrefillTuning, check_tuning  # noqa: F401

IMPLS = ("xla", "pallas", "mosaic")
dispatch.register_mosaic("sparse_prefill")   # impl="mosaic": mosaic_sparse_prefill.py


def validate_sparse_prefill_args(q, kv, indices, *, sm_scale, d_v=512, attn_sink=None,
                                 topk_length=None):
  """Check shapes/dtypes; out-of-range indices are legal (they mean "invalid")."""
  require(hasattr(q, "shape") and q.ndim == 3 and q.dtype == jnp.bfloat16,
          f"q shape={getattr(q, 'shape', None)} dtype={getattr(q, 'dtype', None)}: "
          "expected bf16 [s_q, h_q, d_qk]")
  s_q, h_q, d_qk = q.shape
  require(hasattr(kv, "shape") and kv.ndim == 3 and kv.shape[1:] == (1, d_qk)
          and kv.dtype == jnp.bfloat16,
          f"kv shape={getattr(kv, 'shape', None)} dtype={getattr(kv, 'dtype', None)}: "
          f"expected bf16 [s_kv, 1, {d_qk}]")
  require(hasattr(indices, "shape") and indices.ndim == 3 and indices.shape[:2] == (s_q, 1)
          and indices.dtype == jnp.int32,
          f"indices shape={getattr(indices, 'shape', None)} dtype={getattr(indices, 'dtype', None)}: "
          f"expected int32 [{s_q}, 1, topk]")
  require(isinstance(d_v, int) and 0 < d_v <= d_qk,
          f"d_v={d_v!r}: expected an int in (0, {d_qk}] (512 for v32 and model1)")
  require(sm_scale is not None, "sm_scale=None: flash_mla_sparse_fwd needs an explicit scale")
  _tiles.check_scale("sm_scale", sm_scale)
  topk = indices.shape[-1]
  if topk_length is None:
    topk_length = jnp.full((s_q,), topk, jnp.int32)
  require(hasattr(topk_length, "shape") and topk_length.shape == (s_q,)
          and jnp.issubdtype(topk_length.dtype, jnp.integer),
          f"topk_length shape={getattr(topk_length, 'shape', None)} dtype={getattr(topk_length, 'dtype', None)}: "
          f"expected int32 [{s_q}]")
  lv = host_value(topk_length)
  if lv is not None:
    require(bool(((lv >= 0) & (lv <= topk)).all()),
            f"topk_length={lv.tolist()}: expected values in [0, {topk}]")
  if attn_sink is None:
    attn_sink = jnp.full((h_q,), -jnp.inf, jnp.float32)               # -inf: exact no-op
  require(hasattr(attn_sink, "shape") and attn_sink.shape == (h_q,)
          and attn_sink.dtype == jnp.float32,
          f"attn_sink shape={getattr(attn_sink, 'shape', None)} dtype={getattr(attn_sink, 'dtype', None)}: "
          f"expected float32 [{h_q}]")
  return dict(q=q, kv=kv, indices=indices, sm_scale=jnp.asarray(sm_scale, jnp.float32),
              attn_sink=attn_sink, topk_length=jnp.asarray(topk_length, jnp.int32))


@functools.partial(jax.jit, static_argnames=("d_v",))
def _reference_core(q, kv, indices, sm_scale, attn_sink, topk_length, *, d_v):
  s_kv = kv.shape[0]
  idx_TX = indices[:, 0, :]
  x_pos = jnp.arange(idx_TX.shape[-1], dtype=jnp.int32)
  valid_TX = (idx_TX >= 0) & (idx_TX < s_kv) & (x_pos[None, :] < topk_length[:, None])
  k_TXH = kv[jnp.clip(idx_TX, 0, s_kv - 1), 0].astype(jnp.float32)
  k_TXH = jnp.where(valid_TX[..., None], k_TXH, 0.0)
  hp = jax.lax.Precision.HIGHEST
  logits_TNX = jnp.einsum("tnh,txh->tnx", q.astype(jnp.float32), k_TXH, precision=hp) * sm_scale
  p_TNX, lse_TN, max_TN = softmax.masked_softmax(logits_TNX, valid_TX[:, None, :])
  out_TNV = jnp.einsum("tnx,txv->tnv", p_TNX, k_TXH[..., :d_v], precision=hp)
  out_TNV, lse_TN = softmax.finalize(out_TNV, lse_TN, attn_sink)
  return out_TNV, max_TN, lse_TN


def sparse_prefill_reference(q, kv, indices, *, sm_scale, d_v=512, attn_sink=None,
                             topk_length=None):
  """Plain-jnp oracle (fp32 math).  Arguments as ``sparse_prefill``."""
  args = validate_sparse_prefill_args(q, kv, indices, sm_scale=sm_scale, d_v=d_v,
                                      attn_sink=attn_sink, topk_length=topk_length)
  return _reference_core(**args, d_v=d_v)


# ----------------------------------------------------------------------------- Pallas kernel


def _prefill_kernel(len_ref, scale_ref, q_ref, sink_ref, idx_ref, kv_nope_ref, kv_rope_ref,
                    o_ref, max_ref, lse_ref, *, layout, block_h, block_k):
  t = pl.program_id(0)
  refs = _tiles.KeyRefs(kv_nope_ref, kv_rope_ref, None)
  s_kv = kv_nope_ref.shape[0]
  length = len_ref[t]
  scale = scale_ref[0]
  q_tiles = _tiles.load_q(layout, q_ref)

  def body(c, state):
    x_X = c * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    idx_X = idx_ref[t, pl.ds(c * block_k, block_k)]
    valid_X = (idx_X >= 0) & (idx_X < s_kv) & (x_X < length)
    k_tiles = _tiles.load_keys(layout, refs, jnp.where(valid_X, idx_X, 0), valid_X)
    return _tiles.softmax_step(layout, state, q_tiles, k_tiles, valid_X[None, :], scale)

  n_chunks = jnp.minimum((length + block_k - 1) // block_k, idx_ref.shape[1] // block_k)
  state = jax.lax.fori_loop(0, n_chunks, body, _tiles.init_state(layout, block_h))
  tiles, lse_M = _tiles.epilogue(state, sink_ref[...], final=True)
  _tiles.store_value_tiles(layout, o_ref, tiles)
  max_ref[...] = state.m_M                              # -inf when nothing was valid
  lse_ref[...] = lse_M


@functools.partial(jax.jit, static_argnames=("d_v", "tuning", "interpret"))
def _pallas_core(q, kv, indices, sm_scale, attn_sink, topk_length, *, d_v, tuning, interpret):
  s_q, h_q, d = q.shape
  # One bf16 array holds the whole key: passed twice, the RoPE tile read at column d - 64.
  layout = _tiles.key_layout("bf16", d, d_v, rope_col=d - _tiles.D_ROPE)
  block_h = tuning.rows_per_program(h_q)
  n_hb = -(-h_q // block_h)
  h_pad = n_hb * block_h - h_q
  q_TNH = jnp.pad(q, ((0, 0), (0, h_pad), (0, 0)))
  sink_N = jnp.pad(attn_sink, (0, h_pad), constant_values=-jnp.inf)
  idx_TX = indices[:, 0, :]
  idx_TX = jnp.pad(idx_TX, ((0, 0), (0, -idx_TX.shape[1] % tuning.block_k)), constant_values=-1)
  kv_SH = kv.reshape(kv.shape[0], d)                   # a bitcast; read twice, never split
  cache_view.check_addressable("kv", kv_SH.shape, kv_SH.dtype)
  h_all = n_hb * block_h
  whole = pl.no_block_spec
  out, max_logits, lse = pl.pallas_call(
      functools.partial(_prefill_kernel, layout=layout, block_h=block_h, block_k=tuning.block_k),
      out_shape=(jax.ShapeDtypeStruct((s_q, h_all, d_v), jnp.bfloat16),
                 jax.ShapeDtypeStruct((s_q, h_all), jnp.float32),
                 jax.ShapeDtypeStruct((s_q, h_all), jnp.float32)),
      grid=(s_q, n_hb),
      in_specs=[whole, whole, pl.BlockSpec((None, block_h, d), lambda t, j: (t, j, 0)),
                pl.BlockSpec((block_h,), lambda t, j: (j,)), whole, whole, whole],
      out_specs=(pl.BlockSpec((None, block_h, d_v), lambda t, j: (t, j, 0)),
                 pl.BlockSpec((None, block_h), lambda t, j: (t, j)),
                 pl.BlockSpec((None, block_h), lambda t, j: (t, j))),
      compiler_params=tuning.compiler_params(block_h),
      interpret=interpret, name="sparse_prefill_mla",
  )(topk_length, sm_scale.reshape(1), q_TNH, sink_N, idx_TX, kv_SH, kv_SH)
  return out[:, :h_q], max_logits[:, :h_q], lse[:, :h_q]


def sparse_prefill(q, kv, indices, *, sm_scale, d_v=512, attn_sink=None, topk_length=None,
                   impl="xla", tuning=None, interpret=None):
  """Sparse prefill attention (FlashMLA ``flash_mla_sparse_fwd``).

  Args:
    q: bf16 ``[s_q, h_q, d_qk]``;  kv: bf16 ``[s_kv, 1, d_qk]``.
    indices: int32 ``[s_q, 1, topk]``; entries < 0 or >= s_kv are invalid (not an error).
    sm_scale: softmax scale (required, as in FlashMLA).
    d_v: value dims (the first d_v of the key).
    attn_sink: optional fp32 ``[h_q]``: out *= 1/(1+exp(sink-lse)); lse/max_logits unchanged.
    topk_length: optional int32 ``[s_q]``: query t uses indices[t, 0, :topk_length[t]].
    impl: "xla" (the reference), "pallas" (the Triton kernel; interpret mode on CPU;
      needs d_qk 576 or 512 and d_v = d_qk - 64 or d_qk, whole key tiles), "mosaic" (the
      Hopper Pallas Mosaic GPU kernel, ``mosaic_sparse_prefill``; (d_qk, d_v) = (576,
      512), (512, 512) or (512, 448); GPU interpret mode on CPU) or "auto"
      (``dispatch.resolve_impl``: "mosaic" on Hopper when it covers the case, else
      "pallas" on a GPU, "xla" elsewhere).
    tuning: ``KernelTuning`` for impl="pallas" (no split-KV; default: its defaults).
    interpret: run the kernel in (Pallas, or for "mosaic" GPU) interpret mode; default:
      when the backend is CPU.
  Returns:
    out bf16 ``[s_q, h_q, d_v]``, max_logits fp32 ``[s_q, h_q]`` (-inf if no valid index),
    lse fp32 ``[s_q, h_q]`` (+inf if no valid index), both of the scaled logits, natural log.
  """
  expected = (dispatch.AUTO,) + IMPLS
  require(impl in expected, f"impl={impl!r}: expected one of {expected}")
  args = validate_sparse_prefill_args(q, kv, indices, sm_scale=sm_scale, d_v=d_v,
                                      attn_sink=attn_sink, topk_length=topk_length)
  if impl == dispatch.AUTO:
    impl = dispatch.resolve_impl(impl, kernel="sparse_prefill")
    if impl == "mosaic":
      from pallas_kernels import mosaic_sparse_prefill
      if not mosaic_sparse_prefill.supports(args, d_v):
        impl = "pallas"
  if impl == "mosaic":                 # Hopper Pallas Mosaic GPU kernel: mosaic_sparse_prefill.py
    from pallas_kernels import mosaic_sparse_prefill
    return mosaic_sparse_prefill.sparse_prefill(args, d_v, interpret)
  if impl == "pallas":
    _tiles.key_layout("bf16", q.shape[-1], d_v)                   # ValueError if untileable
    return _pallas_core(**args, d_v=d_v, tuning=check_tuning(tuning, can_split=False),
                        interpret=_tiles.default_interpret(interpret))
  return _reference_core(**args, d_v=d_v)
