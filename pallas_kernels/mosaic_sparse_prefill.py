"""bf16 sparse prefill attention as a Hopper-native (sm_90a) Pallas Mosaic GPU kernel.

``run`` is what ``sparse_prefill(..., impl="mosaic")`` calls after its argument checks; the
semantics are those of ``sparse_prefill`` (FlashMLA's ``flash_mla_sparse_fwd``): per query
position t and head n, one softmax over the bf16 key rows ``kv[indices[t, 0, x], 0]`` with
``0 <= index < s_kv`` and ``x < topk_length[t]`` (anything else is invalid), attention sink,
out bf16 ``[s_q, h_q, d_v]`` (the value is the first d_v key columns), max_logits and lse
fp32 ``[s_q, h_q]`` of the scaled logits (-inf / +inf when nothing is valid).
Covers d_qk 576 (V3.2) and 512 (MODEL1) with d_v 512, and d_qk 512 with d_v 448.

Design (after FlashMLA's ``sm90/prefill/sparse`` kernel, not a port of our Triton tiling):

  * One CTA per (query position, 64-head block): a flat grid of ``s_q * ceil(h_q / 64)``
    CTAs (CUDA's grid y and z stop at 65535, a prefill's s_q need not), heads padded to 64
    (wgmma's M); the head block varies fastest, so the CTAs of one query position
    (h_q = 128: two) run side by side and the second one's gathers hit L2.
    Three warpgroups (``num_threads=3``):
      - warpgroup 2, the producer: gathers the selected key rows with TMA into raw
        shared-memory stages (32 tokens each), copies each stage through registers into
        the bf16 K tile in swizzled shared memory (the layout wgmma reads), zeroing
        invalid tokens on the way, and signals "ready" once a 64-token tile is complete;
      - warpgroups 0 and 1, the consumers, each accumulating ``O += P V`` for its own
        value columns (0:256 and 256:d_v) from the same K tile (the value is the first
        d_v columns of the key: one load serves both products); one 64 x 256 fp32
        accumulator each (128 registers per thread).  Warpgroup 0 keeps the 64 query
        heads resident in shared memory (one TMA at the start), runs ``S = Q K^T`` (one
        wgmma, K = d_qk) and the online softmax in fp32 registers per tile, and hands P
        (bf16) and the rows' rescale factors to warpgroup 1 through shared memory and a
        barrier; at the end it hands over the output factors the same way.
  * Pipeline: one bf16 K stage and two raw stages (the two 32-token halves of a tile,
    each with its own barrier).  The producer issues the gathers of the next tile's half
    h as soon as it has copied this tile's half h out of the raw stage, so ~64 tokens of
    gathers are in flight while it copies the other half and while the consumers run
    the tile's wgmmas; it waits on a "consumed" barrier (both consumers arrive) before
    writing the K stage again.  One P slot is enough: warpgroup 0 writes P of tile c+1
    only after "ready" of tile c+1, which the producer signals only after both consumers
    released tile c (so warpgroup 1 has read P of tile c).
  * Tile: BLOCK_K = 64 tokens, 64 heads.  wgmma shapes: QK^T m64 n64 k576 / k512; P V
    m64 n256 k64 and m64 n(d_v - 256) k64.  K = 64 for P V: P's 64 bf16 columns are one
    128-byte swizzle row, the swizzle of the V tile (Mosaic GPU needs both operands'
    swizzles equal), which is why the tile is 64 tokens, as FlashMLA's.  On the GPU P V
    accumulates in place (``pl.run_state`` with ``ACC.init``); interpret mode does not
    simulate that, so there P V goes into a fresh accumulator that is then added
    (``interpreted``; the CUDA-lowering test covers the GPU branch).

Per-token gather, and why this way.  Hopper has no TMA gather (``cp.async.bulk.tensor``
gather4 is Blackwell-only; Mosaic GPU's indexed ``copy_gmem_to_smem`` lowers to it and so
needs sm_100); per-thread ``cp.async`` copies, which Mosaic GPU only uses below sm_90 and
does not offer with gathers, are not available either.  So: one TMA copy per token row, all of a 32-token
stage completing on one mbarrier (arrival count 32), so the producer never blocks per
token and the copy-out sees the stage through one wait.  The key is viewed as
``[s_kv, d_qk / 64, 64]`` so that one copy moves the whole 1152 B / 1024 B row (Mosaic GPU
requires each TMA copy to move a multiple of 128 bytes and at most 256 elements per
dimension: a [1, 9, 64] box satisfies both, where a [1, 576] box would not).  The stage's
32 indices come first, by one TMA copy into shared memory on their own barrier, so the
token loop reads each index from shared memory (~30 cycles) rather than from global memory
(~600 cycles, serialised before every issue).  The destination is a plain row-major raw
stage, not the K tile: a single-row TMA copy cannot target the (8, 64)-tiled, 128-byte
swizzled layout wgmma needs (a tiled destination takes whole 8-row tiles); the register
copy-out is also where invalid tokens become exact zeros, so NaN rows behind invalid
indices (an unused, uninitialised slot) never reach a dot product.

Shared memory per CTA (``smem_bytes``; Mosaic GPU aligns each allocation to 1 KiB):
  d_qk 576: Q 64x576x2 = 72 KiB; K 64x576x2 = 72 KiB; raw 2 x 32x576x2 = 72 KiB;
            P 64x64x2 = 8 KiB; one fp32 buffer for indices/bias/rescale/sink/lse/factor/
            max (7 x 64 x 4 = 1.75 -> 2 KiB); 9 mbarriers 72 B  ->  231,496 B = 226.1 KiB
            (<= 227 KiB = 232,448 B; checked by the CUDA lowering).  This is why P has one
            slot, the raw stages are half tiles, the small vectors share one allocation
            and the reduction scratch is 0 (the softmax reduces within warps): a full
            64-token raw stage or a second K stage does not fit.
  d_qk 512: Q 64 KiB; K 64 KiB; raw 64 KiB; P 8 KiB; 2 KiB; 72 B  ->  206,920 B = 202 KiB.
  The output reuses Q's buffer (warpgroup 1 writes its columns after warpgroup 0 signals
  that its last QK^T is done).

Expected fraction of roofline (unmeasured here; arithmetic, H200 = 4.3 TB/s copy,
~790 TFLOP/s bf16 dense, 132 SMs at ~1.9 GHz).  The benchmark shape (s_q 4096, h 128,
top-k 2048, d_qk 576): FLOPs = 2 x 4096 x 128 x 2048 x (576 + 512) = 2.34 TFLOP -> 2.96 ms
at 790 TFLOP/s; bytes = 4096 x 2048 x 1152 B = 9.7 GB if each query position's gathers
came from DRAM (2.25 ms), but s_kv = 8K keys are 9.4 MB and stay in the 50 MB L2, so the
kernel is compute-bound.  Per 64-token tile and CTA (one CTA per SM: 226 KiB of shared
memory): QK^T 2 x 64 x 64 x 576 = 4.7 MFLOP + P V 4.2 MFLOP -> ~1.5 us of tensor-core time
at 790/132 TFLOP/s per SM; the producer's copy-out (64 x 576 x 2 = 74 KB through
registers: ~0.6K shared-memory wavefronts each way, ~0.7 us) and the 64 TMA issues from
one thread (~0.5-1 us) overlap the consumers' wgmmas of the same tile only partly (one K
stage: the consumers wait for each copy-out).  Expected ~1.5 / (1.5 + 0.7) ~ 60-70 % of
the bf16 peak, ~470-550 TFLOP/s, at best (FlashMLA reports up to ~640 TFLOP/s for its
sm90 sparse prefill on H800).  The levers, in order: a second K stage (needs Q
in two halves or 32-token K tiles: the budget above is full), the copy-out spread over a
second producer warpgroup, the consumers' P V of tile c overlapping QK^T of tile c + 1.

CUDA lowering (``jax.export(..., platforms=["cuda"])``, no GPU needed; tested): Mosaic
GPU's Lane lowering semantics with explicit register layouts (the consumers' tiles in
``plgpu.Layout.WGMMA``; the producer's [32, 64] pieces in ``_raw_layout``: a lane holds 8
consecutive bf16 = 16 B of one token row, a warp 4 rows x 128 B, bank-conflict-free).
What this does not check: ptxas (registers, spills) and the run itself; the GPU check
script runs ``tests/test_kernel_gpu.py``, which compiles and runs this kernel.

Tested on CPU in GPU interpret mode (``plgpu.InterpretGPUParams``), which simulates shared
memory, TMA, mbarriers, wgmma and warpgroup races.  Letter key: T query positions, N
heads, H head dim, X top-k, K the tile's tokens, S key rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa

from pallas_kernels.fp8_cache import require
from pallas_kernels.mosaic_sparse_decode import accumulate, interpret_params

BLOCK_H = 64            # wgmma M: query heads per CTA
BLOCK_K = 64            # tokens per K tile (wgmma K of P V must be a multiple of 64)
HALF = 32               # tokens per raw (gather) stage; a tile's two halves = two stages
COL = 64                # key columns per gathered row piece (one 128-byte swizzle row)
V_CHUNK = 256           # value columns of consumer 0 (wgmma N <= 256)
SMEM_LIMIT = 227 * 1024
SUPPORTED = ((576, 512), (512, 512), (512, 448))     # (d_qk, d_v)
# Rows of the small fp32 shared-memory buffer (BLOCK_K == BLOCK_H == 64 entries each).
_IDX, _BIAS, _ALPHA, _SINK, _LSE, _FACTOR, _MAX = range(7)
_N_SMALL = 7
_BARRIERS = 9 * 8                                   # mbarriers, after the buffers


def _raw_layout(rows: int, cols: int):
  """Register layout of a [rows, cols] piece of a row-major raw stage: each warp takes 4
  token rows per 16 (8 lanes per row), each lane cols/8 consecutive elements."""
  return plgpu.Layout.TILED(
      mgpu_fa.Tiling(((rows, cols), (16, cols), (4, cols), (cols // 8,))),
      warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)


def smem_bytes(d: int, d_v: int) -> int:
  del d_v                                 # the value lives in the K tile
  q = BLOCK_H * d * 2
  k = BLOCK_K * d * 2
  raw = 2 * HALF * d * 2
  p = BLOCK_H * BLOCK_K * 2
  small = -(-_N_SMALL * BLOCK_H * 4 // 1024) * 1024   # allocations are 1 KiB aligned
  return q + k + raw + p + small + _BARRIERS


def sparse_prefill_mla_mosaic(lens_ref, scale_ref, q_ref, sink_ref, idx_ref, kv_ref, o_ref,
                              max_ref, lse_ref, *, d, d_v, n_rows, n_hb, interpreted,
                              brk=None):
  """Kernel body: one CTA = one query position x one 64-head block (see the module notes)."""
  # One flat grid axis, head block fastest: CUDA's grid x holds 2^31 - 1 CTAs where y and z
  # hold 65535 (a prefill's s_q can be larger), and neighbouring CTAs share a query row.
  cta = lax.axis_index("cta")
  t, hb = cta // n_hb, cta % n_hb
  length = lens_ref[t]
  n_tiles = jnp.minimum((length + BLOCK_K - 1) // BLOCK_K, idx_ref.shape[1] // BLOCK_K)
  heads = pl.ds(hb * BLOCK_H, BLOCK_H)

  def scoped(q_smem, p_smem, kbf, raw, small, raw_bar, idx_bar, ready, consumed, q_bar, p_bar,
             fin_bar):
    wg = lax.axis_index("wg")
    # One fp32 buffer for the small vectors (each shared-memory allocation is aligned to
    # 1 KiB, and d_qk 576 leaves ~1 KiB): row _IDX holds the two halves' indices (int32
    # bits: the kernel gets them bitcast to fp32), then the key bias, the rescale factors,
    # sink, lse, output factor and max_logits of the 64 heads.
    idx_smem = small.at[_IDX]
    bias_smem, alpha_smem = small.at[_BIAS], small.at[_ALPHA]
    as_int = lambda x: lax.bitcast_convert_type(x, jnp.int32)

    # ------------------------------------------------------------------ producer
    def gather(c, h):
      """TMA the key rows of tile c's half h into raw stage h (completes on raw_bar[h])."""
      base = c * BLOCK_K + h * HALF
      # The half's indices land in shared memory first (one copy, one wait), so the token
      # loop reads each index from SMEM instead of paying a global-memory latency per token.
      halfs = pl.ds(h * HALF, HALF)
      plgpu.copy_gmem_to_smem(idx_ref.at[t, pl.ds(base, HALF)], idx_smem.at[halfs],
                              idx_bar.at[h])
      plgpu.barrier_wait(idx_bar.at[h])

      @pl.loop(0, HALF)
      def _token(x):
        i = as_int(idx_smem[h * HALF + x])
        row = jnp.where((i >= 0) & (i < n_rows) & (base + x < length), i, 0)  # invalid: row 0
        plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], raw.at[h, pl.ds(x, 1)],
                                raw_bar.at[h])

    def copy_out(c, h):
      """Raw stage h -> rows [32h, 32h + 32) of the swizzled K tile, invalid tokens zeroed."""
      tile_l = _raw_layout(HALF, COL)
      row_l = tile_l.reduce(1)
      T = lambda x: plgpu.layout_cast(x, tile_l)
      R = lambda x: plgpu.layout_cast(x, row_l)
      idx_K = R(as_int(plgpu.load(idx_smem.at[pl.ds(h * HALF, HALF)], layout=row_l)))
      pos_K = (c * BLOCK_K + h * HALF
               + plgpu.broadcasted_iota(jnp.int32, (HALF,), 0, layout=row_l))
      valid_K = (idx_K >= 0) & (idx_K < n_rows) & (pos_K < length)
      if brk == "drop_key":
        valid_K = valid_K & (pos_K % BLOCK_K != 1)
      valid_K = R(valid_K)
      valid_KC = T(lax.broadcast_in_dim(valid_K, (HALF, COL), [0]))
      rows = pl.ds(h * HALF, HALF)
      for j in range(d // COL):
        piece = T(plgpu.load(raw.at[h, :, j], layout=tile_l))
        # A select, not a multiply: an invalid token's bytes (even NaN) never reach a dot.
        kbf[rows, pl.ds(j * COL, COL)] = T(jnp.where(valid_KC, piece, jnp.zeros_like(piece)))
      bias_smem[rows] = R(jnp.where(valid_K, jnp.zeros(valid_K.shape, jnp.float32),
                                    jnp.full(valid_K.shape, -jnp.inf, jnp.float32)))

    @pl.when(wg == 2)
    def _producer():
      for h in range(2):
        pl.when(n_tiles > 0)(functools.partial(gather, 0, h))

      @pl.loop(0, n_tiles)
      def _tile(c):
        for h in range(2):               # static h: static raw-stage slices
          plgpu.barrier_wait(raw_bar.at[h])
          if h == 0:
            @pl.when(c > 0)
            def _():
              plgpu.barrier_wait(consumed)   # the consumers released tile c - 1
          copy_out(c, h)
          plgpu.commit_smem()            # generic-proxy stores -> visible to wgmma and TMA
          if h == 1:
            plgpu.barrier_arrive(ready)
          pl.when(c + 1 < n_tiles)(functools.partial(gather, c + 1, h))

      # Observe the last "consumed" phase, so the barriers end balanced (and the CTA does
      # not retire while a consumer still reads the K tile).
      @pl.when(n_tiles > 0)
      def _drain():
        plgpu.barrier_wait(consumed)

    # ------------------------------------------------------------------ consumers
    # Warpgroup w accumulates value columns cols[w] (0:256, 256:d_v).  Warpgroup 0 also
    # computes the logits and the softmax and hands P and the rescale factors to
    # warpgroup 1 through shared memory (one slot: see the module notes).
    def consumer(w):
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      width = V_CHUNK if w == 0 else d_v - V_CHUNK
      cols = pl.ds(w * V_CHUNK, width)
      if w == 0:
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(sink_ref.at[heads], small.at[_SINK], q_bar)
        plgpu.barrier_wait(q_bar)
        scale = scale_ref[0]

      def step(c, carry):
        acc, m_N, l_N = carry
        if brk != "no_barrier":
          plgpu.barrier_wait(ready)
        if w == 0:
          def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, kbf.T)
            return acc_ref[...]
          s_NK = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, BLOCK_K), jnp.float32))
          bias_K = plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(0))
          s_NK = s_NK * scale + lax.broadcast_in_dim(bias_K, s_NK.shape, [1])
          m_new = jnp.maximum(m_N, jnp.max(s_NK, axis=1))
          m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)    # nothing seen yet: no inf - inf
          alpha = jnp.exp(m_N - m_safe)
          p_NK = jnp.exp(s_NK - lax.broadcast_in_dim(m_safe, s_NK.shape, [0]))
          l_N = l_N * alpha + jnp.sum(p_NK, axis=1)
          m_N = m_new
          p_smem[...] = p_NK.astype(jnp.bfloat16)
          alpha_smem[...] = alpha
          plgpu.commit_smem()            # visible to wgmma and to warpgroup 1
          plgpu.barrier_arrive(p_bar)
        else:
          plgpu.barrier_wait(p_bar)
          alpha = plgpu.load(alpha_smem, layout=row_layout)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p_smem, kbf.at[:, cols])
        acc = accumulate(acc, pv, interpreted)
        plgpu.barrier_arrive(consumed)
        return acc, m_N, l_N

      init = (plgpu.layout_cast(jnp.zeros((BLOCK_H, width), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), row_layout),
              plgpu.layout_cast(jnp.zeros((BLOCK_H,), jnp.float32), row_layout))
      acc, m_N, l_N = lax.fori_loop(0, n_tiles, step, init)

      if w == 0:
        live = l_N > 0
        l_safe = jnp.where(live, l_N, 1.0)
        lse = jnp.where(live, m_N + jnp.log(l_safe), 0.0)
        sink = plgpu.load(small.at[_SINK], layout=row_layout)
        factor = jnp.where(live, 1.0 / (l_safe * (1.0 + jnp.exp(sink - lse))), 0.0)
        small[_LSE] = jnp.where(live, lse, jnp.inf)
        small[_FACTOR] = factor
        small[_MAX] = m_N                # -inf when nothing was valid
        plgpu.commit_smem()
        # Q is dead from here on (its last QK^T is done): warpgroup 1 may write its
        # columns of the output into Q's buffer.
        plgpu.barrier_arrive(fin_bar)
      else:
        plgpu.barrier_wait(fin_bar)
        factor = plgpu.load(small.at[_FACTOR], layout=row_layout)
      out = acc * lax.broadcast_in_dim(factor, acc.shape, [0])
      q_smem[:, cols] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      # TMA needs a contiguous shared-memory source: a column range of the (8, 64)-tiled
      # buffer is contiguous only within each group of 8 rows.
      for g in range(BLOCK_H // 8):
        rows_g = pl.ds(g * 8, 8)
        plgpu.copy_smem_to_gmem(q_smem.at[rows_g, cols], o_ref.at[t, heads].at[rows_g, cols])
      if w == 0:
        plgpu.copy_smem_to_gmem(small.at[_LSE], lse_ref.at[t, heads])
        plgpu.copy_smem_to_gmem(small.at[_MAX], max_ref.at[t, heads])
      plgpu.wait_smem_to_gmem(0)

    for w in range(2):                 # static w: static shared-memory slices
      pl.when(wg == w)(functools.partial(consumer, w))

  swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  pl.run_scoped(
      scoped,
      plgpu.SMEM((BLOCK_H, d), jnp.bfloat16, transforms=swz),            # Q, then out
      plgpu.SMEM((BLOCK_H, BLOCK_K), jnp.bfloat16, transforms=swz),      # P
      plgpu.SMEM((BLOCK_K, d), jnp.bfloat16, transforms=swz),            # K tile
      # Raw stages are plain row-major (no transforms): each token row is written by its
      # own TMA copy, which a multi-row tiling would not allow.
      plgpu.SMEM((2, HALF, d // COL, COL), jnp.bfloat16),
      plgpu.SMEM((_N_SMALL, BLOCK_H), jnp.float32),    # indices, bias, alpha, sink, ...
      plgpu.Barrier(num_arrivals=HALF, num_barriers=2),   # one arrival per token copy
      plgpu.Barrier(num_arrivals=1, num_barriers=2),
      plgpu.Barrier(num_arrivals=1),                   # ready
      plgpu.Barrier(num_arrivals=2),                   # consumed: both consumers
      plgpu.Barrier(num_arrivals=2),                   # q + sink copies
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1),
      collective_axes="wg")


def check_supported(q, kv, d_v: int) -> None:
  """ValueError (before launch) for what this kernel does not cover."""
  d = q.shape[-1]
  require((d, d_v) in SUPPORTED,
          f"d_qk={d}, d_v={d_v}: impl='mosaic' sparse prefill covers (d_qk, d_v) in "
          f"{SUPPORTED} (two wgmma value accumulators of <= 256 columns; use impl='pallas')")
  require(kv.shape[0] >= 1, f"kv shape={kv.shape}: impl='mosaic' needs s_kv >= 1")
  ctas = q.shape[0] * -(-q.shape[1] // BLOCK_H)
  require(ctas < 2 ** 31, f"q shape={q.shape}: impl='mosaic' runs s_q x ceil(h_q / 64) = "
          f"{ctas} CTAs, expected < 2^31 (split the query rows)")
  need = smem_bytes(d, d_v)
  require(need <= SMEM_LIMIT, f"shared memory {need} B > {SMEM_LIMIT} B per CTA")


def supports(args: dict, d_v: int) -> bool:
  """Whether this kernel covers the validated ``args`` (``check_supported`` passes)."""
  try:
    check_supported(args["q"], args["kv"], d_v)
  except ValueError:
    return False
  return True


def sparse_prefill(args: dict, d_v: int, interpret=None):
  """``sparse_prefill(..., impl="mosaic")`` on the validated ``args`` (ValueError first)."""
  check_supported(args["q"], args["kv"], d_v)
  return run(**args, d_v=d_v, interpret=interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("d_v", "interpret", "_break"))
def run(q, kv, indices, sm_scale, attn_sink, topk_length, *, d_v, interpret=None,
        _break=None):
  """The Mosaic GPU kernel on validated arguments (``sparse_prefill_mla_mosaic``).

  ``interpret``: None = real kernel; an ``InterpretGPUParams`` = GPU interpret mode (CPU).
  ``_break`` (tests only): "drop_key" drops each tile's second key, "no_barrier" removes
  the consumers' wait on the producer's "ready" barrier; the tests check that both fail.  Returns out bf16 ``[s_q, h_q, d_v]``, max_logits and lse fp32 ``[s_q, h_q]``.
  """
  s_q, h_q, d = q.shape
  s_kv = kv.shape[0]
  n_hb = -(-h_q // BLOCK_H)
  hp = n_hb * BLOCK_H
  q_TNH = jnp.pad(q, ((0, 0), (0, hp - h_q), (0, 0)))
  sink_N = jnp.pad(attn_sink.astype(jnp.float32), (0, hp - h_q), constant_values=-jnp.inf)
  idx_TX = indices[:, 0, :]
  pad = -idx_TX.shape[-1] % BLOCK_K
  if pad:
    idx_TX = jnp.pad(idx_TX, ((0, 0), (0, pad)), constant_values=-1)
  kv_SJC = kv.reshape(s_kv, d // COL, COL)          # a bitcast: one [1, d/64, 64] TMA box per row
  kernel = functools.partial(sparse_prefill_mla_mosaic, d=d, d_v=d_v, n_rows=s_kv, n_hb=n_hb,
                             interpreted=interpret is not None, brk=_break)
  out, max_logits, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((s_q, hp, d_v), jnp.bfloat16),
                jax.ShapeDtypeStruct((s_q, hp), jnp.float32),
                jax.ShapeDtypeStruct((s_q, hp), jnp.float32)),
      grid=(s_q * n_hb,), grid_names=("cta",), num_threads=3, thread_name="wg",
      # No cross-warp reductions (the softmax reduces within warps): no reduction scratch,
      # whose default 2 KiB would not fit beside the d_qk 576 tiles.
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           reduction_scratch_bytes=0),
      interpret=interpret)(topk_length, sm_scale.reshape(1), q_TNH, sink_N,
                           lax.bitcast_convert_type(idx_TX, jnp.float32), kv_SJC)
  return out[:, :h_q], max_logits[:, :h_q], lse[:, :h_q]
