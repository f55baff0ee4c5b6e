"""Training throughput: compile time, step time, tokens/s, peak memory, FLOPs/token, MFU.

  python benchmarks/train_throughput.py --config=configs/tiny.py
  python benchmarks/train_throughput.py --config=configs/small.py --batch=16 --seq=1024
  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --batch=4 --seq=256
  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --scan_layers=False
  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --remat=full \
      --dtype=bfloat16
  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --depth_sweep

Runs the project's one train step (``model1.steps.train_step``) on synthetic tokens on the
current backend and prints, as separate figures: the first step (trace + compile + one
run), the steady step time and tokens/s (mean of ``--steps`` steps after it), and peak
memory (host RSS of this process on CPU; the device's peak bytes in use on GPU), plus the
process CPU time of the first and steady steps (robust when other jobs share the cores).
``--depth_sweep`` prints only the first-step time for n_layers 4, 11, 22 and 43 of the
config (ratios and hash layers cut to the depth), each in a fresh process, and the ratio
of the deepest to 11 layers (layers under ``lax.scan`` make it close to 1).

FLOPs per token = 6 x (matmul parameters a token touches) + attention (6 x 2 x heads x
attended keys x (d_qk + d_v) / 2 for causal): routed experts count only the top-k a
token is sent to (plus the shared experts), not all of them. MFU is printed when the
backend's peak is known (--peak_tflops overrides; H200 bf16 ~ 790 TFLOP/s measured).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model1 import config as mconfig, scan, sharding, steps, trainer  # noqa: E402

PEAKS = {"gpu": 790e12}  # H200 measured bf16 matmul (docs/design.md §7)
SWEEP = (4, 11, 22, 43)


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def flops_per_token(model, cfg: mconfig.ModelConfig, seq: int) -> float:
  """Model FLOPs per token (forward + backward); routed experts at top-k / E."""
  params = nnx.state(model, nnx.Param)
  n = 0.0
  for path, v in jax.tree.leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    if v.ndim < 2 or names[0] == "embed":
      continue
    frac = 1.0
    if "experts" in names:  # [E, ...] stacked routed experts: a token uses X of E
      frac = cfg.moe.n_activated_experts / cfg.moe.n_routed_experts
    n += v.size * frac
  a = cfg.attention
  d_qk = a.qk_nope_head_dim + a.rope.dim if a.geometry == "v32" else a.head_dim
  d_v = a.v_head_dim if a.geometry == "v32" else a.head_dim
  attn = 6 * cfg.n_layers * a.n_heads * (seq / 2) * (d_qk + d_v)
  return 6.0 * n + attn


def peak_memory_gb() -> tuple[float, str]:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host peak RSS"


def at_depth(cfg, n_layers: int):
  """The config cut to ``n_layers`` (per-layer ratios, hash layers, Engram ids)."""
  m = cfg.model
  m.n_layers = n_layers
  if m.attention.compress_ratios:
    m.attention.compress_ratios = tuple(m.attention.compress_ratios)[:n_layers]
  if m.use_moe:
    m.moe.n_hash_layers = min(m.moe.n_hash_layers, n_layers - m.n_dense_layers)
  if m.use_engram:
    m.engram.layer_ids = tuple(i for i in m.engram.layer_ids if i < n_layers) or (0,)
  return cfg


def run(args) -> dict:
  cfg = load(args.config)
  if args.dtype:
    cfg.model.dtype = args.dtype
  if args.remat is not None:
    cfg.model.remat = args.remat
  if args.scan_layers is not None:
    cfg.model.scan_layers = args.scan_layers
  if args.n_layers:
    cfg = at_depth(cfg, args.n_layers)
  B = args.batch or cfg.data.batch_size
  T = args.seq or cfg.data.seq_len
  cfg.model.max_seq_len = max(cfg.model.max_seq_len, T)
  mcfg = mconfig.model_config_from_dict(cfg.model)
  mesh = sharding.make_mesh(**cfg.mesh.to_dict())
  model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, 0)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, mcfg.vocab_size, (B, T)).astype(np.int32),
           "targets": rng.integers(0, mcfg.vocab_size, (B, T)).astype(np.int32),
           "segment_ids": np.ones((B, T), np.int32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
           "loss_mask": np.ones((B, T), np.float32)}
  with sharding.use_mesh(mesh):
    b = trainer.put_batch(batch, mesh)
    t0, c0 = time.perf_counter(), time.process_time()
    out = steps.train_step(model, opt, b)
    jax.block_until_ready(out["loss"])
    compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
    dt = step_cpu = float("nan")
    if args.steps:
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        out = steps.train_step(model, opt, b)
      jax.block_until_ready(out["loss"])
      dt = (time.perf_counter() - t0) / args.steps
      step_cpu = (time.process_time() - c0) / args.steps
  mem, mem_kind = peak_memory_gb()
  return {"config": args.config, "backend": jax.default_backend(),
          "devices": jax.device_count(), "dtype": mcfg.dtype, "remat": mcfg.remat,
          "scan_layers": mcfg.scan_layers, "n_layers": mcfg.n_layers,
          "plan": scan.describe(mcfg),
          "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
          "batch": B, "seq": T, "compile_s": compile_s, "compile_cpu_s": compile_cpu,
          "step_s": dt, "step_cpu_s": step_cpu, "load_avg": os.getloadavg()[0],
          "tokens_per_s": B * T / dt, "flops_per_token": flops_per_token(model, mcfg, T),
          "peak_mem_gb": mem, "mem_kind": mem_kind, "loss": float(out["loss"])}


def report(r: dict, peak_tflops: float | None) -> None:
  peak = peak_tflops * 1e12 if peak_tflops else PEAKS.get(r["backend"])
  tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12
  print(f"config={r['config']} backend={r['backend']} devices={r['devices']} "
        f"dtype={r['dtype']} remat={r['remat']} scan_layers={r['scan_layers']} "
        f"params={r['params'] / 1e6:.2f}M n_layers={r['n_layers']} batch={r['batch']} "
        f"seq={r['seq']}")
  print(f"layer plan: {r['plan']}")
  print(f"compile (first step) {r['compile_s']:.1f} s | steady step {r['step_s'] * 1e3:.1f} ms"
        f" | {r['tokens_per_s']:,.0f} tokens/s | {r['mem_kind']} {r['peak_mem_gb']:.2f} GB")
  print(f"process CPU time: first step {r['compile_cpu_s']:.1f} s, steady step "
        f"{r['step_cpu_s'] * 1e3:.1f} ms | load average {r['load_avg']:.1f} on "
        f"{os.cpu_count()} cores (wall times stretch when the machine is shared)")
  print(f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token (activated experts only) | "
        f"{tflops:.3f} TFLOP/s"
        + (f" | MFU {tflops * 1e12 / peak:.1%}" if peak else " | MFU n/a (no known peak)"))


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"--scan_layers={s!r}; expected True or False")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--steps", type=int, default=5, help="steady-state steps after the first")
  p.add_argument("--dtype", default=None, help="override model compute dtype")
  p.add_argument("--remat", default=None,
                 help=f"override model.remat: one of {mconfig.REMAT_CHOICES} (or True/False)")
  p.add_argument("--scan_layers", type=_bool, default=None,
                 help="override model.scan_layers (False = the unrolled Python loop)")
  p.add_argument("--n_layers", type=int, default=0, help="cut the config to this depth")
  p.add_argument("--depth_sweep", action="store_true",
                 help=f"compile time only, n_layers in {SWEEP}, one process each")
  p.add_argument("--json", action="store_true", help="print one JSON line (for sweeps)")
  p.add_argument("--peak_tflops", type=float, default=None)
  args = p.parse_args()
  if not args.depth_sweep:
    r = run(args)
    print(json.dumps(r) if args.json else "", flush=True)
    report(r, args.peak_tflops)
    return
  times = {}
  for n in SWEEP:
    cmd = [sys.executable, __file__, "--config", args.config, "--n_layers", str(n),
           "--steps", "0", "--json"]
    for k in ("batch", "seq", "dtype", "remat"):
      if getattr(args, k) is not None:
        cmd += [f"--{k}", str(getattr(args, k))]
    if args.scan_layers is not None:
      cmd += ["--scan_layers", str(args.scan_layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[0])
    times[n] = r["compile_cpu_s"]
    print(f"n_layers={n:3d} compile (first step) {r['compile_s']:6.1f} s wall, "
          f"{r['compile_cpu_s']:6.1f} s CPU (load {r['load_avg']:.1f}) | "
          f"{r['mem_kind']} {r['peak_mem_gb']:.2f} GB | plan: {r['plan']}", flush=True)
  print(f"compile CPU time ratio {SWEEP[-1]} / 11 layers: {times[SWEEP[-1]] / times[11]:.2f}")


if __name__ == "__main__":
  main()
