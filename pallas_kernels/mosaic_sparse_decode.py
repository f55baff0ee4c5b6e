"""FP8 sparse decode attention as a Hopper-native (sm_90a) Pallas Mosaic GPU kernel.

``run`` is what ``sparse_decode(..., impl="mosaic")`` calls after its argument checks; the
semantics are those of ``sparse_decode`` (FlashMLA's ``flash_mla_with_kvcache`` with
``indices``): per query row, one softmax over the selected tokens of the main cache and of
the optional extra cache, attention sink, ``topk_length`` / ``extra_topk_length``, index -1
= invalid, out bf16 ``[b, s_q, h_q, d_v]`` and lse ``[b, h_q, s_q]``.

Design (after FlashMLA's ``sm90/decode/sparse_fp8`` kernel, not a port of our Triton tiling):

  * One CTA per (query row, 64-head block): grid ``(b * s_q, ceil(h_q / 64))``, heads padded
    to 64 (wgmma's M).  Two warpgroups (``num_threads=2``):
      - warpgroup 1, the producer: gathers the selected tokens' FP8 bytes with TMA into raw
        shared-memory stages, then dequantises each tile on chip (registers) into a bf16
        K tile in swizzled shared memory, zeroing invalid tokens, and signals "ready";
      - warpgroup 0, the consumer: keeps its 64 query heads resident in shared memory (one
        TMA at the start), and per K tile runs ``S = Q K^T`` (one wgmma, K = d_qk), the
        online softmax in fp32 registers, and ``O += P V`` (one wgmma, N = d_v = 512, the
        value being the first 512 columns of the same bf16 tile: one load serves both).
    The dequantised cache never exists in HBM: each tile lives in shared memory only.
  * Pipeline: 2 raw (FP8) stages and 2 bf16 stages; the producer issues the gathers of tile
    c+1 before dequantising tile c, and waits on a "consumed" barrier before overwriting a
    bf16 stage.  Main-cache tiles then extra-cache tiles form one chunk list.
  * Tile: BLOCK_K = 32 tokens, 64 heads.  wgmma shapes: QK^T m64 n32 k576 (v32) / k512
    (model1); PV m64 n512 k32.
  * h_q = 128 runs as two CTAs of 64 heads that are neighbours in the grid (the head-block
    axis is the fastest), so the second one's gathers of the same tokens hit L2; a single
    CTA holding 128 heads of a 576-dim query (147 KB) plus its K stages does not fit in
    227 KB.

Per-token gather: what Mosaic GPU offers on Hopper, and why this choice.  Hopper has no TMA
gather (``cp.async.bulk.tensor`` gather4 is Blackwell-only; Mosaic GPU's indexed
``copy_gmem_to_smem`` lowers to it and so needs sm_100).  The options left are one TMA copy
per token row, or ``cp.async`` (Mosaic GPU uses it only below sm_90 and then without
barriers).  We issue one TMA copy per token and array, all completing on one mbarrier
(its arrival count = the number of copies), so the producer never blocks per token and the
consumer sees a whole tile through one wait.  Mosaic GPU requires each TMA copy to move a
multiple of 128 bytes, which shapes the gathers:
  v32:    NoPE 512 B (one copy), RoPE 128 B, scales: a 128 B window starting at the
          token's 4 fp32 scales (32 fp32; the token's scales are the first 4);
  model1: NoPE 448 B = two overlapping 256 B copies (bytes [0, 256) and [192, 448), both
          inside the token, so no other token's bytes are fetched; tiles 4-6 sit at SMEM
          columns 320-511), RoPE 128 B, scales: a 128 B window from the token's 7 ue8m0
          bytes.
  The scale windows over-fetch: DRAM moves the 32 B sectors the window touches (4-5)
  instead of one, ~+100 B per token.  Bytes per token actually read: v32 ~656 + 96 = 752,
  model1 ~584 + 112 = 696.  (Fix for later: a cache layout with each token's scales beside
  its RoPE, as one 128 B-multiple row.)

Shared memory per CTA (BLOCK_K = 32, 2 + 2 stages):
  v32:    Q 64x576x2 = 73.7 KB; bf16 K 2 x 32x576x2 = 73.7 KB; raw 2 x 32 x (512 + 128 + 128)
          = 49.2 KB; index/bias/sink/lse < 1 KB  ->  ~197 KB  (<= 227 KB)
  model1: Q 65.5 KB; bf16 K 65.5 KB; raw 2 x 32 x (512 + 128 + 128) = 49.2 KB -> ~181 KB
  The output reuses Q's buffer (Q is dead after the last QK^T).

Expected fraction of roofline (unmeasured: no GPU was lent; arithmetic, H200 = 4.3 TB/s
copy, ~790 TFLOP/s bf16).  FlashMLA's V32 shape (b 128, s_q 2, h 128, top-k 2048): FLOPs =
2 x 128 x 2 x 128 x 2048 x (576 + 512) = 292 GFLOP; bytes = 256 rows x 2048 x 752 B x 2 head
blocks (the second from L2, so ~1x from DRAM) = 394 MB -> 92 us at 4.3 TB/s, vs 370 us of
tensor-core time at 790 TFLOP/s: compute-bound, so the bound is the wgmma rate.  This
design serialises dequant (producer) against wgmma (consumer) only through 2-deep stages,
with one consumer warpgroup per CTA (FlashMLA uses two, splitting the value columns) and a
per-token TMA issue loop of 32 x 3-4 copies per tile; we expect 35-50 % of the bf16 peak,
~280-400 TFLOP/s on H200, against the issue's 330 TFLOP/s target — to be measured.  At
small batch the grid (b x s_q x h_q/64 CTAs) under-fills 132 SMs and there is no split-KV
here yet (see ``run``), so expect far less there.

Tested on CPU in GPU interpret mode (``plgpu.InterpretGPUParams``), which simulates shared
memory, TMA, mbarriers, wgmma and warpgroup races.  Letter key: R query rows (b * s_q), N
heads, H head dim, X top-k, K the tile's tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_cache import D_ROPE, require

BLOCK_H = 64            # wgmma M: query heads per CTA
BLOCK_K = 32            # tokens per tile
RAW_STAGES = 2
K_STAGES = 2
SMEM_LIMIT = 227 * 1024
_WINDOW = 128           # bytes per TMA scale window (Mosaic GPU's TMA granularity)


def geometry(fmt: str):
  """(d_qk, d_nope, scale tile width, scale count, NoPE copies as (src byte, smem byte, n))."""
  if fmt == "v32":
    return 576, 512, 128, 4, ((0, 0, 512),)
  return 512, 448, 64, 7, ((0, 0, 256), (192, 256, 256))


def _nope_smem_col(fmt: str, t: int, width: int) -> int:
  # model1 tiles 4..6 (bytes 256..447) were copied by the second window to SMEM 256 + (b - 192).
  col = t * width
  return col if (fmt == "v32" or col < 256) else col + 64


def smem_bytes(fmt: str, d_v: int) -> int:
  d, *_ = geometry(fmt)
  q = BLOCK_H * d * 2
  k = K_STAGES * BLOCK_K * d * 2
  raw = RAW_STAGES * BLOCK_K * (512 + 2 * D_ROPE + _WINDOW)
  small = BLOCK_H * BLOCK_K * 2 + RAW_STAGES * BLOCK_K * 4 + K_STAGES * BLOCK_K * 4 + 2 * BLOCK_H * 4
  return q + k + raw + small


def sparse_decode_mla_mosaic(lens_ref, scale_ref, q_ref, sink_ref, idx_ref, nope_ref, rope_ref, sc_ref, *rest,
            fmt, d_v, has_extra, s_q, n_main_rows, n_extra_rows, brk=None):
  if has_extra:
    elens_ref, eidx_ref, enope_ref, erope_ref, esc_ref, o_ref, lse_ref = rest
  else:
    o_ref, lse_ref = rest
  d, d_nope, width, n_sc, nope_copies = geometry(fmt)
  r = lax.axis_index("row")
  hb = lax.axis_index("hb")
  b = r // s_q
  length = lens_ref[b]
  n_main = (length + BLOCK_K - 1) // BLOCK_K
  n_total = n_main
  if has_extra:
    elength = elens_ref[b]
    n_total = n_main + (elength + BLOCK_K - 1) // BLOCK_K
  copies_per_token = len(nope_copies) + 2

  def scoped(q_smem, p_smem, kbf, nope_raw, rope_raw, sc_raw, idx_smem, bias_smem, vec_smem,
             raw_bar, ready, consumed, q_bar):
    wg = lax.axis_index("wg")

    # ------------------------------------------------------------------ producer
    def gather(c, rs, cache_idx, cache_nope, cache_rope, cache_sc, cc, clen, rows):
      plgpu.copy_gmem_to_smem(cache_idx.at[r, pl.ds(cc * BLOCK_K, BLOCK_K)], idx_smem.at[rs],
                              raw_bar.at[rs])

      @pl.loop(0, BLOCK_K)
      def _token(x):
        pos = cc * BLOCK_K + x
        i = cache_idx[r, pos]
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
      rs = c % RAW_STAGES
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
      rs, ks = c % RAW_STAGES, c % K_STAGES
      is_main = c < n_main
      cc = jnp.where(is_main, c, c - n_main)
      clen = jnp.where(is_main, length, elength) if has_extra else length
      rows = jnp.where(is_main, n_main_rows, n_extra_rows) if has_extra else n_main_rows
      idx_K = idx_smem[rs]
      pos_K = cc * BLOCK_K + lax.broadcasted_iota(jnp.int32, (BLOCK_K,), 0)
      valid_K = (idx_K >= 0) & (idx_K < rows) & (pos_K < clen)
      if brk == "drop_key":
        valid_K = valid_K & (pos_K % BLOCK_K != 0)
      valid_KW = lax.broadcast_in_dim(valid_K, (BLOCK_K, width), [0])
      win = sc_raw[rs]
      col = lax.broadcasted_iota(jnp.int32, win.shape, 1)
      for t in range(d_nope // width):
        codes = nope_raw[rs, :, pl.ds(_nope_smem_col(fmt, t, width), width)].astype(jnp.float32)
        if fmt == "v32":
          s_K = jnp.sum(jnp.where(col == t, win, 0.0), axis=1)
        else:
          e_K = jnp.sum(jnp.where(col == t, win.astype(jnp.int32), 0), axis=1)
          s_K = lax.bitcast_convert_type(e_K << 23, jnp.float32)
          s_K = jnp.where(e_K == 255, jnp.float32(jnp.nan), s_K)
        # Exact: e4m3 codes and power-of-two scales (v32 bf16(fp32(q)*s); model1
        # bf16(bf16(q)*bf16(s)) gives the same bits since both factors are exact in bf16).
        k_KW = (codes * lax.broadcast_in_dim(s_K, (BLOCK_K, width), [0])).astype(jnp.bfloat16)
        kbf[ks, :, pl.ds(t * width, width)] = jnp.where(valid_KW, k_KW, jnp.bfloat16(0))
      rope = rope_raw[rs]
      kbf[ks, :, pl.ds(d_nope, D_ROPE)] = jnp.where(
          lax.broadcast_in_dim(valid_K, (BLOCK_K, D_ROPE), [0]), rope, jnp.bfloat16(0))
      bias_smem[ks] = jnp.where(valid_K, 0.0, -jnp.inf).astype(jnp.float32)

    @pl.when(wg == 1)
    def _producer():
      @pl.when(n_total > 0)
      def _():
        issue(0)

      @pl.loop(0, n_total)
      def _tile(c):
        @pl.when(c + 1 < n_total)
        def _():
          issue(c + 1)
        plgpu.barrier_wait(raw_bar.at[c % RAW_STAGES])

        @pl.when(c >= K_STAGES)
        def _():
          plgpu.barrier_wait(consumed.at[c % K_STAGES])
        dequant(c)
        plgpu.commit_smem()            # generic-proxy stores -> visible to wgmma
        plgpu.barrier_arrive(ready.at[c % K_STAGES])

      # Observe the last "consumed" phases, so the barriers end balanced (and the CTA does
      # not retire while the consumer still reads a stage).
      @pl.loop(jnp.maximum(n_total - K_STAGES, 0), n_total)
      def _drain(c):
        plgpu.barrier_wait(consumed.at[c % K_STAGES])

    # ------------------------------------------------------------------ consumer
    @pl.when(wg == 0)
    def _consumer():
      plgpu.copy_gmem_to_smem(q_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)], q_smem, q_bar)
      plgpu.copy_gmem_to_smem(sink_ref.at[pl.ds(hb * BLOCK_H, BLOCK_H)], vec_smem.at[0], q_bar)
      plgpu.barrier_wait(q_bar)
      scale = scale_ref[0]

      def step(c, carry):
        acc, m_N, l_N = carry
        ks = c % K_STAGES
        if brk != "no_barrier":
          plgpu.barrier_wait(ready.at[ks])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, kbf.at[ks].T)
          return acc_ref[...]
        s_NK = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, BLOCK_K), jnp.float32))
        bias_K = bias_smem[ks]
        s_NK = s_NK * scale + lax.broadcast_in_dim(bias_K, s_NK.shape, [1])
        m_new = jnp.maximum(m_N, jnp.max(s_NK, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)      # nothing seen yet: no inf - inf
        alpha = jnp.exp(m_N - m_safe)
        p_NK = jnp.exp(s_NK - lax.broadcast_in_dim(m_safe, s_NK.shape, [0]))
        l_N = l_N * alpha + jnp.sum(p_NK, axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        # P V into a fresh accumulator, then added: ``pl.run_state(...)(ACC.init(acc))``
        # (in-place accumulation, one register add fewer) is not simulated by interpret mode.
        # P goes through shared memory (wgmma's A may come from registers on the GPU, but
        # interpret mode simulates only shared-memory operands; 4 KB).
        p_smem[...] = p_NK.astype(jnp.bfloat16)
        plgpu.commit_smem()

        def pv(pv_ref):
          plgpu.wgmma(pv_ref, p_smem, kbf.at[ks, :, pl.ds(0, d_v)])
          return pv_ref[...]
        acc = acc + pl.run_scoped(pv, plgpu.ACC((BLOCK_H, d_v), jnp.float32))
        plgpu.barrier_arrive(consumed.at[ks])
        return acc, m_new, l_N

      init = (jnp.zeros((BLOCK_H, d_v), jnp.float32),
              jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK_H,), jnp.float32))
      acc, m_N, l_N = lax.fori_loop(0, n_total, step, init)

      live = l_N > 0
      l_safe = jnp.where(live, l_N, 1.0)
      lse = jnp.where(live, m_N + jnp.log(l_safe), 0.0)
      sink = vec_smem[0]
      factor = jnp.where(live, 1.0 / (l_safe * (1.0 + jnp.exp(sink - lse))), 0.0)
      out = acc * lax.broadcast_in_dim(factor, acc.shape, [0])
      q_smem[:, pl.ds(0, d_v)] = out.astype(jnp.bfloat16)
      vec_smem[1] = jnp.where(live, lse, jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[:, pl.ds(0, d_v)],
                              o_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)])
      plgpu.copy_smem_to_gmem(vec_smem.at[1], lse_ref.at[r, pl.ds(hb * BLOCK_H, BLOCK_H)])
      plgpu.wait_smem_to_gmem(0)

  swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  sc_dtype = sc_ref.dtype
  win = _WINDOW // jnp.dtype(sc_dtype).itemsize
  pl.run_scoped(
      scoped,
      plgpu.SMEM((BLOCK_H, d), jnp.bfloat16, transforms=swz),
      plgpu.SMEM((BLOCK_H, BLOCK_K), jnp.bfloat16,
                 transforms=(plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(2 * BLOCK_K))),
      plgpu.SMEM((K_STAGES, BLOCK_K, d), jnp.bfloat16, transforms=swz),
      plgpu.SMEM((RAW_STAGES, BLOCK_K, 512), jnp.float8_e4m3fn),
      plgpu.SMEM((RAW_STAGES, BLOCK_K, D_ROPE), jnp.bfloat16),
      plgpu.SMEM((RAW_STAGES, BLOCK_K, win), sc_dtype),
      plgpu.SMEM((RAW_STAGES, BLOCK_K), jnp.int32),
      plgpu.SMEM((K_STAGES, BLOCK_K), jnp.float32),
      plgpu.SMEM((2, BLOCK_H), jnp.float32),
      plgpu.Barrier(num_arrivals=1 + BLOCK_K * copies_per_token, num_barriers=RAW_STAGES),
      plgpu.Barrier(num_arrivals=1, num_barriers=K_STAGES),
      plgpu.Barrier(num_arrivals=1, num_barriers=K_STAGES),
      plgpu.Barrier(num_arrivals=2),
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
  require(cache.fmt in ("v32", "model1"),
          f"k_cache format {cache.fmt!r}: impl='mosaic' sparse decode reads the FP8 formats "
          "'v32' or 'model1' (use impl='pallas' or 'xla' for a bf16 cache)")
  d_nope = d_qk - D_ROPE
  require(head_dim_v in (d_nope, d_qk) and head_dim_v % 64 == 0,
          f"head_dim_v={head_dim_v}: impl='mosaic' needs {d_nope} or {d_qk} (whole 64-column "
          "tiles of the key)")
  need = smem_bytes(cache.fmt, head_dim_v)
  require(need <= SMEM_LIMIT, f"shared memory {need} B > {SMEM_LIMIT} B per CTA")


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
  """None/True/False/params -> GPU interpret params or None (real kernel).

  None means: interpret when the default backend is the CPU."""
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def sparse_decode(args: dict, head_dim_v: int, interpret=None):
  """``sparse_decode(..., impl="mosaic")`` on the validated ``args`` (ValueError first)."""
  check_supported(args["cache"], args["q"].shape[-1], head_dim_v)
  return run(**args, head_dim_v=head_dim_v, interpret=interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("head_dim_v", "interpret", "_break"))
def run(q, cache, indices, topk_length, attn_sink, softmax_scale, extra_cache=None,
        extra_indices=None, extra_topk_length=None, *, head_dim_v, interpret=None,
        _break=None):
  """The Mosaic GPU kernel on validated arguments (``sparse_decode_mla_mosaic``).

  ``interpret``: None = real kernel; an ``InterpretGPUParams`` = GPU interpret mode (CPU).
  ``_break`` (tests only): "drop_key" drops each tile's first key, "no_barrier" removes the
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
      has_extra=has_extra, s_q=s_q,
      n_main_rows=cache.num_tokens, n_extra_rows=extra_cache.num_tokens if has_extra else 0)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((rows, hp, head_dim_v), jnp.bfloat16),
                jax.ShapeDtypeStruct((rows, hp), jnp.float32)),
      grid=(rows, n_hb), grid_names=("row", "hb"), num_threads=2, thread_name="wg",
      interpret=interpret)(*operands)
  out = out[:, :h_q].reshape(b, s_q, h_q, head_dim_v)
  lse = lse[:, :h_q].reshape(b, s_q, h_q)
  return out, jnp.transpose(lse, (0, 2, 1))
