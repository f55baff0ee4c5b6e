"""DeepSeek-V4 KV compressor: r consecutive tokens -> one compressed key=value entry (§8).

What: every r tokens (a *block*) are pooled into one entry with a learned, per-feature
softmax gate:  kv_t = wkv x_t,  score_t = wgate x_t + ape[t mod r]  (fp32), and entry j is
    c_j = RMSNorm( sum_slots softmax_slots(score)[slot, f] * kv[slot, f] ),
the softmax taken over the slots *separately for every feature f*; then RoPE on the last
64 dims at the entry's position j*r (the block's first token).

  * HCA (ratio r != 4, "heavily compressed"): entry j pools block j's r tokens.
  * CSA (ratio 4, overlapping): wkv/wgate are 2d wide; entry j pools 2r slots: the first
    d features of block j-1's tokens and the last d features of block j's (block -1 has
    score -inf). Its entries are chosen per query by an indexer (``indexer.py``).

Only complete blocks are emitted: entry j exists once token (j+1)*r - 1 has been seen, so
it is visible to query i iff j < (i+1)//r. Packed documents: blocks are aligned to the
row; a block that straddles a segment boundary yields an invalid entry (segment 0), and
overlap slots from another segment are masked like block -1. Unpacked (one document from
row 0, as at generation) this is exactly V4.

Decode keeps the partial block in a state (kv, score) of ``coff*r`` slots (overlap: the
previous block in slots [0, r), the current one in [r, 2r)) and emits when (pos+1) % r == 0.

Parameter names follow V4 (``wkv``, ``wgate``, ``ape``, ``norm``). Source: DeepSeek-V4-Flash
``inference/model.py`` ``Compressor``; peer: MaxText ``layers/attention_compressed.py``.
Shapes (letter key): x [B,T,D]; entries [B,M,H] with M = T // r; state [B,coff*r,coff*H].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import qat
from model1.config import RopeConfig
from model1.layers import Dense, RMSNorm, apply_rope


class Compressor(nnx.Module):
  """``quant``: None, "fp8_nope" (main compressor under QAT), "hadamard" (the indexer's:
  V4 always rotates its entries) or "fp4" (the indexer's under QAT: rotation + FP4)."""

  def __init__(self, d_model: int, head_dim: int, ratio: int, rope: RopeConfig,
               norm_eps: float, rngs: nnx.Rngs, quant: str | None = None):
    self.ratio, self.head_dim, self.rope, self.quant = ratio, head_dim, rope, quant
    self.overlap = ratio == 4
    coff = 2 if self.overlap else 1
    self.wkv = Dense(d_model, coff * head_dim, ("embed", "kv_lora"), rngs)
    self.wgate = Dense(d_model, coff * head_dim, ("embed", "kv_lora"), rngs)
    self.ape = nnx.Param(jnp.zeros((ratio, coff * head_dim), jnp.float32),
                         logical_axes=(None, "kv_lora"))
    self.norm = RMSNorm(head_dim, norm_eps)

  @property
  def coff(self) -> int:
    return 2 if self.overlap else 1

  def project(self, x_BTD: jax.Array, positions_BT: jax.Array):
    """Per-token kv and gate score (+ ape by position mod r), fp32 [B,T,coff*H]."""
    x32 = x_BTD.astype(jnp.float32)
    kv_BTH = self.wkv(x32)
    score_BTH = self.wgate(x32) + self.ape[...][positions_BT % self.ratio]
    return kv_BTH, score_BTH

  def finish(self, pooled_BMH: jax.Array, pos_BM: jax.Array, dtype) -> jax.Array:
    """RMSNorm, RoPE at the entry position, QAT rounding -> entries in ``dtype``."""
    c_BMH = apply_rope(self.norm(pooled_BMH.astype(dtype)), pos_BM, self.rope)
    if self.quant == "fp8_nope":
      c_BMH = qat.fake_quant_nope(c_BMH, self.rope.dim, 64)
    elif self.quant in ("fp4", "hadamard"):
      c_BMH = qat.indexer_quant(c_BMH, "fp4" if self.quant == "fp4" else None)
    return c_BMH

  # ------------------------------------------------------------------ training / prefill
  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    """Entries of all complete blocks. Returns (entries [B,M,H], entry segment [B,M]
    (0 = invalid), per-token (kv, score) [B,T,coff*H] fp32 for a decode state)."""
    r, H = self.ratio, self.head_dim
    B, T, _ = x_BTD.shape
    M = T // r
    kv_BTH, score_BTH = self.project(x_BTD, positions_BT)
    if M == 0:  # shorter than one block: nothing to emit yet
      return (jnp.zeros((B, 0, H), x_BTD.dtype), jnp.zeros((B, 0), segment_ids_BT.dtype),
              (kv_BTH, score_BTH))
    kv_BMRH = kv_BTH[:, :M * r].reshape(B, M, r, -1)
    sc_BMRH = score_BTH[:, :M * r].reshape(B, M, r, -1)
    seg_BMR = segment_ids_BT[:, :M * r].reshape(B, M, r)
    # segments are contiguous: a block lies in one segment iff its ends agree
    seg_BM = jnp.where(seg_BMR[..., 0] == seg_BMR[..., -1], seg_BMR[..., -1], 0)
    if self.overlap:
      prev_kv = jnp.pad(kv_BMRH[:, :-1, :, :H], ((0, 0), (1, 0), (0, 0), (0, 0)))
      prev_sc = jnp.pad(sc_BMRH[:, :-1, :, :H], ((0, 0), (1, 0), (0, 0), (0, 0)))
      prev_seg = jnp.pad(seg_BMR[:, :-1], ((0, 0), (1, 0), (0, 0)))  # block -1: segment 0
      prev_sc = jnp.where((prev_seg == seg_BM[..., None])[..., None], prev_sc, -jnp.inf)
      kv_BMRH = jnp.concatenate([prev_kv, kv_BMRH[..., H:]], axis=2)   # [B,M,2r,H]
      sc_BMRH = jnp.concatenate([prev_sc, sc_BMRH[..., H:]], axis=2)
    pooled_BMH = jnp.sum(kv_BMRH * jax.nn.softmax(sc_BMRH, axis=2), axis=2)
    pos_BM = positions_BT[:, :M * r:r] if M else jnp.zeros((B, 0), positions_BT.dtype)
    return self.finish(pooled_BMH, pos_BM, x_BTD.dtype), seg_BM, (kv_BTH, score_BTH)

  # ------------------------------------------------------------------ decode
  def step(self, x_B1D, pos_B, state, dtype):
    """One token per sequence at ``pos_B``: update the state; returns (entry [B,H]
    (meaningful where ``emit_B``), emit_B = (pos+1) % r == 0, new state)."""
    r, H = self.ratio, self.head_dim
    kv_BH, sc_BH = (a[:, 0] for a in self.project(x_B1D, pos_B[:, None]))
    kv_BSH, sc_BSH = state
    slot_B = pos_B % r + (r if self.overlap else 0)
    put = lambda s, v: s.at[jnp.arange(s.shape[0]), slot_B].set(v)
    kv_BSH, sc_BSH = put(kv_BSH, kv_BH), put(sc_BSH, sc_BH)
    if self.overlap:
      kv_pool = jnp.concatenate([kv_BSH[:, :r, :H], kv_BSH[:, r:, H:]], axis=1)
      sc_pool = jnp.concatenate([sc_BSH[:, :r, :H], sc_BSH[:, r:, H:]], axis=1)
    else:
      kv_pool, sc_pool = kv_BSH, sc_BSH
    pooled_BH = jnp.sum(kv_pool * jax.nn.softmax(sc_pool, axis=1), axis=1)
    entry_BH = self.finish(pooled_BH[:, None], (pos_B + 1 - r)[:, None], dtype)[:, 0]
    emit_B = (pos_B + 1) % r == 0
    if self.overlap:  # a finished block becomes the "previous" half of the next entry
      shift = lambda s: jnp.where(emit_B[:, None, None],
                                  jnp.concatenate([s[:, r:], s[:, r:]], axis=1), s)
      kv_BSH, sc_BSH = shift(kv_BSH), shift(sc_BSH)
    return entry_BH, emit_B, (kv_BSH, sc_BSH)


def empty_state(batch: int, ratio: int, head_dim: int):
  """A fresh decode state (kv 0, score -inf: empty slots get softmax weight 0)."""
  coff = 2 if ratio == 4 else 1
  shape = (batch, coff * ratio, coff * head_dim)
  return jnp.zeros(shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32)


def prefill_state(kv_BTH: jax.Array, score_BTH: jax.Array, lens_B: jax.Array, ratio: int):
  """The decode state after prompts of ``lens_B`` tokens (V4's prefill bookkeeping): the
  tokens of the unfinished block, and (overlap) those of the last complete block."""
  r = ratio
  rows_BS = (lens_B // r * r)[:, None] + jnp.arange(r)[None]          # current block
  if r == 4:
    rows_BS = jnp.concatenate([rows_BS - r, rows_BS], axis=1)           # previous block
  ok_BS1 = ((rows_BS >= 0) & (rows_BS < lens_B[:, None]))[..., None]
  idx_BS1 = jnp.clip(rows_BS, 0, kv_BTH.shape[1] - 1)[..., None]
  return (jnp.where(ok_BS1, jnp.take_along_axis(kv_BTH, idx_BS1, axis=1), 0.0),
          jnp.where(ok_BS1, jnp.take_along_axis(score_BTH, idx_BS1, axis=1), -jnp.inf))
