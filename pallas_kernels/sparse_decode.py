"""Sparse decode attention over a paged (FP8) KV cache: FlashMLA's ``flash_mla_with_kvcache``
with ``indices`` .  This file holds the public entry point, the plain-jnp
reference and the Pallas (Triton) kernel that is tested against it.

What it computes, per batch b, query position t and head n (one shared KV vector per token):
    keys   k_x = dequant(cache[indices[b, t, x]]),  x < topk_length[b] and index != -1,
           plus the extra cache's keys chosen the same way (one softmax over both sets);
    logits l_x = softmax_scale * q[b, t, n] . k_x       (fp32 accumulate)
    out    = sum_x softmax(l)_x * k_x[:head_dim_v] * 1 / (1 + exp(attn_sink[n] - lse))
    lse    = log sum_x exp(l_x)                          (natural log; sink excluded)
A row with no valid key gives out 0 and lse +inf.  Invalid slots are removed with selects,
so their bytes (even NaN) never reach the output.  Value = the first head_dim_v dims of the
key: the 512 latent dims for v32 (d_qk 576), the whole key for model1 (d_qk 512).

Source: FlashMLA ``flash_mla/flash_mla_interface.py`` and ``tests/ref.py``
(``ref_sparse_attn_decode``).  Shapes (letter key: B batch, T query positions, N query
heads, H head dim, X top-k, V value dim):
  q ``[B, T, N, H]`` bf16; k_cache KCache / FlashMLA packed bytes; indices ``[B, T, X]`` int32
  (= block * block_size + offset, -1 invalid); topk_length ``[B]`` int32; attn_sink ``[N]``
  fp32.  Returns out ``[B, T, N, V]`` bf16 and lse ``[B, N, T]`` fp32.

The kernel (FlashMLA's FP8 sparse decoder, ``sm90/decode/sparse_fp8``, in Triton):
  * grid ``(b * s_q, num_splits, h_q / block_h)``: one program per query position, split
    and head block; every head of the block attends over the same top-k keys, so each
    key tile is gathered and dequantised once per ``block_h`` heads (64 by default, as
    FlashMLA's 64-head tiles);
  * a program walks its run of ``block_k``-entry blocks of the index list (fori_loop),
    first the main cache's, then the extra cache's (own indices, lengths, block size),
    all in one online softmax; blocks past ``topk_length`` are never visited;
  * per block: gather each key tile by index (masked loads), dequantise in registers
    (``_tiles``), ``q @ k.T``, online softmax, ``p @ v`` (bf16 operands, fp32 accumulate);
  * one split: the sink and FlashMLA's empty-row rule are applied in the kernel, which
    writes bf16; several splits: fp32 partials merged by ``combine.combine_splits``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import pallas as pl

from pallas_kernels import _tiles, cache_view, combine, dispatch, softmax
from pallas_kernels.fp8_cache import bytes_per_token, host_value, require
from pallas_kernels.tuning import KernelTuning, SparseDecodeTuning, check_tuning, choose_num_splits  # noqa: F401

IMPLS = ("xla", "pallas", "mosaic")
dispatch.register_mosaic("sparse_decode")    # impl="mosaic": mosaic_sparse_decode.py


def _check_lengths(name: str, x, batch: int, topk: int) -> jax.Array | None:
  if x is None:
    return None
  require(hasattr(x, "shape") and x.shape == (batch,) and jnp.issubdtype(x.dtype, jnp.integer),
          f"{name} shape={getattr(x, 'shape', None)} dtype={getattr(x, 'dtype', None)}: "
          f"expected int32 [{batch}]")
  xv = host_value(x)
  if xv is not None:
    require(bool(((xv >= 0) & (xv <= topk)).all()),
            f"{name}={xv.tolist()}: expected values in [0, {topk}]")
  return jnp.asarray(x, jnp.int32)


def _check_indices(name: str, indices, q_shape, cache, lengths) -> jax.Array:
  ci = cache_view.info(cache)
  b, s_q = q_shape[:2]
  require(hasattr(indices, "shape") and indices.ndim == 3 and tuple(indices.shape[:2]) == (b, s_q)
          and indices.dtype == jnp.int32,
          f"{name} shape={getattr(indices, 'shape', None)} dtype={getattr(indices, 'dtype', None)}: "
          f"expected int32 [{b}, {s_q}, topk]")
  iv = host_value(indices)
  if iv is not None:
    # Entries past topk_length are never read (FlashMLA), so only the counted ones are checked.
    counted = np.ones(iv.shape, bool)
    lv = host_value(lengths)
    if lv is not None:
      counted = np.arange(iv.shape[-1])[None, None, :] < lv[:, None, None]
    bad = counted & ((iv < -1) | (iv >= ci.num_tokens))
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}[{where}]={int(iv[where])} is outside the cache: expected -1 or "
                       f"[0, {ci.num_tokens}) ({ci.num_blocks} blocks x {ci.block_size} tokens)")
  return indices


def validate_sparse_decode_args(q, k_cache, indices, *, head_dim_v, softmax_scale=None,
                                attn_sink=None, topk_length=None, extra_k_cache=None,
                                extra_indices_in_kvcache=None, extra_topk_length=None):
  """Check shapes/dtypes (always) and index values (when concrete); normalise the args.

  Returns a dict of keyword arguments for the jitted cores: caches as KCache, lengths as
  int32, the sink as an fp32 array (-inf = no sink: an exact no-op), the scale as fp32.
  """
  require(hasattr(q, "shape") and q.ndim == 4 and q.dtype == jnp.bfloat16,
          f"q shape={getattr(q, 'shape', None)} dtype={getattr(q, 'dtype', None)}: "
          "expected bf16 [b, s_q, h_q, d_qk]")
  b, s_q, h_q, d_qk = q.shape
  cache = cache_view.accept_cache(k_cache, "k_cache")
  ci = cache_view.info(cache)
  require(ci.head_dim == d_qk,
          f"k_cache head dim {ci.head_dim} ({ci.fmt}): q has d_qk={d_qk}")
  require(isinstance(head_dim_v, int) and 0 < head_dim_v <= d_qk,
          f"head_dim_v={head_dim_v!r}: expected an int in (0, {d_qk}] (512 for v32 and model1)")
  require(indices is not None, "indices=None: sparse decode needs indices [b, s_q, topk]")
  topk = indices.shape[-1] if hasattr(indices, "shape") else 0
  lengths = _check_lengths("topk_length", topk_length, b, topk)
  indices = _check_indices("indices", indices, q.shape, cache, lengths)
  if attn_sink is None:
    sink = jnp.full((h_q,), -jnp.inf, jnp.float32)
  else:
    require(hasattr(attn_sink, "shape") and attn_sink.shape == (h_q,)
            and attn_sink.dtype == jnp.float32,
            f"attn_sink shape={getattr(attn_sink, 'shape', None)} dtype={getattr(attn_sink, 'dtype', None)}: "
            f"expected float32 [{h_q}]")
    sink = attn_sink
  scale = d_qk ** -0.5 if softmax_scale is None else _tiles.check_scale("softmax_scale", softmax_scale)
  args = dict(q=q, cache=cache, indices=indices,
              topk_length=jnp.full((b,), topk, jnp.int32) if lengths is None else lengths,
              attn_sink=sink, softmax_scale=jnp.asarray(scale, jnp.float32),
              extra_cache=None, extra_indices=None, extra_topk_length=None)
  require((extra_k_cache is None) == (extra_indices_in_kvcache is None),
          "extra_k_cache and extra_indices_in_kvcache: expected both or neither, got "
          f"{type(extra_k_cache).__name__} and {type(extra_indices_in_kvcache).__name__}")
  require(extra_topk_length is None or extra_k_cache is not None,
          "extra_topk_length given without extra_k_cache")
  if extra_k_cache is not None:
    extra = cache_view.accept_cache(extra_k_cache, "extra_k_cache")
    ei = cache_view.info(extra)
    require(ei.fmt == ci.fmt and ei.head_dim == d_qk,
            f"extra_k_cache format {ei.fmt} (head dim {ei.head_dim}): expected "
            f"{ci.fmt} (head dim {d_qk}) like k_cache")
    extra_topk = extra_indices_in_kvcache.shape[-1] if hasattr(extra_indices_in_kvcache, "shape") else 0
    extra_lengths = _check_lengths("extra_topk_length", extra_topk_length, b, extra_topk)
    args.update(
        extra_cache=extra,
        extra_indices=_check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache,
                                     q.shape, extra, extra_lengths),
        extra_topk_length=(jnp.full((b,), extra_topk, jnp.int32) if extra_lengths is None
                           else extra_lengths))
  return args


def _gather_keys(cache, indices_BTX, topk_length_B):
  """Dequantised keys ``[B, T, X, H]`` fp32 (zeros at invalid slots) and validity ``[B, T, X]``."""
  x_pos = jnp.arange(indices_BTX.shape[-1], dtype=jnp.int32)
  num_tokens = cache_view.info(cache).num_tokens
  valid_BTX = ((indices_BTX >= 0) & (indices_BTX < num_tokens)   # under jit: out of range = invalid
               & (x_pos[None, None, :] < topk_length_B[:, None, None]))
  k_BTXH = cache_view.gather_bf16(cache, indices_BTX).astype(jnp.float32)
  return jnp.where(valid_BTX[..., None], k_BTXH, 0.0), valid_BTX


@functools.partial(jax.jit, static_argnames=("head_dim_v",))
def attend_sparse_fp32(q, cache, indices, topk_length, softmax_scale, extra_cache=None,
                       extra_indices=None, extra_topk_length=None, *, head_dim_v):
  """Core: (out ``[B, T, N, V]`` fp32 before the sink, lse ``[B, T, N]`` with -inf when empty).

  These are the partials a split-KV kernel produces; ``combine.combine_splits`` merges them.
  """
  k_BTXH, valid_BTX = _gather_keys(cache, indices, topk_length)
  if extra_cache is not None:
    k2_BTXH, valid2_BTX = _gather_keys(extra_cache, extra_indices, extra_topk_length)
    k_BTXH = jnp.concatenate([k_BTXH, k2_BTXH], axis=2)
    valid_BTX = jnp.concatenate([valid_BTX, valid2_BTX], axis=2)
  hp = jax.lax.Precision.HIGHEST
  logits_BTNX = jnp.einsum("btnh,btxh->btnx", q.astype(jnp.float32), k_BTXH, precision=hp)
  logits_BTNX = logits_BTNX * softmax_scale
  p_BTNX, lse_BTN, _ = softmax.masked_softmax(logits_BTNX, valid_BTX[:, :, None, :])
  out_BTNV = jnp.einsum("btnx,btxv->btnv", p_BTNX, k_BTXH[..., :head_dim_v], precision=hp)
  return out_BTNV, lse_BTN


@functools.partial(jax.jit, static_argnames=("head_dim_v",))
def _reference_core(q, cache, indices, topk_length, attn_sink, softmax_scale, extra_cache,
                    extra_indices, extra_topk_length, *, head_dim_v):
  out_BTNV, lse_BTN = attend_sparse_fp32(q, cache, indices, topk_length, softmax_scale,
                                         extra_cache, extra_indices, extra_topk_length,
                                         head_dim_v=head_dim_v)
  out_BTNV, lse_BTN = softmax.finalize(out_BTNV, lse_BTN, attn_sink)
  return out_BTNV, jnp.transpose(lse_BTN, (0, 2, 1))


def sparse_decode_reference(q, k_cache, indices, *, head_dim_v, softmax_scale=None,
                            attn_sink=None, topk_length=None, extra_k_cache=None,
                            extra_indices_in_kvcache=None, extra_topk_length=None):
  """Plain-jnp oracle (fp32 math on dequantised keys).  Arguments as ``sparse_decode``."""
  args = validate_sparse_decode_args(
      q, k_cache, indices, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
      attn_sink=attn_sink, topk_length=topk_length, extra_k_cache=extra_k_cache,
      extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length)
  return _reference_core(**args, head_dim_v=head_dim_v)


# ----------------------------------------------------------------------------- Pallas kernel


def _sparse_kernel(len_ref, scale_ref, q_ref, sink_ref, idx_ref, nope_ref, rope_ref, *rest,
                   layout, extra_layout, has_scales, extra_has_scales, has_extra, s_q,
                   block_h, block_k, num_splits, final, num_tokens, extra_num_tokens):
  main = _tiles.KeyRefs(nope_ref, rope_ref, rest[0] if has_scales else None)
  rest = rest[1 if has_scales else 0:]
  if has_extra:
    elen_ref, eidx_ref = rest[0], rest[1]
    extra = _tiles.KeyRefs(rest[2], rest[3], rest[4] if extra_has_scales else None)
  o_ref, lse_ref = rest[-2:]
  i, split = pl.program_id(0), pl.program_id(1)
  b = i // s_q
  scale = scale_ref[0]
  q_tiles = _tiles.load_q(layout, q_ref)

  def chunk_step(refs, lay, num_rows, ind_ref, length, c, state):
    x_X = c * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    idx_X = ind_ref[i, pl.ds(c * block_k, block_k)]
    valid_X = (idx_X >= 0) & (idx_X < num_rows) & (x_X < length)
    k_tiles = _tiles.load_keys(lay, refs, jnp.where(valid_X, idx_X, 0), valid_X)
    return _tiles.softmax_step(lay, state, q_tiles, k_tiles, valid_X[None, :], scale)

  # Split s takes an equal run of the concatenated chunk list: main chunks, then extra ones.
  length = len_ref[b]
  n_main = (length + block_k - 1) // block_k
  n_total = n_main
  if has_extra:
    elength = elen_ref[b]
    n_total = n_main + (elength + block_k - 1) // block_k
  c0, c1 = _tiles.split_range(n_total, split, num_splits)
  state = _tiles.init_state(layout, block_h)
  state = jax.lax.fori_loop(c0, jnp.minimum(c1, n_main),
                            functools.partial(chunk_step, main, layout, num_tokens, idx_ref, length), state)
  if has_extra:
    state = jax.lax.fori_loop(jnp.maximum(c0 - n_main, 0), jnp.maximum(c1 - n_main, 0),
                              functools.partial(chunk_step, extra, extra_layout, extra_num_tokens, eidx_ref, elength), state)
  tiles, lse_M = _tiles.epilogue(state, sink_ref[...], final)
  _tiles.store_value_tiles(layout, o_ref, tiles)
  lse_ref[...] = lse_M


def _refs(ops: cache_view.Operands) -> list:
  """Kernel operands of a cache: nope, rope (the same words for packed bytes), scales."""
  return [a for a in (ops.nope, ops.rope, ops.scales) if a is not None]


def _pad_last(x, multiple: int, value):
  pad = -x.shape[-1] % multiple
  return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "tuning", "interpret"))
def _pallas_core(q, cache, indices, topk_length, attn_sink, softmax_scale, extra_cache,
                 extra_indices, extra_topk_length, *, head_dim_v, tuning, interpret):
  b, s_q, h_q, d = q.shape
  main = cache_view.kernel_operands(cache, "k_cache")
  layout = _tiles.key_layout(main.fmt, d, head_dim_v, main.rope_col, main.packed)
  block_h = tuning.rows_per_program(h_q)
  n_hb = -(-h_q // block_h)
  h_pad = n_hb * block_h - h_q
  q_RNH = jnp.pad(q.reshape(b * s_q, h_q, d), ((0, 0), (0, h_pad), (0, 0)))
  sink_N = jnp.pad(attn_sink, (0, h_pad), constant_values=-jnp.inf)
  # Index lists padded to whole blocks with -1 (a copy of the indices only, tiny).
  idx_RX = _pad_last(indices.reshape(b * s_q, -1), tuning.block_k, -1)
  has_extra = extra_cache is not None
  n_chunks = idx_RX.shape[-1] // tuning.block_k
  attended = indices.shape[-1]
  operands = [topk_length, softmax_scale.reshape(1), q_RNH, sink_N, idx_RX,
              *_refs(main)]
  extra_layout = None
  if has_extra:
    extra = cache_view.kernel_operands(extra_cache, "extra_k_cache")
    extra_layout = _tiles.key_layout(extra.fmt, d, head_dim_v, extra.rope_col, extra.packed)
    eidx_RX = _pad_last(extra_indices.reshape(b * s_q, -1), tuning.block_k, -1)
    n_chunks += eidx_RX.shape[-1] // tuning.block_k
    attended += extra_indices.shape[-1]
    operands += [extra_topk_length, eidx_RX, *_refs(extra)]
  bpt = bytes_per_token(main.fmt, d)
  splits = choose_num_splits(tuning, programs=b * s_q * n_hb,
                             kv_bytes_per_program=attended * bpt,
                             partial_bytes_per_split=block_h * (head_dim_v + 1) * 4,
                             max_key_blocks=n_chunks, interpret=interpret)
  final = splits == 1
  kernel = functools.partial(
      _sparse_kernel, layout=layout, extra_layout=extra_layout,
      has_scales=main.scales is not None,
      extra_has_scales=has_extra and extra.scales is not None, has_extra=has_extra,
      s_q=s_q, block_h=block_h, block_k=tuning.block_k, num_splits=splits, final=final,
      num_tokens=cache_view.info(cache).num_tokens,
      extra_num_tokens=cache_view.info(extra_cache).num_tokens if has_extra else 0)
  whole = pl.no_block_spec
  in_specs = [whole, whole, pl.BlockSpec((None, block_h, d), lambda i, s, j: (i, j, 0)),
              pl.BlockSpec((block_h,), lambda i, s, j: (j,))] + [whole] * (len(operands) - 4)
  rows = b * s_q
  if final:
    out_shape = (jax.ShapeDtypeStruct((rows, n_hb * block_h, head_dim_v), jnp.bfloat16),
                 jax.ShapeDtypeStruct((rows, n_hb * block_h), jnp.float32))
    out_specs = (pl.BlockSpec((None, block_h, head_dim_v), lambda i, s, j: (i, j, 0)),
                 pl.BlockSpec((None, block_h), lambda i, s, j: (i, j)))
  else:
    out_shape = (jax.ShapeDtypeStruct((splits, rows, n_hb * block_h, head_dim_v), jnp.float32),
                 jax.ShapeDtypeStruct((splits, rows, n_hb * block_h), jnp.float32))
    out_specs = (pl.BlockSpec((None, None, block_h, head_dim_v), lambda i, s, j: (s, i, j, 0)),
                 pl.BlockSpec((None, None, block_h), lambda i, s, j: (s, i, j)))
  out, lse = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(rows, splits, n_hb), in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=tuning.compiler_params(block_h),
      interpret=interpret, name="sparse_decode_mla")(*operands)
  if not final:
    out, lse = combine.combine_splits(out, lse, attn_sink_N=sink_N, out_dtype=jnp.bfloat16)
  out = out[:, :h_q].reshape(b, s_q, h_q, head_dim_v)
  lse = lse[:, :h_q].reshape(b, s_q, h_q)
  return out, jnp.transpose(lse, (0, 2, 1))


def sparse_decode(q, k_cache, indices, *, head_dim_v, softmax_scale=None, attn_sink=None,
                  topk_length=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                  extra_topk_length=None, impl="xla", tuning=None, interpret=None):
  """Sparse decode attention (FlashMLA ``flash_mla_with_kvcache`` with ``indices``).

  Args:
    q: bf16 ``[b, s_q, h_q, d_qk]`` (d_qk 576 for v32, 512 for model1).
    k_cache: ``KCache`` (v32 / model1 / bf16), a bf16 array ``[Z, Y, 1, d_qk]`` (read in
      place), or FlashMLA packed bytes (read in place too; see ``cache_view``).
    indices: int32 ``[b, s_q, topk]``, block * block_size + offset, -1 = invalid.  Concrete
      indices are checked against the cache (ValueError); under jit, out-of-range = invalid.
    head_dim_v: value dims (the first head_dim_v of the key; 512 for both geometries).
    softmax_scale: default d_qk ** -0.5.
    attn_sink: optional fp32 ``[h_q]``; out *= 1/(1+exp(sink-lse)); +-inf allowed.
    topk_length: optional int32 ``[b]``: only the first topk_length[b] indices count.
    extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second cache (same
      format, own block size) whose selected tokens join the same softmax.
    impl: "xla" (the reference), "pallas" (the Triton kernel; interpret mode on CPU;
      needs head_dim_v = d_qk - 64 or d_qk, whole key tiles), "mosaic" (the Hopper Mosaic
      GPU kernel, FP8 caches and head_dim_v 512; GPU interpret mode on CPU) or "auto"
      (``dispatch.resolve_impl``: "mosaic" on Hopper when it covers the case, else
      "pallas" on a GPU, "xla" elsewhere).
    tuning: ``KernelTuning`` for impl="pallas" (default: its defaults); impl="mosaic"
      uses its ``num_splits`` / ``num_sms`` (split-KV).
    interpret: run the kernel in Pallas interpret mode; default: when the backend is CPU.
  Returns:
    out bf16 ``[b, s_q, h_q, head_dim_v]``, lse fp32 ``[b, h_q, s_q]`` (natural log, sink
    excluded, +inf for a row with no valid token).
  """
  expected = (dispatch.AUTO,) + IMPLS
  require(impl in expected, f"impl={impl!r}: expected one of {expected}")
  args = validate_sparse_decode_args(
      q, k_cache, indices, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
      attn_sink=attn_sink, topk_length=topk_length, extra_k_cache=extra_k_cache,
      extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length)
  if impl == dispatch.AUTO:
    impl = dispatch.resolve_impl(impl, kernel="sparse_decode")
    if impl == "mosaic":
      from pallas_kernels import mosaic_sparse_decode
      if not mosaic_sparse_decode.supports(args, head_dim_v):
        impl = "pallas"
  if impl == "mosaic":                 # Hopper Pallas Mosaic GPU kernel: mosaic_sparse_decode.py
    from pallas_kernels import mosaic_sparse_decode
    return mosaic_sparse_decode.sparse_decode(args, head_dim_v, interpret, check_tuning(tuning))
  if impl == "pallas":
    _tiles.key_layout(cache_view.info(args["cache"]).fmt, q.shape[-1], head_dim_v)  # ValueError if untileable
    return _pallas_core(**args, head_dim_v=head_dim_v, tuning=check_tuning(tuning),
                        interpret=_tiles.default_interpret(interpret))
  return _reference_core(**args, head_dim_v=head_dim_v)
