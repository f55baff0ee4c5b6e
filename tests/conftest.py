"""Test setup: 8 fake CPU devices (sharding tests), a shared corpus/tokenizer cache, and
session-scoped fixtures so tests share data loading and compilations."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# XLA's fast-compile settings: the suite's tiny programs spend most of their time in LLVM
# code generation, not running (measured on 2 cores: test_sharding 240 -> 159 CPU-s); the
# compiled code is the same computation, only less optimised machine code
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + FAST_COMPILE)


def one_device_env(**extra):
  """The environment of a CLI subprocess: one CPU device, the fast-compile flags, the
  repository on the path. (Caching every small program too, JAX's
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0``, was measured a net loss: writing an
  executable costs more than most are reused, and each write scans the LRU cache.)"""
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + FAST_COMPILE,
              PYTHONPATH=str(ROOT), **extra)
os.environ.setdefault("MODEL1_CACHE", str(Path.home() / ".cache" / "model1"))
# notebooks and long research checks read MODEL1_FAST=1: the same cells and code paths at
# smaller shapes (the suite runs in <= 12 minutes on 2 CPU cores)
os.environ.setdefault("MODEL1_FAST", "1")
# one on-disk compilation cache for the session's workers and the CLI runs they start
# (train.py / eval.py / ablate subprocesses compile the programs the in-process tests do);
# JAX only stores programs that took >= 1 s to compile
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(os.environ["MODEL1_CACHE"]) / "jax_compilation_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # bytes, LRU-evicted
sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def shrink(cfg, seq_len=32, batch_size=4, n_layers=2):
  """Tiny-size overrides for any config: small width/depth, exact head geometry kept."""
  m = cfg.model
  m.d_model, m.n_layers, m.ffn.hidden = 64, min(m.n_layers, n_layers), 128
  m.attention.n_heads, m.attention.q_lora_rank = 2, 32
  m.attention.o_groups, m.attention.o_lora_rank = 2, 32
  m.max_seq_len = max(seq_len, 64)
  m.dtype = "float32"
  m.remat = "none"  # the deep configs' "full" only adds compile time here; test_scan covers it
  if m.get("use_moe"):
    m.moe.n_hash_layers = min(m.moe.n_hash_layers, m.n_layers - m.n_dense_layers)
  if m.get("use_engram"):
    m.engram.layer_ids = tuple(i for i in m.engram.layer_ids if i < m.n_layers) or (0,)
  if m.attention.get("compress_ratios"):
    m.attention.compress_ratios = tuple(m.attention.compress_ratios)[:m.n_layers + 1]
  cfg.data.seq_len, cfg.data.batch_size = seq_len, batch_size
  cfg.train.progress = False
  return cfg


def tiny_model_config(geometry: str = "model1", *, v4: bool = False, vocab_size: int = 97,
                      d_model: int = 64, n_layers: int = 2, ffn_hidden: int = 128,
                      max_seq_len: int | None = None, **attn):
  """The one tiny ModelConfig of the unit tests: exact head geometry (512 or 576), small
  width, dense attention. Plain pre-norm blocks (no mHC, MoE or MTP) unless ``v4=True``
  keeps the preset's V4 block (mHC 4 streams, MoE with a hash layer, MTP 1): only tests
  of those parts pay for their compile time. ``attn`` overrides attention fields."""
  import dataclasses

  from model1 import config
  cfg = config.preset("tiny", geometry, sparse="dense")
  a = dataclasses.replace(cfg.attention, n_heads=2, q_lora_rank=32, o_lora_rank=32, **attn)
  cfg = dataclasses.replace(cfg, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                            attention=a, ffn=config.FFNConfig(ffn_hidden),
                            max_seq_len=max_seq_len or cfg.max_seq_len)
  if not v4:
    cfg = dataclasses.replace(cfg, mhc=config.MHCConfig(hc_mult=1), use_moe=False,
                              mtp=config.MTPConfig(0))
  return cfg.validate()


def tiny_run_config(n_layers: int = 1, seq_len: int = 32, batch_size: int = 4):
  """configs/tiny.py shrunk to a plain 1-layer dense model: for tests of the machinery
  around the model (checkpoints, resume, run directory), not of the model."""
  cfg = plain(shrink(load_config(ROOT / "configs" / "tiny.py"), seq_len, batch_size))
  cfg.model.n_layers = n_layers
  cfg.mesh.num_devices = 1
  return cfg


def plain(cfg):
  """Dense attention in a plain block (no mHC, MoE or MTP): for tests of the machinery
  around the model, where the V4 parts only add compile time."""
  m = cfg.model
  m.attention.sparse, m.attention.compress_ratios = "dense", ()
  m.mhc.hc_mult, m.use_moe, m.mtp.n_layers = 1, False, 0
  return cfg


@pytest.fixture(scope="session")
def tiny_cfg():
  return load_config(ROOT / "configs" / "tiny.py")


@pytest.fixture(scope="session")
def dataset():
  """The real corpus (stdlib sources), tokenized with the tiny config's BPE vocab."""
  from model1 import data
  cfg = load_config(ROOT / "configs" / "tiny.py")
  return data.Dataset(seq_len=64, batch_size=8, vocab_size=cfg.model.vocab_size)


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


# /proc/self/maps lines: a worker grows ~300 per test (measured), up to ~1.7k for a test
# that trains a model; Linux's vm.max_map_count is 65530
RELEASE_BETWEEN_MODULES, RELEASE_ALWAYS = 24000, 40000


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
  """Drop compiled programs once a worker has mapped many memory regions. Every CPU
  executable JAX keeps maps its own regions; a worker that compiles hundreds of programs
  (the every-config smoke test alone compiles ~20 models) would pass Linux's
  vm.max_map_count (65530), and LLVM then aborts the process mid-compile. Dropped between
  test modules (runs after the module's fixtures are torn down), so a module's shared
  fixtures never have to recompile; within a module only past the hard limit."""
  n = _mapped_regions()
  between = getattr(nextitem, "module", None) is not getattr(item, "module", None)
  if n > RELEASE_ALWAYS or (between and n > RELEASE_BETWEEN_MODULES):
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
