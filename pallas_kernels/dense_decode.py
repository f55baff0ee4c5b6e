"""Dense paged decode attention: FlashMLA's ``flash_mla_with_kvcache`` without ``indices``
(DESIGN.md §4).  Public entry point plus the plain-jnp reference that kernels are tested
against.

What it computes, per batch b with s_k = cache_seqlens[b] cached tokens, laid out in pages
``block_table[b, 0], block_table[b, 1], ...`` of block_size tokens each:
    query t (of s_q) sees keys j < s_k, and with causal=True only j <= s_k - s_q + t
    (the s_q queries are the last s_q positions of the sequence);
    out = softmax(softmax_scale * q . k) @ k[..., :head_dim_v],  lse natural log.
A row that sees no key (s_k = 0, or causal with s_k < s_q) gives out 0 and lse +inf, as
sparse decode.  FlashMLA's dense decoder reads bf16 only; this one also reads the FP8
formats (``KCache`` v32 / model1, or their packed bytes).  h_q may be any multiple of the
number of KV heads (bf16 arrays ``[Z, Y, h_kv, d]``; the MLA caches have one KV head).

Keys past cache_seqlens (stale or garbage pages, block_table entries past the sequence)
are removed with selects, so their bytes never matter; tokens inside the sequence that a
causal row does not see are assumed finite (they are real tokens).

Source: FlashMLA ``flash_mla/flash_mla_interface.py`` and the dense reference of its tests
(``torch.ones(s_q, s_k).tril(diagonal=s_k - s_q)`` causal mask).  Shapes (letter key:
B batch, T query positions, N query heads, K KV heads, G heads per KV head, S key
positions, Z page blocks, Y tokens per block, H head dim, V value dim):
  q ``[B, T, N, H]`` bf16; block_table ``[B, max_blocks]`` int32; cache_seqlens ``[B]``
  int32.  Returns out ``[B, T, N, V]`` bf16 and lse ``[B, N, T]`` fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import combine
from pallas_kernels.fp8_cache import KCache, as_kcache, host_value, require

IMPLS = ("xla", "pallas")


def validate_dense_decode_args(q, k_cache, block_table, cache_seqlens, *, head_dim_v,
                               softmax_scale=None, causal=False):
  """Check shapes/dtypes (always) and page/length values (when concrete); normalise args."""
  require(hasattr(q, "shape") and q.ndim == 4 and q.dtype == jnp.bfloat16,
          f"q shape={getattr(q, 'shape', None)} dtype={getattr(q, 'dtype', None)}: "
          "expected bf16 [b, s_q, h_q, d_qk]")
  b, s_q, h_q, d_qk = q.shape
  if (hasattr(k_cache, "dtype") and k_cache.dtype == jnp.bfloat16 and k_cache.ndim == 4
      and k_cache.shape[2] > 1):
    cache = k_cache                     # bf16 with several KV heads (GQA): read as is
    num_blocks, block_size, h_kv, d_k = cache.shape
  else:
    cache = as_kcache(k_cache, "k_cache")
    num_blocks, block_size, h_kv, d_k = cache.num_blocks, cache.block_size, 1, cache.head_dim
  require(d_k == d_qk, f"k_cache head dim {d_k}: q has d_qk={d_qk}")
  require(h_q % h_kv == 0, f"q has h_q={h_q} heads: expected a multiple of h_kv={h_kv}")
  require(isinstance(head_dim_v, int) and 0 < head_dim_v <= d_qk,
          f"head_dim_v={head_dim_v!r}: expected an int in (0, {d_qk}]")
  require(isinstance(causal, bool), f"causal={causal!r}: expected a bool")
  require(hasattr(block_table, "shape") and block_table.ndim == 2 and block_table.shape[0] == b
          and block_table.dtype == jnp.int32,
          f"block_table shape={getattr(block_table, 'shape', None)} dtype={getattr(block_table, 'dtype', None)}: "
          f"expected int32 [{b}, max_blocks]")
  require(hasattr(cache_seqlens, "shape") and cache_seqlens.shape == (b,)
          and cache_seqlens.dtype == jnp.int32,
          f"cache_seqlens shape={getattr(cache_seqlens, 'shape', None)} dtype={getattr(cache_seqlens, 'dtype', None)}: "
          f"expected int32 [{b}]")
  capacity = block_table.shape[1] * block_size
  lens = host_value(cache_seqlens)
  if lens is not None:
    require(bool(((lens >= 0) & (lens <= capacity)).all()),
            f"cache_seqlens={lens.tolist()}: expected values in [0, {capacity}] "
            f"({block_table.shape[1]} blocks x {block_size} tokens)")
    table = host_value(block_table)
    if table is not None:
      used = np.arange(table.shape[1])[None, :] < -(-lens[:, None] // block_size)
      bad = used & ((table < 0) | (table >= num_blocks))
      if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{where}]={int(table[where])}: expected a block in "
                         f"[0, {num_blocks}) for a page inside cache_seqlens")
  scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
  return dict(q=q, cache=cache, block_table=block_table, cache_seqlens=cache_seqlens,
              softmax_scale=jnp.asarray(scale, jnp.float32), causal=causal)


def _gather_pages(cache, block_table_BP):
  """Keys of every page in the table, in sequence order: bf16 ``[B, S, K, H]``, S = P * Y."""
  if isinstance(cache, KCache):
    y = cache.block_size
    table = jnp.clip(block_table_BP, 0, cache.num_blocks - 1)
    slots_BPY = table[:, :, None] * y + jnp.arange(y, dtype=jnp.int32)
    slots_BS = slots_BPY.reshape(slots_BPY.shape[0], -1)
    return cache.gather_bf16(slots_BS)[:, :, None, :]
  table = jnp.clip(block_table_BP, 0, cache.shape[0] - 1)
  k_BPYKH = cache[table]
  return k_BPYKH.reshape(k_BPYKH.shape[0], -1, *k_BPYKH.shape[3:])


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal"))
def attend_dense_fp32(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal):
  """Core: (out ``[B, T, N, V]`` fp32, lse ``[B, T, N]`` with -inf for rows seeing nothing)."""
  b, s_q, h_q, d = q.shape
  k_BSKH = _gather_pages(cache, block_table).astype(jnp.float32)
  s_k = k_BSKH.shape[1]
  h_kv = k_BSKH.shape[2]
  j_S = jnp.arange(s_k, dtype=jnp.int32)
  in_seq_BS = j_S[None, :] < cache_seqlens[:, None]
  k_BSKH = jnp.where(in_seq_BS[:, :, None, None], k_BSKH, 0.0)      # stale pages -> exact 0
  visible_BTS = jnp.broadcast_to(in_seq_BS[:, None, :], (b, s_q, s_k))
  if causal:
    t_T = jnp.arange(s_q, dtype=jnp.int32)
    last_BT = cache_seqlens[:, None] - s_q + t_T[None, :]           # last key query t sees
    visible_BTS = visible_BTS & (j_S[None, None, :] <= last_BT[:, :, None])
  q_BTKGH = q.astype(jnp.float32).reshape(b, s_q, h_kv, h_q // h_kv, d)
  hp = jax.lax.Precision.HIGHEST
  logits_BTKGS = jnp.einsum("btkgh,bskh->btkgs", q_BTKGH, k_BSKH, precision=hp) * softmax_scale
  p_BTKGS, lse_BTKG, _ = combine.masked_softmax(logits_BTKGS, visible_BTS[:, :, None, None, :])
  out_BTKGV = jnp.einsum("btkgs,bskv->btkgv", p_BTKGS, k_BSKH[..., :head_dim_v], precision=hp)
  return out_BTKGV.reshape(b, s_q, h_q, head_dim_v), lse_BTKG.reshape(b, s_q, h_q)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal"))
def _reference_core(q, cache, block_table, cache_seqlens, softmax_scale, *, head_dim_v, causal):
  out_BTNV, lse_BTN = attend_dense_fp32(q, cache, block_table, cache_seqlens, softmax_scale,
                                        head_dim_v=head_dim_v, causal=causal)
  out_BTNV, lse_BTN = combine.finalize(out_BTNV, lse_BTN)
  return out_BTNV, jnp.transpose(lse_BTN, (0, 2, 1))


def dense_decode_reference(q, k_cache, block_table, cache_seqlens, *, head_dim_v,
                           softmax_scale=None, causal=False):
  """Plain-jnp oracle (fp32 math on dequantised keys).  Arguments as ``dense_decode``."""
  args = validate_dense_decode_args(q, k_cache, block_table, cache_seqlens,
                                    head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                                    causal=causal)
  return _reference_core(**args, head_dim_v=head_dim_v)


def dense_decode(q, k_cache, block_table, cache_seqlens, *, head_dim_v, softmax_scale=None,
                 causal=False, impl="xla"):
  """Dense paged decode attention (FlashMLA ``flash_mla_with_kvcache`` without indices).

  Args:
    q: bf16 ``[b, s_q, h_q, d_qk]``.
    k_cache: ``KCache`` (v32 / model1 / bf16), FlashMLA packed bytes, or a bf16 array
      ``[num_blocks, block_size, h_kv, d_qk]`` with h_q a multiple of h_kv.
    block_table: int32 ``[b, max_blocks]``: page blocks of each sequence, in order.
    cache_seqlens: int32 ``[b]``: tokens in each sequence (checked when concrete).
    head_dim_v: value dims (the first head_dim_v of the key).
    softmax_scale: default d_qk ** -0.5.
    causal: for s_q > 1, query t sees keys j <= cache_seqlens - s_q + t.
    impl: "xla" (the reference) or "pallas" (kernels; not implemented yet).
  Returns:
    out bf16 ``[b, s_q, h_q, head_dim_v]``, lse fp32 ``[b, h_q, s_q]`` (+inf if no key).
  """
  require(impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}")
  args = validate_dense_decode_args(q, k_cache, block_table, cache_seqlens,
                                    head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                                    causal=causal)
  if impl == "pallas":
    raise NotImplementedError(
        "dense_decode(impl='pallas'): the Pallas dense-decode kernel is not written yet; "
        "use impl='xla' (the jnp reference) for now")
  return _reference_core(**args, head_dim_v=head_dim_v)
