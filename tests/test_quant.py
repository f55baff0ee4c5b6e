"""model1.quant (DeepSeek's FP8 block-128 / FP4 e2m1 formats and QAT quantisers) against an
independent numpy transcription, plus the float32 fidelity fixes (f32 decode cache,
indexer Hadamard, float32 LM head).

The transcription decodes e4m3/e2m1 from their bit fields, rounds to bf16 with integer
bit operations, and rounds to the FP8/FP4 grids by nearest value over an enumerated
grid with ties to the even code, as DeepSeek's kernels (``act_quant``, ``fp4_act_quant``
with power-of-two scales from ``fast_round_scale``) and ``weight_dequant`` do; none of it
uses ml_dtypes' casts."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from model1 import qat, quant

# ------------------------------------------------------------- the transcription


def e4m3_value(code: np.ndarray) -> np.ndarray:
  c = code.astype(np.int64)
  s, e, m = (c >> 7) & 1, (c >> 3) & 15, c & 7
  mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7))
  mag = np.where((e == 15) & (m == 7), np.nan, mag)
  return np.where(s == 1, -mag, mag)


def bf16_round(x32: np.ndarray) -> np.ndarray:
  """float32 -> nearest bfloat16 (ties to even), returned as float32."""
  b = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
  r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
  return r.astype(np.uint32).view(np.float32)


def grid_round(v: np.ndarray, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Nearest grid value, ties to the even code (values sorted ascending, finite)."""
  d = np.abs(v[..., None] - values)
  best = d.min(-1, keepdims=True)
  tie = d == best
  pick = np.where(tie & (codes % 2 == 0), 0, 1) + np.where(tie, 0, 10)
  return values[np.argmin(pick, -1)]


_E4M3 = e4m3_value(np.arange(256))
_E4M3_CODES = np.array([c for c in range(256) if np.isfinite(_E4M3[c]) and c != 128])
_E4M3_VALUES = _E4M3[_E4M3_CODES]
_FP4_CODES = np.array([8 + 7, 8 + 6, 8 + 5, 8 + 4, 8 + 3, 8 + 2, 8 + 1, 0, 1, 2, 3, 4, 5, 6, 7])
_FP4_VALUES = np.array([-6, -4, -3, -2, -1.5, -1, -.5, 0, .5, 1, 1.5, 2, 3, 4, 6], np.float64)
_FP4_DEEPSEEK = {c: v for c, v in zip(_FP4_CODES, _FP4_VALUES)} | {8: 0.0}


def round_scale(amax: np.ndarray, qmax: float) -> np.ndarray:
  """fast_round_scale: 2^ceil(log2(amax / qmax)) from the float32 bits."""
  y = (amax.astype(np.float32) * np.float32(1.0 / qmax)).astype(np.float32)
  bits = y.view(np.uint32)
  e = ((bits >> 23) & 0xFF).astype(np.int64) - 127 + ((bits & 0x7FFFFF) != 0)
  return (2.0 ** e).astype(np.float32)


def ref_quant(x: np.ndarray, rows: int, cols: int, fmt: str) -> np.ndarray:
  """Quantise-dequantise ``x`` in [rows, cols] blocks (power-of-two scales), float64."""
  qmax, floor = (448.0, 1e-4) if fmt == "fp8" else (6.0, 6 * 2.0 ** -126)
  vals = (_E4M3_VALUES, _E4M3_CODES) if fmt == "fp8" else (_FP4_VALUES, _FP4_CODES)
  out = np.zeros(x.shape)
  for i in range(0, x.shape[0], rows):
    for j in range(0, x.shape[1], cols):
      blk = x[i:i + rows, j:j + cols].astype(np.float32)
      s = round_scale(np.maximum(np.abs(blk).max(), np.float32(floor)), qmax)
      q = np.clip(blk / s, -qmax, qmax)
      out[i:i + rows, j:j + cols] = grid_round(q.astype(np.float64), *vals) * s
  return out


# ------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("scale_kind", ["e8m0", "f32"])
def test_dequant_fp8_matches_transcription(scale_kind):
  rng = np.random.RandomState(0)
  codes = rng.choice(_E4M3_CODES, size=(200, 300)).astype(np.uint8)   # partial blocks
  codes[0, :4] = [0x7E, 0xFE, 0x00, 0x80]                              # +-448 (saturated), +-0
  if scale_kind == "e8m0":
    e = rng.randint(100, 140, size=(2, 3)).astype(np.uint8)
    e[0, 0] = 254                                                      # 448 * 2^127 -> inf
    scale, s64 = e.view(ml_dtypes.float8_e8m0fnu), 2.0 ** (e.astype(np.float64) - 127)
  else:
    scale = (rng.rand(2, 3) * 1e-3 + 1e-5).astype(np.float32)          # arbitrary float32
    s64 = scale.astype(np.float64)
  got = quant.dequant_fp8(codes.view(ml_dtypes.float8_e4m3fn), scale, "w")
  s_full = np.kron(s64, np.ones((128, 128)))[:200, :300]
  with np.errstate(over="ignore"):
    want = bf16_round((_E4M3[codes] * s_full).astype(np.float32))   # fp32 product, then bf16
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), want)
  if scale_kind == "e8m0":
    assert np.isinf(got.astype(np.float32)[0, 0])                     # overflow as in torch


def test_dequant_fp4_matches_transcription():
  rng = np.random.RandomState(1)
  packed = rng.randint(0, 256, size=(48, 40)).astype(np.uint8)         # in = 80: 32+32+16
  e = rng.randint(110, 140, size=(48, 3)).astype(np.uint8)
  got = quant.dequant_fp4(packed.view(np.int8), e.view(ml_dtypes.float8_e8m0fnu), "w",
                          out_dtype=np.float32)
  lo, hi = packed & 15, packed >> 4
  codes = np.stack([lo, hi], -1).reshape(48, 80)
  table = np.vectorize(_FP4_DEEPSEEK.get)(codes)
  want = table * np.repeat(2.0 ** (e.astype(np.float64) - 127), 32, axis=1)[:, :80]
  np.testing.assert_array_equal(got, want.astype(np.float32))
  assert not np.signbit(got[codes == 8]).any()                         # DeepSeek: code 8 = +0


@pytest.mark.parametrize("bad", ["nan_e8m0", "inf_f32", "zero_f32", "shape"])
def test_bad_scales_rejected(bad):
  w = np.zeros((130, 10), ml_dtypes.float8_e4m3fn)
  s = {"nan_e8m0": np.array([[255], [127]], np.uint8).view(ml_dtypes.float8_e8m0fnu),
       "inf_f32": np.array([[1.0], [np.inf]], np.float32),
       "zero_f32": np.array([[0.0], [1.0]], np.float32),
       "shape": np.ones((1, 1), np.float32)}[bad]
  with pytest.raises(ValueError, match="layers.0.attn.wq_a.weight") as e:
    quant.dequant_fp8(w, s, "layers.0.attn.wq_a.weight")
  assert ("expected (2, 1)" if bad == "shape" else "expected a finite positive") in str(e.value)
  with pytest.raises(ValueError, match="expected a finite positive"):
    quant.dequant_fp4(np.zeros((2, 16), np.int8),
                      np.array([[255], [127]], np.uint8).view(ml_dtypes.float8_e8m0fnu), "x")


# ------------------------------------------------------------- quantisation


def test_quantize_matches_transcription_and_roundtrips():
  rng = np.random.RandomState(2)
  w = (rng.randn(136, 200) * np.exp(rng.randn(136, 1))).astype(np.float32)
  w[3, 5] = 0.0
  w[130, 150] = 448 * 2.0 ** 3                                         # block amax = 448 s exactly
  q, s = quant.quantize_fp8(w)
  got = quant.dequant_fp8(q, s, out_dtype=np.float32)
  np.testing.assert_array_equal(got, ref_quant(w, 128, 128, "fp8").astype(np.float32))
  assert q.astype(np.float32)[130, 150] == 448.0 and s[1, 1] == 8.0   # top code, scale 2^3
  q2, s2 = quant.quantize_fp8(got)                                     # re-quantise: same values
  np.testing.assert_array_equal(quant.dequant_fp8(q2, s2, out_dtype=np.float32), got)
  w4 = (rng.randn(16, 96) * 0.1).astype(np.float32)
  p, s4 = quant.quantize_fp4(w4)
  got4 = quant.dequant_fp4(p, s4, out_dtype=np.float32)
  np.testing.assert_array_equal(got4, ref_quant(w4, 1, 32, "fp4").astype(np.float32))
  p2, s42 = quant.quantize_fp4(got4)
  np.testing.assert_array_equal(quant.dequant_fp4(p2, s42, out_dtype=np.float32), got4)


def test_qat_quantisers_match_transcription_with_identity_gradient():
  rng = np.random.RandomState(3)
  x = (rng.randn(6, 256) * 3).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(quant.fake_quant_act_fp8(jnp.asarray(x))),
                                ref_quant(x, 1, 128, "fp8").astype(np.float32))
  w = (rng.randn(256, 128) * 0.02).astype(np.float32)                  # model1 [in, out]
  np.testing.assert_array_equal(np.asarray(quant.fake_quant_weight_fp8(jnp.asarray(w))),
                                ref_quant(w, 128, 128, "fp8").astype(np.float32))
  we = (rng.randn(2, 64, 48) * 0.02).astype(np.float32)                # experts [E, in, out]
  got = np.asarray(quant.fake_quant_weight_fp4(jnp.asarray(we)))
  for e in range(2):                                                   # 1x32 blocks along in
    np.testing.assert_array_equal(got[e].T, ref_quant(we[e].T, 1, 32, "fp4").astype(np.float32))
  c = jnp.asarray(rng.randn(6, 256).astype(np.float32))
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant_act_fp8(v) * c))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))          # straight-through
  y = quant.qat_dense(jnp.asarray(x), jnp.asarray(w))
  want = ref_quant(x, 1, 128, "fp8") @ ref_quant(w, 128, 128, "fp8")
  # fp32 accumulation of exact products: only summation-order rounding differs
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
  gw = jax.grad(lambda v: jnp.sum(quant.qat_dense(jnp.asarray(x), v)))(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(gw), np.broadcast_to(
      ref_quant(x, 1, 128, "fp8").sum(0)[:, None], w.shape), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- fidelity


def test_indexer_keys_are_hadamard_rotated():
  from model1.compressor import Compressor
  from model1.config import RopeConfig
  rope = RopeConfig(dim=16)
  plain = Compressor(32, 32, 4, rope, 1e-6, nnx.Rngs(0), quant=None)
  rot = Compressor(32, 32, 4, rope, 1e-6, nnx.Rngs(0), quant="hadamard")
  x = jax.random.normal(jax.random.key(1), (1, 8, 32))
  pos, seg = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32)
  a, b = plain(x, pos, seg)[0], rot(x, pos, seg)[0]
  h = qat.hadamard_matrix(32)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a) @ h, atol=1e-6)  # fp32 matmul order
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_f32_model_decodes_like_its_forward_and_head_is_f32():
  from model1.config import preset
  from model1.generate import SamplingConfig, generate
  from model1.model import Transformer
  cfg = preset("tiny", "model1")
  cfg = dataclasses.replace(  # one CSA layer (window + indexer top-k), mHC with 2 streams
      cfg, vocab_size=128, n_layers=1, use_moe=False, dtype="float32",
      attention=dataclasses.replace(cfg.attention, compress_ratios=(4,), n_heads=2, o_groups=1),
      mhc=dataclasses.replace(cfg.mhc, hc_mult=2), mtp=dataclasses.replace(cfg.mtp, n_layers=0),
      ffn=dataclasses.replace(cfg.ffn, hidden=64))
  model = nnx.jit(lambda: Transformer(cfg, nnx.Rngs(0)))()    # one compile, not op by op
  prompt = [int(t) for t in np.random.RandomState(0).randint(0, 128, size=9)]
  gen = generate(model, [prompt], SamplingConfig(max_new_tokens=8), cache_format="f32",
                 return_logits=True)
  toks = prompt + gen.tokens[0]
  full = nnx.jit(lambda m, t: m(t))(model, jnp.asarray([toks]))
  full = np.asarray(full[0, len(prompt) - 1:len(toks) - 1])
  rel = np.abs(gen.logits[:, 0] - full).max() / np.abs(full).max()
  assert rel <= 1e-5, rel            # the acceptance bound (a bf16 cache gives ~5e-3)
  x = jax.random.normal(jax.random.key(0), (2, 3, cfg.d_model)).astype(jnp.bfloat16)
  want = x.astype(jnp.float32) @ model.head.weight[...]
  np.testing.assert_array_equal(np.asarray(model.logits(x)), np.asarray(want))


def test_enable_qat_switches_linears_and_experts():
  from model1.config import preset
  from model1.model import Transformer
  cfg = preset("tiny", "model1")
  cfg = dataclasses.replace(
      cfg, vocab_size=128, n_layers=1, dtype="float32", mhc=dataclasses.replace(cfg.mhc, hc_mult=1),
      attention=dataclasses.replace(cfg.attention, compress_ratios=(0,), n_heads=2, o_groups=1),
      mtp=dataclasses.replace(cfg.mtp, n_layers=0), moe=dataclasses.replace(cfg.moe, n_hash_layers=0))
  model = nnx.jit(lambda: Transformer(cfg, nnx.Rngs(0)))()
  ref = nnx.clone(model)
  assert quant.enable_qat(model) == (4, 1)        # wq_a, wq_b, wkv, wo_b; one MoE layer
  two = dataclasses.replace(cfg, n_layers=2, attention=dataclasses.replace(
      cfg.attention, compress_ratios=(0, 0)))
  two = nnx.eval_shape(lambda: Transformer(two, nnx.Rngs(0)))
  assert len(two.scanned) == 1 and quant.enable_qat(two) == (8, 2)  # stacked: per layer
  attn, x = model.block(0).attn, np.random.RandomState(4).randn(5, cfg.d_model).astype(np.float32)
  w = np.asarray(attn.wq_a.weight[...])             # [128, 64]: one partial 128x64 block
  want = ref_quant(x, 1, 128, "fp8") @ ref_quant(w, 128, 128, "fp8")
  # exact operands, fp32 accumulation: summation order only
  np.testing.assert_allclose(np.asarray(attn.wq_a(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
  moe, moe_ref = model.block(0).ffn, ref.block(0).ffn
  for name in ("w1", "w2", "w3"):                   # FP4 values by hand, switch off
    v = getattr(moe_ref.experts, name)
    v[...] = np.stack([ref_quant(e.T, 1, 32, "fp4").T for e in np.asarray(v[...])]).astype(np.float32)
  xs = jnp.asarray(np.random.RandomState(5).randn(1, 6, cfg.d_model).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(moe(xs)[0]), np.asarray(moe_ref(xs)[0]))
