"""Dense paged decode attention as a Hopper-native (sm_90a) Pallas Mosaic GPU kernel.

``run`` is what ``dense_decode(..., impl="mosaic")`` calls after its argument checks; the
semantics are those of ``dense_decode`` (FlashMLA's ``flash_mla_with_kvcache`` without
``indices``): query t of s_q sees the keys j < cache_seqlens[b] of its sequence, laid out
in pages ``block_table[b, 0], block_table[b, 1], ...``, and with causal=True only
j <= cache_seqlens[b] - s_q + t; out bf16 ``[b, s_q, h_q, d_v]``, lse ``[b, h_q, s_q]``
(+inf and out 0 for a row that sees no key).  Caches: the FP8 ``KCache`` formats v32
(576-dim keys, 656 B/token) and model1 (512-dim, 584 B/token), and a bf16 cache (a
``KCache`` of format "bf16" or a bf16 array ``[Z, Y, 1, d]``) with one KV head.

Design (after FlashMLA's ``sm90`` dense decoder, with the FP8 dequantisation of its sparse
one; the warpgroup structure is that of ``mosaic_sparse_decode``):

  * One CTA per (query row, 64-head block): grid ``(b * s_q, ceil(h_q / 64))``, heads
    padded to 64 (wgmma's M), the head-block axis fastest, so the CTAs that read the same
    pages run side by side and the second one's loads hit L2.  A query row's causal limit
    is a scalar (its key count L = cache_seqlens - (s_q - 1 - t)), so causality costs
    nothing but a shorter loop.  Three warpgroups:
      - warpgroup 2, the producer: per tile, reads the page id from the block table and
        loads the tile with TMA -- one 2-D copy per array of a whole run of contiguous
        tokens, not per token as sparse decode must: FP8 NoPE codes as two [64, 256] boxes
        (v32 bytes [0, 256) and [256, 512); model1 [0, 256) and [192, 448), overlapping
        inside the token), RoPE as one [64, 64] bf16 box, the scales as one box (see
        below): 4 copies per tile.  It then dequantises the tile on chip into
        a bf16 K tile in swizzled shared memory (zeroing tokens outside the sequence or
        the page, whatever their bytes), writes the tile's -inf bias for those tokens and
        signals "ready".  bf16 caches need no dequantisation: the TMA writes the K tile
        directly (one [64, d] box into the swizzled layout; a bf16 ``KCache`` keeps NoPE
        and RoPE apart: one box per 8-row group and array, as a column range of the
        tiled tile is contiguous only within 8 rows) and the producer only zeroes
        the rows of a tile that are not keys (pages shorter than the tile, the sequence's
        last tile), in place.
      - warpgroups 0 and 1, the consumers, as in ``mosaic_sparse_decode``: warpgroup 0
        keeps the 64 query heads resident in shared memory, runs S = Q K^T (one wgmma,
        K = d_qk) and the fp32 online softmax, hands P (bf16) and the rescale factors to
        warpgroup 1; each accumulates O += P V for its 256 of the 512 value columns (the
        value is the first 512 key columns: one load serves both products).
  * Tiles: BLOCK_K = 64 tokens (wgmma's K for P V: one 128-byte swizzle row of P), 64
    heads.  wgmma: QK^T m64 n64 k576 / k512, P V m64 n256 k64 per consumer.  A tile never
    crosses a page: a page of Y tokens is ceil(Y / 64) tiles, the last one covering
    Y mod 64 tokens.  The TMA boxes are always 64 rows (static box shapes), so for a page
    of 61 tokens a tile reads 3 rows of the next physical page (or TMA's zero fill past
    the cache's end) and masks them: 64/61 = 5 % more bytes, no per-token path.  Pages of
    64 (FlashMLA's and the model's) waste nothing; small pages (16) waste the most (4x).
    bf16 caches need pages of a multiple of 8 tokens (ValueError otherwise): their TMA
    writes the swizzled K tile directly, and Mosaic GPU's tiled copies view the cache as
    [N / 8, 8, d / 64, 64], so a box must start on a multiple of 8 rows and N must be one.
  * Pipeline: FP8: one raw (FP8) stage and one bf16 stage, as sparse decode: the
    producer issues tile c+1's loads as soon as tile c is dequantised, so they fly while
    the consumers run tile c; the dequantisation of tile c+1 waits for the consumers to
    release the bf16 stage.  bf16: the TMA target is the K tile itself, two stages when
    they fit (512-dim: tile c+1 loads while the consumers run tile c), one for 576-dim
    keys (Q and two 72 KB stages exceed 227 KB: loads and wgmmas alternate).
  * Scales: a tile's scales are contiguous.  v32: one [64, 4] fp32 box of the [N, 4] view
    (16-byte rows), read per scale tile as a strided [64] column into the per-token
    register layout.  model1: 7-byte rows are no TMA box (global strides must be
    multiples of 16 bytes), but the [N * 7 / 32, 32] byte view is, and a tile that starts
    on a multiple of 32 tokens owns 14 of its rows: one [16, 32] box (Mosaic GPU copies
    multiples of 128 bytes, so 64 bytes of the next tile come too), viewed in shared
    memory as [64, 7] (interpret mode has no reshaped refs: there the same bytes are
    reshaped as a value).  That needs pages of a multiple of 32 tokens; otherwise (pages
    of 61) each token's scales come by their own 128-byte window as in sparse decode (64
    copies per tile from one thread; consecutive windows overlap, so DRAM moves each
    scale sector about once).
  * Split-KV (FlashMLA's ``splitkv`` + combine): grid ``(b * s_q, S, ceil(h_q / 64))``;
    split s of a row takes an equal run of its tiles (the run is computed in the kernel
    from cache_seqlens, so the split points follow each row's own length), and writes an
    fp32 partial normalised over its run, straight from the wgmma registers to global
    memory (a staging tile would need 64 KB of shared memory per consumer), plus its lse
    (+inf for an empty run) through shared memory and TMA; ``combine.combine_splits``
    merges them.  S: ``tuning.num_splits``, else the Triton path's cost model
    (``tuning.choose_num_splits``: whole waves of 132 SMs against 2 x 4 x 64 x 513 bytes
    of partials per split and CTA), e.g. b 1 -> 35-64 splits, b 8 -> 8-16, b 64 h 64 -> 2,
    b 64 h 128 and b 128 -> 1.  With S = 1 the kernel writes bf16 out and lse directly.

Shared memory per CTA (``smem_bytes``; <= 227 KB per CTA, so one CTA per SM):
  FP8 v32:    Q 73.7 KB + K 73.7 KB + raw 64 x (512 + 128) + 1 KB scales = 42 KB + P 2 x 8 KB
              + 1.3 KB small  ->  206.8 KB
  FP8 model1: Q 65.5 + K 65.5 + raw 41 + scales 0.5 (pages of 61: 8 KB of windows)
              + P 16 + 1.3  ->  189.9 KB (197.6 KB)
  bf16 576:   Q 73.7 + K 1 x 73.7 + P 16 + 1.3  ->  164.9 KB (a second stage: 238 KB, no)
  bf16 512:   Q 65.5 + K 2 x 65.5 + P 16 + 1.3  ->  214.3 KB
The output leaves through Q's buffer (warpgroup 1 writes its half after warpgroup 0's
last QK^T).

Expected fraction of roofline (unmeasured: no GPU was lent; H200 = 4.3 TB/s copy,
~790 TFLOP/s bf16 dense, 132 SMs).  Per 64-token tile and 64-head CTA: bytes 64 x 656
= 42.0 KB (v32 FP8; model1 37.4 KB; bf16 73.7 / 65.5 KB), FLOPs 2 x 64 x 64 x (576 + 512)
= 8.9 M (model1 8.4 M).  Per SM that is 1.29 us of HBM (4.3 TB/s / 132 = 32.6 GB/s) and
1.49 us of MMA (790 / 132 = 6.0 TFLOP/s): with bf16 MMAs, FP8 dense decode is
compute-bound on Hopper even at 64 heads (FP8 halves the bytes, not the MMA work;
FLOP/byte 212 vs the ridge 184), and at 128 heads (two CTAs share each page, through L2)
twice over.  Hence the bounds at b 64, s_k 8K, s_q 1:
  v32 h 128:   146 GFLOP -> 185 us at 100 % of the MMA peak = 344 MB / 185 us = 1.86 TB/s;
  v32 h 64:     73 GFLOP ->  92 us vs 80 us of bytes -> at most 3.7 TB/s;
  model1 h 64:  69 GFLOP ->  87 us vs 71 us of bytes -> at most 3.5 TB/s.
So the issue's 3.4 TB/s FP8 target is out of reach at 128 heads for any bf16-MMA kernel
(it would need FP8 wgmma, i.e. Q quantised to e4m3 too) and needs
>= 90 % of the MMA peak at 64 heads.  What this kernel should reach: per tile warpgroup 0's
QK^T (~0.8 us) + softmax (~0.2 us) + both consumers' P V (~0.7 us) = ~1.7 us, and with one
bf16 stage the dequantisation of the next tile (~0.9-1 us, as in sparse decode) is not
overlapped: ~2.6 us per tile, ~55-60 % of the MMA peak.  v32 h 128, b 64, 8K: 128 CTAs
(one wave) x 128 tiles x 2.7 us ~ 350 us -> ~1.0 TB/s (~25 % of the HBM roofline, ~55 %
of the MMA-bound roofline); model1 h 64, b 64 (2 splits: 128 CTAs) or b 128: 8192 tiles
over 128-132 SMs x 2.5 us ~ 160 us -> ~1.9-2.0 TB/s (~45 % of HBM, ~55 % of the MMA-bound
roofline).  bf16 512-dim with two stages: MMA-bound, ~80 % of it.  Small batches (b 1-8)
split 8-64 ways and stay latency-bound by the per-CTA prologue (Q load) and the combine.
The levers, in order: a second bf16 stage for FP8 (the 74 KB Q residency costs it: e.g. Q
re-read per tile from L2, or 128 heads x 32 tokens tiles) so dequantisation overlaps the
wgmmas; s_q x heads as wgmma's M for MTP (s_q > 1, h < 64); for model1 pages that are
not a multiple of 32 tokens, a scale path without the 64 per-token copies.

64-bit offsets: TMA addresses by coordinates (token row, column; the model1 scale view's
row = row x 7 / 32), so int32 coordinates reach 2^31 tokens; only model1's per-token scale
windows (pages not a multiple of 32) use element offsets row x 7: int32 up to 306M tokens.

CUDA lowering (``jax.export(..., platforms=["cuda"])``, no GPU needed) is tested for
every cache kind, both model1 scale paths and both output paths (split or not); the register layouts are Lane-semantics layouts as in
``mosaic_sparse_decode`` (``_raw_layout``).  Tested on CPU in GPU interpret mode
(``plgpu.InterpretGPUParams``; on a machine with few cores give the CPU backend several
devices, as the test suite does: each warpgroup thread runs its own XLA computation that
blocks in barrier callbacks, and one CPU device's small thread pool can deadlock them).
Letter key: R query rows (b * s_q), S splits, N heads, H head dim, V value dim, K the
tile's tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import cache_view, combine
from pallas_kernels.fp8_cache import D_ROPE, KCache, bytes_per_token, require
from pallas_kernels.tuning import KernelTuning, choose_num_splits
from pallas_kernels.mosaic_sparse_decode import _raw_layout, _stage, attend_tile, interpret_params

BLOCK_H = 64            # wgmma M: query heads per CTA
BLOCK_K = 64            # tokens per tile (wgmma K of P V must be a multiple of 64)
SMEM_LIMIT = 227 * 1024
V_CHUNK = 256           # value columns per consumer warpgroup (wgmma N <= 256)
_WINDOW = 128           # bytes per TMA scale window


def geometry(fmt: str, d: int):
  """(d_nope, scale tile width, scale count, NoPE boxes as (source byte, SMEM half))."""
  if fmt == "v32":
    return 512, 128, 4, ((0, 0), (256, 1))
  if fmt == "model1":
    return 448, 64, 7, ((0, 0), (192, 1))
  return d - D_ROPE, 0, 0, ()


def _nope_piece(fmt: str, col: int) -> tuple[int, int]:
  """(SMEM half, column in it) of NoPE byte ``col`` (model1's second box starts at 192)."""
  if fmt == "v32" or col < 256:
    return col // 256, col % 256
  return 1, col - 192


def k_stages(fmt: str, d: int) -> int:
  """bf16 K stages: two when they fit (the TMA target is the K tile), FP8 one."""
  if fmt != "bf16":
    return 1
  return 2 if _smem(fmt, d, 2) <= SMEM_LIMIT else 1


def _smem(fmt: str, d: int, ks: int, block_size: int = 1) -> int:
  q = BLOCK_H * d * 2
  k = ks * BLOCK_K * d * 2
  raw = 0
  if fmt != "bf16":
    sc = (BLOCK_K * 16 if fmt == "v32" else 512 if _tile_scales(fmt, block_size)
          else BLOCK_K * _WINDOW)
    raw = BLOCK_K * (512 + 2 * D_ROPE) + sc
  p = 2 * BLOCK_H * BLOCK_K * 2
  small = ks * BLOCK_K * 4 + 3 * BLOCK_H * 4
  return q + k + raw + p + small


def smem_bytes(fmt: str, d: int, block_size: int = 1) -> int:
  """Shared memory one CTA allocates (its small vectors rounded up)."""
  return _smem(fmt, d, k_stages(fmt, d), block_size)


def _tile_scales(fmt: str, block_size: int) -> bool:
  """Whether a tile's scales come as one TMA box (else one 128-byte window per token).

  v32: always ([N, 4] fp32 rows are 16 bytes).  model1: 7-byte rows are no TMA box, but
  the [N * 7 / 32, 32] byte view is, and a tile's 448 bytes are 14 of its rows when the
  tile starts on a multiple of 32 tokens: pages of a multiple of 32 tokens."""
  return fmt == "v32" or (fmt == "model1" and block_size % 32 == 0)


def dense_decode_mla_mosaic(lens_ref, table_ref, scale_ref, q_ref, *rest, fmt, d, s_q, causal,
                            block_size, num_blocks, num_splits, interpreted, brk=None):
  """Kernel body: one CTA = one query row x one 64-head block (see the module notes).

  ``rest``: the cache arrays (FP8: codes ``[N, P]``, RoPE ``[N, 64]``, scales 1-D; bf16:
  the keys ``[N, d]``, or a bf16 ``KCache``'s NoPE ``[N, d - 64]`` and RoPE ``[N, 64]``),
  then out ``[R, N, V]`` bf16 and lse ``[R, N]`` (with num_splits > 1: fp32 partials
  ``[S, R, N, V]``, each normalised over its split, and their lse ``[S, R, N]``)."""
  fp8 = fmt != "bf16"
  tile_scales = _tile_scales(fmt, block_size)
  o_ref, lse_ref = rest[-2:]
  if fp8:
    nope_ref, rope_ref, sc_ref = rest[:-2]
  else:
    kv_refs = rest[:-2]
  d_nope, width, n_sc, nope_boxes = geometry(fmt, d)
  nks = k_stages(fmt, d)
  r = lax.axis_index("row")
  hb = lax.axis_index("hb")
  split = lax.axis_index("split")
  b, t = r // s_q, r % s_q
  seqlen = lens_ref[b]
  # Keys this row sees: j < L (causal: j <= seqlen - s_q + t).
  L = jnp.maximum(seqlen - (s_q - 1 - t), 0) if causal else seqlen
  tpp = -(-block_size // BLOCK_K)                 # tiles per page
  full, rem = L // block_size, L % block_size
  n_tiles = full * tpp + (rem + BLOCK_K - 1) // BLOCK_K
  # Split-KV: this CTA's tiles [c_first, n_total), an equal run of the row's tiles.
  per = (n_tiles + num_splits - 1) // num_splits
  c_first = jnp.minimum(split * per, n_tiles)
  n_total = jnp.minimum(c_first + per, n_tiles)
  max_pages = table_ref.shape[1]

  def first_row(c):
    """Cache row of tile c's first token (one block-table read, only where TMA needs it)."""
    p_idx = c // tpp
    page = jnp.clip(table_ref[b, jnp.minimum(p_idx, max_pages - 1)], 0, num_blocks - 1)
    return page * block_size + (c % tpp) * BLOCK_K

  def valid_count(c):
    """Keys in tile c: its tokens inside both the page and the row's L keys."""
    p_idx, off = c // tpp, (c % tpp) * BLOCK_K
    return jnp.minimum(jnp.minimum(BLOCK_K, block_size - off), L - p_idx * block_size - off)

  def scoped(q_smem, p_smem, kbf, *rest):
    if fp8:
      (nope_raw, rope_raw, sc_raw, bias_smem, vec_smem, alpha_smem,
       raw_bar, ready, consumed, q_bar, p_bar, fin_bar) = rest
    else:
      bias_smem, vec_smem, alpha_smem, raw_bar, ready, consumed, q_bar, p_bar, fin_bar = rest
    wg = lax.axis_index("wg")
    tile_l = _raw_layout(64)
    row_l = tile_l.reduce(1)
    T = lambda x: plgpu.layout_cast(x, tile_l)
    R = lambda x: plgpu.layout_cast(x, row_l)

    # ------------------------------------------------------------------ producer
    def issue(c):
      row0 = first_row(c)
      rows = pl.ds(row0, BLOCK_K)
      if not fp8:                    # straight into the swizzled K tile
        ks = _stage(c, nks)
        if len(kv_refs) == 1:
          plgpu.copy_gmem_to_smem(kv_refs[0].at[rows], kbf.at[ks], raw_bar.at[ks])
          return
        # NoPE and RoPE in separate arrays: a column range of the (8, 64)-tiled K tile is
        # contiguous only within a group of 8 rows, so one box per group and array.
        for g in range(BLOCK_K // 8):
          dst = kbf.at[ks, pl.ds(g * 8, 8)]
          src_rows = pl.ds(row0 + g * 8, 8)
          plgpu.copy_gmem_to_smem(kv_refs[0].at[src_rows], dst.at[:, pl.ds(0, d_nope)],
                                  raw_bar.at[ks])
          plgpu.copy_gmem_to_smem(kv_refs[1].at[src_rows], dst.at[:, pl.ds(d_nope, D_ROPE)],
                                  raw_bar.at[ks])
        return
      for src, half in nope_boxes:
        plgpu.copy_gmem_to_smem(nope_ref.at[rows, pl.ds(src, 256)], nope_raw.at[half],
                                raw_bar.at[0])
      plgpu.copy_gmem_to_smem(rope_ref.at[rows], rope_raw, raw_bar.at[0])
      if fmt == "v32":                 # the tile's 64 x 4 fp32 scales: one 1 KB box
        plgpu.copy_gmem_to_smem(sc_ref.at[rows], sc_raw, raw_bar.at[0])
        return
      if tile_scales:
        # model1: the tile's 448 bytes are 14 rows of the [N * 7 / 32, 32] view; Mosaic GPU
        # copies multiples of 128 bytes, so 16 rows (the next tile's first 64 bytes too).
        plgpu.copy_gmem_to_smem(sc_ref.at[pl.ds(row0 * n_sc // 32, 16)], sc_raw,
                                raw_bar.at[0])
        return
      n_win = sc_raw.shape[-1]

      @pl.loop(0, BLOCK_K)
      def _token(x):
        plgpu.copy_gmem_to_smem(sc_ref.at[pl.ds((row0 + x) * n_sc, n_win)], sc_raw.at[x],
                                raw_bar.at[0])

    def valid_mask(c):
      n_valid = valid_count(c)
      k_K = plgpu.broadcasted_iota(jnp.int32, (BLOCK_K,), 0, layout=row_l)
      valid_K = k_K < n_valid
      if brk == "drop_key":
        valid_K = valid_K & (k_K != 1)
      return R(valid_K), n_valid

    def zero_invalid(x, valid_K):
      return T(jnp.where(T(lax.broadcast_in_dim(valid_K, x.shape, [0])), x, jnp.zeros_like(x)))

    def dequant(c, ks):
      valid_K, _ = valid_mask(c)
      W = lambda x: plgpu.layout_cast(x, win_l)
      win_l = _raw_layout(8)
      if not tile_scales:
        win = plgpu.load(sc_raw.at[:, pl.ds(0, 8)], layout=win_l, optimized=False)
        win = W(win.astype(jnp.int32))
        col = plgpu.broadcasted_iota(jnp.int32, win.shape, 1, layout=win_l)
      scales = {}
      for p in range(d_nope // 64):
        tt = p * 64 // width                      # the scale tile of this 64-column piece
        if tt not in scales and tile_scales:
          # Scale tt of the 64 tokens: a column of the tile's [64, 4] / [64, 7] scales.
          if fmt == "v32":
            s_K = R(plgpu.load(sc_raw.at[:, tt], layout=row_l, optimized=False))
          elif interpreted:
            # Interpret mode has no reshaped refs: the same bytes, reshaped as a value.
            s_K = R(sc_raw[...].reshape(-1)[:BLOCK_K * n_sc].reshape(BLOCK_K, n_sc)[:, tt])
          else:                        # the [16, 32] bytes viewed as the tile's [64, 7]
            sc_KS = sc_raw.reshape(512).at[pl.ds(0, BLOCK_K * n_sc)].reshape(BLOCK_K, n_sc)
            s_K = R(plgpu.load(sc_KS.at[:, tt], layout=row_l, optimized=False))
          if fmt == "model1":
            e_K = R(s_K.astype(jnp.int32))
            s_K = R(lax.bitcast_convert_type(e_K << 23, jnp.float32))
            s_K = R(jnp.where(e_K == 255, jnp.full_like(s_K, jnp.nan), s_K))
          scales[tt] = T(lax.broadcast_in_dim(s_K, (BLOCK_K, 64), [0]))
        if tt not in scales:
          picked = W(jnp.where(col == tt, win, jnp.zeros_like(win)))
          if fmt == "v32":
            s_K = R(jnp.sum(picked, axis=1))
          else:
            e_K = R(jnp.sum(picked, axis=1))
            s_K = R(lax.bitcast_convert_type(e_K << 23, jnp.float32))
            s_K = R(jnp.where(e_K == 255, jnp.full_like(s_K, jnp.nan), s_K))
          scales[tt] = T(lax.broadcast_in_dim(s_K, (BLOCK_K, 64), [0]))
        half, c0 = _nope_piece(fmt, p * 64)
        codes = T(T(plgpu.load(nope_raw.at[half, :, pl.ds(c0, 64)], layout=tile_l,
                               optimized=False)).astype(jnp.float32))
        # Exact (e4m3 codes times powers of two); rows outside the sequence or the page are
        # zeroed with a select, so their bytes (even NaN) never reach a dot.
        k_KW = zero_invalid(T(codes * scales[tt]), valid_K)
        kbf[ks, :, pl.ds(p * 64, 64)] = T(k_KW.astype(jnp.bfloat16))
      rope = T(plgpu.load(rope_raw, layout=tile_l))
      kbf[ks, :, pl.ds(d_nope, D_ROPE)] = zero_invalid(rope, valid_K)
      return valid_K

    def fix_bf16(c, ks):
      valid_K, n_valid = valid_mask(c)

      @pl.when(n_valid < BLOCK_K)        # only a page's or the sequence's last tile
      def _():
        for p in range(d // 64):
          cols = pl.ds(p * 64, 64)
          x = T(plgpu.load(kbf.at[ks, :, cols], layout=tile_l, optimized=False))
          kbf[ks, :, cols] = zero_invalid(x, valid_K)
      return valid_K

    @pl.when(wg == 2)
    def _producer():
      @pl.when(n_total > c_first)
      def _():
        issue(c_first)

      @pl.loop(c_first, n_total)
      def _tile(c):
        ks = _stage(c, nks)
        plgpu.barrier_wait(raw_bar.at[ks if not fp8 else 0])
        if fp8:
          @pl.when(c > c_first)
          def _():
            plgpu.barrier_wait(consumed.at[0])
          valid_K = dequant(c, ks)
        else:
          valid_K = fix_bf16(c, ks)
        bias_smem[ks] = R(jnp.where(valid_K, jnp.zeros(valid_K.shape, jnp.float32),
                                    jnp.full(valid_K.shape, -jnp.inf, jnp.float32)))
        plgpu.commit_smem()            # generic-proxy stores -> visible to wgmma (and TMA)
        plgpu.barrier_arrive(ready.at[ks])

        @pl.when(c + 1 < n_total)
        def _():
          if not fp8:
            # bf16: the next tile's target stage must be free (with one stage: tile c's).
            @pl.when(c + 1 - c_first >= nks)
            def _():
              plgpu.barrier_wait(consumed.at[_stage(c + 1, nks)])
          issue(c + 1)

      # Observe the last "consumed" phases so the barriers end balanced (and the CTA does
      # not retire while a consumer still reads a stage).
      first = jnp.maximum(n_total - (1 if fp8 else nks), c_first)
      @pl.loop(first, n_total)
      def _drain(c):
        plgpu.barrier_wait(consumed.at[_stage(c, nks)])

    # ------------------------------------------------------------------ consumers
    def consumer(w):
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      cols = pl.ds(w * V_CHUNK, V_CHUNK)
      if w == 0:
        plgpu.copy_gmem_to_smem(q_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)
        scale = scale_ref[0]

      def step(c, carry):
        return attend_tile(c, carry, w, n_stages=nks, q_smem=q_smem, kbf=kbf,
                           bias_smem=bias_smem, p_smem=p_smem, alpha_smem=alpha_smem,
                           p_bar=p_bar, ready=ready, consumed=consumed,
                           scale=scale if w == 0 else None, interpreted=interpreted, brk=brk)

      init = (plgpu.layout_cast(jnp.zeros((BLOCK_H, V_CHUNK), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), row_layout),
              plgpu.layout_cast(jnp.zeros((BLOCK_H,), jnp.float32), row_layout))
      acc, m_N, l_N = lax.fori_loop(c_first, n_total, step, init)

      if w == 0:
        live = l_N > 0
        l_safe = jnp.where(live, l_N, 1.0)
        vec_smem[0] = jnp.where(live, m_N + jnp.log(l_safe), jnp.inf)
        vec_smem[1] = jnp.where(live, 1.0 / l_safe, 0.0)
        plgpu.commit_smem()
        # Q is dead from here on (its last QK^T is done): warpgroup 1 may write its half
        # of the output into Q's buffer.
        plgpu.barrier_arrive(fin_bar)
        factor = jnp.where(live, 1.0 / l_safe, 0.0)
      else:
        plgpu.barrier_wait(fin_bar)
        factor = plgpu.load(vec_smem.at[1], layout=row_layout)
      out = acc * lax.broadcast_in_dim(factor, acc.shape, [0])
      heads = pl.ds(hb * BLOCK_H, BLOCK_H)
      if num_splits > 1:
        # fp32 partials straight from registers (a 64 x 256 fp32 staging tile would need
        # 64 KB of shared memory per consumer); the combine reads them once.
        o_ref[split, r, heads, cols] = out
        if w == 0:
          plgpu.copy_smem_to_gmem(vec_smem.at[0], lse_ref.at[split, r, heads])
          plgpu.wait_smem_to_gmem(0)
        return
      q_smem[:, cols] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      # TMA needs a contiguous shared-memory source: 256 columns of the (8, 64)-tiled buffer
      # are contiguous only within each group of 8 rows.
      for g in range(BLOCK_H // 8):
        rows_g = pl.ds(g * 8, 8)
        plgpu.copy_smem_to_gmem(q_smem.at[rows_g, cols],
                                o_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)].at[rows_g, cols])
      if w == 0:
        plgpu.copy_smem_to_gmem(vec_smem.at[0], lse_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)])
      plgpu.wait_smem_to_gmem(0)

    for w in range(2):                 # static w: static shared-memory slices
      pl.when(wg == w)(functools.partial(consumer, w))

  swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  scratch = [
      plgpu.SMEM((BLOCK_H, d), jnp.bfloat16, transforms=swz),
      plgpu.SMEM((2, BLOCK_H, BLOCK_K), jnp.bfloat16, transforms=swz),     # P, 2 slots
      plgpu.SMEM((nks, BLOCK_K, d), jnp.bfloat16, transforms=swz)]
  if fp8:
    n_copies = len(nope_boxes) + 1 + (1 if tile_scales else BLOCK_K)
    win = _WINDOW // jnp.dtype(sc_ref.dtype).itemsize
    # Raw stages are plain row-major (no transforms): scale windows are one row each.
    scratch += [plgpu.SMEM((2, BLOCK_K, 256), jnp.float8_e4m3fn),
                plgpu.SMEM((BLOCK_K, D_ROPE), jnp.bfloat16),
                plgpu.SMEM((BLOCK_K, 4) if fmt == "v32" else (16, 32) if tile_scales else (BLOCK_K, win),
                           sc_ref.dtype)]
  else:
    n_copies = 1 if len(kv_refs) == 1 else 2 * (BLOCK_K // 8)
  scratch += [
      plgpu.SMEM((nks, BLOCK_K), jnp.float32),        # key bias (0 / -inf)
      plgpu.SMEM((2, BLOCK_H), jnp.float32),          # lse, output factor
      plgpu.SMEM((2, BLOCK_H), jnp.float32),          # rescale factors, 2 slots
      plgpu.Barrier(num_arrivals=n_copies, num_barriers=1 if fp8 else nks),
      plgpu.Barrier(num_arrivals=1, num_barriers=nks),
      plgpu.Barrier(num_arrivals=2, num_barriers=nks),   # both consumers
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1)]
  pl.run_scoped(scoped, *scratch, collective_axes="wg")


def check_supported(cache, d_qk: int, head_dim_v: int) -> None:
  """ValueError (before launch) for what this kernel does not cover."""
  ci = cache_view.info(cache)
  require(isinstance(cache, KCache) or cache_view.is_bf16_pages(cache),
          f"k_cache {type(cache).__name__}: impl='mosaic' reads a KCache or a bf16 array "
          "(convert packed bytes with KCache.from_packed_bytes, or use impl='pallas')")
  require(ci.h_kv == 1,
          f"k_cache h_kv={ci.h_kv}: impl='mosaic' dense decode reads one KV head (MLA); "
          "use impl='pallas' for more")
  # The bf16 TMA writes the swizzled K tile directly, and Mosaic GPU's tiled copies view the
  # cache as [N / 8, 8, d / 64, 64]: the rows must come in whole groups of 8.
  require(ci.fmt != "bf16" or ci.block_size % 8 == 0,
          f"k_cache block_size={ci.block_size}: impl='mosaic' reads a bf16 cache in pages of "
          "a multiple of 8 tokens (FP8 caches: any page size; or use impl='pallas')")
  require(head_dim_v == 2 * V_CHUNK,
          f"head_dim_v={head_dim_v}: impl='mosaic' needs {2 * V_CHUNK} (FlashMLA's value "
          "dim; two 256-column wgmma accumulators)")
  need = smem_bytes(ci.fmt, d_qk, ci.block_size)
  require(need <= SMEM_LIMIT, f"shared memory {need} B > {SMEM_LIMIT} B per CTA")


def supports(args: dict, head_dim_v: int) -> bool:
  """Whether this kernel covers the validated ``args`` (``check_supported`` passes)."""
  try:
    check_supported(args["cache"], args["q"].shape[-1], head_dim_v)
  except ValueError:
    return False
  return True


def dense_decode(args: dict, head_dim_v: int, interpret=None, tuning=None):
  """``dense_decode(..., impl="mosaic")`` on the validated ``args`` (ValueError first);
  of ``tuning`` only ``num_splits`` / ``num_sms`` apply."""
  check_supported(args["cache"], args["q"].shape[-1], head_dim_v)
  splits = choose_splits(args["q"], args["cache"], args["block_table"], tuning)
  return run(**args, head_dim_v=head_dim_v, num_splits=splits,
             interpret=interpret_params(interpret))


def _operands(cache):
  """Row-major 2-D views (reshapes of leading dims: no copies)."""
  if isinstance(cache, KCache):
    n = cache.num_tokens
    ops = [cache.nope.reshape(n, -1), cache.rope.reshape(n, D_ROPE)]
    if cache.fmt == "bf16":
      return ops
    # v32 scales [N, 4] fp32 (16-byte rows: one TMA box per tile); model1's 7-byte rows
    # are no TMA box (strides must be multiples of 16 bytes): a 1-D view, windows per token.
    if cache.fmt == "v32":
      return ops + [cache.scales.reshape(n, 4)]
    if _tile_scales(cache.fmt, cache.block_size):
      return ops + [cache.scales.reshape(n * 7 // 32, 32)]
    return ops + [cache.scales.reshape(-1)]
  z, y, _, d = cache.shape
  return [cache.reshape(z * y, d)]


def choose_splits(q, cache, block_table, tuning: KernelTuning | None) -> int:
  """Split-KV factor: ``tuning.num_splits`` if set, else the Triton path's cost model
  (fill the SMs in whole waves, against writing and re-reading fp32 partials), with this
  kernel's CTA count, a sequence's capacity in bytes and 64-token tiles."""
  tuning = tuning or KernelTuning()
  if tuning.num_splits is not None:
    return tuning.num_splits
  b, s_q, h_q, d = q.shape
  ci = cache_view.info(cache)
  tiles = block_table.shape[1] * -(-ci.block_size // BLOCK_K)
  return choose_num_splits(
      tuning, programs=b * s_q * -(-h_q // BLOCK_H),
      kv_bytes_per_program=tiles * BLOCK_K * bytes_per_token(ci.fmt, d),
      partial_bytes_per_split=BLOCK_H * (2 * V_CHUNK + 1) * 4, max_key_blocks=tiles,
      interpret=False)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal", "num_splits", "interpret",
                                             "_break"))
def run(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal,
        num_splits=1, interpret=None, _break=None):
  """The Mosaic GPU kernel on validated arguments (``dense_decode_mla_mosaic``).

  ``num_splits`` > 1: split-KV, each CTA one equal run of its row's tiles, merged by
  ``combine.combine_splits``.
  ``interpret``: None = real kernel; an ``InterpretGPUParams`` = GPU interpret mode (CPU).
  ``_break`` (tests only): "drop_key" drops each tile's second key, "no_barrier" removes the
  consumer's wait on the producer's "ready" barrier.
  Returns out bf16 ``[b, s_q, h_q, d_v]`` and lse ``[b, h_q, s_q]``.
  """
  b, s_q, h_q, d = q.shape
  rows = b * s_q
  n_hb = -(-h_q // BLOCK_H)
  hp = n_hb * BLOCK_H
  q_RNH = jnp.pad(q.reshape(rows, h_q, d), ((0, 0), (0, hp - h_q), (0, 0)))
  ci = cache_view.info(cache)
  kernel = functools.partial(
      dense_decode_mla_mosaic, fmt=ci.fmt, d=d, s_q=s_q, causal=causal,
      block_size=ci.block_size, num_blocks=ci.num_blocks, num_splits=num_splits, brk=_break,
      interpreted=interpret is not None)
  lead = (num_splits,) if num_splits > 1 else ()
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((*lead, rows, hp, head_dim_v),
                                     jnp.float32 if lead else jnp.bfloat16),
                jax.ShapeDtypeStruct((*lead, rows, hp), jnp.float32)),
      # The head-block axis fastest: CTAs reading the same pages run side by side (L2).
      grid=(rows, num_splits, n_hb), grid_names=("row", "split", "hb"), num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret)(cache_seqlens, block_table, softmax_scale.reshape(1), q_RNH,
                           *_operands(cache))
  if lead:
    out, lse = combine.combine_splits(out[:, :, :h_q], lse[:, :, :h_q], out_dtype=jnp.bfloat16)
  out = out[:, :h_q].reshape(b, s_q, h_q, head_dim_v)
  lse = lse[:, :h_q].reshape(b, s_q, h_q)
  return out, jnp.transpose(lse, (0, 2, 1))
