"""Sparse decode attention over a paged (FP8) KV cache: FlashMLA's ``flash_mla_with_kvcache``
with ``indices`` (DESIGN.md §4).  This file holds the public entry point and the plain-jnp
reference; Pallas kernels will join it and are tested against the reference.

What it computes, per batch b, query position t and head n (one shared KV vector per token):
    keys   k_x = dequant(cache[indices[b, t, x]]),  x < topk_length[b] and index != -1,
           plus the extra cache's keys chosen the same way (one softmax over both sets);
    logits l_x = softmax_scale * q[b, t, n] . k_x       (fp32 accumulate)
    out    = sum_x softmax(l)_x * k_x[:head_dim_v] * 1 / (1 + exp(attn_sink[n] - lse))
    lse    = log sum_x exp(l_x)                          (natural log; sink excluded)
A row with no valid key gives out 0 and lse +inf.  Invalid slots are removed with selects,
so their bytes (even NaN) never reach the output.  Value = the first head_dim_v dims of the
key: the 512 latent dims for v32 (d_qk 576), the whole key for model1 (d_qk 512).

Source: FlashMLA ``flash_mla/flash_mla_interface.py`` and ``tests/ref.py``
(``ref_sparse_attn_decode``).  Shapes (letter key: B batch, T query positions, N query
heads, H head dim, X top-k, V value dim):
  q ``[B, T, N, H]`` bf16; k_cache KCache / FlashMLA packed bytes; indices ``[B, T, X]`` int32
  (= block * block_size + offset, -1 invalid); topk_length ``[B]`` int32; attn_sink ``[N]``
  fp32.  Returns out ``[B, T, N, V]`` bf16 and lse ``[B, N, T]`` fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import combine
from pallas_kernels.fp8_cache import KCache, as_kcache, host_value, require

IMPLS = ("xla", "pallas")


def _check_lengths(name: str, x, batch: int, topk: int) -> jax.Array | None:
  if x is None:
    return None
  require(hasattr(x, "shape") and x.shape == (batch,) and jnp.issubdtype(x.dtype, jnp.integer),
          f"{name} shape={getattr(x, 'shape', None)} dtype={getattr(x, 'dtype', None)}: "
          f"expected int32 [{batch}]")
  xv = host_value(x)
  if xv is not None:
    require(bool(((xv >= 0) & (xv <= topk)).all()),
            f"{name}={xv.tolist()}: expected values in [0, {topk}]")
  return jnp.asarray(x, jnp.int32)


def _check_indices(name: str, indices, q_shape, cache: KCache, lengths) -> jax.Array:
  b, s_q = q_shape[:2]
  require(hasattr(indices, "shape") and indices.ndim == 3 and tuple(indices.shape[:2]) == (b, s_q)
          and indices.dtype == jnp.int32,
          f"{name} shape={getattr(indices, 'shape', None)} dtype={getattr(indices, 'dtype', None)}: "
          f"expected int32 [{b}, {s_q}, topk]")
  iv = host_value(indices)
  if iv is not None:
    # Entries past topk_length are never read (FlashMLA), so only the counted ones are checked.
    counted = np.ones(iv.shape, bool)
    lv = host_value(lengths)
    if lv is not None:
      counted = np.arange(iv.shape[-1])[None, None, :] < lv[:, None, None]
    bad = counted & ((iv < -1) | (iv >= cache.num_tokens))
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}[{where}]={int(iv[where])} is outside the cache: expected -1 or "
                       f"[0, {cache.num_tokens}) ({cache.num_blocks} blocks x {cache.block_size} tokens)")
  return indices


def validate_sparse_decode_args(q, k_cache, indices, *, head_dim_v, softmax_scale=None,
                                attn_sink=None, topk_length=None, extra_k_cache=None,
                                extra_indices_in_kvcache=None, extra_topk_length=None):
  """Check shapes/dtypes (always) and index values (when concrete); normalise the args.

  Returns a dict of keyword arguments for the jitted cores: caches as KCache, lengths as
  int32, the sink as an fp32 array (-inf = no sink: an exact no-op), the scale as fp32.
  """
  require(hasattr(q, "shape") and q.ndim == 4 and q.dtype == jnp.bfloat16,
          f"q shape={getattr(q, 'shape', None)} dtype={getattr(q, 'dtype', None)}: "
          "expected bf16 [b, s_q, h_q, d_qk]")
  b, s_q, h_q, d_qk = q.shape
  cache = as_kcache(k_cache, "k_cache")
  require(cache.head_dim == d_qk,
          f"k_cache head dim {cache.head_dim} ({cache.fmt}): q has d_qk={d_qk}")
  require(isinstance(head_dim_v, int) and 0 < head_dim_v <= d_qk,
          f"head_dim_v={head_dim_v!r}: expected an int in (0, {d_qk}] (512 for v32 and model1)")
  require(indices is not None, "indices=None: sparse decode needs indices [b, s_q, topk]")
  topk = indices.shape[-1] if hasattr(indices, "shape") else 0
  lengths = _check_lengths("topk_length", topk_length, b, topk)
  indices = _check_indices("indices", indices, q.shape, cache, lengths)
  if attn_sink is None:
    sink = jnp.full((h_q,), -jnp.inf, jnp.float32)
  else:
    require(hasattr(attn_sink, "shape") and attn_sink.shape == (h_q,)
            and attn_sink.dtype == jnp.float32,
            f"attn_sink shape={getattr(attn_sink, 'shape', None)} dtype={getattr(attn_sink, 'dtype', None)}: "
            f"expected float32 [{h_q}]")
    sink = attn_sink
  scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
  args = dict(q=q, cache=cache, indices=indices,
              topk_length=jnp.full((b,), topk, jnp.int32) if lengths is None else lengths,
              attn_sink=sink, softmax_scale=jnp.asarray(scale, jnp.float32),
              extra_cache=None, extra_indices=None, extra_topk_length=None)
  require((extra_k_cache is None) == (extra_indices_in_kvcache is None),
          "extra_k_cache and extra_indices_in_kvcache: expected both or neither, got "
          f"{type(extra_k_cache).__name__} and {type(extra_indices_in_kvcache).__name__}")
  require(extra_topk_length is None or extra_k_cache is not None,
          "extra_topk_length given without extra_k_cache")
  if extra_k_cache is not None:
    extra = as_kcache(extra_k_cache, "extra_k_cache")
    require(extra.fmt == cache.fmt and extra.head_dim == d_qk,
            f"extra_k_cache format {extra.fmt} (head dim {extra.head_dim}): expected "
            f"{cache.fmt} (head dim {d_qk}) like k_cache")
    extra_topk = extra_indices_in_kvcache.shape[-1] if hasattr(extra_indices_in_kvcache, "shape") else 0
    extra_lengths = _check_lengths("extra_topk_length", extra_topk_length, b, extra_topk)
    args.update(
        extra_cache=extra,
        extra_indices=_check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache,
                                     q.shape, extra, extra_lengths),
        extra_topk_length=(jnp.full((b,), extra_topk, jnp.int32) if extra_lengths is None
                           else extra_lengths))
  return args


def _gather_keys(cache: KCache, indices_BTX, topk_length_B):
  """Dequantised keys ``[B, T, X, H]`` fp32 (zeros at invalid slots) and validity ``[B, T, X]``."""
  x_pos = jnp.arange(indices_BTX.shape[-1], dtype=jnp.int32)
  valid_BTX = ((indices_BTX >= 0) & (indices_BTX < cache.num_tokens)   # under jit: out of range = invalid
               & (x_pos[None, None, :] < topk_length_B[:, None, None]))
  k_BTXH = cache.gather_bf16(indices_BTX).astype(jnp.float32)
  return jnp.where(valid_BTX[..., None], k_BTXH, 0.0), valid_BTX


@functools.partial(jax.jit, static_argnames=("head_dim_v",))
def attend_sparse_fp32(q, cache, indices, topk_length, softmax_scale, extra_cache=None,
                       extra_indices=None, extra_topk_length=None, *, head_dim_v):
  """Core: (out ``[B, T, N, V]`` fp32 before the sink, lse ``[B, T, N]`` with -inf when empty).

  These are the partials a split-KV kernel produces; ``combine.combine_splits`` merges them.
  """
  k_BTXH, valid_BTX = _gather_keys(cache, indices, topk_length)
  if extra_cache is not None:
    k2_BTXH, valid2_BTX = _gather_keys(extra_cache, extra_indices, extra_topk_length)
    k_BTXH = jnp.concatenate([k_BTXH, k2_BTXH], axis=2)
    valid_BTX = jnp.concatenate([valid_BTX, valid2_BTX], axis=2)
  hp = jax.lax.Precision.HIGHEST
  logits_BTNX = jnp.einsum("btnh,btxh->btnx", q.astype(jnp.float32), k_BTXH, precision=hp)
  logits_BTNX = logits_BTNX * softmax_scale
  p_BTNX, lse_BTN, _ = combine.masked_softmax(logits_BTNX, valid_BTX[:, :, None, :])
  out_BTNV = jnp.einsum("btnx,btxv->btnv", p_BTNX, k_BTXH[..., :head_dim_v], precision=hp)
  return out_BTNV, lse_BTN


@functools.partial(jax.jit, static_argnames=("head_dim_v",))
def _reference_core(q, cache, indices, topk_length, attn_sink, softmax_scale, extra_cache,
                    extra_indices, extra_topk_length, *, head_dim_v):
  out_BTNV, lse_BTN = attend_sparse_fp32(q, cache, indices, topk_length, softmax_scale,
                                         extra_cache, extra_indices, extra_topk_length,
                                         head_dim_v=head_dim_v)
  out_BTNV, lse_BTN = combine.finalize(out_BTNV, lse_BTN, attn_sink)
  return out_BTNV, jnp.transpose(lse_BTN, (0, 2, 1))


def sparse_decode_reference(q, k_cache, indices, *, head_dim_v, softmax_scale=None,
                            attn_sink=None, topk_length=None, extra_k_cache=None,
                            extra_indices_in_kvcache=None, extra_topk_length=None):
  """Plain-jnp oracle (fp32 math on dequantised keys).  Arguments as ``sparse_decode``."""
  args = validate_sparse_decode_args(
      q, k_cache, indices, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
      attn_sink=attn_sink, topk_length=topk_length, extra_k_cache=extra_k_cache,
      extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length)
  return _reference_core(**args, head_dim_v=head_dim_v)


def sparse_decode(q, k_cache, indices, *, head_dim_v, softmax_scale=None, attn_sink=None,
                  topk_length=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                  extra_topk_length=None, impl="xla"):
  """Sparse decode attention (FlashMLA ``flash_mla_with_kvcache`` with ``indices``).

  Args:
    q: bf16 ``[b, s_q, h_q, d_qk]`` (d_qk 576 for v32, 512 for model1).
    k_cache: ``KCache`` (v32 / model1 / bf16) or FlashMLA packed bytes (see ``as_kcache``).
    indices: int32 ``[b, s_q, topk]``, block * block_size + offset, -1 = invalid.  Concrete
      indices are checked against the cache (ValueError); under jit, out-of-range = invalid.
    head_dim_v: value dims (the first head_dim_v of the key; 512 for both geometries).
    softmax_scale: default d_qk ** -0.5.
    attn_sink: optional fp32 ``[h_q]``; out *= 1/(1+exp(sink-lse)); +-inf allowed.
    topk_length: optional int32 ``[b]``: only the first topk_length[b] indices count.
    extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second cache (same
      format, own block size) whose selected tokens join the same softmax.
    impl: "xla" (the reference) or "pallas" (kernels; not implemented yet).
  Returns:
    out bf16 ``[b, s_q, h_q, head_dim_v]``, lse fp32 ``[b, h_q, s_q]`` (natural log, sink
    excluded, +inf for a row with no valid token).
  """
  require(impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}")
  args = validate_sparse_decode_args(
      q, k_cache, indices, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
      attn_sink=attn_sink, topk_length=topk_length, extra_k_cache=extra_k_cache,
      extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length)
  if impl == "pallas":
    raise NotImplementedError(
        "sparse_decode(impl='pallas'): the Pallas sparse-decode kernel is not written yet; "
        "use impl='xla' (the jnp reference) for now")
  return _reference_core(**args, head_dim_v=head_dim_v)
