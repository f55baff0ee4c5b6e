"""Reference attention (the oracles Pallas kernels are tested against): FlashMLA semantics.

Checked against an independent float64 numpy loop over (batch, query, head) on the
dequantised keys; plus the edge rules of docs/design.md §4: sink, empty rows, NaN bytes behind
invalid slots, topk_length, the extra cache, split-KV combine, causal masking, bad inputs.
Shapes are tiny (blocks of 3-4 tokens, 4 heads) but keep the real 576/512 head geometry;
they are shared so that the jitted cores compile once per format.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import combine, fp8_cache
from pallas_kernels.sparse_decode import attend_sparse_fp32, validate_sparse_decode_args

D = {"v32": 576, "model1": 512}
B, S_Q, H_Q, TOPK, Z, Y = 2, 2, 4, 6, 3, 4
DV = 512
BF16_ULP = 2.0**-8          # bf16 has 8 significant bits: output rounding is <= half of this


def randn(seed, *shape):
  """bf16 normal samples from numpy (jax.random would compile a program per shape)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(ml_dtypes.bfloat16)


def make_cache(fmt, seed, z=Z, y=Y):
  return pk.KCache.from_bf16(jnp.asarray(randn(seed, z, y, 1, D[fmt])), fmt)


def make_q(fmt, seed, b=B, s_q=S_Q):
  return jnp.asarray(randn(seed, b, s_q, H_Q, D[fmt]))


def keys_np(cache):
  """Dequantised keys, one row per flat slot (dequantisation is tested in test_fp8_cache)."""
  return np.asarray(cache.to_bf16()).astype(np.float64).reshape(cache.num_tokens, -1)


def naive(q_NH, keys_XH, scale, sink_N=None, dv=DV):
  """float64 attention of one query row over the given keys -> (out [N, dv], lse [N], max [N])."""
  if len(keys_XH) == 0:
    n = q_NH.shape[0]
    return np.zeros((n, dv)), np.full(n, np.inf), np.full(n, -np.inf)
  logits = scale * q_NH.astype(np.float64) @ keys_XH.T
  m = logits.max(-1)
  lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
  out = np.exp(logits - lse[:, None]) @ keys_XH[:, :dv]
  if sink_N is not None:
    with np.errstate(over="ignore"):
      out = out / (1.0 + np.exp(sink_N.astype(np.float64) - lse))[:, None]
  return out, lse, m


def assert_out_close(got_bf16, want_f64):
  got = np.asarray(got_bf16).astype(np.float64)
  # bf16 output rounding (half an ulp, relative) plus fp32 accumulation noise over <=12 keys.
  np.testing.assert_allclose(got, want_f64, rtol=BF16_ULP, atol=1e-5)


def assert_lse_close(got, want):
  # fp32 logits from a 576-term fp32 dot product vs float64: ~1e-6 relative, finite rows.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["v32", "model1"])
def setup(request):
  fmt = request.param
  cache = make_cache(fmt, 0)
  idx = np.array([[[0, 5, 11, -1, 7, 3], [2, -1, -1, -1, -1, -1]],
                  [[4, 4, 9, 1, 10, 6], [-1, -1, -1, -1, -1, -1]]], np.int32)   # row (1,1) empty
  return fmt, cache, make_q(fmt, 1), idx


def naive_sparse(q, cache, idx, lengths, scale, sink=None, extra=None):
  k_all = keys_np(cache)
  qn = np.asarray(q).astype(np.float64)
  out = np.zeros((B, S_Q, H_Q, DV))
  lse = np.zeros((B, H_Q, S_Q))
  for b in range(B):
    for t in range(S_Q):
      sel = [k_all[i] for x, i in enumerate(idx[b, t]) if i != -1 and x < lengths[b]]
      if extra is not None:
        e_cache, e_idx, e_len = extra
        e_all = keys_np(e_cache)
        sel += [e_all[i] for x, i in enumerate(e_idx[b, t]) if i != -1 and x < e_len[b]]
      o, l, _ = naive(qn[b, t], np.array(sel).reshape(len(sel), k_all.shape[1]), scale, sink)
      out[b, t], lse[b, :, t] = o, l
  return out, lse


# ----------------------------------------------------------------------------- sparse decode


def test_sparse_decode_matches_naive_with_sink_and_lengths(setup):
  fmt, cache, q, idx = setup
  sink = jnp.asarray([0.5, -1.0, jnp.inf, -jnp.inf], jnp.float32)
  lengths = np.array([5, 6], np.int32)
  scale = 0.07
  out, lse = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV, softmax_scale=scale,
                              attn_sink=sink, topk_length=jnp.asarray(lengths))
  assert out.shape == (B, S_Q, H_Q, DV) and out.dtype == jnp.bfloat16
  assert lse.shape == (B, H_Q, S_Q) and lse.dtype == jnp.float32
  want_out, want_lse = naive_sparse(q, cache, idx, lengths, scale, np.asarray(sink))
  assert_out_close(out, want_out)
  assert_lse_close(lse, want_lse)
  # Under an outer jit (as the model calls it) the value checks are skipped, results equal.
  jitted = jax.jit(lambda *a: pk.sparse_decode(*a[:3], head_dim_v=DV, softmax_scale=scale,
                                               attn_sink=a[3], topk_length=a[4]))
  out_j, lse_j = jitted(q, cache, jnp.asarray(idx), sink, jnp.asarray(lengths))
  # Same HLO inlined into another program: only a fusion-order change could differ (1 ulp).
  np.testing.assert_allclose(np.asarray(out_j).astype(np.float32),
                             np.asarray(out).astype(np.float32), rtol=BF16_ULP, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse_j), np.asarray(lse), rtol=1e-6)
  # Same through FlashMLA's packed bytes, and with the default scale d_qk^-0.5.
  out2, lse2 = pk.sparse_decode(q, cache.to_packed_bytes(), jnp.asarray(idx), head_dim_v=DV)
  want_out, want_lse = naive_sparse(q, cache, idx, [TOPK] * B, D[fmt] ** -0.5)
  assert_out_close(out2, want_out)
  assert_lse_close(lse2, want_lse)


def test_sink_formula_and_empty_rows(setup):
  fmt, cache, q, idx = setup
  args = validate_sparse_decode_args(q, cache, jnp.asarray(idx), head_dim_v=DV)
  out_f32, lse_btn = attend_sparse_fp32(args["q"], cache, args["indices"], args["topk_length"],
                                        args["softmax_scale"], head_dim_v=DV)
  sink = jnp.asarray([0.3, 2.0, jnp.inf, -jnp.inf], jnp.float32)
  out_s, lse_s = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV, attn_sink=sink)
  out_0, lse_0 = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV)
  np.testing.assert_array_equal(np.asarray(lse_s), np.asarray(lse_0))   # lse excludes the sink
  with np.errstate(invalid="ignore"):                   # -inf - (-inf) in the empty row
    factor = 1.0 / (1.0 + np.exp(np.asarray(sink)[None, None, :] - np.asarray(lse_btn)))
  want = np.asarray(out_f32) * factor[..., None]
  want[1, 1] = 0                                                        # the empty row
  # numpy's and XLA's fp32 exp may differ by an ulp, which can flip one bf16 rounding.
  np.testing.assert_allclose(np.asarray(out_s).astype(np.float32), want, rtol=BF16_ULP, atol=1e-7)
  assert (np.asarray(out_s)[:, :, 2] == 0).all()                        # sink +inf -> 0
  np.testing.assert_array_equal(np.asarray(out_s)[:, :, 3], np.asarray(out_0)[:, :, 3])  # -inf: no-op
  # Row (1, 1) has only -1 indices; every row with topk_length 0 is empty too.
  assert (np.asarray(out_0)[1, 1] == 0).all() and (np.asarray(lse_0)[1, :, 1] == np.inf).all()
  out_e, lse_e = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV, attn_sink=sink,
                                  topk_length=jnp.asarray([0, 0], jnp.int32))
  assert (np.asarray(out_e) == 0).all() and (np.asarray(lse_e) == np.inf).all()


def nan_poisoned(cache, slots):
  """Packed bytes of cache with every byte of the given tokens set to 0xFF (NaN codes,
  NaN scales, NaN RoPE)."""
  raw = np.array(cache.to_packed_bytes())
  for s in slots:
    blk, off = divmod(s, cache.block_size)
    if cache.fmt == "v32":
      raw[blk, off] = 0xFF
    else:
      raw[blk, off * 576:(off + 1) * 576] = 0xFF
      raw[blk, cache.block_size * 576 + off * 8:cache.block_size * 576 + off * 8 + 8] = 0xFF
  return jnp.asarray(raw)


def test_invalid_slots_and_entries_past_topk_length_never_leak(setup):
  fmt, cache, q, idx = setup
  lengths = jnp.asarray([4, 3], jnp.int32)
  clean_out, clean_lse = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV,
                                          topk_length=lengths)
  # Slot 0 is poisoned: -1 entries gather it (clamped) and entries past topk_length point at it
  # or far outside the cache (never read, so not an error either).
  bad_idx = idx.copy()
  bad_idx[0, 0, 4:] = [0, 10**6]
  bad_idx[1, 0, 3:] = [0, 0, -7]
  bad_idx[0, 0, 0] = 8                     # (a valid entry; slot 8 is clean)
  want_out, want_lse = pk.sparse_decode(q, cache, jnp.asarray(np.where(
      np.arange(TOPK) < np.asarray(lengths)[:, None, None], bad_idx, -1).astype(np.int32)),
      head_dim_v=DV)
  poisoned = pk.as_kcache(nan_poisoned(cache, [0]))
  out, lse = pk.sparse_decode(q, poisoned, jnp.asarray(bad_idx), head_dim_v=DV, topk_length=lengths)
  assert np.isfinite(np.asarray(out).astype(np.float32)).all()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  # And poisoning slots that no counted index points at changes nothing.
  out2, lse2 = pk.sparse_decode(q, pk.as_kcache(nan_poisoned(cache, [1, 8])), jnp.asarray(idx),
                                head_dim_v=DV, topk_length=lengths)
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(clean_out))
  np.testing.assert_array_equal(np.asarray(lse2), np.asarray(clean_lse))


def test_extra_cache_is_a_concatenation(setup):
  fmt, cache, q, idx = setup
  extra = make_cache(fmt, 7, z=2, y=3)                  # own block size
  e_idx = np.array([[[5, -1, 0], [1, 2, 3]], [[-1, -1, -1], [4, 0, -1]]], np.int32)
  e_len = np.array([3, 2], np.int32)
  lengths = np.array([6, 5], np.int32)
  sink = jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32)
  out, lse = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV, attn_sink=sink,
                              topk_length=jnp.asarray(lengths), extra_k_cache=extra,
                              extra_indices_in_kvcache=jnp.asarray(e_idx),
                              extra_topk_length=jnp.asarray(e_len))
  # One cache holding both (block size 1), the extra indices shifted past the main tokens.
  both = fp8_cache.concat_tokens([cache, extra])
  e_shift = np.where(e_idx >= 0, e_idx + cache.num_tokens, -1)
  e_shift = np.where(np.arange(3) < e_len[:, None, None], e_shift, -1)
  m_idx = np.where(np.arange(TOPK) < lengths[:, None, None], idx, -1)
  cat_out, cat_lse = pk.sparse_decode(q, both, jnp.asarray(np.concatenate([m_idx, e_shift], -1)),
                                      head_dim_v=DV, attn_sink=sink)
  # Same keys in the same order, but a different XLA program: allow fp32 reassociation noise.
  np.testing.assert_allclose(np.asarray(out).astype(np.float32),
                             np.asarray(cat_out).astype(np.float32), rtol=BF16_ULP, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(cat_lse), rtol=1e-6)
  want_out, want_lse = naive_sparse(q, cache, idx, lengths, D[fmt] ** -0.5, np.asarray(sink),
                                    extra=(extra, e_idx, e_len))
  assert_out_close(out, want_out)
  assert_lse_close(lse, want_lse)                       # row (1,1) now has extra keys


def test_split_kv_combine_equals_unsplit(setup):
  fmt, cache, q, idx = setup
  sink = jnp.asarray([0.5, -0.5, 1.0, -jnp.inf], jnp.float32)
  args = validate_sparse_decode_args(q, cache, jnp.asarray(idx), head_dim_v=DV)
  whole = attend_sparse_fp32(args["q"], cache, args["indices"], args["topk_length"],
                             args["softmax_scale"], head_dim_v=DV)
  half = TOPK // 2
  parts = [attend_sparse_fp32(args["q"], cache, args["indices"][..., sl],
                              jnp.full((B,), half, jnp.int32), args["softmax_scale"], head_dim_v=DV)
           for sl in (slice(0, half), slice(half, TOPK))]
  out_s = jnp.stack([p[0] for p in parts])
  lse_s = jnp.stack([p[1] for p in parts])
  out, lse = pk.combine_splits(out_s, lse_s)
  # fp32 rescaling by exp(lse_i - lse): a few fp32 ulps against the one-pass softmax.
  np.testing.assert_allclose(np.asarray(out), np.asarray(whole[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.where(np.isinf(whole[1]), np.inf, whole[1]),
                             rtol=1e-6)
  # With the sink applied after merging it matches the public function's bf16 output.
  out_b, lse_b = pk.combine_splits(out_s, lse_s, attn_sink_N=sink, out_dtype=jnp.bfloat16)
  ref_out, ref_lse = pk.sparse_decode(q, cache, jnp.asarray(idx), head_dim_v=DV, attn_sink=sink)
  # Both round the same fp32 value (up to fp32 noise) to bf16: at most one bf16 ulp apart.
  np.testing.assert_allclose(np.asarray(out_b).astype(np.float32),
                             np.asarray(ref_out).astype(np.float32), rtol=2 * BF16_ULP, atol=1e-6)
  # A split reporting "empty" (lse +inf, FlashMLA's convention) weighs nothing, even if NaN.
  junk_out = jnp.full_like(out_s[:1], jnp.nan)
  junk_lse = jnp.full_like(lse_s[:1], jnp.inf)
  out_j, lse_j = pk.combine_splits(jnp.concatenate([out_s, junk_out]),
                                   jnp.concatenate([lse_s, junk_lse]))
  # Same HLO inlined into another program: only a fusion-order change could differ (1 ulp).
  np.testing.assert_allclose(np.asarray(out_j).astype(np.float32),
                             np.asarray(out).astype(np.float32), rtol=BF16_ULP, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse_j), np.asarray(lse), rtol=1e-6)


# ----------------------------------------------------------------------------- dense decode


@pytest.mark.parametrize("fmt,causal", [("v32", True), ("model1", True), ("bf16", True),
                                        ("model1", False)])
def test_dense_decode_matches_naive_causal(fmt, causal):
  d = 576 if fmt in ("v32", "bf16") else 512
  s_q = 3
  cache = pk.KCache.from_bf16(jnp.asarray(randn(3, Z + 1, Y, 1, d)), fmt)
  q = jnp.asarray(randn(4, B, s_q, H_Q, d))
  table = np.array([[2, 0, 3], [1, -5, 99]], np.int32)    # unused pages may hold garbage ids
  seqlens = np.array([10, 2], np.int32)                    # batch 1: query 0 sees nothing
  out, lse = pk.dense_decode(q, cache, jnp.asarray(table), jnp.asarray(seqlens),
                             head_dim_v=DV, causal=causal)
  out, lse = np.asarray(out), np.asarray(lse)
  k_all = keys_np(cache)
  qn = np.asarray(q).astype(np.float64)
  for b in range(B):
    seq = np.concatenate([k_all[p * Y:(p + 1) * Y] for p in np.clip(table[b], 0, Z)])
    for t in range(s_q):
      last = seqlens[b] - s_q + t if causal else seqlens[b] - 1
      o, l, _ = naive(qn[b, t], seq[:max(last + 1, 0)], d ** -0.5)
      assert_out_close(out[b, t], o)
      assert_lse_close(lse[b, :, t], l)
  if causal:
    assert (np.asarray(out)[1, 0] == 0).all() and (np.asarray(lse)[1, :, 0] == np.inf).all()


def test_dense_decode_gqa_bf16_heads():
  h_kv, d = 2, 512
  k = jnp.asarray(randn(5, Z, Y, h_kv, d))
  q = jnp.asarray(randn(6, 1, 1, H_Q, d))
  table = jnp.asarray([[1, 2]], jnp.int32)
  out, lse = pk.dense_decode(q, k, table, jnp.asarray([7], jnp.int32), head_dim_v=DV)
  out, lse = np.asarray(out), np.asarray(lse)
  kn = np.asarray(k).astype(np.float64)[[1, 2]].reshape(2 * Y, h_kv, d)[:7]
  for n in range(H_Q):
    o, l, _ = naive(np.asarray(q)[0, 0, n:n + 1], kn[:, n // (H_Q // h_kv)], d ** -0.5)
    assert_out_close(out[0, 0, n:n + 1], o)
    assert_lse_close(lse[0, n:n + 1, 0], l)


# ----------------------------------------------------------------------------- sparse prefill


def test_sparse_prefill_matches_naive():
  s_q, s_kv, d, topk = 3, 7, 512, 5
  kv = randn(8, s_kv, 1, d)
  kv[6] = np.nan                                        # only ever behind invalid entries
  q = jnp.asarray(randn(9, s_q, H_Q, d))
  idx = np.array([[[0, 3, -1, 7, 2]], [[-2, 9, 7, 100, -1]], [[5, 1, 1, 4, 6]]], np.int32)
  lengths = np.array([5, 5, 4], np.int32)               # row 2: the NaN key (6) is past it
  sink = jnp.asarray([0.2, -jnp.inf, jnp.inf, 1.5], jnp.float32)
  scale = 0.05
  out, max_logits, lse = pk.sparse_prefill(q, jnp.asarray(kv), jnp.asarray(idx), sm_scale=scale,
                                           attn_sink=sink, topk_length=jnp.asarray(lengths))
  out, max_logits, lse = np.asarray(out), np.asarray(max_logits), np.asarray(lse)
  assert out.shape == (s_q, H_Q, DV) and max_logits.shape == lse.shape == (s_q, H_Q)
  kvn = kv[:, 0].astype(np.float64)
  for t in range(s_q):
    sel = [kvn[i] for x, i in enumerate(idx[t, 0]) if 0 <= i < s_kv and x < lengths[t]]
    o, l, m = naive(np.asarray(q)[t], np.array(sel).reshape(len(sel), d), scale, np.asarray(sink))
    assert_out_close(out[t], o)
    assert_lse_close(lse[t], l)
    assert_lse_close(max_logits[t], m)
  # Row 1 has no valid index: out 0, max_logits -inf, lse +inf.
  assert (np.asarray(out)[1] == 0).all()
  assert (np.asarray(max_logits)[1] == -np.inf).all() and (np.asarray(lse)[1] == np.inf).all()


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise(setup):
  fmt, cache, q, idx = setup
  i = jnp.asarray(idx)
  with pytest.raises(ValueError, match=r"indices\[\(0, 0, 1\)\]=12 is outside the cache"):
    pk.sparse_decode(q, cache, i.at[0, 0, 1].set(Z * Y), head_dim_v=DV)
  with pytest.raises(ValueError, match="outside the cache"):
    pk.sparse_decode(q, cache, i.at[1, 0, 0].set(-2), head_dim_v=DV)
  with pytest.raises(ValueError, match="indices .*int32"):
    pk.sparse_decode(q, cache, i.astype(jnp.int16),
                     head_dim_v=DV)
  with pytest.raises(ValueError, match="k_cache dtype=float32"):
    pk.sparse_decode(q, jnp.zeros((Z, Y, 1, D[fmt]), jnp.float32), i, head_dim_v=DV)
  with pytest.raises(ValueError, match="k_cache shape"):
    pk.sparse_decode(q, jnp.zeros((Z, Y, 1, 600), jnp.uint8), i, head_dim_v=DV)
  with pytest.raises(ValueError, match="head dim"):
    pk.sparse_decode(q[..., :448], cache, i, head_dim_v=DV)
  with pytest.raises(ValueError, match="q shape.*dtype=float32"):
    pk.sparse_decode(q.astype(jnp.float32), cache, i, head_dim_v=DV)
  with pytest.raises(ValueError, match="attn_sink"):
    pk.sparse_decode(q, cache, i, head_dim_v=DV, attn_sink=jnp.zeros((3,), jnp.float32))
  with pytest.raises(ValueError, match="topk_length"):
    pk.sparse_decode(q, cache, i, head_dim_v=DV, topk_length=jnp.asarray([7, 0], jnp.int32))
  with pytest.raises(ValueError, match="head_dim_v"):
    pk.sparse_decode(q, cache, i, head_dim_v=1024)
  with pytest.raises(ValueError, match="whole key tiles"):      # the kernels' value tiling
    pk.sparse_decode(q, cache, i, head_dim_v=100, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    pk.sparse_decode(q, cache, i, head_dim_v=DV, impl="cuda")
  table = jnp.asarray([[0, 1], [2, 0]], jnp.int32)
  with pytest.raises(ValueError, match="cache_seqlens"):
    pk.dense_decode(q, cache, table, jnp.asarray([9, 1], jnp.int32), head_dim_v=DV)
  with pytest.raises(ValueError, match=r"block_table\[\(1, 0\)\]=3"):
    pk.dense_decode(q, cache, table.at[1, 0].set(Z), jnp.asarray([8, 1], jnp.int32), head_dim_v=DV)
  with pytest.raises(ValueError, match="whole key tiles"):
    pk.dense_decode(q, cache, table, jnp.asarray([8, 1], jnp.int32), head_dim_v=100, impl="pallas")
  kv = jnp.zeros((5, 1, D[fmt]), jnp.bfloat16)
  with pytest.raises(ValueError, match="kv shape"):
    pk.sparse_prefill(q[0], kv[:, 0], i[0][:, None], sm_scale=0.1)
  with pytest.raises(ValueError, match="whole key tiles"):
    pk.sparse_prefill(q[0], kv, i[0][:, None], sm_scale=0.1, d_v=100, impl="pallas")
