"""A run directory a researcher can trust: one trainer at a time (lock, stale-lock
takeover), nothing rewritten by an incompatible command, the newest *readable*
checkpoint resumed (bit-identical), failed background saves stop the run at once, the
run's own tokenizer and corpus manifest, and one ``error:`` line for every bad input.

One tiny plain model (1 dense layer, d=64, seq 32) trained in-process for 4 steps is
shared by every test here; the CLI checks fail before anything compiles."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, one_device_env, tiny_run_config
from model1 import checkpoint, cli, trainer

pytestmark = pytest.mark.xdist_group("run_integrity")  # one worker: shares the trained run

STEPS = 4


def _cfg(**train):
  cfg = tiny_run_config()
  cfg.train.update(steps=STEPS, log_every=1, eval_every=0, ckpt_every=2, keep_checkpoints=5)
  cfg.train.update(**train)
  return cfg


def _losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows], [float.hex(r["loss"]) for r in rows]


def _snapshot(workdir: Path) -> dict:
  """Every file of a run directory (path -> bytes), lock excluded."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  out = trainer.run(_cfg(), wd)
  assert out["step"] == STEPS and not out["preempted"]
  return wd


def test_run_dir_holds_tokenizer_manifest_and_timestamps(trained):
  for f in ("provenance.json", "manifest.json", "tokenizer.json", "loss.png"):
    assert (trained / f).stat().st_size > 100, f
  assert list((trained / "tb").glob("events.out.tfevents.*"))  # TensorBoard beside the JSONL
  rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
  times = [r["time"] for r in rows]
  assert times == sorted(times) and times[0] > 1.7e9  # unix seconds, in step order
  assert not (trained / "run.lock").exists()  # released at the end
  # the run's tokenizer is what a resume or eval.py loads: same ids as the corpus cache's
  ds = trainer.load_dataset(_cfg(), tokenizer_file=trained / "tokenizer.json")
  ref = trainer.load_dataset(_cfg())
  np.testing.assert_array_equal(ds.batch(0)["inputs"], ref.batch(0)["inputs"])


def test_second_trainer_fails_at_once_and_stale_lock_is_taken_over(trained, tmp_path):
  with checkpoint.RunLock(trained):
    with pytest.raises(checkpoint.RunLockedError, match=f"in use by pid {os.getpid()}"):
      trainer.run(_cfg(), trained)  # before any data or compile
  assert not (trained / "run.lock").exists()
  # a lock whose process is gone (kill -9) is stale: taken over
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  lock = tmp_path / "run.lock"
  import platform
  lock.write_text(json.dumps({"pid": int(dead), "host": platform.node()}))
  with checkpoint.RunLock(tmp_path) as held:
    assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
  # another host's lock cannot be checked: refused, naming it
  lock.write_text(json.dumps({"pid": 1, "host": "other-host"}))
  with pytest.raises(checkpoint.RunLockedError, match="other-host"):
    checkpoint.RunLock(tmp_path).acquire()


@pytest.mark.parametrize("override,match", [
    (("model", "d_model", 96), r"another config.*model\.d_model"),
    (("data", "seq_len", 16), r"another config.*data\.seq_len"),
    (("train", "steps", 2), r"train.steps=2 .*checkpoint at step 4; expected train.steps >= 4"),
])
def test_incompatible_command_leaves_run_untouched(trained, override, match):
  before = _snapshot(trained)
  cfg = _cfg()
  section, key, value = override
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    trainer.run(cfg, trained)
  assert _snapshot(trained) == before


def test_corrupt_latest_checkpoint_resumes_from_previous_bit_identically(trained, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(trained, wd)
  for f in (wd / "checkpoints" / str(STEPS) / "state").rglob("d/*"):
    f.write_bytes(b"\0garbage" * 8)  # a torn write: every data file of step 4 unreadable
  logs = []
  out = trainer.run(_cfg(), wd, log=logs.append)
  assert out["start_step"] == 2 and out["step"] == STEPS
  assert any(f"checkpoint step {STEPS}" in l and "unreadable" in l for l in logs), logs
  assert (wd / "corrupt_checkpoints" / str(STEPS)).is_dir()
  assert _losses(wd) == _losses(trained)


def test_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  saves = []
  orig_save = checkpoint.Checkpointer.save

  def save(self, step, *a, **k):
    saves.append(step)
    orig_save(self, step, *a, **k)

  def check(self):
    if saves:
      raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "check_for_errors", check)
  with pytest.raises(OSError) as e:
    trainer.run(_cfg(), tmp_path)
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
      == [1, 2]  # stopped right after the step-2 save, not at the end
  assert cli.classify(RuntimeError("x")) is None  # an unknown error is a bug: traceback
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = e.value
  assert cli.classify(wrapped) == (cli.EXIT_FAILED, cli.classify(e.value)[1])
  assert "disk full" in cli.classify(wrapped)[1]


def test_corpus_change_is_refused_unless_allowed(trained):
  manifest = json.loads((trained / "manifest.json").read_text())
  checkpoint.check_corpus(trained, manifest)  # the same corpus passes
  other = dict(manifest, hash="0" * 16, files=manifest["files"][1:])
  with pytest.raises(ValueError, match=r"corpus differs.*1 files differ.*allow_corpus_change"):
    checkpoint.check_corpus(trained, other)
  checkpoint.check_corpus(trained, other, allow_change=True)


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "steps", -3, "a positive int"), ("train", "log_every", 0, "a positive int"),
    ("train", "eval_every", -1, "an int >= 0"), ("train", "lr", 0.0, "a positive number"),
    ("train", "b2", 1.5, "in [0, 1]"), ("train", "optimizer", "sgd", "'adamw' or 'muon'"),
    ("train", "grad_accum", 3, "a multiple of train.grad_accum=3"),
    ("data", "val_percent", 0.0, "a percentage in (0, 100)"),
    ("data", "tokenizer", "wordpiece", "'bpe' or 'byte'"),
    ("data", "synthetic_ratio", 2.0, "in [0, 1]"), ("data", "batch_size", 0, "positive int"),
])
def test_every_train_and_data_field_is_validated(section, key, value, expected):
  cfg = _cfg()
  cfg[section][key] = value
  with pytest.raises(ValueError, match=rf"\w+\.\w+=.*; expected .*{__import__('re').escape(expected)}"):
    trainer.validate_run_config(cfg)


def _cli(*args, timeout=120):
  env = one_device_env()
  return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_bad_inputs_give_one_error_line(tmp_path, trained):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  good = tmp_path / "good.py"
  good.write_text("x = 1\n" * 100)
  wd = f"--workdir={tmp_path}/wd"
  cases = {
      "steps": (["train.py", wd, "--config.train.steps=0"], 2, "train.steps=0"),
      "field": (["train.py", wd, "--config.train.stpes=3"], 2, "unknown config field"),
      "missing": (["train.py", wd, f"--config.data.paths={good},{tmp_path}/nope"], 2,
                  "does not exist"),
      "empty": (["train.py", wd, f"--config.data.paths={empty}"], 2, "empty"),
      "locked": (["train.py", f"--workdir={trained}", "--config=configs/tiny.py"], 1,
                 "in use by pid"),
      "eval_mode": (["eval.py", f"--workdir={trained}", "--mode=nope"], 2, "mode"),
      "ablate": (["-m", "model1.ablate", "--tiny", "--smoke"], 2, "exclusive"),
  }
  with checkpoint.RunLock(trained):
    procs = {k: _cli(*a) for k, (a, _, _) in cases.items()}
    outs = {k: p.communicate(timeout=300) for k, p in procs.items()}
  for k, (args, code, text) in cases.items():
    out, err = outs[k]
    lines = err.strip().splitlines()
    assert procs[k].returncode == code, (k, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (k, err)
  # --debug shows the traceback instead
  p = _cli("train.py", wd, "--config.train.steps=0", "--debug")
  _, err = p.communicate(timeout=300)
  assert p.returncode != 0 and "Traceback" in err and "train.steps=0" in err
