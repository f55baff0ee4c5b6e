"""One transformer block of the MODEL1 / DeepSeek-V4 stack.

  h_BTCD (C residual streams; C = 1 is the plain residual)
    [+ Engram(h, hash ids)]                         if this layer carries Engram
    -> mHC site: x = pre-mix(h); h' = post * attn(attn_norm(x)) + comb-mix(h)
    -> mHC site: x = pre-mix(h); h' = post * ffn(ffn_norm(x)) + comb-mix(h)

``attn`` is MLA in either FlashMLA geometry (``model1.attention``); ``ffn`` is a dense
SwiGLU or DeepSeekMoE (``model1.moe``; the first ``n_dense_layers`` stay dense, the
first ``moe.n_hash_layers`` route by token id). MoE reports its sequence-wise balance
loss as an ``AuxLoss`` and its per-expert load as a ``Metric``. The residual structure
(``_forward``) is shared by the training, prefill and decode forms: only the attention
call differs. Parameter names follow V4 (attn_norm, attn, ffn_norm, ffn, hc_attn, hc_ffn).
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from model1 import sharding
from model1.attention import MLA
from model1.config import AttentionConfig, ModelConfig
from model1.engram import Engram
from model1.layers import AuxLoss, Metric, RMSNorm, SwiGLU
from model1.mhc import STREAM_AXES, HyperConnection
from model1.moe import MoE


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_id: int, rngs: nnx.Rngs,
               attn_cfg: AttentionConfig | None = None):
    d = cfg.d_model
    self.layer_id = layer_id
    self.attn_norm = RMSNorm(d, cfg.norm_eps)
    self.attn = MLA(attn_cfg or cfg.attention, d, rngs, layer_id=layer_id)
    self.ffn_norm = RMSNorm(d, cfg.norm_eps)
    if cfg.is_moe_layer(layer_id):
      self.ffn = MoE(cfg.moe, d, layer_id - cfg.n_dense_layers, cfg.vocab_size, rngs=rngs)
    else:
      self.ffn = SwiGLU(d, cfg.ffn.hidden, rngs)
    self.hc_attn = HyperConnection(cfg.mhc, d, rngs=rngs)
    self.hc_ffn = HyperConnection(cfg.mhc, d, rngs=rngs)
    self.engram = (Engram(cfg.engram, d, cfg.mhc.hc_mult, rngs, layer_id=layer_id)
                   if cfg.use_engram and layer_id in cfg.engram.layer_ids else None)

  def _ffn(self, x_BTD, token_ids_BT, mask_BT):
    if isinstance(self.ffn, MoE):
      y_BTD, aux = self.ffn(x_BTD, token_ids_BT, mask_BT)
      self.sow(AuxLoss, "moe_seq_aux", aux.seq_aux_loss)
      self.sow(Metric, "expert_load", aux.load_frac)
      return y_BTD
    return self.ffn(x_BTD)

  def _engram(self, h_BTCD, eng: dict | None, segment_ids_BT):
    """Engram's residual delta and its conv state. ``eng``: ``ids`` hash ids [B,T,A] or
    ``emb`` pre-gathered rows [B,T,A,H] (host-table training), optional ``state`` (the
    conv history; decode) and ``end`` [B] (prefill of right-padded prompts)."""
    if eng is None or (eng.get("ids") is None and eng.get("emb") is None):
      raise ValueError(f"layer {self.layer_id} carries Engram but no hash ids were given; "
                       f"expected batch['engram_hash'][{str(self.layer_id)!r}]")
    state = eng.get("state")
    if state is None:
      state = self.engram.init_state(h_BTCD.shape[0])
    return self.engram.decode_step(h_BTCD, eng.get("ids"), state, embeddings_BTAH=eng.get("emb"),
                                   segment_ids_BT=segment_ids_BT, end_B=eng.get("end"))

  def _forward(self, h_BTCD, attn_fn: Callable, token_ids_BT=None, segment_ids_BT=None,
               engram: dict | None = None):
    """``attn_fn(x_BTD) -> (y_BTD, extra)`` is the training, prefill or decode attention.
    Returns (h, extra, Engram conv state or None)."""
    estate = None
    if self.engram is not None:
      delta_BTCD, estate = self._engram(h_BTCD, engram, segment_ids_BT)
      h_BTCD = h_BTCD + delta_BTCD
    h_BTCD, extra = self.hc_attn(h_BTCD, lambda x: attn_fn(self.attn_norm(x)))
    h_BTCD = sharding.constrain(h_BTCD, STREAM_AXES)
    mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
    h_BTCD, _ = self.hc_ffn(h_BTCD, lambda x: self._ffn(self.ffn_norm(x), token_ids_BT,
                                                         mask_BT))
    return sharding.constrain(h_BTCD, STREAM_AXES), extra, estate

  def __call__(self, h_BTCD, positions_BT, segment_ids_BT, token_ids_BT=None,
               engram: dict | None = None):
    """Training / prefill form; returns (h, the layer's cache vectors [B,T,d_qk], Engram
    conv state or None)."""
    return self._forward(
        h_BTCD, lambda x: self.attn(x, positions_BT, segment_ids_BT, return_kv=True),
        token_ids_BT, segment_ids_BT, engram)

  def decode(self, h_BTCD, attn_step: Callable, token_ids_BT=None, engram: dict | None = None,
             segment_ids_BT=None):
    """Decode form: ``attn_step(mla, x_BTD) -> (y_BTD, new layer cache)``; ``engram``
    carries the new hash ids and the conv state. Returns (h, new cache, new conv state)."""
    return self._forward(h_BTCD, lambda x: attn_step(self.attn, x), token_ids_BT,
                         segment_ids_BT, engram)
