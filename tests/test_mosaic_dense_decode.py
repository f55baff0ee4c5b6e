"""Pallas Mosaic GPU (Hopper) dense paged decode == ``dense_decode_reference``, in GPU
interpret mode on the CPU (``plgpu.InterpretGPUParams``: simulated shared memory, TMA,
mbarriers, wgmma, warpgroup threads, optional race detection).

Interpret mode costs roughly CTAs x tiles, so each case is one small shape that exercises
one path, with the real 576/512 geometries:
  * FP8 v32, pages of 61 tokens (each 64-row tile box reads 3 rows of the next page, all
    NaN), lengths 127 (two pages + 5: a partial tile) and 61 (exactly one page), 16 heads;
  * FP8 model1, pages of 64 (the tile's scales in one box), s_q 2 causal, 2 heads,
    split-KV in 3 (lengths 130: one tile per split, and 3: two empty splits), race
    detector on;
  * FP8 model1, pages of 61 (scales by per-token windows), length 70, 4 heads;
  * bf16 ``KCache`` (512-dim: two pipelined K stages), pages of 64, s_q 3 causal, length
    150 (three tiles, the last fixed in place), 16 heads;
  * bf16 array ``[Z, Y, 1, 576]`` (one K stage), pages of 16 (48 masked rows per tile),
    128 heads (two 64-head CTAs), one sequence of 40 tokens and one empty (out 0, lse inf).
Every cache row that is not a key of some sequence is NaN (codes, RoPE, scales), and the
block-table entries past a sequence are garbage.  Beside them: broken kernels fail, the
real kernel lowers for CUDA without a GPU, bad input raises ValueError before launch, and
``impl="auto"`` routes to the kernel on a (faked) Hopper device.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import mosaic_dense_decode as mdd
from pallas_kernels.dense_decode import validate_dense_decode_args
from pallas_kernels.tuning import KernelTuning
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret

DV = 512
D = {"v32": 576, "model1": 512, "bf16": 512, "bf16_array": 576}


def _nan_rows(cache: pk.KCache, rows: np.ndarray) -> pk.KCache:
  """FP8 cache with NaN bytes (codes, RoPE and scales) at flat token rows ``rows``."""
  z, y = cache.num_blocks, cache.block_size
  def fill(a, value):
    flat = a.reshape(z * y, a.shape[-1])
    return flat.at[rows].set(value).reshape(a.shape)
  nan_scale = jnp.float32(jnp.nan) if cache.fmt == "v32" else jnp.uint8(0xFF)
  return dataclasses.replace(
      cache, nope=fill(cache.nope, jnp.float8_e4m3fn(jnp.nan)),
      rope=fill(cache.rope, jnp.bfloat16(jnp.nan)), scales=fill(cache.scales, nan_scale))


def _case(kind, s_q, h, block_size, lens, seed=0):
  """Sequence i uses pages 2i+1, 2i+3, ... (so every used page is followed by an unused
  one); every row that is not one of its first lens[i] tokens is NaN."""
  rng = np.random.default_rng(seed)
  b, d = len(lens), D[kind]
  pages = [-(-n // block_size) for n in lens]
  max_pages = max(max(pages), 1)
  z = 2 * sum(pages) + 1
  table = np.full((b, max_pages), 10**6, np.int32)           # garbage past the sequence
  used, nxt = [], 1
  for i, n in enumerate(lens):
    for p in range(pages[i]):
      table[i, p] = nxt
      used += [nxt * block_size + j for j in range(min(block_size, n - p * block_size))]
      nxt += 2
  unused = np.setdiff1d(np.arange(z * block_size), used)
  x = rng.standard_normal((z * block_size, d)).astype(ml_dtypes.bfloat16)
  if kind in ("v32", "model1"):
    cache = pk.KCache.from_bf16(jnp.asarray(x.reshape(z, block_size, 1, d)), kind)
    cache = _nan_rows(cache, unused)
  else:
    x[unused] = np.nan
    x = jnp.asarray(x.reshape(z, block_size, 1, d))
    cache = pk.KCache.from_bf16(x, "bf16") if kind == "bf16" else x
  q = jnp.asarray(rng.standard_normal((b, s_q, h, d)).astype(ml_dtypes.bfloat16))
  return q, cache, jnp.asarray(table), jnp.asarray(lens, jnp.int32)


def _run(q, cache, table, lens, params, brk=None, splits=1):
  args = validate_dense_decode_args(q, cache, table, lens, head_dim_v=DV, causal=q.shape[1] > 1)
  try:
    return mdd.run(**args, head_dim_v=DV, num_splits=splits, interpret=params, _break=brk)
  except Exception:
    mgpu_interpret.reset_gpu_interpret_mode_state()
    raise


def _check(out, lse, q, cache, table, lens):
  ref_out, ref_lse = pk.dense_decode_reference(q, cache, table, lens, head_dim_v=DV,
                                               causal=q.shape[1] > 1)
  out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
  assert np.isfinite(out).all()
  # P is rounded to bf16 before P V (as FlashMLA) and out is bf16: a few bf16 ulps (2^-8).
  np.testing.assert_allclose(out, ref_out, atol=2e-2, rtol=2e-2)
  # lse: fp32 logits of bf16 products, summed in another order: fp32 rounding only.
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


RACES = plgpu.InterpretGPUParams(detect_races=True)
CASES = {   # name: (kind, s_q, h, block_size, lens, splits)
    "v32": ("v32", 1, 16, 61, [127, 61], 1),
    "model1": ("model1", 2, 2, 64, [130, 3], 3),
    "model1_page61": ("model1", 1, 4, 61, [70], 1),
    "bf16": ("bf16", 3, 16, 64, [150], 1),
    "bf16_array": ("bf16_array", 1, 128, 16, [40, 0], 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dense_decode_mosaic_matches_reference(name):
  """See the module docstring for what each case covers; model1 runs the race detector."""
  kind, s_q, h, bs, lens, splits = CASES[name]
  q, cache, table, lens = _case(kind, s_q, h, bs, lens)
  params = RACES if name == "model1" else plgpu.InterpretGPUParams()
  out, lse = _run(q, cache, table, lens, params, splits=splits)
  if name == "model1":
    assert not mgpu_interpret.get_races().races_found
  _check(out, lse, q, cache, table, lens)


@pytest.mark.parametrize("brk", ["drop_key", "no_barrier"])
def test_broken_dense_decode_fails(brk):
  """The test can fail: a kernel that drops one key per tile gives a wrong output; one
  whose consumer skips the "ready" barrier races with the producer (reported by the race
  detector, or reading stale tiles)."""
  q, cache, table, lens = _case("model1", 1, 2, 61, [70], seed=2)
  try:
    out, lse = _run(q, cache, table, lens, RACES, brk=brk)
  except Exception as e:          # the interpreter caught it (e.g. a barrier phase never waited)
    assert brk == "no_barrier", e
    return
  raced = mgpu_interpret.get_races().races_found
  mgpu_interpret.reset_gpu_interpret_mode_state()          # clear the recorded races
  with pytest.raises(AssertionError):
    assert not raced
    _check(out, lse, q, cache, table, lens)


@pytest.mark.parametrize("kind,page", [("v32", 61), ("model1", 64), ("model1", 61),
                                       ("bf16", 64), ("bf16_array", 40)])
def test_dense_decode_mosaic_lowers_for_cuda(kind, page):
  """The real (non-interpreted) kernel lowers for CUDA without a GPU: Mosaic GPU's layout
  assignment, TMA (tiled bf16 boxes included) and wgmma lowering run here; model1 and
  bf16 with split-KV (fp32 partials stored from registers), the others without; model1
  with both scale paths (one box per tile for pages of 64, per-token windows for 61)."""
  d = D[kind]
  if kind == "bf16_array":
    cache = jnp.zeros((3, page, 1, d), jnp.bfloat16)
  else:
    cache = pk.KCache.empty(3, page, kind, d)
  q = jnp.zeros((2, 2, 128, d), jnp.bfloat16)                  # two 64-head blocks, s_q 2
  table, lens = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)
  tuning = KernelTuning(num_splits=2 if kind in ("model1", "bf16") else 1)
  f = lambda q, c, t, l: pk.dense_decode(q, c, t, l, head_dim_v=DV, causal=True,
                                         impl="mosaic", interpret=False, tuning=tuning)
  exp = jax.export.export(jax.jit(f), platforms=["cuda"])(q, cache, table, lens)
  assert exp.mlir_module().count("custom_call @mosaic_gpu") == 1, "expected one Mosaic GPU kernel"


def test_dense_decode_mosaic_bad_input():
  """ValueErrors before launch for what the kernel does not cover."""
  q, cache, table, lens = _case("model1", 1, 2, 61, [70], seed=3)
  kw = dict(head_dim_v=DV, impl="mosaic")
  with pytest.raises(ValueError, match="head_dim_v=256"):
    pk.dense_decode(q, cache, table, lens, head_dim_v=256, impl="mosaic")
  with pytest.raises(ValueError, match="impl='mosaic' reads a KCache or a bf16 array"):
    pk.dense_decode(q, cache.to_packed_bytes(), table, lens, **kw)
  two_heads = jnp.zeros((4, 64, 2, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match="h_kv=2"):
    pk.dense_decode(jnp.zeros((1, 1, 4, 512), jnp.bfloat16), two_heads, table[:, :2], lens,
                    **kw)
  bf16_61 = jnp.zeros((4, 61, 1, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_size=61"):
    pk.dense_decode(q, bf16_61, table, lens, **kw)
  with pytest.raises(ValueError, match="interpret='yes': expected"):
    pk.dense_decode(q, cache, table, lens, interpret="yes", **kw)
  with pytest.raises(ValueError, match="impl='bogus'"):
    pk.dense_decode(q, cache, table, lens, head_dim_v=DV, impl="bogus")


def test_dense_decode_auto_picks_mosaic_on_hopper(monkeypatch):
  """impl="auto" on a (faked) compute-capability-9.0 GPU runs the Mosaic kernel where it
  covers the case and the Triton kernel elsewhere (two KV heads); kernels are stubbed."""
  dd = importlib.import_module("pallas_kernels.dense_decode")      # the module
  ran = []
  monkeypatch.setattr(mdd, "run", lambda **kw: ran.append("mosaic"))
  monkeypatch.setattr(dd, "_pallas_core", lambda **kw: ran.append("pallas"))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [type("H200", (), {"compute_capability": "9.0"})])
  q, cache, table, lens = _case("model1", 1, 2, 61, [70], seed=3)
  pk.dense_decode(q, cache, table, lens, head_dim_v=DV, impl="auto", interpret=True)
  two_heads = jnp.zeros((4, 64, 2, 512), jnp.bfloat16)
  pk.dense_decode(jnp.zeros((1, 1, 4, 512), jnp.bfloat16), two_heads, table[:, :2], lens,
                  head_dim_v=DV, impl="auto", interpret=True)
  assert ran == ["mosaic", "pallas"]
