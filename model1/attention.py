"""MLA attention in FlashMLA's two head geometries (DESIGN §1, §8).

**v32** (DeepSeek-V3.2, "576 heads"): q = wq_b(RMSNorm(wq_a x)) -> [B,T,N,128+64];
the cache vector is c = [RMSNorm(latent) (512) | RoPE(k_pe) (64)] = 576 dims, from
``wkv_a``. Training/prefill expands c per head through ``wkv_b`` (k_nope 128, v 128);
decode *absorbs* ``wkv_b`` into the query and the output so every head attends over the
shared 576-dim vector with value = its first 512 dims (``absorbed=True``). Scale
192^-0.5 (x mscale^2 with YaRN).

**model1** (DeepSeek-V4, "512 heads"): qr = RMSNorm(wq_a x); q = wq_b qr -> [B,T,N,512],
weightless per-head RMSNorm (``q_norm``), RoPE on the last 64. kv = RMSNorm(wkv x)
[B,T,512] with RoPE on its last 64 is key *and* value for every head. Softmax with a
learned per-head sink logit (``sink``). VVPA (``vvpa``): the output's last 64 dims are
rotated back by the query position, so o_i = sum_j a_ij R(j-i) v_j depends only on
relative position; off = those dims are zeroed. Output: grouped low-rank ``wo_a``
[G, (N/G)*512, O] then ``wo_b`` [G*O, D] (``grouped_output``), or a plain ``wo``.

Both forms expose ``cache_vector`` (what a KV cache stores per token, [B,T,d_qk]),
``decode_queries`` (queries against that vector, [B,T,N,d_qk]) and ``decode_output``
(attention over the cache -> [B,T,D]) so the decode path can run FlashMLA-style kernels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import sharding
from model1.attention_core import attend, causal_segment_mask
from model1.config import AttentionConfig
from model1.layers import Dense, RMSNorm, apply_rope, rms_norm, yarn_mscale

_HEADS = ("batch", "activation_length", "activation_heads", None)


class MLA(nnx.Module):

  def __init__(self, cfg: AttentionConfig, d_model: int, rngs: nnx.Rngs,
               out_std: float | None = None, layer_id: int = 0):
    cfg.validate()
    self.cfg = cfg
    self.layer_id = layer_id
    N, r = cfg.n_heads, cfg.rope.dim
    self.wq_a = Dense(d_model, cfg.q_lora_rank, ("embed", "q_lora"), rngs)
    self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
    if cfg.geometry == "v32":
      qk = cfg.qk_nope_head_dim + r
      self.wq_b = Dense(cfg.q_lora_rank, (N, qk), ("q_lora", "heads", "head_dim"), rngs)
      self.wkv_a = Dense(d_model, cfg.kv_lora_rank + r, ("embed", "kv_lora"), rngs)
      self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
      self.wkv_b = Dense(cfg.kv_lora_rank, (N, cfg.qk_nope_head_dim + cfg.v_head_dim),
                         ("kv_lora", "heads", "head_dim"), rngs)
      self.wo = Dense(N * cfg.v_head_dim, d_model, ("heads", "embed"), rngs, std=out_std)
      self.scale = qk ** -0.5 * yarn_mscale(cfg.rope)
    else:
      H = cfg.head_dim
      self.wq_b = Dense(cfg.q_lora_rank, (N, H), ("q_lora", "heads", "head_dim"), rngs)
      self.wkv = Dense(d_model, H, ("embed", "kv_lora"), rngs)
      self.kv_norm = RMSNorm(H, cfg.norm_eps)
      if cfg.sink:
        self.attn_sink = nnx.Param(jnp.zeros((N,), jnp.float32), logical_axes=("heads",))
      if cfg.grouped_output:
        G = cfg.o_groups
        self.wo_a = sharding.param(
            jax.nn.initializers.truncated_normal(1.0 / math.sqrt(N // G * H)), rngs.params(),
            (G, N // G * H, cfg.o_lora_rank), ("o_groups", None, "o_lora"))
        self.wo_b = Dense(G * cfg.o_lora_rank, d_model, ("o_lora", "embed"), rngs,
                          std=out_std)
      else:
        self.wo = Dense(N * H, d_model, ("heads", "embed"), rngs, std=out_std)
      self.scale = H ** -0.5 * yarn_mscale(cfg.rope)

  # ----------------------------------------------------------------- projections
  def _q(self, x_BTD, positions_BT):
    q_BTNH = self.wq_b(self.q_norm(self.wq_a(x_BTD)))
    if self.cfg.geometry == "model1" and self.cfg.q_norm:
      q_BTNH = rms_norm(q_BTNH, self.cfg.norm_eps)
    q_BTNH = apply_rope(q_BTNH, positions_BT, self.cfg.rope)
    return sharding.constrain(q_BTNH, _HEADS)

  def cache_vector(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """The per-token vector a KV cache stores: [B,T,576] (v32) or [B,T,512] (model1)."""
    c = self.cfg
    if c.geometry == "v32":
      kv = self.wkv_a(x_BTD)
      latent = self.kv_norm(kv[..., :c.kv_lora_rank])
      kpe = apply_rope(kv[..., c.kv_lora_rank:], positions_BT, c.rope)
      return jnp.concatenate([latent, kpe], axis=-1)
    kv_BTH = self.kv_norm(self.wkv(x_BTD))
    return apply_rope(kv_BTH, positions_BT, c.rope)

  def sink(self) -> jax.Array | None:
    return self.attn_sink[...] if self.cfg.geometry == "model1" and self.cfg.sink else None

  # ----------------------------------------------------------------- output side
  def _model1_output(self, o_BTNH: jax.Array, positions_BT: jax.Array) -> jax.Array:
    c = self.cfg
    if c.vvpa:
      o_BTNH = apply_rope(o_BTNH, positions_BT, c.rope, inverse=True)
    else:
      o_BTNH = o_BTNH.at[..., -c.rope.dim:].set(0)
    B, T, N, H = o_BTNH.shape
    if c.grouped_output:
      G = c.o_groups
      o_BTGK = o_BTNH.reshape(B, T, G, N // G * H)
      z_BTGO = jnp.einsum("btgk,gko->btgo", o_BTGK, self.wo_a[...].astype(o_BTNH.dtype))
      return self.wo_b(z_BTGO.reshape(B, T, G * c.o_lora_rank))
    return self.wo(o_BTNH.reshape(B, T, N * H))

  def _v32_wkv_b(self, dtype):
    c = self.cfg
    w_LNX = self.wkv_b.weight[...].astype(dtype)
    return w_LNX[..., :c.qk_nope_head_dim], w_LNX[..., c.qk_nope_head_dim:]

  def decode_queries(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Queries against the cache vector: [B,T,N,d_qk] (v32: wkv_b absorbed)."""
    q_BTNH = self._q(x_BTD, positions_BT)
    if self.cfg.geometry == "model1":
      return q_BTNH
    wk_LNP, _ = self._v32_wkv_b(q_BTNH.dtype)
    P = self.cfg.qk_nope_head_dim
    q_BTNL = jnp.einsum("btnp,lnp->btnl", q_BTNH[..., :P], wk_LNP)
    return jnp.concatenate([q_BTNL, q_BTNH[..., P:]], axis=-1)

  def decode_output(self, o_BTNV: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Attention output over cache vectors (value = first 512 dims (v32) or the whole
    512-dim vector (model1)) -> [B,T,D]."""
    if self.cfg.geometry == "model1":
      return self._model1_output(o_BTNV, positions_BT)
    _, wv_LNV = self._v32_wkv_b(o_BTNV.dtype)
    o_BTNV = jnp.einsum("btnl,lnv->btnv", o_BTNV, wv_LNV)
    B, T = o_BTNV.shape[:2]
    return self.wo(o_BTNV.reshape(B, T, -1))

  # ----------------------------------------------------------------- decode form
  def decode(self, x_BTD: jax.Array, positions_BT: jax.Array, cache, block_table_BZ,
             seqlens_B, valid_BT, impl: str = "xla"):
    """Write this step's cache vectors into the paged ``cache`` and attend over it with
    FlashMLA semantics (``pallas_kernels.dense_decode``): queries are the new tokens at
    the end of each sequence (causal when T > 1). Returns (y [B,T,D], new cache)."""
    from model1.kv_cache import slots_for, write_layer
    from pallas_kernels import combine
    from pallas_kernels.dense_decode import dense_decode
    c = self.cfg
    kv_BTH = self.cache_vector(x_BTD, positions_BT)
    cache = write_layer(cache, kv_BTH, slots_for(block_table_BZ, positions_BT,
                                                 cache.block_size, valid_BT))
    q_BTNH = self.decode_queries(x_BTD, positions_BT).astype(jnp.bfloat16)
    d_v = c.kv_lora_rank if c.geometry == "v32" else c.head_dim
    o_BTNV, lse_BNT = dense_decode(q_BTNH, cache, block_table_BZ, seqlens_B, head_dim_v=d_v,
                                   softmax_scale=self.scale, causal=x_BTD.shape[1] > 1,
                                   impl=impl)
    sink = self.sink()
    if sink is not None:  # FlashMLA's lse excludes the sink: out *= 1/(1+exp(sink-lse))
      f_BTN = combine.sink_factor(jnp.swapaxes(lse_BNT, 1, 2), sink)
      o_BTNV = o_BTNV.astype(jnp.float32) * f_BTN[..., None]
    return self.decode_output(o_BTNV.astype(x_BTD.dtype), positions_BT), cache

  # ----------------------------------------------------------------- training form
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               absorbed: bool = False, return_kv: bool = False):
    """Full-sequence causal attention within segments. ``absorbed`` runs the decode
    (MQA over the cache vector) form; both forms give the same result. ``return_kv``
    also returns the cache vectors [B,T,d_qk] (prefill writes them to the KV cache)."""
    y, kv = self._forward(x_BTD, positions_BT, segment_ids_BT, absorbed)
    return (y, kv) if return_kv else y

  def _forward(self, x_BTD, positions_BT, segment_ids_BT, absorbed):
    c = self.cfg
    mask_BTS = causal_segment_mask(segment_ids_BT)
    kv_BSH = self.cache_vector(x_BTD, positions_BT)
    if absorbed or c.geometry == "model1":
      q_BTNH = self.decode_queries(x_BTD, positions_BT)
      d_v = c.kv_lora_rank if c.geometry == "v32" else c.head_dim
      o = attend(q_BTNH, kv_BSH[:, :, None], kv_BSH[:, :, None, :d_v], mask_BTS,
                 self.scale, self.sink())
      o = sharding.constrain(o, _HEADS)
      return self.decode_output(o, positions_BT), kv_BSH
    # v32 expanded form: per-head keys/values from the latent through wkv_b
    q_BTNH = self._q(x_BTD, positions_BT)
    wk_LNP, wv_LNV = self._v32_wkv_b(x_BTD.dtype)
    latent_BSL, kpe_BSR = kv_BSH[..., :c.kv_lora_rank], kv_BSH[..., c.kv_lora_rank:]
    k_nope_BSNP = jnp.einsum("bsl,lnp->bsnp", latent_BSL, wk_LNP)
    v_BSNV = jnp.einsum("bsl,lnv->bsnv", latent_BSL, wv_LNV)
    kpe_BSNR = jnp.broadcast_to(kpe_BSR[:, :, None], kpe_BSR.shape[:2] + (c.n_heads, c.rope.dim))
    k_BSNH = jnp.concatenate([k_nope_BSNP, kpe_BSNR], axis=-1)
    k_BSNH = sharding.constrain(k_BSNH, _HEADS)
    o_BTNV = attend(q_BTNH, k_BSNH, v_BSNV, mask_BTS, self.scale)
    o_BTNV = sharding.constrain(o_BTNV, _HEADS)
    B, T = o_BTNV.shape[:2]
    return self.wo(o_BTNV.reshape(B, T, -1)), kv_BSH

  # ----------------------------------------------------------------- decode form
  def decode(self, x_BTD: jax.Array, positions_BT: jax.Array, cache, block_table_BZ,
             seqlens_B, valid_BT, impl: str = "xla"):
    """Write this step's cache vectors into the paged ``cache`` and attend over it with
    FlashMLA semantics (``pallas_kernels.dense_decode``): queries are the new tokens at
    the end of each sequence (causal when T > 1). Returns (y [B,T,D], new cache)."""
    from model1.kv_cache import slots_for, write_layer
    from pallas_kernels import combine
    from pallas_kernels.dense_decode import dense_decode
    c = self.cfg
    kv_BTH = self.cache_vector(x_BTD, positions_BT)
    cache = write_layer(cache, kv_BTH, slots_for(block_table_BZ, positions_BT,
                                                 cache.block_size, valid_BT))
    q_BTNH = self.decode_queries(x_BTD, positions_BT).astype(jnp.bfloat16)
    d_v = c.kv_lora_rank if c.geometry == "v32" else c.head_dim
    o_BTNV, lse_BNT = dense_decode(q_BTNH, cache, block_table_BZ, seqlens_B, head_dim_v=d_v,
                                   softmax_scale=self.scale, causal=x_BTD.shape[1] > 1,
                                   impl=impl)
    sink = self.sink()
    if sink is not None:  # FlashMLA's lse excludes the sink: out *= 1/(1+exp(sink-lse))
      f_BTN = combine.sink_factor(jnp.swapaxes(lse_BNT, 1, 2), sink)
      o_BTNV = o_BTNV.astype(jnp.float32) * f_BTN[..., None]
    return self.decode_output(o_BTNV.astype(x_BTD.dtype), positions_BT), cache
