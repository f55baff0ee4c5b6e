"""What the attention front ends accept as a KV cache, and the 2-D views the kernels read.

A cache argument is one of
  * a ``KCache`` (v32 / model1 / bf16 structure of arrays): read in place;
  * a bf16 array ``[Z, Y, h_kv, d]`` (FlashMLA's bf16 cache; h_kv > 1 only for dense
    decode): read in place, the same array passed twice to the kernel (NoPE tiles from
    column 0, the RoPE tile from column d - 64), so it is never split or copied;
  * FlashMLA packed bytes (v32 ``[Z, Y, 1, 656]``, model1 ``[Z, padded]`` or
    ``[Z, Y, 1, 584]``; uint8 or float8_e4m3fn): wrapped in a ``PackedCache`` and read in
    place too.  Triton cannot bitcast between different widths, so the kernels view the
    bytes as uint16 words and rebuild each part in registers (``_tiles``): codes split
    into bytes, RoPE words bitcast to bf16, fp32 scales joined from two words, ue8m0
    scales picked from one.  (The XLA reference converts them to a ``KCache``.)
``kernel_operands`` flattens leading dims (row-major reshapes: XLA bitcasts) and views
bytes and FP8 codes as uint16 pairs (``code_words``: a bitcast too), so no cache-sized
buffer is made on the way to the kernel.

Why uint16 codes (64-bit-safe addressing): Pallas Triton (jax 0.11) computes a load's
element offsets in int32 unless the whole array exceeds 2^32 bytes, when it switches to
int64.  A 1-byte array of 2-4 GiB overflows int32 (Triton sign-extends the offset): the
v32 NoPE codes pass 2^31 bytes at 4,194,304 tokens.  With 2-byte elements every offset of
an array up to 2^32 bytes fits in int32.  ``check_addressable`` rejects what is left
(model1's 7-byte scale rows between 306,783,379 and 613,566,756 tokens).
Letter key: Z page blocks, Y tokens per block, K KV heads, H head dim, N rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._tiles import PackedAddress
from pallas_kernels.fp8_cache import D_ROPE, GEOMETRY, KCache, as_kcache, require


@dataclasses.dataclass(frozen=True)
class PackedCache:
  """FlashMLA packed bytes, validated, as given (uint8): v32 ``[Z, Y, 656]``, model1
  ``[Z, block_bytes]`` (padded, or Y * 584 unpadded).  A pytree (``fmt`` and
  ``block_size`` static)."""
  data: Any
  fmt: str
  block_size: int

  @property
  def num_blocks(self) -> int:
    return self.data.shape[0]

  def to_kcache(self) -> KCache:
    return KCache.from_packed_bytes(self.data, self.fmt, self.block_size)


jax.tree_util.register_dataclass(PackedCache, data_fields=["data"],
                                 meta_fields=["fmt", "block_size"])


def _packed(k_cache, name: str) -> PackedCache | None:
  """Packed bytes -> PackedCache (shape checks as ``as_kcache``); None if not bytes."""
  if not (hasattr(k_cache, "dtype") and k_cache.dtype in (jnp.uint8, jnp.float8_e4m3fn)):
    return None
  # The shape checks of as_kcache, traced abstractly (nothing is converted).
  kc = jax.eval_shape(lambda x: as_kcache(x, name), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype))
  data = k_cache
  if data.dtype == jnp.float8_e4m3fn:
    data = jax.lax.bitcast_convert_type(data, jnp.uint8)                    # same width: a view
  if kc.fmt == "v32":
    return PackedCache(data.reshape(data.shape[0], data.shape[1], 656), "v32", kc.block_size)
  return PackedCache(data.reshape(data.shape[0], -1), "model1", kc.block_size)


def is_bf16_pages(k_cache: Any) -> bool:
  return (hasattr(k_cache, "dtype") and hasattr(k_cache, "ndim") and not isinstance(k_cache, KCache)
          and k_cache.dtype == jnp.bfloat16 and k_cache.ndim == 4)


def accept_cache(k_cache: Any, name: str = "k_cache", *, max_kv_heads: int | None = 1):
  """Validate a cache argument: a bf16 ``[Z, Y, K, d]`` array is kept as is, anything
  else goes through ``as_kcache`` (KCache passes; packed bytes are converted)."""
  if is_bf16_pages(k_cache):
    z, y, k, d = k_cache.shape
    require(d in (576, 512) and k >= 1 and (max_kv_heads is None or k <= max_kv_heads),
            f"{name} shape={tuple(k_cache.shape)}: expected bf16 [Z, Y, "
            f"{'1' if max_kv_heads == 1 else 'h_kv'}, 576 or 512]")
    return k_cache
  if isinstance(k_cache, PackedCache):
    return k_cache
  return _packed(k_cache, name) or as_kcache(k_cache, name)


class CacheInfo(NamedTuple):
  fmt: str
  num_blocks: int
  block_size: int
  h_kv: int
  head_dim: int

  @property
  def num_tokens(self) -> int:
    return self.num_blocks * self.block_size


def info(cache) -> CacheInfo:
  if isinstance(cache, KCache):
    return CacheInfo(cache.fmt, cache.num_blocks, cache.block_size, 1, cache.head_dim)
  if isinstance(cache, PackedCache):
    return CacheInfo(cache.fmt, cache.num_blocks, cache.block_size, 1, GEOMETRY[cache.fmt].d)
  z, y, k, d = cache.shape
  return CacheInfo("bf16", z, y, k, d)


def gather_bf16(cache, slots: jax.Array) -> jax.Array:
  """Dequantised keys at flat token slots (one KV head) -> bf16 ``[*slots.shape, d]``;
  out-of-range slots are clamped (callers mask them).  Touches only the gathered rows."""
  if isinstance(cache, KCache):
    return cache.gather_bf16(slots)
  if isinstance(cache, PackedCache):                    # the reference: convert, then gather
    return cache.to_kcache().gather_bf16(slots)
  z, y, k, d = cache.shape
  flat = jnp.clip(slots, 0, z * y - 1)
  return cache.reshape(z * y * k, d)[flat * k]


class Operands(NamedTuple):
  """2-D views for a kernel: row (block * Y + offset) * h_kv + kv_head is one key."""
  fmt: str
  nope: jax.Array              # bf16 [N, d - 64 or d], or fp8 codes as uint16 [N, P/2]
  rope: jax.Array              # bf16 [N, 64] (or the whole bf16 key, read from rope_col)
  scales: jax.Array | None     # v32 fp32 [N, 4], model1 uint8 [N, 7], bf16 None
  rope_col: int
  packed: PackedAddress | None = None     # packed bytes: nope = rope = the uint16 words


def kernel_operands(cache, name: str = "k_cache") -> Operands:
  """Views of a cache for the kernels (no copies), each checked by ``check_addressable``."""
  if isinstance(cache, KCache):
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
    nope = flat(cache.nope)
    if nope.dtype == jnp.float8_e4m3fn:
      nope = code_words(nope)
    ops = Operands(cache.fmt, nope, flat(cache.rope), flat(cache.scales), 0)
  elif isinstance(cache, PackedCache):
    y = cache.block_size
    if cache.fmt == "v32":
      words = code_words(cache.data.reshape(-1, 656))                       # [Z*Y, 328]
      addr = PackedAddress(tokens_per_row=1, token_words=0, rope_word=264, scale_word=256,
                           scale_words=0)
    else:
      words = code_words(cache.data)                                        # [Z, bytes/2]
      addr = PackedAddress(tokens_per_row=y, token_words=288, rope_word=224,
                           scale_word=y * 288, scale_words=4)
    ops = Operands(cache.fmt, words, words, None, 0, addr)
  else:
    z, y, k, d = cache.shape
    flat = cache.reshape(z * y * k, d)
    ops = Operands("bf16", flat, flat, None, d - D_ROPE)
  for part in ("nope", "rope", "scales"):
    a = getattr(ops, part)
    if a is not None:
      check_addressable(f"{name} ({part} array)", a.shape, a.dtype)
  return ops


def code_words(codes_NP: jax.Array) -> jax.Array:
  """fp8 / uint8 ``[N, P]`` -> uint16 ``[N, P/2]``, word j = byte 2j | byte 2j+1 << 8."""
  n, p = codes_NP.shape
  return jax.lax.bitcast_convert_type(codes_NP.reshape(n, p // 2, 2), jnp.uint16)


def offset_bits(shape, dtype) -> int:
  """Width of the element offsets Pallas Triton (jax 0.11) computes for a load from an
  array of this shape and dtype: 64 when the array exceeds 2^32 bytes, else 32."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize
  return 64 if nbytes > 2**32 else 32


def check_addressable(name: str, shape, dtype) -> None:
  """ValueError if an element offset of the array would not fit the int32 offsets Pallas
  Triton uses for it (signed: Triton sign-extends): only 1-byte arrays of 2-4 GiB."""
  n = int(np.prod(shape, dtype=np.int64))
  if offset_bits(shape, dtype) == 32 and n - 1 > 2**31 - 1:
    raise ValueError(
        f"{name} shape={tuple(shape)} dtype={jnp.dtype(dtype).name}: {n} elements need "
        "offsets past int32, but the array is under 2^32 bytes, where Pallas Triton "
        "computes int32 offsets; expected fewer than 2^31 elements (a smaller cache) or "
        "more than 2^32 bytes")
