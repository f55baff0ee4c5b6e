"""Kernel hardening: padding paths, 64-bit-safe addressing, no cache copies, bad input,
and the shared softmax / split heuristic.  CPU only (interpret mode and CUDA lowering).

Padding cases (one compilation each; features that are data vary inside a case):
  sparse decode  h_q=2 (one 16-row head block, 14 rows padding), top-k 40 (not a multiple
                 of block_k 32), lengths [37, 5], an extra cache of top-k 24 with lengths
                 [19, 0], two splits over a partial last block; the main cache given as
                 FlashMLA packed model1 bytes (read in place), the extra one as a KCache;
                 h_q=20 with block_q 16 (two head blocks, the second 4 real + 12 padding),
                 top-k 40, lengths [33, 40], a sink, one split (in-kernel epilogue).
  dense decode   h_q=4 x s_q=2 causal (8 rows in a 16-row block), seqlens 37 and 11 (not
                 multiples of block_k 16, partial pages of 5), three splits; the cache as
                 packed v32 bytes typed float8_e4m3fn (FlashMLA's dtype for them).
  sparse prefill h_q=16 with block_q 32 (half the block padding), top-k 40, lengths
                 [29, 40].
The cache-size tests lower for CUDA with ``jax.ShapeDtypeStruct`` arguments, so caches of
2-9 GiB are described, never allocated.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import cache_view, combine, softmax
from pallas_kernels.tuning import KernelTuning, choose_num_splits
from test_kernels import (DV, _dense_case, _export_cuda, _cache_sized, _prefill_case,
                          _sparse_case, assert_attention_close, randn, vmax)

S = jax.ShapeDtypeStruct


# ----------------------------------------------------------------------------- padding paths


def _sparse_padding_case(geometry, h_q, lengths, extra, sink, seed):
  rng = np.random.default_rng(seed)
  d, b, topk = {"v32": 576, "model1": 512}[geometry], 2, 40
  cache = pk.KCache.from_bf16(jnp.asarray(randn(rng, 9, 5, 1, d)), geometry)
  idx = rng.integers(0, cache.num_tokens, (b, 1, topk)).astype(np.int32)
  kw = dict(head_dim_v=DV, topk_length=jnp.asarray(lengths, jnp.int32))
  if extra:
    e_cache = pk.KCache.from_bf16(jnp.asarray(randn(rng, 4, 3, 1, d)), geometry)
    kw.update(extra_k_cache=e_cache,
              extra_indices_in_kvcache=jnp.asarray(rng.integers(0, 12, (b, 1, 24)), jnp.int32),
              extra_topk_length=jnp.asarray([19, 0], jnp.int32))
  if sink:
    kw["attn_sink"] = jnp.asarray(rng.standard_normal(h_q), jnp.float32)
  return jnp.asarray(randn(rng, b, 1, h_q, d)), cache, jnp.asarray(idx), kw


@pytest.mark.parametrize("geometry,h_q,block_q,lengths,extra,sink,splits,packed", [
    ("model1", 2, None, [37, 5], True, False, 2, True),
    ("v32", 20, 16, [33, 40], False, True, 1, False),
])
def test_sparse_decode_padding_paths(geometry, h_q, block_q, lengths, extra, sink, splits, packed):
  q, cache, idx, kw = _sparse_padding_case(geometry, h_q, lengths, extra, sink, seed=h_q)
  got = pk.sparse_decode(q, cache.to_packed_bytes() if packed else cache, idx, impl="pallas", **kw,
                         tuning=KernelTuning(block_q=block_q, num_splits=splits))
  want = pk.sparse_decode(q, cache, idx, impl="xla", **kw)
  assert got[0].shape == (2, 1, h_q, DV) and got[1].shape == (2, h_q, 1)
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))


def test_dense_decode_padding_paths():
  q, cache, table, seqlens = _dense_case("v32", "fp8", 4, 5, 2, False, True, seed=11)
  kw = dict(head_dim_v=DV, causal=True)
  packed = jax.lax.bitcast_convert_type(cache.to_packed_bytes(), jnp.float8_e4m3fn)
  got = pk.dense_decode(q, packed, table, seqlens, impl="pallas", **kw,
                        tuning=KernelTuning(block_k=16, num_splits=3))
  want = pk.dense_decode(q, cache, table, seqlens, impl="xla", **kw)
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))


def test_sparse_prefill_padding_paths():
  q, kv, idx, kw = _prefill_case("v32", 16, 40, True, False, False, False, False, seed=4)
  kw["topk_length"] = jnp.asarray([29, 40], jnp.int32)
  got = pk.sparse_prefill(q, kv, idx, impl="pallas", **kw, tuning=KernelTuning(block_q=32))
  want = pk.sparse_prefill(q, kv, idx, impl="xla", **kw)
  v = float(np.abs(np.asarray(kv).astype(np.float32)[..., :DV]).max())
  assert_attention_close(got[0], want[0], got[2], want[2], v)
  # fp32 logits of bf16 operands summed in another order over 576 terms: ~1e-6 relative.
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- addressing


def _triton_ir(monkeypatch, f, *args):
  """Triton IR text of the one kernel f lowers to (captured during the CUDA export)."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  captured = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    result = lower(*a, **k)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result
  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
  _export_cuda(f, *args)
  assert len(captured) == 1
  return captured[0]


_ADDPTR = re.compile(r"tt\.addptr .*: (?:tensor<[0-9x]*x)?!tt\.ptr<(\w+)>>?, (?:tensor<[0-9x]*x)?(i32|i64)")


def _addptrs(ir):
  return {(ptr, off) for ptr, off in _ADDPTR.findall(ir)}


def _abstract_cache(fmt, z, y):
  g = pk.GEOMETRY[fmt]
  sdt = jnp.float32 if fmt == "v32" else jnp.uint8
  return pk.KCache(S((z, y, g.d_nope), jnp.float8_e4m3fn), S((z, y, 64), jnp.bfloat16),
                   S((z, y, g.n_tiles), sdt), fmt)


def test_offsets_fit_past_2gib(monkeypatch):
  # v32, 65537 pages of 64 = 4,194,368 tokens: the NoPE codes are 2^31 + 32 KiB, past
  # int32 as bytes.  Read as uint16 pairs no 1-byte pointer is left, and 2-byte element
  # offsets of an array under 2^32 bytes fit in int32.
  cache = _abstract_cache("v32", 65537, 64)
  q, idx = S((1, 1, 64, 576), jnp.bfloat16), S((1, 1, 64), jnp.int32)
  ir = _triton_ir(monkeypatch, lambda q, c, i: pk.sparse_decode(
      q, c, i, head_dim_v=DV, impl="pallas", interpret=False), q, cache, idx)
  ptrs = _addptrs(ir)
  assert ("i16", "i32") in ptrs                        # the codes, as words
  assert not {p for p, _ in ptrs} & {"i8", "f8E4M3FN"}, ptrs
  # Past 2^32 bytes (model1, 9.6M tokens: codes 4.3 GB) Pallas uses int64 offsets.
  big = _abstract_cache("model1", 150000, 64)
  ir = _triton_ir(monkeypatch, lambda q, c, t, s: pk.dense_decode(
      q, c, t, s, head_dim_v=DV, impl="pallas", interpret=False),
      S((1, 1, 16, 512), jnp.bfloat16), big, S((1, 4), jnp.int32), S((1,), jnp.int32))
  assert ("i16", "i64") in _addptrs(ir) and ("i16", "i32") not in _addptrs(ir)


def test_offset_rule_at_large_sizes():
  # jax 0.11's rule: int64 offsets only for arrays over 2^32 bytes.
  assert cache_view.offset_bits((2**31 - 1,), jnp.uint8) == 32
  assert cache_view.offset_bits((2**32 + 1,), jnp.uint8) == 64
  assert cache_view.offset_bits((2**31,), jnp.uint16) == 32       # 2^32 bytes, offsets < 2^31
  cache_view.check_addressable("ok", (2**31,), jnp.uint16)
  cache_view.check_addressable("ok", (2**32 + 1,), jnp.uint8)
  with pytest.raises(ValueError, match=r"scales.*shape=\(306783379, 7\)"):
    cache_view.check_addressable("k_cache (scales array)", (306783379, 7), jnp.uint8)
  # Through the entry point: model1 scale rows in the window are refused before launch.
  cache = _abstract_cache("model1", 4793491, 64)                 # 306,783,424 tokens
  with pytest.raises(ValueError, match="scales array"):
    _export_cuda(lambda q, c, i: pk.sparse_decode(q, c, i, head_dim_v=DV, impl="pallas",
                                                  interpret=False),
                 S((1, 1, 16, 512), jnp.bfloat16), cache, S((1, 1, 32), jnp.int32))


# ----------------------------------------------------------------------------- no copies


def _sparse_fn(impl, splits=2, interpret=None):
  """sparse_decode as a function of (q, cache, indices); interpret=False: the GPU program."""
  return lambda q, c, i: pk.sparse_decode(q, c, i, head_dim_v=DV, impl=impl,
                                          **(dict(tuning=KernelTuning(num_splits=splits),
                                                  interpret=interpret) if impl == "pallas" else {}))


def test_sparse_decode_never_materialises_a_dequantised_cache():
  cache = pk.KCache.empty(41, 5, "v32")                  # 205 tokens
  q = jnp.zeros((1, 1, 16, 576), jnp.bfloat16)
  idx = jnp.zeros((1, 1, 256), jnp.int32)                # more picks than tokens
  # Interpret mode compiles the kernel body to XLA:CPU, so its buffers are visible here.
  hlo = jax.jit(_sparse_fn("pallas")).lower(q, cache, idx).compile().as_text()
  assert not _cache_sized(hlo, 205), _cache_sized(hlo, 205)[:3]
  assert not _cache_sized(_export_cuda(_sparse_fn("pallas", interpret=False), q, cache, idx), 205)
  # The grep finds the reference's dequantised gather (256 keys >= 205 rows).
  assert _cache_sized(jax.jit(_sparse_fn("xla")).lower(q, cache, idx).as_text(), 205)


_RESULT = re.compile(r"^\s*%\S+ = (?:\"?)([\w.]+).*-> (?:\()?tensor<((?:\d+x)+)\w+>")


def _cache_copies(mlir, num_tokens):
  """Ops of the StableHLO text whose result has >= num_tokens rows (leading dims), other
  than reshapes and bitcasts (XLA emits those as views) and the kernel call itself."""
  copies = []
  for line in mlir.splitlines():
    m = _RESULT.match(line)
    if not m or m.group(1).split(".")[-1] in ("reshape", "bitcast_convert", "custom_call", "call"):
      continue
    dims = [int(x) for x in m.group(2).rstrip("x").split("x")]
    if len(dims) >= 2 and int(np.prod(dims[:-1])) >= num_tokens:
      copies.append(m.group(1))
  return copies


def test_cache_inputs_are_not_copied_per_call():
  rng = np.random.default_rng(0)
  x = jnp.asarray(randn(rng, 41, 5, 1, 576))
  q, idx = jnp.zeros((1, 1, 16, 576), jnp.bfloat16), jnp.zeros((1, 1, 64), jnp.int32)
  f = _sparse_fn("pallas", splits=1, interpret=False)
  counts = {name: len(_cache_copies(_export_cuda(f, q, c, idx), 205)) for name, c in [
      ("kcache", pk.KCache.from_bf16(x, "v32")), ("bf16 [Z,Y,1,d]", x),
      ("packed v32", pk.quantize_k_cache(x, "v32"))]}
  assert counts == {"kcache": 0, "bf16 [Z,Y,1,d]": 0, "packed v32": 0}, counts
  # The counter does see a conversion: the XLA reference unpacks packed bytes (3 slices).
  ref = _export_cuda(_sparse_fn("xla"), q, pk.quantize_k_cache(x, "v32"), idx)
  assert len(_cache_copies(ref, 205)) >= 3
  dense = lambda q, c, t, s: pk.dense_decode(q, c, t, s, head_dim_v=DV, impl="pallas",
                                             interpret=False)
  q5 = q[..., :512]
  for c in (x[..., :512], pk.quantize_k_cache(x[..., :512], "model1")):
    txt = _export_cuda(dense, q5, c, jnp.zeros((1, 9), jnp.int32), jnp.zeros((1,), jnp.int32))
    assert not _cache_copies(txt, 205), _cache_copies(txt, 205)


# ----------------------------------------------------------------------------- shared helpers


def test_softmax_forms_agree():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((4, 96)) * 4, jnp.float32)
  valid = jnp.asarray(rng.random((4, 96)) < 0.7).at[3].set(False)     # row 3 empty
  sink = jnp.asarray([0.5, -jnp.inf, jnp.inf, 1.0], jnp.float32)
  p, lse, mx = softmax.masked_softmax(logits, valid, sink)
  # Online over three blocks, then the same sink and empty-row rule.
  m, l = softmax.online_init(4)
  acc = jnp.zeros((4,), jnp.float32)
  for blk in range(3):
    s = jnp.where(valid[:, blk * 32:(blk + 1) * 32], logits[:, blk * 32:(blk + 1) * 32], -jnp.inf)
    m, alpha, pb, l = softmax.online_step(m, l, s)
    acc = acc * alpha + pb.sum(1)
  factor, lse_on = softmax.online_finish(m, l, sink, final=True)
  # sum p = 1/(1+exp(sink-lse)): rows 0, 3 exact arithmetic, fp32 rounding only.
  np.testing.assert_allclose(np.asarray(p.sum(1)), np.asarray(acc * factor), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(lse)[:3], np.asarray(lse_on)[:3], rtol=1e-6)
  assert np.asarray(lse)[3] == -np.inf and np.asarray(lse_on)[3] == np.inf      # internal vs public
  assert float(p[2].sum()) == 0.0 and float(p[3].sum()) == 0.0 and np.asarray(mx)[3] == -np.inf
  # combine = the masked softmax over splits' lse values.
  out, lse_c = combine.combine_splits(jnp.ones((2, 4, 8)), jnp.stack([lse, lse]))
  np.testing.assert_allclose(np.asarray(lse_c)[:3], np.asarray(lse)[:3] + np.log(2), rtol=1e-6)


def test_split_heuristic():
  kw = dict(partial_bytes_per_split=16 * 513 * 4, max_key_blocks=512, interpret=False)
  # 16 heads x (512 + 1) fp32 per split; 16384 v32 tokens = 10.7 MB per program.
  t = KernelTuning()
  # One long sequence: split wide; a full GPU of programs: no split.
  assert choose_num_splits(t, programs=1, kv_bytes_per_program=16384 * 656, **kw) >= 32
  assert choose_num_splits(t, programs=264, kv_bytes_per_program=16384 * 656, **kw) == 1
  # Keys too few to pay for fp32 partials: no split.
  assert choose_num_splits(t, programs=1, kv_bytes_per_program=64 * 656,
                           **{**kw, "max_key_blocks": 2}) == 1
  # Interpret mode counts 2 "SMs": a single program splits in two when keys are plenty.
  assert choose_num_splits(t, programs=1, kv_bytes_per_program=16384 * 656,
                           **{**kw, "interpret": True}) == 2
  assert choose_num_splits(KernelTuning(num_splits=5), programs=1, kv_bytes_per_program=1, **kw) == 5


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors_naming_the_argument():
  q, cache, idx, kw = _sparse_case("v32", 16, 3, 64, False, False, False, False, False, 1, 0)
  sd = lambda **o: pk.sparse_decode(**{"q": q, "k_cache": cache, "indices": idx, "impl": "pallas",
                                      **kw, **o})
  for over, pat in [
      (dict(q=q.astype(jnp.float32)), r"q shape=\(2, 1, 16, 576\) dtype=float32"),
      (dict(indices=idx.astype(jnp.int16)), "indices shape=.* dtype=int16: expected int32"),
      (dict(indices=idx.at[0, 0, 0].set(10**6)), r"indices\[\(0, 0, 0\)\]=1000000"),
      (dict(topk_length=jnp.asarray([65, 3], jnp.int32)), r"topk_length=\[65, 3\].*\[0, 64\]"),
      (dict(attn_sink=jnp.zeros((8,), jnp.float32)), r"attn_sink shape=\(8,\).*float32 \[16\]"),
      (dict(softmax_scale=-1.0), r"softmax_scale=-1.0: expected a finite value > 0"),
      (dict(impl="cuda"), "impl='cuda': expected one of"),
      (dict(tuning=KernelTuning(block_k=48)), "block_k=48"),
      (dict(tuning=KernelTuning(num_splits=0)), "num_splits=0"),
      (dict(tuning=dict(block_k=16)), r"tuning=\{'block_k': 16\}: expected"),
      (dict(interpret="yes"), "interpret='yes': expected"),
      (dict(k_cache=jnp.zeros((2, 4, 1, 600), jnp.uint8)), r"k_cache shape=\(2, 4, 1, 600\)"),
      (dict(extra_topk_length=jnp.zeros((2,), jnp.int32)), "extra_topk_length given without"),
  ]:
    with pytest.raises(ValueError, match=pat):
      sd(**over)
  qd, dcache, table, lens = _dense_case("model1", "fp8", 16, 5, 1, False, False, seed=0)
  dd = lambda **o: pk.dense_decode(**{"q": qd, "k_cache": dcache, "block_table": table,
                                     "cache_seqlens": lens, "head_dim_v": DV, "impl": "pallas", **o})
  for over, pat in [
      (dict(cache_seqlens=lens.at[0].set(999)), r"cache_seqlens=\[999, 11\]: expected values in"),
      (dict(block_table=table[0]), r"block_table shape=\(\d+,\) dtype=int32: expected int32 \[2, max_blocks\]"),
      (dict(causal=1), "causal=1: expected a bool"),
      (dict(head_dim_v=100), r"head_dim_v \(d_v\)=100"),
      (dict(tuning=KernelTuning(block_q=8)), "block_q=8"),
  ]:
    with pytest.raises(ValueError, match=pat):
      dd(**over)
  qp, kv, pidx, pkw = _prefill_case("model1", 16, 64, False, False, False, False, False, 0)
  sp = lambda **o: pk.sparse_prefill(**{"q": qp, "kv": kv, "indices": pidx, "impl": "pallas",
                                       **pkw, **o})
  for over, pat in [
      (dict(kv=kv[..., :256]), r"kv shape=\(40, 1, 256\).*expected bf16 \[s_kv, 1, 512\]"),
      (dict(sm_scale=None), "sm_scale=None"),
      (dict(sm_scale=float("nan")), "sm_scale=nan"),
      (dict(topk_length=jnp.asarray([70, 1], jnp.int32)), r"topk_length=\[70, 1\]"),
      (dict(tuning=KernelTuning(num_splits=2)), "num_splits=2: sparse prefill does not split"),
  ]:
    with pytest.raises(ValueError, match=pat):
      sp(**over)
  out, lse = jnp.zeros((2, 3, 4, 8)), jnp.zeros((2, 3, 4))
  for args, kwargs, pat in [
      ((out, lse[:, :, :2]), {}, r"lse_SN shape=\(2, 3, 2\)"),
      ((out.astype(jnp.int32), lse), {}, "out_SNV shape=.* dtype=int32"),
      ((out, lse), dict(attn_sink_N=jnp.zeros((5,))), r"attn_sink_N shape=\(5,\)"),
  ]:
    with pytest.raises(ValueError, match=pat):
      combine.combine_splits(*args, **kwargs)
