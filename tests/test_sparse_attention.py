"""Sparse attention: V3.2 DSA (lightning indexer + top-k) and V4 compressed attention
(window + CSA/HCA): exact reductions to dense attention, causality, the indexer's training
recipe (KL warm-up, gradient isolation), prefill + decode through the caches, QAT, and
config validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_model_config
from model1 import config, qat
from model1.attention import MLA
from model1.generate import SamplingConfig, generate
from model1.indexer import INDEXER_PARAMS, is_indexer_param
from model1.layers import AuxLoss
from model1.model import Transformer

D = 64


def _cfg(geometry="model1", n_layers=2, **attn):
  """Tiny width, exact head geometry, plain pre-norm blocks (the attention under test is
  the only moving part; the V4 block around it is tested elsewhere)."""
  return tiny_model_config(geometry, d_model=D, n_layers=len(attn.get("compress_ratios", ()))
                           or n_layers, index_n_heads=2, attn_chunk=8, **attn)


# every compressed layer also attends its window: CSA (ratio 4, top-2), HCA (ratio 8); W = 8
V4 = dict(sparse="compressed", compress_ratios=(4, 8), window_size=8, index_topk=2)
_forward = nnx.jit(lambda m, t: m(t))


def _tokens(T=24, B=2, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 97)


def _without_indexer(sparse_model, dense_cfg):
  """A dense model holding the sparse model's non-indexer parameters."""
  dense = Transformer(dense_cfg, nnx.Rngs(0))
  nnx.update(dense, nnx.state(sparse_model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains(
      "indexer")))))
  return dense


# --------------------------------------------------------------- 1. reductions to dense

@pytest.mark.parametrize("geometry", ["v32", "model1"])
def test_dsa_with_topk_covering_the_sequence_equals_dense(geometry):
  sparse = Transformer(_cfg(geometry, sparse="dsa", index_topk=64), nnx.Rngs(0))
  dense = _without_indexer(sparse, _cfg(geometry))
  toks = _tokens()
  # fp32; only reassociation differs (query chunks; v32: absorbed vs expanded wkv_b)
  np.testing.assert_allclose(_forward(sparse, toks), _forward(dense, toks), atol=5e-5,
                             rtol=1e-4)


def test_window_covering_the_sequence_without_compression_equals_dense():
  toks = _tokens()
  dense = Transformer(_cfg(), nnx.Rngs(0))
  for ratios in ((), (0, 0)):
    window = Transformer(_cfg(sparse="compressed", window_size=32, compress_ratios=ratios),
                         nnx.Rngs(0))
    # same parameters; only the softmax's query chunking and key banding reassociate
    np.testing.assert_allclose(_forward(window, toks), _forward(dense, toks), atol=2e-5,
                               rtol=1e-4)


def test_window_restricts_attention_to_w_tokens():
  """Query i must not see key i - W: perturbing only token 0 leaves layer-0 outputs at
  rows >= W unchanged (one layer, window only)."""
  cfg = _cfg(n_layers=1, sparse="compressed", window_size=8)
  m = Transformer(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 20, D))
  pos, seg = jnp.arange(20)[None], jnp.ones((1, 20), jnp.int32)
  attn = nnx.jit(lambda a, x: a(x, pos, seg))
  y0, y1 = attn(m.block(0).attn, x), attn(m.block(0).attn, x.at[:, 0].add(3.0))
  np.testing.assert_array_equal(y0[:, 8:], y1[:, 8:])
  assert not np.allclose(y0[:, :8], y1[:, :8])


# --------------------------------------------------------------- 3. causality

@pytest.mark.parametrize("attn", [
    dict(sparse="dsa", index_topk=5), dict(sparse="dsa", index_topk=5, dsa_stage="warmup"),
    dict(V4, qat=True), dict(V4, dsa_stage="warmup")],
    ids=["dsa", "dsa-warmup", "v4-qat", "v4-warmup"])
def test_future_tokens_never_change_past_logits(attn):
  m = Transformer(_cfg(**attn), nnx.Rngs(0))
  toks = _tokens()
  # position 13 sits inside a ratio-4 block [12, 16) and a ratio-8 block [8, 16): those
  # entries straddle it and must stay invisible to positions < 16
  toks2 = toks.at[:, 13:].set((toks[:, 13:] + 5) % 97)
  a, b = np.asarray(_forward(m, toks)), np.asarray(_forward(m, toks2))
  np.testing.assert_array_equal(a[:, :13], b[:, :13])
  assert not np.allclose(a[:, 13:], b[:, 13:])


# --------------------------------------------------------------- 2. indexer training

def _mla(attn, layer_id=0):
  return MLA(_cfg(**attn).attention, D, nnx.Rngs(0), layer_id=layer_id)


def _inputs(T=32):
  x = jax.random.normal(jax.random.key(3), (2, T, D))
  return x, jnp.broadcast_to(jnp.arange(T), (2, T)), jnp.ones((2, T), jnp.int32)


def _losses(graphdef, params, rest, x, pos, seg):
  """(LM stand-in: a fixed projection of the attention output, indexer KL)."""
  m = nnx.merge(graphdef, params, rest)
  y = m(x, pos, seg)
  kl = sum(jax.tree.leaves(nnx.pop(m, AuxLoss)))
  return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape))), kl


def test_dense_warmup_lowers_indexer_kl():
  m = _mla(dict(sparse="dsa", dsa_stage="warmup", index_topk=8))
  x, pos, seg = _inputs()
  graphdef, idx, rest = nnx.split(m, INDEXER_PARAMS, ...)
  assert all(is_indexer_param(p) for p, _ in jax.tree.leaves_with_path(idx))
  opt = optax.adam(1e-2)

  @jax.jit
  def step(idx, st):
    kl, g = jax.value_and_grad(lambda p: _losses(graphdef, p, rest, x, pos, seg)[1])(idx)
    upd, st = opt.update(g, st, idx)
    return optax.apply_updates(idx, upd), st, kl

  st, kls = opt.init(idx), []
  for _ in range(30):
    idx, st, kl = step(idx, st)
    kls.append(float(kl))
  # random init: KL ~ 0.2-0.5 nats; 30 Adam steps on the indexer alone remove a large part
  assert kls[-1] < 0.6 * kls[0], kls


@pytest.mark.parametrize("attn,layer_id", [(dict(sparse="dsa", index_topk=6), 0),
                                           (dict(V4, index_topk=3), 0)], ids=["dsa", "csa"])
def test_sparse_stage_gradients_are_isolated(attn, layer_id):
  m = _mla(attn, layer_id)
  x, pos, seg = _inputs()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  lm_g = jax.jit(jax.grad(lambda p: _losses(graphdef, p, rest, x, pos, seg)[0]))(params)
  kl_g, kl_gx = jax.jit(jax.grad(lambda p, x: _losses(graphdef, p, rest, x, pos, seg)[1],
                                 argnums=(0, 1)))(params, x)
  norms = lambda g, want: [float(jnp.abs(v).max()) for p, v in jax.tree.leaves_with_path(g)
                           if is_indexer_param(p) == want]
  assert max(norms(lm_g, True)) == 0.0          # LM loss: top-k indices carry no gradient
  assert min(norms(lm_g, False)) > 0.0          # ... and every other parameter does
  assert max(norms(kl_g, False)) == 0.0         # KL: target and indexer input detached
  assert float(jnp.abs(kl_gx).max()) == 0.0
  assert max(norms(kl_g, True)) > 0.0


# --------------------------------------------------------------- 4. prefill + decode

@pytest.mark.parametrize("attn", [V4, dict(sparse="dsa", index_topk=4)], ids=["v4", "dsa"])
def test_prefill_then_decode_reproduces_the_full_forward(attn):
  # V4: layers CSA (ratio 4, top-2 of the entries) and HCA (ratio 8), each with W = 8.
  # DSA: one layer, so the indexer's input is exact in both paths (no top-k near-ties).
  cfg = _cfg(n_layers=1, **attn)
  m = Transformer(cfg, nnx.Rngs(0))
  # 7 and 3 tokens: partial blocks in the prefill state, and no complete ratio-8 block
  # (the HCA entries all come from decode steps); the window ring wraps during decode
  prompts = [list(range(3, 10)), list(range(20, 23))]
  g = generate(m, prompts, SamplingConfig(max_new_tokens=14), return_logits=True)
  seqs = [p + t for p, t in zip(prompts, g.tokens)]
  T = max(map(len, seqs))
  toks = jnp.asarray([s + [0] * (T - len(s)) for s in seqs])
  seg = jnp.asarray([[1] * len(s) + [0] * (T - len(s)) for s in seqs])  # one compile
  full, kvs, _ = nnx.jit(lambda m, t, s: m.prefill(t, jnp.broadcast_to(jnp.arange(T), t.shape),
                                                s))(m, toks, seg)
  for b, (p, s) in enumerate(zip(prompts, seqs)):
    want = np.asarray(full)[b, len(p) - 1:len(s) - 1]
    # decode runs bf16 queries over a bf16 cache (2^-8 relative): logits of size ~3
    # agree to ~0.02; a wrong block, position or mask gives errors ~0.2 and more
    np.testing.assert_allclose(g.logits[:len(want), b], want, atol=0.05)
  if cfg.attention.sparse == "compressed":
    _check_compressed_cache(g.cache.layers, kvs, [len(s) - 1 for s in seqs])


def _check_compressed_cache(layers, kvs, lens):
  """The compressed entries decode left in the caches == the training form's (the last
  sampled token is never fed, so sequence b holds lens[b] tokens)."""
  for layer, kv in zip(layers, kvs):
    for b, n in enumerate(lens):
      M, Mx = n // layer.ratio, layer.comp.block_size
      got = layer.comp.gather_bf16(b * Mx + jnp.arange(M)).astype(jnp.float32)
      # bf16 cache; deeper layers also see the bf16 drift of the layers below
      np.testing.assert_allclose(got, kv["comp"][b, :M], atol=3e-2, rtol=2e-2)
      if layer.icomp is not None:  # fp32 entries; layer 0 sees identical inputs
        np.testing.assert_allclose(layer.icomp[b, :M], kv["icomp"][b, :M], atol=1e-4,
                                   rtol=1e-4)


# --------------------------------------------------------------- QAT

def test_fake_quant_grids_and_straight_through_gradient():
  x = jax.random.normal(jax.random.key(0), (3, 128)) * jnp.logspace(-6, 2, 128)
  y = jax.jit(qat.fake_quant_fp8)(x)
  t = x.reshape(3, 2, 64)
  amax = np.maximum(np.abs(np.asarray(t)).max(-1, keepdims=True), 1e-4)
  s = 2.0 ** np.ceil(np.log2(amax / 448))                        # pow2 scale per tile
  q = np.asarray(y).reshape(3, 2, 64) / s
  np.testing.assert_array_equal(q, np.asarray(jnp.asarray(q).astype(jnp.float8_e4m3fn)
                                              .astype(jnp.float32)))
  assert float(jnp.abs(y - x).max() / jnp.abs(x).max()) < 2 ** -3
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: qat.fake_quant_fp8(x).sum()))(x), 1.0)
  # amax 12 -> s = 2: x/s = 0.2, 0.55, 1.45, 2.55, 4.5 (tie -> even 4), -6 on the e2m1 grid
  f4 = jax.jit(qat.fake_quant_fp4)(jnp.array([[0.4, 1.1, 2.9, 5.1, 9.0, -12.0] + [0.0] * 26]))
  np.testing.assert_array_equal(f4[0, :6], [0.0, 1.0, 3.0, 6.0, 8.0, -12.0])
  h = qat.hadamard_matrix(128)
  np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
  k = jax.random.normal(jax.random.key(1), (4, 128))
  hk = jax.jit(qat.hadamard)(k)
  np.testing.assert_allclose(hk @ hk.T, k @ k.T, atol=1e-4)


# --------------------------------------------------------------- 6. validation

@pytest.mark.parametrize("kw,match", [
    (dict(sparse="dsa", index_topk=0), "index_topk=0"),
    (dict(sparse="dsa", index_n_heads=0), "index_n_heads=0"),
    (dict(sparse="dsa", index_head_dim=96), "index_head_dim=96"),
    (dict(sparse="dsa", index_head_dim=64, qat=True), "index_head_dim=64 with qat"),
    (dict(sparse="compressed", compress_ratios=(4, 12), window_size=8), r"compress_ratios\[1\]=12"),
    (dict(sparse="compressed", compress_ratios=(1,)), r"compress_ratios\[0\]=1"),
    (dict(sparse="dense", compress_ratios=(4,)), "sparse='compressed'"),
    (dict(sparse="sparse"), "attention.sparse='sparse'"),
    (dict(sparse="dsa", dsa_stage="both"), "dsa_stage='both'"),
])
def test_bad_sparse_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(config.AttentionConfig(), **kw).validate()
  with pytest.raises(ValueError, match="geometry='model1'"):
    config.AttentionConfig(geometry="v32", sparse="compressed").validate()


def test_param_count_includes_indexer_and_compressors():
  for attn in (dict(sparse="dsa"), V4):
    cfg = _cfg(**attn)
    m = Transformer(cfg, nnx.Rngs(0))
    per_layer = lambda i: config.attention_params(cfg.attention, D, i)
    dense = config.attention_params(_cfg().attention, D)
    got = {i: sum(x.size for x in jax.tree.leaves(nnx.state(m.block(i).attn, nnx.Param)))
           for i in range(cfg.n_layers)}
    assert got == {i: per_layer(i) for i in range(cfg.n_layers)}
    assert all(v > dense for i, v in got.items() if cfg.attention.compress_ratio(i)
               or attn["sparse"] == "dsa")
