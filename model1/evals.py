"""Evaluations of a trained model: loss by position, long-context retrieval, decoding.

Every function takes a model (and, for Engram models, the host-side n-gram ``mapping``)
and returns plain dicts / lists of dicts, so ``eval.py``, ``model1.ablate`` and the
notebooks print, tabulate or plot the same numbers.

* ``Forward`` — ONE jitted forward per model: batches are padded to a fixed
  [batch_size, length] so every evaluation of a model (validation loss at seq_len,
  passkey/MQAR at several lengths) reuses a single compilation. Padding is segment 0,
  which attention never reads, and causal attention makes the real prefix independent of
  anything appended after it.
* ``position_loss`` — validation loss by position-in-document bucket. A model that uses
  its context keeps lowering the loss deep into the context; a flat curve after a few
  tokens means the far context is ignored.
* ``long_context_accuracy`` — passkey / MQAR accuracy (``model1.long_context.score``) at
  several lengths; lengths beyond ``max_seq_len`` are skipped with a note, never run.
* ``decode_speed`` and ``compare_cache_formats`` — tokens/s of ``generate`` and how much
  the FP8 KV cache changes the next-token distribution relative to bf16.
* ``load_trained`` — restore a run directory's latest checkpoint onto the default device
  (whatever mesh trained it) without compiling an initialiser.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model1 import long_context

# --------------------------------------------------------------------------- loading


def load_run_config(workdir: str | Path):
  """The resolved run config a ``trainer.run`` wrote to ``<workdir>/provenance.json``."""
  import ml_collections
  prov = Path(workdir) / "provenance.json"
  if not prov.exists():
    raise ValueError(f"{workdir} has no provenance.json; expected a trainer.run directory")
  return ml_collections.ConfigDict(json.loads(prov.read_text())["config"])


def load_trained(workdir: str | Path, step: int | None = None):
  """(model, run config, step) from a run directory, on the default device.

  The model is built abstractly (``nnx.eval_shape``: no initialiser is compiled) and
  filled with host zeros, so Orbax restores onto the current device whatever mesh wrote
  the checkpoint. The optimizer state is restored too (the checkpoint stores both) and
  dropped."""
  from model1 import checkpoint, optim, trainer
  from model1.config import model_config_from_dict
  from model1.model import Transformer
  cfg = load_run_config(workdir)
  mcfg = model_config_from_dict(cfg.model)
  tx = optim.make_optimizer(trainer.optim_config(cfg.train))

  def build():
    m = Transformer(mcfg, nnx.Rngs(cfg.seed))
    return m, nnx.Optimizer(m, tx, wrt=nnx.Param)
  model, opt = nnx.eval_shape(build)
  for obj in (model, opt):
    st = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), nnx.state(obj))
    nnx.update(obj, st)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{workdir} holds no checkpoint; expected a trained run")
    ckpt.restore(step, model, opt, cfg.model.to_dict(), None)
  finally:
    ckpt.close()
  return model, cfg, step


# --------------------------------------------------------------------------- forward


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_and_ce(graphdef, state, batch):
  # merge inside jit: state updates (MoE load counters, sown metrics) stay local and are
  # dropped, so evaluation never steers the router or leaks intermediates
  model = nnx.merge(graphdef, state)
  extra = {"engram_hash": batch["engram_hash"]} if "engram_hash" in batch else None
  logits_BTV = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch=extra)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  return logits_BTV, ce_BT


class Forward:
  """Logits and per-token cross-entropy of ``model`` at one padded shape.

  ``__call__(batch)`` takes a data-pipeline batch (inputs, targets, positions,
  segment_ids; any B <= batch_size, T <= length) and returns numpy (logits [B,T,V],
  ce [B,T]) for the real rows and positions. ``predict(inputs_BT)`` is the
  ``long_context.score`` interface (one document per row)."""

  def __init__(self, model, mapping=None, batch_size: int = 16, length: int | None = None):
    self.model, self.mapping = model, mapping
    self.batch_size = batch_size
    self.length = length or model.cfg.max_seq_len
    if self.length > model.cfg.max_seq_len:
      raise ValueError(f"length={self.length}; expected at most max_seq_len="
                       f"{model.cfg.max_seq_len}")
    self.graphdef, self.state = nnx.split(model)

  def __call__(self, batch: dict):
    from model1.trainer import add_host_inputs
    B, T = np.shape(batch["inputs"])
    if B > self.batch_size or T > self.length:
      raise ValueError(f"batch [{B}, {T}] exceeds the Forward shape [{self.batch_size}, "
                       f"{self.length}]")
    pad = lambda a: np.pad(np.asarray(a), [(0, self.batch_size - B), (0, self.length - T)])
    padded = {k: pad(batch[k]) for k in ("inputs", "targets", "positions", "segment_ids")}
    padded = add_host_inputs(padded, self.mapping)
    logits, ce = _logits_and_ce(self.graphdef, self.state, jax.tree.map(jnp.asarray, padded))
    return np.asarray(logits[:B, :T]), np.asarray(ce[:B, :T])

  def predict(self, inputs_BT: np.ndarray) -> np.ndarray:
    B, T = inputs_BT.shape
    batch = {"inputs": inputs_BT, "targets": np.zeros_like(inputs_BT),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "segment_ids": np.ones((B, T), np.int32)}
    return self(batch)[0]


# --------------------------------------------------------------------------- loss


def default_buckets(seq_len: int) -> list[int]:
  """Bucket edges 0, 1, 2, 4, ..., seq_len (log-spaced: early tokens change fastest)."""
  edges, e = [0, 1], 2
  while e < seq_len:
    edges.append(e)
    e *= 2
  return edges + [seq_len]


def position_loss(model, ds, mapping=None, n_batches: int = 8,
                  buckets: Sequence[int] | None = None, forward: Forward | None = None) -> dict:
  """Validation loss by position in the document, bucketed by ``buckets`` edges.

  Position is the token's position within its document piece (``batch['positions']``):
  how much context the model had. Returns {"loss": overall, "perplexity", "tokens",
  "buckets": [{"lo", "hi", "tokens", "loss", "perplexity"}]}; the overall loss equals
  ``trainer.evaluate`` over the same batches (same mask, MTP excluded)."""
  edges = list(buckets or default_buckets(ds.seq_len))
  fwd = forward or Forward(model, mapping, batch_size=ds.batch_size, length=ds.seq_len)
  K = len(edges) - 1
  loss_K, tok_K = np.zeros(K), np.zeros(K)
  for i in range(min(n_batches, ds.num_val_batches())):
    b = ds.batch(i, "val")
    _, ce_BT = fwd(b)
    m = b["loss_mask"] > 0
    k = np.searchsorted(edges, b["positions"], side="right") - 1
    ok = m & (k >= 0) & (k < K)
    np.add.at(loss_K, k[ok], ce_BT[ok])
    np.add.at(tok_K, k[ok], 1)
  rows = [{"lo": edges[i], "hi": edges[i + 1], "tokens": int(tok_K[i]),
           "loss": float(loss_K[i] / tok_K[i]) if tok_K[i] else float("nan"),
           "perplexity": float(math.exp(loss_K[i] / tok_K[i])) if tok_K[i] else float("nan")}
          for i in range(K)]
  total = float(loss_K.sum() / max(tok_K.sum(), 1))
  return {"loss": total, "perplexity": math.exp(total), "tokens": int(tok_K.sum()),
          "buckets": rows}


# --------------------------------------------------------------------------- retrieval


def long_context_accuracy(model, task: str, lengths: Sequence[int], n_trials: int,
                          tv: long_context.TaskVocab | None = None, mapping=None,
                          forward: Forward | None = None) -> list[dict]:
  """Accuracy of ``task`` ("passkey" | "mqar") at each length, one row per length:
  {task, length, accuracy, n, chance, chance_upper} or {task, length, skipped: why}.
  ``chance_upper`` is ``binomial_upper(chance, n)``: accuracy above it is retrieval, not
  luck (a chance-level model exceeds it with probability < 1e-4)."""
  cfg = model.cfg
  tv = tv or long_context.TaskVocab(cfg.vocab_size)
  ok = [L for L in lengths if L <= cfg.max_seq_len]
  fwd = forward or (Forward(model, mapping, length=max(ok)) if ok else None)
  rows = []
  for L in lengths:
    if L > cfg.max_seq_len:
      rows.append({"task": task, "length": L,
                   "skipped": f"length {L} > model.max_seq_len={cfg.max_seq_len}"})
      continue
    r = long_context.score(fwd.predict, task, tv, L, n_trials, batch_size=fwd.batch_size)
    r["chance_upper"] = long_context.binomial_upper(r["chance"], r["n"])
    rows.append(r)
  return rows


# --------------------------------------------------------------------------- decoding


def _prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return rng.integers(8, vocab_size, (batch, length)).tolist()  # skip the special ids


def decode_speed(model, batch: int = 4, prompt_len: int = 16, new_tokens: int = 16,
                 cache_format: str = "bf16", impl: str = "auto", repeats: int = 1,
                 mapping=None) -> dict:
  """Greedy ``generate`` throughput (new tokens/s, after one untimed call that compiles
  the prefill and the decode step for these shapes), the cache's bytes per token and the
  attention implementation that ran (``impl="auto"``: the kernels on a GPU)."""
  from model1 import generate
  s = generate.SamplingConfig(max_new_tokens=new_tokens)
  prompts = _prompts(model.cfg.vocab_size, batch, prompt_len, 0)
  gen = generate.generate(model, prompts, s, cache_format=cache_format, impl=impl,
                          mapping=mapping)
  t0 = time.perf_counter()
  for _ in range(repeats):
    gen = generate.generate(model, prompts, s, cache_format=cache_format, impl=impl,
                            mapping=mapping)
  dt = (time.perf_counter() - t0) / repeats
  n = sum(len(t) for t in gen.tokens)
  return {"cache_format": cache_format, "tokens_per_s": n / dt, "seconds": dt,
          "kv_bytes_per_token": gen.cache.bytes_per_token(), "impl": gen.impl}


def compare_cache_formats(model, formats: Sequence[str] = ("fp8",), reference: str = "bf16",
                          batch: int = 4, prompt_len: int = 16, new_tokens: int = 16,
                          mapping=None, impl: str = "auto") -> dict:
  """How a KV cache format changes greedy decoding relative to ``reference``.

  Both runs decode greedily from the same prompts. While their generated tokens agree
  the two see identical contexts, so each next-token distribution is comparable: over
  those steps (up to and including the first divergence) we report top-1 agreement and
  mean KL(reference || format). ``same_tokens`` is the fraction of generated tokens
  equal to the reference's before the first divergence (sequence-level agreement)."""
  from model1 import generate
  s = generate.SamplingConfig(max_new_tokens=new_tokens)
  prompts = _prompts(model.cfg.vocab_size, batch, prompt_len, 1)
  ref = generate.generate(model, prompts, s, cache_format=reference, return_logits=True,
                          mapping=mapping, impl=impl)
  out = {}
  for fmt in formats:
    g = generate.generate(model, prompts, s, cache_format=fmt, return_logits=True,
                          mapping=mapping, impl=impl)
    agree, kls, same = [], [], 0
    for b in range(batch):
      ta, tb = ref.tokens[b], g.tokens[b]
      n = min(len(ta), len(tb), ref.logits.shape[0], g.logits.shape[0])
      c = next((i for i in range(n) if ta[i] != tb[i]), n)  # first divergence
      same += c
      for i in range(min(c + 1, n)):
        la, lb = ref.logits[i, b].astype(np.float64), g.logits[i, b].astype(np.float64)
        pa = np.exp(la - la.max())
        pa /= pa.sum()
        lsa = la - la.max() - np.log(np.exp(la - la.max()).sum())
        lsb = lb - lb.max() - np.log(np.exp(lb - lb.max()).sum())
        kls.append(float((pa * (lsa - lsb)).sum()))
        agree.append(float(la.argmax() == lb.argmax()))
    out[fmt] = {"top1_agreement": float(np.mean(agree)), "kl": float(np.mean(kls)),
                "steps_compared": len(agree), "same_tokens": same / (batch * new_tokens),
                "kv_bytes_per_token": g.cache.bytes_per_token()}
  return out


def kv_bytes_per_token(model_cfg, cache_format: str) -> int:
  """Bytes per token of context, all layers, of the model's decode cache in a format
  (paged formats: exact; V4 compressed layers: the amortised compressed entries, the
  fixed window ring excluded)."""
  from model1.kv_cache import PagedKVCache, kcache_format
  fmt = kcache_format(cache_format, model_cfg.attention.geometry)
  return PagedKVCache.for_model(model_cfg, 1, 64, fmt).bytes_per_token()


# --------------------------------------------------------------------------- tables


def fmt_num(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
    return f"{int(x):,}"
  return f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def accuracy_markdown(rows: Sequence[dict]) -> str:
  """One line per task, one column per length: accuracy (n) or the skip note."""
  lengths = sorted({r["length"] for r in rows})
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  by = {(r["task"], r["length"]): r for r in rows}
  out = []
  for t in tasks:
    cells = []
    for L in lengths:
      r = by.get((t, L))
      if r is None:
        cells.append("")
      elif "skipped" in r:
        cells.append("skipped")
      else:
        star = "*" if r["accuracy"] > r.get("chance_upper", 1.0) else ""
        cells.append(f"{r['accuracy']:.3f}{star} (n={r['n']})")
    chance = next((r["chance"] for r in rows if r["task"] == t and "chance" in r), None)
    out.append([t, fmt_num(chance, 5)] + cells)
  notes = sorted({r["skipped"] for r in rows if "skipped" in r})
  table = markdown_table(["task", "chance"] + [f"L={L}" for L in lengths], out)
  table += "\n\n`*` = above chance by more than 4 binomial standard errors."
  return table + "".join(f"\n- skipped: {n}" for n in notes)


def position_markdown(res: dict) -> str:
  rows = [[f"[{b['lo']}, {b['hi']})", b["tokens"], fmt_num(b["loss"]), fmt_num(b["perplexity"], 1)]
          for b in res["buckets"]]
  rows.append(["all", res["tokens"], fmt_num(res["loss"]), fmt_num(res["perplexity"], 1)])
  return markdown_table(["position", "tokens", "loss", "perplexity"], rows)
