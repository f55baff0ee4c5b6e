"""Paged KV cache for decoding: page blocks, block tables, allocation and writes.

Every layer stores one vector per token (MLA's shared latent/key: 576 dims for v32,
512 for model1) in a ``pallas_kernels.fp8_cache.KCache`` of ``num_blocks`` page blocks
of ``block_size`` tokens, in one of the FlashMLA formats:

  ``bf16``    2*d bytes/token (the baseline)
  ``fp8``     the geometry's FP8 format: ``v32`` (656 B/token) or ``model1`` (584 B/token)

A host-side ``BlockAllocator`` hands out blocks; each sequence owns a row of the block
table ``[B, max_blocks_per_seq]`` (unused entries point at block 0 and are never read,
since lengths mask them). The token at position p of sequence b lives at flat slot
``block_table[b, p // block_size] * block_size + p % block_size``.

Capacity checks happen on the host before any write, so a full cache raises a
``ValueError`` and leaves the cache unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_cache import KCache, write_k_cache

CACHE_FORMATS = ("bf16", "fp8")


def kcache_format(cache_format: str, geometry: str) -> str:
  """The KCache format for a model geometry: 'bf16', or the geometry's own FP8 layout."""
  if cache_format not in CACHE_FORMATS + ("v32", "model1"):
    raise ValueError(f"cache_format={cache_format!r}; expected one of {CACHE_FORMATS}")
  if cache_format == "bf16":
    return "bf16"
  if cache_format in ("v32", "model1") and cache_format != geometry:
    raise ValueError(f"cache_format={cache_format!r} does not match the model geometry "
                     f"{geometry!r}; expected 'bf16', 'fp8' or {geometry!r}")
  return geometry


class BlockAllocator:
  """Free list of page blocks (host side)."""

  def __init__(self, num_blocks: int):
    self.num_blocks = num_blocks
    self.free_blocks = list(range(num_blocks - 1, -1, -1))

  def allocate(self, n: int) -> list[int]:
    if n > len(self.free_blocks):
      raise ValueError(f"KV cache is full: {n} more page blocks requested, "
                       f"{len(self.free_blocks)} of {self.num_blocks} free; expected a "
                       f"larger cache (num_blocks) or shorter sequences")
    return [self.free_blocks.pop() for _ in range(n)]

  def free(self, blocks: Sequence[int]) -> None:
    self.free_blocks.extend(int(b) for b in blocks)


@dataclasses.dataclass
class PagedKVCache:
  layers: list[KCache]             # one per transformer layer
  block_table: np.ndarray          # [B, max_blocks_per_seq] int32 (host)
  seqlens: np.ndarray              # [B] int32 (host): tokens written per sequence
  allocator: BlockAllocator
  owned: list[list[int]]           # blocks held by each sequence

  @classmethod
  def create(cls, n_layers: int, batch: int, max_tokens: int, fmt: str, head_dim: int,
             block_size: int = 64, num_blocks: int | None = None) -> "PagedKVCache":
    if block_size < 1:
      raise ValueError(f"block_size={block_size}; expected a positive int")
    per_seq = -(-max_tokens // block_size)
    num_blocks = num_blocks if num_blocks is not None else batch * per_seq
    layers = [KCache.empty(num_blocks, block_size, fmt, head_dim) for _ in range(n_layers)]
    return cls(layers, np.zeros((batch, per_seq), np.int32), np.zeros((batch,), np.int32),
               BlockAllocator(num_blocks), [[] for _ in range(batch)])

  @property
  def block_size(self) -> int:
    return self.layers[0].block_size

  @property
  def fmt(self) -> str:
    return self.layers[0].fmt

  def bytes_per_token(self) -> int:
    return sum(c.bytes_per_token for c in self.layers)

  def reserve(self, new_tokens: Sequence[int]) -> None:
    """Make room for ``new_tokens[b]`` more tokens in each sequence (host check first:
    on failure nothing changes)."""
    bs = self.block_size
    need = []
    for b, n in enumerate(new_tokens):
      total = int(self.seqlens[b]) + int(n)
      if total > self.block_table.shape[1] * bs:
        raise ValueError(f"sequence {b} would hold {total} tokens; expected at most "
                         f"{self.block_table.shape[1] * bs} (max_tokens of this cache)")
      need.append(-(-total // bs) - len(self.owned[b]))
    if sum(need) > len(self.allocator.free_blocks):
      self.allocator.allocate(sum(need))  # raises the 'cache is full' error
    for b, n in enumerate(need):
      if n > 0:
        blocks = self.allocator.allocate(n)
        self.block_table[b, len(self.owned[b]):len(self.owned[b]) + n] = blocks
        self.owned[b] += blocks

  def release(self, b: int) -> None:
    """Free sequence b's blocks (its row can then be reused)."""
    self.allocator.free(self.owned[b])
    self.owned[b] = []
    self.block_table[b] = 0
    self.seqlens[b] = 0


def slots_for(block_table_BZ: jax.Array, positions_BT: jax.Array, block_size: int,
              valid_BT: jax.Array | None = None) -> jax.Array:
  """Flat cache slots of positions (-1 where ``valid_BT`` is False: such writes drop)."""
  blk = jnp.take_along_axis(block_table_BZ, positions_BT // block_size, axis=1,
                            mode="clip")
  slots = blk * block_size + positions_BT % block_size
  return slots if valid_BT is None else jnp.where(valid_BT, slots, -1)


def write_layer(cache: KCache, kv_BTH: jax.Array, slots_BT: jax.Array) -> KCache:
  H = kv_BTH.shape[-1]
  return write_k_cache(cache, kv_BTH.reshape(-1, H).astype(jnp.bfloat16), slots_BT.reshape(-1))
