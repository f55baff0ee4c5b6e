"""FP8 KV-cache formats: byte layout, quantisation rules and layout conversions.

The oracle is an independent numpy transcription of FlashMLA's ``tests/quant.py`` (amax
in bf16 then fp32, s = 2^ceil(log2(max(amax/448, 1e-4))) via frexp, ml_dtypes e4m3fn
round-to-nearest-even), checked byte-for-byte; hand-built tokens pin the docs/design.md §3 offsets.
"""
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import fp8_cache

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
BF16_MAX = float(ml_dtypes.finfo(BF16).max)
GEOM = {"v32": (576, 512, 128, 4), "model1": (512, 448, 64, 7)}   # d, d_nope, tile, n_tiles


# ----------------------------------------------------------------------------- oracle


def oracle_scales(x_f32, tile):
  """FlashMLA scale per tile as (fp32 scale, exponent k) from numpy (no FTZ, exact frexp)."""
  tiles = x_f32.reshape(*x_f32.shape[:-1], -1, tile)
  amax = np.abs(tiles).max(-1).astype(np.float32)
  y = np.maximum((amax / np.float32(448.0)).astype(np.float32), np.float32(1e-4))
  m, e = np.frexp(y)
  k = np.where(m == 0.5, e - 1, e)                  # y == 2^(e-1) exactly: no rounding up
  return np.ldexp(np.float32(1.0), k).astype(np.float32), k, tiles


def oracle_pack(x_bf16, fmt):
  """Packed FlashMLA bytes of a bf16 ``[Z, Y, d]`` numpy array (inf saturated first)."""
  d, d_nope, tile, n_tiles = GEOM[fmt]
  x = x_bf16.astype(np.float32)
  x = np.where(np.isinf(x), np.sign(x) * BF16_MAX, x).astype(np.float32)
  s, k, tiles = oracle_scales(x[..., :d_nope], tile)
  codes = (tiles / s[..., None]).astype(E4M3).view(np.uint8).reshape(*x.shape[:-1], d_nope)
  rope = x[..., d_nope:].astype(BF16).view(np.uint8)
  z, y = x.shape[:2]
  if fmt == "v32":
    return np.concatenate([codes, s.astype("<f4").view(np.uint8), rope], -1)[:, :, None, :]
  out = np.zeros((z, -(-y * 584 // 576) * 576), np.uint8)
  out[:, :y * 576] = np.concatenate([codes, rope], -1).reshape(z, -1)
  sc = np.zeros((z, y, 8), np.uint8)
  sc[..., :7] = k + 127
  out[:, y * 576:y * 584] = sc.reshape(z, -1)
  return out


def random_tokens(rng, z, y, d, spread=30):
  """bf16 tokens whose 64-element tiles span magnitudes 2^-spread..2^spread."""
  x = rng.standard_normal((z, y, d // 64, 64)).astype(np.float32)
  x *= np.exp2(rng.integers(-spread, spread, (z, y, d // 64, 1))).astype(np.float32)
  return x.reshape(z, y, d).astype(BF16)


def packed(x_bf16, fmt):
  return np.asarray(pk.quantize_k_cache(jnp.asarray(x_bf16)[:, :, None, :], fmt))


# ----------------------------------------------------------------------------- layout


def test_bytes_per_token_and_block_padding():
  assert pk.bytes_per_token("v32") == 656
  assert pk.bytes_per_token("model1") == 584
  assert pk.bytes_per_token("bf16", 576) == 1152 and pk.bytes_per_token("bf16", 512) == 1024
  assert pk.block_bytes("model1", 64) == 37440           # 64*584 = 37376 -> 65*576
  assert pk.block_bytes("v32", 64) == 64 * 656
  x = np.zeros((1, 64, 512), BF16)
  assert packed(x, "model1").shape == (1, 37440)
  assert packed(np.zeros((2, 3, 576), BF16), "v32").shape == (2, 3, 1, 656)
  with pytest.raises(ValueError, match="fmt"):
    pk.bytes_per_token("fp4")


def test_v32_token_bytes_at_design_offsets():
  x = np.zeros((2, 3, 576), np.float32)
  tok = x[1, 2]                                     # block 1, offset 2
  tok[0:128] = 448 * 2.0**-3                        # amax = 448*2^-3 -> s = 2^-3, code 448
  tok[128] = 1.0                                    # amax 1 -> s = 2^-8, code 256
  tok[384] = -3.5                                   # amax 3.5 = 448*2^-7 -> code -448
  tok[512:] = np.arange(64) - 31.5                  # RoPE, stays bf16
  got = packed(x.astype(BF16), "v32")
  b = got[1, 2, 0]
  assert (b[0:128] == 0x7E).all()                   # e4m3fn 448 = 0 1111 110
  assert b[128] == 0x78 and (b[129:256] == 0).all()  # 256 = 0 1111 000
  assert (b[256:384] == 0).all()                    # zero tile
  assert b[384] == 0xFE                             # -448
  np.testing.assert_array_equal(b[512:528].view("<f4"), [2.0**-3, 2.0**-8, 2.0**-13, 2.0**-7])
  np.testing.assert_array_equal(b[528:656].view(BF16).astype(np.float32), tok[512:])
  assert (got[0] == packed(np.zeros((1, 3, 576), BF16), "v32")[0]).all()   # others untouched


def test_model1_block_bytes_at_design_offsets():
  y = 3
  x = np.zeros((1, y, 512), np.float32)
  for i in range(y):
    x[0, i, 64 * i] = 448 * 2.0**(i - 2)            # token i: tile i has s = 2^(i-2)
    x[0, i, 448:] = (i + 1) * (np.arange(64) - 31.5)
  got = packed(x.astype(BF16), "model1")[0]
  assert got.shape == (-(-y * 584 // 576) * 576,)
  for i in range(y):
    data = got[i * 576:(i + 1) * 576]               # token i's 448 codes + 64 bf16
    assert data[64 * i] == 0x7E and np.count_nonzero(data[:448]) == 1
    np.testing.assert_array_equal(data[448:].view(BF16).astype(np.float32), x[0, i, 448:])
    sc = got[y * 576 + i * 8: y * 576 + i * 8 + 8]  # 7 ue8m0 bytes + 1 pad
    want = [127 - 13] * 7                           # zero tiles: floor 2^-13
    want[i] = 127 + i - 2
    np.testing.assert_array_equal(sc, want + [0])
  assert (got[y * 584:] == 0).all()                 # block padding


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_matches_flashmla_oracle_bytes(fmt):
  rng = np.random.default_rng(0)
  d = GEOM[fmt][0]
  x = random_tokens(rng, 2, 5, d).astype(np.float32)
  x[0, 0, :64] = 0.0                                # zero tile
  x[0, 1, :64] = -0.0
  x[0, 2, :64] = rng.standard_normal(64) * 1e-39    # bf16 subnormals only
  x[0, 3, :64] = np.float32(BF16_MAX)               # top of the range
  x[0, 3, 64:128] = rng.standard_normal(64) * 1e38
  x[0, 4, :64] = rng.standard_normal(64) * 2.0**-125  # smallest normals: below the floor
  x = x.astype(BF16)
  np.testing.assert_array_equal(packed(x, fmt), oracle_pack(x, fmt))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_scale_exact_at_448_times_power_of_two(fmt):
  d, d_nope, tile, n_tiles = GEOM[fmt]
  ks = [-14, -13, -9, -1, 0, 1, 7, 30, 100, 119]
  x = np.zeros((len(ks), 2, d), np.float32)
  for r, k in enumerate(ks):
    x[r, 0, 0] = 448 * 2.0**k                       # amax = 448*2^k exactly
    x[r, 1, 0] = np.float32(448 * 2.0**k) * (1 + 2.0**-7)   # next bf16 above it
  cache = pk.KCache.from_bf16(jnp.asarray(x.astype(BF16)), fmt)
  s = np.asarray(cache.scales[..., 0])
  exp = np.log2(s) if fmt == "v32" else s.astype(np.int64) - 127   # log2 of fp32 2^k is exact
  for r, k in enumerate(ks):
    floor = -13                                     # amax/448 < 1e-4 clamps to 2^-13
    assert exp[r, 0] == max(k, floor), (k, exp[r, 0])
    assert exp[r, 1] == max(k + 1, floor), (k, exp[r, 1])
  if fmt == "v32":
    frac, _ = np.frexp(s)
    assert (frac == 0.5).all()                      # every scale is a power of two


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_dequant_exact_on_grid_and_error_bound(fmt):
  rng = np.random.default_rng(1)
  d, d_nope, tile, n_tiles = GEOM[fmt]
  # On-grid: e4m3 codes times 2^k with one code = +-448 per tile, so s = 2^k exactly.
  codes = rng.integers(0, 256, (2, 3, n_tiles, tile)).astype(np.uint8).view(E4M3).astype(np.float32)
  codes = np.where(np.isnan(codes), 0.0, codes)
  codes[..., 0] = 448.0 * rng.choice([-1, 1], (2, 3, n_tiles))
  k = rng.integers(-12, 20, (2, 3, n_tiles, 1))
  x = np.zeros((2, 3, d), np.float32)
  x[..., :d_nope] = (codes * np.exp2(k)).reshape(2, 3, d_nope)
  x[..., d_nope:] = rng.standard_normal((2, 3, 64))
  x = x.astype(BF16)
  deq = np.asarray(pk.dequantize_k_cache(pk.quantize_k_cache(jnp.asarray(x)[:, :, None], fmt), fmt))
  np.testing.assert_array_equal(deq[:, :, 0].view(np.uint16), x.view(np.uint16))
  # Off-grid: |deq - x| <= 2^-4 |x| (3 mantissa bits, half ulp) or 2^-10 s (subnormal half step).
  x = random_tokens(rng, 2, 4, d)
  cache = pk.KCache.from_bf16(jnp.asarray(x), fmt)
  deq = np.asarray(cache.to_bf16()[:, :, 0]).astype(np.float64)
  s = np.asarray(cache.scales).astype(np.float64)
  s = s if fmt == "v32" else np.exp2(s - 127)
  s_full = np.repeat(s, tile, axis=-1)
  xf = x.astype(np.float64)
  err = np.abs(deq[..., :d_nope] - xf[..., :d_nope])
  bound = np.maximum(2.0**-4 * np.abs(xf[..., :d_nope]), 2.0**-10 * s_full)
  assert (err <= bound).all()
  np.testing.assert_array_equal(deq[..., d_nope:], xf[..., d_nope:])


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_inf_saturates_and_nan_propagates(fmt):
  d, d_nope, tile, n_tiles = GEOM[fmt]
  x = np.ones((1, 3, d), np.float32)
  x[0, 0, 3] = np.inf
  x[0, 1, 3] = -np.inf
  x[0, 2, 3] = np.nan
  cache = pk.KCache.from_bf16(jnp.asarray(x.astype(BF16)), fmt)
  codes = np.asarray(jax.lax.bitcast_convert_type(cache.nope, jnp.uint8))
  is_nan_code = (codes & 0x7F) == 0x7F
  assert not is_nan_code[0, :2].any()               # +-inf: no NaN anywhere in the cache
  sat = x.copy()
  sat[0, 0, 3], sat[0, 1, 3] = BF16_MAX, -BF16_MAX
  want = oracle_pack(sat[:, :2].astype(BF16), fmt)
  np.testing.assert_array_equal(packed(x[:, :2].astype(BF16), fmt), want)
  deq = np.asarray(cache.to_bf16()[0, :2, 0]).astype(np.float32)
  assert deq[0, 3] == np.inf and deq[1, 3] == -np.inf   # 256 * 2^120 overflows, as FlashMLA
  assert is_nan_code[0, 2, :tile].all()             # NaN input: NaN tile (FlashMLA too)
  sc = np.asarray(cache.scales)[0, 2, 0]
  assert (np.isnan(sc) if fmt == "v32" else sc == 0xFF)
  assert not is_nan_code[0, 2, tile:].any()         # other tiles of that token are intact


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("fmt", ["v32", "model1", "bf16"])
def test_packed_layout_roundtrip_exact(fmt):
  rng = np.random.default_rng(2)
  z, y = 2, 5
  bpt = pk.bytes_per_token(fmt, None if fmt != "bf16" else 576)
  if fmt == "model1":
    raw = rng.integers(0, 256, (z, pk.block_bytes("model1", y)), dtype=np.uint8)
  else:
    raw = rng.integers(0, 256, (z, y, 1, bpt), dtype=np.uint8)   # includes NaN patterns
  cache = pk.KCache.from_packed_bytes(jnp.asarray(raw), fmt).validate()
  back = np.asarray(cache.to_packed_bytes())
  if fmt == "model1":
    want = raw.copy()
    want[:, y * 576:y * 584].reshape(z, y, 8)[..., 7] = 0   # pad bytes are written as 0
    want[:, y * 584:] = 0
    raw = want
    # The unpadded [Z, Y, 1, 584] block image is read the same way.
    view = jnp.asarray(raw[:, :y * 584].reshape(z, y, 1, 584))
    again = pk.KCache.from_packed_bytes(view, fmt)
    np.testing.assert_array_equal(np.asarray(again.to_packed_bytes()), raw)
  np.testing.assert_array_equal(back, raw)
  # And the other direction, through fields of a real quantised cache.
  d = 576 if fmt != "model1" else 512
  c0 = pk.KCache.from_bf16(jnp.asarray(random_tokens(rng, z, y, d)), fmt)
  c1 = pk.KCache.from_packed_bytes(c0.to_packed_bytes(), fmt)
  for a, b in zip(jax.tree.leaves(c0), jax.tree.leaves(c1)):
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8)),
                                  np.asarray(jax.lax.bitcast_convert_type(b, jnp.uint8)))


def test_e8m0_decode_and_pow2_from_bits():
  e = jnp.arange(256, dtype=jnp.uint8)
  got = np.asarray(fp8_cache.e8m0_to_f32(e))
  want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
  np.testing.assert_array_equal(got[1:255], want[1:255])
  assert got[0] == 2.0**-127 or got[0] == 0.0       # fp32 subnormal; FTZ may read it as 0
  assert np.isnan(got[255])
  y = jnp.asarray([2.0**-13, 2.0**-13 * 1.0000001, 1e-4, 1.0, 3.0, 2.0**119], jnp.float32)
  s, byte = fp8_cache.pow2_ceil(y)
  np.testing.assert_array_equal(np.asarray(s), [2.0**-13, 2.0**-12, 2.0**-13, 1.0, 4.0, 2.0**119])
  np.testing.assert_array_equal(np.asarray(byte), [114, 115, 114, 127, 129, 246])
  assert math.ceil(math.log2(1e-4)) == -13          # sanity of the floor used above


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_write_k_cache_matches_bulk_quantisation(fmt):
  rng = np.random.default_rng(3)
  d = GEOM[fmt][0]
  z, y = 3, 4
  x = random_tokens(rng, 5, 1, d)[:, 0]             # 5 new tokens
  slots = jnp.asarray([5, 0, -1, 11, 12], jnp.int32)   # -1 and 12 (= past the end) are skipped
  cache = jax.jit(pk.write_k_cache)(pk.KCache.empty(z, y, fmt), jnp.asarray(x), slots)
  full = np.zeros((z * y, d), BF16)
  full[[5, 0, 11]] = x[[0, 1, 3]]
  want = pk.KCache.from_bf16(jnp.asarray(full.reshape(z, y, d)), fmt)
  np.testing.assert_array_equal(np.asarray(cache.to_packed_bytes()),
                                np.asarray(want.to_packed_bytes())[...])
  deq = np.asarray(cache.to_bf16()).reshape(z * y, d)
  assert (deq[[1, 2, 3, 4, 6, 7, 8, 9, 10]] == 0).all()   # empty slots dequantise to 0


def test_as_kcache_rejects_bad_caches():
  with pytest.raises(ValueError, match="dtype=float32"):
    pk.as_kcache(jnp.zeros((2, 4, 1, 576), jnp.float32))
  with pytest.raises(ValueError, match="shape"):
    pk.as_kcache(jnp.zeros((2, 4, 1, 600), jnp.uint8))
  with pytest.raises(ValueError, match="one KV head"):
    pk.as_kcache(jnp.zeros((2, 4, 2, 656), jnp.uint8))
  with pytest.raises(ValueError, match="model1 block"):
    pk.as_kcache(jnp.zeros((2, 1000), jnp.uint8))
  bad = pk.KCache.empty(2, 4, "v32")
  bad = pk.KCache(bad.nope, bad.rope, bad.scales.astype(jnp.bfloat16), "v32")
  with pytest.raises(ValueError, match="scales"):
    bad.validate()
