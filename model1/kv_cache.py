"""Paged KV cache for decoding: page blocks, block tables, allocation and writes.

Every layer stores one vector per token (MLA's shared latent/key: 576 dims for v32,
512 for model1) in a ``pallas_kernels.fp8_cache.KCache`` of ``num_blocks`` page blocks
of ``block_size`` tokens, in one of the FlashMLA formats:

  ``bf16``    2*d bytes/token (the baseline)
  ``fp8``     the geometry's FP8 format: ``v32`` (656 B/token) or ``model1`` (584 B/token)
  ``f32``     float32 vectors, 4*d bytes/token (``F32Cache``): a float32 model decodes
              exactly as its full forward computes (bf16 storage alone costs ~1e-3);
              attention over it runs the plain-jnp float32 cores, not the bf16 kernels

A host-side ``BlockAllocator`` hands out blocks; each sequence owns a row of the block
table ``[B, max_blocks_per_seq]`` (unused entries point at block 0 and are never read,
since lengths mask them). The token at position p of sequence b lives at flat slot
``block_table[b, p // block_size] * block_size + p % block_size``.

Capacity checks happen on the host before any write, so a full cache raises a
``ValueError`` and leaves the cache unchanged.

Sparse models keep a richer per-layer cache (``PagedKVCache.for_model`` builds them;
``write_prefill`` fills any of them from a prefill):

  ``KCache``                dense layers, as above.
  ``DSALayerCache``         V3.2 DSA: the paged token ``kv`` KCache plus the indexer's key
                            per token, ``index_k [Z, Y, J]`` fp32 at the same slots.
  ``CompressedLayerCache``  V4 (not paged: a fixed size per sequence, as V4 allocates it):
      window  KCache with one block of W slots per sequence, a ring: position p of
              sequence b at slot b*W + p % W  (the main cache of ``sparse_decode``);
      comp    KCache with one block of M = ceil(max_tokens / r) entries per sequence,
              entry j at slot b*M + j (the *extra* cache of ``sparse_decode``);
      state   the compressor's partial block (kv, score) [B, coff*r, coff*H] fp32;
      icomp, istate  (CSA) the indexer compressor's entries [B, M, J] and its state.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model1.compressor import empty_state, prefill_state
from pallas_kernels import combine
from pallas_kernels.fp8_cache import D_ROPE, KCache, write_k_cache

CACHE_FORMATS = ("bf16", "fp8", "f32")


def kcache_format(cache_format: str, geometry: str) -> str:
  """The KCache format for a model geometry: 'bf16', or the geometry's own FP8 layout."""
  if cache_format not in CACHE_FORMATS + ("v32", "model1"):
    raise ValueError(f"cache_format={cache_format!r}; expected one of {CACHE_FORMATS}")
  if cache_format in ("bf16", "f32"):
    return cache_format
  if cache_format in ("v32", "model1") and cache_format != geometry:
    raise ValueError(f"cache_format={cache_format!r} does not match the model geometry "
                     f"{geometry!r}; expected 'bf16', 'fp8' or {geometry!r}")
  return geometry


@dataclasses.dataclass(frozen=True)
class F32Cache(KCache):
  """A ``KCache`` holding float32 values: nope ``[Z, Y, d-64]`` and rope ``[Z, Y, 64]``
  fp32, no scales, fmt "f32". ``gather_bf16`` (the name the attention cores call) returns
  float32 here, so ``attend_dense_fp32`` / ``attend_sparse_fp32`` read it unrounded."""

  @property
  def bytes_per_token(self) -> int:
    return 4 * self.head_dim

  def gather_bf16(self, slots: jax.Array) -> jax.Array:
    flat = jnp.clip(slots, 0, self.num_tokens - 1)
    pick = lambda a: a.reshape(self.num_tokens, a.shape[-1])[flat]  # noqa: E731
    return jnp.concatenate([pick(self.nope), pick(self.rope)], axis=-1)

  @classmethod
  def empty(cls, num_blocks: int, block_size: int, fmt: str = "f32",
            head_dim: int | None = None) -> "F32Cache":
    zy, r = (num_blocks, block_size), min(D_ROPE, head_dim)   # the split is storage only
    return cls(jnp.zeros((*zy, head_dim - r), jnp.float32),
               jnp.zeros((*zy, r), jnp.float32), None, "f32")


jax.tree_util.register_dataclass(F32Cache, data_fields=["nope", "rope", "scales"],
                                 meta_fields=["fmt"])


def empty_kcache(num_blocks: int, block_size: int, fmt: str, head_dim: int) -> KCache:
  """An empty cache of any format ('f32' -> ``F32Cache``, else ``KCache.empty``)."""
  if fmt == "f32":
    return F32Cache.empty(num_blocks, block_size, fmt, head_dim)
  return KCache.empty(num_blocks, block_size, fmt, head_dim)


def dense_decode(q_BTNH, cache, block_table_BZ, seqlens_B, *, head_dim_v: int,
                 softmax_scale: float, causal: bool, impl: str = "xla"):
  """``pallas_kernels.dense_decode`` for bf16/FP8 caches (queries cast to bf16, as the
  kernels take them); float32 math end to end for an ``F32Cache``. Returns (out, lse)."""
  if isinstance(cache, F32Cache):
    from pallas_kernels.dense_decode import attend_dense_fp32
    o, lse_BTN = attend_dense_fp32(q_BTNH.astype(jnp.float32), cache, block_table_BZ,
                                   seqlens_B, jnp.float32(softmax_scale),
                                   head_dim_v=head_dim_v, causal=causal)
    o, lse_BTN = combine.finalize(o, lse_BTN, out_dtype=jnp.float32)
    return o, jnp.swapaxes(lse_BTN, 1, 2)
  from pallas_kernels import mosaic_dense_decode
  from pallas_kernels.dense_decode import dense_decode as kernel
  from pallas_kernels.dispatch import model_kernel_impl
  impl = model_kernel_impl(impl, lambda: mosaic_dense_decode.supports(
      {"cache": cache, "q": q_BTNH}, head_dim_v))
  return kernel(q_BTNH.astype(jnp.bfloat16), cache, block_table_BZ, seqlens_B,
                head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal, impl=impl)


def sparse_decode(q_BTNH, cache, indices_BTX, *, head_dim_v: int, softmax_scale: float,
                  attn_sink=None, impl: str = "xla", extra_k_cache=None,
                  extra_indices_in_kvcache=None):
  """``pallas_kernels.sparse_decode`` (bf16 queries) or, for an ``F32Cache``, the same
  semantics in float32 (sink in the denominator only, invalid index -1)."""
  if isinstance(cache, F32Cache):
    from pallas_kernels.sparse_decode import attend_sparse_fp32
    B = indices_BTX.shape[0]
    full = lambda i: jnp.full((B,), i.shape[-1], jnp.int32)  # noqa: E731
    extra = {}
    if extra_k_cache is not None:
      extra = dict(extra_cache=extra_k_cache, extra_indices=extra_indices_in_kvcache,
                   extra_topk_length=full(extra_indices_in_kvcache))
    o, lse_BTN = attend_sparse_fp32(q_BTNH.astype(jnp.float32), cache, indices_BTX,
                                    full(indices_BTX), jnp.float32(softmax_scale), **extra,
                                    head_dim_v=head_dim_v)
    o, lse_BTN = combine.finalize(o, lse_BTN, attn_sink, out_dtype=jnp.float32)
    return o, jnp.swapaxes(lse_BTN, 1, 2)
  from pallas_kernels import mosaic_sparse_decode
  from pallas_kernels.dispatch import model_kernel_impl
  from pallas_kernels.sparse_decode import sparse_decode as kernel
  impl = model_kernel_impl(impl, lambda: mosaic_sparse_decode.supports(
      {"cache": cache, "extra_cache": extra_k_cache, "q": q_BTNH}, head_dim_v))
  return kernel(q_BTNH.astype(jnp.bfloat16), cache, indices_BTX, head_dim_v=head_dim_v,
                softmax_scale=softmax_scale, attn_sink=attn_sink, impl=impl,
                extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache)


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


@dataclasses.dataclass(frozen=True)
class DSALayerCache:
  kv: KCache                       # paged token cache (as a dense layer)
  index_k: jax.Array               # [Z, Y, J] fp32 indexer keys at the same slots

  @property
  def bytes_per_token(self) -> int:
    return self.kv.bytes_per_token + 4 * self.index_k.shape[-1]


@dataclasses.dataclass(frozen=True)
class CompressedLayerCache:
  window: KCache                   # [B blocks, W slots] ring
  comp: KCache | None = None       # [B blocks, M entries]
  state: tuple | None = None       # compressor (kv, score) [B, coff*r, coff*H]
  icomp: jax.Array | None = None   # [B, M, J] CSA indexer keys
  istate: tuple | None = None
  ratio: int = 0

  @property
  def bytes_per_token(self) -> int:
    """Amortised bytes per token of context (the window's W slots are a constant)."""
    if not self.ratio:
      return 0
    j = 0 if self.icomp is None else 4 * self.icomp.shape[-1]
    return (self.comp.bytes_per_token + j) // self.ratio

  @classmethod
  def empty(cls, batch: int, max_tokens: int, fmt: str, a, layer_id: int):
    r = a.compress_ratio(layer_id)
    window = empty_kcache(batch, a.window_size, fmt, a.head_dim)
    if not r:
      return cls(window)
    m = -(-max_tokens // r)
    icomp = istate = None
    if r == 4:
      icomp = jnp.zeros((batch, m, a.index_head_dim), jnp.float32)
      istate = empty_state(batch, r, a.index_head_dim)
    return cls(window, empty_kcache(batch, m, fmt, a.head_dim), empty_state(batch, r, a.head_dim),
               icomp, istate, r)


for _cls in (DSALayerCache, CompressedLayerCache):
  jax.tree_util.register_dataclass(
      _cls, data_fields=[f.name for f in dataclasses.fields(_cls) if f.name != "ratio"],
      meta_fields=["ratio"] if _cls is CompressedLayerCache else [])


@dataclasses.dataclass
class PagedKVCache:
  layers: list                     # per layer: KCache | DSALayerCache | CompressedLayerCache
  block_table: np.ndarray          # [B, max_blocks_per_seq] int32 (host)
  seqlens: np.ndarray              # [B] int32 (host): tokens written per sequence
  allocator: BlockAllocator
  owned: list[list[int]]           # blocks held by each sequence
  page_block: int = 64             # tokens per page block

  @classmethod
  def create(cls, n_layers: int, batch: int, max_tokens: int, fmt: str, head_dim: int,
             block_size: int = 64, num_blocks: int | None = None) -> "PagedKVCache":
    if block_size < 1:
      raise ValueError(f"block_size={block_size}; expected a positive int")
    per_seq = -(-max_tokens // block_size)
    num_blocks = num_blocks if num_blocks is not None else batch * per_seq
    layers = [empty_kcache(num_blocks, block_size, fmt, head_dim) for _ in range(n_layers)]
    return cls(layers, np.zeros((batch, per_seq), np.int32), np.zeros((batch,), np.int32),
               BlockAllocator(num_blocks), [[] for _ in range(batch)], block_size)

  @classmethod
  def for_model(cls, cfg, batch: int, max_tokens: int, fmt: str, block_size: int = 64,
                num_blocks: int | None = None) -> "PagedKVCache":
    """The caches a ``ModelConfig`` needs: per-layer KCache, DSALayerCache or
    CompressedLayerCache (see the module docstring)."""
    a = cfg.attention
    n_paged = 0 if a.sparse == "compressed" else cfg.n_layers
    c = cls.create(n_paged, batch, max_tokens, fmt, a.d_qk, block_size, num_blocks)
    if a.sparse == "dsa":
      c.layers = [DSALayerCache(k, jnp.zeros(k.nope.shape[:2] + (a.index_head_dim,),
                                             jnp.float32)) for k in c.layers]
    elif a.sparse == "compressed":
      c.layers = [CompressedLayerCache.empty(batch, max_tokens, fmt, a, i)
                  for i in range(cfg.n_layers)]
    return c

  @property
  def block_size(self) -> int:
    return self.page_block

  @property
  def fmt(self) -> str:
    return _main(self.layers[0]).fmt

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
  if isinstance(cache, F32Cache):  # unrounded; slots < 0 or past the cache are dropped
    flat = slots_BT.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < cache.num_tokens), flat, cache.num_tokens)
    blk, off = flat // cache.block_size, flat % cache.block_size
    x, P = kv_BTH.reshape(-1, H).astype(jnp.float32), cache.nope.shape[-1]
    put = lambda dst, src: dst.at[blk, off].set(src, mode="drop")  # noqa: E731
    return F32Cache(put(cache.nope, x[:, :P]), put(cache.rope, x[:, P:]), None, "f32")
  return write_k_cache(cache, kv_BTH.reshape(-1, H).astype(jnp.bfloat16), slots_BT.reshape(-1))


def _main(layer) -> KCache:
  return layer if isinstance(layer, KCache) else (
      layer.kv if isinstance(layer, DSALayerCache) else layer.window)


def write_prefill(layer, kv, block_table_BZ: jax.Array, lens_B: jax.Array):
  """Write one layer's prefill output (``MLA(..., return_kv=True)``'s second value for
  prompts right-padded to T, ``lens_B`` real tokens each) into its cache."""
  T = (kv if isinstance(layer, KCache) else kv["kv"]).shape[1]
  B = lens_B.shape[0]
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  real_BT = pos_BT < lens_B[:, None]
  if isinstance(layer, KCache):
    return write_layer(layer, kv, slots_for(block_table_BZ, pos_BT, layer.block_size, real_BT))
  if isinstance(layer, DSALayerCache):
    slots_BT = slots_for(block_table_BZ, pos_BT, layer.kv.block_size, real_BT)
    ik = layer.index_k.reshape(-1, layer.index_k.shape[-1])
    ik = ik.at[slots_BT.reshape(-1)].set(kv["index_k"].reshape(-1, ik.shape[-1]).astype(ik.dtype),
                                         mode="drop")
    return DSALayerCache(write_layer(layer.kv, kv["kv"], slots_BT), ik.reshape(layer.index_k.shape))
  W, r, b_B1 = layer.window.block_size, layer.ratio, jnp.arange(B)[:, None]
  ring_BT = jnp.where(real_BT & (pos_BT >= lens_B[:, None] - W), b_B1 * W + pos_BT % W, -1)
  new = {"window": write_layer(layer.window, kv["kv"], ring_BT)}
  if r:
    Mx, M = layer.comp.block_size, kv["comp"].shape[1]
    done_BM = jnp.arange(M)[None] < (lens_B // r)[:, None]          # complete blocks only
    new["comp"] = write_layer(layer.comp, kv["comp"],
                              jnp.where(done_BM, b_B1 * Mx + jnp.arange(M), -1))
    new["state"] = prefill_state(kv["ckv"], kv["cscore"], lens_B, r)
    if layer.icomp is not None:
      ik = jnp.where(done_BM[..., None], kv["icomp"].astype(layer.icomp.dtype), 0.0)
      new["icomp"] = layer.icomp.at[:, :M].set(ik)
      new["istate"] = prefill_state(kv["ickv"], kv["icscore"], lens_B, r)
  return dataclasses.replace(layer, **new)
