"""FP8 KV-cache formats of DeepSeek FlashMLA, byte-exact, plus a kernel-friendly layout.

What: the single cached vector per token of MLA-style attention (one KV head) is stored
in one of three formats:

  ``"v32"``    DeepSeek-V3.2, d = 576 = 512 latent (NoPE) + 64 RoPE, 656 bytes/token.
               Per token: bytes [0,512) 512 x e4m3fn; [512,528) 4 x fp32 scales, one per
               128-element tile; [528,656) 64 x bf16 RoPE.  Paged ``[Z, Y, 1, 656]``.
  ``"model1"`` MODEL1 / DeepSeek-V4, d = 512 = 448 NoPE + 64 RoPE, 584 bytes/token.
               Per page block of Y tokens: first Y*576 bytes, token i at i*576: 448 x e4m3fn
               then 64 x bf16; then Y*8 bytes, token i at Y*576 + i*8: 7 ue8m0 scale bytes
               (one per 64-element tile, byte = 127 + log2 s) + 1 pad byte; the block is
               padded to a multiple of 576 bytes (Y = 64 -> 37440).
  ``"bf16"``   plain bfloat16 baseline, 2*d bytes/token (d = 576 or 512).

Source: FlashMLA ``tests/quant.py`` (``quantize_k_cache`` / ``dequantize_k_cache``) and
the layout comment of ``flash_mla_interface.py``.  Quantisation per tile:
amax = max|x| (in bf16, then fp32); s = 2^ceil(log2(max(amax/448, 1e-4))) in fp32;
q = e4m3fn(fp32(x)/s), round to nearest even.  Dequantisation: v32 bf16(fp32(q)*s);
model1 bf16(bf16(q)*bf16(s)).  Both products are exact unless they overflow (a tile whose
amax is near the top of the bf16 range may dequantise to +-inf, as in FlashMLA).

Deviation from FlashMLA (documented): +-inf inputs are saturated to the largest
finite bf16 (+-3.39e38) before quantising, so the cache never holds NaN for them
(FlashMLA writes NaN).  NaN inputs give a NaN tile (NaN scale, NaN codes), as FlashMLA.

Layouts here:
  * packed bytes (FlashMLA's memory image, uint8): ``quantize_k_cache`` /
    ``dequantize_k_cache`` / ``KCache.to_packed_bytes`` / ``KCache.from_packed_bytes``.
    v32: ``[Z, Y, 1, 656]``.  model1: ``[Z, padded_block_bytes]`` (the whole padded page
    block; a ``[..., 584]`` row view is not a token, so we keep the block flat; an unpadded
    ``[Z, Y, 1, 584]`` block image is also accepted on input).  bf16: ``[Z, Y, 1, 2*d]``.
  * ``KCache``: structure of arrays that kernels read (Triton cannot reinterpret packed
    bytes as bf16/fp32 because its bitcasts need equal widths).  Conversions are exact.

Why the exponent is taken with bit operations: ``jnp.log2`` is inexact at powers of two on
XLA:CPU (ceil(log2(2^-13)) gave -12), so s is built from the fp32 bit pattern directly.
JAX casts to e4m3fn do not saturate (465 -> NaN); x/s <= 448 holds by construction for
finite inputs (s >= fl(amax/448) and no bf16 amax rounds onto a power of two from below),
so the clip below never changes a finite code; it only guards the invariant.

Letter key for shape suffixes: Z page blocks, Y tokens per block, H head dim, N tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("v32", "model1", "bf16")
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-4           # FlashMLA clamps amax/448 from below (HFAI's FP8_AMAX_MARGIN)
BF16_MAX = float(jnp.finfo(jnp.bfloat16).max)
D_ROPE = 64
MODEL1_ALIGN = 576           # model1 page blocks are padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Per-format head geometry: d = d_nope + d_rope; NoPE split into n_tiles x tile."""
  d: int
  d_nope: int
  tile: int
  n_tiles: int
  d_rope: int = D_ROPE


GEOMETRY = {"v32": Geometry(576, 512, 128, 4), "model1": Geometry(512, 448, 64, 7)}


def require(cond: bool, msg: str) -> None:
  """Raise ValueError(msg) unless cond (argument checks at the public entry points)."""
  if not cond:
    raise ValueError(msg)


def _check_fmt(fmt: str) -> None:
  require(fmt in FORMATS, f"fmt={fmt!r}: expected one of {FORMATS}")


def bytes_per_token(fmt: str, head_dim: int | None = None) -> int:
  """Nominal cache bytes per token (one layer, one KV head): 656, 584 or 2*head_dim."""
  _check_fmt(fmt)
  if fmt == "bf16":
    require(head_dim is not None and head_dim > 0,
            f"head_dim={head_dim!r}: the bf16 format needs the head dim (576 or 512)")
    return 2 * head_dim
  g = GEOMETRY[fmt]
  require(head_dim in (None, g.d), f"head_dim={head_dim!r}: fmt {fmt!r} has head dim {g.d}")
  if fmt == "v32":
    return g.d_nope + 4 * g.n_tiles + 2 * g.d_rope                  # 512 + 16 + 128
  return g.d_nope + 2 * g.d_rope + g.n_tiles + 1                     # 448 + 128 + 7 + 1


def block_bytes(fmt: str, block_size: int, head_dim: int | None = None) -> int:
  """Bytes of one page block in memory (model1 pads to a multiple of 576)."""
  raw = block_size * bytes_per_token(fmt, head_dim)
  if fmt == "model1":
    return -(-raw // MODEL1_ALIGN) * MODEL1_ALIGN
  return raw


# ----------------------------------------------------------------------------- scalars


def pow2_ceil(y_f32: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2^ceil(log2 y) for positive normal fp32 y, from the bit pattern (exact).

  Returns (scale fp32, biased exponent uint8 = the ue8m0 byte).  NaN -> (NaN, 0xFF).
  """
  bits_u32 = jax.lax.bitcast_convert_type(y_f32, jnp.uint32)
  exp_u32 = (bits_u32 >> 23) & 0xFF
  # A non-zero mantissa means y is strictly between two powers of two: round up.
  exp_u32 = exp_u32 + ((bits_u32 & 0x7FFFFF) != 0).astype(jnp.uint32)
  nan = jnp.isnan(y_f32)
  scale_f32 = jax.lax.bitcast_convert_type(exp_u32 << 23, jnp.float32)
  scale_f32 = jnp.where(nan, jnp.float32(jnp.nan), scale_f32)
  e8m0_u8 = jnp.where(nan, 0xFF, exp_u32).astype(jnp.uint8)
  return scale_f32, e8m0_u8


def e8m0_to_f32(e_u8: jax.Array) -> jax.Array:
  """Decode ue8m0 bytes (value 2^(e-127)) to fp32: bitcast(e << 23), plus the 2 edge codes.

  e = 0 is 2^-127 (an fp32 subnormal, never written by the quantiser); e = 0xFF is NaN.
  """
  e_u32 = e_u8.astype(jnp.uint32)
  bits_u32 = jnp.where(e_u32 == 0, jnp.uint32(0x00400000), e_u32 << 23)
  out = jax.lax.bitcast_convert_type(bits_u32, jnp.float32)
  return jnp.where(e_u32 == 0xFF, jnp.float32(jnp.nan), out)


def saturate_inf(x: jax.Array) -> jax.Array:
  """+-inf -> +-largest finite value of x's dtype (our documented deviation from FlashMLA)."""
  big = jnp.asarray(jnp.finfo(x.dtype).max, x.dtype)
  return jnp.where(jnp.isinf(x), jnp.where(x > 0, big, -big), x)


def quantize_tiles(x_NP: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
  """Quantise bf16 ``[..., P]`` in tiles of ``tile`` -> (e4m3fn ``[..., P]``, fp32 scales ``[..., P/tile]``)."""
  *lead, p = x_NP.shape
  x_NTE = saturate_inf(x_NP.astype(jnp.bfloat16)).reshape(*lead, p // tile, tile)
  amax_NT = jnp.max(jnp.abs(x_NTE), axis=-1).astype(jnp.float32)   # max in bf16: exact
  y_NT = jnp.maximum(amax_NT / jnp.float32(E4M3_MAX), jnp.float32(SCALE_FLOOR))
  scale_NT, _ = pow2_ceil(y_NT)
  q_NTE = x_NTE.astype(jnp.float32) / scale_NT[..., None]          # exact: s is 2^k
  q_NTE = jnp.clip(q_NTE, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return q_NTE.reshape(*lead, p), scale_NT


# ----------------------------------------------------------------------------- KCache


@dataclasses.dataclass(frozen=True)
class KCache:
  """Structure-of-arrays paged cache (one KV head, so no head axis).

  fields:
    nope:   ``[Z, Y, P]``  e4m3fn codes (v32 P=512, model1 P=448); bf16 values for "bf16"
            (P = d - 64, so 512 or 448).
    rope:   ``[Z, Y, 64]`` bf16, never quantised.
    scales: v32 fp32 ``[Z, Y, 4]``; model1 uint8 ue8m0 exponents ``[Z, Y, 7]``; bf16 None.
    fmt:    "v32" | "model1" | "bf16" (static pytree metadata).
  A token at flat slot ``block * block_size + offset`` lives at ``[block, offset]``.
  """
  nope: Any
  rope: Any
  scales: Any
  fmt: str

  @property
  def num_blocks(self) -> int:
    return self.nope.shape[0]

  @property
  def block_size(self) -> int:
    return self.nope.shape[1]

  @property
  def head_dim(self) -> int:
    return self.nope.shape[-1] + self.rope.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.num_blocks * self.block_size

  @property
  def bytes_per_token(self) -> int:
    return bytes_per_token(self.fmt, self.head_dim)

  def validate(self, name: str = "k_cache") -> "KCache":
    """Check dtypes/shapes (called by the public functions, not in __init__: JAX rebuilds
    pytrees with placeholder leaves)."""
    _check_fmt(self.fmt)
    z_y = tuple(self.nope.shape[:2])
    require(self.nope.ndim == 3 and self.rope.shape == (*z_y, D_ROPE)
            and self.rope.dtype == jnp.bfloat16,
            f"{name}: nope {self.nope.shape}, rope {self.rope.shape} {self.rope.dtype}: "
            "expected nope [Z, Y, P] and bf16 rope [Z, Y, 64]")
    if self.fmt == "bf16":
      require(self.nope.dtype == jnp.bfloat16 and self.scales is None,
              f"{name}: bf16 cache needs bf16 nope and scales=None, got {self.nope.dtype}")
      require(self.head_dim in (576, 512), f"{name}: head dim {self.head_dim}, expected 576 or 512")
      return self
    g = GEOMETRY[self.fmt]
    sdt = jnp.float32 if self.fmt == "v32" else jnp.uint8
    require(self.nope.dtype == jnp.float8_e4m3fn and self.nope.shape[-1] == g.d_nope,
            f"{name}: nope {self.nope.shape} {self.nope.dtype}, expected [Z, Y, {g.d_nope}] float8_e4m3fn")
    require(self.scales is not None and self.scales.shape == (*z_y, g.n_tiles)
            and self.scales.dtype == sdt,
            f"{name}: scales {getattr(self.scales, 'shape', None)} "
            f"{getattr(self.scales, 'dtype', None)}, expected [{z_y[0]}, {z_y[1]}, {g.n_tiles}] {jnp.dtype(sdt)}")
    return self

  # -- construction ------------------------------------------------------------------

  @classmethod
  def from_bf16(cls, x: jax.Array, fmt: str) -> "KCache":
    """Quantise a bf16 cache ``[Z, Y, 1, d]`` or ``[Z, Y, d]``."""
    _check_fmt(fmt)
    x_ZYH = _squeeze_head(jnp.asarray(x), "x")
    if fmt != "bf16":
      require(x_ZYH.shape[-1] == GEOMETRY[fmt].d,
              f"x shape={tuple(x.shape)}: fmt {fmt!r} needs head dim {GEOMETRY[fmt].d}")
    return _from_bf16_jit(x_ZYH, fmt)

  @classmethod
  def empty(cls, num_blocks: int, block_size: int, fmt: str, head_dim: int | None = None) -> "KCache":
    """Cache of zeros, byte-identical to quantising zeros (codes 0, scales at the 2^-13
    floor), so it dequantises to zeros and unwritten slots look like FlashMLA's zeros."""
    _check_fmt(fmt)
    d = head_dim if fmt == "bf16" else GEOMETRY[fmt].d
    require(d in (576, 512), f"head_dim={head_dim!r}: bf16 needs 576 or 512")
    zy = (num_blocks, block_size)
    rope = jnp.zeros((*zy, D_ROPE), jnp.bfloat16)
    if fmt == "bf16":
      return cls(jnp.zeros((*zy, d - D_ROPE), jnp.bfloat16), rope, None, fmt)
    g = GEOMETRY[fmt]
    sdt = jnp.float32 if fmt == "v32" else jnp.uint8
    floor = jnp.float32(2.0**-13) if fmt == "v32" else jnp.uint8(127 - 13)
    return cls(jnp.zeros((*zy, g.d_nope), jnp.float8_e4m3fn), rope,
               jnp.full((*zy, g.n_tiles), floor, sdt), fmt)

  # -- packed bytes ------------------------------------------------------------------

  def to_packed_bytes(self) -> jax.Array:
    """FlashMLA's memory image (uint8): v32/bf16 ``[Z, Y, 1, bpt]``; model1 ``[Z, padded]``.

    model1 pad bytes (the 8th scale byte of each token and the block tail) are written 0.
    """
    return _to_packed_jit(self)

  def _to_packed(self) -> jax.Array:
    z, y = self.num_blocks, self.block_size
    rope_u8 = _to_u8(self.rope)                                       # [Z, Y, 128]
    if self.fmt == "bf16":
      return jnp.concatenate([_to_u8(self.nope), rope_u8], -1).reshape(z, y, 1, -1)
    if self.fmt == "v32":
      tok_u8 = jnp.concatenate([_to_u8(self.nope), _to_u8(self.scales), rope_u8], -1)
      return tok_u8.reshape(z, y, 1, -1)
    data_u8 = jnp.concatenate([_to_u8(self.nope), rope_u8], -1).reshape(z, y * 576)
    scale_u8 = jnp.concatenate([self.scales, jnp.zeros((z, y, 1), jnp.uint8)], -1)
    total = block_bytes("model1", y)
    tail_u8 = jnp.zeros((z, total - y * 584), jnp.uint8)
    return jnp.concatenate([data_u8, scale_u8.reshape(z, y * 8), tail_u8], -1)

  @classmethod
  def from_packed_bytes(cls, packed: jax.Array, fmt: str, block_size: int | None = None) -> "KCache":
    """Inverse of ``to_packed_bytes`` (bit-exact; model1 pad bytes are ignored).

    Accepts uint8 (or float8_e4m3fn, FlashMLA's dtype for these bytes).  model1: the padded
    ``[Z, padded]`` block image (block_size inferred, or given), or an unpadded
    ``[Z, Y, 1, 584]`` / ``[Z, Y, 584]`` block image.
    """
    _check_fmt(fmt)
    packed = jnp.asarray(packed)
    if packed.dtype == jnp.float8_e4m3fn:
      packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)
    require(packed.dtype == jnp.uint8,
            f"packed dtype={packed.dtype}: expected uint8 (or float8_e4m3fn) bytes")
    if fmt in ("v32", "bf16"):
      tok_u8 = _squeeze_head(packed, "packed")                        # [Z, Y, bpt]
      bpt = tok_u8.shape[-1]
      if fmt == "bf16":
        require(bpt in (1152, 1024), f"packed shape={packed.shape}: bf16 expects 1152 or 1024 bytes/token")
      else:
        require(bpt == 656, f"packed shape={packed.shape}: v32 expects [Z, Y, 1, 656]")
      return _from_packed_tokens_jit(tok_u8, fmt)
    if packed.ndim in (3, 4):                                         # unpadded [Z, Y, (1,) 584]
      tok_u8 = _squeeze_head(packed, "packed")
      require(tok_u8.shape[-1] == 584, f"packed shape={packed.shape}: model1 view needs 584 bytes/token")
      block_size = tok_u8.shape[1]
      packed = tok_u8.reshape(tok_u8.shape[0], -1)
    require(packed.ndim == 2, f"packed shape={packed.shape}: model1 expects [Z, padded_block_bytes]")
    z, nbytes = packed.shape
    if block_size is None:
      block_size = nbytes // 584          # padding is < 576 < 584 bytes, so this is exact
    require(block_size > 0 and nbytes in (block_size * 584, block_bytes("model1", block_size)),
            f"packed shape={packed.shape}: not a model1 block of block_size={block_size} "
            f"({block_bytes('model1', max(block_size, 1))} bytes padded)")
    return _from_packed_model1_jit(packed, block_size)

  # -- dequantisation ------------------------------------------------------------------

  def to_bf16(self) -> jax.Array:
    """Dequantise the whole cache -> bf16 ``[Z, Y, 1, d]`` (FlashMLA's dequantize_k_cache)."""
    return _to_bf16_jit(self)

  def gather_bf16(self, slots: jax.Array) -> jax.Array:
    """Dequantise the tokens at flat slots (any shape) -> bf16 ``[*slots.shape, d]``.

    Out-of-range slots are clamped into the cache; callers mask them (with a select).
    """
    flat = jnp.clip(slots, 0, self.num_tokens - 1)
    pick = lambda a: None if a is None else a.reshape(self.num_tokens, a.shape[-1])[flat]
    return dequantize_tokens(pick(self.nope), pick(self.rope), pick(self.scales), self.fmt)


jax.tree_util.register_dataclass(
    KCache, data_fields=["nope", "rope", "scales"], meta_fields=["fmt"])


# One compilation per shape for the whole-cache conversions (eager op-by-op dispatch would
# compile every primitive separately).


@functools.partial(jax.jit, static_argnames=("fmt",))
def _from_bf16_jit(x_ZYH: jax.Array, fmt: str) -> KCache:
  return KCache(*quantize_tokens(x_ZYH, fmt), fmt)


@jax.jit
def _to_packed_jit(cache: KCache) -> jax.Array:
  return cache._to_packed()


@jax.jit
def _to_bf16_jit(cache: KCache) -> jax.Array:
  return dequantize_tokens(cache.nope, cache.rope, cache.scales, cache.fmt)[:, :, None, :]


@functools.partial(jax.jit, static_argnames=("fmt",))
def _from_packed_tokens_jit(tok_u8: jax.Array, fmt: str) -> KCache:
  """v32 / bf16 bytes ``[Z, Y, bpt]`` -> KCache."""
  if fmt == "bf16":
    vals = _from_u8(tok_u8, jnp.bfloat16)
    return KCache(vals[..., :-D_ROPE], vals[..., -D_ROPE:], None, fmt)
  return KCache(_from_u8(tok_u8[..., :512], jnp.float8_e4m3fn),
                _from_u8(tok_u8[..., 528:], jnp.bfloat16),
                _from_u8(tok_u8[..., 512:528], jnp.float32), fmt)


@functools.partial(jax.jit, static_argnames=("y",))
def _from_packed_model1_jit(packed_ZB: jax.Array, y: int) -> KCache:
  """model1 block bytes ``[Z, >= y*584]`` -> KCache (pad bytes ignored)."""
  z = packed_ZB.shape[0]
  data_u8 = packed_ZB[:, :y * 576].reshape(z, y, 576)
  scale_u8 = packed_ZB[:, y * 576:y * 584].reshape(z, y, 8)[..., :7]
  return KCache(_from_u8(data_u8[..., :448], jnp.float8_e4m3fn),
                _from_u8(data_u8[..., 448:], jnp.bfloat16), scale_u8, "model1")


def _squeeze_head(x: jax.Array, name: str) -> jax.Array:
  """``[Z, Y, 1, C]`` -> ``[Z, Y, C]`` (MLA has one KV head); ``[Z, Y, C]`` passes."""
  if x.ndim == 4:
    require(x.shape[2] == 1, f"{name} shape={x.shape}: expected one KV head, [Z, Y, 1, C]")
    return x[:, :, 0]
  require(x.ndim == 3, f"{name} shape={x.shape}: expected [Z, Y, 1, C] or [Z, Y, C]")
  return x


def _to_u8(a: jax.Array) -> jax.Array:
  """Reinterpret ``[..., C]`` as little-endian bytes ``[..., C * itemsize]``."""
  u8 = jax.lax.bitcast_convert_type(a, jnp.uint8)
  return u8.reshape(*a.shape[:-1], -1)


def _from_u8(a_u8: jax.Array, dtype) -> jax.Array:
  """Inverse of ``_to_u8``."""
  width = jnp.dtype(dtype).itemsize
  if width > 1:
    a_u8 = a_u8.reshape(*a_u8.shape[:-1], -1, width)
  return jax.lax.bitcast_convert_type(a_u8, dtype)


def quantize_tokens(x_NH: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array, Any]:
  """bf16 ``[..., d]`` -> (nope, rope, scales) in KCache field form."""
  x_NH = x_NH.astype(jnp.bfloat16)
  rope = x_NH[..., -D_ROPE:]
  if fmt == "bf16":
    return x_NH[..., :-D_ROPE], rope, None
  g = GEOMETRY[fmt]
  require(x_NH.shape[-1] == g.d, f"x shape={x_NH.shape}: fmt {fmt!r} needs head dim {g.d}")
  q, scale = quantize_tiles(x_NH[..., :g.d_nope], g.tile)
  if fmt == "model1":
    scale = pow2_ceil(scale)[1]          # s is already 2^k: this is just its exponent byte
  return q, rope, scale


def dequantize_tokens(nope, rope, scales, fmt: str) -> jax.Array:
  """KCache field form (any leading shape) -> bf16 ``[..., d]``."""
  if fmt == "bf16":
    return jnp.concatenate([nope, rope], -1)
  g = GEOMETRY[fmt]
  q_NTE = nope.reshape(*nope.shape[:-1], g.n_tiles, g.tile)
  if fmt == "v32":
    x = (q_NTE.astype(jnp.float32) * scales[..., None]).astype(jnp.bfloat16)
  else:
    x = q_NTE.astype(jnp.bfloat16) * e8m0_to_f32(scales).astype(jnp.bfloat16)[..., None]
  return jnp.concatenate([x.reshape(nope.shape), rope], -1)


# ----------------------------------------------------------------------------- public


def quantize_k_cache(x: jax.Array, fmt: str) -> jax.Array:
  """FlashMLA ``quantize_k_cache``: bf16 ``[Z, Y, 1, d]`` -> packed uint8 bytes."""
  return KCache.from_bf16(x, fmt).to_packed_bytes()


def dequantize_k_cache(packed: jax.Array, fmt: str, block_size: int | None = None) -> jax.Array:
  """FlashMLA ``dequantize_k_cache``: packed uint8 bytes -> bf16 ``[Z, Y, 1, d]``."""
  return KCache.from_packed_bytes(packed, fmt, block_size).to_bf16()


def as_kcache(k_cache: Any, name: str = "k_cache") -> KCache:
  """Accept a KCache, a bf16 ``[Z, Y, 1, d]`` array, or FlashMLA packed bytes.

  Packed bytes are recognised by shape: ``[Z, Y, 1, 656]`` -> v32, 2-D ``[Z, padded]`` or
  ``[Z, Y, 1, 584]`` -> model1.
  """
  if isinstance(k_cache, KCache):
    return k_cache.validate(name)
  require(hasattr(k_cache, "dtype") and hasattr(k_cache, "shape"),
          f"{name}: got {type(k_cache).__name__}, expected a KCache or an array")
  dt = k_cache.dtype
  if dt == jnp.bfloat16:
    require(k_cache.ndim == 4 and k_cache.shape[2] == 1 and k_cache.shape[3] in (576, 512),
            f"{name} shape={k_cache.shape}: expected bf16 [Z, Y, 1, 576 or 512]")
    return KCache.from_bf16(k_cache, "bf16")
  require(dt in (jnp.uint8, jnp.float8_e4m3fn),
          f"{name} dtype={dt}: expected bfloat16 values or uint8/float8_e4m3fn packed bytes")
  if k_cache.ndim == 4 and k_cache.shape[-1] == 656:
    return KCache.from_packed_bytes(k_cache, "v32")
  if (k_cache.ndim == 4 and k_cache.shape[-1] == 584) or k_cache.ndim == 2:
    return KCache.from_packed_bytes(k_cache, "model1")
  raise ValueError(f"{name} shape={k_cache.shape}: expected packed [Z, Y, 1, 656] (v32), "
                   "[Z, padded] or [Z, Y, 1, 584] (model1)")


def write_k_cache(cache: KCache, x: jax.Array, slots: jax.Array) -> KCache:
  """Quantise new tokens and write them at flat slots (block * block_size + offset).

  x: bf16 ``[N, d]`` (or ``[N, 1, d]``); slots: int ``[N]``; slots < 0 or past the cache
  are skipped (a scatter with mode="drop").  Duplicate slots: one write wins (unspecified).
  jit-friendly; the cache is returned, not mutated (donate it under jit to update in place).
  """
  x = jnp.asarray(x)
  if x.ndim == 3:
    require(x.shape[1] == 1, f"x shape={x.shape}: expected [N, d] or [N, 1, d]")
    x = x[:, 0]
  require(x.ndim == 2 and x.shape[-1] == cache.head_dim,
          f"x shape={x.shape}: expected [N, {cache.head_dim}]")
  slots = jnp.asarray(slots)
  require(slots.shape == x.shape[:1] and jnp.issubdtype(slots.dtype, jnp.integer),
          f"slots shape={slots.shape} dtype={slots.dtype}: expected int [{x.shape[0]}]")
  return _write_jit(cache, x, slots)


@jax.jit
def _write_jit(cache: KCache, x: jax.Array, slots: jax.Array) -> KCache:
  nope, rope, scales = quantize_tokens(x, cache.fmt)
  total = cache.num_tokens
  flat = jnp.where((slots >= 0) & (slots < total), slots, total)   # total -> block Z: dropped
  blk, off = flat // cache.block_size, flat % cache.block_size
  put = lambda dst, src: None if dst is None else dst.at[blk, off].set(src, mode="drop")
  return KCache(put(cache.nope, nope), put(cache.rope, rope), put(cache.scales, scales), cache.fmt)


def concat_tokens(caches: list[KCache]) -> KCache:
  """Concatenate caches of one format as a single cache of block size 1 (token t of cache
  c sits at slot offset_c + t).  A reshape, so block sizes may differ; used by tests."""
  flat = lambda a: a.reshape(-1, 1, a.shape[-1])
  fmt = caches[0].fmt
  cat = lambda name: (None if getattr(caches[0], name) is None else
                      jnp.concatenate([flat(getattr(c, name)) for c in caches], 0))
  return KCache(cat("nope"), cat("rope"), cat("scales"), fmt)


def host_value(x: Any) -> np.ndarray | None:
  """Concrete value of x as numpy, or None when x is a tracer (data checks run only then)."""
  if x is None:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
