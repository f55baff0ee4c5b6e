"""DeepSeek's low-precision weight formats: FP8 e4m3 in 128x128 blocks, FP4 e2m1 in 1x32
blocks, for reading and writing checkpoints (numpy) and for QAT (jax, straight-through).

What DeepSeek ships (V3.2 and V4-Flash safetensors):

  * **FP8 linear weights**: ``w [out, in]`` float8_e4m3fn and one scale per 128x128 block,
    ``[ceil(out/128), ceil(in/128)]`` (a trailing partial block has its own scale). V3.2
    names it ``weight_scale_inv`` (float32 values), V4 ``scale`` (float8_e8m0fnu, i.e. a
    power of two 2^(byte-127); ``scale_fmt="ue8m0"``). Dequantised as DeepSeek's
    ``weight_dequant``: ``bf16(fp32(w) * fp32(s))``.
  * **FP4 routed experts (V4)**: ``w [out, in/2]`` int8, two e2m1 codes per byte (low
    nibble = even column), and ``scale [out, ceil(in/32)]`` float8_e8m0fnu. A code's value is
    DeepSeek's ``FP4_TABLE[code]`` (code 8, "-0", reads as +0.0); weight = value * scale.
    Every product is exact in float32 and bfloat16.

Scales must be finite and positive: a NaN (e8m0 byte 0xFF), inf, zero or negative scale
is rejected with a ``ValueError`` naming the tensor (a NaN scale poisons its whole block).

Writing (``quantize_fp8`` / ``quantize_fp4``), per block: amax = max|w| (floor 1e-4 for FP8,
6*2^-126 for FP4, as V4's ``act_quant`` / ``fp4_act_quant``), scale = 2^ceil(log2(amax/qmax))
with qmax 448 / 6 (power-of-two scales, so re-quantising a dequantised block gives back
the same values: import -> export -> import is bit-identical), q = round-to-nearest-even of
clip(w/scale, +-qmax) (values past the block's range saturate).

QAT (``fake_quant_weight_fp8``, ``fake_quant_act_fp8``, ``fake_quant_weight_fp4``,
``qat_dense``; ``enable_qat(model)`` switches a built model's linears/experts): the same grids in the forward pass with straight-through gradients, for V4's
FP8 block-128 weight x activation matmuls and FP4 routed experts. model1 stores Dense
weights [in, out]; the 128x128 blocks are the same tiles transposed, FP4's 1x32 blocks run
along ``in`` (axis -2 of a model1 weight).

Source: DeepSeek-V3.2-Exp ``inference/model.py`` ``weight_dequant``, DeepSeek-V4-Flash
``inference/kernel.py`` (``act_quant``, ``fp4_act_quant``, ``fp8_gemm``, ``fp4_gemm``) and
``inference/convert.py`` (``FP4_TABLE``). Shapes: W [out, in] (DeepSeek layout), S scales.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126
# DeepSeek's convert.py table: e2m1 code -> value (code 8 is +0.0, not -0.0)
FP4_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                      0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


# ---------------------------------------------------------------- scales

def e8m0_to_f32(s_u8: np.ndarray) -> np.ndarray:
  """ue8m0 bytes -> float32 2^(byte-127) (byte 255 = NaN)."""
  b = np.asarray(s_u8).view(np.uint8).astype(np.int32)
  return np.where(b == 255, np.nan, np.ldexp(1.0, b - 127)).astype(np.float32)


def f32_to_e8m0(s_f32: np.ndarray) -> np.ndarray:
  """Powers of two (float32) -> ue8m0 bytes as float8_e8m0fnu."""
  mant, exp = np.frexp(np.asarray(s_f32, np.float32))
  if not np.all(mant == 0.5):
    raise ValueError("f32_to_e8m0: expected powers of two")
  return (exp - 1 + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def scales_f32(scale: np.ndarray, name: str) -> np.ndarray:
  """Scale tensor (float32/bf16 values or float8_e8m0fnu) -> float32, checked finite > 0."""
  scale = np.asarray(scale)
  s = e8m0_to_f32(scale) if scale.dtype == ml_dtypes.float8_e8m0fnu else scale.astype(np.float32)
  bad = ~(np.isfinite(s) & (s > 0))
  if bad.any():
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}: scale block {at} is {s[at]!r}; expected a finite positive "
                     f"scale (a NaN/inf/zero scale would poison its whole block)")
  return s


def _pow2_ceil(y: np.ndarray) -> np.ndarray:
  """2^ceil(log2 y) for positive float32 y, from the bits (exact at powers of two)."""
  bits = np.asarray(y, np.float32).view(np.uint32)
  exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0)
  return (exp.astype(np.uint32) << 23).view(np.float32)


def _blocks(shape: tuple, block: tuple[int, int]) -> tuple[int, int]:
  return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _expand(s: np.ndarray, shape: tuple, block: tuple[int, int]) -> np.ndarray:
  """Per-block scales [nb0, nb1] -> per-element [*shape] (trailing blocks cut short)."""
  return np.repeat(np.repeat(s, block[0], 0), block[1], 1)[:shape[0], :shape[1]]


# ---------------------------------------------------------------- dequantisation (read)

def dequant_fp8(w: np.ndarray, scale: np.ndarray, name: str = "weight",
                block: int = FP8_BLOCK, out_dtype=ml_dtypes.bfloat16) -> np.ndarray:
  """FP8 e4m3 ``w [out, in]`` with block scales ``[ceil(out/b), ceil(in/b)]`` ->
  ``out_dtype(fp32(w) * fp32(s))`` (DeepSeek's ``weight_dequant``)."""
  w = np.asarray(w)
  if w.dtype != ml_dtypes.float8_e4m3fn or w.ndim != 2:
    raise ValueError(f"{name}: dtype {w.dtype} shape {w.shape}; expected a 2-D float8_e4m3fn "
                     f"weight [out, in]")
  want = _blocks(w.shape, (block, block))
  if tuple(np.shape(scale)) != want:
    raise ValueError(f"{name}: scale shape {tuple(np.shape(scale))} for weight {w.shape}; "
                     f"expected {want} (one scale per {block}x{block} block)")
  s = scales_f32(scale, name)
  w32 = w.astype(np.float32)
  if np.isnan(w32).any():
    at = tuple(int(i) for i in np.argwhere(np.isnan(w32))[0])
    raise ValueError(f"{name}: element {at} is an FP8 NaN code; expected finite weights")
  with np.errstate(over="ignore"):  # 448 * 2^127 overflows to inf, as in DeepSeek's torch
    return (w32 * _expand(s, w.shape, (block, block))).astype(out_dtype)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
  """int8/uint8 ``[out, in/2]`` -> e2m1 codes uint8 ``[out, in]`` (low nibble first)."""
  b = np.asarray(packed).view(np.uint8)
  codes = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.uint8)
  codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
  return codes


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, name: str = "weight",
                block: int = FP4_BLOCK, out_dtype=ml_dtypes.bfloat16) -> np.ndarray:
  """FP4 e2m1 ``packed [out, in/2]`` with scales ``[out, ceil(in/block)]`` ->
  ``out_dtype(FP4_TABLE[code] * s)``."""
  packed = np.asarray(packed)
  if packed.dtype not in (np.int8, np.uint8) or packed.ndim != 2:
    raise ValueError(f"{name}: dtype {packed.dtype} shape {packed.shape}; expected a 2-D "
                     f"int8 tensor of packed FP4 pairs [out, in/2]")
  codes = unpack_fp4(packed)
  want = (codes.shape[0], -(-codes.shape[1] // block))
  if tuple(np.shape(scale)) != want:
    raise ValueError(f"{name}: scale shape {tuple(np.shape(scale))} for FP4 weight "
                     f"{codes.shape}; expected {want} (one scale per 1x{block} block)")
  s = scales_f32(scale, name)
  return (FP4_TABLE[codes] * _expand(s, codes.shape, (1, block))).astype(out_dtype)


# ---------------------------------------------------------------- quantisation (write)

def _block_amax(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  nb = _blocks(w.shape, block)
  pad = np.zeros((nb[0] * block[0], nb[1] * block[1]), np.float32)
  pad[:w.shape[0], :w.shape[1]] = np.abs(w)
  return pad.reshape(nb[0], block[0], nb[1], block[1]).max(axis=(1, 3))


def quantize_fp8(w: np.ndarray, block: int = FP8_BLOCK, scale_dtype="e8m0"):
  """float ``w [out, in]`` -> (float8_e4m3fn ``[out, in]``, scales ``[nb0, nb1]``);
  scales power-of-two, stored as float8_e8m0fnu (V4 ``scale``) or float32 (V3.2
  ``weight_scale_inv``, ``scale_dtype="f32"``)."""
  w = np.asarray(w, np.float32)
  amax = np.maximum(_block_amax(w, (block, block)), np.float32(FP8_AMAX_FLOOR))
  s = _pow2_ceil(amax / np.float32(FP8_MAX))
  q = np.clip(w / _expand(s, w.shape, (block, block)), -FP8_MAX, FP8_MAX)
  q = q.astype(ml_dtypes.float8_e4m3fn)
  return q, (f32_to_e8m0(s) if scale_dtype == "e8m0" else s)


def quantize_fp4(w: np.ndarray, block: int = FP4_BLOCK):
  """float ``w [out, in]`` (in even) -> (int8 packed ``[out, in/2]``, float8_e8m0fnu
  scales ``[out, ceil(in/block)]``)."""
  w = np.asarray(w, np.float32)
  if w.ndim != 2 or w.shape[1] % 2:
    raise ValueError(f"quantize_fp4: weight shape {w.shape}; expected [out, in] with even in")
  amax = np.maximum(_block_amax(w, (1, block)), np.float32(FP4_AMAX_FLOOR))
  s = _pow2_ceil(amax / np.float32(FP4_MAX))
  q = np.clip(w / _expand(s, w.shape, (1, block)), -FP4_MAX, FP4_MAX)
  codes = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F   # sign bit 3
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
  return packed, f32_to_e8m0(s)


# ---------------------------------------------------------------- QAT (jax)

def _ste(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(x_hat.astype(x.dtype) - x)


def _pow2_ceil_jnp(y: jax.Array) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(y.astype(jnp.float32), jnp.uint32)
  exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(exp << 23, jnp.float32)


def _fake_blocks(w2: jax.Array, b0: int, b1: int, qmax: float, floor: float, dtype):
  """Quantise-dequantise a 2-D array in [b0, b1] blocks (power-of-two scales); partial
  trailing blocks are their own blocks (zero padding never raises an amax)."""
  R, C = w2.shape
  Rp, Cp = -(-R // b0) * b0, -(-C // b1) * b1
  t = jnp.pad(w2.astype(jnp.float32), ((0, Rp - R), (0, Cp - C)))
  t = t.reshape(Rp // b0, b0, Cp // b1, b1)
  amax = jnp.maximum(jnp.max(jnp.abs(t), axis=(1, 3), keepdims=True), floor)
  s = _pow2_ceil_jnp(amax / qmax)
  q = jnp.clip(t / s, -qmax, qmax).astype(dtype).astype(jnp.float32)
  return (q * s).reshape(Rp, Cp)[:R, :C]


def fake_quant_weight_fp8(w: jax.Array, block: int = FP8_BLOCK) -> jax.Array:
  """FP8 e4m3 with one power-of-two scale per ``block x block`` tile of the last two dims
  (leading dims batch), straight-through gradient."""
  lead = w.shape[:-2]
  w3 = w.reshape((-1,) + w.shape[-2:])
  f = lambda m: _fake_blocks(m, block, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn)  # noqa: E731
  return _ste(w, jax.vmap(f)(w3).reshape(lead + w.shape[-2:]))


def fake_quant_act_fp8(x: jax.Array, block: int = FP8_BLOCK) -> jax.Array:
  """V4 ``act_quant(x, 128, "ue8m0", inplace=True)``: 1 x ``block`` tiles of the last
  dim, straight-through."""
  x2 = x.reshape(-1, x.shape[-1])
  q = _fake_blocks(x2, 1, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn)
  return _ste(x, q.reshape(x.shape))


def fake_quant_weight_fp4(w_in_out: jax.Array, block: int = FP4_BLOCK) -> jax.Array:
  """FP4 e2m1 expert weights in model1's [..., in, out] layout: 1 x ``block`` blocks
  along ``in`` (DeepSeek's [out, in/32] scales), straight-through."""
  wt = jnp.swapaxes(w_in_out, -1, -2)
  lead = wt.shape[:-2]
  f = lambda m: _fake_blocks(m, 1, block, FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn)  # noqa: E731
  q = jax.vmap(f)(wt.reshape((-1,) + wt.shape[-2:])).reshape(wt.shape)
  return _ste(w_in_out, jnp.swapaxes(q.reshape(lead + wt.shape[-2:]), -1, -2))


def qat_dense(x: jax.Array, w_in_out: jax.Array) -> jax.Array:
  """V4's FP8 linear: block-128 activation x block-128x128 weight, fp32 accumulation.
  ``w_in_out`` [in, *out] (out dims flattened for the blocks, as DeepSeek's [out, in])."""
  xq = fake_quant_act_fp8(x.astype(jnp.float32))
  w2 = w_in_out.reshape(w_in_out.shape[0], -1).astype(jnp.float32)
  wq = fake_quant_weight_fp8(w2).reshape(w_in_out.shape)
  y = jnp.tensordot(xq, wq, axes=((x.ndim - 1,), (0,)), precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


# model1 Dense modules DeepSeek-V4 runs as FP8 linears (compressor, gate, indexer
# weights_proj and the head stay in higher precision there)
FP8_LINEARS = ("wq_a", "wq_b", "wkv", "wkv_a", "wkv_b", "wo", "wo_b", "wk", "e_proj", "h_proj")


def _stacked_layers(names, var) -> int:
  """How many layers a module stands for: k in a scanned slot (model1.scan; its
  variables' leading axis), else 1."""
  return var.shape[0] if "scanned" in names else 1


def enable_qat(model, fp8_linears: bool = True, fp4_experts: bool = True):
  """Switch V4's quantisation-aware matmuls on (or off) in a built model, in place:
  FP8 block-128 weight x activation for the ``FP8_LINEARS`` Dense modules (not under a
  compressor), FP4 e2m1 routed-expert weights in every MoE. Straight-through gradients.
  The flags are static module attributes: a jitted step retraces when they change.
  Returns the number of (linears, MoE layers) switched."""
  from flax import nnx
  from model1.layers import Dense
  from model1.moe import MoE
  n_lin = n_moe = 0
  for path, m in nnx.iter_graph(model):
    names = [str(p) for p in path]
    if isinstance(m, Dense) and names and names[-1] in FP8_LINEARS and "compressor" not in names:
      m.fp8_qat = bool(fp8_linears)
      n_lin += _stacked_layers(names, m.weight)
    elif isinstance(m, MoE):
      m.fp4_qat = bool(fp4_experts)
      n_moe += _stacked_layers(names, m.load)
  return n_lin, n_moe
