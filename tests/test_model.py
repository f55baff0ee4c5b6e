"""Model forward: shapes, dtypes, causality, VVPA, absorbed == expanded, parameter counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from model1 import config
from model1.attention import MLA
from model1.model import Transformer


def _tiny(geometry, **attn):
  # plain blocks: the attention geometry is under test here (the V4 block: test_v4_block,
  # sparse patterns: test_sparse_attention)
  return tiny_model_config(geometry, **attn)


@pytest.mark.parametrize("geometry", ["v32", "model1"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shape_dtype_and_causality(geometry, dtype):
  cfg = dataclasses.replace(_tiny(geometry), dtype=dtype)
  m = Transformer(cfg, nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  logits = m(toks)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # change only the future (positions >= 7): logits at positions < 7 must not move
  toks2 = toks.at[:, 7:].set((toks[:, 7:] + 5) % cfg.vocab_size)
  logits2 = m(toks2)
  np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(logits2[:, :7]))
  assert not np.allclose(np.asarray(logits[:, 7:]), np.asarray(logits2[:, 7:]))


def test_cache_vector_geometry():
  for g, d in (("v32", 576), ("model1", 512)):
    a = _tiny(g).attention
    assert a.d_qk == d
    m = MLA(a, 64, nnx.Rngs(0))
    x = jnp.ones((1, 3, 64))
    assert m.cache_vector(x, jnp.arange(3)[None]).shape == (1, 3, d)
    assert m.decode_queries(x, jnp.arange(3)[None]).shape == (1, 3, 2, d)


def test_v32_absorbed_equals_expanded():
  a = _tiny("v32").attention
  m = MLA(a, 64, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 10, 64))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  seg = jnp.ones((2, 10), jnp.int32)
  # fp32 everywhere; the two forms only reassociate the wkv_b matmuls
  np.testing.assert_allclose(m(x, pos, seg), m(x, pos, seg, absorbed=True), atol=2e-5, rtol=1e-4)


def _attn_out(m, x, pos):
  return m(x, pos, jnp.ones(pos.shape, jnp.int32))


def test_vvpa_relative_position_invariance():
  a = _tiny("model1").attention
  m = MLA(a, 64, nnx.Rngs(0))
  m.attn_sink[...] = jnp.array([0.3, -1.0])
  x = jax.random.normal(jax.random.key(0), (1, 9, 64))
  pos = jnp.arange(9)[None]
  y0 = _attn_out(m, x, pos)
  y1 = _attn_out(m, x, pos + 1000)
  # fp32 RoPE of positions ~1000: angle error ~1e-4 rad -> outputs agree to ~1e-4
  np.testing.assert_allclose(y0, y1, atol=3e-4, rtol=1e-3)
  # without VVPA the absolute position leaks through the value's RoPE dims... which are
  # zeroed, so the output is also shift-invariant; with VVPA but no inverse rotation it
  # would not be: check that the inverse rotation is what makes it invariant.
  o = jax.random.normal(jax.random.key(2), (1, 9, 2, 512))
  assert not np.allclose(m._model1_output(o, pos), m._model1_output(o, pos + 1000), atol=1e-3)


def test_vvpa_off_value_carries_no_rope_dims():
  a = _tiny("model1", vvpa=False).attention
  m = MLA(a, 64, nnx.Rngs(0))
  pos = jnp.arange(5)[None]
  o = jax.random.normal(jax.random.key(2), (1, 5, 2, 512))
  noise = o.at[..., -64:].set(jax.random.normal(jax.random.key(3), (1, 5, 2, 64)) * 10)
  np.testing.assert_array_equal(m._model1_output(o, pos), m._model1_output(noise, pos))
  on = MLA(_tiny("model1").attention, 64, nnx.Rngs(0))
  assert not np.allclose(on._model1_output(o, pos), on._model1_output(noise, pos))


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("geometry", ["v32", "model1"])
def test_param_count_formula(size, geometry):
  cfg = config.preset(size, geometry)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert actual == config.param_count(cfg)


def test_ablation_switches_change_param_count():
  base = _tiny("model1")
  no_sink = dataclasses.replace(base, attention=dataclasses.replace(base.attention, sink=False))
  plain = dataclasses.replace(base, attention=dataclasses.replace(base.attention,
                                                                  grouped_output=False))
  for c in (no_sink, plain):
    m = Transformer(c, nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == config.param_count(c) != config.param_count(base)
    assert m(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 97)
