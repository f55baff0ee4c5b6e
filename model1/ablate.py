"""Ablation runner: a suite is a base run config plus named variants; every variant trains
with the same data, seeds and budget (``trainer.run``) and is evaluated the same way.

  python -m model1.ablate --suite=heads --tiny                # CPU, minutes
  python -m model1.ablate --suite=heads --seeds=0,1,2         # the suite's own size
  python -m model1.ablate --suite=heads --preset=small        # ~100M-param block, a GPU
  python -m model1.ablate --suite=sparse,kv_cache --smoke     # smallest size that trains
  python -m model1.ablate --suite=heads --tiny --set=train.lr=1e-3 --variants=v32_576

Suites live in ``configs/ablate_<suite>.py``; ``get_config(preset)`` returns a ConfigDict:
  base      the run config every variant starts from (model/data/train/mesh sections)
  variants  [(name, overrides)] with dotted keys, e.g. {"model.attention.vvpa": False}.
            Keys under ``eval.`` change only the evaluation (the KV cache format, ...);
            ``"match_params": "<variant>"`` picks d_model (and if needed n_layers) so that
            ``config.param_count`` matches that variant's within ``PARAM_TOL``.
  eval      what to measure (tasks, lengths, trials, decode shapes, cache formats)
  seeds     default seeds
Resolution order: base -> variant -> size (--tiny/--smoke) -> --steps -> --set ->
match_params. --tiny/--smoke fix the widths, so a variant that overrides d_model or
n_layers keeps its value only at the suite's own size.

Outputs in --out (default a new folder ``<runs_dir>/results/<suite>-<UTC time>``, so the
committed ``results/<suite>`` is only rewritten when --out names it): results.md (table, mean ± std over seeds),
results.json (everything, per seed), loss_curves.png (a color per variant, seeds thin,
their mean thick), accuracy_vs_length.png. A variant that fails to build, train or
evaluate gets its error in the table instead of stopping the suite.

Sharing work. Trained runs live in --runs_dir under a hash of their run config and seed;
a finished run is reused, never retrained: variants differing only in ``eval.*`` train
once, suites sharing a baseline train it once, a re-invocation resumes. In one process,
runs with the same shapes reuse compiled steps (equal nnx graphdefs; ``optim`` memoises
the optimizer), and every evaluation of a model goes through one padded jitted forward
(``evals.Forward``), so extra seeds cost their steps, not compilations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARAM_TOL = 0.05  # matched-parameter variants: |count / target - 1| <= 5%
EVALS = ("loss", "retrieval", "decode")

# --tiny: CPU minutes. Widths shrink, FlashMLA per-head geometry (576 / 512) stays exact.
TINY = {
    "model.d_model": 64, "model.n_layers": 2, "model.ffn.hidden": 128,
    "model.attention.n_heads": 2, "model.attention.q_lora_rank": 32,
    "model.attention.o_groups": 2, "model.attention.o_lora_rank": 32,
    "model.max_seq_len": 128, "model.dtype": "float32",
    "data.seq_len": 64, "data.batch_size": 8,
    "train.steps": 30, "train.warmup_steps": 5, "train.log_every": 2,
    "eval.lengths": (32, 64, 128), "eval.n_trials": 32, "eval.eval_batches": 4,
    "eval.decode_batch": 2, "eval.decode_prompt": 16, "eval.decode_tokens": 8,
}
# --smoke: the smallest run that still trains (tests): one layer, 3 steps, no evaluation
# beyond the config and the training metrics (the kv_cache suite still compares caches).
SMOKE = dict(TINY, **{
    "model.n_layers": 1, "model.max_seq_len": 64, "data.seq_len": 32, "data.batch_size": 4,
    "train.steps": 3, "train.warmup_steps": 1, "train.log_every": 1,
    "eval.lengths": (32,), "eval.n_trials": 16, "eval.eval_batches": 1,
    "eval.decode_tokens": 4, "eval.evals": "none",
})


def suite_config(name: str, preset: str = "tiny", block: str = "plain"):
  """The ConfigDict a suite file starts from.

  block="plain": dense MODEL1 attention in a plain pre-norm block (dense SwiGLU, one
  residual stream, no MTP) so attention ablations isolate attention. block="v4": the
  preset's full V4 model (window + CSA/HCA attention, mHC, MoE, MTP). Default size (``preset="tiny"``): d_model 128, 2 layers,
  seq 256, 2000 steps, 3 seeds: a real experiment on one GPU or a CPU hour."""
  import ml_collections
  from model1 import config
  model = config.preset(preset, "model1")
  if block == "plain":
    model = dataclasses.replace(config.dense_attention(model),
                                mhc=dataclasses.replace(model.mhc, hc_mult=1),
                                use_moe=False, mtp=dataclasses.replace(model.mtp, n_layers=0))
  c = ml_collections.ConfigDict()
  c.suite = name
  c.base = config.run_config(model, name)
  c.base.train.update(steps=2000 if preset == "tiny" else 20000, warmup_steps=100,
                      eval_every=0, ckpt_every=0, log_every=10, progress=False)
  c.base.data.update(seq_len=min(256, model.max_seq_len), batch_size=16)
  c.variants = []
  c.seeds = (0, 1, 2)
  c.eval = ml_collections.ConfigDict(dict(
      evals=",".join(EVALS), tasks=("passkey", "mqar"), lengths=(64, 128, 256),
      n_trials=128, eval_batches=16, decode_batch=4, decode_prompt=32, decode_tokens=32,
      cache_format="bf16", compare_to="", impl="auto"))
  return c


def load_suite(name: str, preset: str = "tiny"):
  path = ROOT / "configs" / f"ablate_{name}.py"
  if not path.exists():
    have = sorted(p.stem[len("ablate_"):] for p in (ROOT / "configs").glob("ablate_*.py"))
    raise ValueError(f"--suite={name!r}: no {path}; expected one of {have}")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(preset)


# --------------------------------------------------------------------------- resolution


def set_path(c, key: str, value) -> None:
  """``c["a.b.c"] = value`` on nested ConfigDicts; unknown keys are an error."""
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    if p not in node:
      raise ValueError(f"override {key!r}: no field {p!r}; expected an existing config path")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"override {key!r}: no field {leaf!r} in {'.'.join(parents) or 'config'}")
  node[leaf] = value


def fit_size(run, ev, size: dict) -> None:
  """Apply a size dict (TINY / SMOKE) and keep the sparse / Engram settings valid at it."""
  for k, v in size.items():
    set_path(ev if k.startswith("eval.") else run, k[5:] if k.startswith("eval.") else k, v)
  m, T = run.model, run.data.seq_len
  a = m.attention
  a.window_size = min(a.window_size, max(8, T // 4))  # several windows per sequence
  a.index_topk = min(a.index_topk, max(4, T // 4))    # top-k must actually drop keys
  if a.compress_ratios:
    need = m.n_layers + m.mtp.n_layers
    a.compress_ratios = tuple(r if r in (0, 4) else a.window_size
                              for r in tuple(a.compress_ratios)[:need])
  if m.use_engram:
    m.engram.layer_ids = tuple(i for i in m.engram.layer_ids if i < m.n_layers) or (0,)


def match_params(run, target: int) -> None:
  """Set model.d_model (multiples of 8) and, only if no width is within PARAM_TOL at the
  same depth, model.n_layers, so ``param_count`` is as close to ``target`` as possible."""
  from model1 import config
  base = config.model_config_from_dict(run.model)
  cands = []
  for L in range(1, 2 * base.n_layers + 1):
    for d in range(16, 4 * base.d_model + 1, 8):
      try:
        n = config.param_count(dataclasses.replace(base, d_model=d, n_layers=L).validate())
      except ValueError:
        continue
      err = abs(n / target - 1)
      cands.append((err > PARAM_TOL, L != base.n_layers, err, d, L))
  _, _, err, d, L = min(cands)
  run.model.d_model, run.model.n_layers = d, L


def resolve(suite, scale: str | None = None, steps: int | None = None, sets=(),
            only: tuple[str, ...] = ()) -> list[dict]:
  """[{name, overrides, run (ConfigDict), eval (ConfigDict), error}] in suite order."""
  from model1 import config
  out, counts = [], {}
  for name, overrides in suite.variants:
    run, ev = suite.base.copy_and_resolve_references(), suite.eval.copy_and_resolve_references()
    v = {"name": name, "overrides": dict(overrides), "run": run, "eval": ev, "error": None}
    try:
      for k, val in overrides.items():
        if k != "match_params":
          set_path(ev if k.startswith("eval.") else run,
                   k[5:] if k.startswith("eval.") else k, val)
      if scale:
        fit_size(run, ev, {"tiny": TINY, "smoke": SMOKE}[scale])
      if steps:
        run.train.steps = steps
        run.train.warmup_steps = min(run.train.warmup_steps, max(1, steps // 10))
      for s in sets:
        k, _, val = s.partition("=")
        set_path(ev if k.startswith("eval.") else run, k[5:] if k.startswith("eval.") else k,
                 _literal(val))
      if "match_params" in overrides:
        target = overrides["match_params"]
        if target not in counts:
          raise ValueError(f"match_params={target!r}: expected an earlier variant name")
        match_params(run, counts[target])
      run.name = f"{suite.suite}-{name}"
      counts[name] = config.param_count(config.model_config_from_dict(run.model))
    except Exception as e:  # noqa: BLE001 - recorded in the table, the suite goes on
      v["error"] = f"config: {type(e).__name__}: {e}"
    out.append(v)
  return [v for v in out if not only or v["name"] in only]


def _literal(s: str):
  try:
    return json.loads(s)
  except ValueError:
    return {"True": True, "False": False}.get(s, s)


# --------------------------------------------------------------------------- train + eval


def run_key(run) -> str:
  d = run.to_dict()
  d.pop("name", None)
  d["train"].pop("progress", None)
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(run, runs_dir: Path) -> Path:
  """Train (or reuse) the run; returns its directory."""
  from model1 import trainer
  d = Path(runs_dir) / run_key(run)
  done = d / "ablate_train.json"
  if done.exists():
    return d
  t0 = time.perf_counter()
  with _shared_dataset(run):
    summary = trainer.run(run, d)
  if summary["preempted"]:
    raise SystemExit(f"interrupted; {d} keeps a checkpoint and resumes next time")
  done.write_text(json.dumps({"summary": summary, "wall_s": time.perf_counter() - t0}))
  return d


_DATASETS: dict = {}


@contextlib.contextmanager
def _shared_dataset(run):
  """Let ``trainer.run`` reuse this process's Dataset for the run's data settings.

  Building one hashes the whole corpus manifest and packs it (seconds); a Dataset is
  immutable after construction (``batch(step)`` is a pure function of seed and step), so
  variants and seeds with the same data settings can share it. Swaps the module
  attribute ``trainer.run`` looks up, and restores it afterwards."""
  from model1 import trainer
  orig = trainer.load_dataset
  trainer.load_dataset = lambda cfg, tokenizer_file=None: (
      _dataset(cfg) if tokenizer_file is None else orig(cfg, tokenizer_file))
  try:
    yield
  finally:
    trainer.load_dataset = orig


def _dataset(cfg):
  from model1 import data
  d = cfg.data
  key = (str(d.paths), d.seq_len, d.batch_size, cfg.seed, d.tokenizer, cfg.model.vocab_size,
         d.val_percent, d.cache_dir)
  if key not in _DATASETS:  # the same construction as trainer.load_dataset
    paths = [p for p in str(d.paths).split(",") if p] or None
    _DATASETS[key] = data.Dataset(paths=paths, seq_len=d.seq_len, batch_size=d.batch_size,
                                  seed=cfg.seed, tokenizer=d.tokenizer,
                                  vocab_size=cfg.model.vocab_size, val_percent=d.val_percent,
                                  cache_dir=d.cache_dir or None)
  return _DATASETS[key]


def _metrics(run_dir: Path) -> list[dict]:
  p = run_dir / "metrics.jsonl"
  return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def _err(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def evaluate(run_dir: Path, ev, decode: bool = True) -> dict:
  """Every number of one trained run (see the module docstring). With no evaluation
  requested (``eval.evals="none"``, the --smoke default) the model is not even loaded:
  the row holds what the config and metrics.jsonl give (params, KV bytes, train loss)."""
  from model1 import config, evals, trainer
  from model1.config import model_config_from_dict
  cfg = evals.load_run_config(run_dir)
  m = model_config_from_dict(cfg.model)
  which = set(str(ev.evals).split(",")) - {"none", ""}
  rows = _metrics(run_dir)
  speed = [r["tokens_per_s"] for r in rows[1:]]  # the first row includes compilation
  res = {"step": rows[-1]["step"] if rows else None, "params": config.param_count(m),
         "non_embedding_params": config.param_count(m) - 2 * m.vocab_size * m.d_model,
         "d_model": m.d_model, "n_layers": m.n_layers,
         "train_loss": rows[-1]["loss"] if rows else None,
         "train_tokens_per_s": float(np.median(speed)) if speed else None,
         "curve": [[r["step"], r["loss"]] for r in rows], "errors": {}}
  for fmt in ("fp8", "bf16"):
    try:
      res[f"kv_bytes_per_token_{fmt}"] = evals.kv_bytes_per_token(m, fmt)
    except Exception as e:  # noqa: BLE001
      res["errors"][f"kv_{fmt}"] = _err(e)
  if not which and not (ev.compare_to and decode):
    return res
  model, cfg, res["step"] = evals.load_trained(run_dir)
  ds = _dataset(cfg)
  mapping = trainer.engram_mapping(m, ds)
  lengths = [L for L in ev.lengths if L <= m.max_seq_len] if "retrieval" in which else []
  fwd = evals.Forward(model, mapping, batch_size=max(16, ds.batch_size),
                      length=max([ds.seq_len] + lengths))
  if "loss" in which:
    pos = evals.position_loss(model, ds, mapping, ev.eval_batches, forward=fwd)
    res.update(val_loss=pos["loss"], perplexity=pos["perplexity"], position=pos["buckets"])
  if "retrieval" in which:
    res["retrieval"] = [r for t in ev.tasks for r in evals.long_context_accuracy(
        model, t, ev.lengths, ev.n_trials, mapping=mapping, forward=fwd)]
  if "decode" in which and decode:
    try:
      sp = evals.decode_speed(model, ev.decode_batch, ev.decode_prompt, ev.decode_tokens,
                              ev.cache_format, impl=ev.get("impl", "auto"), mapping=mapping)
      res.update(decode_tokens_per_s=sp["tokens_per_s"], decode_impl=sp["impl"])
    except Exception as e:  # noqa: BLE001 - e.g. a mode generate does not support yet
      res["errors"]["decode"] = _err(e)
  if ev.compare_to and decode:
    try:
      c = evals.compare_cache_formats(model, [ev.cache_format], ev.compare_to,
                                      ev.decode_batch, ev.decode_prompt, ev.decode_tokens,
                                      mapping=mapping, impl=ev.get("impl", "auto"))
      res.update({f"{k}_vs_{ev.compare_to}": v for k, v in c[ev.cache_format].items()
                  if k in ("top1_agreement", "kl", "same_tokens")})
    except Exception as e:  # noqa: BLE001
      res["errors"]["compare"] = _err(e)
  return res


# --------------------------------------------------------------------------- aggregate


SCALARS = ("params", "non_embedding_params", "d_model", "n_layers", "val_loss", "perplexity",
           "train_loss", "kv_bytes_per_token_fp8", "kv_bytes_per_token_bf16",
           "decode_tokens_per_s", "train_tokens_per_s", "top1_agreement_vs_bf16",
           "kl_vs_bf16", "same_tokens_vs_bf16")


def summarize(per_seed: list[dict]) -> dict:
  """Mean, std (ddof=1; 0 for one seed) and count of every scalar over seeds; retrieval
  accuracy per (task, length) with the chance bound on the pooled trials."""
  from model1 import long_context
  ok = [r for r in per_seed if "error" not in r]
  out = {}
  for k in SCALARS:
    xs = [r[k] for r in ok if r.get(k) is not None]
    if xs:
      out[k] = {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1
                else 0.0, "n": len(xs)}
  acc = {}
  for r in ok:
    for a in r.get("retrieval", []):
      if "skipped" in a:
        acc.setdefault((a["task"], a["length"]), {"skipped": a["skipped"]})
        continue
      e = acc.setdefault((a["task"], a["length"]), {"accs": [], "n": 0, "chance": a["chance"]})
      e["accs"].append(a["accuracy"])
      e["n"] += a["n"]
  out["retrieval"] = []
  for (t, L), e in acc.items():
    row = {"task": t, "length": L}
    if "skipped" in e:
      row["skipped"] = e["skipped"]
    else:
      row.update(accuracy=float(np.mean(e["accs"])), std=float(np.std(e["accs"], ddof=1))
                 if len(e["accs"]) > 1 else 0.0, n=e["n"], chance=e["chance"],
                 chance_upper=long_context.binomial_upper(e["chance"], e["n"]))
    out["retrieval"].append(row)
  pos = [r["position"] for r in ok if "position" in r]
  if pos:
    out["position"] = [dict(b, loss=float(np.mean([p[i]["loss"] for p in pos])))
                       for i, b in enumerate(pos[0])]
  return out


def _pm(s: dict | None, digits: int = 3) -> str:
  from model1.evals import fmt_num
  if not s:
    return "–"
  txt = fmt_num(s["mean"], digits)
  return txt + (f" ± {fmt_num(s['std'], digits)}" if s["n"] > 1 and s["std"] > 0 else "")


def markdown(result: dict) -> str:
  """results.md: the settings, the main table, retrieval notes, loss by position."""
  from model1.evals import markdown_table
  vs = result["variants"]
  cols = [("params", lambda s: _pm(s.get("params"), 0)),
          ("d_model × layers", lambda s: "×".join(_pm(s.get(k), 0) for k in ("d_model", "n_layers"))),
          ("train loss", lambda s: _pm(s.get("train_loss"))),
          ("val loss", lambda s: _pm(s.get("val_loss"))),
          ("ppl", lambda s: _pm(s.get("perplexity"), 1))]
  keys = list(dict.fromkeys((a["task"], a["length"]) for v in vs
                            for a in v["summary"].get("retrieval", []) if "skipped" not in a))
  for t, L in keys:
    def cell(s, t=t, L=L):
      a = next((a for a in s.get("retrieval", []) if (a["task"], a["length"]) == (t, L)), None)
      if not a:
        return "–"
      star = "*" if a["accuracy"] > a["chance_upper"] else ""
      return f"{a['accuracy']:.3f}{star}" + (f" ± {a['std']:.3f}" if a["std"] else "")
    cols.append((f"{t}@{L}", cell))
  for k, title, dg in (("kv_bytes_per_token_fp8", "KV B/tok fp8", 0),
                       ("kv_bytes_per_token_bf16", "KV B/tok bf16", 0),
                       ("top1_agreement_vs_bf16", "top-1 vs bf16", 3),
                       ("kl_vs_bf16", "KL vs bf16", 5),
                       ("decode_tokens_per_s", "decode tok/s", 1),
                       ("train_tokens_per_s", "train tok/s", 0)):
    if any(k in v["summary"] for v in vs):
      cols.append((title, lambda s, k=k, dg=dg: _pm(s.get(k), dg)))
  rows = []
  for v in vs:
    notes = "; ".join([v["error"]] if v.get("error") else [])
    errs = sorted({f"{k}: {e}" for r in v["seeds"] for k, e in r.get("errors", {}).items()}
                  | {r["error"] for r in v["seeds"] if "error" in r})
    notes = "; ".join(x for x in [notes] + errs if x)
    rows.append([f"`{v['name']}`"] + [f(v["summary"]) for _, f in cols] + [notes or ""])
  s = result["settings"]
  out = [f"# Ablation `{result['suite']}`", "",
         f"`{result['command']}`", "",
         f"scale {s['scale']}, {s['steps']} steps, seeds {s['seeds']}, seq_len {s['seq_len']}, "
         f"batch {s['batch_size']}, synthetic ratio {s['synthetic_ratio']}; "
         f"{result['device']}; git {result['git_commit'][:10]}; {result['date']}", "",
         markdown_table(["variant"] + [c for c, _ in cols] + ["notes"], rows), "",
         "Mean ± std over seeds (std only with several seeds). train loss: the last logged "
         "batch; val loss: nats/token on the held-out files. task@L: accuracy at context length L (passkey: all 5 digits; "
         "MQAR: per query); `*` = above chance by > 4 binomial standard errors. KV B/tok: "
         "decode-cache bytes per token of context, all layers. decode tok/s: greedy "
         "`generate`, one device, after compilation.", "", "Overrides:", ""]
  out += [f"- `{v['name']}`: `{json.dumps(v['overrides'])}`" for v in vs]
  pos = [(v["name"], v["summary"]["position"]) for v in vs if "position" in v["summary"]]
  if pos:
    buckets = [f"[{b['lo']}, {b['hi']})" for b in pos[0][1]]
    prow = [[bk] + [f"{p[i]['loss']:.3f}" if i < len(p) else "–" for _, p in pos]
            for i, bk in enumerate(buckets)]
    out += ["", "## Validation loss by position in the document (nats/token)", "",
            markdown_table(["position"] + [f"`{n}`" for n, _ in pos], prow)]
  return "\n".join(out) + "\n"


def plot(result: dict, out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  vs = result["variants"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, v in enumerate(vs):
    c = colors[i % len(colors)]
    curves = [np.asarray(r["curve"]) for r in v["seeds"] if r.get("curve")]
    for cv in curves:
      ax.plot(cv[:, 0], cv[:, 1], color=c, lw=0.7, alpha=0.45)
    n = min((len(cv) for cv in curves), default=0)
    if n:
      mean = np.mean([cv[:n, 1] for cv in curves], axis=0)
      ax.plot(curves[0][:n, 0], mean, color=c, lw=2, label=v["name"])
    vl = v["summary"].get("val_loss")
    if vl and n:
      ax.plot([curves[0][n - 1, 0]], [vl["mean"]], "D", color=c, ms=6)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats/token)")
  ax.set_title(f"{result['suite']}: loss curves (◆ = final validation loss)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "loss_curves.png", dpi=110)
  plt.close(fig)

  tasks = list(dict.fromkeys(a["task"] for v in vs for a in v["summary"].get("retrieval", [])))
  fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4),
                           squeeze=False)
  for ax, t in zip(axes[0], tasks or ["(no retrieval evals)"]):
    chance = None
    for i, v in enumerate(vs):
      rows = [a for a in v["summary"].get("retrieval", []) if a["task"] == t and "skipped" not in a]
      if rows:
        chance = rows[0]["chance"]
        ax.errorbar([a["length"] for a in rows], [a["accuracy"] for a in rows],
                    yerr=[a["std"] for a in rows], marker="o", capsize=3,
                    color=colors[i % len(colors)], label=v["name"])
    if chance is not None:
      ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
      ax.set_xscale("log", base=2)
      ax.legend(fontsize=8)
    ax.set_title(t)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
  fig.tight_layout()
  fig.savefig(out / "accuracy_vs_length.png", dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- driver


def run_suite(name: str, out: Path, runs_dir: Path, preset: str = "tiny",
              scale: str | None = None, seeds=None, steps=None, sets=(), only=(),
              evals_override: str | None = None, command: str = "", log=print) -> dict:
  """Train and evaluate every variant x seed of a suite; write the outputs; return the
  results dict (also saved as results.json)."""
  import jax
  from model1.checkpoint import git_commit
  suite = load_suite(name, preset)
  seeds = list(seeds if seeds is not None else (suite.seeds if not scale else (0,)))
  variants = resolve(suite, scale, steps, sets, tuple(only))
  out.mkdir(parents=True, exist_ok=True)
  result_vs = []
  for v in variants:
    per_seed = []
    if evals_override:
      v["eval"].evals = evals_override
    for i, seed in enumerate(seeds):
      if v["error"]:
        break
      run = v["run"].copy_and_resolve_references()
      run.seed = seed
      t0 = time.perf_counter()
      log(f"[{name}] {v['name']} seed {seed}: training {run.train.steps} steps ...")
      try:
        d = train(run, runs_dir)
        r = evaluate(d, v["eval"], decode=i == 0)  # decode speed does not depend on seed
        r.update(seed=seed, run_dir=str(d))
      except SystemExit:
        raise
      except Exception as e:  # noqa: BLE001 - one broken variant must not stop the suite
        traceback.print_exc()
        r = {"seed": seed, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
      log(f"[{name}] {v['name']} seed {seed}: train loss {r.get('train_loss') or float('nan'):.4f}"
          f", val loss {r.get('val_loss', float('nan')):.4f} ({time.perf_counter() - t0:.0f} s)"
          f"{'  ERROR ' + r['error'] if 'error' in r else ''}")
      per_seed.append(r)
    result_vs.append({"name": v["name"], "overrides": v["overrides"], "error": v["error"],
                      "model": v["run"].model.to_dict(), "eval": v["eval"].to_dict(),
                      "seeds": per_seed, "summary": summarize(per_seed)})
  base = variants[0]["run"] if variants else suite.base
  result = {
      "suite": name, "command": command or f"python -m model1.ablate --suite={name}",
      "settings": {"scale": scale or f"preset {preset}", "steps": base.train.steps,
                   "seeds": seeds, "seq_len": base.data.seq_len,
                   "batch_size": base.data.batch_size,
                   "synthetic_ratio": base.data.synthetic_ratio},
      "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
      "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
      "variants": result_vs}
  (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
  (out / "results.md").write_text(markdown(result))
  plot(result, out)
  log(f"[{name}] wrote {out}/results.md")
  return result


def out_dir(suite: str, out: str, runs_dir: str, n_suites: int, stamp: str) -> Path:
  """Where a suite's tables and plots go: ``--out`` (``<out>/<suite>`` with several
  suites), else a new ``<runs_dir>/results/<suite>-<stamp>``, so the committed
  ``results/<suite>`` is never overwritten unless named."""
  if not out:
    return Path(runs_dir) / "results" / f"{suite}-{stamp}"
  return Path(out) / suite if n_suites > 1 else Path(out)


def main(argv):
  from absl import flags, logging
  F = flags.FLAGS
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
  suites = [s for s in F.suite.split(",") if s]
  if F.tiny and F.smoke:
    raise ValueError("--tiny and --smoke are exclusive; expected at most one")
  scale = "tiny" if F.tiny else "smoke" if F.smoke else None
  seeds = [int(s) for s in F.seeds.split(",")] if F.seeds else None
  evals_override = F.evals or None
  if evals_override and not set(evals_override.split(",")) <= set(EVALS) | {"none"}:
    raise ValueError(f"--evals={F.evals}; expected 'none' or a comma list of {EVALS}")
  command = "python -m model1.ablate " + " ".join(sys.argv[1:])
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  for s in suites:
    out = out_dir(s, F.out, F.runs_dir, len(suites), stamp)
    run_suite(s, out, Path(F.runs_dir), F.preset, scale, seeds, F.steps, F.set or (),
              [x for x in F.variants.split(",") if x], evals_override, command)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("suite", "heads", "Suite name(s), comma-separated: configs/ablate_<suite>.py")
  flags.DEFINE_bool("tiny", False, "CPU-minutes size: tiny widths, seq 64, 30 steps, seed 0.")
  flags.DEFINE_bool("smoke", False, "Smallest size that trains: 1 layer, seq 32, 3 steps.")
  flags.DEFINE_string("seeds", "", "Comma-separated seeds (default: the suite's; 0 with "
                      "--tiny/--smoke).")
  flags.DEFINE_integer("steps", None, "Training steps per run (overrides the size).")
  flags.DEFINE_string("out", "", "Output folder (default a new <runs_dir>/results/"
                      "<suite>-<UTC time>; with several suites, <out>/<suite>).")
  flags.DEFINE_string("runs_dir", "runs/ablate", "Where trained runs are kept and reused.")
  flags.DEFINE_string("preset", "tiny", "Model preset the suite starts from: tiny | small.")
  flags.DEFINE_string("variants", "", "Only these variants (comma-separated names).")
  flags.DEFINE_string("evals", "", f"Comma list of {EVALS}, or none (default: the "
                      "suite's; --smoke: none).")
  flags.DEFINE_multi_string("set", [], "Extra override KEY=VALUE (e.g. train.lr=1e-3, "
                            "eval.n_trials=64), applied after the size.")


if __name__ == "__main__":
  from model1 import cli
  cli.run_main(main, _define_flags)
