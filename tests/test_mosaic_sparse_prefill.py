"""The Pallas Mosaic GPU (Hopper) sparse prefill kernel == ``sparse_prefill_reference``, in
GPU interpret mode on the CPU (``plgpu.InterpretGPUParams``: simulated shared memory, TMA,
mbarriers, wgmma, warpgroup threads, optional race detection).

Interpret mode costs roughly (CTAs x tiles x per-token TMA copies), so the cases are few and
small but keep the real geometries: (d_qk, d_v) = (512, 512) (MODEL1), (576, 512) (V3.2)
and (512, 448).  Between them: top-k not a multiple of the 64-token tile (40, 150: one
partial tile, and three tiles through the pipeline), -1 / negative / >= s_kv entries,
topk_length (a partial one and 0 = an empty row), 2, 4 and 16 heads (padded to the 64-head
wgmma block) and 128 heads (two 64-head CTAs), NaN in every key row the kernel may touch
but must not use (row 0, where invalid entries are clamped, unreferenced rows, rows past
topk_length), and sink values -inf / finite / +inf.  Beside them: a kernel that drops a key
or skips a barrier fails, the real kernel lowers for CUDA without a GPU (both key widths),
bad input raises before launch, and ``impl="auto"`` routes to the kernel on a (faked)
Hopper device.
"""
import importlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import mosaic_sparse_prefill as msp
from pallas_kernels.sparse_prefill import validate_sparse_prefill_args
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret

S_KV = 70
RACES = plgpu.InterpretGPUParams(detect_races=True)


def _case(d, d_v, h, s_q, topk, *, lengths=None, sink=False, seed=0):
  """Random case: the key rows valid entries pick are finite, every other row is NaN."""
  rng = np.random.default_rng(seed)
  used = rng.choice(np.arange(1, S_KV), size=S_KV // 2, replace=False)
  unused = np.setdiff1d(np.arange(S_KV), used)                 # includes row 0
  kv = rng.standard_normal((S_KV, 1, d)).astype(ml_dtypes.bfloat16)
  kv[unused] = np.nan
  idx = rng.choice(used, size=(s_q, 1, topk)).astype(np.int32)
  idx[..., ::7] = -1                                           # scattered -1 entries
  idx[0, 0, 1:4] = [-7, S_KV, S_KV + 100]                      # other invalid entries
  kw = dict(sm_scale=d ** -0.5, d_v=d_v)
  if lengths is not None:                                      # past the length: NaN rows
    for t, n in enumerate(lengths):
      idx[t, 0, n:] = rng.choice(unused, size=topk - n)
    kw["topk_length"] = jnp.asarray(lengths, jnp.int32)
  if sink:
    s = rng.standard_normal(h).astype(np.float32)
    s[0], s[-1] = -np.inf, np.inf
    kw["attn_sink"] = jnp.asarray(s)
  q = rng.standard_normal((s_q, h, d)).astype(ml_dtypes.bfloat16)
  return jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), kw


def _check(got, want):
  out, mx, lse = (np.asarray(x, np.float32) for x in got)
  ref_out, ref_mx, ref_lse = (np.asarray(x, np.float32) for x in want)
  assert np.isfinite(out).all()
  # P is rounded to bf16 before P V (as FlashMLA) and out is bf16: a few bf16 ulps (2^-8).
  np.testing.assert_allclose(out, ref_out, atol=2e-2, rtol=2e-2)
  # max/lse: fp32 logits of bf16 products, summed in another order: fp32 rounding only.
  np.testing.assert_allclose(mx, ref_mx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def _run(q, kv, idx, kw, params, brk=None):
  args = validate_sparse_prefill_args(q, kv, idx, **kw)
  try:
    return msp.run(**args, d_v=kw["d_v"], interpret=params, _break=brk)
  except Exception:
    mgpu_interpret.reset_gpu_interpret_mode_state()
    raise


@pytest.fixture(scope="module")
def model1_case():
  """MODEL1 keys, 2 heads, 3 query rows: top-k 100 (two tiles: the raw stages, the K tile
  and the P slot are reused under the race detector) with lengths 70 / 100 / 0 (empty)."""
  q, kv, idx, kw = _case(512, 512, 2, 3, 100, lengths=[70, 100, 0])
  return q, kv, idx, kw, pk.sparse_prefill_reference(q, kv, idx, **kw)


def test_sparse_prefill_model1_lengths_no_races(model1_case):
  q, kv, idx, kw, want = model1_case
  got = _run(q, kv, idx, kw, RACES)
  assert not mgpu_interpret.get_races().races_found
  _check(got, want)
  assert np.isneginf(np.asarray(got[1])[2]).all() and np.isposinf(np.asarray(got[2])[2]).all()


@pytest.mark.parametrize("d, d_v, h, s_q, topk, sink", [
    (576, 512, 16, 2, 150, True),   # V3.2: three tiles (the last partial) through the pipeline
    (512, 448, 128, 1, 40, False),  # two 64-head CTAs per row; a 192-column consumer
    (512, 512, 4, 1, 40, False),    # 4 heads padded to the 64-head block, one partial tile
])
def test_sparse_prefill_matches_reference(d, d_v, h, s_q, topk, sink):
  """Through the public entry point (impl="mosaic" routes here, interpret on CPU)."""
  q, kv, idx, kw = _case(d, d_v, h, s_q, topk, sink=sink, seed=1)
  got = pk.sparse_prefill(q, kv, idx, **kw, impl="mosaic", interpret=plgpu.InterpretGPUParams())
  _check(got, pk.sparse_prefill_reference(q, kv, idx, **kw))


@pytest.mark.parametrize("brk", ["drop_key", "no_barrier"])
def test_broken_sparse_prefill_fails(model1_case, brk):
  """The test can fail: a kernel that drops one key per tile gives a wrong output; one
  whose consumers skip the "ready" barrier race with the producer (reported by the race
  detector, or reading stale tiles)."""
  q, kv, idx, kw, want = model1_case
  try:
    got = _run(q, kv, idx, kw, RACES, brk=brk)
  except Exception as e:          # the interpreter caught it: a "ready" phase never waited
    assert brk == "no_barrier" and "Barrier completed phase" in str(e), e
    return
  raced = mgpu_interpret.get_races().races_found
  mgpu_interpret.reset_gpu_interpret_mode_state()          # clear the recorded races
  with pytest.raises(AssertionError):
    assert not raced
    _check(got, want)


@pytest.mark.parametrize("d, d_v", [(576, 512), (512, 448)])
def test_sparse_prefill_lowers_for_cuda(d, d_v):
  """The real (non-interpreted) kernel lowers for CUDA on a machine without a GPU: Mosaic GPU
  runs its layout assignment, TMA and wgmma lowering and its shared-memory check (d_qk 576
  fills 226 of 227 KiB) here, so an unsupported layout, TMA box or an over-budget buffer
  fails this test (within seconds, shapes are tiny)."""
  q = jnp.zeros((3, 128, d), jnp.bfloat16)                  # two 64-head blocks
  kv, idx = jnp.zeros((100, 1, d), jnp.bfloat16), jnp.zeros((3, 1, 100), jnp.int32)
  f = lambda q, kv, i, ln, s: pk.sparse_prefill(
      q, kv, i, sm_scale=0.1, d_v=d_v, attn_sink=s, topk_length=ln, impl="mosaic",
      interpret=False)
  exp = jax.export.export(jax.jit(f), platforms=["cuda"])(
      q, kv, idx, jnp.zeros((3,), jnp.int32), jnp.zeros((128,), jnp.float32))
  assert exp.mlir_module().count("custom_call @mosaic_gpu") == 1, "expected one Mosaic GPU kernel"


def test_sparse_prefill_mosaic_bad_input():
  """ValueErrors before launch (nothing is traced for these)."""
  q, kv, idx, kw = _case(576, 512, 2, 1, 40)
  with pytest.raises(ValueError, match=r"d_qk=576, d_v=576: impl='mosaic'"):
    pk.sparse_prefill(q, kv, idx, sm_scale=0.1, d_v=576, impl="mosaic")
  with pytest.raises(ValueError, match="interpret='yes': expected"):
    pk.sparse_prefill(q, kv, idx, sm_scale=0.1, impl="mosaic", interpret="yes")
  with pytest.raises(ValueError, match="impl='bogus'"):
    pk.sparse_prefill(q, kv, idx, sm_scale=0.1, impl="bogus")
  with pytest.raises(ValueError, match="indices shape"):
    pk.sparse_prefill(q, kv, idx[:, 0], sm_scale=0.1, impl="mosaic")


def test_sparse_prefill_auto_picks_mosaic_on_hopper(monkeypatch):
  """impl="auto" on a (faked) compute-capability-9.0 GPU runs the Mosaic kernel where it
  covers the case and the Triton kernel where not (d_v = d_qk = 576); the kernels are
  stubbed (only the routing is under test)."""
  sp = importlib.import_module("pallas_kernels.sparse_prefill")   # the module, not the function
  ran = []
  monkeypatch.setattr(msp, "run", lambda **kw: ran.append("mosaic"))
  monkeypatch.setattr(sp, "_pallas_core", lambda **kw: ran.append("pallas"))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [type("H200", (), {"compute_capability": "9.0"})])
  q, kv, idx, _ = _case(576, 512, 2, 1, 40)
  for d_v in (512, 576):
    pk.sparse_prefill(q, kv, idx, sm_scale=0.1, d_v=d_v, impl="auto", interpret=True)
  assert ran == ["mosaic", "pallas"]
