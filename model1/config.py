"""Model configuration: small frozen dataclasses, one per module, and the presets.

Each module takes its own config (``AttentionConfig`` for attention, ``ModelConfig`` for
the transformer that wires them). Presets keep the FlashMLA per-head geometry exact and
shrink width, depth and head count:

  v32     576-dim heads: 512 latent (kv_lora_rank) + 64 RoPE; qk_nope 128, v_head 128
  model1  512-dim heads: 448 NoPE + 64 RoPE; key = value; VVPA, sink, q-norm, grouped out

``ml_collections`` config files in ``configs/`` hold the same fields as plain dicts;
``model_config_from_dict`` turns them into these dataclasses (and validates them).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

GEOMETRIES = ("v32", "model1")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding on the last ``dim`` dims, interleaved pairs (x[2i], x[2i+1]).

  YaRN (DeepSeek-V3's ``precompute_freqs_cis``) is on when ``yarn_factor > 1``;
  ``mscale_all_dim > 0`` multiplies the softmax scale by mscale^2 (V3 style)."""
  dim: int = 64
  theta: float = 10000.0
  yarn_factor: float = 1.0
  original_max_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """MLA attention in one of the two FlashMLA geometries (DESIGN §1)."""
  geometry: str = "model1"
  n_heads: int = 4
  q_lora_rank: int = 64
  norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  # v32 (MLA with up-projections)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  v_head_dim: int = 128
  # model1 (shared key = value vector)
  head_dim: int = 512
  o_groups: int = 2
  o_lora_rank: int = 64
  vvpa: bool = True
  q_norm: bool = True
  sink: bool = True
  grouped_output: bool = True

  @property
  def qk_rope_head_dim(self) -> int:
    return self.rope.dim

  @property
  def d_qk(self) -> int:
    """FlashMLA's head size at decode: 576 (v32) or 512 (model1)."""
    return self.kv_lora_rank + self.rope.dim if self.geometry == "v32" else self.head_dim

  def validate(self) -> "AttentionConfig":
    if self.geometry not in GEOMETRIES:
      raise ValueError(f"attention.geometry={self.geometry!r}; expected one of {GEOMETRIES}")
    for name in ("n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                 "head_dim", "o_groups", "o_lora_rank"):
      if getattr(self, name) < 1:
        raise ValueError(f"attention.{name}={getattr(self, name)}; expected a positive int")
    if self.rope.dim % 2 or self.rope.dim < 2:
      raise ValueError(f"attention.rope.dim={self.rope.dim}; expected a positive even int")
    if self.geometry == "model1":
      if self.head_dim <= self.rope.dim:
        raise ValueError(f"attention.head_dim={self.head_dim} must exceed rope.dim="
                         f"{self.rope.dim}: the model1 head splits into NoPE + RoPE dims")
      if self.grouped_output and self.n_heads % self.o_groups:
        raise ValueError(f"attention.n_heads={self.n_heads} is not divisible by "
                         f"attention.o_groups={self.o_groups}; expected heads to split "
                         f"evenly into output groups")
    return self


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""
  hidden: int = 256


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 4096
  d_model: int = 128
  n_layers: int = 2
  max_seq_len: int = 256
  norm_eps: float = 1e-6
  attention: AttentionConfig = AttentionConfig()
  ffn: FFNConfig = FFNConfig()
  dtype: str = "float32"          # compute dtype; parameters stay float32
  remat: bool = False
  init_std: float = 0.02

  def validate(self) -> "ModelConfig":
    for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)}; expected a positive int")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")
    self.attention.validate()
    return self


def _from_dict(cls, d: Mapping[str, Any]):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in dict(d).items():
    if k not in fields:
      raise ValueError(f"unknown config field {cls.__name__}.{k}={v!r}; expected one of "
                       f"{sorted(fields)}")
    default = fields[k].default
    if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
      v = _from_dict(type(default), v)
    elif isinstance(v, list):
      v = tuple(v)
    kwargs[k] = v
  return cls(**kwargs)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """ConfigDict/dict (as in configs/*.py) -> validated ModelConfig."""
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  return _from_dict(ModelConfig, d).validate()


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- parameter count

def attention_params(a: AttentionConfig, d: int) -> int:
  n = a.q_lora_rank * d + a.q_lora_rank  # wq_a + q_norm
  if a.geometry == "v32":
    qk = a.qk_nope_head_dim + a.rope.dim
    n += a.q_lora_rank * a.n_heads * qk
    n += d * (a.kv_lora_rank + a.rope.dim) + a.kv_lora_rank  # wkv_a + kv_norm
    n += a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)  # wkv_b
    n += a.n_heads * a.v_head_dim * d  # wo
  else:
    n += a.q_lora_rank * a.n_heads * a.head_dim
    n += d * a.head_dim + a.head_dim  # wkv + kv_norm
    if a.sink:
      n += a.n_heads
    if a.grouped_output:
      n += a.n_heads * a.head_dim * a.o_lora_rank + a.o_groups * a.o_lora_rank * d
    else:
      n += a.n_heads * a.head_dim * d
  return n


def param_count(cfg: ModelConfig) -> int:
  """Exact parameter count from the config (a test checks it against the model)."""
  d = cfg.d_model
  per_layer = 2 * d + attention_params(cfg.attention, d) + 3 * d * cfg.ffn.hidden
  return 2 * cfg.vocab_size * d + d + cfg.n_layers * per_layer


# ---------------------------------------------------------------- presets

def preset(size: str, geometry: str) -> ModelConfig:
  """``tiny`` (CPU, minutes) or ``small`` (~100M parameters, one GPU), either geometry."""
  if geometry not in GEOMETRIES:
    raise ValueError(f"geometry={geometry!r}; expected one of {GEOMETRIES}")
  if size == "tiny":
    attn = AttentionConfig(geometry=geometry, n_heads=4, q_lora_rank=64, o_groups=2,
                           o_lora_rank=64)
    cfg = ModelConfig(vocab_size=4096, d_model=128, n_layers=2, max_seq_len=256,
                      attention=attn, ffn=FFNConfig(hidden=384))
  elif size == "small":
    attn = AttentionConfig(geometry=geometry, n_heads=8, q_lora_rank=384, o_groups=4,
                           o_lora_rank=256)
    cfg = ModelConfig(vocab_size=16384, d_model=768, n_layers=10, max_seq_len=2048,
                      attention=attn, ffn=FFNConfig(hidden=2048), dtype="bfloat16")
  else:
    raise ValueError(f"size={size!r}; expected 'tiny' or 'small'")
  return cfg.validate()


# ---------------------------------------------------------------- run configs

def run_config(model: ModelConfig, name: str):
  """The ml_collections ConfigDict every ``configs/*.py`` returns: model, data, train,
  mesh sections. Any field can be overridden with ``--config.<section>.<field>=...``."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.model = ml_collections.ConfigDict(to_dict(model))
  c.data = ml_collections.ConfigDict(dict(
      paths="",            # comma-separated files/folders; empty = Python stdlib sources
      seq_len=min(256, model.max_seq_len), batch_size=8, tokenizer="bpe",
      val_percent=5.0, cache_dir=""))
  c.train = ml_collections.ConfigDict(dict(
      steps=300, optimizer="adamw", lr=3e-3, muon_lr=0.02, warmup_steps=30,
      min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, clip=1.0, grad_accum=1,
      log_every=10, eval_every=100, eval_batches=4, ckpt_every=100, keep_checkpoints=3,
      preempt_at_step=-1, progress=True))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  return c
