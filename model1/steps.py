"""The one train step and eval step (shared by train.py, eval.py, benchmarks, notebooks).

``loss_fn`` is token-level cross-entropy over ``loss_mask`` (next-token targets inside a
document; padding and document boundaries masked), the head applied in chunks of
positions (``model1.head_loss``) so the [B,T,V] logits are never whole. ``train_step`` accumulates gradients
over ``grad_accum`` micro-batches with ``lax.scan`` (one compiled body, whatever the
count) and applies the optimizer once. ``check_batch`` validates a host batch before jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model1 import moe, scan
from model1.config import ModelConfig
from model1.engram import HOST_TABLE_STATE, HOST_TABLE_TRAINABLE, RowSparseMoment
from model1.layers import AuxLoss, Metric


def check_batch(batch: dict, cfg: ModelConfig) -> None:
  """Host-boundary validation (data-dependent checks cannot run inside jit)."""
  for key in ("inputs", "targets"):
    x = np.asarray(batch[key])
    if x.ndim != 2:
      raise ValueError(f"batch[{key!r}] has shape {x.shape}; expected [batch, seq_len]")
    if x.size and (x.min() < 0 or x.max() >= cfg.vocab_size):
      bad = int(x.min()) if x.min() < 0 else int(x.max())
      raise ValueError(f"batch[{key!r}] contains token id {bad}; expected ids in "
                       f"[0, {cfg.vocab_size}) (model.vocab_size={cfg.vocab_size})")
    if x.shape[1] > cfg.max_seq_len:
      raise ValueError(f"batch[{key!r}] has sequence length {x.shape[1]}; expected at most "
                       f"model.max_seq_len={cfg.max_seq_len}")


def _path_name(path) -> str:
  """Module path of a sown value, e.g. 'layers/1/expert_load' (sow's tuple index and the
  Variable's '.value' dropped)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  parts = [p for p in parts if p not in (".value", "value")]
  if parts and parts[-1] == "0":
    parts = parts[:-1]
  return "/".join(parts)


def collect(model, kind) -> dict:
  """Pop every value of an ``nnx.Intermediate`` subtype (AuxLoss, Metric) sown during the
  last call, keyed by module path. Values a stacked slot sowed (``scanned/s/...``, one
  entry per layer of the slot) are keyed per layer (``layers/7/...``)."""
  state = nnx.pop(model, kind)
  slot_ids = getattr(model, "slot_ids", ())
  out = {}
  for path, v in jax.tree.leaves_with_path(state):
    name = _path_name(path)
    parts = name.split("/")
    if parts[0] == scan.STACK:
      rest = "/".join(parts[2:])
      for r, i in enumerate(slot_ids[int(parts[1])]):
        out[f"layers/{i}/{rest}"] = v[r]
    else:
      out[name] = v
  return out


def loss_fn(model, batch: dict):
  """Next-token cross-entropy over ``loss_mask`` plus every sown ``AuxLoss``.
  Returns (total, aux) with aux["loss"] the LM loss alone."""
  x_BTD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], batch=batch)
  ce_BT = model.token_cross_entropy(x_BTD, batch["targets"])  # in chunks: no [B,T,V] logits
  mask_BT = batch["loss_mask"]
  n = jnp.maximum(mask_BT.sum(), 1.0)
  loss = (ce_BT * mask_BT).sum() / n
  aux_losses = collect(model, AuxLoss)
  metrics = collect(model, Metric)
  total = loss + sum(aux_losses.values(), jnp.zeros((), jnp.float32))
  return total, {"loss": loss, "tokens": mask_BT.sum(), "aux": aux_losses, "metrics": metrics}


def _split_micro(batch: dict, k: int) -> dict:
  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by train.grad_accum={k}")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])
  return jax.tree.map(one, batch)


def train_step(model, optimizer, batch: dict, grad_accum: int = 1):
  """One optimizer step over ``batch`` (split into ``grad_accum`` micro-batches).

  Non-parameter state updated by the forward (MoE expert-load counters) is carried
  through the micro-batches; after the update, MoE router biases move against each
  expert's load (aux-loss-free balancing, outside the gradient). Host-resident Engram
  tables stay out of autodiff: ``batch["engram_emb"]`` brings their gathered rows, and
  the step returns d loss / d rows as ``engram_grads`` for ``update_host_tables``.

  Two compiled programs, the gradient and the update: XLA's CPU compile time grows
  faster than a program's size, and the update touches every per-layer parameter (1,371
  leaves in the 43-layer peer config), so one fused program compiled in ~134 s of CPU
  where the two parts take ~54 s and ~23 s. The gradients are materialised either way."""
  out, grads = grad_step(model, batch, grad_accum=grad_accum, wrt=optimizer.wrt)
  apply_update(model, optimizer, grads)
  return out


@nnx.jit
def apply_update(model, optimizer, grads):
  """The optimizer update, then the MoE router-bias step against the expert load."""
  optimizer.update(model, grads)
  moe.apply_bias_updates(model)


@nnx.jit(static_argnames=("grad_accum", "wrt"))
def grad_step(model, batch: dict, grad_accum: int = 1, wrt=nnx.Param):
  """(metrics, gradients w.r.t. ``wrt``: the optimizer's ``wrt`` filter) of
  ``train_step``; updates the non-parameter state the forward changes (MoE load
  counters). The optimizer is not an argument, so runs that differ only in their
  optimizer (AdamW / Muon, learning rates) share this compiled program."""
  opt_wrt = wrt
  emb = batch.get("engram_emb")
  batch = {k: v for k, v in batch.items() if k != "engram_emb"}
  wrt = nnx.Param if emb is None else HOST_TABLE_TRAINABLE
  graphdef, params, frozen, rest = nnx.split(model, wrt, HOST_TABLE_STATE, ...)

  def micro_loss(p, r, mb):
    ps, e = p
    m = nnx.merge(graphdef, ps, frozen, r, copy=True)  # fresh Variables at this trace level
    total, aux = loss_fn(m, mb if e is None else {**mb, "engram_emb": e})
    return total, (aux, nnx.state(m, _REST))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if grad_accum == 1:
    (_, (aux, rest)), (grads, g_emb) = grad_fn((params, emb), rest, batch)
    loss, extras = aux["loss"], {"aux": aux["aux"], "metrics": aux["metrics"]}
  else:
    def body(carry, mb_e):
      acc_g, acc_l, acc_n, r = carry
      mb, e = mb_e
      (_, (aux, r)), (g, ge) = grad_fn((params, e), r, mb)
      # weight each micro-batch by its token count so the result is the full-batch mean
      w = aux["tokens"]
      return ((jax.tree.map(lambda a, b: a + b * w, acc_g, g), acc_l + aux["loss"] * w,
               acc_n + w, r),
              ({"aux": aux["aux"], "metrics": aux["metrics"]},
               jax.tree.map(lambda x: x * w, ge)))
    zeros = jax.tree.map(jnp.zeros_like, params)
    micro = (_split_micro(batch, grad_accum),
             None if emb is None else _split_micro(emb, grad_accum))
    (gsum, lsum, n, rest), (per_micro, ge) = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros(()), rest), micro)
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / n, gsum)
    g_emb = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]) / n, ge)
    loss = lsum / n
    extras = jax.tree.map(lambda x: x.mean(0), per_micro)
  nnx.update(model, rest)
  if opt_wrt is not wrt:  # e.g. the DSA warm-up trains the indexer only
    grads = nnx.state(nnx.merge(graphdef, grads, frozen, rest), opt_wrt)
  grad_norm = optax.global_norm(grads)
  out = {"loss": loss, "grad_norm": grad_norm, **extras}
  if emb is not None:
    out["engram_grads"] = g_emb
  return out, grads


# Non-parameter state a forward may change (MoE load counters), never the table moments.
_REST = nnx.All(nnx.Not(nnx.Param), nnx.Not(RowSparseMoment))


def has_host_tables(model) -> bool:
  return any(l is not None and l.engram is not None and l.engram.cfg.host_table
             for l in model.layers)


def gather_host_rows(model, engram_hash: dict) -> dict:
  """{layer: rows [B,T,A,H]} gathered on the host from host-resident Engram tables (the
  train step's ``batch["engram_emb"]``); only these rows ever reach the device."""
  return {str(l.layer_id): l.engram.lookup(engram_hash[str(l.layer_id)])
          for l in model.layers if l is not None and l.engram is not None}


def update_host_tables(model, engram_hash: dict, grads: dict, learning_rate, b1: float,
                       b2: float, weight_decay: float = 0.0) -> None:
  """Row-sparse AdamW on each host table with the train step's ``engram_grads``
  (``engram_hash``: the host numpy ids the rows were gathered with)."""
  for l in model.layers:
    if l is not None and l.engram is not None:
      k = str(l.layer_id)
      l.engram.multi_head_embedding.sparse_update(
          l.engram.row_ids(engram_hash[k]), grads[k], learning_rate, weight_decay, b1, b2)


@nnx.jit
def eval_step(model, batch: dict):
  """Summed loss and token count (callers average over batches)."""
  _, aux = loss_fn(model, batch)
  moe.reset_moe_stats(model)  # evaluation must not steer the router biases
  return {"loss_sum": aux["loss"] * aux["tokens"], "tokens": aux["tokens"],
          "metrics": aux["metrics"]}
