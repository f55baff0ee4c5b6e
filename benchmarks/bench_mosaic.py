"""Sparse decode, dense decode and sparse prefill benchmarks with the Mosaic GPU (Hopper)
kernels beside the XLA and Triton paths.

What: ``bench_attention``'s sparse-decode cases (FlashMLA's V32 shape b=128, h=128, s_q=2,
top-k 2048, and the MODEL1 window + compressed shapes) and dense-decode cases (FP8 v32 and
model1, bf16-576; batch 64 and 128, context 8K and 32K, 64 and 128 heads, s_q 1, pages of
64), timed for ``impl`` = "xla", "pallas" (Triton) and "mosaic"
(``pallas_kernels/mosaic_sparse_decode.py``, ``mosaic_dense_decode.py``).  For each it
prints time, TFLOP/s, GB/s and the fraction of the H200 roofline, as ``bench_attention``
does (nominal bytes: q + attended tokens x bytes/token + out), plus, for the Mosaic kernel,
the bytes it really moves from DRAM: each token's TMA copies fetch its FP8 NoPE + RoPE and
a 128-byte scale window (its 16 / 7 scale bytes plus the following tokens'), i.e.
656 -> ~752 B (v32) and 584 -> ~696 B (model1) per token; a second 64-head block of the
same query row re-reads the same tokens, mostly from L2, so it is not counted twice.
Dense decode's byte model (``dense_real_bytes``): per sequence, every page tile is a
64-row TMA box (a page of Y tokens is ceil(Y / 64) boxes, so pages that are not a multiple
of 64 over-read), plus, for FP8, the tile's scale box (v32 1 KB; model1 512 B, 64 of them
the next tile's); the second 64-head block and the other s_q rows of a sequence re-read its
pages from L2 (their CTAs are grid neighbours), not counted.  At pages of 64 that is
656 -> 656 B (v32) and 584 -> 585 B (model1) per token.

Sparse prefill (``pallas_kernels/mosaic_sparse_prefill.py``; section below ``main``):
FlashMLA's prefill shape (s_q 4096, s_kv 8192, h 128, top-k 2048, d_qk 576 and 512) and a
MODEL1 compressed-attention shape (h 64, top-k 512, s_kv 65536), same columns.  The kernel
reads exactly the selected bf16 rows (d_qk x 2 B per token, no over-fetch), so the nominal
byte model is what its gathers move, from DRAM or L2; it also prints the DRAM bound when
every key row is read from DRAM once (s_kv x d_qk x 2 + q + out), the byte count to use
when the keys fit in the 50 MB L2 (s_kv 8192: 9.4 MB).

On CPU (default there) it runs tiny cases in GPU interpret mode as a smoke test: the
times then measure the interpreter.  Targets (issue "Hopper-native FP8 MLA kernels"): FP8
sparse decode >= 330 TFLOP/s at the V32 shape; FP8 dense decode >= 3.4 TB/s at batch >= 64,
context >= 8K; faster than XLA and Triton everywhere.

Usage:  python benchmarks/bench_mosaic.py [--smoke]
          [--only sparse_decode,dense_decode,sparse_prefill] [--impls xla,pallas,mosaic]
          [--iters 20]
"""
from __future__ import annotations

import argparse
import os
import sys

# The CPU smoke run is GPU interpret mode, which blocks one XLA computation per warpgroup
# thread in barrier waits: several host devices keep a 2-core machine's thread pool from
# deadlocking (the flag only concerns the CPU platform).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402  (sibling script; puts the repo root on the path)

OPS = ("sparse_decode", "dense_decode", "sparse_prefill")
# DRAM bytes per token the Mosaic kernel's gathers move (see the module docstring).
MOSAIC_BYTES_PER_TOKEN = {"v32": 656 + 96, "model1": 584 + 112}


def mosaic_bytes(case: ba.Case, geometry: str) -> float:
  """Nominal bytes with the cache part rescaled to what the Mosaic gathers fetch."""
  bpt = ba.pk.bytes_per_token(geometry)
  # Nominal = rows * (q + attended * bpt + out); only the attended part changes.
  return case.bytes * 1.0 + (case.bytes_cache / bpt) * (MOSAIC_BYTES_PER_TOKEN[geometry] - bpt)


def dense_real_bytes(fmt: str, b: int, s_k: int, h_q: int, s_q: int, block_size: int) -> float:
  """DRAM bytes of the Mosaic dense kernel (see the module docstring)."""
  geometry = "v32" if fmt in ("v32", "bf16") else "model1"
  d = ba.D_QK[geometry]
  pages, rem = divmod(s_k, block_size)
  tiles = pages * -(-block_size // 64) + -(-rem // 64)
  if fmt == "bf16":
    cache = tiles * 64 * d * 2
  else:
    per_row = {"v32": 512 + 128, "model1": 448 + 128}[fmt]
    # Scales per tile: v32 one 1 KB box; model1 one 512-byte box (448 + 64 of the next
    # tile) for pages of a multiple of 32 tokens, else 64 overlapping 128-byte windows.
    if fmt == "v32":
      scales = 64 * 16
    else:
      scales = 512 if block_size % 32 == 0 else 64 * 7 + 128
    cache = tiles * (64 * per_row + scales)
  return b * (s_q * h_q * d * 2 + cache + s_q * h_q * ba.D_V * 2)


def cases(smoke: bool, only=("sparse_decode", "dense_decode")):
  """(case, DRAM bytes the Mosaic kernel really moves) pairs."""
  out = []
  if "sparse_decode" in only:
    if smoke:
      sp = [("v32", ba.sparse_decode_case("v32", 1, 16, 2, 100, 256, block_size=16)),
            ("model1", ba.sparse_decode_case("model1", 1, 16, 1, 64, 256, extra_topk=64,
                                             extra_s_k=64, block_size=16, sink=True))]
    else:
      sp = [("v32", ba.sparse_decode_case("v32", 128, 128, 2, 2048, s_k)) for s_k in (8192, 32768)]
      sp += [("model1", ba.sparse_decode_case("model1", 128, h, 2, 128, 16384, extra_topk=e,
                                              extra_s_k=16384 // 4, sink=True))
             for h in (64, 128) for e in (512, 1024)]
    for geometry, c in sp:
      # attended tokens x bytes/token over all rows: the part of the byte model that is cache.
      c.bytes_cache = c.bytes - _q_out_bytes(c)
      out.append((c, mosaic_bytes(c, geometry)))
  if "dense_decode" in only:
    if smoke:
      shapes = [(f, 1, 100, 16, 1) for f in ("v32", "model1", "bf16")]
    else:
      shapes = [(f, b, s_k, h, 1) for f in ("v32", "model1") for b in (64, 128)
                for s_k in (8192, 32768) for h in (64, 128)]
      shapes += [("bf16", 64, 8192, h, 1) for h in (64, 128)]
    for f, b, s_k, h, s_q in shapes:
      out.append((ba.dense_decode_case(f, b, s_k, h_q=h, s_q=s_q),
                  dense_real_bytes(f, b, s_k, h, s_q, 64)))
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes (default on CPU)")
  p.add_argument("--only", default=",".join(OPS), help="comma-separated ops")
  p.add_argument("--impls", default="xla,pallas,mosaic", help="comma-separated impls")
  p.add_argument("--iters", type=int, default=None, help="calls per timing run")
  a = p.parse_args(argv)
  smoke = a.smoke or jax.default_backend() == "cpu"
  only = tuple(a.only.split(","))
  bad = set(only) - set(OPS)
  if bad:
    p.error(f"--only {a.only!r}: expected ops from {','.join(OPS)}")
  if "sparse_prefill" in only:
    sparse_prefill_main(tuple(a.impls.split(",")), a.iters, smoke)
  only = tuple(o for o in only if o != "sparse_prefill")
  if not only:
    return
  case_bytes = cases(smoke, only)
  rows = ba.run([c for c, _ in case_bytes], a.iters or (1 if smoke else 20), 40.0,
                impls=tuple(a.impls.split(",")))
  print("\nMosaic kernels, bytes they really read (scale windows, whole 64-row boxes):")
  for c, real in case_bytes:
    for r in rows:
      if r["op"] == c.op and r["case"] == c.label and r["impl"] == "mosaic" and "us" in r:
        roof = max(real / ba.HBM_BPS, c.flops / ba.BF16_FLOPS)
        print(f"  {c.op:<13} {c.label:<44} {real / 1e6:10.1f} MB  {real / (r['us'] * 1e-6) / 1e9:9.1f} GB/s"
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
