"""DeepSeek checkpoints <-> model1: config.json fields, tensor names, layouts, shards.

What: the pieces ``model1.convert`` (the CLI) is built from.

  * ``config_from_deepseek``: a DeepSeek ``config.json`` (V4-Flash inference config, or
    V3.2's Hugging Face / inference config) -> ``ModelConfig`` for a slice of layers; every
    field model1 cannot express is named in one ``ValueError``.
  * ``tensor_plan``: for every model1 variable (``nnx.state`` path) the DeepSeek tensor(s)
    it comes from and the layout change. DeepSeek's ``nn.Linear`` weights are [out, in],
    model1's Dense weights [in, *out]; ``wq_b``/``wkv_b``/indexer ``wq_b`` split out into
    [in, heads, dim]; ``wo_a`` [G*R, K] is model1's [G, K, R]; routed experts are one
    tensor per expert (``ffn.experts.{e}.w1.weight``) stacked into [E, in, out].
  * names: the inference names (``layers.3.attn.wq_a.weight`` + ``.scale``; V4-Flash ships
    these) and the Hugging Face names of V3.2 (``model.layers.3.self_attn.q_a_proj.weight``
    + ``.weight_scale_inv``), translated as DeepSeek's ``inference/convert.py`` does.
  * ``ShardReader``: lazy reads through ``model.safetensors.index.json``; a shard is
    opened only when one of its tensors is needed (``opened`` / ``bytes_read`` count it).

Source: DeepSeek-V4-Flash and DeepSeek-V3.2-Exp ``inference/model.py`` (module names and
shapes), ``inference/convert.py`` (name mapping), ``config.json`` files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from model1 import quant
from model1.config import (AttentionConfig, FFNConfig, ModelConfig, MTPConfig, RopeConfig)
from model1.mhc import MHCConfig
from model1.moe import MoEConfig

INDEX = "model.safetensors.index.json"

# ---------------------------------------------------------------- config.json

# fields that describe storage, tokens or the serving runtime, not the network
_IGNORED = {"architectures", "model_type", "auto_map", "torch_dtype", "transformers_version",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
            "quantization_config", "dtype", "scale_fmt", "expert_dtype", "scale_dtype",
            "max_batch_size", "max_seq_len", "max_position_embeddings", "ep_size",
            "pretraining_tp", "aux_loss_alpha", "seq_aux", "moe_layer_freq", "num_key_value_heads",
            "hidden_act", "tie_word_embeddings", "attention_bias", "attention_dropout",
            "topk_method", "norm_topk_prob", "n_group", "topk_group", "n_expert_groups",
            "n_limited_groups", "rope_scaling", "mscale", "num_nextn_predict_layers",
            "n_mtp_layers", "first_k_dense_replace", "n_dense_layers", "inter_dim",
            "intermediate_size"}
# Hugging Face names (V3.2) -> inference names
_HF_FIELDS = {"hidden_size": "dim", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "moe_intermediate_size": "moe_inter_dim",
              "num_experts_per_tok": "n_activated_experts", "routed_scaling_factor": "route_scale",
              "scoring_func": "score_func", "qk_rope_head_dim": "rope_head_dim",
              "rms_norm_eps": "norm_eps"}
_KNOWN = {"vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
          "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func",
          "route_scale", "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim",
          "norm_eps", "o_groups", "o_lora_rank", "window_size", "compress_ratios",
          "compress_rope_theta", "original_seq_len", "rope_theta", "rope_factor", "beta_fast",
          "beta_slow", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
          "hc_sinkhorn_iters", "hc_eps", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
          "mscale_all_dim", "original_max_position_embeddings", "factor"}


@dataclasses.dataclass(frozen=True)
class Source:
  """What was converted: the model family and the slice (original layer ids)."""
  family: str                      # "v4" | "v32"
  first_layer: int
  n_layers: int                    # layers in the slice
  total_layers: int                # layers of the full checkpoint
  with_mtp: bool
  fp8_scale: str                   # "e8m0" (V4 ``scale``) | "f32" (V3.2 ``weight_scale_inv``)


def normalise_config(raw: dict) -> dict:
  """HF field names -> inference names (``rope_scaling`` flattened)."""
  d = {}
  for k, v in raw.items():
    d[_HF_FIELDS.get(k, k)] = v
  rs = raw.get("rope_scaling") or {}
  for k in ("factor", "beta_fast", "beta_slow", "mscale_all_dim", "original_max_position_embeddings"):
    if k in rs:
      d.setdefault({"factor": "rope_factor",
                    "original_max_position_embeddings": "original_seq_len"}.get(k, k), rs[k])
  return d


def _unsupported(raw: dict, d: dict) -> list[str]:
  """Every field whose value model1 cannot express, as 'field=value (why)'."""
  bad = [f"{k}={raw[k]!r} (unknown field)" for k in raw
         if _HF_FIELDS.get(k, k) not in _KNOWN | _IGNORED]
  groups = d.get("n_expert_groups", d.get("n_group", 1)) or 1
  if groups > 1:
    bad.append(f"n_expert_groups={groups} (group-limited routing; expected 1)")
  if raw.get("tie_word_embeddings"):
    bad.append("tie_word_embeddings=True (model1 has a separate head)")
  if raw.get("attention_bias"):
    bad.append("attention_bias=True (model1 projections have no bias)")
  if raw.get("hidden_act", "silu") != "silu":
    bad.append(f"hidden_act={raw['hidden_act']!r} (expected 'silu')")
  if raw.get("n_shared_experts", 1) > 1 and "compress_ratios" in d:
    bad.append(f"n_shared_experts={raw['n_shared_experts']} (V4 has one shared expert)")
  rt = (raw.get("rope_scaling") or {}).get("type", "yarn")
  if rt not in ("yarn", "deepseek_yarn"):
    bad.append(f"rope_scaling.type={rt!r} (expected 'yarn')")
  if d.get("score_func", "softmax") not in ("sqrtsoftplus", "sigmoid", "softmax"):
    bad.append(f"score_func={d['score_func']!r}")
  return bad


def config_from_deepseek(raw: dict, layers: tuple[int, int] | None = None, dtype: str = "bfloat16",
                         max_seq_len: int = 4096) -> tuple[ModelConfig, Source]:
  """DeepSeek ``config.json`` -> (ModelConfig of the slice ``layers`` = (first, last)
  inclusive, or all; Source). MTP is kept only for the full model."""
  d = normalise_config(raw)
  bad = _unsupported(raw, d)
  if bad:
    raise ValueError("config.json: fields model1 cannot express: " + "; ".join(bad))
  v4 = "compress_ratios" in d or "hc_mult" in d
  n_total = int(d["n_layers"])
  a, b = layers if layers is not None else (0, n_total - 1)
  if not 0 <= a <= b < n_total:
    raise ValueError(f"--layers={a}-{b}; expected 0 <= first <= last < n_layers={n_total}")
  n = b - a + 1
  full = layers is None or (a == 0 and b == n_total - 1)
  n_mtp = int(d.get("n_mtp_layers", 1 if v4 else 0)) if full and v4 else 0
  rope = RopeConfig(dim=int(d.get("rope_head_dim", 64)), theta=float(d.get("rope_theta", 10000.0)))
  common = dict(n_heads=int(d["n_heads"]), q_lora_rank=int(d["q_lora_rank"]),
                norm_eps=float(d.get("norm_eps", 1e-6)))
  n_dense = 0
  if v4:
    ratios = tuple(int(r) for r in d["compress_ratios"])
    want = n_total + (int(d.get("n_mtp_layers", 1)))
    if len(ratios) < n_total:
      raise ValueError(f"config.json: compress_ratios has {len(ratios)} entries; expected "
                       f"one per layer ({n_total}, plus the MTP layers' {want - n_total})")
    sl = ratios[a:b + 1] + (ratios[n_total:n_total + n_mtp] if n_mtp else ())
    yarn = RopeConfig(dim=rope.dim, theta=float(d.get("compress_rope_theta", 160000.0)),
                      yarn_factor=float(d.get("rope_factor", 16.0)),
                      original_max_len=int(d.get("original_seq_len", 65536)),
                      beta_fast=float(d.get("beta_fast", 32)), beta_slow=float(d.get("beta_slow", 1)))
    attn = AttentionConfig(geometry="model1", head_dim=int(d["head_dim"]),
                           o_groups=int(d["o_groups"]), o_lora_rank=int(d["o_lora_rank"]),
                           rope=rope, sparse="compressed", window_size=int(d["window_size"]),
                           compress_ratios=sl, compress_rope=yarn,
                           index_n_heads=int(d["index_n_heads"]),
                           index_head_dim=int(d["index_head_dim"]),
                           index_topk=int(d["index_topk"]), **common)
    mhc = MHCConfig(hc_mult=int(d.get("hc_mult", 4)),
                    sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
                    eps=float(d.get("hc_eps", 1e-6)), norm_eps=float(d.get("norm_eps", 1e-6)))
    n_hash = max(0, min(int(d.get("n_hash_layers", 0)) - a, n))
    ffn_hidden = int(d["moe_inter_dim"])
  else:
    n_dense_total = int(raw.get("first_k_dense_replace", raw.get("n_dense_layers", 0)))
    n_dense = max(0, min(n_dense_total - a, n))
    factor = float(d.get("rope_factor", 1.0))
    if max_seq_len <= int(d.get("original_seq_len", 4096)):
      factor = 1.0                      # DeepSeek-V3's YaRN is on only past original_seq_len
    rope = dataclasses.replace(rope, yarn_factor=factor,
                               original_max_len=int(d.get("original_seq_len", 4096)),
                               beta_fast=float(d.get("beta_fast", 32)),
                               beta_slow=float(d.get("beta_slow", 1)),
                               mscale_all_dim=float(d.get("mscale_all_dim", 0.0) or
                                                    d.get("mscale", 0.0) or 0.0))
    dsa = "index_topk" in d
    attn = AttentionConfig(geometry="v32", kv_lora_rank=int(d["kv_lora_rank"]),
                           qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                           v_head_dim=int(d["v_head_dim"]), rope=rope,
                           sparse="dsa" if dsa else "dense",
                           index_n_heads=int(d.get("index_n_heads", 4)),
                           index_head_dim=int(d.get("index_head_dim", 128)),
                           index_topk=int(d.get("index_topk", 2048)), **common)
    mhc = MHCConfig(hc_mult=1)
    n_hash = 0
    ffn_hidden = int(raw.get("intermediate_size", raw.get("inter_dim", d["moe_inter_dim"])))
  use_moe = n_dense < n
  moe = MoEConfig(n_routed_experts=int(d["n_routed_experts"]),
                  n_activated_experts=int(d["n_activated_experts"]),
                  n_shared_experts=int(d.get("n_shared_experts", 1)),
                  moe_inter_dim=int(d["moe_inter_dim"]),
                  route_scale=float(d.get("route_scale", 1.0)), n_hash_layers=n_hash,
                  score_func=d.get("score_func", "softmax"),
                  swiglu_limit=float(d.get("swiglu_limit", 0.0)))
  cfg = ModelConfig(vocab_size=int(d["vocab_size"]), d_model=int(d["dim"]), n_layers=n,
                    max_seq_len=max_seq_len, norm_eps=float(d.get("norm_eps", 1e-6)),
                    attention=attn, ffn=FFNConfig(hidden=ffn_hidden), dtype=dtype, mhc=mhc,
                    use_moe=use_moe, n_dense_layers=n_dense if use_moe else 0, moe=moe,
                    mtp=MTPConfig(n_layers=n_mtp))
  scale = "e8m0" if v4 else "f32"          # V4 `scale` e8m0, V3.2 `weight_scale_inv` fp32
  return cfg.validate(), Source("v4" if v4 else "v32", a, n, n_total, n_mtp > 0, scale)


# ---------------------------------------------------------------- names and layouts

@dataclasses.dataclass(frozen=True)
class Entry:
  """One model1 variable: its DeepSeek name(s), layout ``kind`` and storage format.

  kind: "id" (same array), "T" ([in,out] <-> [out,in]), "split" ([in,N,H] <-> [N*H,in]),
  "wo_a" ([G,K,R] <-> [G*R,K]), "experts" ([E,in,out] <-> E tensors [out,in]).
  fmt: "fp8", "fp4", "bf16", "f32" or "i32" (what DeepSeek stores)."""
  path: tuple[str, ...]
  names: tuple[str, ...]
  kind: str
  fmt: str


_FP8_LINEARS = ("wq_a", "wq_b", "wkv", "wkv_a", "wkv_b", "wo", "wo_a", "wo_b", "wk",
                "e_proj", "h_proj", "w1", "w2", "w3")
_F32_LEAVES = ("attn_sink", "ape", "bias")


def _ds_leaf(parts: list[str]) -> str:
  """model1 path inside a block/top level -> DeepSeek inference name (no prefix)."""
  if parts[0] in ("hc_attn", "hc_ffn", "hc_head"):
    return f"{parts[0]}_{parts[1]}"
  if parts[:2] == ["ffn", "gate"]:
    return "ffn.gate.weight"
  if parts[:2] == ["ffn", "bias"]:
    return "ffn.gate.bias"
  if parts[:2] == ["ffn", "tid2eid"]:
    return "ffn.gate.tid2eid"
  if parts[:2] == ["ffn", "shared_experts"]:
    return f"ffn.shared_experts.{parts[2]}.weight"
  if parts[-1] == "wo_a":
    return ".".join(parts) + ".weight"
  return ".".join(parts)


def tensor_plan(state: dict, src: Source) -> list[Entry]:
  """Entries for every leaf of ``state`` (a pure dict of arrays/ShapeDtypeStructs) that a
  DeepSeek checkpoint holds (MoE load counters are skipped)."""
  out = []

  def walk(tree, path):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, path + (str(k),))
      return
    if path[-1] == "load":
      return
    parts = list(path)
    if parts[0] == "layers":
      prefix, rest = f"layers.{int(parts[1]) + src.first_layer}.", parts[2:]
    elif parts[0] == "mtp":
      prefix = f"mtp.{parts[1]}."
      rest = parts[3:] if parts[2] == "block" else parts[2:]
    else:
      prefix, rest = "", parts
    leaf = _ds_leaf(rest)
    ndim = len(tree.shape)
    if rest[:2] == ["ffn", "experts"]:
      E = tree.shape[0]
      names = tuple(f"{prefix}ffn.experts.{e}.{rest[2]}.weight" for e in range(E))
      fmt = "fp4" if src.family == "v4" else "fp8"
      out.append(Entry(path, names, "experts", fmt))
      return
    if rest[-1] == "wo_a":
      kind = "wo_a"
    elif ndim == 3:
      kind = "split"
    elif ndim == 2 and rest[0] not in ("embed", "hc_attn", "hc_ffn", "hc_head") \
        and rest[-1] not in ("ape", "tid2eid"):
      kind = "T"
    else:
      kind = "id"
    owner = rest[-2] if rest[-1] == "weight" else rest[-1]
    if rest[-1] == "tid2eid":
      fmt = "i32"
    elif rest[0].startswith("hc_") or rest[-1] in _F32_LEAVES:
      fmt = "f32"
    elif kind in ("T", "split", "wo_a") and owner in _FP8_LINEARS and "compressor" not in rest:
      fmt = "fp8"
    else:
      fmt = "bf16"
    out.append(Entry(path, (prefix + leaf,), kind, fmt))

  walk(state, ())
  return out


def to_model1(kind: str, arrays: list[np.ndarray], shape: tuple) -> np.ndarray:
  """DeepSeek layout -> model1 layout (``shape`` is model1's)."""
  if kind == "experts":
    return np.stack([a.T for a in arrays])
  a = arrays[0]
  if kind == "T":
    return a.T
  if kind == "split":
    return a.T.reshape(shape)
  if kind == "wo_a":
    G, K, R = shape
    return a.reshape(G, R, K).transpose(0, 2, 1)
  return a


def ds_shapes(kind: str, shape: tuple) -> tuple:
  """The DeepSeek shape of each tensor of an entry with model1 ``shape``."""
  if kind == "experts":
    return (shape[2], shape[1])
  if kind == "T":
    return (shape[1], shape[0])
  if kind == "split":
    return (int(np.prod(shape[1:])), shape[0])
  if kind == "wo_a":
    return (shape[0] * shape[2], shape[1])
  return tuple(shape)


def to_deepseek(kind: str, x: np.ndarray) -> list[np.ndarray]:
  """model1 layout -> DeepSeek tensor(s)."""
  if kind == "experts":
    return [np.ascontiguousarray(e.T) for e in x]
  if kind == "T":
    return [np.ascontiguousarray(x.T)]
  if kind == "split":
    return [np.ascontiguousarray(x.reshape(x.shape[0], -1).T)]
  if kind == "wo_a":
    G, K, R = x.shape
    return [np.ascontiguousarray(x.transpose(0, 2, 1).reshape(G * R, K))]
  return [x]


# Hugging Face <-> inference names (DeepSeek's inference/convert.py mapping)
_HF_TO_INF = {"embed_tokens": "embed", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "q_proj": "wq", "q_a_proj": "wq_a",
              "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
              "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head"}
_INF_TO_HF = {v: k for k, v in _HF_TO_INF.items()}
_PART_HF = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale",
            "e_score_correction_bias": "bias"}
_PART_INF = {v: k for k, v in _PART_HF.items()}


def hf_to_inference(name: str) -> str:
  parts = name.split(".")
  if parts[0] == "model":
    parts = parts[1:]
  parts = [_PART_HF.get(p, p) for p in parts]
  if len(parts) >= 2 and parts[-2] in _HF_TO_INF:
    parts[-2] = _HF_TO_INF[parts[-2]]
  return ".".join(parts)


def inference_to_hf(name: str) -> str:
  parts = name.split(".")
  if parts[-1] == "scale":
    parts[-1] = "weight_scale_inv"
  if parts[-1] == "bias" and len(parts) > 1 and parts[-2] == "gate":
    parts[-1] = "e_score_correction_bias"
  if len(parts) >= 2 and parts[-1] in ("weight", "weight_scale_inv"):
    parts[-2] = _INF_TO_HF.get(parts[-2], parts[-2])
  parts = [_PART_INF.get(p, p) if p in ("attn", "ffn") else p for p in parts[:-1]] + parts[-1:]
  return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def scale_name(weight_name: str) -> str:
  """``x.weight`` -> ``x.scale`` (inference names)."""
  return weight_name[:-len("weight")] + "scale"


# ---------------------------------------------------------------- reading shards

@contextlib.contextmanager
def numpy_low_precision_names():
  """safetensors' numpy backend looks float8/bfloat16 dtypes up as ``numpy.<name>``;
  numpy has none, ml_dtypes has them: alias them for the duration of a read."""
  names = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")
  added = [n for n in names if not hasattr(np, n)]
  for n in added:
    setattr(np, n, getattr(ml_dtypes, n))
  try:
    yield
  finally:
    for n in added:
      delattr(np, n)


class ShardReader:
  """Lazy tensor access by inference name across the shards of ``directory``."""

  def __init__(self, directory: str | Path):
    from safetensors import safe_open
    self._safe_open = safe_open
    self.dir = Path(directory)
    self.opened: list[str] = []
    self.bytes_read = 0
    self._handles: dict[str, object] = {}
    self._stack = contextlib.ExitStack()
    idx = self.dir / INDEX
    if idx.exists():
      try:
        weight_map = json.loads(idx.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{idx}: unreadable ({e}); expected a JSON object with a "
                         f"'weight_map' of tensor name -> shard file") from None
    else:
      files = sorted(self.dir.glob("*.safetensors"))
      if not files:
        raise ValueError(f"--from={self.dir}: no {INDEX} and no *.safetensors files; expected "
                         f"a DeepSeek checkpoint directory")
      weight_map = {}
      with numpy_low_precision_names():
        for f in files:
          with safe_open(str(f), framework="numpy") as h:
            weight_map.update({k: f.name for k in h.keys()})
      self.opened = [f.name for f in files]
    self.hf = any(k.startswith("model.") or k.startswith("lm_head") for k in weight_map)
    self.source_names = {}
    for k, f in weight_map.items():
      self.source_names[hf_to_inference(k) if self.hf else k] = (k, f)

  def close(self):
    self._stack.close()

  def __contains__(self, name: str) -> bool:
    return name in self.source_names

  def file_of(self, name: str) -> str:
    return self.source_names[name][1]

  def raw(self, name: str) -> np.ndarray:
    """The stored tensor (numpy; float8/bfloat16 as ml_dtypes)."""
    if name not in self.source_names:
      hint = (" (an exported slice holds only its own layers: pass --layers)"
              if name.startswith(("layers.", "mtp.")) else "")
      raise ValueError(f"tensor {name!r} not found in {self.dir} (index or shards); expected "
                       f"by the model config{hint}")
    key, fname = self.source_names[name]
    if fname not in self._handles:
      path = self.dir / fname
      if not path.exists():
        raise ValueError(f"missing shard {path} (listed for tensor {key!r}); expected the "
                         f"file the index names")
      with numpy_low_precision_names():
        self._handles[fname] = self._stack.enter_context(
            self._safe_open(str(path), framework="numpy"))
      self.opened.append(fname)
    with numpy_low_precision_names():
      x = self._handles[fname].get_tensor(key)
    self.bytes_read += x.nbytes
    return x

  def weight(self, name: str, out_dtype=np.float32) -> np.ndarray:
    """A tensor dequantised as DeepSeek does: FP8 e4m3 with a block scale, packed FP4
    with a 1x32 scale, anything else as stored (floats -> ``out_dtype``)."""
    x = self.raw(name)
    sname = scale_name(name) if name.endswith(".weight") else None
    where = f"{self.file_of(name)}: {name}"
    if x.dtype == ml_dtypes.float8_e4m3fn:
      if sname is None or sname not in self:
        raise ValueError(f"{where}: float8_e4m3fn weight without a scale tensor {sname!r}; "
                         f"expected FP8 weights to come with their block scales")
      w = quant.dequant_fp8(x, self.raw(sname), where)  # bf16, as DeepSeek's weight_dequant
      return w.astype(out_dtype)
    if x.dtype in (np.int8, np.uint8) and sname is not None and sname in self:
      return quant.dequant_fp4(x, self.raw(sname), where).astype(out_dtype)
    if np.issubdtype(x.dtype, np.integer):
      return x
    return x.astype(out_dtype)
