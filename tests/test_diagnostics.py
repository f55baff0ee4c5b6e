"""Diagnostics re-run a layer's attention from its public pieces: the maps must be the
layer's real attention (probs @ values reproduces its output), probabilities plus sink
mass must sum to one, and a top-k of every key must keep all the mass."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.figure import Figure

from conftest import tiny_model_config
from model1 import config, diagnostics
from model1.model import Transformer


def _model(geometry, **attn):
  cfg = tiny_model_config(geometry, vocab_size=4096, d_model=32, ffn_hidden=64,
                          max_seq_len=64, **attn)
  return Transformer(cfg, nnx.Rngs(0))


def _inputs(T=24, B=2):
  tok = jax.random.randint(jax.random.key(1), (B, T), 8, 4096)
  seg = jnp.ones((B, T), jnp.int32).at[1, T // 2:].set(2)  # two documents in row 1
  pos = jnp.where(seg == 2, jnp.arange(T) - T // 2, jnp.arange(T))
  return tok, pos, seg


@pytest.mark.parametrize("geometry", ["model1", "v32"])
def test_attention_map_reproduces_the_layer(geometry):
  model = _model(geometry)
  if geometry == "model1":  # a non-zero sink so its mass is actually tested
    b = model.block(1)
    b.attn.attn_sink[...] = jnp.array([1.5, -0.5])
    model.set_block(1, b)
  tok, pos, seg = _inputs()
  cap = diagnostics.capture(model, tok, pos, seg)
  mla, x = model.block(1).attn, cap["x"][1]
  a = diagnostics.attention_probs(mla, x, pos, seg)
  total = a["probs_BNTS"].sum(-1) + a["sink_BNT"]
  np.testing.assert_allclose(total, 1.0, atol=1e-5)  # fp32 softmax rounding
  # no attention across the document boundary of row 1
  assert float(a["probs_BNTS"][1, :, 12:, :12].max()) == 0.0
  y_ref = mla(x, pos, seg)
  y = diagnostics.attention_output(mla, a["probs_BNTS"], x, pos)
  np.testing.assert_allclose(y, y_ref, atol=2e-5)  # fp32, different summation order
  if geometry == "model1":
    assert float(a["sink_BNT"][:, 0].mean()) > float(a["sink_BNT"][:, 1].mean())
  k = diagnostics.topk_mass(a["probs_BNTS"], jnp.broadcast_to(jnp.arange(24), (2, 24, 24)))
  np.testing.assert_allclose(k["fraction_BNT"], 1.0, atol=1e-5)


def test_dsa_topk_and_compressed_split():
  model = _model("model1", sparse="dsa", index_topk=6)
  tok, pos, seg = _inputs()
  cap = diagnostics.capture(model, tok, pos, seg)
  mla, x = model.block(0).attn, cap["x"][0]
  a = diagnostics.attention_probs(mla, x, pos, seg)
  idx, ok = diagnostics.dsa_topk(mla, x, pos, seg)
  k = diagnostics.topk_mass(a["probs_BNTS"], idx, ok)
  f = np.asarray(k["fraction_BNT"])
  assert f.min() >= -1e-6 and f.max() <= 1 + 1e-6
  np.testing.assert_allclose(f[:, :, :6], 1.0, atol=1e-5)  # <= 6 visible keys: all kept
  model = _model("model1", sparse="compressed", window_size=8, compress_ratios=(4, 8),
                 index_topk=2)
  cap = diagnostics.capture(model, tok, pos, seg)
  for i in (0, 1):  # CSA (top-k entries), HCA (all entries)
    mla = model.block(i).attn
    p = diagnostics.compressed_attention_probs(mla, cap["x"][i], pos, seg)
    s = diagnostics.window_compressed_split(p["p_window_BNTS"], p["p_comp_BNTM"], p["sink_BNT"])
    tot = s["window_BNT"] + s["compressed_BNT"] + s["sink_BNT"]
    np.testing.assert_allclose(tot, 1.0, atol=1e-5)
    assert s["mean"]["compressed"] > 0  # entries exist after the first r tokens


def test_engram_gates_and_expert_load():
  m = config.with_engram(config.preset("tiny", "model1"), rows_per_layer=1024, layer_ids=(1,))
  m = dataclasses.replace(m, d_model=32, use_moe=False, mtp=config.MTPConfig(0),
                          mhc=dataclasses.replace(m.mhc, hc_mult=1))  # eager mHC is slow
  model = Transformer(m.validate(), nnx.Rngs(0))
  tok, pos, seg = _inputs(T=12, B=1)
  ids = {"1": np.random.default_rng(0).integers(0, 50, (1, 12, 8)).astype(np.int32)}
  cap = diagnostics.capture(model, tok, pos, seg, engram_hash=ids)
  alpha = diagnostics.engram_gates(model.block(1).engram, cap["h"][1], ids["1"])
  assert alpha.shape == (1, 12, 1) and float(alpha.min()) > 0 and float(alpha.max()) < 1
  rows = [{"step": s, "layers/0/expert_load": [0.5, 0.25, 0.25, 0.0]} for s in (1, 2)]
  load = diagnostics.expert_load(rows)["layers/0/expert_load"]
  assert load["load"].shape == (2, 4) and load["imbalance"] == pytest.approx(2.0)
  for fig in (diagnostics.plot_engram_gates(alpha), diagnostics.plot_expert_load({"l": load}),
              diagnostics.plot_attention(np.eye(4))):
    # a Figure with something drawn on it (an empty or missing plot fails)
    assert isinstance(fig, Figure) and any(ax.has_data() for ax in fig.axes), fig
