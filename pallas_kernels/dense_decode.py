"""Dense paged decode attention: FlashMLA's ``flash_mla_with_kvcache`` without ``indices``
.  Public entry point plus the plain-jnp reference that kernels are tested
against.

What it computes, per batch b with s_k = cache_seqlens[b] cached tokens, laid out in pages
``block_table[b, 0], block_table[b, 1], ...`` of block_size tokens each:
    query t (of s_q) sees keys j < s_k, and with causal=True only j <= s_k - s_q + t
    (the s_q queries are the last s_q positions of the sequence);
    out = softmax(softmax_scale * q . k) @ k[..., :head_dim_v],  lse natural log.
A row that sees no key (s_k = 0, or causal with s_k < s_q) gives out 0 and lse +inf, as
sparse decode.  FlashMLA's dense decoder reads bf16 only; this one also reads the FP8
formats (``KCache`` v32 / model1, or their packed bytes).  h_q may be any multiple of the
number of KV heads (bf16 arrays ``[Z, Y, h_kv, d]``; the MLA caches have one KV head).

Keys past cache_seqlens (stale or garbage pages, block_table entries past the sequence)
are removed with selects, so their bytes never matter; tokens inside the sequence that a
causal row does not see are assumed finite (they are real tokens).

Source: FlashMLA ``flash_mla/flash_mla_interface.py`` and the dense reference of its tests
(``torch.ones(s_q, s_k).tril(diagonal=s_k - s_q)`` causal mask).

The Pallas kernel (``impl="pallas"``, Triton backend; interpret mode on CPU) is FlashMLA's
split-KV decoder (``flash_fwd_splitkv_mla`` + ``flash_fwd_mla_combine``):
  * rows: the s_q queries of the G heads that share a KV head are one row block
    (``[T*G, d]``, FlashMLA's "s_q x h_q as M" trick for MQA), padded to ``block_m`` >= 16;
  * grid ``(batch, num_splits, h_kv * row blocks)``: split s takes an equal run of the
    sequence's ``block_k``-token chunks; a program loops over its chunks (fori_loop),
    reading each token's page through ``block_table`` (so any page size works, 3 or 5
    included) and dequantising each key tile in registers (``_tiles``);
  * each program writes a normalised fp32 partial and its lse; ``combine.combine_splits``
    merges the splits (with one split the kernel finalises in place and writes bf16).
``impl="mosaic"`` is the Hopper (sm_90a) Pallas Mosaic GPU kernel, ``mosaic_dense_decode``
(TMA page loads, warp-specialised, wgmma; FP8 ``KCache`` and one-KV-head bf16 caches,
head_dim_v 512).  Shapes (letter key:
B batch, T query positions, N query heads, K KV heads, G heads per KV head, S key
positions, Z page blocks, Y tokens per block, H head dim, V value dim):
  q ``[B, T, N, H]`` bf16; block_table ``[B, max_blocks]`` int32; cache_seqlens ``[B]``
  int32.  Returns out ``[B, T, N, V]`` bf16 and lse ``[B, N, T]`` fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _tiles, cache_view, combine, dispatch, softmax
from pallas_kernels.fp8_cache import bytes_per_token, host_value, require
from pallas_kernels.tuning import DenseDecodeTuning, KernelTuning, check_tuning, choose_num_splits  # noqa: F401

IMPLS = ("xla", "pallas", "mosaic")
dispatch.register_mosaic("dense_decode")     # impl="mosaic": mosaic_dense_decode.py


def validate_dense_decode_args(q, k_cache, block_table, cache_seqlens, *, head_dim_v,
                               softmax_scale=None, causal=False):
  """Check shapes/dtypes (always) and page/length values (when concrete); normalise args."""
  require(hasattr(q, "shape") and q.ndim == 4 and q.dtype == jnp.bfloat16,
          f"q shape={getattr(q, 'shape', None)} dtype={getattr(q, 'dtype', None)}: "
          "expected bf16 [b, s_q, h_q, d_qk]")
  b, s_q, h_q, d_qk = q.shape
  cache = cache_view.accept_cache(k_cache, "k_cache", max_kv_heads=None)   # bf16 read as is
  _, num_blocks, block_size, h_kv, d_k = cache_view.info(cache)
  require(d_k == d_qk, f"k_cache head dim {d_k}: q has d_qk={d_qk}")
  require(h_q % h_kv == 0, f"q has h_q={h_q} heads: expected a multiple of h_kv={h_kv}")
  require(isinstance(head_dim_v, int) and 0 < head_dim_v <= d_qk,
          f"head_dim_v={head_dim_v!r}: expected an int in (0, {d_qk}]")
  require(isinstance(causal, bool), f"causal={causal!r}: expected a bool")
  require(hasattr(block_table, "shape") and block_table.ndim == 2 and block_table.shape[0] == b
          and block_table.dtype == jnp.int32,
          f"block_table shape={getattr(block_table, 'shape', None)} dtype={getattr(block_table, 'dtype', None)}: "
          f"expected int32 [{b}, max_blocks]")
  require(hasattr(cache_seqlens, "shape") and cache_seqlens.shape == (b,)
          and cache_seqlens.dtype == jnp.int32,
          f"cache_seqlens shape={getattr(cache_seqlens, 'shape', None)} dtype={getattr(cache_seqlens, 'dtype', None)}: "
          f"expected int32 [{b}]")
  capacity = block_table.shape[1] * block_size
  lens = host_value(cache_seqlens)
  if lens is not None:
    require(bool(((lens >= 0) & (lens <= capacity)).all()),
            f"cache_seqlens={lens.tolist()}: expected values in [0, {capacity}] "
            f"({block_table.shape[1]} blocks x {block_size} tokens)")
    table = host_value(block_table)
    if table is not None:
      used = np.arange(table.shape[1])[None, :] < -(-lens[:, None] // block_size)
      bad = used & ((table < 0) | (table >= num_blocks))
      if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{where}]={int(table[where])}: expected a block in "
                         f"[0, {num_blocks}) for a page inside cache_seqlens")
  scale = d_qk ** -0.5 if softmax_scale is None else _tiles.check_scale("softmax_scale", softmax_scale)
  return dict(q=q, cache=cache, block_table=block_table, cache_seqlens=cache_seqlens,
              softmax_scale=jnp.asarray(scale, jnp.float32), causal=causal)


def _gather_pages(cache, block_table_BP):
  """Keys of every page in the table, in sequence order: bf16 ``[B, S, K, H]``, S = P * Y."""
  ci = cache_view.info(cache)
  if ci.h_kv == 1:
    y = ci.block_size
    table = jnp.clip(block_table_BP, 0, ci.num_blocks - 1)
    slots_BPY = table[:, :, None] * y + jnp.arange(y, dtype=jnp.int32)
    slots_BS = slots_BPY.reshape(slots_BPY.shape[0], -1)
    return cache_view.gather_bf16(cache, slots_BS)[:, :, None, :]
  table = jnp.clip(block_table_BP, 0, cache.shape[0] - 1)
  k_BPYKH = cache[table]
  return k_BPYKH.reshape(k_BPYKH.shape[0], -1, *k_BPYKH.shape[3:])


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal"))
def attend_dense_fp32(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal):
  """Core: (out ``[B, T, N, V]`` fp32, lse ``[B, T, N]`` with -inf for rows seeing nothing)."""
  b, s_q, h_q, d = q.shape
  k_BSKH = _gather_pages(cache, block_table).astype(jnp.float32)
  s_k = k_BSKH.shape[1]
  h_kv = k_BSKH.shape[2]
  j_S = jnp.arange(s_k, dtype=jnp.int32)
  in_seq_BS = j_S[None, :] < cache_seqlens[:, None]
  k_BSKH = jnp.where(in_seq_BS[:, :, None, None], k_BSKH, 0.0)      # stale pages -> exact 0
  visible_BTS = jnp.broadcast_to(in_seq_BS[:, None, :], (b, s_q, s_k))
  if causal:
    t_T = jnp.arange(s_q, dtype=jnp.int32)
    last_BT = cache_seqlens[:, None] - s_q + t_T[None, :]           # last key query t sees
    visible_BTS = visible_BTS & (j_S[None, None, :] <= last_BT[:, :, None])
  q_BTKGH = q.astype(jnp.float32).reshape(b, s_q, h_kv, h_q // h_kv, d)
  hp = jax.lax.Precision.HIGHEST
  logits_BTKGS = jnp.einsum("btkgh,bskh->btkgs", q_BTKGH, k_BSKH, precision=hp) * softmax_scale
  p_BTKGS, lse_BTKG, _ = softmax.masked_softmax(logits_BTKGS, visible_BTS[:, :, None, None, :])
  out_BTKGV = jnp.einsum("btkgs,bskv->btkgv", p_BTKGS, k_BSKH[..., :head_dim_v], precision=hp)
  return out_BTKGV.reshape(b, s_q, h_q, head_dim_v), lse_BTKG.reshape(b, s_q, h_q)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal"))
def _reference_core(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal):
  out_BTNV, lse_BTN = attend_dense_fp32(q, cache, block_table, cache_seqlens, softmax_scale,
                                        head_dim_v=head_dim_v, causal=causal)
  out_BTNV, lse_BTN = softmax.finalize(out_BTNV, lse_BTN)
  return out_BTNV, jnp.transpose(lse_BTN, (0, 2, 1))


def dense_decode_reference(q, k_cache, block_table, cache_seqlens, *, head_dim_v,
                           softmax_scale=None, causal=False):
  """Plain-jnp oracle (fp32 math on dequantised keys).  Arguments as ``dense_decode``."""
  args = validate_dense_decode_args(q, k_cache, block_table, cache_seqlens,
                                    head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                                    causal=causal)
  return _reference_core(**args, head_dim_v=head_dim_v)


# ----------------------------------------------------------------------------- Pallas kernel


def _dense_kernel(table_ref, seqlens_ref, scale_ref, q_ref, nope_ref, rope_ref, *rest,
                  layout, has_scales, block_size, h_kv, rows_per_kv, n_row_blocks,
                  block_m, block_k, s_q, causal, num_splits, num_blocks, final):
  scales_ref = rest[0] if has_scales else None
  o_ref, lse_ref = rest[-2:]
  refs = _tiles.KeyRefs(nope_ref, rope_ref, scales_ref)
  b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv, row_block = j // n_row_blocks, j % n_row_blocks
  seqlen = seqlens_ref[b]
  scale = scale_ref[0]
  c0, c1 = _tiles.split_range((seqlen + block_k - 1) // block_k, split, num_splits)
  # Row r of the block is query position t = r // G of head g = r % G (padding rows: any t).
  t_M = (row_block * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m,), 0)) // rows_per_kv
  last_M = seqlen - s_q + t_M if causal else jnp.full((block_m,), seqlen - 1, jnp.int32)
  q_tiles = _tiles.load_q(layout, q_ref)
  max_pages = table_ref.shape[1]

  def body(c, state):
    pos_X = c * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    in_seq_X = pos_X < seqlen
    page_X = plgpu.load(table_ref.at[b, jnp.minimum(pos_X // block_size, max_pages - 1)],
                        mask=in_seq_X)
    # Pages inside the sequence were checked on the host; the clamp keeps garbage ids of
    # pages past it (and anything under an outer jit) inside the cache.  Keys past the
    # sequence keep their (stale) page: their loads are masked and their values selected
    # away, which interpret mode, reading them anyway, puts to the test.
    page_X = jnp.clip(page_X, 0, num_blocks - 1)
    rows_X = (page_X * block_size + pos_X % block_size) * h_kv + kv
    k_tiles = _tiles.load_keys(layout, refs, rows_X, in_seq_X)
    visible_MX = in_seq_X[None, :] & (pos_X[None, :] <= last_M[:, None])
    return _tiles.softmax_step(layout, state, q_tiles, k_tiles, visible_MX, scale)

  state = jax.lax.fori_loop(c0, c1, body, _tiles.init_state(layout, block_m))
  tiles, lse_M = _tiles.epilogue(state, None, final)
  _tiles.store_value_tiles(layout, o_ref, tiles)
  lse_ref[...] = lse_M


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal", "tuning", "interpret",
                                             "partials"))
def _pallas_core(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal,
                 tuning, interpret, partials=False):
  """Kernel + combine.  partials=True returns the raw split partials instead:
  (out ``[S, B, T, N, V]`` fp32, lse ``[S, B, T, N]`` with -inf for an empty split)."""
  b, s_q, h_q, d = q.shape
  ci = cache_view.info(cache)
  num_blocks, block_size, h_kv = ci.num_blocks, ci.block_size, ci.h_kv
  fmt, nope, rope, scales, rope_col, packed = cache_view.kernel_operands(cache, "k_cache")
  layout = _tiles.key_layout(fmt, d, head_dim_v, rope_col, packed)
  g = h_q // h_kv
  rows = s_q * g
  block_m = tuning.rows_per_program(rows)
  n_rb = -(-rows // block_m)
  # [B, T, K, G, H] -> [B, K, T*G, H]: row r = (t, g) with t = r // G.
  q_BKMH = jnp.transpose(q.reshape(b, s_q, h_kv, g, d), (0, 2, 1, 3, 4)).reshape(b, h_kv, rows, d)
  q_BKMH = jnp.pad(q_BKMH, ((0, 0), (0, 0), (0, n_rb * block_m - rows), (0, 0)))
  max_chunks = -(-block_table.shape[1] * block_size // tuning.block_k)
  # Each program streams its sequence's pages (capacity of the table: the static bound).
  splits = choose_num_splits(
      tuning, programs=b * h_kv * n_rb,
      kv_bytes_per_program=block_table.shape[1] * block_size * bytes_per_token(fmt, d),
      partial_bytes_per_split=block_m * (head_dim_v + 1) * 4, max_key_blocks=max_chunks,
      interpret=interpret)
  final = splits == 1 and not partials
  kernel = functools.partial(
      _dense_kernel, layout=layout, has_scales=scales is not None, block_size=block_size,
      h_kv=h_kv, rows_per_kv=g, n_row_blocks=n_rb, block_m=block_m, block_k=tuning.block_k,
      s_q=s_q, causal=causal, num_splits=splits, num_blocks=num_blocks, final=final)
  whole = pl.no_block_spec
  q_spec = pl.BlockSpec((None, None, block_m, d), lambda i, s, j: (i, j // n_rb, j % n_rb, 0))
  lead = () if final else (splits,)
  lead_block = () if final else (None,)
  lead_idx = (lambda s: ()) if final else (lambda s: (s,))
  out_shape = (jax.ShapeDtypeStruct((*lead, b, h_kv, n_rb * block_m, head_dim_v),
                                    jnp.bfloat16 if final else jnp.float32),
               jax.ShapeDtypeStruct((*lead, b, h_kv, n_rb * block_m), jnp.float32))
  out_specs = (pl.BlockSpec((*lead_block, None, None, block_m, head_dim_v),
                            lambda i, s, j: (*lead_idx(s), i, j // n_rb, j % n_rb, 0)),
               pl.BlockSpec((*lead_block, None, None, block_m),
                            lambda i, s, j: (*lead_idx(s), i, j // n_rb, j % n_rb)))
  operands = [block_table, cache_seqlens, softmax_scale.reshape(1), q_BKMH, nope, rope]
  if scales is not None:
    operands.append(scales)
  out, lse = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, splits, h_kv * n_rb),
      in_specs=[whole, whole, whole, q_spec] + [whole] * (len(operands) - 4),
      out_specs=out_specs,
      compiler_params=tuning.compiler_params(block_m),
      interpret=interpret, name="dense_decode_mla")(*operands)
  if not final and not partials:
    out, lse = combine.combine_splits(out, lse, out_dtype=jnp.bfloat16)
  # [..., B, K, M, V] -> [..., B, T, N, V] and lse [..., B, K, M] -> [..., B, T, N].
  lead = out.shape[:-4]
  out = out[..., :rows, :].reshape(*lead, b, h_kv, s_q, g, head_dim_v)
  out = jnp.moveaxis(out, -4, -3).reshape(*lead, b, s_q, h_q, head_dim_v)
  lse = lse[..., :rows].reshape(*lead, b, h_kv, s_q, g)
  lse = jnp.moveaxis(lse, -3, -2).reshape(*lead, b, s_q, h_q)
  if partials:
    return out, lse
  return out, jnp.swapaxes(lse, -1, -2)


def dense_decode_partials(q, k_cache, block_table, cache_seqlens, *, head_dim_v,
                          softmax_scale=None, causal=False, tuning=None, interpret=None):
  """The Pallas kernel's split-KV partials before the combine (for tests and inspection):
  out ``[S, b, s_q, h_q, V]`` fp32 (each normalised over its split), lse ``[S, b, s_q, h_q]``
  (-inf for a split that saw no key).  ``combine.combine_splits`` of them = dense_decode."""
  args = validate_dense_decode_args(q, k_cache, block_table, cache_seqlens,
                                    head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                                    causal=causal)
  return _pallas_core(**args, head_dim_v=head_dim_v, tuning=check_tuning(tuning),
                      interpret=_tiles.default_interpret(interpret), partials=True)


def dense_decode(q, k_cache, block_table, cache_seqlens, *, head_dim_v, softmax_scale=None,
                 causal=False, impl="xla", tuning=None, interpret=None):
  """Dense paged decode attention (FlashMLA ``flash_mla_with_kvcache`` without indices).

  Args:
    q: bf16 ``[b, s_q, h_q, d_qk]``.
    k_cache: ``KCache`` (v32 / model1 / bf16), a bf16 array ``[num_blocks, block_size,
      h_kv, d_qk]`` with h_q a multiple of h_kv, or FlashMLA packed bytes; all read in
      place (see ``cache_view``).
    block_table: int32 ``[b, max_blocks]``: page blocks of each sequence, in order.
    cache_seqlens: int32 ``[b]``: tokens in each sequence (checked when concrete).
    head_dim_v: value dims (the first head_dim_v of the key).
    softmax_scale: default d_qk ** -0.5.
    causal: for s_q > 1, query t sees keys j <= cache_seqlens - s_q + t.
    impl: "xla" (the reference), "pallas" (the Triton split-KV kernel; interpret mode
      on CPU; needs head_dim_v = d_qk - 64 or d_qk, whole key tiles), "mosaic" (the
      Hopper Mosaic GPU kernel: FP8 ``KCache`` or bf16 cache with one KV head, head_dim_v
      512; GPU interpret mode on CPU) or "auto" (``dispatch.resolve_impl``: "mosaic" on
      Hopper when it covers the case, else "pallas" on a GPU, "xla" elsewhere).
    tuning: ``KernelTuning`` for impl="pallas" (default: its defaults).
    interpret: run the kernel in Pallas interpret mode; default: when the backend is CPU.
  Returns:
    out bf16 ``[b, s_q, h_q, head_dim_v]``, lse fp32 ``[b, h_q, s_q]`` (+inf if no key).
  """
  expected = (dispatch.AUTO,) + IMPLS
  require(impl in expected, f"impl={impl!r}: expected one of {expected}")
  args = validate_dense_decode_args(q, k_cache, block_table, cache_seqlens,
                                    head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                                    causal=causal)
  if impl == dispatch.AUTO:
    impl = dispatch.resolve_impl(impl, kernel="dense_decode")
    if impl == "mosaic":
      from pallas_kernels import mosaic_dense_decode
      if not mosaic_dense_decode.supports(args, head_dim_v):
        impl = "pallas"
  if impl == "mosaic":                 # Hopper Pallas Mosaic GPU kernel: mosaic_dense_decode.py
    from pallas_kernels import mosaic_dense_decode
    return mosaic_dense_decode.dense_decode(args, head_dim_v, interpret, check_tuning(tuning))
  if impl == "pallas":
    _tiles.key_layout("bf16", q.shape[-1], head_dim_v)          # ValueError if untileable
    return _pallas_core(**args, head_dim_v=head_dim_v, tuning=check_tuning(tuning),
                        interpret=_tiles.default_interpret(interpret))
  return _reference_core(**args, head_dim_v=head_dim_v)
