"""The training loop behind ``train.py``: mesh, data, sharded model, checkpoints, metrics.

``run(config, workdir)`` trains ``config.train.steps`` steps, resuming from the latest
checkpoint in ``workdir`` when there is one. Checkpoints every ``ckpt_every`` steps keep
the last ``keep_checkpoints``; SIGTERM/SIGINT save one at the current step before
returning (``preempt_at_step`` sends SIGTERM to this process at that step, so the real
signal path is testable). Metrics go to ``<workdir>/metrics.jsonl`` (one JSON object per
logged step: step, unix time, loss, tokens_per_s, grad_norm, lr, val_loss when evaluated),
TensorBoard event files to ``<workdir>/tb`` and the loss-curve PNG is redrawn at each
evaluation and at the end.

A run directory holds one run: ``run.lock`` keeps a second trainer out; an existing run
is resumed only with a compatible config (``checkpoint.check_resume_compatible``) and
corpus, from the newest checkpoint that reads; ``provenance.json``, ``manifest.json`` and
``tokenizer.json`` (the run's own tokenizer, used on every resume and by eval.py) are
written only after that.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1 import checkpoint, data, long_context, optim, sharding, steps
from model1.config import model_config_from_dict
from model1.engram import HOST_TABLE_TRAINABLE
from model1.engram_hash import NgramHashMapping
from model1.indexer import INDEXER_PARAMS
from model1.model import Transformer


def optim_config(t) -> optim.OptimConfig:
  """``config.train`` -> OptimConfig. Accumulation happens in ``steps.train_step`` (a
  scan over micro-batches), so the optimizer always sees one full-batch gradient."""
  if t.optimizer not in ("adamw", "muon"):
    raise ValueError(f"train.optimizer={t.optimizer!r}; expected 'adamw' or 'muon'")
  return optim.OptimConfig(lr=t.lr, warmup_steps=t.warmup_steps,
                           total_steps=max(t.steps, t.warmup_steps + 1),
                           min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay,
                           b1=t.b1, b2=t.b2, clip=t.clip, muon=t.optimizer == "muon",
                           muon_lr=t.muon_lr)


def build_model_and_optimizer(model_cfg, train_cfg, mesh, seed: int):
  """Model and optimizer created directly in their sharded layout."""
  if model_cfg.use_moe and mesh is not None:
    model_cfg.moe.validate(model_cfg.n_layers - model_cfg.n_dense_layers,
                           mesh.shape.get("expert", 1))
  tx = optim.make_optimizer(optim_config(train_cfg))

  a = model_cfg.attention
  # DSA / CSA warm-up stage: only the indexer learns (its KL to the main attention)
  wrt = INDEXER_PARAMS if a.sparse != "dense" and a.dsa_stage == "warmup" else nnx.Param
  if wrt is nnx.Param and model_cfg.use_engram and model_cfg.engram.host_table:
    wrt = HOST_TABLE_TRAINABLE  # host tables get row-sparse AdamW (steps.update_host_tables)

  def build():
    model = Transformer(model_cfg, nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=wrt)
  return sharding.create_sharded(build, mesh)


def put_batch(batch: dict, mesh) -> dict:
  """Host numpy batch -> global jax arrays sharded over the batch axes. Every host
  computes the same global batch (a pure function of seed and step) and contributes the
  slices it owns, so this also works multi-host."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, batch)
  def one(v):
    shd = sharding.batch_sharding(mesh, v.shape)
    return jax.make_array_from_callback(v.shape, shd, lambda idx: v[idx])
  return jax.tree.map(one, batch)


def load_dataset(cfg, tokenizer_file=None) -> data.Dataset:
  """The run's Dataset; ``tokenizer_file`` (a run's ``tokenizer.json``) replaces the
  cached tokenizer trained for the corpus."""
  d = cfg.data
  paths = [p for p in str(d.paths).split(",") if p] or None
  return data.Dataset(paths=paths, seq_len=d.seq_len, batch_size=d.batch_size, seed=cfg.seed,
                      tokenizer=d.tokenizer, vocab_size=cfg.model.vocab_size,
                      val_percent=d.val_percent, cache_dir=d.cache_dir or None,
                      tokenizer_file=tokenizer_file)


def engram_mapping(model_cfg, ds: data.Dataset):
  """Host-side n-gram hasher for Engram models (None otherwise), built from the run's
  own tokenizer."""
  if not model_cfg.use_engram:
    return None
  tok = getattr(ds.tokenizer, "tok", ds.tokenizer)
  return NgramHashMapping(model_cfg.engram, tok)


def add_host_inputs(batch: dict, mapping) -> dict:
  """Inputs computed on the host from token ids before jit (Engram hash ids per layer,
  hashed per document so packed rows never mix documents)."""
  if mapping is not None:
    batch = dict(batch, engram_hash={str(k): v for k, v in mapping.hash_packed(
        batch["inputs"], batch["segment_ids"]).items()})
  return batch


def train_batch(ds: data.Dataset, step: int, cfg, mapping=None) -> dict:
  """The text batch for ``step``, with synthetic long-context rows mixed in at
  ``data.synthetic_ratio`` (deterministic in seed and step)."""
  batch = ds.batch(step)
  ratio = cfg.data.get("synthetic_ratio", 0.0)
  if ratio > 0:
    tv = long_context.TaskVocab(cfg.model.vocab_size)
    batch = long_context.mix_into_batch(batch, step, ratio, tv, seed=cfg.seed)
  return add_host_inputs(batch, mapping)


def evaluate(model, ds: data.Dataset, mesh, n_batches: int, mapping=None) -> float:
  tot, n = 0.0, 0.0
  for i in range(min(n_batches, ds.num_val_batches())):
    batch = add_host_inputs(ds.batch(i, "val"), mapping)
    out = steps.eval_step(model, put_batch(batch, mesh))
    tot += float(out["loss_sum"])
    n += float(out["tokens"])
  return tot / max(n, 1.0)


def flat_metrics(out: dict) -> dict:
  """Sown metrics and aux losses as JSON-ready values: scalars as floats, vectors (e.g.
  per-expert load) as lists; keys are module paths without sow's tuple index."""
  row = {}
  for group, prefix in (("metrics", ""), ("aux", "aux/")):
    for path, v in out.get(group, {}).items():
      name = prefix + path
      a = np.asarray(v)
      row[name] = float(a) if a.ndim == 0 else a.round(5).tolist()
  return row


class _Stop:
  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    self.signum = signum


def _read_metrics(path: Path, upto: int) -> list[dict]:
  if not path.exists():
    return []
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [r for r in rows if r["step"] <= upto]


def plot_metrics(rows: list[dict], out: Path, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
  val = [r for r in rows if "val_loss" in r]
  if val:
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def validate_run_config(cfg) -> None:
  """Every ``train.*`` / ``data.*`` field checked up front, before any data or compile:
  a ValueError names the field, its value and what was expected."""
  t, d = cfg.train, cfg.data

  def need(ok, field, value, expected):
    if not ok:
      raise ValueError(f"{field}={value!r}; expected {expected}")

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  need(not cfg.get("full_size"), "full_size", cfg.get("full_size"),
       "a trainable config: DeepSeek-size configs are for parameter counts and the cost "
       "model only (benchmarks/long_context_cost.py); import real weights with "
       "python -m model1.convert")
  need(is_int(t.steps) and t.steps > 0, "train.steps", t.steps, "a positive int")
  need(is_int(t.log_every) and t.log_every > 0, "train.log_every", t.log_every,
       "a positive int")
  for k in ("eval_every", "ckpt_every", "warmup_steps"):
    need(is_int(t[k]) and t[k] >= 0, f"train.{k}", t[k], "an int >= 0 (0 = never/none)")
  for k in ("eval_batches", "keep_checkpoints", "grad_accum"):
    need(is_int(t[k]) and t[k] > 0, f"train.{k}", t[k], "a positive int")
  need(is_int(t.preempt_at_step) and t.preempt_at_step >= -1, "train.preempt_at_step",
       t.preempt_at_step, "-1 (off) or a step >= 0")
  for k in ("lr", "muon_lr"):
    need(is_num(t[k]) and t[k] > 0, f"train.{k}", t[k], "a positive number")
  for k in ("b1", "b2", "min_lr_ratio"):
    need(is_num(t[k]) and 0 <= t[k] <= 1, f"train.{k}", t[k], "a number in [0, 1]")
  for k in ("weight_decay", "clip"):
    need(is_num(t[k]) and t[k] >= 0, f"train.{k}", t[k], "a number >= 0")
  need(t.optimizer in ("adamw", "muon"), "train.optimizer", t.optimizer, "'adamw' or 'muon'")
  need(isinstance(t.progress, bool), "train.progress", t.progress, "True or False")
  need(isinstance(d.paths, str), "data.paths", d.paths,
       "a comma-separated string of files/folders ('' = Python stdlib sources)")
  need(is_int(d.seq_len) and d.seq_len > 0, "data.seq_len", d.seq_len, "a positive int")
  need(is_int(d.batch_size) and d.batch_size > 0, "data.batch_size", d.batch_size,
       "a positive int")
  need(d.batch_size % t.grad_accum == 0, "data.batch_size", d.batch_size,
       f"a multiple of train.grad_accum={t.grad_accum}")
  need(d.tokenizer in ("bpe", "byte"), "data.tokenizer", d.tokenizer, "'bpe' or 'byte'")
  need(is_num(d.val_percent) and 0 < d.val_percent < 100, "data.val_percent", d.val_percent,
       "a percentage in (0, 100)")
  ratio = d.get("synthetic_ratio", 0.0)
  need(is_num(ratio) and 0 <= ratio <= 1, "data.synthetic_ratio", ratio, "a number in [0, 1]")
  need(isinstance(d.cache_dir, str), "data.cache_dir", d.cache_dir,
       "a folder path ('' = $MODEL1_CACHE or ~/.cache/model1)")


def _tb_writer(workdir: Path):
  """TensorBoard event files in ``<workdir>/tb`` beside metrics.jsonl (None if
  tensorboardX is not installed: the JSONL stays the record)."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(str(workdir / "tb"))


def _tb_write(writer, row: dict) -> None:
  if writer is None:
    return
  for k, v in row.items():
    if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
      writer.add_scalar(k, v, row["step"])
  writer.flush()


def _print(msg: str) -> None:
  print(msg, flush=True)


def run(cfg, workdir: str | Path, log=_print) -> dict:
  """Train; returns a summary dict (final step, last loss, val loss, wall time, whether
  preempted). The run directory is locked for the duration; an existing run is resumed
  from its newest readable checkpoint only when the config is compatible, and nothing in
  it is rewritten before that is known."""
  t0 = time.perf_counter()
  validate_run_config(cfg)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = model_config_from_dict(cfg.model)
  t = cfg.train
  mesh = sharding.make_mesh(**cfg.mesh.to_dict())
  # multi-host: every process runs in the same (shared) run directory; process 0 locks it
  lock = checkpoint.RunLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _run_locked(cfg, workdir, model_cfg, t, mesh, log, t0)


def _run_locked(cfg, workdir, model_cfg, t, mesh, log, t0) -> dict:
  checkpoint.check_resume_compatible(workdir, cfg.to_dict())
  run_tok = workdir / "tokenizer.json"
  ds = load_dataset(cfg, tokenizer_file=run_tok) if run_tok.exists() else load_dataset(cfg)
  checkpoint.check_corpus(workdir, ds.manifest)
  if ds.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {ds.vocab_size} exceeds model.vocab_size="
                     f"{model_cfg.vocab_size}; expected model.vocab_size >= {ds.vocab_size}")
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={cfg.data.seq_len}; expected at most model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
  rng = jax.random.key(cfg.seed)
  try:
    latest = ckpt.latest_step()
    if latest is not None and latest > t.steps:
      raise ValueError(f"train.steps={t.steps} but {workdir} holds a checkpoint at step "
                       f"{latest}; expected train.steps >= {latest} (or a fresh --workdir)")
    mapping = engram_mapping(model_cfg, ds)
    model, opt = build_model_and_optimizer(model_cfg, t, mesh, cfg.seed)
    host_tables = steps.has_host_tables(model)
    lr_fn = optim.lr_schedule(optim_config(t))
    start, restored = checkpoint.restore_newest_readable(ckpt, model, opt,
                                                         cfg.model.to_dict(), mesh, log=log)
    if start is not None:
      rng = restored
    start = start or 0
  except BaseException:
    ckpt.close()
    raise
  # the run directory is known compatible only now: record it
  checkpoint.write_provenance(workdir, cfg.to_dict(), ds.manifest)
  if not run_tok.exists():
    checkpoint.save_run_tokenizer(workdir, ds.tokenizer)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"{cfg.name}: {n_params / 1e6:.2f}M params, {jax.device_count()} "
      f"{jax.default_backend()} device(s), mesh {dict(mesh.shape)}, workdir {workdir}, "
      + (f"resuming at step {start}" if start else "fresh start") + f", {t.steps} steps")
  metrics_path = workdir / "metrics.jsonl"
  rows = _read_metrics(metrics_path, start)
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tb = _tb_writer(workdir)

  stop = _Stop()
  old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  bar = None
  if t.progress:
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, desc=cfg.name, dynamic_ncols=True)
  summary = {"start_step": start, "preempted": False, "workdir": str(workdir)}
  last_t, last_step, out = time.perf_counter(), start, None
  step = start
  try:
    with sharding.use_mesh(mesh), open(metrics_path, "a") as mf:
      for step in range(start, t.steps):
        if step == t.preempt_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        if stop.signum is not None:
          ckpt.save(step, model, opt, rng, cfg.model.to_dict(), force=True)
          ckpt.wait()
          ckpt.mngr.check_for_errors()
          summary["preempted"] = True
          log(f"\nreceived signal {stop.signum}: checkpoint saved at step {step}")
          break
        # a failed background save stops the run now, with the last good checkpoint
        ckpt.mngr.check_for_errors()
        batch = train_batch(ds, step, cfg, mapping)
        steps.check_batch(batch, model_cfg)
        dev = put_batch(batch, mesh)
        if host_tables:  # gather the rows on the host; the table never enters the step
          dev["engram_emb"] = steps.gather_host_rows(model, dev["engram_hash"])
        out = steps.train_step(model, opt, dev, grad_accum=t.grad_accum)
        if host_tables:
          steps.update_host_tables(model, batch["engram_hash"], out.pop("engram_grads"),
                                   lr_fn(step), t.b1, t.b2, t.weight_decay)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
          loss = float(out["loss"])
          if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {done}")
          now = time.perf_counter()
          row = {"step": done, "time": round(time.time(), 3), "loss": loss,
                 "grad_norm": float(out["grad_norm"]), "lr": float(lr_fn(step)),
                 "tokens_per_s": (done - last_step) * tokens_per_step / (now - last_t)}
          row.update(flat_metrics(out))
          evaluated = t.eval_every and (done % t.eval_every == 0 or done == t.steps)
          if evaluated:
            row["val_loss"] = evaluate(model, ds, mesh, t.eval_batches, mapping)
          mf.write(json.dumps(row) + "\n")
          mf.flush()
          _tb_write(tb, row)
          if evaluated:  # a crash later still leaves a current plot
            plot_metrics(_read_metrics(metrics_path, done), workdir / "loss.png", cfg.name)
          if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
          last_t, last_step = time.perf_counter(), done
        if bar is not None:
          bar.update(1)
        if t.ckpt_every and done % t.ckpt_every == 0 and done < t.steps:
          ckpt.save(done, model, opt, rng, cfg.model.to_dict())
      else:
        step = t.steps
        if ckpt.latest_step() != t.steps:
          ckpt.save(t.steps, model, opt, rng, cfg.model.to_dict(), force=True)
      ckpt.wait()
      ckpt.mngr.check_for_errors()
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    if bar is not None:
      bar.close()
    if tb is not None:
      tb.close()
    try:
      ckpt.close()
    except Exception:  # noqa: BLE001 - the error that stopped the run is the one to show
      pass
  rows = _read_metrics(metrics_path, step)
  if rows:
    plot_metrics(rows, workdir / "loss.png", cfg.name)
  val = [r["val_loss"] for r in rows if "val_loss" in r]
  summary.update(step=step, last_loss=rows[-1]["loss"] if rows else None,
                 val_loss=val[-1] if val else None,
                 wall_s=round(time.perf_counter() - t0, 1))
  return summary
