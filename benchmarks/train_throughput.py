"""Training throughput: tokens/s, step time, model FLOPs per token and MFU.

  python benchmarks/train_throughput.py --config=configs/tiny.py
  python benchmarks/train_throughput.py --config=configs/small.py --batch=16 --seq=1024
  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --batch=4 --seq=256

Runs the project's one train step (``model1.steps.train_step``) on synthetic tokens on the
current backend. FLOPs per token = 6 x (matmul parameters touched per token) + attention
(6 x 2 x heads x attended keys x (d_qk + d_v) / 2 for causal). MFU is printed when the
backend's peak is known (--peak_tflops overrides; H200 bf16 ~ 790 TFLOP/s measured).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model1 import config as mconfig, sharding, steps, trainer  # noqa: E402

PEAKS = {"gpu": 790e12}  # H200 measured bf16 matmul (docs/design.md §7)


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def flops_per_token(model, cfg: mconfig.ModelConfig, seq: int) -> float:
  params = nnx.state(model, nnx.Param)
  n = 0
  for path, v in jax.tree.leaves_with_path(params):
    names = "/".join(str(getattr(k, "key", k)) for k in path)
    if v.ndim >= 2 and "embed" not in names.split("/")[:1]:
      n += v.size
  a = cfg.attention
  d_qk = a.qk_nope_head_dim + a.rope.dim if a.geometry == "v32" else a.head_dim
  d_v = a.v_head_dim if a.geometry == "v32" else a.head_dim
  attn = 6 * cfg.n_layers * a.n_heads * (seq / 2) * (d_qk + d_v)
  return 6.0 * n + attn


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default=None, help="override model compute dtype")
  p.add_argument("--peak_tflops", type=float, default=None)
  args = p.parse_args()
  cfg = load(args.config)
  if args.dtype:
    cfg.model.dtype = args.dtype
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
  extra = getattr(trainer, "extra_batch_inputs", None)
  if extra is not None:
    batch.update(extra(model, batch))
  with sharding.use_mesh(mesh):
    b = trainer.put_batch(batch, mesh)
    t0 = time.perf_counter()
    out = steps.train_step(model, opt, b)
    jax.block_until_ready(out["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      out = steps.train_step(model, opt, b)
    jax.block_until_ready(out["loss"])
    dt = (time.perf_counter() - t0) / args.steps
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  fpt = flops_per_token(model, mcfg, T)
  tps = B * T / dt
  peak = args.peak_tflops * 1e12 if args.peak_tflops else PEAKS.get(jax.default_backend())
  print(f"config={args.config} backend={jax.default_backend()} devices={jax.device_count()} "
        f"dtype={mcfg.dtype} params={n_params / 1e6:.2f}M batch={B} seq={T}")
  print(f"first step (compile+run) {compile_s:.1f}s | step {dt * 1e3:.1f} ms | "
        f"{tps:,.0f} tokens/s | {fpt / 1e6:.1f} MFLOP/token | {tps * fpt / 1e12:.3f} TFLOP/s"
        + (f" | MFU {tps * fpt / peak:.1%}" if peak else " | MFU n/a (no known peak)"))


if __name__ == "__main__":
  main()
