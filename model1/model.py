"""The MODEL1 / DeepSeek-V4 decoder-only transformer (Flax NNX).

  tokens [B,T] -> embed -> copy into C residual streams (mHC; C = 1: plain residual)
    -> n_layers x Block (MLA attention, dense SwiGLU or DeepSeekMoE, optional Engram)
    -> hc_head (merge streams) -> RMSNorm -> head -> logits [B,T,V]
  + ``mtp.n_layers`` multi-token-prediction modules during training (``model1.mtp``).

Parameter names follow DeepSeek's ``inference/model.py`` (embed, layers.i.attn.wq_a, ...,
hc_head, norm, head, mtp.k.*). Packed batches carry ``segment_ids`` (0 = padding) and
per-document ``positions``; attention never crosses a segment boundary.

Forms: ``__call__`` (logits; adds MTP losses when given the batch), ``hidden`` (the same
without the head: the training loss applies the head in chunks of positions,
``token_cross_entropy``, so the [B,T,V] logits never exist whole), ``prefill`` (also
returns every layer's cache vectors) and ``decode`` (new tokens against paged caches).
All three run the block stack through ``model1.scan``: runs of identical layers are one
``lax.scan`` (``model.scan_layers``, default on; off = a plain Python loop), each block
rematerialised by ``model.remat``. A scanned run's layers are stored stacked
(``scanned.s.*``, leading axis = the slot's layers); ``per_layer_state`` gives DeepSeek's
per-layer names (``layers.i.*``) and checkpoints convert between the two.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model1 import head_loss, scan, sharding
from model1.block import Block
from model1.config import ModelConfig
from model1.layers import AuxLoss, Dense, Embed, Metric, RMSNorm
from model1.mhc import STREAM_AXES, HCHead, expand
from model1.mtp import MTPBlock, mtp_targets, shifted


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs, std=cfg.init_std)
    blocks = [Block(cfg, i, rngs) for i in range(cfg.n_layers)]
    # runs of identical layers are stored stacked, one module per scanned slot
    # (model1.scan); ``layers[i]`` is None for a layer that lives in a slot
    self.slot_ids = scan.slots(cfg)
    self.scanned = nnx.List([scan.stack_blocks([blocks[i] for i in ids], ids)
                             for ids in self.slot_ids])
    stacked = {i for ids in self.slot_ids for i in ids}
    self.layers = nnx.List([None if i in stacked else b for i, b in enumerate(blocks)])
    self.hc_head = HCHead(cfg.mhc, cfg.d_model, rngs=rngs)
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.head = Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs)
    self.mtp = nnx.List([MTPBlock(cfg, k, rngs) for k in range(cfg.mtp.n_layers)])

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def streams(self, tokens_BT, positions_BT=None, segment_ids_BT=None, engram_hash=None,
              engram_emb=None, engram_end_B=None, return_kv: bool = True):
    """Residual streams after the last block [B,T,C,D], per-layer cache vectors and the
    Engram conv states {layer_id: [B,S,C,D]}. Engram inputs are keyed by str(layer_id):
    ``engram_hash`` ids [B,T,A] or ``engram_emb`` pre-gathered rows [B,T,A,H].
    ``return_kv=False`` (training) gives None for each layer's cache vectors."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    x_BTD = self.embed(tokens_BT, self.dtype)
    h_BTCD = sharding.constrain(expand(x_BTD, self.cfg.mhc.hc_mult), STREAM_AXES)

    def call(layer, h_BTCD, _):
      eng = _engram_inputs(layer, engram_hash, engram_emb, end=engram_end_B)
      h_BTCD, kv, st = layer(h_BTCD, positions_BT, segment_ids_BT, tokens_BT, eng)
      return h_BTCD, kv if return_kv else None, st

    h_BTCD, kvs, sts = self._run_layers(h_BTCD, call)
    return h_BTCD, kvs, self._engram_states(sts)

  def _run_layers(self, h_BTCD, call, xs=None):
    """The block stack, scanned over repeating layer groups (``model1.scan``)."""
    return scan.run_layers(self.layers, self.scanned, scan.layer_plan(self.cfg), h_BTCD,
                           call, xs, remat=self.cfg.remat)

  def _engram_states(self, sts) -> dict:
    return {str(i): st for i, st in enumerate(sts) if st is not None}

  def block(self, i: int) -> Block:
    """Layer ``i`` as a Block: the module itself when unrolled, a per-layer copy of its
    slice when it lives in a stacked slot (for eager per-layer tools; see
    ``scan.layer_view``)."""
    if self.layers[i] is not None:
      return self.layers[i]
    s, r = next((s, ids.index(i)) for s, ids in enumerate(self.slot_ids) if i in ids)
    return scan.layer_view(self.scanned[s], r, i)

  def set_block(self, i: int, block: Block) -> None:
    """Write an edited ``block(i)`` back (a no-op for an unrolled layer, which ``block``
    returns itself): ``b = m.block(1); b.attn.attn_sink[...] = s; m.set_block(1, b)``."""
    if self.layers[i] is not None:
      if block is not self.layers[i]:
        nnx.update(self.layers[i], nnx.state(block))
      return
    s, r = next((s, ids.index(i)) for s, ids in enumerate(self.slot_ids) if i in ids)
    st = nnx.state(self.scanned[s])
    new = jax.tree.map(lambda a, b: a.at[r].set(b), st.to_pure_dict(),
                       nnx.state(block).to_pure_dict())
    nnx.replace_by_pure_dict(st, new)
    nnx.update(self.scanned[s], st)

  def blocks(self):
    """Every layer as a Block, in order (``block``)."""
    return [self.block(i) for i in range(self.cfg.n_layers)]

  def per_layer_state(self) -> dict:
    """The model's pure state with DeepSeek's per-layer names (``layers.7.attn.wq_a``)
    whatever the storage layout."""
    return scan.to_per_layer(nnx.state(self).to_pure_dict(), self.slot_ids)

  def load_per_layer_state(self, tree: dict) -> None:
    """Set the model's state from a per-layer pure state (``per_layer_state``'s form)."""
    st = nnx.state(self)
    nnx.replace_by_pure_dict(st, scan.to_stacked(tree, self.slot_ids))
    nnx.update(self, st)

  def logits(self, x_BTD):
    # the LM head multiplies in float32 whatever the compute dtype (as DeepSeek's does)
    logits_BTV = self.head(x_BTD.astype(jnp.float32))
    return sharding.constrain(logits_BTV.astype(jnp.float32),
                              ("batch", "activation_length", "activation_vocab"))

  def final_hidden(self, h_BTCD):
    return self.norm(self.hc_head(h_BTCD))

  def token_cross_entropy(self, x_BTD, targets_BT):
    """Per-position cross-entropy [B,T] of the head's logits at ``targets_BT``, computed
    in chunks of positions so the [B,T,V] logits never exist whole (``model1.head_loss``)."""
    if getattr(self.head, "fp8_qat", False):  # a quantised head: its own matmul, unchunked
      return optax.softmax_cross_entropy_with_integer_labels(self.logits(x_BTD), targets_BT)
    return head_loss.token_cross_entropy(x_BTD, self.head.weight[...], targets_BT,
                                         chunk_bytes=head_loss.CHUNK_BYTES)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, batch=None):
    """Logits [B,T,V] (fp32). With the training ``batch`` (targets, loss_mask, optional
    ``engram_hash`` ids) the MTP modules run and report their losses."""
    return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT, batch))

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, batch=None):
    """The final hidden states [B,T,D] the head reads (``__call__`` without the head;
    the training loss applies the head chunk by chunk). MTP runs as in ``__call__``."""
    batch = batch or {}
    engram_hash, engram_emb = batch.get("engram_hash"), batch.get("engram_emb")
    if self.cfg.use_engram and engram_hash is None and engram_emb is None:
      raise ValueError("model.use_engram=True but no Engram hash ids were given; expected "
                       "batch['engram_hash'] (see model1.trainer.add_host_inputs)")
    h_BTCD, _, _ = self.streams(tokens_BT, positions_BT, segment_ids_BT, engram_hash,
                                engram_emb, return_kv=False)
    x_BTD = self.final_hidden(h_BTCD)
    if len(self.mtp) and "targets" in batch:
      self._mtp_losses(h_BTCD, batch, positions_BT, segment_ids_BT)
    return x_BTD

  def _mtp_losses(self, h_BTCD, batch, positions_BT, segment_ids_BT):
    targets, mask = batch["targets"], batch["loss_mask"]
    for k, mtp in enumerate(self.mtp):
      next_ids = shifted(targets, k)  # token k+1 ahead of each input position
      h_BTCD, x_BTD = mtp(h_BTCD, next_ids, self.embed(next_ids, self.dtype), positions_BT,
                          segment_ids_BT)
      tgt_BT, m_BT = mtp_targets(targets, mask, k)
      ce_BT = self.token_cross_entropy(x_BTD, tgt_BT)
      ce = (ce_BT * m_BT).sum() / jnp.maximum(m_BT.sum(), 1.0)
      self.sow(Metric, f"mtp_loss_{k}", ce)
      self.sow(AuxLoss, f"mtp_{k}", self.cfg.mtp.loss_weight * ce)

  def prefill(self, tokens_BT, positions_BT, segment_ids_BT, engram_hash=None, lens_B=None):
    """Full forward that also returns each layer's cache vectors [B,T,d_qk] and the
    Engram conv states at each row's length ``lens_B`` (default: T)."""
    h_BTCD, kvs, states = self.streams(tokens_BT, positions_BT, segment_ids_BT, engram_hash,
                                       engram_end_B=lens_B)
    return self.logits(self.final_hidden(h_BTCD)), kvs, states

  def decode(self, tokens_BT, positions_BT, caches, block_table_BZ, seqlens_B, valid_BT,
             impl: str = "xla", engram_hash=None, engram_state=None):
    """New tokens at ``positions_BT`` (the end of each sequence) against the paged caches
    (and, for Engram layers, their hash ids and conv states); returns (logits [B,T,V],
    new caches, new Engram conv states)."""
    h_BTCD = expand(self.embed(tokens_BT, self.dtype), self.cfg.mhc.hc_mult)

    def call(layer, h_BTCD, cache):
      step = (lambda mla, x: mla.decode(x, positions_BT, cache, block_table_BZ, seqlens_B,
                                        valid_BT, impl))
      eng = _engram_inputs(layer, engram_hash, None, state=engram_state)
      return layer.decode(h_BTCD, step, tokens_BT, eng)

    h_BTCD, new, sts = self._run_layers(h_BTCD, call, list(caches))
    return self.logits(self.final_hidden(h_BTCD)), new, self._engram_states(sts)


def _engram_inputs(layer, engram_hash, engram_emb, end=None, state=None) -> dict | None:
  if layer.engram is None:
    return None
  key = str(layer.layer_id)
  get = lambda d: None if d is None else d.get(key)  # noqa: E731
  return {"ids": get(engram_hash), "emb": get(engram_emb), "state": get(state), "end": end}
