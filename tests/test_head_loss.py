"""The head's cross-entropy in chunks of positions (model1.head_loss) against the plain
[B,T,V] computation: same loss and gradients, and no [B,T,V] array in the program."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model1 import head_loss

B, T, D, V = 2, 37, 16, 1000  # T not a multiple of the chunk: the padded tail is tested


def _inputs():
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (B, T, D), jnp.bfloat16)  # bf16 activations, fp32 head
  w = jax.random.normal(kw, (D, V), jnp.float32) * 0.3
  t = jax.random.randint(kt, (B, T), 0, V)
  mask = (jnp.arange(T) % 5 != 0).astype(jnp.float32)[None].repeat(B, 0)
  return x, w, t, mask


def _plain(x, w, t, mask):
  logits = jnp.einsum("btd,dv->btv", x.astype(jnp.float32), w)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
  return (ce * mask).sum() / mask.sum()


def _chunked(x, w, t, mask, chunk_bytes):
  ce = head_loss.token_cross_entropy(x, w, t, chunk_bytes=chunk_bytes)
  return (ce * mask).sum() / mask.sum()


CHUNK = 4 * B * V * 8  # 8 positions per chunk: 5 chunks over T = 37


def test_chunked_matches_plain_loss_and_gradients():
  x, w, t, mask = _inputs()
  assert head_loss.chunk_len(B, T, V, CHUNK) == 8
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
  l0, (gx0, gw0) = grad(_plain)(x, w, t, mask)
  l1, (gx1, gw1) = grad(lambda *a: _chunked(*a, CHUNK))(x, w, t, mask)
  # the same fp32 math per position; only the summation order of d w differs
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gw1), np.asarray(gw0), rtol=1e-5, atol=1e-7)
  # d x is rounded to x's bf16 dtype: equal up to one bf16 rounding (2^-8 relative)
  np.testing.assert_allclose(np.asarray(gx1, np.float32), np.asarray(gx0, np.float32),
                             rtol=2**-7, atol=1e-6)
  assert gx1.dtype == x.dtype and gw1.dtype == w.dtype
  # one chunk covering everything is the plain program, bit for bit
  l2 = jax.jit(lambda *a: _chunked(*a, 4 * B * V * T))(x, w, t, mask)
  np.testing.assert_array_equal(l2, jax.jit(_plain)(x, w, t, mask))


def test_no_full_logits_in_forward_or_backward():
  x, w, t, mask = _inputs()
  jaxpr = jax.make_jaxpr(jax.grad(lambda *a: _chunked(*a, CHUNK), argnums=(0, 1)))(
      x, w, t, mask)
  sizes = []

  def walk(jp):
    for eqn in jp.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  assert max(sizes) <= B * 8 * V < B * T * V  # one chunk's logits at most


def test_bad_chunk_bytes():
  with pytest.raises(ValueError, match="chunk_bytes"):
    head_loss.chunk_len(B, T, V, 0)
