"""FP8 sparse decode attention as a Hopper-native (sm_90a) Pallas Mosaic GPU kernel.

``run`` is what ``sparse_decode(..., impl="mosaic")`` calls after its argument checks; the
semantics are those of ``sparse_decode`` (FlashMLA's ``flash_mla_with_kvcache`` with
``indices``): per query row, one softmax over the selected tokens of the main cache and of
the optional extra cache, attention sink, ``topk_length`` / ``extra_topk_length``, index -1
= invalid, out bf16 ``[b, s_q, h_q, d_v]`` and lse ``[b, h_q, s_q]``.

Design (after FlashMLA's ``sm90/decode/sparse_fp8`` kernel, not a port of our Triton tiling):

  * One CTA per (query row, split, 64-head block): grid ``(b * s_q, S, ceil(h_q / 64))``,
    heads padded to 64 (wgmma's M).  Three warpgroups (``num_threads=3``):
      - warpgroup 2, the producer: gathers the selected tokens' FP8 bytes with TMA into raw
        shared-memory stages, then dequantises each tile on chip (registers) into a bf16
        K tile in swizzled shared memory, zeroing invalid tokens, and signals "ready";
      - warpgroups 0 and 1, the consumers, each accumulating ``O += P V`` for its own 256
        of the 512 value columns (the value is the first 512 columns of the same bf16
        tile: one load serves both products): one 64 x 256 fp32 accumulator each, 128
        registers per thread (one consumer with both halves would need 256, over the
        255-register limit).  Warpgroup 0 keeps the 64 query heads resident in shared
        memory (one TMA at the start) and per K tile runs ``S = Q K^T`` (one wgmma,
        K = d_qk) and the online softmax in fp32 registers, then hands P (bf16) and the
        rows' rescale factors to warpgroup 1 through shared memory (two slots, tile
        c % 2) and a barrier; at the end it hands over the output factors the same way.
    The dequantised cache never exists in HBM: each tile lives in shared memory only.
  * Pipeline: one raw (FP8) stage and one bf16 stage: the producer issues the gathers of
    tile c+1 as soon as tile c is dequantised, so they are in flight while the consumers
    run tile c's wgmmas; it waits on a "consumed" barrier (both consumers arrive) before
    dequantising into the bf16 stage again.  Main-cache tiles then extra-cache tiles form
    one chunk list.  (Two bf16 stages do not fit in 227 KB with Q resident; see below.)
  * Tile: BLOCK_K = 64 tokens, 64 heads.  wgmma shapes: QK^T m64 n64 k576 (v32) / k512
    (model1); P V m64 n256 k64 per consumer.  K = 64 for P V: P's 64 bf16 columns are one
    128-byte swizzle row, the swizzle of the V tile (Mosaic GPU needs both operands'
    swizzles equal), which is why the tile is 64 tokens, as FlashMLA's.  On the GPU P V
    accumulates in place (``pl.run_state`` with ``ACC.init``); interpret mode does not
    simulate that, so there P V goes into a fresh accumulator that is then added
    (``interpreted``; the CUDA-lowering test covers the GPU branch).
  * Split-KV (FlashMLA's ``splitkv`` + combine): a row's chunk list (main tiles, then
    extra tiles: ``ceil(topk_length / 64) + ceil(extra_topk_length / 64)``, computed in
    the kernel from the row's own lengths) is dealt out in S equal runs of whole 64-token
    tiles; split s walks only its run, through the same pipeline.  With S > 1 each CTA
    writes an fp32 partial normalised over its run (no sink), straight from the wgmma
    registers to global memory (an fp32 staging tile would need 64 KB of shared memory
    per consumer, which is not left), and its lse through shared memory and TMA (+inf for
    a run with no valid key, so an empty or past-the-end split weighs exactly 0);
    ``combine.combine_splits`` merges them and applies the sink once, as the Triton path
    does.  With S = 1 the kernel finalises itself (sink, empty-row rule, bf16 out by TMA).
    Shared memory is unchanged (the partial never touches it).  S: ``tuning.num_splits``,
    else ``choose_splits``, the Triton path's cost model (``tuning.choose_num_splits``):
    whole waves of 132 SMs, each CTA's tile time counted as the bytes it gathers
    (752 / 696 B per token), against 2 x 64 x 513 x 4 bytes of partials written and
    re-read per split and CTA plus the combine's launch.  At FlashMLA-like shapes (h 128,
    s_q 2, top-k 2048 + extra 512): b 1-8 (4-32 CTAs) split, b 128 (512 CTAs) does not.
    The model is conservative: a tile costs ~2.7-4 us of wgmma and dequant (below), more
    than its ~1.5 us of bytes, so real small-batch runs may want more splits (tune
    ``num_splits`` on the GPU).  In interpret mode it counts 2 SMs (CPU time per CTA).
  * h_q = 128 runs as two CTAs of 64 heads that are neighbours in the grid (the head-block
    axis is the fastest), so the second one's gathers of the same tokens hit L2; a single
    CTA holding 128 heads of a 576-dim query (147 KB) plus its K stage does not fit in
    227 KB.

Per-token gather: what Mosaic GPU offers on Hopper, and why this choice.  Hopper has no TMA
gather (``cp.async.bulk.tensor`` gather4 is Blackwell-only; Mosaic GPU's indexed
``copy_gmem_to_smem`` lowers to it and so needs sm_100).  The options left are one TMA copy
per token row, or ``cp.async`` (Mosaic GPU uses it only below sm_90 and then without
barriers).  We issue one TMA copy per token and array, all completing on one mbarrier
(its arrival count = the number of copies), so the producer never blocks per token and the
consumers see a whole tile through one wait.  The tile's 64 indices come first, by one TMA
copy into shared memory on their own barrier, so the token loop reads each index from SMEM
(~30 cycles) rather than from global memory (~600 cycles, serialised before every issue).
Mosaic GPU requires each TMA copy to move a multiple of 128 bytes, at most 256 elements per
dimension, and every global stride but the last to be a multiple of 16 bytes, which shapes
the gathers:
  v32:    NoPE 512 B = two 256 B copies, RoPE 128 B, scales: a 128 B window of the 1-D view
          of all scales starting at the token's 4 fp32 (32 fp32; the token's are the first 4);
  model1: NoPE 448 B = two overlapping 256 B copies (bytes [0, 256) and [192, 448), both
          inside the token, so no other token's bytes are fetched; tiles 4-6 sit at SMEM
          columns 320-511), RoPE 128 B, scales: a 128 B window of the 1-D scale view from
          the token's 7 ue8m0 bytes (a window past the end is zero-filled by TMA).
  The scale windows over-fetch: DRAM moves the 32 B sectors the window touches (4-5)
  instead of one, ~+100 B per token.  Bytes per token actually read: v32 ~656 + 96 = 752,
  model1 ~584 + 112 = 696.  (Fix for later: a cache layout with each token's scales beside
  its RoPE, as one 128 B-multiple row.)

Shared memory per CTA (BLOCK_K = 64, 1 + 1 stages; ``smem_bytes``):
  v32:    Q 64x576x2 = 73.7 KB; bf16 K 64x576x2 = 73.7 KB; raw 64 x (512 + 128 + 128)
          = 49.2 KB; P 2 x 8 KB; index/bias/sink/lse/factors 1.6 KB  ->  214.8 KB
          (<= 227 KB)
  model1: Q 65.5 KB; bf16 K 65.5 KB; raw 49.2 KB; P 16 KB; 1.6 KB  ->  198.4 KB
  The output reuses Q's buffer (warpgroup 1 writes its half after warpgroup 0 signals
  that its last QK^T is done).

Expected fraction of roofline (unmeasured: no GPU was lent; arithmetic, H200 = 4.3 TB/s
copy, ~790 TFLOP/s bf16, 132 SMs at ~1.9 GHz).  FlashMLA's V32 shape (b 128, s_q 2, h 128,
top-k 2048): FLOPs = 2 x 256 rows x 128 heads x 2048 x (576 + 512) = 146 GFLOP; bytes =
256 rows x 2048 x 752 B (the second head block's re-read mostly from L2) = 394 MB -> 92 us at
4.3 TB/s, vs 185 us of tensor-core time at 790 TFLOP/s: compute-bound.  Per 64x64 tile and
CTA (one CTA per SM: 215 KB of shared memory):
  consumers: QK^T 2 x 64 x 64 x 576 = 4.7 MFLOP (warpgroup 0), then P V 2 x 64 x 64 x 512
            = 4.2 MFLOP split over both -> ~1.5 us at 790/132 TFLOP/s per SM, plus the
            softmax on 64 x 64 logits (32 exp per thread) between them;
  producer: dequant = reading the raw stages (32 KB of codes in 8-byte lane loads, 2-way
            bank conflicts: ~0.5K shared-memory wavefronts; RoPE and scales ~0.1K) plus
            ~0.6K for the swizzled bf16 stores and ~32K fp8->fp32->bf16 conversions
            (~1K cycles) -> ~1-1.2 us; then issuing the next tile's 64 x 5 TMA copies from
            one thread, ~1-3 us, overlapped with the consumers' wgmmas.
With one bf16 stage the consumers wait for each dequant: ~2.7-4 us per tile, i.e. 37-55 %
of the bf16 peak, ~290-435 TFLOP/s, around the issue's 330 TFLOP/s target -- unmeasured.
The levers, in order: a second bf16 stage (needs the 74 KB that Q residency takes, e.g. Q
in two 64-head halves re-read from L2) so dequant overlaps the wgmmas; gathers spread over
the producer's 128 threads instead of one thread issuing 320 TMA copies per tile; P V of
warpgroup 1 overlapping the next QK^T of warpgroup 0 (it does once the producer runs
ahead); conflict-free code loads (16-byte lane loads are conflict-free, but their 32-byte
bf16 vectors cross the swizzle chunks of the K tile: Mosaic GPU refuses that store).  At
small batch the grid (b x s_q x h_q/64 CTAs) under-fills 132 SMs; split-KV refills them
at the cost of the partials and the combine (unmeasured).

CUDA lowering (``jax.export(..., platforms=["cuda"])``, no GPU needed; tested with and
without splits, ~1 s per geometry): the kernel uses Mosaic GPU's Lane lowering semantics, where every register
array has the layout we give it (the consumers' tiles in ``plgpu.Layout.WGMMA``, the
producer's in ``_raw_layout``, per-head and per-token vectors in their reductions) instead
of the Warpgroup semantics' layout search, which finds no assignment for the
dequantisation on jax 0.11.2.  The raw FP8/RoPE/scale stages
are untransformed row-major shared memory (a multi-row tiling would forbid one-row TMA
copies), read in [64, 64] pieces into a register layout of our own (``_raw_layout``: a
lane holds 8 consecutive elements of one token row, a warp 4 rows): RoPE loads are then
bank-conflict-free (Mosaic GPU checks it), code loads 2-way conflicted (a warp reads 4
rows x 64 B of 512-byte rows; Mosaic GPU accepts it only with ``optimized=False``), where
the wgmma register layout would read 8 rows x 2 B (8-way).  Each consumer's 256 output
columns leave through TMA in groups of 8 rows (only those are contiguous in the tiled
buffer).  What this does not check: ptxas (registers, spills) and the run itself; the GPU check script runs
``tests/test_kernel_gpu.py``, which compiles and runs this kernel first.

Tested on CPU in GPU interpret mode (``plgpu.InterpretGPUParams``), which simulates shared
memory, TMA, mbarriers, wgmma and warpgroup races.  Letter key: R query rows (b * s_q), N
heads, H head dim, X top-k, K the tile's tokens, S splits, V value dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa

from pallas_kernels import cache_view, combine
from pallas_kernels.fp8_cache import D_ROPE, KCache, require
from pallas_kernels.tuning import KernelTuning, choose_num_splits

BLOCK_H = 64            # wgmma M: query heads per CTA
BLOCK_K = 64            # tokens per tile (wgmma K of P V must be a multiple of 64)
RAW_STAGES = 1
K_STAGES = 1
SMEM_LIMIT = 227 * 1024
V_CHUNK = 256          # value columns per consumer warpgroup (wgmma N <= 256)
_WINDOW = 128           # bytes per TMA scale window (Mosaic GPU's TMA granularity)


def geometry(fmt: str):
  """(d_qk, d_nope, scale tile width, scale count, NoPE copies as (src byte, smem byte, n))."""
  if fmt == "v32":
    return 576, 512, 128, 4, ((0, 0, 256), (256, 256, 256))
  return 512, 448, 64, 7, ((0, 0, 256), (192, 256, 256))


def _nope_smem_col(fmt: str, t: int, width: int) -> int:
  # model1 tiles 4..6 (bytes 256..447) were copied by the second window to SMEM 256 + (b - 192).
  col = t * width
  return col if (fmt == "v32" or col < 256) else col + 64


def _raw_layout(cols: int):
  """Register layout of a [64, cols] piece of a row-major raw stage: 4 warps x 16 token
  rows; in a warp, 4 rows x 8 lanes, each lane holding cols/8 consecutive elements."""
  return plgpu.Layout.TILED(
      mgpu_fa.Tiling(((BLOCK_K, cols), (16, cols), (4, cols), (cols // 8,))),
      warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)


def _stage(c, n: int):
  """Pipeline slot of tile c; a static 0 with one stage (static shared-memory views)."""
  return 0 if n == 1 else c % n


def accumulate(acc, mma, interpreted: bool):
  """``acc`` plus the wgmma ``mma(acc_ref)`` issues. On the GPU in place (``pl.run_state``
  with ``ACC.init``: no second 128-register accumulator); interpret mode does not
  simulate in-place accumulation, so there a fresh accumulator, then added."""
  if interpreted:
    def fresh(acc_ref):
      mma(acc_ref)
      return acc_ref[...]
    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
  return pl.run_state(mma)(plgpu.ACC.init(acc))


def attend_tile(c, carry, w, *, n_stages, q_smem, kbf, bias_smem, p_smem, alpha_smem, p_bar,
                ready, consumed, scale, interpreted, brk=None):
  """One key tile of a consumer warpgroup (the decode kernels' loop body): wait for the
  producer's tile; warpgroup 0 runs S = Q K^T (one wgmma), adds the tile's bias (0 or -inf
  per token), updates the online softmax in fp32 and hands P (bf16) and the rows' rescale
  factors to warpgroup 1 through shared memory (slot c % 2); both rescale their
  accumulator and add P V for their ``V_CHUNK`` value columns; then release the tile.
  ``carry`` = (acc [BLOCK_H, V_CHUNK] fp32, running max, running sum)."""
  acc, m_N, l_N = carry
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  cols = pl.ds(w * V_CHUNK, V_CHUNK)
  ks, par = _stage(c, n_stages), c % 2
  if brk != "no_barrier":
    plgpu.barrier_wait(ready.at[ks])
  if w == 0:
    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, kbf.at[ks].T)
      return acc_ref[...]
    s_NK = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, BLOCK_K), jnp.float32))
    bias_K = plgpu.load(bias_smem.at[ks], layout=plgpu.Layout.WGMMA.reduce(0))
    s_NK = s_NK * scale + lax.broadcast_in_dim(bias_K, s_NK.shape, [1])
    m_new = jnp.maximum(m_N, jnp.max(s_NK, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)    # nothing seen yet: no inf - inf
    alpha = jnp.exp(m_N - m_safe)
    p_NK = jnp.exp(s_NK - lax.broadcast_in_dim(m_safe, s_NK.shape, [0]))
    l_N = l_N * alpha + jnp.sum(p_NK, axis=1)
    m_N = m_new
    p_smem[par] = p_NK.astype(jnp.bfloat16)
    alpha_smem[par] = alpha
    plgpu.commit_smem()            # visible to wgmma and to warpgroup 1
    plgpu.barrier_arrive(p_bar)
  else:
    plgpu.barrier_wait(p_bar)
    alpha = plgpu.load(alpha_smem.at[par], layout=row_layout)
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p_smem.at[par], kbf.at[ks, :, cols])
  acc = accumulate(acc, pv, interpreted)
  plgpu.barrier_arrive(consumed.at[ks])
  return acc, m_N, l_N


def smem_bytes(fmt: str, d_v: int) -> int:
  d, *_ = geometry(fmt)
  q = BLOCK_H * d * 2
  k = K_STAGES * BLOCK_K * d * 2
  raw = RAW_STAGES * BLOCK_K * (512 + 2 * D_ROPE + _WINDOW)
  p = 2 * BLOCK_H * BLOCK_K * 2
  small = RAW_STAGES * BLOCK_K * 4 + K_STAGES * BLOCK_K * 4 + 5 * BLOCK_H * 4
  return q + p + k + raw + small


def sparse_decode_mla_mosaic(lens_ref, scale_ref, q_ref, sink_ref, idx_ref, nope_ref, rope_ref,
                             sc_ref, *rest, fmt, d_v, has_extra, s_q, n_main_rows,
                             n_extra_rows, num_splits, interpreted, brk=None):
  """Kernel body: one CTA = one query row x one split x one 64-head block (see the module
  notes).  Outputs: num_splits 1: out ``[R, N, V]`` bf16 (sink applied) and lse ``[R, N]``;
  num_splits > 1: fp32 partials ``[S, R, N, V]``, each normalised over its own run of
  tiles without the sink, and their lse ``[S, R, N]`` (+inf for an empty run)."""
  if has_extra:
    elens_ref, eidx_ref, enope_ref, erope_ref, esc_ref, o_ref, lse_ref = rest
  else:
    o_ref, lse_ref = rest
  d, d_nope, width, n_sc, nope_copies = geometry(fmt)
  r = lax.axis_index("row")
  hb = lax.axis_index("hb")
  split = lax.axis_index("split")
  final = num_splits == 1              # the sink and bf16 out here, else in the combine
  b = r // s_q
  length = lens_ref[b]
  n_main = (length + BLOCK_K - 1) // BLOCK_K
  n_total = n_main
  if has_extra:
    elength = elens_ref[b]
    n_total = n_main + (elength + BLOCK_K - 1) // BLOCK_K
  # Split-KV: this CTA's tiles [c_first, c_end), an equal run of the row's chunk list (main
  # tiles then extra tiles; computed from the row's own lengths, so a split may be empty).
  per = (n_total + num_splits - 1) // num_splits
  c_first = jnp.minimum(split * per, n_total)
  c_end = jnp.minimum(c_first + per, n_total)
  copies_per_token = len(nope_copies) + 2

  def scoped(q_smem, p_smem, kbf, nope_raw, rope_raw, sc_raw, idx_smem, bias_smem, vec_smem,
             alpha_smem, raw_bar, ready, consumed, q_bar, idx_bar, p_bar, fin_bar):
    wg = lax.axis_index("wg")

    # ------------------------------------------------------------------ producer
    def gather(c, rs, cache_idx, cache_nope, cache_rope, cache_sc, cc, clen, rows):
      # The tile's indices land in shared memory first (one copy, one wait), so the token
      # loop below reads each index from SMEM instead of paying a global-memory latency
      # per token before its TMA can be issued.
      plgpu.copy_gmem_to_smem(cache_idx.at[r, pl.ds(cc * BLOCK_K, BLOCK_K)], idx_smem.at[rs],
                              idx_bar)
      plgpu.barrier_wait(idx_bar)

      @pl.loop(0, BLOCK_K)
      def _token(x):
        pos = cc * BLOCK_K + x
        i = idx_smem[rs, x]
        row = jnp.where((i >= 0) & (i < rows) & (pos < clen), i, 0)   # invalid: any in-range row
        for src, dst, n in nope_copies:
          plgpu.copy_gmem_to_smem(cache_nope.at[pl.ds(row, 1), pl.ds(src, n)],
                                  nope_raw.at[rs, pl.ds(x, 1), pl.ds(dst, n)], raw_bar.at[rs])
        plgpu.copy_gmem_to_smem(cache_rope.at[pl.ds(row, 1)], rope_raw.at[rs, pl.ds(x, 1)],
                                raw_bar.at[rs])
        n_win = sc_raw.shape[-1]
        plgpu.copy_gmem_to_smem(cache_sc.at[pl.ds(row * n_sc, n_win)], sc_raw.at[rs, x],
                                raw_bar.at[rs])

    def issue(c):
      rs = _stage(c, RAW_STAGES)
      main = functools.partial(gather, c, rs, idx_ref, nope_ref, rope_ref, sc_ref, c, length,
                               n_main_rows)
      if not has_extra:
        main()
        return
      pl.when(c < n_main)(main)
      pl.when(c >= n_main)(functools.partial(
          gather, c, rs, eidx_ref, enope_ref, erope_ref, esc_ref, c - n_main, elength,
          n_extra_rows))

    def dequant(c):
      rs, ks = _stage(c, RAW_STAGES), _stage(c, K_STAGES)
      is_main = c < n_main
      cc = jnp.where(is_main, c, c - n_main)
      clen = jnp.where(is_main, length, elength) if has_extra else length
      rows = jnp.where(is_main, n_main_rows, n_extra_rows) if has_extra else n_main_rows
      # Explicit register layouts (Lane semantics): [64, 64] pieces in ``_RAW_TILE``, whose
      # lanes read 8 consecutive elements along a token row, so a warp's load touches 4 rows
      # x 64 B (codes) or 4 x 128 B (RoPE) instead of wgmma's 8 rows x 4 B; per-token
      # vectors in its row reduction.
      tile_l, win_l = _raw_layout(64), _raw_layout(8)
      row_l = tile_l.reduce(1)
      T = lambda x: plgpu.layout_cast(x, tile_l)
      R = lambda x: plgpu.layout_cast(x, row_l)
      idx_K = plgpu.load(idx_smem.at[rs], layout=row_l)
      pos_K = cc * BLOCK_K + plgpu.broadcasted_iota(jnp.int32, (BLOCK_K,), 0, layout=row_l)
      valid_K = (idx_K >= 0) & (idx_K < rows) & (pos_K < clen)
      if brk == "drop_key":
        valid_K = valid_K & (pos_K % BLOCK_K != 1)
      valid_K = R(valid_K)
      # The token's scales are the first 4 fp32 / 7 bytes of its window.
      W = lambda x: plgpu.layout_cast(x, win_l)
      win = plgpu.load(sc_raw.at[rs, :, pl.ds(0, 8)], layout=win_l, optimized=False)
      win = W(win.astype(jnp.float32) if fmt == "v32" else win.astype(jnp.int32))
      col = plgpu.broadcasted_iota(jnp.int32, win.shape, 1, layout=win_l)
      scales = {}
      for p in range(d_nope // 64):
        t = p * 64 // width                       # the scale tile of this 64-column piece
        if t not in scales:
          picked = W(jnp.where(col == t, win, jnp.zeros_like(win)))
          if fmt == "v32":
            s_K = R(jnp.sum(picked, axis=1))
          else:
            e_K = R(jnp.sum(picked, axis=1))
            s_K = R(lax.bitcast_convert_type(e_K << 23, jnp.float32))
            s_K = R(jnp.where(e_K == 255, jnp.full_like(s_K, jnp.nan), s_K))
          scales[t] = T(lax.broadcast_in_dim(s_K, (BLOCK_K, 64), [0]))
        c0 = _nope_smem_col(fmt, p, 64)
        codes = T(T(plgpu.load(nope_raw.at[rs, :, pl.ds(c0, 64)], layout=tile_l,
                               optimized=False)).astype(jnp.float32))
        # Exact: e4m3 codes and power-of-two scales (v32 bf16(fp32(q)*s); model1
        # bf16(bf16(q)*bf16(s)) gives the same bits since both factors are exact in bf16).
        # Invalid tokens are zeroed with a select: their bytes (even NaN) never reach a dot.
        k_KW = T(codes * scales[t])
        k_KW = T(jnp.where(T(lax.broadcast_in_dim(valid_K, codes.shape, [0])), k_KW,
                           jnp.zeros_like(k_KW)))
        kbf[ks, :, pl.ds(p * 64, 64)] = T(k_KW.astype(jnp.bfloat16))
      rope = T(plgpu.load(rope_raw.at[rs], layout=tile_l))
      kbf[ks, :, pl.ds(d_nope, D_ROPE)] = T(jnp.where(
          T(lax.broadcast_in_dim(valid_K, rope.shape, [0])), rope, jnp.zeros_like(rope)))
      bias_smem[ks] = R(jnp.where(valid_K, jnp.zeros(valid_K.shape, jnp.float32),
                                  jnp.full(valid_K.shape, -jnp.inf, jnp.float32)))

    @pl.when(wg == 2)
    def _producer():
      @pl.when(c_end > c_first)
      def _():
        issue(c_first)

      @pl.loop(c_first, c_end)
      def _tile(c):
        if RAW_STAGES > 1:             # gathers of tile c+1 in flight during dequant(c)
          pl.when(c + 1 < c_end)(lambda: issue(c + 1))
        plgpu.barrier_wait(raw_bar.at[_stage(c, RAW_STAGES)])

        @pl.when(c - c_first >= K_STAGES)
        def _():
          plgpu.barrier_wait(consumed.at[_stage(c, K_STAGES)])
        dequant(c)
        plgpu.commit_smem()            # generic-proxy stores -> visible to wgmma
        plgpu.barrier_arrive(ready.at[_stage(c, K_STAGES)])
        if RAW_STAGES == 1:            # gathers of tile c+1 in flight during the consumer's c
          pl.when(c + 1 < c_end)(lambda: issue(c + 1))

      # Observe the last "consumed" phases, so the barriers end balanced (and the CTA does
      # not retire while the consumer still reads a stage).
      @pl.loop(jnp.maximum(c_end - K_STAGES, c_first), c_end)
      def _drain(c):
        plgpu.barrier_wait(consumed.at[_stage(c, K_STAGES)])

    # ------------------------------------------------------------------ consumers
    # Two warpgroups w = 0, 1 each accumulate value columns [256w, 256w + 256): one 64 x 256
    # fp32 accumulator each (128 registers per thread; a single consumer would need 256, over
    # the 255-register limit).  Warpgroup 0 also computes the logits and the softmax and
    # hands P and the rescale factors to warpgroup 1 through shared memory (slot c % 2:
    # warpgroup 0 writes slot c + 1 while warpgroup 1 may still read slot c; it reaches slot
    # c again only after both consumers released tile c + 1).
    def consumer(w):
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      cols = pl.ds(w * V_CHUNK, V_CHUNK)
      if w == 0:
        plgpu.copy_gmem_to_smem(q_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)], q_smem, q_bar)
        if final:                      # with splits the combine applies the sink, once
          plgpu.copy_gmem_to_smem(sink_ref.at[pl.ds(hb * BLOCK_H, BLOCK_H)], vec_smem.at[0],
                                  q_bar)
        plgpu.barrier_wait(q_bar)
        scale = scale_ref[0]

      def step(c, carry):
        return attend_tile(c, carry, w, n_stages=K_STAGES, q_smem=q_smem, kbf=kbf,
                           bias_smem=bias_smem, p_smem=p_smem, alpha_smem=alpha_smem,
                           p_bar=p_bar, ready=ready, consumed=consumed,
                           scale=scale if w == 0 else None, interpreted=interpreted, brk=brk)

      init = (plgpu.layout_cast(jnp.zeros((BLOCK_H, V_CHUNK), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), row_layout),
              plgpu.layout_cast(jnp.zeros((BLOCK_H,), jnp.float32), row_layout))
      acc, m_N, l_N = lax.fori_loop(c_first, c_end, step, init)

      if w == 0:
        live = l_N > 0
        l_safe = jnp.where(live, l_N, 1.0)
        lse = jnp.where(live, m_N + jnp.log(l_safe), 0.0)
        if final:
          sink = plgpu.load(vec_smem.at[0], layout=row_layout)
          factor = jnp.where(live, 1.0 / (l_safe * (1.0 + jnp.exp(sink - lse))), 0.0)
        else:                          # a partial: normalised over its run, no sink
          factor = jnp.where(live, 1.0 / l_safe, 0.0)
        vec_smem[1] = jnp.where(live, lse, jnp.inf)      # +inf: empty (row or run)
        vec_smem[2] = factor
        plgpu.commit_smem()
        # Q is dead from here on (its last QK^T is done): warpgroup 1 may write its half
        # of the output into Q's buffer.
        plgpu.barrier_arrive(fin_bar)
      else:
        plgpu.barrier_wait(fin_bar)
        factor = plgpu.load(vec_smem.at[2], layout=row_layout)
      out = acc * lax.broadcast_in_dim(factor, acc.shape, [0])
      heads = pl.ds(hb * BLOCK_H, BLOCK_H)
      if not final:
        # fp32 partials straight from registers (a 64 x 256 fp32 staging tile would need
        # 64 KB of shared memory per consumer, more than is left); the combine reads them once.
        o_ref[split, r, heads, cols] = out
        if w == 0:
          plgpu.copy_smem_to_gmem(vec_smem.at[1], lse_ref.at[split, r, heads])
          plgpu.wait_smem_to_gmem(0)
        return
      q_smem[:, cols] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      # TMA needs a contiguous shared-memory source: 256 columns of the (8, 64)-tiled buffer
      # are contiguous only within each group of 8 rows.
      for g in range(BLOCK_H // 8):
        rows_g = pl.ds(g * 8, 8)
        plgpu.copy_smem_to_gmem(q_smem.at[rows_g, cols],
                                o_ref.at[r, heads].at[rows_g, cols])
      if w == 0:
        plgpu.copy_smem_to_gmem(vec_smem.at[1], lse_ref.at[r, heads])
      plgpu.wait_smem_to_gmem(0)

    for w in range(2):                 # static w: static shared-memory slices
      pl.when(wg == w)(functools.partial(consumer, w))

  swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  sc_dtype = sc_ref.dtype
  win = _WINDOW // jnp.dtype(sc_dtype).itemsize
  pl.run_scoped(
      scoped,
      plgpu.SMEM((BLOCK_H, d), jnp.bfloat16, transforms=swz),
      plgpu.SMEM((2, BLOCK_H, BLOCK_K), jnp.bfloat16, transforms=swz),     # P, 2 slots
      plgpu.SMEM((K_STAGES, BLOCK_K, d), jnp.bfloat16, transforms=swz),
      # Raw stages are plain row-major (no transforms): each token row is written by its
      # own TMA copy, which a multi-row tiling would not allow.
      plgpu.SMEM((RAW_STAGES, BLOCK_K, 512), jnp.float8_e4m3fn),
      plgpu.SMEM((RAW_STAGES, BLOCK_K, D_ROPE), jnp.bfloat16),
      plgpu.SMEM((RAW_STAGES, BLOCK_K, win), sc_dtype),
      plgpu.SMEM((RAW_STAGES, BLOCK_K), jnp.int32),
      plgpu.SMEM((K_STAGES, BLOCK_K), jnp.float32),
      plgpu.SMEM((3, BLOCK_H), jnp.float32),          # sink, lse, output factor
      plgpu.SMEM((2, BLOCK_H), jnp.float32),          # rescale factors, 2 slots
      plgpu.Barrier(num_arrivals=BLOCK_K * copies_per_token, num_barriers=RAW_STAGES),
      plgpu.Barrier(num_arrivals=1, num_barriers=K_STAGES),
      plgpu.Barrier(num_arrivals=2, num_barriers=K_STAGES),   # both consumers
      plgpu.Barrier(num_arrivals=2 if final else 1),   # Q (+ the sink without splits)
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1),
      collective_axes="wg")


def _flat(cache):
  rows = cache.num_tokens
  return (cache.nope.reshape(rows, -1), cache.rope.reshape(rows, D_ROPE),
          cache.scales.reshape(-1))


def _pad_topk(idx_BTX, rows: int):
  x = idx_BTX.reshape(rows, -1)
  pad = -x.shape[-1] % BLOCK_K
  return jnp.pad(x, ((0, 0), (0, pad)), constant_values=-1) if pad else x


def check_supported(cache, d_qk: int, head_dim_v: int) -> None:
  """ValueError (before launch) for what this kernel does not cover."""
  fmt = cache_view.info(cache).fmt
  require(fmt in ("v32", "model1"),
          f"k_cache format {fmt!r}: impl='mosaic' sparse decode reads the FP8 formats "
          "'v32' or 'model1' (use impl='pallas' or 'xla' for a bf16 cache)")
  # It reads the structure-of-arrays KCache; FlashMLA's packed bytes would need their own
  # per-token gathers (KCache.from_packed_bytes converts them).
  require(isinstance(cache, KCache),
          f"k_cache {type(cache).__name__}: impl='mosaic' reads a KCache (convert packed "
          "bytes with KCache.from_packed_bytes, or use impl='pallas')")
  # The value is the first head_dim_v key columns, accumulated in chunks of wgmma's N = 256.
  require(head_dim_v == 2 * V_CHUNK,
          f"head_dim_v={head_dim_v}: impl='mosaic' needs {2 * V_CHUNK} (FlashMLA's value "
          "dim; two 256-column wgmma accumulators)")
  need = smem_bytes(fmt, head_dim_v)
  require(need <= SMEM_LIMIT, f"shared memory {need} B > {SMEM_LIMIT} B per CTA")


def supports(args: dict, head_dim_v: int) -> bool:
  """Whether this kernel covers the validated ``args`` (``check_supported`` passes)."""
  try:
    for cache in (args["cache"], args["extra_cache"]):
      if cache is not None:
        check_supported(cache, args["q"].shape[-1], head_dim_v)
  except ValueError:
    return False
  return True


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
  """None/True/False/params -> GPU interpret params or None (real kernel).

  None means: interpret when the default backend is the CPU."""
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  require(isinstance(interpret, bool),
          f"interpret={interpret!r}: expected None, a bool or plgpu.InterpretGPUParams")
  return plgpu.InterpretGPUParams() if interpret else None


def sparse_decode(args: dict, head_dim_v: int, interpret=None, tuning=None):
  """``sparse_decode(..., impl="mosaic")`` on the validated ``args`` (ValueError first);
  of ``tuning`` (a validated ``KernelTuning`` or None) only ``num_splits`` / ``num_sms``
  apply."""
  for cache in (args["cache"], args["extra_cache"]):
    if cache is not None:
      check_supported(cache, args["q"].shape[-1], head_dim_v)
  params = interpret_params(interpret)
  splits = choose_splits(args["q"], args["cache"].fmt, args["indices"], args["extra_indices"],
                         tuning, interpret=params is not None)
  return run(**args, head_dim_v=head_dim_v, num_splits=splits, interpret=params)


def gathered_bytes_per_token(fmt: str) -> int:
  """DRAM bytes one gathered token costs (the module notes): its FP8 row plus the
  32-byte sectors its 128-byte scale window over-fetches."""
  return 752 if fmt == "v32" else 696


def choose_splits(q, fmt: str, indices, extra_indices, tuning: KernelTuning | None, *,
                  interpret: bool = False) -> int:
  """Split-KV factor: ``tuning.num_splits`` if set, else the Triton path's cost model
  (``tuning.choose_num_splits``: fill the SMs in whole waves, against writing and
  re-reading 64 x 513 fp32 partials per split and CTA), with this kernel's CTA count
  (b x s_q x head blocks), the bytes a CTA gathers for its whole (padded) top-k list, main
  plus extra, and 64-token tiles.  ``interpret``: count 2 SMs, as the Triton path does
  (every CTA costs CPU time in interpret mode)."""
  tuning = tuning or KernelTuning()
  if tuning.num_splits is not None:
    return tuning.num_splits
  b, s_q, h_q, _ = q.shape
  tiles = -(-indices.shape[-1] // BLOCK_K)
  if extra_indices is not None:
    tiles += -(-extra_indices.shape[-1] // BLOCK_K)
  return choose_num_splits(
      tuning, programs=b * s_q * -(-h_q // BLOCK_H),
      kv_bytes_per_program=tiles * BLOCK_K * gathered_bytes_per_token(fmt),
      partial_bytes_per_split=BLOCK_H * (2 * V_CHUNK + 1) * 4, max_key_blocks=tiles,
      interpret=interpret)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "num_splits", "interpret", "_break"))
def run(q, cache, indices, topk_length, attn_sink, softmax_scale, extra_cache=None,
        extra_indices=None, extra_topk_length=None, *, head_dim_v, num_splits=1,
        interpret=None, _break=None):
  """The Mosaic GPU kernel on validated arguments (``sparse_decode_mla_mosaic``).

  ``num_splits`` > 1: split-KV, each CTA one equal run of its row's chunk list (main then
  extra tiles), fp32 partials merged by ``combine.combine_splits``, which applies the sink.
  ``interpret``: None = real kernel; an ``InterpretGPUParams`` = GPU interpret mode (CPU).
  ``_break`` (tests only): "drop_key" drops each tile's second key, "no_barrier" removes the
  consumer's wait on the producer's "ready" barrier; the tests check that both fail.
  Returns out bf16 ``[b, s_q, h_q, d_v]`` and lse ``[b, h_q, s_q]``.
  """
  b, s_q, h_q, d = q.shape
  rows = b * s_q
  n_hb = -(-h_q // BLOCK_H)
  hp = n_hb * BLOCK_H
  q_RNH = jnp.pad(q.reshape(rows, h_q, d), ((0, 0), (0, hp - h_q), (0, 0)))
  sink_N = jnp.pad(attn_sink.astype(jnp.float32), (0, hp - h_q), constant_values=-jnp.inf)
  has_extra = extra_cache is not None
  operands = [topk_length, softmax_scale.reshape(1), q_RNH, sink_N, _pad_topk(indices, rows),
              *_flat(cache)]
  if has_extra:
    operands += [extra_topk_length, _pad_topk(extra_indices, rows), *_flat(extra_cache)]
  kernel = functools.partial(
      sparse_decode_mla_mosaic, fmt=cache.fmt, d_v=head_dim_v, brk=_break,
      interpreted=interpret is not None,
      has_extra=has_extra, s_q=s_q, num_splits=num_splits,
      n_main_rows=cache.num_tokens, n_extra_rows=extra_cache.num_tokens if has_extra else 0)
  lead = (num_splits,) if num_splits > 1 else ()
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((*lead, rows, hp, head_dim_v),
                                     jnp.float32 if lead else jnp.bfloat16),
                jax.ShapeDtypeStruct((*lead, rows, hp), jnp.float32)),
      # The head-block axis fastest: the CTAs gathering the same tokens run side by side (L2).
      grid=(rows, num_splits, n_hb), grid_names=("row", "split", "hb"), num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret)(*operands)
  if lead:
    out, lse = combine.combine_splits(out[:, :, :h_q], lse[:, :, :h_q],
                                      attn_sink_N=attn_sink.astype(jnp.float32),
                                      out_dtype=jnp.bfloat16)
  out = out[:, :h_q].reshape(b, s_q, h_q, head_dim_v)
  lse = lse[:, :h_q].reshape(b, s_q, h_q)
  return out, jnp.transpose(lse, (0, 2, 1))
