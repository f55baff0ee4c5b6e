"""Training-step time and peak memory versus sequence length: dense, DSA, V4 compressed.

What: for each attention kind a tiny-width MODEL1 model (exact 512-dim head geometry,
narrow everything else, plain pre-norm blocks) takes one training step (loss + gradients) at sequence lengths
1K, 2K, ... up to ``--max_len``. Peak memory is XLA's own account of the compiled step,
``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes`` (scratch
buffers, not parameters or inputs), so it is exact and needs no run; time is the median
of a few runs (skipped when the step would need more than ``--max_run_gib``). A line
fit of log(memory) against log(T) gives the growth exponent: ~2 for dense attention
(the [T, S] scores), ~1 for the sparse kinds, whose memory grows with the keys each
query selects (DSA top-k, V4 window + T/r compressed entries), not with T^2 — the
indexers still *compute* all T x S (DSA) or T x T/4 (CSA) scores, chunk by chunk.

  dense       plain causal attention
  dsa         V3.2 lightning indexer + top-k tokens (sparse stage)
  compressed  V4: window 128 + layers (CSA ratio 4 with top-k, HCA ratio 128)

Usage:  python benchmarks/sparse_attention_scaling.py [--quick] [--max_len 8192]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from model1 import config  # noqa: E402
from model1.layers import AuxLoss  # noqa: E402
from model1.model import Transformer  # noqa: E402

GIB = 1 << 30
KINDS = ("dense", "dsa", "compressed")


def model_config(kind: str, d_model: int, topk: int, max_len: int,
                 chunk: int) -> config.ModelConfig:
  base = config.preset("tiny", "model1", sparse="dense")
  a = dataclasses.replace(base.attention, n_heads=2, q_lora_rank=32, o_lora_rank=32,
                          index_n_heads=2, index_topk=topk, attn_chunk=chunk)
  if kind == "dsa":
    a = dataclasses.replace(a, sparse="dsa")
  elif kind == "compressed":
    a = dataclasses.replace(a, sparse="compressed", window_size=128, compress_ratios=(4, 128))
  # plain pre-norm blocks with a dense FFN: the attention is what scales with T
  return dataclasses.replace(base, d_model=d_model, n_layers=2, max_seq_len=max_len,
                             attention=a, ffn=config.FFNConfig(2 * d_model),
                             mhc=config.MHCConfig(hc_mult=1), use_moe=False,
                             mtp=config.MTPConfig(n_layers=0)).validate()


def train_step_fn(graphdef, rest):
  def loss(params, toks):
    m = nnx.merge(graphdef, params, rest)
    logits = m(toks[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
    return ce + sum(jax.tree.leaves(nnx.pop(m, AuxLoss)), 0.0)
  return jax.value_and_grad(loss)


def measure(kind: str, T: int, args) -> dict:
  cfg = model_config(kind, args.d_model, args.topk, T + 1, args.chunk)
  graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)
  toks = jax.random.randint(jax.random.key(0), (args.batch, T + 1), 0, cfg.vocab_size)
  step = jax.jit(train_step_fn(graphdef, rest))
  t0 = time.perf_counter()
  compiled = step.lower(params, toks).compile()
  row = dict(kind=kind, T=T, compile_s=time.perf_counter() - t0,
             temp_bytes=compiled.memory_analysis().temp_size_in_bytes, step_s=float("nan"))
  if row["temp_bytes"] <= args.max_run_gib * GIB:
    times = []
    for _ in range(args.repeats + 1):                 # the first run warms caches
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, toks))
      times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times[1:])
  return row


def exponent(rows) -> float:
  """Slope of log(temp memory) vs log(T) over the lengths >= 2K (constants fade)."""
  pts = [(r["T"], r["temp_bytes"]) for r in rows if r["T"] >= 2048] or \
        [(r["T"], r["temp_bytes"]) for r in rows]
  if len(pts) < 2:
    return float("nan")
  t, m = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(t, m, 1)[0])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--min_len", type=int, default=1024)
  p.add_argument("--max_len", type=int, default=16384)
  p.add_argument("--quick", action="store_true", help="lengths 1K-4K, one timed run")
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--topk", type=int, default=256, help="DSA tokens / CSA entries per query")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--chunk", type=int, default=256, help="attention query chunk")
  p.add_argument("--max_run_gib", type=float, default=3.0,
                 help="time only steps whose temp memory is below this")
  a = p.parse_args(argv)
  if a.quick:
    a.max_len, a.repeats = min(a.max_len, 4096), 1
  lens = []
  T = a.min_len
  while T <= a.max_len:
    lens.append(T)
    T *= 2
  print(f"backend {jax.default_backend()}, d_model {a.d_model}, batch {a.batch}, "
        f"top-k {a.topk}, query chunk {a.chunk}, lengths {lens}")
  print(f"{'kind':<11} {'T':>6} {'temp MiB':>10} {'step s':>8} {'compile s':>9}")
  for kind in a.kinds.split(","):
    rows = []
    for T in lens:
      r = measure(kind, T, a)
      rows.append(r)
      print(f"{kind:<11} {T:>6} {r['temp_bytes'] / 2**20:>10.1f} {r['step_s']:>8.3f} "
            f"{r['compile_s']:>9.1f}", flush=True)
    last = (float(np.log(rows[-1]["temp_bytes"] / rows[-2]["temp_bytes"]) /
                  np.log(rows[-1]["T"] / rows[-2]["T"])) if len(rows) > 1 else float("nan"))
    print(f"{kind:<11} memory growth exponent {exponent(rows):.2f} (fit, T >= 2K), "
          f"{last:.2f} (last doubling; constants fade)  (temp bytes ~ T^k)")


if __name__ == "__main__":
  main()
