"""Pallas Mosaic GPU (Hopper) attention kernels == their plain-jnp references, in GPU
interpret mode on the CPU (``plgpu.InterpretGPUParams``: simulated shared memory, TMA,
mbarriers, wgmma, warpgroup threads, optional race detection).

Interpret mode costs roughly (CTAs x tiles x per-token TMA copies), so the cases are few and
small but keep the real 576/512 geometries, pages of 61 tokens, top-k and lengths that are
not multiples of the 64-token tile, heads padded to the 64-head wgmma block (4 and 16 heads)
and one two-block case (128 heads), NaN bytes in every slot the kernel may touch but must
not use, -1 indices, an empty query row, sink values -inf/finite/+inf, the extra cache, and
split-KV (4 splits of 3 tiles, one empty; race detector on).  Beside them: the real kernel
lowers for CUDA without a GPU (both geometries, and with splits), the split scheduler's
choice at FlashMLA-like shapes, and
``impl="auto"`` routes to it on a (faked) Hopper device.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import mosaic_sparse_decode as msd
from pallas_kernels.sparse_decode import validate_sparse_decode_args
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret

D = {"v32": 576, "model1": 512}
DV = 512
PAGE = 61


def _nan_rows(cache: pk.KCache, rows: np.ndarray) -> pk.KCache:
  """Cache with NaN bytes (codes, RoPE and scales) at flat token rows ``rows``."""
  z, y = cache.num_blocks, cache.block_size
  def fill(a, value):
    flat = a.reshape(z * y, a.shape[-1])
    return flat.at[rows].set(value).reshape(a.shape)
  nan_scale = jnp.float32(jnp.nan) if cache.fmt == "v32" else jnp.uint8(0xFF)
  return dataclasses.replace(
      cache, nope=fill(cache.nope, jnp.float8_e4m3fn(jnp.nan)),
      rope=fill(cache.rope, jnp.bfloat16(jnp.nan)), scales=fill(cache.scales, nan_scale))


def _cache(rng, fmt, blocks, block_size, used):
  x = rng.standard_normal((blocks, block_size, 1, D[fmt])).astype(ml_dtypes.bfloat16)
  cache = pk.KCache.from_bf16(jnp.asarray(x), fmt)
  unused = np.setdiff1d(np.arange(blocks * block_size), used)
  return _nan_rows(cache, unused)


def _case(fmt, b, s_q, h, topk, *, lengths=None, extra=None, sink=False, seed=0):
  """Random case whose referenced tokens are finite and every other token (including row 0,
  the row an invalid index is clamped to) is NaN."""
  rng = np.random.default_rng(seed)
  n_tok = 3 * PAGE
  used = rng.choice(np.arange(1, n_tok), size=n_tok // 2, replace=False)
  idx = rng.choice(used, size=(b, s_q, topk)).astype(np.int32)
  idx[..., ::7] = -1                                        # scattered invalid entries
  if lengths is not None:                                   # entries past the length: NaN rows
    for bi, n in enumerate(lengths):
      idx[bi, :, n:] = rng.choice(np.setdiff1d(np.arange(n_tok), used), size=idx[bi, :, n:].shape)
  if s_q > 1:
    idx[0, 1] = -1                                          # an empty query row (if no extra)
  kw = dict(topk_length=None if lengths is None else jnp.asarray(lengths, jnp.int32))
  cache = _cache(rng, fmt, 3, PAGE, used[used < n_tok])
  if extra is not None:
    e_blocks, e_bs, e_topk, e_lengths = extra
    e_used = rng.choice(np.arange(1, e_blocks * e_bs), size=e_blocks * e_bs // 2, replace=False)
    e_idx = rng.choice(e_used, size=(b, s_q, e_topk)).astype(np.int32)
    e_idx[..., 1::5] = -1
    kw.update(extra_k_cache=_cache(rng, fmt, e_blocks, e_bs, e_used),
              extra_indices_in_kvcache=jnp.asarray(e_idx),
              extra_topk_length=jnp.asarray(e_lengths, jnp.int32))
  if sink:
    s = rng.standard_normal(h).astype(np.float32)
    s[0], s[-1] = -np.inf, np.inf
    kw["attn_sink"] = jnp.asarray(s)
  q = jnp.asarray(rng.standard_normal((b, s_q, h, D[fmt])).astype(ml_dtypes.bfloat16))
  return q, cache, jnp.asarray(idx), kw


def _check(out, lse, ref_out, ref_lse):
  out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
  assert np.isfinite(out).all()
  # P is rounded to bf16 before P V (as FlashMLA) and out is bf16: a few bf16 ulps (2^-8).
  np.testing.assert_allclose(out, ref_out, atol=2e-2, rtol=2e-2)
  # lse: fp32 logits of bf16 products, summed in another order: fp32 rounding only.
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def _run(q, cache, idx, kw, params, brk=None):
  args = validate_sparse_decode_args(q, cache, idx, head_dim_v=DV, **kw)
  try:
    return msd.run(**args, head_dim_v=DV, interpret=params, _break=brk)
  except Exception:
    mgpu_interpret.reset_gpu_interpret_mode_state()
    raise


RACES = plgpu.InterpretGPUParams(detect_races=True)


def test_sparse_decode_model1_extra_sink_lengths_no_races():
  """model1, 4 heads (padded to 64), s_q 2 with an empty row, top-k 40 with lengths, extra
  cache (pages of 5) with its own lengths, sink -inf/finite/+inf; race detector on."""
  q, cache, idx, kw = _case("model1", 1, 2, 4, 40, lengths=[37], extra=(4, 5, 20, [13]),
                            sink=True)
  out, lse = _run(q, cache, idx, kw, RACES)
  assert not mgpu_interpret.get_races().races_found
  ref_out, ref_lse = pk.sparse_decode_reference(q, cache, idx, head_dim_v=DV, **kw)
  _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("h", [2, 16, 128])
def test_sparse_decode_v32(h):
  """v32 (576-dim keys, fp32 scales): batch 2 / top-k 150 (three 64-token tiles through the
  one-stage pipeline) / 16 heads; 2 heads (padded to 64) and 128 heads = two 64-head CTAs,
  each with an empty row (s_q 2, one tile)."""
  b, s_q, topk = (2, 1, 150) if h == 16 else (1, 2, 33)     # 150: three tiles, the last partial
  q, cache, idx, kw = _case("v32", b, s_q, h, topk, seed=1)
  out, lse = _run(q, cache, idx, kw, plgpu.InterpretGPUParams())
  ref_out, ref_lse = pk.sparse_decode_reference(q, cache, idx, head_dim_v=DV, **kw)
  _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("brk", ["drop_key", "no_barrier"])
def test_broken_sparse_decode_fails(brk):
  """The test can fail: a kernel that drops one key per tile gives a wrong output; one
  whose consumer skips the "ready" barrier races with the producer (reported by the race
  detector, or reading stale tiles)."""
  q, cache, idx, kw = _case("model1", 1, 1, 4, 40, seed=2)
  ref_out, ref_lse = pk.sparse_decode_reference(q, cache, idx, head_dim_v=DV, **kw)
  try:
    out, lse = _run(q, cache, idx, kw, RACES, brk=brk)
  except Exception as e:          # the interpreter caught it (e.g. a barrier phase never waited)
    assert brk == "no_barrier", e
    return
  raced = mgpu_interpret.get_races().races_found
  mgpu_interpret.reset_gpu_interpret_mode_state()          # clear the recorded races
  with pytest.raises(AssertionError):
    assert not raced
    _check(out, lse, ref_out, ref_lse)


def test_mosaic_bad_input():
  """ValueErrors before launch; these also show sparse_decode routes impl="mosaic" here."""
  q, cache, idx, kw = _case("model1", 1, 1, 4, 40, seed=3)
  bf16 = pk.KCache.from_bf16(cache.to_bf16(), "bf16")
  with pytest.raises(ValueError, match="impl='mosaic'.*FP8"):
    pk.sparse_decode(q, bf16, idx, head_dim_v=DV, impl="mosaic")
  with pytest.raises(ValueError, match="head_dim_v=256"):
    pk.sparse_decode(q, cache, idx, head_dim_v=256, impl="mosaic")
  with pytest.raises(ValueError, match="impl='mosaic' reads a KCache"):
    pk.sparse_decode(q, cache.to_packed_bytes(), idx, head_dim_v=DV, impl="mosaic")
  with pytest.raises(ValueError, match="interpret='yes': expected"):
    pk.sparse_decode(q, cache, idx, head_dim_v=DV, impl="mosaic", interpret="yes")
  with pytest.raises(ValueError, match="impl='bogus'"):
    pk.sparse_decode(q, cache, idx, head_dim_v=DV, impl="bogus")


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_sparse_decode_lowers_for_cuda(fmt):
  """The real (non-interpreted) kernel lowers for CUDA on a machine without a GPU: Mosaic GPU
  runs its layout assignment, TMA and wgmma lowering here, so an unsupported layout, TMA box
  or shared-memory view fails this test (within seconds, shapes are tiny)."""
  d = D[fmt]
  cache, extra = pk.KCache.empty(3, PAGE, fmt, d), pk.KCache.empty(4, 5, fmt, d)
  q = jnp.zeros((1, 2, 128, d), jnp.bfloat16)                 # two 64-head blocks
  idx = jnp.zeros((1, 2, 100), jnp.int32)
  lens = jnp.zeros((1,), jnp.int32)
  f = lambda q, c, i, l, e, ei, el, s: pk.sparse_decode(
      q, c, i, head_dim_v=DV, attn_sink=s, topk_length=l, extra_k_cache=e,
      extra_indices_in_kvcache=ei, extra_topk_length=el, impl="mosaic", interpret=False)
  exp = jax.export.export(jax.jit(f), platforms=["cuda"])(
      q, cache, idx, lens, extra, idx[..., :20], lens, jnp.zeros((128,), jnp.float32))
  txt = exp.mlir_module()
  assert txt.count("custom_call @mosaic_gpu") == 1, "expected one Mosaic GPU kernel"


def test_sparse_decode_split_kv_lowers_for_cuda():
  """Split-KV (fp32 partials stored from registers, lse by TMA, no sink in the kernel)
  lowers for CUDA too; the combine runs after the one kernel."""
  d = D["model1"]
  cache, extra = pk.KCache.empty(3, PAGE, "model1", d), pk.KCache.empty(4, 5, "model1", d)
  q = jnp.zeros((1, 2, 128, d), jnp.bfloat16)
  idx, lens = jnp.zeros((1, 2, 100), jnp.int32), jnp.zeros((1,), jnp.int32)
  f = lambda q, c, i, l, e, ei, el, s: pk.sparse_decode(
      q, c, i, head_dim_v=DV, attn_sink=s, topk_length=l, extra_k_cache=e,
      extra_indices_in_kvcache=ei, extra_topk_length=el, impl="mosaic", interpret=False,
      tuning=pk.KernelTuning(num_splits=3))
  exp = jax.export.export(jax.jit(f), platforms=["cuda"])(
      q, cache, idx, lens, extra, idx[..., :20], lens, jnp.zeros((128,), jnp.float32))
  assert exp.mlir_module().count("custom_call @mosaic_gpu") == 1, "expected one Mosaic GPU kernel"


@pytest.mark.parametrize("b,expect_split", [(1, True), (2, True), (8, True), (128, False)])
def test_sparse_decode_split_scheduler(b, expect_split):
  """The scheduler (no kernel runs) at FlashMLA-like shapes on 132 SMs: h 128, s_q 2,
  top-k 2048 + extra 512.  Small batch (4-32 CTAs) splits, since filling the SMs beats
  the fp32 partials' bytes; b 128 (512 CTAs, ~4 waves) does not."""
  q = jax.ShapeDtypeStruct((b, 2, 128, 576), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((b, 2, 2048), jnp.int32)
  extra = jax.ShapeDtypeStruct((b, 2, 512), jnp.int32)
  s = msd.choose_splits(q, "v32", idx, extra, None)
  assert (s > 1) == expect_split, s
  assert 1 <= s <= (2048 + 512) // 64
  assert msd.choose_splits(q, "v32", idx, extra, pk.KernelTuning(num_splits=5)) == 5


def test_sparse_decode_auto_picks_mosaic_on_hopper(monkeypatch):
  """impl="auto" on a (faked) compute-capability-9.0 GPU runs the Mosaic kernel for the FP8
  caches and the Triton kernel where Mosaic does not cover the case (a bf16 cache); the
  kernels themselves are stubbed (only the routing is under test)."""
  import importlib
  sd = importlib.import_module("pallas_kernels.sparse_decode")    # the module, not the function
  ran = []
  monkeypatch.setattr(msd, "run", lambda **kw: ran.append("mosaic"))
  monkeypatch.setattr(sd, "_pallas_core", lambda **kw: ran.append("pallas"))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [type("H200", (), {"compute_capability": "9.0"})])
  q, cache, idx, kw = _case("model1", 1, 1, 4, 40, seed=3)
  bf16 = pk.KCache.from_bf16(cache.to_bf16(), "bf16")
  for c in (cache, bf16):
    pk.sparse_decode(q, c, idx, head_dim_v=DV, impl="auto", interpret=True)
  assert ran == ["mosaic", "pallas"]


def test_sparse_decode_split_kv_matches_reference():
  """Split-KV in 4 with the race detector: s_q 2 (one row with every index -1), main top-k
  100 with lengths 70 (two tiles, the second partial) + extra top-k 20 with lengths 13
  (one tile) = 3 tiles per row, so split 3 is empty (lse +inf, weight 0 in the combine);
  sink -inf/finite/+inf applied once, by the combine, to the merged fp32 partials."""
  q, cache, idx, kw = _case("model1", 1, 2, 4, 100, lengths=[70], extra=(4, 5, 20, [13]),
                            sink=True, seed=4)
  args = validate_sparse_decode_args(q, cache, idx, head_dim_v=DV, **kw)
  try:
    out, lse = msd.run(**args, head_dim_v=DV, num_splits=4, interpret=RACES)
  finally:
    raced = mgpu_interpret.get_races().races_found
    mgpu_interpret.reset_gpu_interpret_mode_state()
  assert not raced
  ref_out, ref_lse = pk.sparse_decode_reference(q, cache, idx, head_dim_v=DV, **kw)
  _check(out, lse, ref_out, ref_lse)
