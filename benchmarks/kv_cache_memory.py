"""KV-cache memory per token and the context that fits in a memory budget.

What: for each cache format (FlashMLA's, see ``pallas_kernels/fp8_cache.py``) prints the
bytes one token costs in one layer, in all layers, the bytes per token once page blocks
are padded (model1 pads each block to a multiple of 576 bytes), how many tokens of
context fit in ``--budget_gib``, and the ratio to the bf16 cache of the same geometry:
  V32     (576-dim MLA latent+RoPE):  bf16 576*2 = 1152 B,  FP8 656 B
  MODEL1  (512-dim key = value):      bf16 512*2 = 1024 B,  FP8 584 B
One cached vector per token per layer (MLA's single KV head).  Layer counts default to the
released models (DeepSeek-V3.2: 61 layers; DeepSeek-V4-Flash: 43).

That table treats every layer as a dense token cache. ``--config v4_flash`` (or v4_pro,
v32_671b, or a path to a config file) instead asks the long-context cost model
(``model1.cost``) what one sequence of that model really holds -- V4's window ring, its
CSA (1/4) and HCA (1/128) entries, the indexers' own keys, V3.2's indexer cache -- and
prints the longest context whose caches fit in ``--budget_gib`` (per-context tables:
``benchmarks/long_context_cost.py``).

Usage:  python benchmarks/kv_cache_memory.py --budget_gib 80 --block_size 64
        python benchmarks/kv_cache_memory.py --budget_gib 80 --config v4_pro
Without ``--config`` it imports only pallas_kernels, numpy and the standard library.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
  import pallas_kernels as pk
except ImportError:  # run as a script from a checkout: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import pallas_kernels as pk

GIB = 1 << 30


def rows(budget_gib: float, n_layers_v32: int, n_layers_model1: int, block_size: int):
  """One dict per (geometry, format) with per-token bytes and tokens that fit."""
  out = []
  for geom, d, n_layers in (("v32", 576, n_layers_v32), ("model1", 512, n_layers_model1)):
    base = pk.bytes_per_token("bf16", d)
    for fmt in ("bf16", geom):
      bpt = pk.bytes_per_token(fmt, d)
      padded = pk.block_bytes(fmt, block_size, d) / block_size
      tokens = int(budget_gib * GIB // (padded * n_layers))
      out.append(dict(geometry=geom, fmt=fmt if fmt == "bf16" else "fp8", layers=n_layers,
                      bytes_per_token_layer=bpt, padded_per_token_layer=padded,
                      bytes_per_token=bpt * n_layers, tokens=tokens, ratio_to_bf16=bpt / base))
  return out


def model_context(config: str, budget_gib: float, block_size: int) -> tuple[str, int, dict]:
  """(label, longest context L whose caches fit in the budget, bytes by part at that L)."""
  import dataclasses
  import importlib.util
  from pathlib import Path

  root = Path(__file__).resolve().parents[1]
  if str(root) not in sys.path:  # this checkout's model1, not an installed copy
    sys.path.insert(0, str(root))
  from model1 import config as mconfig
  from model1 import cost
  path = Path(config)
  if not path.suffix:
    path = root / "configs" / f"{config}.py"
  if not path.is_file():
    raise ValueError(f"--config={config!r}: no such config file {path}; expected a name "
                     f"in configs/ (v32_671b, v4_flash, v4_pro) or a path")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mconfig.model_config_from_dict(mod.get_config().model)
  storage = dataclasses.replace(cost.DEPLOYED, block_size=block_size)
  budget = budget_gib * GIB
  lo, hi = 0, 1
  while cost.kv_cache_bytes(cfg, hi, storage).total <= budget and hi < 1 << 40:
    lo, hi = hi, 2 * hi
  while hi - lo > 1:  # the bytes grow with L: bisect for the last L that fits
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if cost.kv_cache_bytes(cfg, mid, storage).total <= budget else (lo, mid)
  parts = cost.kv_cache_bytes(cfg, max(lo, 1), storage).by_part
  return path.stem, lo, parts


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--budget_gib", type=float, default=80.0, help="KV-cache memory budget (GiB)")
  p.add_argument("--n_layers", type=int, default=None, help="override both layer counts")
  p.add_argument("--n_layers_v32", type=int, default=61, help="layers, V32 geometry")
  p.add_argument("--n_layers_model1", type=int, default=43, help="layers, MODEL1 geometry")
  p.add_argument("--block_size", type=int, default=64, help="tokens per page block")
  p.add_argument("--config", default="", help="a full-size model config: count its real "
                 "caches with model1.cost (v32_671b, v4_flash, v4_pro or a path)")
  a = p.parse_args(argv)
  if a.config:
    try:
      name, L, parts = model_context(a.config, a.budget_gib, a.block_size)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    print(f"{name}: one sequence of up to {L:,} tokens fits in {a.budget_gib:g} GiB; "
          f"at that length (GiB): " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in parts.items()))
    return
  n32 = a.n_layers or a.n_layers_v32
  nm1 = a.n_layers or a.n_layers_model1
  print(f"budget {a.budget_gib:g} GiB, page block {a.block_size} tokens")
  print(f"{'geometry':<8} {'format':<6} {'layers':>6} {'B/tok/layer':>11} {'padded':>8} "
        f"{'B/tok':>8} {'tokens in budget':>17} {'vs bf16':>8}")
  for r in rows(a.budget_gib, n32, nm1, a.block_size):
    print(f"{r['geometry']:<8} {r['fmt']:<6} {r['layers']:>6} {r['bytes_per_token_layer']:>11} "
          f"{r['padded_per_token_layer']:>8.2f} {r['bytes_per_token']:>8} {r['tokens']:>17,} "
          f"{r['ratio_to_bf16']:>8.3f}")


if __name__ == "__main__":
  main()
