"""Attention kernel benchmark: the Pallas (Triton) kernels against the XLA references.

What: FlashMLA's benchmark shapes and a dense-decode sweep, timed for each
implementation (``impl="xla"`` plain-jnp reference, ``impl="pallas"`` kernel):
  sparse decode, V32:    b=128, h_q=128, s_q=2, top-k 2048, s_k 8192..32768 per sequence,
                         FP8 656 B/token (FlashMLA's "FP8 sparse decode 410 TFLOP/s" shape);
  sparse decode, MODEL1: b=128, h_q 64 and 128, s_q=2, window top-k 128 + extra (compressed)
                         top-k 512 / 1024, s_k 16384, FP8 584 B/token, attention sink;
  sparse prefill:        s_q=4096, s_kv=8192, h_q=128, top-k 2048, d_qk 576 and 512;
  dense decode sweep:    batch 1/32/128 x context 4096/16384 x h_q 16/128, V32 and
                         MODEL1 FP8 and bf16-576 caches, s_q=1, page block 64.
For each it prints time, TFLOP/s, GB/s, the fraction of the H200 roofline and the speed-up
over the XLA reference, with
  FLOPs = 2 * h_q * attended * (d_qk + d_v)   per query row,
  bytes = q + attended tokens * bytes/token + out,
  roofline time = max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s)  (H200: measured HBM copy and
  bf16 matmul rates), fraction = roofline time / measured time.
Dense decode reads each sequence's keys once for all its heads and queries; sparse decode
and prefill count every selected token of every query row (as FlashMLA does).

On CPU (``--smoke``, automatic when the default backend is CPU) it runs small shapes as a
smoke test (the kernels in interpret mode; well under a minute): the numbers then measure
the interpreter, and the roofline column still refers to the H200.

Usage:  python benchmarks/bench_attention.py [--smoke | --full] [--dry_run]
          [--only sparse_decode,dense_decode] [--iters 20] [--xla_max_gib 40] [--out results.md]
Imports only pallas_kernels, jax, numpy and the standard library.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

try:
  import pallas_kernels as pk
except ImportError:  # run as a script from a checkout: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import pallas_kernels as pk
from pallas_kernels.dense_decode import DenseDecodeTuning

HBM_BPS = 4.3e12                 # H200, measured HBM copy
BF16_FLOPS = 790e12              # H200, measured dense bf16 matmul
D_QK = {"v32": 576, "model1": 512}
D_V = 512
GIB = 1 << 30


@dataclasses.dataclass
class Case:
  op: str                        # sparse_decode | dense_decode | sparse_prefill
  label: str
  make: Callable                 # () -> (fn(impl) -> jitted callable, args)
  flops: float
  bytes: float
  xla_bytes: float               # rough working set of the XLA reference (it dequantises)


# ----------------------------------------------------------------------------- inputs


def random_cache(key, num_blocks: int, block_size: int, fmt: str, d: int) -> pk.KCache:
  """A KCache of random codes/scales built directly on device (quantising a bf16 cache of
  benchmark size would cost more than the benchmark)."""
  k1, k2, k3 = jax.random.split(key, 3)
  zy = (num_blocks, block_size)
  rope = jax.random.normal(k1, (*zy, 64), jnp.bfloat16)
  if fmt == "bf16":
    return pk.KCache(jax.random.normal(k2, (*zy, d - 64), jnp.bfloat16), rope, None, "bf16")
  g = pk.GEOMETRY[fmt]
  codes = (jax.random.normal(k2, (*zy, g.d_nope), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
  exps = jax.random.randint(k3, (*zy, g.n_tiles), -9, -5)        # scales 2^-9 .. 2^-6
  scales = (jnp.exp2(exps.astype(jnp.float32)) if fmt == "v32"
            else (127 + exps).astype(jnp.uint8))
  return pk.KCache(codes, rope, scales, fmt)


def _q(key, shape):
  return jax.random.normal(key, shape, jnp.bfloat16)


def _per_seq_indices(key, b, s_q, topk, s_k):
  """Top-k slots of sequence i drawn from its own s_k tokens (slots i*s_k ...)."""
  base = (jnp.arange(b, dtype=jnp.int32) * s_k)[:, None, None]
  return base + jax.random.randint(key, (b, s_q, topk), 0, s_k, jnp.int32)


# ----------------------------------------------------------------------------- cases


def sparse_decode_case(geometry, b, h_q, s_q, topk, s_k, extra_topk=None, extra_s_k=None,
                       block_size=64, sink=False, tuning=None) -> Case:
  d, bpt = D_QK[geometry], pk.bytes_per_token(geometry)
  attended = topk + (extra_topk or 0)
  label = (f"{geometry} b={b} h={h_q} s_q={s_q} topk={topk}"
           + (f"+{extra_topk}" if extra_topk else "") + f" s_k={s_k}")

  def make():
    ks = jax.random.split(jax.random.key(0), 7)
    cache = random_cache(ks[0], b * s_k // block_size, block_size, geometry, d)
    kw = dict(indices=_per_seq_indices(ks[1], b, s_q, topk, s_k), q=_q(ks[2], (b, s_q, h_q, d)))
    if extra_topk:
      kw.update(extra=random_cache(ks[3], b * extra_s_k // block_size, block_size, geometry, d),
                extra_idx=_per_seq_indices(ks[4], b, s_q, extra_topk, extra_s_k))
    if sink:
      kw["sink"] = jax.random.normal(ks[5], (h_q,), jnp.float32)

    def fn(impl):
      def f(q, cache, indices, extra=None, extra_idx=None, sink=None):
        return pk.sparse_decode(q, cache, indices, head_dim_v=D_V, attn_sink=sink,
                                extra_k_cache=extra, extra_indices_in_kvcache=extra_idx,
                                impl=impl, **({"tuning": tuning} if impl == "pallas" else {}))
      return jax.jit(f)
    return fn, ((), dict(cache=cache, **kw))

  rows = b * s_q
  return Case("sparse_decode", label, make, flops=2.0 * h_q * attended * (d + D_V) * rows,
              bytes=rows * (h_q * d * 2 + attended * bpt + h_q * D_V * 2),
              xla_bytes=rows * attended * d * 4 * 2 + rows * h_q * attended * 4 * 3)


def dense_decode_case(fmt, b, s_k, h_q=128, s_q=1, block_size=64, tuning=None) -> Case:
  geometry = "v32" if fmt in ("v32", "bf16") else "model1"
  d = D_QK[geometry]
  bpt = pk.bytes_per_token(fmt, d)
  label = f"{fmt}-{d} b={b} h={h_q} s_q={s_q} s_k={s_k}"
  pages = -(-s_k // block_size)

  def make():
    ks = jax.random.split(jax.random.key(1), 3)
    cache = random_cache(ks[0], b * pages, block_size, fmt, d)
    table = jax.random.permutation(ks[1], b * pages).astype(jnp.int32).reshape(b, pages)
    seqlens = jnp.full((b,), s_k, jnp.int32)
    q = _q(ks[2], (b, s_q, h_q, d))

    def fn(impl):
      return jax.jit(lambda q, c, t, s: pk.dense_decode(
          q, c, t, s, head_dim_v=D_V, causal=s_q > 1, impl=impl,
          **({"tuning": tuning} if impl == "pallas" else {})))
    return fn, ((q, cache, table, seqlens), {})

  return Case("dense_decode", label, make, flops=2.0 * h_q * s_q * s_k * (d + D_V) * b,
              bytes=b * (s_q * h_q * d * 2 + s_k * bpt + s_q * h_q * D_V * 2),
              xla_bytes=b * s_k * d * 4 * 2 + b * s_q * h_q * s_k * 4 * 3)


def sparse_prefill_case(d, s_q, s_kv, h_q, topk, tuning=None) -> Case:
  label = f"d_qk={d} s_q={s_q} s_kv={s_kv} h={h_q} topk={topk}"

  def make():
    ks = jax.random.split(jax.random.key(2), 3)
    kv = jax.random.normal(ks[0], (s_kv, 1, d), jnp.bfloat16)
    idx = jax.random.randint(ks[1], (s_q, 1, topk), 0, s_kv, jnp.int32)
    q = _q(ks[2], (s_q, h_q, d))

    def fn(impl):
      return jax.jit(lambda q, kv, i: pk.sparse_prefill(
          q, kv, i, sm_scale=d ** -0.5, d_v=D_V, impl=impl,
          **({"tuning": tuning} if impl == "pallas" else {})))
    return fn, ((q, kv, idx), {})

  return Case("sparse_prefill", label, make, flops=2.0 * h_q * topk * (d + D_V) * s_q,
              bytes=s_q * (h_q * d * 2 + topk * d * 2 + h_q * D_V * 2),
              xla_bytes=s_q * topk * d * 4 * 2 + s_q * h_q * topk * 4 * 3)


def full_cases() -> list[Case]:
  cases = [sparse_decode_case("v32", 128, 128, 2, 2048, s_k) for s_k in (8192, 32768)]
  cases += [sparse_decode_case("model1", 128, h, 2, 128, 16384, extra_topk=e,
                               extra_s_k=16384 // 4, sink=True)
            for h in (64, 128) for e in (512, 1024)]
  cases += [sparse_prefill_case(d, 4096, 8192, 128, 2048) for d in (576, 512)]
  # h_q 16 (DeepSeek-V3 heads over 8-way tensor parallelism) is memory-bound, 128 is not.
  cases += [dense_decode_case(fmt, b, s_k, h_q=h) for fmt in ("v32", "model1", "bf16")
            for h in (16, 128) for b in (1, 32, 128) for s_k in (4096, 16384)]
  return cases


def smoke_cases() -> list[Case]:
  """Small shapes for CPU: every kernel and path once (block_k 32 keeps interpretation
  cheap; num_splits 2 exercises the combine)."""
  dt = DenseDecodeTuning(block_k=32, num_splits=2)
  return [
      sparse_decode_case("v32", 2, 16, 2, 64, 256, block_size=16),
      sparse_decode_case("model1", 2, 16, 1, 64, 256, extra_topk=64, extra_s_k=64,
                         block_size=16, sink=True),
      sparse_prefill_case(512, 4, 128, 16, 64),
  ] + [dense_decode_case(fmt, b, s_k, h_q=16, block_size=16, tuning=dt)
       for fmt, b, s_k in (("model1", 1, 64), ("model1", 2, 128), ("v32", 2, 128))]


# ----------------------------------------------------------------------------- timing


def time_call(f, args, kwargs, iters: int) -> float:
  """Seconds per call: compile + warm up once, then ``iters`` calls dispatched back to back
  (asynchronous dispatch keeps the device busy) and one wait; median of 3 such runs."""
  jax.block_until_ready(f(*args, **kwargs))
  runs = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args, **kwargs)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / iters)
  return statistics.median(runs)


def run(cases: list[Case], iters: int, xla_max_gib: float, impls=("xla", "pallas")):
  rows = []
  for case in cases:
    fn, (args, kwargs) = case.make()
    xla_t = None
    for impl in impls:
      row = dict(op=case.op, case=case.label, impl=impl)
      if impl == "xla" and case.xla_bytes > xla_max_gib * GIB:
        rows.append({**row, "note": f"skipped (~{case.xla_bytes / GIB:.0f} GiB working set)"})
        print(format_row(rows[-1]), flush=True)
        continue
      try:
        t = time_call(fn(impl), args, kwargs, iters)
      except Exception as e:  # noqa: BLE001 -- report and go on (e.g. out of memory)
        rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:80]}"})
        print(format_row(rows[-1]), flush=True)
        continue
      roof = max(case.bytes / HBM_BPS, case.flops / BF16_FLOPS)
      if impl == "xla":
        xla_t = t
      rows.append({**row, "us": t * 1e6, "tflops": case.flops / t / 1e12,
                   "gbps": case.bytes / t / 1e9, "roofline": roof / t,
                   "speedup": (xla_t / t) if (xla_t and impl != "xla") else None, "note": ""})
      print(format_row(rows[-1]), flush=True)
    del args, kwargs
  return rows


COLUMNS = ("op", "case", "impl", "time (us)", "TFLOP/s", "GB/s", "H200 roofline", "vs xla", "note")


def _cells(r):
  if "us" not in r:
    return [r["op"], r["case"], r["impl"], "", "", "", "", "", r.get("note", "")]
  return [r["op"], r["case"], r["impl"], f"{r['us']:.1f}", f"{r['tflops']:.2f}",
          f"{r['gbps']:.1f}", f"{100 * r['roofline']:.1f}%",
          f"{r['speedup']:.2f}x" if r["speedup"] else "", r["note"]]


def format_row(r) -> str:
  c = _cells(r) if isinstance(r, dict) else list(r)
  return (f"{c[0]:<14} {c[1]:<48} {c[2]:<6} {c[3]:>11} {c[4]:>8} {c[5]:>9} {c[6]:>8} "
          f"{c[7]:>7} {c[8]}")


def markdown(rows, header: str) -> str:
  lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="small shapes (default when the backend is CPU)")
  p.add_argument("--full", action="store_true", help="FlashMLA shapes even on CPU")
  p.add_argument("--only", default="", help="comma-separated ops to run "
                 "(sparse_decode, dense_decode, sparse_prefill)")
  p.add_argument("--impls", default="", help="comma-separated impls (default: xla,pallas, "
                 "plus mosaic on a GPU)")
  p.add_argument("--iters", type=int, default=None, help="calls per timing run")
  p.add_argument("--xla_max_gib", type=float, default=40.0,
                 help="skip the XLA reference when its working set exceeds this")
  p.add_argument("--out", default="", help="also append the table (dated) to this markdown file")
  p.add_argument("--dry_run", action="store_true",
                 help="list the cases with FLOPs, bytes and roofline time; run nothing")
  a = p.parse_args(argv)
  backend = jax.default_backend()
  smoke = a.smoke or (backend == "cpu" and not a.full)
  cases = smoke_cases() if smoke else full_cases()
  if a.only:
    keep = set(a.only.split(","))
    cases = [c for c in cases if c.op in keep]
  iters = a.iters or (2 if smoke else 20)
  if a.dry_run:
    for c in cases:
      roof = max(c.bytes / HBM_BPS, c.flops / BF16_FLOPS)
      print(f"{c.op:<14} {c.label:<48} {c.flops / 1e9:10.1f} GFLOP {c.bytes / 1e6:10.1f} MB "
            f"roofline {roof * 1e6:9.1f} us ({'compute' if c.flops / BF16_FLOPS > c.bytes / HBM_BPS else 'memory'}"
            f"-bound), XLA working set ~{c.xla_bytes / GIB:.1f} GiB")
    return
  header = (f"# Attention kernels: {'smoke (small shapes)' if smoke else 'FlashMLA shapes'} on "
            f"{backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}\n\n"
            "Roofline: H200, 4.3 TB/s HBM and 790 TFLOP/s bf16; fraction = "
            "max(bytes/BW, FLOPs/peak) / time."
            + (" Interpret mode on CPU: times measure the interpreter." if backend == "cpu" else ""))
  print(header.replace("# ", "", 1))
  print(format_row(COLUMNS))
  impls = a.impls or ("xla,pallas,mosaic" if backend == "gpu" else "xla,pallas")
  rows = run(cases, iters, a.xla_max_gib, impls=tuple(impls.split(",")))
  if a.out:  # appended, dated: RESULTS.md keeps every device's figures
    import datetime
    with open(a.out, "a") as f:
      f.write(f"\n## {datetime.date.today().isoformat()}\n\n" + markdown(rows, header)
              .replace("# ", "### ", 1))
    print(f"appended to {a.out}")


if __name__ == "__main__":
  main()
