"""Multi-token prediction (DeepSeek-V3 / V4 ``MTPBlock``).

Module k (k = 0 .. n-1) sees the previous depth's residual streams h_BTCD (the main
model's for k = 0) and the embedding of the token k+1 positions ahead, and predicts the
token k+2 ahead:

  x = e_proj(enorm(embed(tok[t+k+1])))[:, :, None] + h_proj(hnorm(h[t]))   (V4 layout)
  x = Block(x);  logits = head(norm(hc_head(x)))      (embed and head shared with the model)

Its cross-entropy is reported as ``Metric('mtp_loss')`` and enters the loss as
``AuxLoss('mtp') = loss_weight * ce``. Generation never calls it (the module is dropped
cleanly: decoding uses only the main stack).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from model1.block import Block
from model1.config import ModelConfig, mtp_attention
from model1.layers import Dense, RMSNorm
from model1.mhc import HCHead


class MTPBlock(nnx.Module):

  def __init__(self, cfg: ModelConfig, index: int, rngs: nnx.Rngs):
    d = cfg.d_model
    self.enorm = RMSNorm(d, cfg.norm_eps)
    self.hnorm = RMSNorm(d, cfg.norm_eps)
    self.e_proj = Dense(d, d, ("embed", None), rngs)
    self.h_proj = Dense(d, d, ("embed", None), rngs)
    self.block = Block(cfg, cfg.n_layers + index, rngs, attn_cfg=mtp_attention(cfg))
    self.hc_head = HCHead(cfg.mhc, d, rngs=rngs)
    self.norm = RMSNorm(d, cfg.norm_eps)

  def __call__(self, h_BTCD, next_ids_BT, embed_BTD, positions_BT, segment_ids_BT):
    """Returns (new streams h_BTCD, final hidden x_BTD for the shared head)."""
    x = self.e_proj(self.enorm(embed_BTD))[:, :, None, :] + self.h_proj(self.hnorm(h_BTCD))
    h_BTCD, _, _ = self.block(x, positions_BT, segment_ids_BT, token_ids_BT=next_ids_BT)
    return h_BTCD, self.norm(self.hc_head(h_BTCD))


def shifted(x_BT, k: int, fill=0):
  """x[:, t + k] at position t (``fill`` past the end)."""
  if k == 0:
    return x_BT
  pad = jnp.full(x_BT.shape[:1] + (k,), fill, x_BT.dtype)
  return jnp.concatenate([x_BT[:, k:], pad], axis=1)


def mtp_targets(targets_BT, mask_BT, k: int):
  """(targets, mask) of depth k: position t predicts targets[t + k + 1]; valid only when
  every transition t .. t+k+1 stays inside the document (product of the shifted masks)."""
  m = mask_BT
  for j in range(1, k + 2):
    m = m * shifted(mask_BT, j)
  return shifted(targets_BT, k + 1), m


def mtp_loss(logits_BTV, targets_BT, mask_BT, k: int):
  """Masked mean CE of depth k from full logits (the model computes the same from its
  final hidden states in chunks, ``Transformer.token_cross_entropy``)."""
  tgt, m = mtp_targets(targets_BT, mask_BT, k)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tgt)
  return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)
