"""Diagnostics: where attention mass goes, how the Engram gates and MoE routers behave.

Nothing here changes the model. Attention maps are computed by RE-RUNNING one layer's
attention on its captured input with the layer's own public pieces (docs/design.md §1/§4):

  q_BTNH = mla.decode_queries(x, pos)       queries against the cache vector (v32: wkv_b
                                            absorbed), [B,T,N,d_qk] with d_qk 576 / 512
  kv_BSH = mla.cache_vector(x, pos)         the one shared key per token, [B,S,d_qk]
  logits = q . kv * mla.scale               fp32, causal + same segment
  sink   = mla.sink()                       MODEL1's per-head logit with a zero value

so probs[b,n,t,s] is exactly the dense softmax of ``attention_core.attend`` (a test
checks that probs @ values reproduces the layer's output). The mass the sink absorbs is
sigmoid(sink - lse) with lse the log-sum-exp over the real keys (FlashMLA's
``out *= 1/(1+exp(sink-lse))``).

Interfaces (each a function plus a ``plot_*``):
  * ``topk_mass(probs_BNTS, idx_BTX)`` — share of the dense attention mass that a top-k
    selection keeps (DSA: the lightning indexer's tokens, ``dsa_topk``). High = the
    indexer finds what dense attention would read; V3.2 trains it towards this (KL).
  * ``sink_mass`` via ``attention_probs(...)["sink_BNT"]`` — per head and position.
  * ``window_compressed_split(p_window_BNTU, p_comp_BNTM, sink_BNT)`` — V4: mass on the
    sliding window vs the compressed (CSA/HCA) entries vs the sink;
    ``compressed_attention_probs`` produces those probabilities for a compressed layer.
  * ``engram_gates(engram, h_BTCD, hash_ids_BTA)`` — the gate alpha per stream (0 = the
    memory is ignored, 1 = fully added).
  * ``expert_load(rows)`` — per-layer MoE load over training from metrics.jsonl rows.

``capture`` runs the model eagerly layer by layer and returns each layer's residual
streams (Engram's input) and normalised attention input x (what MLA saw). It uses
``Block.decode(h, attn_step, tokens, engram)``, the public per-block entry point.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1 import moe
from model1.attention_core import causal_segment_mask, visible
from model1.mhc import expand


# --------------------------------------------------------------------------- capture


def capture(model, tokens_BT, positions_BT=None, segment_ids_BT=None, engram_hash=None) -> dict:
  """{"h": [h_BTCD entering layer i], "x": [x_BTD the attention of layer i saw],
  "positions", "segment_ids"} from one eager forward (intermediates and MoE load
  counters it sows are discarded afterwards)."""
  tokens_BT = jnp.asarray(tokens_BT)
  B, T = tokens_BT.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else jnp.asarray(positions_BT)
  seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
  h = expand(model.embed(tokens_BT, model.dtype), model.cfg.mhc.hc_mult)
  hs, xs = [], []
  for layer in model.blocks():
    hs.append(h)
    box = {}

    def step(mla, x, box=box):
      box["x"] = x
      return mla(x, pos, seg, return_kv=True)
    eng = None
    if layer.engram is not None:
      if engram_hash is None:
        raise ValueError(f"layer {layer.layer_id} carries Engram; expected engram_hash ids")
      eng = {"ids": jnp.asarray(engram_hash[str(layer.layer_id)])}
    h, _, _ = layer.decode(h, step, tokens_BT, eng, segment_ids_BT=seg)
    xs.append(box["x"])
  nnx.pop(model, nnx.Intermediate)   # sown metrics / aux losses of this forward
  moe.reset_moe_stats(model)         # a diagnostic must not steer the router biases
  return {"h": hs, "x": xs, "positions": pos, "segment_ids": seg}


# --------------------------------------------------------------------------- dense maps


def attention_probs(mla, x_BTD, positions_BT, segment_ids_BT) -> dict:
  """Dense attention of one MLA layer on its input: {"probs_BNTS", "sink_BNT", "lse_BNT"}.
  Rows sum to 1 - sink (to 1 without a sink); rows with no visible key are all zero."""
  q_BTNH = mla.decode_queries(x_BTD, positions_BT)
  kv_BSH = mla.cache_vector(x_BTD, positions_BT)
  logits = jnp.einsum("btnh,bsh->bnts", q_BTNH, kv_BSH,
                      preferred_element_type=jnp.float32) * mla.scale
  mask_B1TS = causal_segment_mask(segment_ids_BT)[:, None]
  logits = jnp.where(mask_B1TS, logits, -jnp.inf)
  lse_BNT = jax.nn.logsumexp(logits, axis=-1)
  sink = mla.sink()
  total = lse_BNT if sink is None else jnp.logaddexp(lse_BNT, sink[None, :, None])
  safe = jnp.where(jnp.isfinite(total), total, 0.0)[..., None]
  probs = jnp.where(mask_B1TS, jnp.exp(logits - safe), 0.0)
  sink_BNT = (jnp.zeros_like(lse_BNT) if sink is None
              else jnp.where(jnp.isfinite(total), jnp.exp(sink[None, :, None] - total), 0.0))
  return {"probs_BNTS": probs, "sink_BNT": sink_BNT, "lse_BNT": lse_BNT}


def attention_output(mla, probs_BNTS, x_BTD, positions_BT):
  """The layer output [B,T,D] from dense probabilities (value = the cache vector's first
  d_v dims, then the geometry's output path): checks a map against the real layer."""
  kv_BSH = mla.cache_vector(x_BTD, positions_BT)
  o_BTNV = jnp.einsum("bnts,bsv->btnv", probs_BNTS, kv_BSH[..., :mla.d_v])
  return mla.decode_output(o_BTNV.astype(x_BTD.dtype), positions_BT)


# --------------------------------------------------------------------------- top-k


def topk_mass(probs_BNTS, idx_BTX, valid_BTX=None) -> dict:
  """Share of each query's dense attention mass on the selected keys ``idx_BTX``
  (invalid slots, idx < 0 or ``valid_BTX`` False, count nothing). Returns
  {"kept_BNT": selected mass, "fraction_BNT": kept / (mass on real keys), "mean"}."""
  idx = jnp.asarray(idx_BTX)
  ok = (idx >= 0) if valid_BTX is None else (jnp.asarray(valid_BTX) & (idx >= 0))
  g = jnp.take_along_axis(probs_BNTS, jnp.clip(idx, 0)[:, None].astype(jnp.int32), axis=-1)
  kept = jnp.sum(jnp.where(ok[:, None], g, 0.0), axis=-1)
  total = probs_BNTS.sum(-1)
  frac = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)
  return {"kept_BNT": kept, "fraction_BNT": frac, "mean": float(frac.mean())}


def dsa_topk(mla, x_BTD, positions_BT, segment_ids_BT):
  """The V3.2 lightning indexer's top-k tokens for each query (as ``_forward_dsa``
  selects them): (idx_BTX, valid_BTX)."""
  from model1.indexer import select_topk
  c, T = mla.cfg, x_BTD.shape[1]
  qr = mla._qr(x_BTD)  # the query low-rank state the indexer reads (wq_a -> q_norm)
  k_BSJ = mla.indexer.keys(x_BTD, positions_BT)
  qi, wi = mla.indexer.queries(x_BTD, qr, positions_BT)
  rows = jnp.arange(T)
  vis = lambda c0, C, seg_BA: visible(c0 + jnp.arange(C), seg_BA, rows, segment_ids_BT)  # noqa: E731
  return select_topk(qi, k_BSJ, wi, segment_ids_BT, vis, c.index_topk, c.attn_chunk)


# --------------------------------------------------------------------------- V4 split


def window_compressed_split(p_window_BNTU, p_comp_BNTM, sink_BNT=None) -> dict:
  """Mass fractions per head and query: {"window_BNT", "compressed_BNT", "sink_BNT",
  "mean": {window, compressed, sink}}. Inputs are one softmax's probabilities over the
  window keys and the compressed entries (and the sink's share)."""
  w, c = p_window_BNTU.sum(-1), p_comp_BNTM.sum(-1)
  s = jnp.zeros_like(w) if sink_BNT is None else sink_BNT
  return {"window_BNT": w, "compressed_BNT": c, "sink_BNT": s,
          "mean": {k: float(v.mean()) for k, v in (("window", w), ("compressed", c), ("sink", s))}}


def compressed_attention_probs(mla, x_BTD, positions_BT, segment_ids_BT) -> dict:
  """A V4 compressed layer's one softmax, split by source: {"p_window_BNTS" (keys outside
  the window are 0), "p_comp_BNTM", "sink_BNT"}. CSA layers (ratio 4) keep only the
  indexer's top-k entries, HCA layers every complete visible entry (§8)."""
  from model1.indexer import select_topk
  c, r, W = mla.cfg, mla.ratio, mla.cfg.window_size
  T = x_BTD.shape[1]
  rows = jnp.arange(T)
  qr = mla._qr(x_BTD)
  q = mla._q(x_BTD, positions_BT, qr)
  kv = mla.cache_vector(x_BTD, positions_BT)
  lw = jnp.einsum("btnh,bsh->bnts", q, kv, preferred_element_type=jnp.float32) * mla.scale
  lw = jnp.where(visible(rows, segment_ids_BT, rows, segment_ids_BT, W)[:, None], lw, -jnp.inf)
  parts = [lw]
  if r:
    comp, cseg, _ = mla.compressor(x_BTD, positions_BT, segment_ids_BT)
    crow = (jnp.arange(comp.shape[1]) + 1) * r - 1
    m_BTM = visible(rows, segment_ids_BT, crow, cseg)
    if r == 4 and comp.shape[1]:
      ik, iseg, _ = mla.indexer.compressor(x_BTD, positions_BT, segment_ids_BT)
      qi, wi = mla.indexer.queries(x_BTD, qr, positions_BT)
      vis = lambda c0, C, seg_BA: visible(c0 + jnp.arange(C), seg_BA, crow, iseg)  # noqa: E731
      idx, ok = select_topk(qi, ik, wi, segment_ids_BT, vis, c.index_topk, c.attn_chunk)
      sel = jnp.zeros(m_BTM.shape, bool)
      sel = jax.vmap(jax.vmap(lambda s, i, o: s.at[i].max(o)))(sel, idx, ok)
      m_BTM = m_BTM & sel
    lc = jnp.einsum("btnh,bmh->bntm", q, comp, preferred_element_type=jnp.float32) * mla.scale
    parts.append(jnp.where(m_BTM[:, None], lc, -jnp.inf))
  lg = jnp.concatenate(parts, axis=-1)
  lse = jax.nn.logsumexp(lg, axis=-1)
  sink = mla.sink()
  total = lse if sink is None else jnp.logaddexp(lse, sink[None, :, None])
  safe = jnp.where(jnp.isfinite(total), total, 0.0)[..., None]
  p = jnp.where(jnp.isfinite(lg), jnp.exp(lg - safe), 0.0)
  sink_BNT = (jnp.zeros_like(lse) if sink is None
              else jnp.where(jnp.isfinite(total), jnp.exp(sink[None, :, None] - total), 0.0))
  return {"p_window_BNTS": p[..., :T], "p_comp_BNTM": p[..., T:], "sink_BNT": sink_BNT}


# --------------------------------------------------------------------------- Engram, MoE


def engram_gates(engram, h_BTCD, hash_ids_BTA) -> jax.Array:
  """alpha_BTC = sigmoid(signed_sqrt(<RMSNorm(W_k e + b_k), RMSNorm(h)> / sqrt(D))), the
  gate ``Engram.decode_step`` computes (same parameters, same order of operations)."""
  from model1.engram import _rms_norm
  e = engram.lookup(jnp.asarray(hash_ids_BTA))
  B, T = h_BTCD.shape[:2]
  e_BTF = e.reshape(B, T, -1).astype(jnp.float32)
  k = (jnp.einsum("btf,fcd->btcd", e_BTF, engram.key_projs_weight[...].astype(jnp.float32))
       + engram.key_projs_bias[...])
  k = _rms_norm(k, engram.norm1[...], engram.gate_norm_eps)
  q = _rms_norm(h_BTCD.astype(jnp.float32), engram.norm2[...], engram.gate_norm_eps)
  g = jnp.sum(k * q, -1) / np.sqrt(engram.d_model)
  g = jnp.sqrt(jnp.maximum(jnp.abs(g), 1e-6)) * jnp.sign(g)
  return jax.nn.sigmoid(g)


def expert_load(rows: Sequence[dict]) -> dict:
  """{layer path: (steps [K], load [K, E])} from metrics.jsonl rows ('.../expert_load'),
  with "imbalance" (max / mean load, 1 = perfectly balanced) at the last step."""
  out = {}
  for key in sorted({k for r in rows for k in r if k.endswith("expert_load")}):
    rs = [r for r in rows if key in r]
    load = np.asarray([r[key] for r in rs], np.float64)
    out[key] = {"steps": np.asarray([r["step"] for r in rs]), "load": load,
                "imbalance": float(load[-1].max() / max(load[-1].mean(), 1e-12))}
  return out


# --------------------------------------------------------------------------- plots


def _fig(ax=None, size=(5, 4)):
  import matplotlib.pyplot as plt
  if ax is None:
    fig, ax = plt.subplots(figsize=size)
    return fig, ax
  return ax.figure, ax


def plot_attention(probs_TS, ax=None, title: str = "attention"):
  """One head's map [T, S] (queries down, keys across)."""
  fig, ax = _fig(ax)
  im = ax.imshow(np.asarray(probs_TS), cmap="viridis", aspect="auto", interpolation="nearest")
  ax.set_xlabel("key position")
  ax.set_ylabel("query position")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return fig


def _per_position(ax, v_BNT, label_fmt="head {}"):
  v = np.asarray(v_BNT).mean(0)  # [N, T]
  for n in range(v.shape[0]):
    ax.plot(v[n], label=label_fmt.format(n))
  ax.set_xlabel("query position")
  ax.legend(fontsize=7)


def plot_topk_mass(res: dict, ax=None, title: str = "dense mass kept by the top-k"):
  fig, ax = _fig(ax)
  _per_position(ax, res["fraction_BNT"])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("fraction")
  ax.set_title(f"{title} (mean {res['mean']:.2f})")
  return fig


def plot_sink_mass(sink_BNT, ax=None, title: str = "attention mass to the sink"):
  fig, ax = _fig(ax)
  _per_position(ax, sink_BNT)
  ax.set_ylabel("mass")
  ax.set_title(title)
  return fig


def plot_window_split(split: dict, ax=None, title: str = "window vs compressed vs sink"):
  fig, ax = _fig(ax)
  T = np.asarray(split["window_BNT"]).shape[-1]
  parts = [np.asarray(split[k]).mean((0, 1)) for k in ("window_BNT", "compressed_BNT", "sink_BNT")]
  ax.stackplot(np.arange(T), *parts, labels=["window", "compressed", "sink"], alpha=0.8)
  ax.set_xlabel("query position")
  ax.set_ylabel("mass (mean over heads)")
  ax.set_ylim(0, 1.0)
  ax.legend(fontsize=7, loc="lower left")
  ax.set_title(title)
  return fig


def plot_engram_gates(alpha_BTC, ax=None, title: str = "Engram gate alpha"):
  fig, ax = _fig(ax)
  a = np.asarray(alpha_BTC)
  for c in range(a.shape[-1]):
    ax.hist(a[..., c].ravel(), bins=30, range=(0, 1), alpha=0.5, label=f"stream {c}")
  ax.set_xlabel("alpha")
  ax.set_ylabel("tokens")
  ax.legend(fontsize=7)
  ax.set_title(f"{title} (mean {a.mean():.2f})")
  return fig


def plot_expert_load(loads: dict, ax=None, title: str = "MoE expert load"):
  """Heat map per layer stacked vertically: steps across, experts down."""
  fig, ax = _fig(ax, size=(6, 1.5 + 1.2 * max(1, len(loads))))
  if not loads:
    ax.set_title(f"{title}: no MoE layers")
    return fig
  mats = [v["load"].T for v in loads.values()]
  im = ax.imshow(np.concatenate(mats, 0), aspect="auto", cmap="magma", interpolation="nearest")
  E = mats[0].shape[0]
  ax.set_yticks([E * i + E / 2 - 0.5 for i in range(len(mats))])
  ax.set_yticklabels([k.rsplit("/", 1)[0] for k in loads], fontsize=7)
  ax.set_xlabel("logged step index")
  ax.set_title(title + " (" + ", ".join(f"{v['imbalance']:.2f}" for v in loads.values())
               + " max/mean)")
  fig.colorbar(im, ax=ax, fraction=0.046)
  return fig
