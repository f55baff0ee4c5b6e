"""Import DeepSeek checkpoints (V4-Flash, V3.2) into model1 runs, export them back, and
print per-component activations for parity checks.

  python -m model1.convert --from=DIR --to=WORKDIR [--layers=0-3] [--dtype=bfloat16]
  python -m model1.convert --export --from=WORKDIR --to=DIR [--format=fp8|bf16] [--names=hf]
  python -m model1.convert --check --from=WORKDIR [--tokens=1,2,3] [--layers=1-1] [--inputs=h.npy]

Import reads DIR/config.json (``hub.config_from_deepseek``: every field model1 cannot
express is named in the error) and the safetensors shards through
``model.safetensors.index.json``, opening only the shards that hold the requested layers
(plus the embedding, head, final norm and mHC head). FP8 e4m3 weights with block-128 scales
and FP4 e2m1 experts are dequantised as DeepSeek's reference does (``model1.quant``). The
result is a run directory like ``train.py``'s: ``checkpoints/0`` (Orbax: parameters, a
fresh optimizer state, rng), ``provenance.json`` (the run config) and ``convert.json`` (the
source and slice), so ``evals.load_trained``, ``eval.py`` and ``generate()`` use it like any
trained run. The run is written to a temporary directory and renamed into place, so a
failure leaves nothing half-written.

A slice ``--layers=a-b`` becomes a model of b-a+1 layers (layer a is its layer 0: hash
routing, compression ratios and dense/MoE choice follow the original layer ids); MTP is
kept only when the whole model is imported.

Export writes DeepSeek's names (inference names, or the Hugging Face names of V3.2 with
``--names=hf``) in ``--format=fp8`` (the checkpoint's own formats: FP8 block-128 linears
with power-of-two scales, FP4 routed experts for V4) or ``bf16``; a slice keeps its original
layer ids. Power-of-two scales make import -> export -> import bit-identical.

``--check`` runs the imported layers (one jitted forward) on ``--tokens`` (or on hidden
states ``--inputs=h.npy`` entering the first ``--layers`` layer) and prints, per component
(embedding, each layer's attention input/output, FFN input/output, streams, final norm,
logits), the shape, mean, std, max|x| and the first values, to set beside DeepSeek's
``inference/model.py`` on the same weights.

Errors (bad config field, missing shard or tensor, unknown tensor name, shape mismatch) are
one ``error: ...`` line naming the file, tensor and expectation; ``--debug`` shows the
traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from model1 import hub, quant

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_layers(spec: str | None) -> tuple[int, int] | None:
  if not spec:
    return None
  try:
    a, _, b = spec.partition("-")
    first, last = int(a), int(b or a)
  except ValueError:
    raise ValueError(f"--layers={spec!r}; expected FIRST-LAST (e.g. 0-3) or one layer id") from None
  if first < 0 or last < first:
    raise ValueError(f"--layers={spec!r}; expected 0 <= FIRST <= LAST")
  return first, last


def _abstract_run(mcfg, run_cfg):
  """(model, optimizer) built abstractly and filled with host zeros (no initialisers)."""
  from model1 import optim, trainer
  from model1.model import Transformer
  tx = optim.make_optimizer(trainer.optim_config(run_cfg.train))

  def build():
    m = Transformer(mcfg, nnx.Rngs(0))
    return m, nnx.Optimizer(m, tx, wrt=nnx.Param)
  model, opt = nnx.eval_shape(build)
  for obj in (model, opt):
    nnx.update(obj, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.state(obj)))
  return model, opt


def _set_path(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree[k if k in tree else int(k)]
  key = path[-1] if path[-1] in tree else int(path[-1])
  tree[key] = value


def _get_path(tree: dict, path: tuple):
  for k in path:
    tree = tree[k if k in tree else int(k)]
  return tree


def _pure(model) -> dict:
  """The model's state with DeepSeek's per-layer names (stacked slots unstacked)."""
  return model.per_layer_state()


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def load_params(reader: hub.ShardReader, model, src: hub.Source) -> dict:
  """Every variable of ``model`` from the checkpoint (float32 / int32 numpy), checked
  against model1's shapes; also rejects tensors of the imported layers it cannot place."""
  state = _pure(model)
  plan = hub.tensor_plan(_str_keys(state), src)
  used = set()
  for e in plan:
    want = tuple(_get_path(state, e.path).shape)
    arrays = []
    for name in e.names:
      x = reader.weight(name)
      exp = hub.ds_shapes(e.kind, want)
      if tuple(x.shape) != exp:
        raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(x.shape)}; "
                         f"expected {exp} for model1 {'/'.join(e.path)} {want}")
      arrays.append(x)
      used.update((name, hub.scale_name(name) if name.endswith(".weight") else name))
    dt = np.int32 if e.fmt == "i32" else np.float32
    _set_path(state, e.path, hub.to_model1(e.kind, arrays, want).astype(dt))
  _check_unknown(reader, used, src)
  return state


def _check_unknown(reader: hub.ShardReader, used: set, src: hub.Source) -> None:
  """A tensor of an imported layer (or a global one) that maps to nothing is an error."""
  lo, hi = src.first_layer, src.first_layer + src.n_layers
  for name in reader.source_names:
    if name in used:
      continue
    parts = name.split(".")
    if parts[0] == "layers":
      li = int(parts[1])
      if li >= src.total_layers or not lo <= li < hi:
        continue                               # another layer, or V3.2's MTP layer
    elif parts[0] == "mtp" and not src.with_mtp:
      continue
    key, fname = reader.source_names[name]
    raise ValueError(f"{fname}: unknown tensor name {key!r}; expected one of the DeepSeek "
                     f"names of this config (model1 has no variable for it)")


@contextlib.contextmanager
def _staged(dest: Path):
  """A temporary sibling directory renamed to ``dest`` only if the block succeeds, so a
  failure leaves nothing half-written (``dest`` may exist only as an empty directory)."""
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  try:
    yield tmp
    if dest.exists():
      dest.rmdir()
    tmp.rename(dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def import_checkpoint(src_dir: str | Path, workdir: str | Path, layers=None,
                      dtype: str = "bfloat16", max_seq_len: int = 4096) -> dict:
  """DeepSeek checkpoint directory -> model1 run directory. Returns a summary dict."""
  from model1 import checkpoint, config
  src_dir, workdir = Path(src_dir), Path(workdir)
  cfg_path = src_dir / "config.json"
  if not cfg_path.exists():
    raise ValueError(f"--from={src_dir}: no config.json; expected a DeepSeek checkpoint directory")
  if workdir.exists() and any(workdir.iterdir()):
    raise ValueError(f"--to={workdir} exists and is not empty; expected a new run directory")
  raw = json.loads(cfg_path.read_text())
  mcfg, src = hub.config_from_deepseek(raw, layers, dtype, max_seq_len)
  run_cfg = config.run_config(mcfg, f"deepseek-{src.family}")
  reader = hub.ShardReader(src_dir)
  try:
    model, opt = _abstract_run(mcfg, run_cfg)
    state = load_params(reader, model, src)
  finally:
    reader.close()
  model.load_per_layer_state(jax.tree.map(jnp.asarray, state))
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with _staged(workdir) as tmp:
    ck = checkpoint.Checkpointer(tmp)
    ck.save(0, model, opt, jax.random.key(0), run_cfg.model.to_dict(), force=True)
    ck.close()
    (tmp / "provenance.json").write_text(json.dumps(
        {"config": run_cfg.to_dict(), "git_commit": checkpoint.git_commit(),
         "converted_from": str(src_dir.resolve())}, indent=1, default=list))
    (tmp / "convert.json").write_text(json.dumps(
        {"source": str(src_dir.resolve()), "family": src.family, "first_layer": src.first_layer,
         "n_layers": src.n_layers, "total_layers": src.total_layers, "with_mtp": src.with_mtp,
         "fp8_scale": src.fp8_scale, "names": "hf" if reader.hf else "inference",
         "config": raw}, indent=1))
    for f in TOKENIZER_FILES:
      if (src_dir / f).exists():
        shutil.copy(src_dir / f, tmp / f)
  return {"workdir": str(workdir), "layers": (src.first_layer, src.first_layer + src.n_layers - 1),
          "shards_opened": list(reader.opened), "bytes_read": reader.bytes_read,
          "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))}


def _source_of(workdir: Path) -> tuple[hub.Source, dict]:
  info_path = workdir / "convert.json"
  if not info_path.exists():
    raise ValueError(f"{workdir}: no convert.json; expected a run made by model1.convert")
  info = json.loads(info_path.read_text())
  return hub.Source(info["family"], info["first_layer"], info["n_layers"], info["total_layers"],
                    info["with_mtp"], info["fp8_scale"]), info


def _encode(e: hub.Entry, x: np.ndarray, fmt: str, src: hub.Source, names: str) -> dict:
  """One model1 variable -> {DeepSeek name: stored array} (weights plus scales)."""
  out = {}
  for name, t in zip(e.names, hub.to_deepseek(e.kind, np.asarray(x))):
    store = e.fmt if fmt == "fp8" else ("bf16" if e.fmt in ("fp8", "fp4") else e.fmt)
    if store == "fp8":
      q, s = quant.quantize_fp8(t, scale_dtype=src.fp8_scale)
      out[name], out[hub.scale_name(name)] = q, s
    elif store == "fp4":
      q, s = quant.quantize_fp4(t)
      out[name], out[hub.scale_name(name)] = q, s
    elif store == "f32":
      out[name] = t.astype(np.float32)
    elif store == "i32":
      out[name] = t.astype(np.int32)
    else:
      out[name] = t.astype(ml_dtypes.bfloat16)
  if names == "hf":
    out = {hub.inference_to_hf(k): v for k, v in out.items()}
  return out


def export_checkpoint(workdir: str | Path, out_dir: str | Path, fmt: str = "fp8",
                      names: str | None = None) -> dict:
  """model1 run (made by import) -> DeepSeek safetensors shards + index + config.json."""
  import safetensors.numpy as stn
  from model1 import evals
  if fmt not in ("fp8", "bf16"):
    raise ValueError(f"--format={fmt!r}; expected 'fp8' or 'bf16'")
  workdir, out_dir = Path(workdir), Path(out_dir)
  src, info = _source_of(workdir)
  names = names or info["names"]
  if names not in ("inference", "hf"):
    raise ValueError(f"--names={names!r}; expected 'inference' or 'hf'")
  if out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(f"--to={out_dir} exists and is not empty; expected a new directory")
  model, _, _ = evals.load_trained(workdir)
  state = _str_keys(jax.tree.map(np.asarray, _pure(model)))
  groups: dict[str, dict] = {}
  for e in hub.tensor_plan(state, src):
    key = ".".join(e.names[0].split(".")[:2]) if e.names[0].startswith(("layers.", "mtp.")) else "top"
    groups.setdefault(key, {}).update(_encode(e, _get_path(state, e.path), fmt, src, names))
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  with _staged(out_dir) as tmp:
    weight_map, n = {}, len(groups)
    for i, (_, tensors) in enumerate(sorted(groups.items())):
      fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      stn.save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in tensors})
    (tmp / hub.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(info["config"], indent=1))
    for f in TOKENIZER_FILES:
      if (workdir / f).exists():
        shutil.copy(workdir / f, tmp / f)
  return {"dir": str(out_dir), "shards": n, "tensors": len(weight_map), "format": fmt,
          "names": names}


# ---------------------------------------------------------------- parity check

def _stats(name: str, x) -> str:
  x = np.asarray(x, np.float32)
  head = " ".join(f"{v:+.5g}" for v in x.reshape(-1)[:4])
  return (f"{name:<28} {str(tuple(x.shape)):<20} mean {x.mean():+.6g}  std {x.std():.6g}  "
          f"max|x| {np.abs(x).max():.6g}  [{head}]")


def _components(model, tok, layers, h0=None):
  """(name, activation) pairs of one forward (the training form, one sequence); with
  ``h0`` (the residual streams entering layer ``layers[0]``) only layers[0].. run."""
  from model1.mhc import expand
  pos = jnp.arange(tok.shape[1])[None]
  seg = jnp.ones_like(tok)
  rec = []
  lo, hi = layers
  if h0 is None:
    x = model.embed(tok, model.dtype)
    rec.append(("embed", x))
    h = expand(x, model.cfg.mhc.hc_mult)
  else:
    h = h0.astype(model.dtype)
    rec.append((f"layers.{lo}.in", h))
  for i, layer in enumerate(model.blocks()):
    if h0 is not None and i < lo:
      continue
    show = lo <= i <= hi
    def note(name, v, i=i, show=show):
      if show:
        rec.append((f"layers.{i}.{name}", v))
      return v
    def attn_fn(z, layer=layer):
      y, kv = layer.attn(note("attn_norm", z), pos, seg, return_kv=True)
      return note("attn", y), kv
    h, _ = layer.hc_attn(h, lambda z, layer=layer: attn_fn(layer.attn_norm(z)))
    h, _ = layer.hc_ffn(h, lambda z, layer=layer: note(
        "ffn", layer._ffn(note("ffn_norm", layer.ffn_norm(z)), tok, seg > 0)))
    note("out", h)
  f = model.final_hidden(h)
  rec += [("norm", f), ("logits", model.logits(f))]
  return rec


def check(workdir: str | Path, tokens: list[int], layers=None,
          inputs: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
  """Run the imported model on ``tokens`` (one sequence, one jitted forward) and return
  the per-component activations [(name, array)] (``layers``: model1 layers to show).
  ``inputs``: hidden states entering the first shown layer, [T, D] or [T, C, D] (mHC
  streams; e.g. saved from DeepSeek's model), instead of the embedding of the tokens
  (which still drive hash routing)."""
  from model1 import evals
  model, cfg, _ = evals.load_trained(workdir)
  V = model.cfg.vocab_size
  bad = [t for t in tokens if not 0 <= t < V]
  if not tokens or bad:
    raise ValueError(f"--tokens={tokens}; expected a non-empty list of ids in [0, {V})")
  n = model.cfg.n_layers
  layers = layers or (0, n - 1)
  if layers[1] >= n:
    raise ValueError(f"--layers={layers[0]}-{layers[1]}; expected layers of this run "
                     f"(0-{n - 1}: model1 numbering, the slice starts at 0)")
  h0 = None
  if inputs is not None:
    C, D = model.cfg.mhc.hc_mult, model.cfg.d_model
    x = np.asarray(inputs, np.float32)
    if x.shape == (len(tokens), D):
      x = np.repeat(x[:, None], C, axis=1) if C > 1 else x[:, None]
    if x.shape != (len(tokens), C, D):
      raise ValueError(f"--inputs shape {x.shape}; expected [{len(tokens)}, {D}] or "
                       f"[{len(tokens)}, {C}, {D}] (one row per token, mHC streams)")
    h0 = jnp.asarray(x[None])
  names = []
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tok, h0):
    rec = _components(nnx.merge(graphdef, state), tok, layers, h0)
    names[:] = [k for k, _ in rec]
    return [v for _, v in rec]
  values = run(state, jnp.asarray([tokens], jnp.int32), h0)
  return [(k, np.asarray(v)) for k, v in zip(names, values)]


# ---------------------------------------------------------------- CLI

def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m model1.convert", description=__doc__.split("\n")[0])
  p.add_argument("--from", dest="src", required=True,
                 help="DeepSeek checkpoint dir (import) or model1 run dir (--export, --check)")
  p.add_argument("--to", dest="dst", help="model1 run dir (import) or output dir (--export)")
  p.add_argument("--layers", help="slice FIRST-LAST of layers to import (or to print, --check)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype of the imported model (parameters stay float32)")
  p.add_argument("--max_seq_len", type=int, default=4096)
  p.add_argument("--export", action="store_true", help="model1 run -> DeepSeek safetensors")
  p.add_argument("--format", default="fp8", choices=("fp8", "bf16"))
  p.add_argument("--names", choices=("inference", "hf"), help="export naming (default: the source's)")
  p.add_argument("--check", action="store_true", help="print per-component activations")
  p.add_argument("--tokens", default="0,1,2,3", help="comma-separated token ids for --check")
  p.add_argument("--inputs", help="--check: .npy hidden states [T, D] or [T, C, D] entering "
                 "the first --layers layer (instead of the embedding)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  a = p.parse_args(argv)
  try:
    if a.check:
      toks = [int(t) for t in a.tokens.split(",") if t.strip()]
      inputs = np.load(a.inputs) if a.inputs else None
      for name, x in check(a.src, toks, parse_layers(a.layers), inputs):
        print(_stats(name, x))
      return 0
    if not a.dst:
      raise ValueError("--to is required; expected the output directory")
    if a.export:
      print(json.dumps(export_checkpoint(a.src, a.dst, a.format, a.names)))
    else:
      res = import_checkpoint(a.src, a.dst, parse_layers(a.layers), a.dtype, a.max_seq_len)
      print(json.dumps(res))
    return 0
  except (ValueError, OSError, KeyError) as e:
    if a.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
