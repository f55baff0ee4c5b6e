"""Training: the loss falls on the real corpus, preemption + resume is exact, checkpoints
move across mesh shapes, every config trains at tiny size."""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, load_config, one_device_env, plain, shrink
from model1 import checkpoint, config, cost, sharding, trainer
from model1.model import Transformer


def _losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows], [r["loss"] for r in rows]


def _train_cmd(workdir, *flags):
  # V3.2 heads in a plain block (dense attention and FFN): the resume path is under test
  return [sys.executable, str(ROOT / "train.py"), "--config=" + str(ROOT / "configs/tiny_v32.py"),
          "--config.model.use_moe=False", "--config.model.mtp.n_layers=0",
          f"--workdir={workdir}", "--config.data.seq_len=32", "--config.data.batch_size=4",
          "--config.model.n_layers=1", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.progress=False",
          "--config.train.warmup_steps=2", "--config.train.ckpt_every=2",
          "--config.train.keep_checkpoints=5", *flags]


_ENV = one_device_env()
N = 3  # the runs train 2 * N steps


def _train_cli(workdir, *flags, code=0):
  r = subprocess.run(_train_cmd(workdir, f"--config.train.steps={2 * N}", *flags), env=_ENV,
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == code, r.stderr[-3000:]
  return r


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted reference run."""
  wd = tmp_path_factory.mktemp("straight")
  _train_cli(wd)
  return _losses(wd)


def _hex(run):
  return run[0], [float.hex(x) for x in run[1]]


@pytest.mark.xdist_group("train_resume")  # with the fixture run they compare to
def test_sigterm_preempt_and_resume_is_bit_identical(tmp_path, straight):
  r = _train_cli(tmp_path / "pre", f"--config.train.preempt_at_step={N}", code=75)
  assert "checkpoint saved at step 3" in r.stdout and "rerun the same command" in r.stdout
  steps_a, _ = _losses(tmp_path / "pre")
  assert steps_a == list(range(1, N + 1))
  r = _train_cli(tmp_path / "pre")  # fresh process resumes
  assert "resuming at step 3" in r.stdout and "done: step 6" in r.stdout
  assert _hex(straight) == _hex(_losses(tmp_path / "pre"))
  assert straight[0] == list(range(1, 2 * N + 1))


@pytest.mark.xdist_group("train_resume")  # with the fixture run they compare to
def test_kill_9_with_corrupt_latest_checkpoint_resumes_bit_identically(tmp_path, straight):
  wd = tmp_path / "killed"
  kill_after = int(np.random.default_rng().integers(4, 2 * N))  # a random step in [4, 6)
  p = subprocess.Popen(_train_cmd(wd, f"--config.train.steps={2 * N}"), env=_ENV, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = wd / "metrics.jsonl"

  def finalized():  # checkpoints save asynchronously: a step directory appears once committed
    d = wd / "checkpoints"
    return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit()) if d.exists() else []

  deadline = time.monotonic() + 300
  while p.poll() is None and time.monotonic() < deadline:
    if (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after
        and finalized()):
      break
    time.sleep(0.05)
  p.kill()  # SIGKILL: no handler runs, the lock file stays behind
  if p.wait() == -9:
    assert (wd / "run.lock").exists()  # no handler ran: the resume must take it over
  ckpts = finalized()
  assert ckpts and ckpts[-1] >= 2, ckpts
  latest = ckpts[-1]
  for f in (wd / "checkpoints" / str(latest) / "state").rglob("d/*"):
    f.write_bytes(b"\0torn")  # the newest checkpoint is unreadable
  r = _train_cli(wd)
  assert f"checkpoint step {latest}" in r.stdout and "unreadable" in r.stdout, r.stdout
  good = max([s for s in ckpts if s < latest], default=0)
  assert (f"resuming at step {good}" if good else "fresh start") in r.stdout, r.stdout
  assert _hex(straight) == _hex(_losses(wd))


def _mesh(d, f, t):
  return sharding.make_mesh(data=d, fsdp=f, tensor=t, expert=1)


def test_checkpoint_restores_on_another_mesh(tmp_path, tiny_cfg):
  # the layout is under test: one plain layer holds every kind of sharded parameter
  cfg = plain(shrink(tiny_cfg.copy_and_resolve_references(), n_layers=1))
  cfg.train.update(steps=2, log_every=1, eval_every=0)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  trainer.run(cfg, tmp_path)
  mcfg = config.model_config_from_dict(cfg.model)
  ck = checkpoint.Checkpointer(tmp_path)
  ref_model, ref_opt = trainer.build_model_and_optimizer(mcfg, cfg.train, None, 123)
  ck.restore(2, ref_model, ref_opt, cfg.model.to_dict(), None)
  mesh = _mesh(1, 8, 1)
  model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, 123)
  ck.restore(2, model, opt, cfg.model.to_dict(), mesh)
  for (p, a), (_, b) in zip(jax.tree.leaves_with_path(nnx.state(ref_model, nnx.Param)),
                            jax.tree.leaves_with_path(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
    assert b.sharding.mesh.shape == mesh.shape
  # the restored state is the trained one, not the fresh init
  fresh, _ = trainer.build_model_and_optimizer(mcfg, cfg.train, None, 123)
  assert not np.array_equal(np.asarray(fresh.head.weight[...]),
                            np.asarray(ref_model.head.weight[...]))
  # an incompatible config is refused with a clear error
  bad = cfg.model.to_dict()
  bad["d_model"] = 96
  with pytest.raises(ValueError, match="incompatible model config"):
    ck.restore(2, ref_model, ref_opt, bad, None)
  ck.close()


ALL_CONFIGS = sorted((ROOT / "configs").glob("*.py"))
# DeepSeek-size configs are never allocated or trained: shapes only (test below)
FULL_SIZE = [p for p in ALL_CONFIGS if load_config(p).get("full_size")]
CONFIGS = [p for p in ALL_CONFIGS if p not in FULL_SIZE]


def _check_full_size(cfg):
  """A ``full_size`` config resolves; ``nnx.eval_shape`` (no memory, no compilation) of
  the model at full width, cut to 4 layers (every layer kind of the released configs) plus
  its MTP block, has exactly the parameters ``config.param_count`` says; and the full
  count equals DeepSeek's published totals at their published precision."""
  m = config.model_config_from_dict(cfg.model)
  short = dataclasses.replace(m, n_layers=4).validate()
  abstract = nnx.eval_shape(lambda: Transformer(short, nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == \
      config.param_count(short)
  p = cost.param_counts(m)
  sig2 = lambda x: f"{x:.2g}"  # noqa: E731  published: 671B / 37B, 284B / 13B, 1.6T / 49B
  assert sig2(p["total"]) == sig2(cfg.published.total), p
  assert sig2(p["activated_no_embed"]) == sig2(cfg.published.activated), p


@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.stem)
def test_full_size_configs_resolve_with_published_counts(path):
  _check_full_size(load_config(path))


def _tiny_size(path):
  """A config at tiny size: ``shrink`` plus the widths that only scale the model (vocab,
  experts, indexer, window, Engram table), so ``small_*`` resolves to its ``tiny_*``."""
  cfg = load_config(path)
  cfg = cfg.base if "base" in cfg else cfg  # ablation suites: their shared base run
  cfg = shrink(cfg)
  m = cfg.model
  m.vocab_size = min(m.vocab_size, 4096)
  m.moe.n_routed_experts = min(m.moe.n_routed_experts, 8)
  m.moe.moe_inter_dim, m.moe.route_scale = min(m.moe.moe_inter_dim, 128), 1.0
  a = m.attention
  a.index_n_heads, a.index_head_dim = min(a.index_n_heads, 4), min(a.index_head_dim, 64)
  a.window_size, a.index_topk = min(a.window_size, 32), min(a.index_topk, 16)
  # a ratio past 16 compresses a 32-token row into <= 2 entries: the same code at any ratio
  a.compress_ratios = tuple(min(r, 16) for r in a.compress_ratios)
  if m.get("use_engram"):
    m.engram.engram_vocab_size = tuple(min(v, 2048) for v in m.engram.engram_vocab_size)
    m.engram.n_embed_per_ngram = min(m.engram.n_embed_per_ngram, 64)
  cfg.train.update(steps=2, log_every=1, eval_every=0, ckpt_every=0)
  cfg.mesh.num_devices = 1  # every config builds and trains; meshes: test_sharding, above
  return cfg


def _training_key(cfg) -> str:
  """What a 2-step run compiles and reads: the model without the settings of parts that
  are off, the data stream (the synthetic mix is host-side numpy: test_long_context and
  test_ablate). Not the name, schedule, run length or optimizer (test_v4_block trains
  the tiny model with AdamW and with Muon)."""
  d = cfg.to_dict()
  m = dict(d["model"])
  for part, on in (("engram", m.get("use_engram")), ("moe", m.get("use_moe"))):
    if not on:
      m.pop(part, None)
  data = {k: v for k, v in d["data"].items() if k != "synthetic_ratio"}
  return json.dumps({"model": m, "data": data, "seed": d["seed"],
                     "grad_accum": d["train"]["grad_accum"]}, sort_keys=True, default=list)


def _groups():
  groups = {}
  for p in CONFIGS:
    groups.setdefault(_training_key(_tiny_size(p)), []).append(p)
  return list(groups.values())


GROUPS = _groups()


@pytest.mark.parametrize("paths", GROUPS, ids=lambda ps: "+".join(p.stem for p in ps))
def test_every_config_trains_two_steps_at_tiny_size(tmp_path, paths):
  """Configs that resolve to the same tiny run train once; each one of them builds (the
  full-size model abstractly, no compile) with the parameter count its formula gives."""
  for p in paths:
    cfg = load_config(p)
    cfg = cfg.base if "base" in cfg else cfg
    mcfg = config.model_config_from_dict(cfg.model)
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == config.param_count(mcfg), p.stem
    trainer.validate_run_config(cfg)
  if "tiny" in [p.stem for p in paths]:
    # trained above at its own size (test_tiny_config_loss_falls_on_real_corpus) and, with
    # AdamW and Muon, in test_v4_block
    return
  if all(p.stem.startswith("ablate_") for p in paths):
    # the suites' shared base run: test_ablate trains it (and every variant) through the
    # ablation runner, at --smoke and --tiny size
    return
  out = trainer.run(_tiny_size(paths[0]), tmp_path)
  steps, losses = _losses(tmp_path)
  assert out["step"] == 2 and steps == [1, 2] and np.isfinite(losses).all()


def test_config_groups_share_a_run():
  names = [[p.stem for p in g] for g in GROUPS]
  assert sum(map(len, names)) == len(CONFIGS)
  assert ["small_v32", "tiny_v32"] in names and ["small", "tiny_v4"] in names, names
