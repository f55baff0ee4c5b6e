"""What one new token and one sequence cost at long context: V3.2 vs V4-Flash vs V4-Pro.

For L = 4K, 32K, 128K, 512K and 1M tokens, and for each full-size config
(configs/v32_671b.py, configs/v4_flash.py, configs/v4_pro.py, plus plain dense MLA —
V3.2 without its DSA indexer — as a baseline), prints and writes:

  * KV-cache GiB per sequence (every cache the sequence holds: V4's window ring, CSA and
    HCA entries, the CSA indexer's FP4 keys and the compressor states; V3.2's FP8 token
    cache and its indexer's FP8 keys), and its ratio to V3.2's;
  * GFLOPs per new token, raw and in "equivalent FP8 FLOPs" (FP4 x0.5, bf16 x2, fp32 x4:
    the FP8 peak over each precision's peak), the attention part (core + indexer scores)
    separately, and the ratio to V3.2's.

Formulas, precisions and their sources in the model code: ``model1/cost.py``. The numbers
are arithmetic on the configs (no model is built), so this runs in about a second. The
released formats are the default (``--storage deployed``); ``--storage project`` counts
this project's caches (fp32 indexer keys), ``--storage bf16`` a bf16 KV cache. ``--mtp``
adds the MTP module (cache and one draft forward per token). ``--params`` also prints
parameter counts against DeepSeek's published totals (``--eval_shape`` checks them on
the model's abstract shapes, ~10 s per config, no memory allocated).

Usage:  python benchmarks/long_context_cost.py [--out results/long_context_cost] [--params]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
  sys.path.insert(0, str(ROOT))

from model1 import config as mconfig  # noqa: E402
from model1 import cost  # noqa: E402

LENGTHS = (4096, 32768, 131072, 524288, 1048576)
CONFIGS = ("v32_671b", "v4_flash", "v4_pro")
LABELS = {"v32_671b": "DeepSeek-V3.2 (DSA)", "v4_flash": "DeepSeek-V4-Flash",
          "v4_pro": "DeepSeek-V4-Pro", "mla_dense": "MLA dense (V3.2 w/o DSA)"}
STORAGES = {"deployed": cost.DEPLOYED, "project": cost.PROJECT,
            "bf16": dataclasses.replace(cost.DEPLOYED, kv="bf16", indexer="bf16")}


def load_config_module(name: str):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def models() -> dict:
  """name -> (ModelConfig, published totals or None); the dense-MLA baseline last."""
  out = {}
  for name in CONFIGS:
    mod = load_config_module(name)
    out[name] = (mconfig.model_config_from_dict(mod.get_config().model), mod.PUBLISHED)
  out["mla_dense"] = (mconfig.dense_attention(out["v32_671b"][0]), None)
  return out


def fmt_len(L: int) -> str:
  return f"{L >> 20}M" if L >= 1 << 20 else f"{L >> 10}K"


def table(ms: dict, lengths, storage, mtp: bool) -> list[dict]:
  rows = []
  for L in lengths:
    base = cost.summary(ms["v32_671b"][0], L, storage, mtp)
    for name, (cfg, _) in ms.items():
      s = cost.summary(cfg, L, storage, mtp)
      rows.append(dict(model=name, label=LABELS[name], L=L, kv_gib=s["kv_gib"],
                       kv_vs_v32=s["kv_bytes"] / base["kv_bytes"], gflops=s["gflops"],
                       gflops_fp8eq=s["gflops_fp8eq"], gflops_attention=s["gflops_attention"],
                       flops_vs_v32=s["gflops"] / base["gflops"],
                       fp8eq_vs_v32=s["gflops_fp8eq"] / base["gflops_fp8eq"],
                       kv_by_part_gib={k: v / cost.GIB for k, v in s["kv_by_part"].items()},
                       gflops_by_term={k: v / 1e9 for k, v in s["flops_by_term"].items()},
                       gflops_by_precision={k: v / 1e9
                                            for k, v in s["flops_by_precision"].items()}))
  return rows


def table_md(rows: list[dict], lengths=None) -> str:
  head = ("| L | model | KV GiB / seq | KV vs V3.2 | GFLOPs / token | FP8-eq GFLOPs | "
          "FP8-eq vs V3.2 | attention GFLOPs |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
  body = "".join(
      f"| {fmt_len(r['L'])} | {r['label']} | {r['kv_gib']:.3f} | {r['kv_vs_v32']:.3f} | "
      f"{r['gflops']:.1f} | {r['gflops_fp8eq']:.1f} | {r['fp8eq_vs_v32']:.3f} | "
      f"{r['gflops_attention']:.1f} |\n"
      for r in rows if lengths is None or r["L"] in lengths)
  return head + body


def params(ms: dict, check_shapes: bool) -> list[dict]:
  out = []
  for name, (cfg, pub) in ms.items():
    if pub is None:
      continue
    p = cost.param_counts(cfg)
    row = dict(model=name, label=LABELS[name], **p, published_total=pub["total"],
               published_activated=pub["activated"],
               total_err=p["total"] / pub["total"] - 1,
               activated_err=p["activated_no_embed"] / pub["activated"] - 1)
    if check_shapes:
      row["eval_shape_total_with_mtp"] = eval_shape_params(cfg)
    out.append(row)
  return out


def eval_shape_params(cfg) -> int:
  """Parameter count of the model's abstract shapes (``nnx.eval_shape``: no memory)."""
  import jax
  from flax import nnx

  from model1.model import Transformer
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def params_md(rows: list[dict]) -> str:
  head = ("| model | total (B) | published | diff | with MTP (B) | activated (B) | "
          "published | diff | activated incl. embedding (B) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
  return head + "".join(
      f"| {r['label']} | {r['total'] / 1e9:.2f} | {r['published_total'] / 1e9:g} | "
      f"{100 * r['total_err']:+.2f}% | {r['total_with_mtp'] / 1e9:.2f} | "
      f"{r['activated_no_embed'] / 1e9:.2f} | {r['published_activated'] / 1e9:g} | "
      f"{100 * r['activated_err']:+.2f}% | {r['activated'] / 1e9:.2f} |\n" for r in rows)


# DeepSeek-V4 report (sec. 2.3.4 and the model cards): at 1M tokens, relative to V3.2
CLAIMED_1M = {"v4_flash": dict(flops=0.10, kv=0.07), "v4_pro": dict(flops=0.27, kv=0.10)}
GQA8_BF16_BYTES = 2 * 8 * 128 * 2   # K and V, 8 KV heads of 128, bf16: per token per layer


def notes_md(ms: dict, rows: list[dict]) -> str:
  """DeepSeek's stated 1M-token ratios against ours, and the BF16 GQA-8 comparison."""
  L = max(r["L"] for r in rows)
  out = [f"\n## Against DeepSeek's statements (L = {fmt_len(L)})\n",
         "| model | FP8-eq FLOPs vs V3.2 (ours / stated) | KV vs V3.2 (ours / stated) | "
         "KV vs BF16 GQA-8 of the same depth (stated: ~2%) |", "|---|---|---|---|"]
  for name, claim in CLAIMED_1M.items():
    r = next(r for r in rows if r["model"] == name and r["L"] == L)
    gqa = ms[name][0].n_layers * L * GQA8_BF16_BYTES
    out.append(f"| {LABELS[name]} | {r['fp8eq_vs_v32']:.3f} / {claim['flops']:.2f} | "
               f"{r['kv_vs_v32']:.3f} / {claim['kv']:.2f} | "
               f"{r['kv_gib'] * cost.GIB / gqa:.3f} |")
  return "\n".join(out) + "\n"


NOTES = """
## Notes

* KV GiB is everything one sequence holds with the released storage formats: FP8 key
  vectors in FlashMLA's layouts (V3.2 656 B, V4 584 B), V3.2's FP8 indexer keys (132 B per
  token), V4's FP4 indexer keys (68 B per CSA entry), V4's window ring (128 slots per
  layer) and compressor states (fp32). Token caches are counted in whole 64-token page
  blocks; FlashMLA's 576-byte alignment of V4 page blocks (+0.17%) is not counted.
* FP8-equivalent FLOPs weight each term by (FP8 peak / its precision's peak): FP4 x FP4
  (V4 indexer) 0.5, FP4 x FP8 (V4 routed experts) and FP8 1, bf16 (attention core over the
  dequantised cache, V4 `wo_a`, LM head) 2, fp32 (V4 compressors, mHC, router) 4 — the
  DeepSeek-V4 report's stated convention ("measured in equivalent FP8 FLOPs"; FP4 x FP8
  runs at the FP8 rate on current hardware). Raw FLOPs are in the table too.
* The MTP module is not counted (no speculative decoding); `--mtp` adds it.
* DeepSeek-V3.2 was released with a 160K context; its rows beyond that extrapolate the
  same formulas (as DeepSeek's own 1M comparison does).
* Parameters: `total` excludes the MTP module, `activated` excludes the input embedding
  (a lookup, not a matmul) and includes the LM head. DeepSeek publishes two significant
  figures; every exact count here rounds to exactly the published figure (V4-Pro's 1.6T
  also matches its count with the MTP module, 1598.8B).
"""


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["model"] for r in rows):
    rs = [r for r in rows if r["model"] == name]
    style = "--" if name == "mla_dense" else "-"
    Ls = [r["L"] for r in rs]
    axes[0].plot(Ls, [r["kv_gib"] for r in rs], style, marker="o", label=rs[0]["label"])
    axes[1].plot(Ls, [r["gflops_fp8eq"] for r in rs], style, marker="o", label=rs[0]["label"])
  for ax, title in zip(axes, ("KV cache per sequence (GiB)",
                              "FLOPs per new token (GFLOP, FP8-equivalent)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(ROOT / "results" / "long_context_cost"),
                 help="folder for results.md, results.json and plot.png ('' = print only)")
  p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                 help="comma-separated context lengths in tokens")
  p.add_argument("--storage", default="deployed", choices=sorted(STORAGES),
                 help="cache formats: DeepSeek's (deployed), this project's, or bf16")
  p.add_argument("--mtp", action="store_true", help="include the MTP module")
  p.add_argument("--params", action="store_true", help="print parameter counts")
  p.add_argument("--eval_shape", action="store_true",
                 help="with --params: check the counts with nnx.eval_shape (~10 s each)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  a = p.parse_args(argv)
  try:
    try:
      lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"--lengths={a.lengths!r}; expected comma-separated positive ints")
    if not lengths or min(lengths) < 1:
      raise ValueError(f"--lengths={a.lengths!r}; expected comma-separated positive ints")
    ms = models()
    rows = table(ms, lengths, STORAGES[a.storage], a.mtp)
    print(f"storage={a.storage} mtp={a.mtp}; ratios are to DeepSeek-V3.2 (DSA)")
    print(table_md(rows))
    print(notes_md(ms, rows))
    prow = params(ms, a.eval_shape) if (a.params or a.out) else []
    if a.params:
      print(params_md(prow))
      for r in prow:
        if "eval_shape_total_with_mtp" in r:
          ok = r["eval_shape_total_with_mtp"] == r["total_with_mtp"]
          print(f"{r['label']}: nnx.eval_shape {r['eval_shape_total_with_mtp']:,} params "
                f"({'matches' if ok else 'DIFFERS FROM'} the config count)")
    if a.out:
      out = Path(a.out)
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(
          dict(storage=a.storage, mtp=a.mtp, lengths=lengths, rows=rows, params=prow,
               eq_fp8_weights=cost.EQ_FP8), indent=1))
      (out / "results.md").write_text(
          f"# Long-context cost: KV cache per sequence and FLOPs per new token\n\n"
          f"Written by `python benchmarks/long_context_cost.py` (storage={a.storage}, "
          f"mtp={a.mtp}). Formulas: `model1/cost.py`. Ratios are to DeepSeek-V3.2.\n\n"
          + table_md(rows) + notes_md(ms, rows) + "\n## Parameters\n\n"
          + params_md(prow) + NOTES)
      plot(rows, out / "plot.png")
      print(f"wrote {out}/results.md, results.json, plot.png")
    return 0
  except (ValueError, OSError) as e:
    if a.debug:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
