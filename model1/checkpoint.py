"""Checkpoints (Orbax) and run provenance.

A checkpoint holds the model parameters, the optimizer state, the step and the train rng
key as pure pytrees, plus JSON metadata (the model config) so restoring into an
incompatible config fails clearly (fields that only change how the forward runs,
``remat`` and ``scan_layers``, are not compared). Restoring builds an abstract target
carrying the *current* mesh's shardings, so a checkpoint written on one mesh shape
restores on another.

Parameters are stored in the model's own layout: per layer (``model/layers/7/attn/wq_a``)
for unrolled layers, stacked per scanned slot (``model/scanned/1/attn/wq_a``, leading axis
= the slot's layers) for scanned ones, and the metadata records the slots' layer ids.
Restoring into another layout (``scan_layers`` on/off, another depth pattern, or a
per-layer checkpoint written before layers were stored stacked) converts through the
per-layer form (``model1.scan.to_per_layer`` / ``to_stacked``), optimizer moments too.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from model1 import scan, sharding


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
    slots = [list(ids) for ids in getattr(model, "slot_ids", ())]
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "model": model_cfg, "slots": slots})),
        force=force)

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
    # checkpoints from before stacked storage hold every layer per layer: no slots
    saved_slots = tuple(tuple(ids) for ids in meta["meta"].get("slots", ()))
    slots = tuple(getattr(model, "slot_ids", ()))
    disk = target
    if saved_slots != slots:
      disk = scan.to_stacked(scan.to_per_layer(target, slots, _sds_take), saved_slots,
                             _sds_stack)
    with sharding.use_mesh(mesh):
      got = self.mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(disk)))["state"]
    if saved_slots != slots:
      got = scan.to_stacked(scan.to_per_layer(got, saved_slots), slots)
      got = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if t.sharding else x,
                         got, target)
    for obj, key in ((model, "model"), (optimizer, "opt")):
      st = nnx.state(obj)
      nnx.replace_by_pure_dict(st, got[key])
      nnx.update(obj, st)
    return jax.random.wrap_key_data(np.asarray(got["rng"]))

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def _sds_take(x: jax.ShapeDtypeStruct, r: int) -> jax.ShapeDtypeStruct:
  """The abstract entry r of a stacked leaf (its sharding without the layer axis)."""
  shd = x.sharding
  if isinstance(shd, jax.sharding.NamedSharding):
    spec = tuple(shd.spec) + (None,) * (len(x.shape) - len(shd.spec))
    shd = jax.sharding.NamedSharding(shd.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=shd)


def _sds_stack(xs: list) -> jax.ShapeDtypeStruct:
  """The abstract stack of per-layer leaves (a replicated leading layer axis)."""
  x = xs[0]
  shd = x.sharding
  if isinstance(shd, jax.sharding.NamedSharding):
    shd = jax.sharding.NamedSharding(shd.mesh, jax.sharding.PartitionSpec(None, *shd.spec))
  return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=shd)


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


# --------------------------------------------------------------------------- run integrity
# Kept apart from Checkpointer: a run directory is locked by one trainer, resumed from the
# newest checkpoint that reads, and its provenance is only written once it is known to be
# compatible with the command that is about to train in it.


class RunLockedError(RuntimeError):
  """Another live process holds the run directory."""


class RunLock:
  """``<workdir>/run.lock`` holding the owner's pid and host, created atomically
  (``O_EXCL``). A lock left by a dead process on this host is stale and taken over; a lock
  from another host cannot be checked, so it is refused with its owner named."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / "run.lock"
    self.held = False

  def acquire(self) -> "RunLock":
    me = {"pid": os.getpid(), "host": platform.node()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is not None and not self._stale(owner):
          raise RunLockedError(
              f"run directory {self.path.parent} is in use by pid {owner.get('pid')} on host "
              f"{owner.get('host')!r} ({self.path}); expected one trainer per run directory "
              f"(use another --workdir, or delete the lock file if that process is gone)"
          ) from None
        self.path.unlink(missing_ok=True)  # stale: its process is gone
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise RunLockedError(f"could not take the lock {self.path}; expected to create it")

  def _owner(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None  # half-written or unreadable: treat as stale

  @staticmethod
  def _stale(owner: dict) -> bool:
    if owner.get("host") != platform.node():
      return False
    try:
      os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, KeyError, ValueError, TypeError):
      return False
    return False

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def restore_newest_readable(ckpt: Checkpointer, model, optimizer, model_cfg: dict, mesh=None,
                            log=print):
  """Restore the newest checkpoint that reads; returns (step, rng) or (None, None) when
  there is none. An unreadable checkpoint (a partial or corrupted write) is named, moved
  to ``<workdir>/corrupt_checkpoints/<step>`` (so the step can be saved again) and the
  next older one is tried. An incompatible model config is not corruption: it raises."""
  bad_dir = ckpt.dir.parent / "corrupt_checkpoints"
  for step in sorted(ckpt.mngr.all_steps(), reverse=True):
    try:
      rng = ckpt.restore(step, model, optimizer, model_cfg, mesh)
    except ValueError as e:
      if "incompatible model config" in str(e):
        raise
      reason = e
    except Exception as e:  # noqa: BLE001 - any read failure means: try the previous one
      reason = e
    else:
      return step, rng
    first = (str(reason).strip().splitlines() or [type(reason).__name__])[0][:200]
    bad_dir.mkdir(exist_ok=True)
    dest = bad_dir / f"{step}"
    if dest.exists():
      dest = bad_dir / f"{step}.{int(time.time())}"
    os.replace(ckpt.dir / str(step), dest)
    ckpt.mngr.reload()
    log(f"warning: checkpoint step {step} in {ckpt.dir} is unreadable "
        f"({type(reason).__name__}: {first}); moved to {dest}, trying the previous one")
  return None, None


def read_run_config(workdir: str | Path) -> dict | None:
  p = Path(workdir) / "provenance.json"
  if not p.exists():
    return None
  try:
    return json.loads(p.read_text())["config"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{p} is unreadable ({e}); expected the JSON a trainer wrote") from None


# The sections that must match for a checkpoint to continue the same run: the model (the
# checkpoint's shapes), the data stream and seed (a resumed run sees exactly the batches
# an uninterrupted one would). The mesh may change: checkpoints restore onto any mesh.
RESUME_KEYS = ("model", "data", "seed")
RESUME_TRAIN_KEYS = ("optimizer", "grad_accum")


def check_resume_compatible(workdir: str | Path, config_dict: dict) -> None:
  """Raise ValueError naming every differing field when ``config_dict`` would continue
  the run in ``workdir`` with another model, data stream, seed or optimizer."""
  saved = read_run_config(workdir)
  if saved is None:
    return
  diff = {}
  for k in RESUME_KEYS:
    a, b = _canon(saved.get(k)), _canon(config_dict.get(k))
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        diff.update({f"{k}.{f}": (a.get(f), b.get(f)) for f in set(a) | set(b)
                     if a.get(f) != b.get(f)})
      else:
        diff[k] = (a, b)
  st, ct = saved.get("train", {}), config_dict.get("train", {})
  diff.update({f"train.{f}": (st.get(f), ct.get(f)) for f in RESUME_TRAIN_KEYS
               if st.get(f) != ct.get(f)})
  if diff:
    raise ValueError(f"--workdir={workdir} holds a run with another config; differing fields "
                     f"(saved, given): {diff}; expected the run's own config (drop the "
                     f"overrides) or a fresh --workdir")


def check_corpus(workdir: str | Path, manifest: dict, allow_change: bool = False) -> None:
  """Refuse a corpus whose manifest differs from the one the run was trained on."""
  p = Path(workdir) / "manifest.json"
  if not p.exists() or allow_change:
    return
  saved = json.loads(p.read_text())
  if saved["hash"] != manifest["hash"]:
    old = {e["path"]: e["sha256"] for e in saved["files"]}
    new = {e["path"]: e["sha256"] for e in manifest["files"]}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(
        f"the corpus differs from the one the run in {workdir} was trained on (manifest "
        f"{saved['hash']} vs {manifest['hash']}; {len(changed)} files differ, e.g. "
        f"{changed[:3]}); expected the same data.paths and files (pass "
        f"--allow_corpus_change to use this corpus anyway)")


def save_run_tokenizer(workdir: str | Path, tokenizer) -> None:
  """Keep the run's tokenizer beside its checkpoints (``tokenizer.json``; a byte
  tokenizer is recorded as such), so evaluation never depends on a cache."""
  workdir = Path(workdir)
  tok = getattr(tokenizer, "tok", None)
  if tok is None:
    (workdir / "tokenizer.json").write_text(json.dumps({"model1_byte_tokenizer": True}))
  else:
    tmp = workdir / f"tokenizer.json.tmp{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, workdir / "tokenizer.json")


def disk_full(exc: BaseException) -> bool:
  """True when ``exc`` or anything in its cause/context chain is ENOSPC / EDQUOT."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(exc):
      return True
    exc = exc.__cause__ or exc.__context__
  return False
