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

import numpy as np

from model1.engram_hash import EngramConfig, head_sizes, table_rows
from model1.mhc import MHCConfig
from model1.moe import MoEConfig

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
  """MLA attention in one of the two FlashMLA geometries (docs/design.md §1)."""
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
  # sparse attention (docs/design.md §2, §8): "dense" | "dsa" (V3.2 lightning indexer + top-k
  # tokens) | "compressed" (V4: sliding window + per-layer CSA/HCA compressed entries)
  sparse: str = "dense"
  index_n_heads: int = 4           # lightning indexer heads (64 at full size)
  index_head_dim: int = 128        # per indexer head (128 at full size)
  index_topk: int = 2048           # tokens (dsa) / compressed entries (CSA) per query
  dsa_stage: str = "sparse"        # "warmup": dense attention, KL trains the indexer only
  index_kl_weight: float = 1.0     # weight of KL(main attention || softmax(index scores))
  window_size: int = 128           # V4 sliding window W (tokens, the query included)
  compress_ratios: tuple[int, ...] = ()  # per layer: 0 window only, 4 CSA, other r HCA
  # every layer with compression uses this RoPE (V4: theta 160000, YaRN x16 from 65536)
  compress_rope: RopeConfig = RopeConfig(theta=160000.0, yarn_factor=16.0,
                                         original_max_len=65536)
  qat: bool = False                # V4 fake quantisation (FP8 keys, Hadamard+FP4 indexer)
  attn_chunk: int = 256            # query chunk of the sparse paths (memory ~ chunk x keys)

  def compress_ratio(self, layer_id: int) -> int:
    """The layer's compression ratio (0 = window only; always 0 unless sparse=compressed)."""
    if self.sparse != "compressed" or not self.compress_ratios:
      return 0
    if not 0 <= layer_id < len(self.compress_ratios):
      raise ValueError(f"layer_id={layer_id} has no entry in attention.compress_ratios="
                       f"{self.compress_ratios}; expected one ratio per layer")
    return self.compress_ratios[layer_id]

  def layer_rope(self, layer_id: int) -> RopeConfig:
    """V4: layers with compression rotate everything with ``compress_rope``."""
    return self.compress_rope if self.compress_ratio(layer_id) else self.rope

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
      if self.head_dim < self.rope.dim:
        raise ValueError(f"attention.head_dim={self.head_dim} must be at least rope.dim="
                         f"{self.rope.dim}: the model1 head is NoPE dims + the RoPE dims")
      if self.grouped_output and self.n_heads % self.o_groups:
        raise ValueError(f"attention.n_heads={self.n_heads} is not divisible by "
                         f"attention.o_groups={self.o_groups}; expected heads to split "
                         f"evenly into output groups")
    self._validate_sparse()
    return self

  def _validate_sparse(self) -> None:
    modes, stages = ("dense", "dsa", "compressed"), ("warmup", "sparse")
    if self.sparse not in modes:
      raise ValueError(f"attention.sparse={self.sparse!r}; expected one of {modes}")
    if self.dsa_stage not in stages:
      raise ValueError(f"attention.dsa_stage={self.dsa_stage!r}; expected one of {stages}")
    for name in ("index_n_heads", "index_head_dim", "index_topk", "window_size", "attn_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"attention.{name}={getattr(self, name)}; expected a positive int")
    if self.index_kl_weight < 0:
      raise ValueError(f"attention.index_kl_weight={self.index_kl_weight}; expected >= 0")
    J = self.index_head_dim
    if self.sparse != "dense" and (J & (J - 1) or J % 32 or J < self.rope.dim):
      raise ValueError(f"attention.index_head_dim={J}; expected a power of two, a multiple "
                       f"of 32 (FP4 blocks) and >= rope.dim={self.rope.dim}: indexer heads "
                       f"split into RoPE dims and whole Hadamard/quantisation blocks")
    if self.qat and self.sparse == "dsa" and J % 128:
      raise ValueError(f"attention.index_head_dim={J} with qat=True and sparse='dsa'; "
                       f"expected a multiple of 128 (V3.2's FP8 indexer tiles)")
    if self.compress_ratios and self.sparse != "compressed":
      raise ValueError(f"attention.compress_ratios={self.compress_ratios} with sparse="
                       f"{self.sparse!r}; expected sparse='compressed' (or no ratios)")
    if self.sparse != "compressed":
      return
    if self.geometry != "model1":
      raise ValueError(f"attention.sparse='compressed' with geometry={self.geometry!r}; "
                       f"expected geometry='model1' (V4 compressed attention)")
    if self.compress_rope.dim != self.rope.dim:
      raise ValueError(f"attention.compress_rope.dim={self.compress_rope.dim}; expected "
                       f"rope.dim={self.rope.dim} (the same rotated dims in every layer)")
    W = self.window_size
    for i, r in enumerate(self.compress_ratios):
      if r < 0 or r == 1 or (r and W % r and r % W):
        raise ValueError(f"attention.compress_ratios[{i}]={r} with window_size={W}; "
                         f"expected 0 (window only) or a ratio >= 2 that divides the "
                         f"window or is a multiple of it (V4: 4 and 128 with W=128)")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""
  hidden: int = 256


@dataclasses.dataclass(frozen=True)
class MTPConfig:
  """Multi-token prediction (V4 layout): ``n_layers`` modules (0 = off; V4 uses 1), each
  predicting one token further ahead; their loss is added with ``loss_weight``."""
  n_layers: int = 0
  loss_weight: float = 0.3


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
  # rematerialisation of each block in the backward pass: "none", "full" or a
  # jax.checkpoint_policies name (model1.scan.REMAT_POLICIES); True/False mean full/none
  remat: str = "none"
  scan_layers: bool = True        # lax.scan over repeating layer groups (model1.scan)
  init_std: float = 0.02
  # the V4 block (each part a switch for ablations)
  mhc: MHCConfig = MHCConfig(hc_mult=1)   # 1 = plain pre-norm residual
  use_moe: bool = False
  n_dense_layers: int = 0                 # dense FFN layers before the first MoE layer
  moe: MoEConfig = MoEConfig()
  mtp: MTPConfig = MTPConfig()
  use_engram: bool = False
  engram: EngramConfig = EngramConfig(engram_vocab_size=(997, 997), n_embed_per_ngram=64,
                                      n_head_per_ngram=4, layer_ids=(1,))

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy_name(self.remat))
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"model.scan_layers={self.scan_layers!r}; expected True or False")

  def is_moe_layer(self, layer_id: int) -> bool:
    return self.use_moe and layer_id >= self.n_dense_layers

  def validate(self) -> "ModelConfig":
    for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)}; expected a positive int")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")
    self.attention.validate()
    if self.mtp.n_layers < 0 or self.mtp.loss_weight < 0:
      raise ValueError(f"model.mtp={self.mtp}; expected n_layers >= 0 and loss_weight >= 0")
    if self.use_moe:
      if not 0 <= self.n_dense_layers < self.n_layers:
        raise ValueError(f"model.n_dense_layers={self.n_dense_layers}; expected 0 <= "
                         f"n_dense_layers < n_layers={self.n_layers} (at least one MoE layer)")
      n_moe = self.n_layers - self.n_dense_layers
      self.moe.validate(n_moe)
      if self.moe.n_hash_layers and self.n_dense_layers:
        raise ValueError(f"moe.n_hash_layers={self.moe.n_hash_layers} with n_dense_layers="
                         f"{self.n_dense_layers}; expected hash layers to be the first "
                         f"layers of the model (n_dense_layers=0), as in V4")
    if self.use_engram:
      self.engram.validate(self.n_layers)
    return self


REMAT_CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                 "everything_saveable")


def remat_policy_name(remat) -> str:
  """``ModelConfig.remat`` in canonical form: the old boolean flag (and its command-line
  spellings "True"/"False") maps to "full"/"none"."""
  if isinstance(remat, (bool, np.bool_)):
    return "full" if remat else "none"
  key = str(remat).strip()
  key = {"true": "full", "false": "none", "1": "full", "0": "none",
         "nothing_saveable": "full"}.get(key.lower(), key)
  if key not in REMAT_CHOICES:
    raise ValueError(f"model.remat={remat!r}; expected a bool or one of {REMAT_CHOICES}")
  return key


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

def _compressor_params(d: int, r: int, head: int) -> int:
  coff = 2 if r == 4 else 1                     # CSA pools overlapping blocks: 2x width
  return 2 * d * coff * head + r * coff * head + head  # wkv, wgate, ape, norm


def attention_params(a: AttentionConfig, d: int, layer_id: int = 0) -> int:
  """Parameters of one attention layer (``layer_id`` picks the V4 compression ratio)."""
  n = a.q_lora_rank * d + a.q_lora_rank  # wq_a + q_norm
  I, J = a.index_n_heads, a.index_head_dim
  r = a.compress_ratio(layer_id)
  if a.sparse == "dsa":  # V3.2 indexer: wq_b, wk, k_norm (LayerNorm), weights_proj
    n += a.q_lora_rank * I * J + d * J + 2 * J + d * I
  if r:
    n += _compressor_params(d, r, a.head_dim)
  if r == 4:  # CSA indexer: wq_b, weights_proj and its own compressor
    n += a.q_lora_rank * I * J + d * I + _compressor_params(d, r, J)
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


def mhc_site_params(m: MHCConfig, d: int) -> int:
  c = m.hc_mult
  return 0 if c == 1 else (2 + c) * c * (c * d + 1) + 3


def mhc_head_params(m: MHCConfig, d: int) -> int:
  c = m.hc_mult
  return 0 if c == 1 else c * (c * d + 1) + 1


def ffn_params(cfg: ModelConfig, layer_id: int) -> int:
  d = cfg.d_model
  if not cfg.is_moe_layer(layer_id):
    return 3 * d * cfg.ffn.hidden
  m = cfg.moe
  return (d * m.n_routed_experts + 3 * m.n_routed_experts * d * m.moe_inter_dim
          + 3 * d * m.n_shared_experts * m.moe_inter_dim)


def engram_params(e: EngramConfig, d: int, c: int, layer_id: int) -> int:
  F = e.engram_hidden_size
  return (table_rows(e, layer_id) * e.head_dim + F * d + d + F * c * d + c * d + 2 * c * d
          + c * d + e.kernel_size * c * d)


def block_params(cfg: ModelConfig, layer_id: int, attn_cfg: AttentionConfig | None = None) -> int:
  d = cfg.d_model
  n = 2 * d + attention_params(attn_cfg or cfg.attention, d, layer_id) + ffn_params(cfg, layer_id)
  n += 2 * mhc_site_params(cfg.mhc, d)
  if cfg.use_engram and layer_id in cfg.engram.layer_ids:
    n += engram_params(cfg.engram, d, cfg.mhc.hc_mult, layer_id)
  return n


def mtp_attention(cfg: ModelConfig) -> AttentionConfig:
  """The MTP block's attention: window-only when the ratio list has no entry for it."""
  a = cfg.attention
  need = cfg.n_layers + cfg.mtp.n_layers
  if a.sparse == "compressed" and len(a.compress_ratios) < need:
    a = dataclasses.replace(a, compress_ratios=a.compress_ratios
                            + (0,) * (need - len(a.compress_ratios)))
  return a


def param_count(cfg: ModelConfig) -> int:
  """Exact parameter count from the config (a test checks it against the model)."""
  d = cfg.d_model
  n = 2 * cfg.vocab_size * d + d + mhc_head_params(cfg.mhc, d)
  n += sum(block_params(cfg, i) for i in range(cfg.n_layers))
  for i in range(cfg.mtp.n_layers):  # enorm, hnorm, e_proj, h_proj, norm, hc_head + block
    n += 3 * d + 2 * d * d + mhc_head_params(cfg.mhc, d)
    n += block_params(cfg, cfg.n_layers + i, mtp_attention(cfg))
  return n


# ---------------------------------------------------------------- presets

def preset(size: str, geometry: str, sparse: str | None = None) -> ModelConfig:
  """``tiny`` (CPU, minutes) or ``small`` (~100M parameters, one GPU), either geometry.

  ``model1``: the full V4 model scaled down — V4's attention layer pattern (a sliding
  window in every layer plus per-layer compressed entries: ratio 4 = CSA with an indexer
  choosing top-k entries, larger = HCA; tiny: window 32, ratios (4, 16); small: window 128,
  ratios (0, 4, 128, 4, 128, 4, 128, 4)), mHC (4 streams), DeepSeekMoE (the first layer
  hash-routed, shared expert, sqrt-softplus scores), one MTP module. ``v32``: V3.2's MLA
  with the same MoE and MTP, dense attention and a plain residual (V3.2 has no mHC; its
  DSA is ``sparse="dsa"``, configs/tiny_v32_dsa.py). ``sparse`` overrides the attention
  mode ("dense" for ablations; None = the geometry's own). Every other part is a switch
  too (``mhc.hc_mult=1``, ``use_moe=False``, ``mtp.n_layers=0``)."""
  if geometry not in GEOMETRIES:
    raise ValueError(f"geometry={geometry!r}; expected one of {GEOMETRIES}")
  sparse = sparse or ("compressed" if geometry == "model1" else "dense")
  if sparse not in ("dense", "dsa", "compressed"):
    raise ValueError(f"sparse={sparse!r}; expected None, 'dense', 'dsa' or 'compressed'")
  hc = MHCConfig(hc_mult=4 if geometry == "model1" else 1)
  if size == "tiny":
    attn = AttentionConfig(geometry=geometry, n_heads=4, q_lora_rank=64, o_groups=2,
                           o_lora_rank=64)
    sp = dict(window_size=32, compress_ratios=(4, 16), index_n_heads=4, index_head_dim=64,
              index_topk=16)
    dsa = dict(index_n_heads=4, index_head_dim=64, index_topk=32)
    moe = MoEConfig(n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                    moe_inter_dim=128, n_hash_layers=1, route_scale=1.0)
    cfg = ModelConfig(vocab_size=4096, d_model=128, n_layers=2, max_seq_len=256,
                      attention=attn, ffn=FFNConfig(hidden=384), mhc=hc, use_moe=True,
                      moe=moe, mtp=MTPConfig(n_layers=1, loss_weight=0.3))
  elif size == "small":
    attn = AttentionConfig(geometry=geometry, n_heads=8, q_lora_rank=384, o_groups=4,
                           o_lora_rank=256)
    sp = dict(window_size=128, compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4),
              index_n_heads=8, index_head_dim=128, index_topk=128)
    dsa = dict(index_n_heads=8, index_head_dim=128, index_topk=512)
    moe = MoEConfig(n_routed_experts=16, n_activated_experts=2, n_shared_experts=1,
                    moe_inter_dim=256, n_hash_layers=1, route_scale=1.5)
    cfg = ModelConfig(vocab_size=16384, d_model=512, n_layers=8, max_seq_len=2048,
                      attention=attn, ffn=FFNConfig(hidden=1536), dtype="bfloat16",
                      mhc=hc, use_moe=True, moe=moe, mtp=MTPConfig(n_layers=1))
  else:
    raise ValueError(f"size={size!r}; expected 'tiny' or 'small'")
  if sparse == "compressed":
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(attn, sparse=sparse, **sp))
  elif sparse == "dsa":
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(attn, sparse=sparse, **dsa))
  return cfg.validate()


def dense_attention(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with plain dense causal attention (no indexer, window or compression)."""
  return dataclasses.replace(cfg, attention=dataclasses.replace(
      cfg.attention, sparse="dense", compress_ratios=())).validate()


def with_engram(cfg: ModelConfig, rows_per_layer: int, layer_ids=(1,), max_ngram_size: int = 3,
                n_head_per_ngram: int = 4, n_embed_per_ngram: int | None = None,
                host_table: bool = False) -> ModelConfig:
  """Add Engram memory to a preset. ``rows_per_layer`` is the table budget knob (rows of
  one layer's hashed embedding table; memory = rows x n_embed_per_ngram/heads x 4 bytes)."""
  e = EngramConfig(
      engram_vocab_size=EngramConfig.vocab_sizes_for_budget(rows_per_layer, max_ngram_size,
                                                            n_head_per_ngram),
      max_ngram_size=max_ngram_size, n_head_per_ngram=n_head_per_ngram,
      n_embed_per_ngram=n_embed_per_ngram or cfg.d_model // 2, layer_ids=tuple(layer_ids),
      host_table=host_table)
  return dataclasses.replace(cfg, use_engram=True, engram=e).validate()


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
      val_percent=5.0, cache_dir="",
      synthetic_ratio=0.0,  # fraction of rows replaced by passkey/MQAR examples
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=300, optimizer="adamw", lr=3e-3, muon_lr=0.02, warmup_steps=30,
      min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, clip=1.0, grad_accum=1,
      log_every=10, eval_every=100, eval_batches=4, ckpt_every=100, keep_checkpoints=3,
      preempt_at_step=-1, progress=True))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1,
                                          num_devices=0))  # 0 = every device
  return c
