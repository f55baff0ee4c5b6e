"""Checkpoints (Orbax) and run provenance.

A checkpoint holds the model parameters, the optimizer state, the step and the train rng
key as pure pytrees, plus JSON metadata (the model config) so restoring into an
incompatible config fails clearly (fields that only change how the forward runs,
``remat`` and ``scan_layers``, are not compared). Restoring builds an abstract target
carrying the *current* mesh's shardings, so a checkpoint written on one mesh shape
restores on another.

Parameters are stored per layer (``model/layers/7/attn/wq_a/...``) whether the model runs
its layers under ``lax.scan`` or unrolled (``model1.scan`` stacks them only while
tracing), so a checkpoint saved by either mode restores into the other, and checkpoints
written before ``scan_layers`` existed restore unchanged.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from model1 import sharding


class Checkpointer:

  def __init__(self, workdir: str | Path, keep: int = 3):
    self.dir = Path(workdir).resolve() / "checkpoints"
    self.mngr = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, model, optimizer, rng: jax.Array, model_cfg: dict,
           force: bool = False) -> None:
    state = {"model": nnx.state(model).to_pure_dict(),
             "opt": nnx.state(optimizer).to_pure_dict(),
             "rng": jax.random.key_data(rng)}
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "model": model_cfg})), force=force)

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def restore(self, step: int, model, optimizer, model_cfg: dict, mesh=None):
    """Restore into ``model``/``optimizer`` in place (onto ``mesh``); returns the rng."""
    meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved = _layout(meta["meta"]["model"])
    model_cfg = _layout(model_cfg)
    if _canon(saved) != _canon(model_cfg):
      diff = {k: (saved.get(k), model_cfg.get(k)) for k in set(saved) | set(model_cfg)
              if _canon(saved.get(k)) != _canon(model_cfg.get(k))}
      raise ValueError(f"checkpoint at {self.dir}/{step} was written by an incompatible "
                       f"model config; differing fields (saved, current): {diff}; expected "
                       f"the same model config or a fresh --workdir")

    def abstract(tree):
      def one(x):
        shd = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd)
      return jax.tree.map(one, tree)
    target = {"model": abstract(nnx.state(model).to_pure_dict()),
              "opt": abstract(nnx.state(optimizer).to_pure_dict()),
              "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
    with sharding.use_mesh(mesh):
      got = self.mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    for obj, key in ((model, "model"), (optimizer, "opt")):
      st = nnx.state(obj)
      nnx.replace_by_pure_dict(st, got[key])
      nnx.update(obj, st)
    return jax.random.wrap_key_data(np.asarray(got["rng"]))

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


# Model fields that change how the forward runs, not what the parameters are: a
# checkpoint moves freely between their values (and predates some of them).
EXECUTION_FIELDS = ("remat", "scan_layers")


def _layout(model_cfg: dict) -> dict:
  return {k: v for k, v in dict(model_cfg).items() if k not in EXECUTION_FIELDS}


def _canon(x):
  return json.loads(json.dumps(x, sort_keys=True, default=list))


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
  except Exception:  # noqa: BLE001 - provenance must never stop training
    return "unknown"


def write_provenance(workdir: Path, config_dict: dict, manifest: dict) -> None:
  pkgs = {}
  for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers",
            "ml-collections"):
    try:
      pkgs[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      pkgs[p] = None
  prov = {"config": config_dict, "git_commit": git_commit(),
          "corpus_manifest_hash": manifest["hash"], "corpus_files": len(manifest["files"]),
          "packages": pkgs, "python": sys.version, "platform": platform.platform(),
          "backend": jax.default_backend(), "devices": jax.device_count()}
  (workdir / "provenance.json").write_text(json.dumps(prov, indent=1, default=str))
  (workdir / "manifest.json").write_text(json.dumps(manifest, indent=0))
