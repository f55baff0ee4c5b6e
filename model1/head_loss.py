"""Cross-entropy of the output head, computed in chunks of positions.

Why. The head maps every position to V logits in float32 (V = 129,280 for DeepSeek's
vocabulary). At batch 4 x seq 1024 those logits alone are 2 GiB, and a plain softmax
cross-entropy with its backward holds several arrays of that size at once (the logits,
their softmax, the gradient). The loss only needs one number per position.

What. ``token_cross_entropy(x_BTD, w_DV, targets_BT)`` returns ce_BT = -log softmax(x @ w)
at each target, with the matmul in float32 whatever the compute dtype (as DeepSeek's head
multiplies). Positions are cut into chunks of C (so that one chunk's [B, C, V] logits
take at most ``chunk_bytes``); ``lax.map`` runs the chunks one after the other and each
chunk's function is rematerialised (``jax.checkpoint``): the forward keeps only ce, the
backward recomputes one chunk's logits at a time and accumulates d w over the chunks.
Peak memory is O(B·C·V) instead of O(B·T·V), at the price of a second head matmul in
the backward. When the whole [B, T, V] fits in one chunk the plain computation runs (the
same program as an unchunked loss). Same result to float32 rounding either way.

Shapes: x_BTD final hidden states, w_DV the head weight [d_model, vocab], targets_BT ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from model1 import sharding

# one chunk's float32 logits at most this big (the loss's peak holds a few of them)
CHUNK_BYTES = 64 * 2**20
LOGITS_AXES = ("batch", "activation_length", "activation_vocab")


def head_logits(x_BTD, w_DV):
  """float32 logits x @ w (the head's matmul in float32 whatever the compute dtype)."""
  x = x_BTD.astype(jnp.float32)
  logits_BTV = jnp.tensordot(x, w_DV.astype(jnp.float32), axes=((x.ndim - 1,), (0,)))
  return sharding.constrain(logits_BTV.astype(jnp.float32), LOGITS_AXES)


def chunk_len(batch: int, seq: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
  """Positions per chunk: the most whose [batch, C, vocab] float32 logits fit in
  ``chunk_bytes`` (at least 1, at most ``seq``)."""
  if chunk_bytes <= 0:
    raise ValueError(f"chunk_bytes={chunk_bytes!r}; expected a positive byte count")
  return int(max(1, min(seq, chunk_bytes // (4 * batch * vocab))))


def _ce(x_BTD, w_DV, targets_BT):
  return optax.softmax_cross_entropy_with_integer_labels(head_logits(x_BTD, w_DV), targets_BT)


def token_cross_entropy(x_BTD, w_DV, targets_BT, chunk_bytes: int = CHUNK_BYTES):
  """Per-position cross-entropy [B, T] of softmax(x @ w) at ``targets_BT``, without the
  full [B, T, V] logits when they exceed ``chunk_bytes``."""
  B, T, D = x_BTD.shape
  C = chunk_len(B, T, w_DV.shape[-1], chunk_bytes)
  if C >= T:
    return _ce(x_BTD, w_DV, targets_BT)
  n = -(-T // C)
  pad = n * C - T  # padded positions see x = 0 (a finite log V) and are sliced off
  x_NBCD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
  t_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)
  chunk = jax.checkpoint(_ce)  # keep nothing of a chunk but its ce; recompute in backward
  ce_NBC = jax.lax.map(lambda xt: chunk(xt[0], w_DV, xt[1]), (x_NBCD, t_NBC))
  return ce_NBC.swapaxes(0, 1).reshape(B, n * C)[:, :T]
