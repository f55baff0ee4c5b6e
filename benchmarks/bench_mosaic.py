"""Sparse decode and sparse prefill benchmarks with the Mosaic GPU (Hopper) kernels beside the
XLA and Triton paths.

What: ``bench_attention``'s sparse-decode cases (FlashMLA's V32 shape b=128, h=128, s_q=2,
top-k 2048, and the MODEL1 window + compressed shapes), timed for ``impl`` = "xla",
"pallas" (Triton) and "mosaic" (``pallas_kernels/mosaic_sparse_decode.py``).  For each it
prints time, TFLOP/s, GB/s and the fraction of the H200 roofline, as ``bench_attention``
does (nominal bytes: q + attended tokens x bytes/token + out), plus, for the Mosaic kernel,
the bytes it really moves from DRAM: each token's TMA copies fetch its FP8 NoPE + RoPE and
a 128-byte scale window (its 16 / 7 scale bytes plus the following tokens'), i.e.
656 -> ~752 B (v32) and 584 -> ~696 B (model1) per token; a second 64-head block of the
same query row re-reads the same tokens, mostly from L2, so it is not counted twice.

Sparse prefill (``pallas_kernels/mosaic_sparse_prefill.py``; section below ``main``):
FlashMLA's prefill shape (s_q 4096, s_kv 8192, h 128, top-k 2048, d_qk 576 and 512) and a
MODEL1 compressed-attention shape (h 64, top-k 512, s_kv 65536), same columns.  The kernel
reads exactly the selected bf16 rows (d_qk x 2 B per token, no over-fetch), so the nominal
byte model is what its gathers move, from DRAM or L2; it also prints the DRAM bound when
every key row is read from DRAM once (s_kv x d_qk x 2 + q + out), the byte count to use
when the keys fit in the 50 MB L2 (s_kv 8192: 9.4 MB).

On CPU (default there) it runs tiny cases in GPU interpret mode as a smoke test: the
times then measure the interpreter.  Targets (issue "Hopper-native FP8 MLA kernels"): FP8
sparse decode >= 330 TFLOP/s at the V32 shape, faster than XLA and Triton everywhere.

Usage:  python benchmarks/bench_mosaic.py [--smoke] [--impls xla,pallas,mosaic] [--iters 20]
          [--ops sparse_decode,sparse_prefill]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402  (sibling script; puts the repo root on the path)

# DRAM bytes per token the Mosaic kernel's gathers move (see the module docstring).
MOSAIC_BYTES_PER_TOKEN = {"v32": 656 + 96, "model1": 584 + 112}


def mosaic_bytes(case: ba.Case, geometry: str) -> float:
  """Nominal bytes with the cache part rescaled to what the Mosaic gathers fetch."""
  bpt = ba.pk.bytes_per_token(geometry)
  # Nominal = rows * (q + attended * bpt + out); only the attended part changes.
  return case.bytes * 1.0 + (case.bytes_cache / bpt) * (MOSAIC_BYTES_PER_TOKEN[geometry] - bpt)


def cases(smoke: bool):
  if smoke:
    out = [("v32", ba.sparse_decode_case("v32", 1, 16, 2, 100, 256, block_size=16)),
           ("model1", ba.sparse_decode_case("model1", 1, 16, 1, 64, 256, extra_topk=64,
                                            extra_s_k=64, block_size=16, sink=True))]
  else:
    out = [("v32", ba.sparse_decode_case("v32", 128, 128, 2, 2048, s_k)) for s_k in (8192, 32768)]
    out += [("model1", ba.sparse_decode_case("model1", 128, h, 2, 128, 16384, extra_topk=e,
                                             extra_s_k=16384 // 4, sink=True))
            for h in (64, 128) for e in (512, 1024)]
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes (default on CPU)")
  p.add_argument("--impls", default="xla,pallas,mosaic", help="comma-separated impls")
  p.add_argument("--iters", type=int, default=None, help="calls per timing run")
  p.add_argument("--ops", default="sparse_decode,sparse_prefill", help="comma-separated ops")
  a = p.parse_args(argv)
  smoke = a.smoke or jax.default_backend() == "cpu"
  if "sparse_prefill" in a.ops.split(","):
    sparse_prefill_main(tuple(a.impls.split(",")), a.iters, smoke)
  if "sparse_decode" not in a.ops.split(","):
    return
  geo_cases = cases(smoke)
  for geometry, c in geo_cases:
    # attended tokens x bytes/token over all rows: the part of the byte model that is cache.
    c.bytes_cache = c.bytes - _q_out_bytes(c)
  rows = ba.run([c for _, c in geo_cases], a.iters or (1 if smoke else 20), 40.0,
                impls=tuple(a.impls.split(",")))
  print("\nMosaic kernel, bytes it really reads (scale windows included):")
  for geometry, c in geo_cases:
    for r in rows:
      if r["case"] == c.label and r["impl"] == "mosaic" and "us" in r:
        real = mosaic_bytes(c, geometry)
        roof = max(real / ba.HBM_BPS, c.flops / ba.BF16_FLOPS)
        print(f"  {c.label:<48} {real / 1e6:10.1f} MB  {real / (r['us'] * 1e-6) / 1e9:9.1f} GB/s"
              f"  roofline {100 * roof / (r['us'] * 1e-6):5.1f}%")


def _q_out_bytes(c: ba.Case) -> float:
  """q + out bytes of a sparse-decode case, recovered from its label's shape."""
  f = dict(kv.split("=") for kv in c.label.split()[1:] if "=" in kv)
  b, h, s_q = int(f["b"]), int(f["h"]), int(f["s_q"])
  d = ba.D_QK[c.label.split()[0]]
  return b * s_q * (h * d * 2 + h * ba.D_V * 2)


# ----------------------------------------------------------------------------- sparse prefill


def sparse_prefill_cases(smoke: bool):
  """(case, s_kv) pairs; smoke: one query row block per key width, one or three tiles."""
  if smoke:
    shapes = [(512, 4, 128, 16, 64), (576, 2, 128, 16, 150)]
  else:
    shapes = [(576, 4096, 8192, 128, 2048), (512, 4096, 8192, 128, 2048),
              (512, 4096, 65536, 64, 512)]
  return [(ba.sparse_prefill_case(*s), s) for s in shapes]


def sparse_prefill_main(impls, iters, smoke: bool) -> None:
  print("sparse prefill (bf16 keys): nominal bytes = every selected row of every query")
  pairs = sparse_prefill_cases(smoke)
  rows = ba.run([c for c, _ in pairs], iters or (1 if smoke else 20), 40.0, impls=impls)
  print("\nsparse prefill, DRAM bound with each key row read once (L2 serves the re-reads):")
  for c, (d, s_q, s_kv, h, _) in pairs:
    once = s_kv * d * 2 + s_q * h * (d + ba.D_V) * 2
    for r in rows:
      if r["case"] == c.label and "us" in r:
        roof = max(once / ba.HBM_BPS, c.flops / ba.BF16_FLOPS)
        print(f"  {c.label:<44} {r['impl']:<6} {once / 1e6:9.1f} MB "
              f"{once / (r['us'] * 1e-6) / 1e9:9.1f} GB/s  {c.flops / (r['us'] * 1e-6) / 1e12:7.1f}"
              f" TFLOP/s  roofline {100 * roof / (r['us'] * 1e-6):5.1f}%")


if __name__ == "__main__":
  main()
