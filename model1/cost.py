"""Long-context cost model: KV-cache bytes per sequence and FLOPs per new token.

What. For a ``ModelConfig`` and a context of L tokens, plain Python arithmetic (no jit,
no arrays) gives (1) the bytes of every cache a sequence of L tokens holds, by layer
kind, and (2) the FLOPs of decoding one more token, by term. Every formula below is
written from first principles and names the model code that does the work, so a
number can be traced to a line of the model (a test compares the cache bytes and the
attended-key counts with what ``model1.generate`` really allocates and gathers).

Symbols: D d_model, V vocab, N attention heads, Q q_lora_rank, Hd head dim (512 MODEL1;
V32: latent 512 + rope 64 = 576, value 512, qk_nope P 128, v_head Vh 128), G o_groups,
O o_lora_rank, W window, r compress ratio (coff = 2 iff r = 4, else 1), I indexer heads,
J indexer head dim, k index_topk, E routed experts, X active experts, F expert width,
S shared-expert count, C mHC streams, L context length INCLUDING the new token.

Layer kinds (``layer_kinds``): ``dense`` (MLA over every token), ``dsa`` (V3.2: MLA over
the indexer's top-k tokens), and the V4 kinds ``window`` (r = 0), ``csa`` (r = 4) and
``hca`` (other r), all three with the sliding window.

KV-cache bytes of one sequence (``kv_cache_bytes``; what a cache sized for L tokens
allocates, the way ``kv_cache.PagedKVCache.for_model`` sizes it):

  token caches (dense, dsa)  ceil(L/B)*B tokens (page blocks of B) x e bytes
                             (``PagedKVCache.create``: one KCache block row per B tokens)
  dsa indexer keys           same tokens x k_I bytes (``DSALayerCache.index_k``)
  V4 window ring             W x e                 (``CompressedLayerCache.window``)
  V4 compressed entries      ceil(L/r) x e         (``CompressedLayerCache.comp``)
  V4 CSA indexer keys        ceil(L/4) x k_I       (``CompressedLayerCache.icomp``)
  compressor states          2 x 4 x (coff*r) x (coff*Hd) bytes, plus 2 x 4 x 8 x 2J for
                             the CSA indexer's (fp32 kv and score of the unfinished
                             block(s); ``compressor.empty_state``, V4's kv_state/score_state)

  e, the cached vector (``Storage.kv``/``kv_layout``): FP8 = FlashMLA's formats, V32 656
  B (512 e4m3 + 4 fp32 scales + 64 bf16) and MODEL1 584 B (448 e4m3 + 64 bf16 + 7 ue8m0
  scales + 1 pad byte); the structure-of-arrays ``KCache`` this project allocates holds
  583 for MODEL1 (no pad byte; ``kv_layout="soa"``); bf16 = 2 x 1152 / 1024.
  k_I, one indexer key (``Storage.indexer``): ``native`` = the released models' formats,
  V3.2 FP8 J + 4*J/128 (e4m3 + one fp32 scale per 128: 132 B) and V4 FP4 J/2 + J/32
  (e2m1 + one ue8m0 scale per 32, after a Hadamard rotation: 68 B); ``fp32`` = this
  project's caches (4J); ``bf16`` = 2J.
  The MTP block's cache (``mtp=True``) is that of one more layer of its own kind (V4: the
  last ``compress_ratios`` entry, 0 = window only; V3.2: a full DSA layer).

Keys one new token attends to (``attended``; the decode paths of ``attention.MLA``):

  dense  L                       (``MLA.decode`` -> dense_decode over cache_seqlens)
  dsa    min(k, L); the indexer scores all L tokens     (``MLA._decode_dsa``)
  V4     window min(W, L)  +  hca: L // r  |  csa: min(k, L // 4), the indexer scoring
         all L // 4 entries  (``MLA._decode_compressed``: ``widx_BW`` and ``eidx_BX``)

FLOPs of one new token (``decode_flops``; a multiply-add = 2 FLOPs; elementwise work,
norms, RoPE, softmax and top-k are not counted — they are O(D) or O(keys), well under 1%):

  attention projections   V4:  2(DQ + QNHd + DHd + NHdO + GOD)
                               wq_a, wq_b, wkv, wo_a (grouped einsum), wo_b
                               (``MLA._qr``/``_q``/``cache_vector``/``_model1_output``)
                          V32: 2(DQ + QN(P+64) + D(512+64)) + 2N*P*512 + 2N*512*Vh
                               + 2N*Vh*D: wq_a, wq_b, wkv_a, wkv_b absorbed into the
                               query and the output, wo (``decode_queries``/``decode_output``)
  attention core          2 N K (d_qk + d_v), K = attended keys; d_qk = d_v = 512 (V4),
                          576 and 512 (V32) — FlashMLA's count (``sparse_decode``)
  compressor (V4, r > 0)  2 x 2 D coff Hd (wkv, wgate) + 2 coff Hd (pooling of one entry
                          every r tokens, amortised) (``Compressor.project``/``step``)
  indexer projections     V4 CSA: 2(QIJ + DI) + 2 x 2 D 2J (wq_b, weights_proj, its own
                          overlapping compressor); V3.2: 2(QIJ + DJ + DI) (wq_b, wk,
                          weights_proj) (``CSAIndexer``/``DSAIndexer``)
  indexer scores          2 I J M + 2 I M over the M scored keys (q.k, then ReLU x w
                          summed over heads) (``indexer.index_scores``)
  MoE                     router 2DE; routed 6DFX (w1, w3, w2 of X experts); shared 6DFS
                          (``moe.MoE``); a dense FFN layer 6 D hidden (``layers.SwiGLU``)
  mHC (C > 1)             per site: 2 C D (2+C) C (mixes) + 2 C D (pre sum) + 2 C^2 D +
                          C D (comb mix + post); two sites per layer; the head 2 C D C +
                          2 C D (``mhc.HyperConnection``/``HCHead``)
  LM head                 2 D V (``Transformer.logits``)
  MTP (``mtp=True``)      e_proj, h_proj 2 x 2 D^2, its block as above and the LM head
                          again (one draft token per step)

Precision and "equivalent FP8 FLOPs". Each term carries the precision DeepSeek's released
inference code runs it in (``PRECISION``): projections FP8 (e4m3 weights and
activations, 128-blocks); V4 routed experts FP4 weights x FP8 activations (``fp4w``:
runs at the FP8 rate); the V4 indexer q.k with both operands FP4 (``fp4``); V3.2's indexer
FP8; the attention core bf16 (FlashMLA dequantises the FP8 cache to bf16 before its
matmuls); V4's ``wo_a``, ``weights_proj`` and the LM head bf16; V4's compressors, mHC
mixes and router fp32. Equivalent FP8 FLOPs weight each FLOP by (dense FP8 peak / dense
peak of its precision) on a GPU with native FP4 (NVIDIA Blackwell ratios
FP4 : FP8 : BF16 : TF32 = 2 : 1 : 1/2 : 1/4), so ``EQ_FP8`` = fp4 0.5, fp4w 1, fp8 1,
bf16 2, fp32 4. Raw FLOPs are always reported too.

Parameters (``param_counts``): exact, from ``config.param_count`` (tests check it against
``nnx.eval_shape`` of the model); ``total`` excludes the MTP module (DeepSeek's
published totals do), ``activated`` = total minus the routed experts a token does not use
(embedding table included), ``activated_no_embed`` without the input embedding.
"""
from __future__ import annotations

import dataclasses
import math

from model1.config import (ModelConfig, attention_params, block_params, mhc_head_params,
                           mtp_attention, param_count)

GIB = 1 << 30
KINDS = ("dense", "dsa", "window", "csa", "hca")
EQ_FP8 = {"fp4": 0.5, "fp4w": 1.0, "fp8": 1.0, "bf16": 2.0, "fp32": 4.0}

# precision of each FLOP term in DeepSeek's released inference code, per geometry
PRECISION = {
    "v32": dict(attn_proj="fp8", attn_absorb="bf16", attn_out_a="fp8", attn_core="bf16",
                indexer_proj="fp8", indexer_weights="bf16", indexer_scores="fp8",
                compressor="fp32", router="bf16", routed_experts="fp8",
                shared_experts="fp8", dense_ffn="fp8", mhc="fp32", lm_head="bf16",
                mtp_proj="fp8"),
    "model1": dict(attn_proj="fp8", attn_absorb="bf16", attn_out_a="bf16",
                   attn_core="bf16", indexer_proj="fp8", indexer_weights="bf16",
                   indexer_scores="fp4", compressor="fp32", router="fp32",
                   routed_experts="fp4w", shared_experts="fp8", dense_ffn="fp8",
                   mhc="fp32", lm_head="bf16", mtp_proj="fp8"),
}


@dataclasses.dataclass(frozen=True)
class Storage:
  """How caches are stored. ``kv``: "fp8" (FlashMLA formats) or "bf16". ``kv_layout``:
  "flashmla" (656 / 584 B per MODEL1 vector incl. its pad byte) or "soa" (the bytes of
  this project's ``KCache`` arrays: 656 / 583). ``indexer``: "native" (V3.2 FP8 132 B,
  V4 FP4 68 B), "fp32" (this project's caches) or "bf16". ``block_size``: tokens per page
  block of the token-paged caches (dense, dsa)."""
  kv: str = "fp8"
  kv_layout: str = "flashmla"
  indexer: str = "native"
  block_size: int = 64

  def __post_init__(self):
    for name, ok in (("kv", ("fp8", "bf16")), ("kv_layout", ("flashmla", "soa")),
                     ("indexer", ("native", "fp32", "bf16"))):
      if getattr(self, name) not in ok:
        raise ValueError(f"Storage.{name}={getattr(self, name)!r}; expected one of {ok}")
    if self.block_size < 1:
      raise ValueError(f"Storage.block_size={self.block_size}; expected a positive int")


DEPLOYED = Storage()                                            # DeepSeek's formats
PROJECT = Storage(kv="fp8", kv_layout="soa", indexer="fp32")     # what generate allocates


def _check_len(L: int) -> None:
  if not isinstance(L, int) or L < 1:
    raise ValueError(f"L={L!r}; expected a positive int (context length in tokens)")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def layer_kinds(cfg: ModelConfig, mtp: bool = False) -> list[tuple[int, str, int]]:
  """(layer_id, kind, ratio) of every attention layer (the MTP blocks' too if ``mtp``)."""
  out = []
  ids = range(cfg.n_layers + (cfg.mtp.n_layers if mtp else 0))
  for i in ids:
    a = cfg.attention if i < cfg.n_layers else mtp_attention(cfg)
    if a.sparse == "compressed":
      r = a.compress_ratio(i)
      out.append((i, "window" if r == 0 else ("csa" if r == 4 else "hca"), r))
    else:
      out.append((i, a.sparse, 0))
  return out


def kv_vector_bytes(cfg: ModelConfig, storage: Storage = DEPLOYED) -> int:
  """Bytes of one cached key/latent vector (one layer, one token or entry)."""
  a = cfg.attention
  if storage.kv == "bf16":
    return 2 * a.d_qk
  nope, rope = a.d_qk - a.rope.dim, 2 * a.rope.dim
  if a.geometry == "v32":
    return nope + 4 * (nope // 128) + rope                   # 512 + 16 + 128 = 656
  return nope + rope + nope // 64 + (storage.kv_layout == "flashmla")   # 584 (583 SoA)


def indexer_key_bytes(cfg: ModelConfig, storage: Storage = DEPLOYED) -> int:
  """Bytes of one indexer key (a DSA token's or a CSA entry's)."""
  a, J = cfg.attention, cfg.attention.index_head_dim
  if storage.indexer == "fp32":
    return 4 * J
  if storage.indexer == "bf16":
    return 2 * J
  if a.sparse == "dsa":
    return J + 4 * _cdiv(J, 128)       # FP8 e4m3 + one fp32 scale per 128 (V3.2)
  return J // 2 + _cdiv(J, 32)         # FP4 e2m1 + one ue8m0 scale per 32 (V4)


def compressor_state_bytes(ratio: int, head_dim: int) -> int:
  """fp32 (kv, score) state of one compressor: 2 x 4 x (coff*r) x (coff*H) bytes."""
  coff = 2 if ratio == 4 else 1
  return 2 * 4 * coff * ratio * coff * head_dim


def layer_cache_bytes(cfg: ModelConfig, layer_id: int, kind: str, ratio: int, L: int,
                      storage: Storage = DEPLOYED) -> dict[str, int]:
  """One layer's cache bytes for one sequence of L tokens, by part."""
  a, e = cfg.attention, kv_vector_bytes(cfg, storage)
  if kind in ("dense", "dsa"):
    toks = _cdiv(L, storage.block_size) * storage.block_size
    out = {"kv": toks * e}
    if kind == "dsa":
      out["indexer_keys"] = toks * indexer_key_bytes(cfg, storage)
    return out
  out = {"window": a.window_size * e}
  if ratio:
    m = _cdiv(L, ratio)
    out["entries"] = m * e
    out["state"] = compressor_state_bytes(ratio, a.head_dim)
    if kind == "csa":
      out["indexer_keys"] = m * indexer_key_bytes(cfg, storage)
      out["state"] += compressor_state_bytes(ratio, a.index_head_dim)
  return out


@dataclasses.dataclass
class CacheBytes:
  per_layer: list            # (layer_id, kind, {part: bytes})
  by_part: dict              # "window", "csa_entries", "hca_entries", "csa_indexer_keys",
                             # "dsa_kv", "dsa_indexer_keys", "dense_kv", "state"
  total: int


def kv_cache_bytes(cfg: ModelConfig, L: int, storage: Storage = DEPLOYED,
                   mtp: bool = False) -> CacheBytes:
  """Every cache byte one sequence of L tokens holds (module docstring)."""
  _check_len(L)
  per_layer, by_part = [], {}
  for i, kind, r in layer_kinds(cfg, mtp):
    parts = layer_cache_bytes(cfg, i, kind, r, L, storage)
    per_layer.append((i, kind, parts))
    for p, b in parts.items():
      key = p if p in ("window", "state") else f"{kind}_{p}"
      by_part[key] = by_part.get(key, 0) + b
  return CacheBytes(per_layer, by_part, sum(by_part.values()))


def attended(cfg: ModelConfig, L: int, layer_id: int) -> dict[str, int]:
  """Keys the new token at context length L attends to in one layer: ``window``,
  ``compressed`` (V4), ``tokens`` (dense/dsa), and ``scored`` (keys its indexer scores)."""
  _check_len(L)
  a = cfg.attention if layer_id < cfg.n_layers else mtp_attention(cfg)
  if a.sparse == "dense":
    return {"tokens": L, "scored": 0}
  if a.sparse == "dsa":
    return {"tokens": min(a.index_topk, L), "scored": L}
  r = a.compress_ratio(layer_id)
  out = {"window": min(a.window_size, L), "compressed": 0, "scored": 0}
  if r == 4:
    out.update(compressed=min(a.index_topk, L // 4), scored=L // 4)
  elif r:
    out["compressed"] = L // r
  return out


# ------------------------------------------------------------------------------ FLOPs

def _attention_flops(cfg: ModelConfig, layer_id: int, L: int) -> dict[str, float]:
  a, D = cfg.attention if layer_id < cfg.n_layers else mtp_attention(cfg), cfg.d_model
  N, Q, R = a.n_heads, a.q_lora_rank, a.rope.dim
  I, J = a.index_n_heads, a.index_head_dim
  att = attended(cfg, L, layer_id)
  keys = att.get("tokens", 0) + att.get("window", 0) + att.get("compressed", 0)
  f = {}
  if a.geometry == "v32":
    P, Vh, Lr = a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
    f["attn_proj"] = 2 * (D * Q + Q * N * (P + R) + D * (Lr + R) + N * Vh * D)
    f["attn_absorb"] = 2 * N * P * Lr + 2 * N * Lr * Vh
    f["attn_core"] = 2 * N * keys * (a.d_qk + Lr)
  else:
    Hd, G, O = a.head_dim, a.o_groups, a.o_lora_rank
    f["attn_proj"] = 2 * (D * Q + Q * N * Hd + D * Hd + G * O * D)
    f["attn_out_a"] = 2 * N * Hd * O
    f["attn_core"] = 2 * N * keys * (Hd + Hd)
    r = a.compress_ratio(layer_id)
    if r:
      coff = 2 if r == 4 else 1
      f["compressor"] = 2 * 2 * D * coff * Hd + 2 * coff * Hd
  if a.sparse == "dsa" or a.compress_ratio(layer_id) == 4:   # layers with an indexer
    M = att["scored"]       # the projections run for every token, even before M > 0
    if a.sparse == "dsa":
      f["indexer_proj"] = 2 * (Q * I * J + D * J)
    else:
      f["indexer_proj"] = 2 * Q * I * J
      f["compressor"] = f.get("compressor", 0) + 2 * 2 * D * 2 * J + 2 * 2 * J
    f["indexer_weights"] = 2 * D * I
    f["indexer_scores"] = 2 * I * J * M + 2 * I * M
  return f


def _ffn_flops(cfg: ModelConfig, layer_id: int) -> dict[str, float]:
  D = cfg.d_model
  if not cfg.is_moe_layer(layer_id):
    return {"dense_ffn": 6 * D * cfg.ffn.hidden}
  m = cfg.moe
  return {"router": 2 * D * m.n_routed_experts,
          "routed_experts": 6 * D * m.moe_inter_dim * m.n_activated_experts,
          "shared_experts": 6 * D * m.moe_inter_dim * m.n_shared_experts}


def _mhc_site_flops(C: int, D: int) -> float:
  if C == 1:
    return 0
  return 2 * C * D * (2 + C) * C + 2 * C * D + 2 * C * C * D + C * D


def _mhc_head_flops(C: int, D: int) -> float:
  return 0 if C == 1 else 2 * C * D * C + 2 * C * D


def _add(acc: dict, f: dict) -> None:
  for k, v in f.items():
    acc[k] = acc.get(k, 0) + v


def decode_flops(cfg: ModelConfig, L: int, mtp: bool = False) -> dict[str, float]:
  """Raw FLOPs of one new token at context length L, by term (module docstring)."""
  _check_len(L)
  C, D = cfg.mhc.hc_mult, cfg.d_model
  f: dict[str, float] = {}
  for i, _, _ in layer_kinds(cfg, mtp):
    _add(f, _attention_flops(cfg, i, L))
    _add(f, _ffn_flops(cfg, i))
    _add(f, {"mhc": 2 * _mhc_site_flops(C, D)})
  _add(f, {"mhc": _mhc_head_flops(C, D), "lm_head": 2 * D * cfg.vocab_size})
  if mtp:
    for _ in range(cfg.mtp.n_layers):
      _add(f, {"mtp_proj": 2 * 2 * D * D, "mhc": _mhc_head_flops(C, D),
               "lm_head": 2 * D * cfg.vocab_size})
  return f


def equivalent_fp8(cfg: ModelConfig, flops: dict[str, float]) -> float:
  """Σ FLOPs x EQ_FP8[precision of the term] (module docstring)."""
  prec = PRECISION[cfg.attention.geometry]
  return sum(v * EQ_FP8[prec[k]] for k, v in flops.items())


def flops_by_precision(cfg: ModelConfig, flops: dict[str, float]) -> dict[str, float]:
  prec, out = PRECISION[cfg.attention.geometry], {}
  for k, v in flops.items():
    out[prec[k]] = out.get(prec[k], 0) + v
  return out


# ------------------------------------------------------------------------------ params

def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Total parameters (with and without the MTP module) and activated per token."""
  D, V = cfg.d_model, cfg.vocab_size
  total_with_mtp = param_count(cfg)
  mtp = total_with_mtp - param_count(dataclasses.replace(cfg, mtp=dataclasses.replace(
      cfg.mtp, n_layers=0)))
  total = total_with_mtp - mtp
  inactive = 0
  if cfg.use_moe:
    m = cfg.moe
    per_expert = 3 * D * m.moe_inter_dim
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    inactive = n_moe * (m.n_routed_experts - m.n_activated_experts) * per_expert
  attn = sum(attention_params(cfg.attention, D, i) for i in range(cfg.n_layers))
  return dict(total=total, total_with_mtp=total_with_mtp, mtp=mtp,
              activated=total - inactive, activated_no_embed=total - inactive - V * D,
              attention=attn, embed_and_head=2 * V * D,
              blocks=sum(block_params(cfg, i) for i in range(cfg.n_layers)),
              mhc_head=mhc_head_params(cfg.mhc, D))


def summary(cfg: ModelConfig, L: int, storage: Storage = DEPLOYED, mtp: bool = False) -> dict:
  """One row of the long-context table: cache GiB and GFLOPs (raw and FP8-equivalent)."""
  kv = kv_cache_bytes(cfg, L, storage, mtp)
  f = decode_flops(cfg, L, mtp)
  attn_terms = ("attn_core", "indexer_scores")
  return dict(L=L, kv_bytes=kv.total, kv_gib=kv.total / GIB, kv_by_part=kv.by_part,
              gflops=sum(f.values()) / 1e9, gflops_fp8eq=equivalent_fp8(cfg, f) / 1e9,
              gflops_attention=sum(f.get(k, 0) for k in attn_terms) / 1e9,
              flops_by_term=f, flops_by_precision=flops_by_precision(cfg, f))


def ratio(a: float, b: float) -> float:
  return a / b if b else math.nan
