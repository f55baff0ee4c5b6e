"""The MODEL1 decoder-only transformer (Flax NNX).

tokens [B,T] -> Embed -> n_layers x Block -> RMSNorm -> head -> logits [B,T,V].
A Block is pre-norm: h += attn(attn_norm(h)); h += ffn(ffn_norm(h)). The attention is
MLA in either FlashMLA geometry (``model1.attention``). Parameter names follow DeepSeek's
``inference/model.py`` (embed, layers.i.attn.wq_a, ..., norm, head).

Packed batches carry ``segment_ids`` (0 = padding) and per-document ``positions``;
attention never crosses a segment boundary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import sharding
from model1.attention import MLA
from model1.config import ModelConfig
from model1.layers import Dense, Embed, RMSNorm, SwiGLU

_ACT = ("batch", "activation_length", "activation_embed")


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_id: int, rngs: nnx.Rngs):
    self.layer_id = layer_id
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = MLA(cfg.attention, cfg.d_model, rngs, layer_id=layer_id)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.ffn = SwiGLU(cfg.d_model, cfg.ffn.hidden, rngs)

  def _forward(self, h_BTD, attn_fn):
    """The residual structure; ``attn_fn(x) -> (y, extra)`` is the training, prefill or
    decode attention, so every form shares it."""
    y_BTD, extra = attn_fn(self.attn_norm(h_BTD))
    h_BTD = sharding.constrain(h_BTD + y_BTD, _ACT)
    h_BTD = h_BTD + self.ffn(self.ffn_norm(h_BTD))
    return sharding.constrain(h_BTD, _ACT), extra

  def __call__(self, h_BTD, positions_BT, segment_ids_BT):
    return self._forward(h_BTD, lambda x: self.attn(x, positions_BT, segment_ids_BT,
                                                   return_kv=True))

  def decode(self, h_BTD, positions_BT, cache, block_table_BZ, seqlens_B, valid_BT, impl):
    return self._forward(h_BTD, lambda x: self.attn.decode(
        x, positions_BT, cache, block_table_BZ, seqlens_B, valid_BT, impl))


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs, std=cfg.init_std)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.head = Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs)

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Final hidden states [B,T,D] and the per-layer cache vectors."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    h_BTD = sharding.constrain(self.embed(tokens_BT, self.dtype), _ACT)
    kvs = []
    for layer in self.layers:
      if self.cfg.remat:
        h_BTD, kv = nnx.remat(lambda m, *a: m(*a))(layer, h_BTD, positions_BT, segment_ids_BT)
      else:
        h_BTD, kv = layer(h_BTD, positions_BT, segment_ids_BT)
      kvs.append(kv)
    return self.norm(h_BTD), kvs

  def logits(self, h_BTD):
    logits_BTV = self.head(h_BTD)
    return sharding.constrain(logits_BTV.astype(jnp.float32),
                              ("batch", "activation_length", "activation_vocab"))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, batch=None):
    """Logits [B,T,V] (fp32). ``batch`` carries optional extra inputs (e.g. precomputed
    Engram hash ids) from the data pipeline."""
    return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT)[0])

  def prefill(self, tokens_BT, positions_BT, segment_ids_BT):
    """Full forward that also returns each layer's cache vectors [B,T,d_qk]."""
    h_BTD, kvs = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
    return self.logits(h_BTD), kvs

  def decode(self, tokens_BT, positions_BT, caches, block_table_BZ, seqlens_B, valid_BT,
             impl: str = "xla"):
    """New tokens at ``positions_BT`` (the end of each sequence) against the paged caches;
    returns (logits [B,T,V], new caches)."""
    h_BTD = self.embed(tokens_BT, self.dtype)
    new = []
    for layer, cache in zip(self.layers, caches):
      h_BTD, cache = layer.decode(h_BTD, positions_BT, cache, block_table_BZ, seqlens_B,
                                  valid_BT, impl)
      new.append(cache)
    return self.logits(self.norm(h_BTD)), new
