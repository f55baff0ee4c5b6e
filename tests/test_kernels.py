"""Pallas (Triton) attention kernels == their plain-jnp references, in interpret mode.

Each kernel runs over a covering array of its features: every PAIR of feature values
appears in at least one case (all-pairs design; ``test_covering_arrays_cover_every_pair``
checks it), not the full product.  Data-only features (-1 indices, empty rows, NaN bytes,
sink values) vary inside a case; shape features (geometry, heads, page size, top-k, extra
cache, s_q, splits) select the case.  Plus, for the GPU path, checks that need no GPU:
each kernel lowers for CUDA (``jax.export`` to platform "cuda", Triton custom call
allowed), the compiled decode path holds no dequantised-cache-sized buffer, and the dense
decoder's split-KV really produces several partials that combine to the result.

Shapes are small (<= 40 cached tokens, top-k 64/128, 1-2 query rows per batch) but keep
the real 576/512 head geometry and 16-128 query heads.
"""
import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import combine
from pallas_kernels.dense_decode import DenseDecodeTuning, dense_decode_partials
from pallas_kernels.sparse_decode import SparseDecodeTuning
from pallas_kernels.sparse_prefill import SparsePrefillTuning

D = {"v32": 576, "model1": 512}
DV = 512
U = 2.0**-8                  # bf16 unit roundoff (8 significant bits); one ulp is <= 2U relative
TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def randn(rng, *shape):
  return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- covering arrays

# Factor levels, then the cases as tuples in factor order.  Found by a small search; the
# coverage test below is the specification.
SPARSE_FACTORS = dict(geometry=("v32", "model1"), h_q=(16, 64, 128), page=(3, 5),
                      topk=(64, 128), neg1=(False, True), empty=(False, True),
                      nan=(False, True), sink=(False, True), extra=(False, True),
                      s_q=(1, 2), splits=(1, 2))
SPARSE_CASES = [
    ("model1", 128, 3, 128, True, False, True, True, True, 2, 1),
    ("v32", 128, 5, 64, False, False, False, False, True, 1, 1),
    ("v32", 16, 3, 128, True, True, True, False, False, 1, 2),
    ("model1", 16, 5, 64, True, False, False, False, True, 1, 2),
    ("v32", 64, 3, 64, False, False, False, False, False, 2, 1),
    ("model1", 16, 5, 128, False, True, False, True, False, 2, 1),
    ("v32", 128, 3, 64, False, True, True, True, False, 2, 2),
    ("model1", 64, 5, 128, True, True, True, True, True, 1, 2),
]
DENSE_FACTORS = dict(geometry=("v32", "model1"), cache=("bf16", "fp8"), h_q=(16, 64, 128),
                     page=(3, 5), s_q=(1, 2), empty=(False, True), nan=(False, True),
                     splits=(1, 3))
DENSE_CASES = [
    ("model1", "fp8", 64, 5, 2, False, False, 3),
    ("model1", "fp8", 128, 5, 1, True, False, 1),
    ("model1", "bf16", 16, 5, 2, True, True, 3),
    ("model1", "bf16", 16, 3, 1, False, False, 1),
    ("v32", "fp8", 128, 5, 2, False, True, 3),
    ("v32", "bf16", 64, 3, 1, True, True, 1),
    ("v32", "bf16", 128, 3, 1, False, True, 3),
    ("v32", "fp8", 16, 3, 2, True, False, 1),
]
PREFILL_FACTORS = dict(geometry=("v32", "model1"), h_q=(16, 64, 128), topk=(64, 128),
                       neg1=(False, True), empty=(False, True), nan=(False, True),
                       sink=(False, True), lengths=(False, True))
PREFILL_CASES = [
    ("model1", 128, 64, False, True, True, True, False),
    ("v32", 16, 128, True, True, True, True, True),
    ("model1", 64, 64, False, False, False, False, True),
    ("model1", 16, 64, True, False, True, False, False),
    ("model1", 128, 128, True, False, False, True, True),
    ("v32", 16, 128, False, True, False, False, False),
    ("v32", 128, 64, True, False, False, False, True),
    ("v32", 64, 128, True, True, True, True, False),
]


def _case_ids(factors, cases):
  return ["-".join(f"{k}={v}" for k, v in zip(factors, c)) for c in cases]


@pytest.mark.parametrize("factors,cases", [(SPARSE_FACTORS, SPARSE_CASES),
                                           (DENSE_FACTORS, DENSE_CASES),
                                           (PREFILL_FACTORS, PREFILL_CASES)])
def test_covering_arrays_cover_every_pair(factors, cases):
  names = list(factors)
  for case in cases:
    assert len(case) == len(names) and all(v in factors[n] for n, v in zip(names, case)), case
  for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
    seen = {(c[i], c[j]) for c in cases}
    missing = set(itertools.product(factors[a], factors[b])) - seen
    assert not missing, f"pairs of ({a}, {b}) not covered: {sorted(missing)}"


# ----------------------------------------------------------------------------- helpers


def poison(cache, slots):
  """Every byte of the given flat slots -> NaN (codes 0xFF, NaN/0xFF scales, NaN RoPE)."""
  blk, off = np.divmod(np.asarray(slots), cache.block_size)

  def put(a):
    if a is None:
      return None
    ff = jnp.full(a.shape[-1:], 0xFF, jnp.uint8)          # e4m3fn NaN; ue8m0 NaN
    nan = (ff if a.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(ff, a.dtype)
           if a.dtype == jnp.float8_e4m3fn else jnp.full(a.shape[-1:], jnp.nan, a.dtype))
    return a.at[blk, off].set(nan)
  return pk.KCache(put(cache.nope), put(cache.rope), put(cache.scales), cache.fmt)


def vmax(cache):
  """Largest |value| a key can contribute (finite entries of the dequantised cache)."""
  v = np.asarray(cache.to_bf16()).astype(np.float32)[..., :DV]
  return float(np.max(np.abs(v[np.isfinite(v)])))


def assert_attention_close(got_out, want_out, got_lse, want_lse, v_max):
  got_out = np.asarray(got_out).astype(np.float32)
  want_out = np.asarray(want_out).astype(np.float32)
  assert np.isfinite(got_out).all(), "NaN/inf leaked into the output"
  # Kernel rounds P to bf16 before P@V (|dP| <= U*P, so |d out| <= U*max|v|); both outputs
  # are rounded to bf16 (<= 1 ulp = 2U relative apart); fp32 accumulation noise is far below.
  np.testing.assert_allclose(got_out, want_out, rtol=2 * U, atol=U * v_max)
  got_lse, want_lse = np.asarray(got_lse), np.asarray(want_lse)
  np.testing.assert_array_equal(np.isinf(got_lse), np.isinf(want_lse))
  fin = np.isfinite(want_lse)
  # fp32 logits of bf16 operands, summed in another order over <= 576 terms: ~1e-6 relative.
  np.testing.assert_allclose(got_lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_lse[~fin], want_lse[~fin])


# ----------------------------------------------------------------------------- sparse decode


def _sparse_case(geometry, h_q, page, topk, neg1, empty, nan, sink, extra, s_q, seed):
  rng = np.random.default_rng(seed)
  d, b = D[geometry], 2
  z = -(-30 // page)
  cache = pk.KCache.from_bf16(jnp.asarray(randn(rng, z, page, 1, d)), geometry)
  n_tok = z * page

  def index_list(n_tok, topk, lengths):
    # Valid entries avoid slot 0 (poisoned when nan); -1 entries and entries past the length
    # (0, or far outside the cache: never read) must contribute nothing.
    idx = rng.integers(1, n_tok, (b, s_q, topk)).astype(np.int32)
    if neg1:
      idx[rng.random(idx.shape) < 0.3] = -1
      if s_q > 1:                                       # a row with only -1 entries
        idx[0, -1] = -1
    past = np.arange(topk)[None, None, :] >= np.asarray(lengths)[:, None, None]
    junk = np.where(rng.random(idx.shape) < 0.5, 0, 10**6)
    return np.where(past, junk, idx).astype(np.int32)

  lengths = np.array([topk - 13, 0 if empty else topk], np.int32)   # empty: row b=1 has 0
  idx = index_list(n_tok, topk, lengths)
  kw = dict(head_dim_v=DV, topk_length=jnp.asarray(lengths))
  if extra:
    e_page = 8 - page                                   # its own block size (5 or 3)
    e_cache = pk.KCache.from_bf16(jnp.asarray(randn(rng, 4, e_page, 1, d)), geometry)
    e_len = np.array([64, 0 if empty else 37], np.int32)
    e_idx = index_list(e_cache.num_tokens, 64, e_len)
    if nan:
      e_cache = poison(e_cache, [0])
    kw.update(extra_k_cache=e_cache, extra_indices_in_kvcache=jnp.asarray(e_idx),
              extra_topk_length=jnp.asarray(e_len))
  if nan:
    cache = poison(cache, [0])
  if sink:
    s = rng.standard_normal(h_q).astype(np.float32)
    s[:3] = [np.inf, -np.inf, 30.0]                      # +inf zeroes a head, -inf is a no-op
    kw["attn_sink"] = jnp.asarray(s)
  q = jnp.asarray(randn(rng, b, s_q, h_q, d))
  return q, cache, jnp.asarray(idx), kw


@pytest.mark.parametrize("case", SPARSE_CASES, ids=_case_ids(SPARSE_FACTORS, SPARSE_CASES))
def test_sparse_decode_kernel_matches_reference(case):
  *args, splits = case
  q, cache, idx, kw = _sparse_case(*args, seed=SPARSE_CASES.index(case))
  got = pk.sparse_decode(q, cache, idx, impl="pallas", **kw,
                         tuning=SparseDecodeTuning(num_splits=splits))
  want = pk.sparse_decode(q, cache, idx, impl="xla", **kw)
  assert got[0].shape == want[0].shape and got[0].dtype == jnp.bfloat16
  assert got[1].shape == want[1].shape and got[1].dtype == jnp.float32
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))
  if case[5]:                                           # empty: batch 1 has no valid key
    assert (np.asarray(got[0])[1] == 0).all() and (np.asarray(got[1])[1] == np.inf).all()
  if "attn_sink" in kw:
    assert (np.asarray(got[0])[:, :, 0] == 0).all()     # sink +inf


# ----------------------------------------------------------------------------- dense decode


def _dense_case(geometry, cache_kind, h_q, page, s_q, empty, nan, seed):
  rng = np.random.default_rng(seed)
  d, b = D[geometry], 2
  seqlens = np.array([37, (s_q - 1) if empty else 11], np.int32)   # empty: first query sees 0
  pages = -(-37 // page)
  z = b * (pages + 1) + 1                               # + a garbage block (the last)
  fmt = geometry if cache_kind == "fp8" else "bf16"
  cache = pk.KCache.from_bf16(jnp.asarray(randn(rng, z, page, 1, d)), fmt)
  table = rng.permutation(z - 1)[:b * (pages + 1)].reshape(b, pages + 1).astype(np.int32)
  used = -(-seqlens // page)
  garbage = z - 1
  for i in range(b):
    table[i, used[i]:] = garbage if nan else rng.integers(-9, 99)   # never read
  if nan:
    # Stale slots past the sequence inside its last page, and the whole garbage block.
    stale = [table[i, (seqlens[i] - 1) // page] * page + o for i in range(b) if seqlens[i]
             for o in range((seqlens[i] - 1) % page + 1, page)]
    cache = poison(cache, stale + [garbage * page + o for o in range(page)])
  q = jnp.asarray(randn(rng, b, s_q, h_q, d))
  return q, cache, jnp.asarray(table), jnp.asarray(seqlens)


@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_ids(DENSE_FACTORS, DENSE_CASES))
def test_dense_decode_kernel_matches_reference(case):
  *args, splits = case
  q, cache, table, seqlens = _dense_case(*args, seed=DENSE_CASES.index(case))
  causal = q.shape[1] > 1
  kw = dict(head_dim_v=DV, causal=causal)
  got = pk.dense_decode(q, cache, table, seqlens, impl="pallas", **kw,
                        tuning=DenseDecodeTuning(block_k=16, num_splits=splits))
  want = pk.dense_decode(q, cache, table, seqlens, impl="xla", **kw)
  assert got[0].shape == want[0].shape and got[0].dtype == jnp.bfloat16
  assert got[1].shape == want[1].shape
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))
  if case[5]:                                           # empty: (b=1, t=0) sees no key
    assert (np.asarray(got[0])[1, 0] == 0).all() and (np.asarray(got[1])[1, :, 0] == np.inf).all()


def test_dense_decode_kernel_gqa_bf16_heads():
  rng = np.random.default_rng(5)
  h_kv, d, y = 2, 512, 5
  k = jnp.asarray(randn(rng, 6, y, h_kv, d))
  q = jnp.asarray(randn(rng, 2, 2, 32, d))
  table = jnp.asarray([[1, 4, 2], [0, 3, 5]], jnp.int32)
  seqlens = jnp.asarray([13, 9], jnp.int32)
  got = pk.dense_decode(q, k, table, seqlens, head_dim_v=DV, causal=True, impl="pallas",
                        tuning=DenseDecodeTuning(block_k=16, num_splits=2))
  want = pk.dense_decode(q, k, table, seqlens, head_dim_v=DV, causal=True)
  v = float(np.abs(np.asarray(k).astype(np.float32)).max())
  assert_attention_close(got[0], want[0], got[1], want[1], v)


def test_dense_decode_split_kv_really_splits():
  q, cache, table, seqlens = _dense_case("model1", "fp8", 16, 5, 1, False, False, seed=3)
  tuning = DenseDecodeTuning(block_k=16, num_splits=3)
  out_s, lse_s = dense_decode_partials(q, cache, table, seqlens, head_dim_v=DV, tuning=tuning)
  assert out_s.shape == (3, *q.shape[:3], DV) and lse_s.shape == (3, *q.shape[:3])
  # Sequence 0 has 37 tokens = 3 chunks of 16: one per split, each a strict subset.
  lse0 = np.asarray(lse_s)[:, 0]
  assert np.isfinite(lse0).all()
  _, lse_full = pk.dense_decode(q, cache, table, seqlens, head_dim_v=DV)
  full0 = np.transpose(np.asarray(lse_full), (0, 2, 1))[0]
  assert (lse0 < full0[None]).all()
  # Sequence 1 has 11 tokens = 1 chunk: splits 1 and 2 are empty (lse -inf).
  assert np.isfinite(np.asarray(lse_s)[0, 1]).all() and (np.asarray(lse_s)[1:, 1] == -np.inf).all()
  out, lse = combine.combine_splits(out_s, lse_s, out_dtype=jnp.bfloat16)
  got_out, got_lse = pk.dense_decode(q, cache, table, seqlens, head_dim_v=DV, impl="pallas",
                                     tuning=tuning)
  # Same partials, same combine: only XLA fusion order may differ (<= 1 bf16 ulp).
  np.testing.assert_allclose(np.asarray(out).astype(np.float32),
                             np.asarray(got_out).astype(np.float32), rtol=2 * U, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.transpose(np.asarray(got_lse), (0, 2, 1)),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- sparse prefill


def _prefill_case(geometry, h_q, topk, neg1, empty, nan, sink, lengths, seed):
  rng = np.random.default_rng(seed)
  d, s_q, s_kv = D[geometry], 2, 40
  kv = randn(rng, s_kv, 1, d)
  if nan:
    kv[0] = np.nan                                       # only ever behind invalid entries
  idx = rng.integers(1, s_kv, (s_q, 1, topk)).astype(np.int32)
  if neg1:                                              # -1, other negatives, >= s_kv
    idx[rng.random(idx.shape) < 0.3] = -1
    idx[0, 0, :5] = [-7, s_kv, s_kv + 100, -1, -2]
  if empty:
    idx[1] = -1
  kw = dict(sm_scale=d ** -0.5)
  if lengths:
    ln = np.array([topk - 21, topk], np.int32)
    idx[0, 0, ln[0]:] = 0                                # past the length: never read
    kw["topk_length"] = jnp.asarray(ln)
  if sink:
    s = rng.standard_normal(h_q).astype(np.float32)
    s[:2] = [np.inf, -np.inf]
    kw["attn_sink"] = jnp.asarray(s)
  q = jnp.asarray(randn(rng, s_q, h_q, d))
  return q, jnp.asarray(kv), jnp.asarray(idx), kw


@pytest.mark.parametrize("case", PREFILL_CASES, ids=_case_ids(PREFILL_FACTORS, PREFILL_CASES))
def test_sparse_prefill_kernel_matches_reference(case):
  q, kv, idx, kw = _prefill_case(*case, seed=PREFILL_CASES.index(case))
  got = pk.sparse_prefill(q, kv, idx, impl="pallas", **kw)
  want = pk.sparse_prefill(q, kv, idx, impl="xla", **kw)
  v = np.asarray(kv).astype(np.float32)[..., :DV]
  assert_attention_close(got[0], want[0], got[2], want[2], float(np.nanmax(np.abs(v))))
  np.testing.assert_array_equal(np.isinf(got[1]), np.isinf(want[1]))
  fin = np.isfinite(np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[1])[fin], np.asarray(want[1])[fin], rtol=1e-5, atol=1e-5)
  if case[4]:                                           # empty row: out 0, max -inf, lse +inf
    assert (np.asarray(got[0])[1] == 0).all() and (np.asarray(got[1])[1] == -np.inf).all()
    assert (np.asarray(got[2])[1] == np.inf).all()


# ----------------------------------------------------------------------------- GPU path, no GPU


H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")


def _export_cuda(f, *args):
  """StableHLO text of f lowered for CUDA with no GPU present.  jax 0.11's Pallas Triton
  lowering asks the device for its compute capability; an abstract mesh carrying an
  abstract H200 (sm_90) answers for it.  Triton IR has no stability guarantee, so export
  refuses the Triton custom call unless that check is disabled."""
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                  abstract_device=H200)
  with jax.sharding.use_abstract_mesh(mesh):
    exp = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[TRITON])(*args)
  return exp.mlir_module()


@pytest.mark.parametrize("fmt", ["v32", "model1", "bf16"])
def test_kernels_lower_for_cuda(fmt):
  d = 512 if fmt == "bf16" else D[fmt]
  cache = pk.KCache.empty(41, 5, fmt, d)
  q = jnp.zeros((1, 2, 64, d), jnp.bfloat16)
  table = jnp.zeros((1, 9), jnp.int32)
  lens = jnp.zeros((1,), jnp.int32)
  for splits in (1, 4):
    txt = _export_cuda(lambda q, c, t, s: pk.dense_decode(
        q, c, t, s, head_dim_v=DV, causal=True, impl="pallas", interpret=False,
        tuning=DenseDecodeTuning(num_splits=splits)), q, cache, table, lens)
    assert txt.count("__gpu$xla.gpu.triton") == 1 and "dense_decode_mla" in txt
  if fmt == "bf16":
    kv = jnp.zeros((100, 1, d), jnp.bfloat16)
    idx = jnp.zeros((2, 1, 128), jnp.int32)
    txt = _export_cuda(lambda q, kv, i, s: pk.sparse_prefill(
        q, kv, i, sm_scale=0.1, attn_sink=s, impl="pallas", interpret=False),
        q[0], kv, idx, jnp.zeros((64,), jnp.float32))
    assert txt.count("__gpu$xla.gpu.triton") == 1 and "sparse_prefill_mla" in txt
    return
  extra = pk.KCache.empty(7, 3, fmt, d)
  idx = jnp.zeros((1, 2, 128), jnp.int32)
  for splits in (1, 2):
    txt = _export_cuda(lambda q, c, i, l, e, ei, el, s: pk.sparse_decode(
        q, c, i, head_dim_v=DV, attn_sink=s, topk_length=l, extra_k_cache=e,
        extra_indices_in_kvcache=ei, extra_topk_length=el, impl="pallas", interpret=False,
        tuning=SparseDecodeTuning(num_splits=splits)),
        q, cache, idx, lens, extra, idx[..., :64], lens, jnp.zeros((64,), jnp.float32))
    assert txt.count("__gpu$xla.gpu.triton") == 1 and "sparse_decode_mla" in txt


def test_kernels_compile_for_sm90_with_triton(tmp_path, monkeypatch):
  """Optional (needs ``pip install triton``; no GPU): the Triton IR each kernel lowers to
  compiles for sm_90 with its default tuning, fits in shared memory and uses wgmma."""
  triton = pytest.importorskip("triton")
  from triton.backends.compiler import GPUTarget
  from jax._src.pallas.triton import pallas_call_registration as registration
  captured = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    result = lower(*a, **k)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result
  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
  jax.clear_caches()                                    # lower afresh, through the hook
  q = jnp.zeros((4, 2, 64, 512), jnp.bfloat16)
  cache = pk.KCache.empty(64, 64, "model1")
  idx = jnp.zeros((4, 2, 128), jnp.int32)
  lens = jnp.full((4,), 128, jnp.int32)
  sink = jnp.zeros((64,), jnp.float32)
  kernels = {
      "dense": (lambda q, c, t, s: pk.dense_decode(q, c, t, s, head_dim_v=DV, impl="pallas",
                                                   interpret=False),
                q[:, :1], cache, jnp.zeros((4, 16), jnp.int32), lens),
      "sparse": (lambda q, c, i, s: pk.sparse_decode(q, c, i, head_dim_v=DV, attn_sink=s,
                                                     impl="pallas", interpret=False),
                 q, cache, idx, sink),
      "prefill": (lambda q, kv, i: pk.sparse_prefill(q, kv, i, sm_scale=0.1, impl="pallas",
                                                     interpret=False),
                  q[0], jnp.zeros((256, 1, 512), jnp.bfloat16), idx[0][:, None]),
  }
  for name, (f, *args) in kernels.items():
    captured.clear()
    txt = _export_cuda(f, *args)
    warps, stages = (int(re.search(rf"{k} = (\d+)", txt).group(1))
                     for k in ("num_warps", "num_stages"))
    path = tmp_path / f"{name}.ttir"
    path.write_text(captured[-1])
    kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    assert kernel.metadata.shared <= 227 * 1024, (name, kernel.metadata.shared)
    assert "wgmma.mma_async" in kernel.asm["ptx"], name


# A dequantised copy of the cache would be a bf16/f32 array with a key-sized last dim
# (448, 512, 576) and at least as many rows as the cache has tokens (205 here), while
# every legitimate buffer of the decode path has <= 2 * 16 query rows.
_HLO_ARRAY = re.compile(r"\b(bf16|f32)\[([0-9,]+)\]")
_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)+)(bf16|f32)>")


def _cache_sized(text, min_rows):
  shapes = [tuple(int(x) for x in dims.split(",")) for _, dims in _HLO_ARRAY.findall(text)]
  shapes += [tuple(int(x) for x in dims.rstrip("x").split("x"))
             for dims, _ in _MLIR_TENSOR.findall(text)]
  return [s for s in shapes if len(s) >= 2 and s[-1] in (448, 512, 576)
          and int(np.prod(s[:-1])) >= min_rows]


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_decode_path_never_materialises_a_dequantised_cache(fmt):
  z, y = 41, 5                                          # 205 tokens
  cache = pk.KCache.empty(z, y, fmt)
  q = jnp.zeros((1, 1, 16, D[fmt]), jnp.bfloat16)
  table = jnp.arange(40, dtype=jnp.int32)[None]         # 200 tokens reachable
  lens = jnp.asarray([200], jnp.int32)
  tuning = DenseDecodeTuning(num_splits=2)

  def f(impl):
    return lambda q, c, t, s: pk.dense_decode(q, c, t, s, head_dim_v=DV, impl=impl,
                                              tuning=tuning if impl == "pallas" else None)
  # Interpret mode compiles the kernel body to XLA:CPU, so its buffers are visible here.
  hlo = jax.jit(f("pallas")).lower(q, cache, table, lens).compile().as_text()
  assert not _cache_sized(hlo, 200), _cache_sized(hlo, 200)[:3]
  assert not _cache_sized(_export_cuda(f("pallas"), q, cache, table, lens), 200)
  # The grep does find one in the reference (which dequantises every page it reads).
  ref = jax.jit(f("xla")).lower(q, cache, table, lens).compile().as_text()
  assert _cache_sized(ref, 200)


# ----------------------------------------------------------------------------- bad arguments


def test_kernel_argument_errors():
  q, cache, idx, kw = _sparse_case("v32", 16, 3, 64, False, False, False, False, False, 1, 0)
  with pytest.raises(ValueError, match=r"head_dim_v \(d_v\)=448"):       # not whole key tiles
    pk.sparse_decode(q, cache, idx, impl="pallas", **{**kw, "head_dim_v": 448})
  with pytest.raises(ValueError, match="block_k=48"):
    pk.sparse_decode(q, cache, idx, impl="pallas", **kw, tuning=SparseDecodeTuning(block_k=48))
  with pytest.raises(ValueError, match="num_splits=0"):
    pk.sparse_decode(q, cache, idx, impl="pallas", **kw, tuning=SparseDecodeTuning(num_splits=0))
  qd, dcache, table, lens = _dense_case("model1", "fp8", 16, 5, 1, False, False, seed=0)
  with pytest.raises(ValueError, match="block_q=8"):
    pk.dense_decode(qd, dcache, table, lens, head_dim_v=DV, impl="pallas",
                    tuning=DenseDecodeTuning(block_q=8))
  with pytest.raises(ValueError, match=r"head_dim_v \(d_v\)=100"):
    pk.dense_decode(qd, dcache, table, lens, head_dim_v=100, impl="pallas")
  qp, kv, pidx, pkw = _prefill_case("model1", 16, 64, False, False, False, False, False, 0)
  with pytest.raises(ValueError, match="block_q=24"):
    pk.sparse_prefill(qp, kv, pidx, impl="pallas", **pkw, tuning=SparsePrefillTuning(block_q=24))
  with pytest.raises(ValueError, match="d_qk=256"):
    pk.sparse_prefill(qp[..., :256], kv[..., :256], pidx, sm_scale=0.1, d_v=256, impl="pallas")
  # tunings are jit static arguments: frozen dataclasses, equal and hashing equal by value
  assert DenseDecodeTuning.__dataclass_params__.frozen
  assert hash(DenseDecodeTuning(block_k=16)) == hash(DenseDecodeTuning(block_k=16))
  assert DenseDecodeTuning(block_k=16) != DenseDecodeTuning(block_k=32)
