"""mHC: V4 formulas, Sinkhorn, the exact C = 1 reduction, gradient flow, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model1 import mhc
from model1.mhc import HCHead, HyperConnection, MHCConfig

B, T, D = 2, 3, 16


def _rms_norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _ref_v4(h, fn, base, scale, c, iters, eps, norm_eps):
  """float64 numpy transcription of V4 Block.hc_pre / hc_split_sinkhorn."""
  h = np.asarray(h, np.float64)
  b, t = h.shape[:2]
  x = h.reshape(b, t, -1)
  rms = np.sqrt((x * x).mean(-1, keepdims=True) + norm_eps)
  mixes = x @ np.asarray(fn, np.float64).T / rms
  base, scale = np.asarray(base, np.float64), np.asarray(scale, np.float64)
  sig = lambda z: 1 / (1 + np.exp(-z))
  pre = sig(mixes[..., :c] * scale[0] + base[:c]) + eps
  post = 2 * sig(mixes[..., c:2 * c] * scale[1] + base[c:2 * c])
  comb = (mixes[..., 2 * c:] * scale[2] + base[2 * c:]).reshape(b, t, c, c)
  comb = np.exp(comb - comb.max(-1, keepdims=True))
  comb = comb / comb.sum(-1, keepdims=True) + eps
  comb = comb / (comb.sum(-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    comb = comb / (comb.sum(-1, keepdims=True) + eps)
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
  y = (pre[..., None] * h).sum(2)
  return y, post, comb


def _random_site(c, key=0, scale=1.0):
  cfg = MHCConfig(hc_mult=c)
  site = HyperConnection(cfg, D, rngs=nnx.Rngs(key))
  k1, k2 = jax.random.split(jax.random.key(key + 1))
  site.base[...] = 0.5 * jax.random.normal(k1, site.base.shape)
  site.scale[...] = jnp.full((3,), scale)
  return cfg, site


def test_sinkhorn_doubly_stochastic():
  # O(1) logits (the regime of mixes·s2 + b): V4's 20 rounds converge to fp32 precision
  logits = 0.5 * jax.random.normal(jax.random.key(0), (512, 4, 4))
  c = mhc.sinkhorn(logits, 20, 1e-6)
  tol = 1e-5  # eps = 1e-6 in every denominator leaves sums at 1 − O(1e-6); fp32 rounding
  assert float(c.min()) > 0
  np.testing.assert_allclose(c.sum(-1), 1.0, atol=tol)
  np.testing.assert_allclose(c.sum(-2), 1.0, atol=tol)
  # peaky logits: rows may still be converging after 20 rounds, columns are always
  # normalised last, so they hold for any input
  c = mhc.sinkhorn(4.0 * jax.random.normal(jax.random.key(1), (512, 4, 4)), 20, 1e-6)
  np.testing.assert_allclose(c.sum(-2), 1.0, atol=tol)


def test_site_mixing_doubly_stochastic_and_ranges():
  cfg, site = _random_site(4, scale=0.5)
  h = jax.random.normal(jax.random.key(3), (B, T, 4, D))
  pre, post, comb = nnx.jit(lambda s, h: s.mixing(h))(site, h)
  np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-5)  # as in the Sinkhorn test
  np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)
  assert float(pre.min()) > 0 and float(pre.max()) <= 1 + 2e-6
  assert float(post.min()) > 0 and float(post.max()) < 2


def test_matches_v4_reference():
  c = 4
  cfg, site = _random_site(c, scale=0.7)
  h = jax.random.normal(jax.random.key(4), (B, T, c, D))
  x, post, comb = nnx.jit(lambda s, h: s.pre(h))(site, h)
  ry, rpost, rcomb = _ref_v4(h, site.fn[...], site.base[...], site.scale[...], c,
                             cfg.sinkhorn_iters, cfg.eps, cfg.norm_eps)
  tol = dict(rtol=1e-5, atol=1e-5)  # fp32 vs float64 through 20 Sinkhorn rounds
  np.testing.assert_allclose(x, ry, **tol)
  np.testing.assert_allclose(post, rpost, **tol)
  np.testing.assert_allclose(comb, rcomb, **tol)
  f = jax.random.normal(jax.random.key(5), (B, T, D))
  out = site.post(f, h, post, comb)
  ref = rpost[..., None] * np.asarray(f)[:, :, None] + np.einsum("btjk,btjd->btkd", rcomb,
                                                                  np.asarray(h, np.float64))
  np.testing.assert_allclose(out, ref, **tol)


def test_head_matches_formula():
  c = 4
  head = HCHead(MHCConfig(hc_mult=c), D, rngs=nnx.Rngs(0))
  head.scale[...] = jnp.ones((1,))
  h = jax.random.normal(jax.random.key(6), (B, T, c, D))
  hn = np.asarray(h, np.float64)
  x = hn.reshape(B, T, -1)
  rms = np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
  mixes = x @ np.asarray(head.fn[...], np.float64).T / rms
  pre = 1 / (1 + np.exp(-(mixes + np.asarray(head.base[...])))) + 1e-6
  np.testing.assert_allclose(head(h), (pre[..., None] * hn).sum(2), rtol=1e-5, atol=1e-5)
  # fp32 vs float64 of a C·D-long dot product


def test_hc_mult_1_is_plain_prenorm_residual_exactly():
  cfg = MHCConfig(hc_mult=1)
  site = HyperConnection(cfg, D, rngs=nnx.Rngs(0))
  head = HCHead(cfg, D, rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(site, nnx.Param))   # nothing to learn at C = 1
  assert not jax.tree.leaves(nnx.state(head, nnx.Param))
  w = jax.random.normal(jax.random.key(1), (D, D))
  branch = lambda x: jnp.tanh(_rms_norm(x) @ w)            # f(norm(h))
  x0 = jax.random.normal(jax.random.key(2), (B, T, D))
  h = site.expand(x0)
  assert h.shape == (B, T, 1, D)
  plain = x0
  for _ in range(3):                                       # three residual blocks
    h, extra = site(h, branch)
    plain = plain + branch(plain)
    assert extra is None
  np.testing.assert_array_equal(head(h), plain)            # bit-exact, no tolerance
  # under jit too (both sides jitted: XLA may fuse the branch differently than eager)
  out = jax.jit(lambda x: site(site.expand(x), branch)[0][:, :, 0])(x0)
  np.testing.assert_array_equal(out, jax.jit(lambda x: x + branch(x))(x0))


def test_gradients_reach_every_stream_and_parameter():
  c = 4
  cfg = MHCConfig(hc_mult=c)
  site = HyperConnection(cfg, D, rngs=nnx.Rngs(0))
  head = HCHead(cfg, D, rngs=nnx.Rngs(1))
  w = jax.random.normal(jax.random.key(2), (D, D)) / 4
  h = jax.random.normal(jax.random.key(3), (B, T, c, D))

  def loss(site, head, h):
    out, _ = site(h, lambda x: jnp.tanh(_rms_norm(x) @ w))
    return jnp.sum(head(out) ** 2)

  g_site, g_head, g_h = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(site, head, h)
  per_stream = jnp.abs(g_h).sum(axis=(0, 1, 3))
  assert per_stream.shape == (c,) and bool(jnp.all(per_stream > 1e-6)), per_stream
  for name in ("fn", "base", "scale"):
    assert float(jnp.abs(getattr(g_site, name)[...]).sum()) > 0, name
    assert float(jnp.abs(getattr(g_head, name)[...]).sum()) > 0, name


def test_bf16_streams_keep_dtype():
  site = HyperConnection(MHCConfig(hc_mult=2), D, rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (B, T, 2, D)).astype(jnp.bfloat16)
  def run(site, h):
    x, post, comb = site.pre(h)
    return x, post, comb, site.post(x, h, post, comb)
  x, post, comb, out = nnx.jit(run)(site, h)
  assert x.dtype == jnp.bfloat16 and post.dtype == jnp.float32 and comb.dtype == jnp.float32
  assert out.dtype == jnp.bfloat16


def test_config_errors():
  with pytest.raises(ValueError, match=r"hc_mult=0.*>= 1"):
    MHCConfig(hc_mult=0)
  with pytest.raises(ValueError, match=r"sinkhorn_iters=0"):
    MHCConfig(sinkhorn_iters=0)
  with pytest.raises(ValueError, match=r"eps=-1"):
    MHCConfig(eps=-1.0)
  site = HyperConnection(MHCConfig(hc_mult=2), D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"h_BTCD.shape=\(2, 3, 3, 16\).*hc_mult=2"):
    site.pre(jnp.zeros((2, 3, 3, D)))
