"""MoE: V4 routing and expert math against a per-token loop, dense equivalence, hash
routing, dropless dispatch, bias balancing, sequence-wise loss, config errors, EP."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model1 import sharding
from model1.moe import (MoE, MoEConfig, SwiGLU, apply_bias_updates, make_tid2eid,
                        reset_moe_stats, update_bias)

D, F, VOCAB = 16, 8, 50


# One config, input shape and jitted forward shared by most tests, so they reuse one
# compilation per module structure (hash layer 0, score layer 1) instead of compiling each.
BASE = MoEConfig(n_routed_experts=6, n_activated_experts=2, n_shared_experts=1,
                 moe_inter_dim=F, route_scale=1.5, n_hash_layers=1, bias_update_rate=0.01,
                 seq_aux_loss_weight=0.1, block_size=3)
B, T = 2, 7
_fwd = nnx.jit(lambda m, x, ids, mask: m(x, ids, mask))


def _forward(m, x, ids=None, mask=None):
  return _fwd(m, x, ids, jnp.ones(x.shape[:2]) if mask is None else mask)


def _x(seed=1, scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), (B, T, D))


def _reference(m: MoE, x, ids=None):
  """Naive float64 per-token loop over V4's Gate / Expert / MoE.forward."""
  cfg = m.cfg
  x = np.asarray(x, np.float64).reshape(-1, D)
  gate = np.asarray(m.gate[...], np.float64)
  w1, w2, w3 = (np.asarray(m.experts.__getattribute__(n)[...], np.float64)
                for n in ("w1", "w2", "w3"))
  lim = cfg.swiglu_limit
  silu = lambda z: z / (1 + np.exp(-z))
  out = np.zeros_like(x)
  for u in range(x.shape[0]):
    s = np.sqrt(np.log1p(np.exp(x[u] @ gate)))
    if m.is_hash:
      idx = np.asarray(m.tid2eid[...])[np.asarray(ids).reshape(-1)[u]]
    else:
      biased = s + np.asarray(m.bias[...])
      idx = np.argsort(-biased, kind="stable")[:cfg.n_activated_experts]
    w = s[idx] / s[idx].sum() * cfg.route_scale
    for e, we in zip(idx, w):                 # exactly top-k contributions per token
      g, up = x[u] @ w1[e], x[u] @ w3[e]
      if lim > 0:
        up, g = np.clip(up, -lim, lim), np.minimum(g, lim)
      out[u] += (we * silu(g) * up) @ w2[e]
    if m.shared_experts is not None:
      se = m.shared_experts
      h = silu(x[u] @ np.asarray(se.w1[...], np.float64)) * (x[u] @ np.asarray(se.w3[...],
                                                                                np.float64))
      out[u] += h @ np.asarray(se.w2[...], np.float64)
  return out


# block 3: several blocks per group plus padding; 128: one padded block per group
@pytest.mark.parametrize("dispatch,block", [("blocked", 3), ("blocked", 128),
                                            ("ragged_dot", 3)])
def test_matches_per_token_loop(dispatch, block):
  cfg = dataclasses.replace(BASE, dispatch=dispatch, block_size=block)
  m = MoE(cfg, D, layer_id=1, rngs=nnx.Rngs(0))
  m.bias[...] = jnp.array([0.3, -0.2, 0.0, 0.1, -0.4, 0.2])   # steers selection only
  x = _x()                                                     # large: hits the clamps
  y, aux = _forward(m, x)
  tol = dict(rtol=2e-5, atol=2e-5)  # fp32 matmuls vs the float64 loop
  np.testing.assert_allclose(y.reshape(-1, D), _reference(m, x), **tol)
  assert float(aux.load.sum()) == B * T * 2                   # every token: top-k slots
  # worst case for a dropless dispatch: every token picks expert 0 (one full group)
  m.bias[...] = jnp.array([100.0, 0, 0, 0, 0, 0])
  y, aux = _forward(m, x)
  assert float(aux.load[0]) == B * T
  np.testing.assert_allclose(y.reshape(-1, D), _reference(m, x), **tol)


@pytest.mark.parametrize("dispatch", ["blocked", "ragged_dot"])
def test_one_expert_top1_is_dense_swiglu(dispatch):
  cfg = MoEConfig(n_routed_experts=1, n_activated_experts=1, n_shared_experts=0,
                  moe_inter_dim=F, route_scale=1.0, dispatch=dispatch, block_size=4)
  m = MoE(cfg, D, layer_id=0, rngs=nnx.Rngs(0))
  dense = SwiGLU(D, F, swiglu_limit=cfg.swiglu_limit, rngs=nnx.Rngs(1))
  for n in ("w1", "w2", "w3"):
    getattr(dense, n)[...] = getattr(m.experts, n)[...][0]
  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, D))
  y, _ = _forward(m, x)
  # the weight is s/s = 1 exactly; only matmul blocking may differ in the last bits
  np.testing.assert_allclose(y, jax.jit(dense)(x), rtol=1e-6, atol=1e-6)


def test_hash_routing_is_a_fixed_table():
  m = MoE(BASE, D, layer_id=0, vocab_size=VOCAB, rngs=nnx.Rngs(0))
  assert m.is_hash and m.bias is None
  table = np.asarray(m.tid2eid[...])
  assert table.shape == (VOCAB, 2) and table.dtype == np.int32
  assert all(len(set(r)) == 2 for r in table)                  # distinct experts per token
  np.testing.assert_array_equal(table, make_tid2eid(VOCAB, 6, 2, BASE.hash_seed + 0))
  assert not np.array_equal(table, make_tid2eid(VOCAB, 6, 2, BASE.hash_seed + 1))
  assert not isinstance(m.tid2eid, nnx.Param)                  # never trained
  ids = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)
  ids = ids.at[1, 3].set(5).at[0, 2].set(5)                    # token 5 twice
  y1, aux1 = _forward(m, _x(1), ids)
  y2, aux2 = _forward(m, _x(2), ids)                           # other inputs, same ids
  route = nnx.jit(lambda m, x, i: m.route(x, i))
  _, idx, w = route(m, _x(1).reshape(-1, D), ids.reshape(-1))
  np.testing.assert_array_equal(idx, table[np.asarray(ids).reshape(-1)])
  np.testing.assert_array_equal(idx[T + 3], idx[2])            # same id, same experts
  np.testing.assert_array_equal(aux1.load, aux2.load)          # independent of x
  np.testing.assert_allclose(w.sum(-1), BASE.route_scale, rtol=1e-6)  # normalised · scale
  np.testing.assert_allclose(y1.reshape(-1, D), _reference(m, _x(1), ids), rtol=2e-5,
                             atol=2e-5)                        # fp32 vs float64 loop
  assert float(aux1.seq_aux_loss) == 0.0                       # fixed routing: no loss
  with pytest.raises(ValueError, match="token_ids=None"):
    m(_x(1))


def test_update_bias_narrows_skewed_loads():
  e, k, u = 8, 2, 512
  key1, key2 = jax.random.split(jax.random.key(0))
  # fixed skewed router scores: expert i gets a +0.15·i head start
  s = jax.random.uniform(key1, (u, e)) + 0.15 * jnp.arange(e)

  def loads(bias):
    _, idx = jax.lax.top_k(s + bias, k)
    return jnp.zeros((e,)).at[idx.reshape(-1)].add(1.0)

  def step(bias, _):
    load = loads(bias)
    return update_bias(bias, load, 5e-3), load

  _, hist = jax.jit(lambda b: jax.lax.scan(step, b, None, length=300))(jnp.zeros((e,)))
  ratio = lambda l: float(l.max() / jnp.maximum(l.min(), 1.0))
  before = ratio(hist[0])
  after = ratio(hist[-50:].mean(0))
  assert before > 10, before                                  # the skew is real
  # the bias must absorb the 0.15·i head starts (±rate dithering remains)
  assert after * 2 <= before and after < 1.2, (before, after)


def test_module_bias_update_api():
  hashed = MoE(BASE, D, layer_id=0, vocab_size=VOCAB, rngs=nnx.Rngs(0))
  m = MoE(BASE, D, layer_id=1, rngs=nnx.Rngs(0))
  m.gate[...] = m.gate[...].at[:, 2].add(5.0)                  # expert 2 overloaded
  model = nnx.List([hashed, m])
  x, ids = _x(), jnp.zeros((B, T), jnp.int32)
  for _ in range(2):                                        # two micro-batches accumulate
    _, aux = _forward(m, x)
    _forward(hashed, x, ids)
  load = m.load[...]
  np.testing.assert_array_equal(load, 2 * aux.load)
  assert float(load.sum()) == 2 * B * T * 2
  nnx.jit(apply_bias_updates)(model)
  bias = np.asarray(m.bias[...])
  np.testing.assert_allclose(bias, 0.01 * np.sign(np.mean(load) - np.asarray(load)))
  assert bias[2] < 0
  assert float(jnp.abs(m.load[...]).sum()) == 0
  assert float(jnp.abs(hashed.load[...]).sum()) == 0
  _forward(m, x)
  reset_moe_stats(model)
  assert float(jnp.abs(m.load[...]).sum()) == 0


def test_seq_aux_loss_formula_and_gradient():
  e, k = BASE.n_routed_experts, BASE.n_activated_experts
  m = MoE(BASE, D, layer_id=1, rngs=nnx.Rngs(0))
  x = _x(4, 1.0)
  mask = jnp.ones((B, T)).at[1, 4:].set(0)                     # padding in row 1
  _, aux = _forward(m, x, mask=mask)
  s, idx, _ = m.route(x.reshape(-1, D))
  s, idx = np.asarray(s).reshape(B, T, e), np.asarray(idx).reshape(B, T, k)
  mk = np.asarray(mask)
  ref = 0.0
  for r in range(B):
    n = mk[r].sum()
    f = np.zeros(e)
    for tt in range(T):
      f[idx[r, tt]] += mk[r, tt]
    f *= e / (k * n)
    p = (mk[r, :, None] * s[r] / s[r].sum(-1, keepdims=True)).sum(0) / n
    ref += BASE.seq_aux_loss_weight * (f * p).sum() / B
  np.testing.assert_allclose(aux.seq_aux_loss, ref, rtol=1e-5)  # fp32 vs float64 sums
  assert float(aux.load.sum()) == mk.sum() * k                  # padding not counted
  g = nnx.jit(nnx.grad(lambda m: m(x, None, mask)[1].seq_aux_loss))(m)
  assert float(jnp.abs(g.gate[...]).sum()) > 0


def test_config_errors():
  with pytest.raises(ValueError, match=r"n_activated_experts=9.*n_routed_experts=8"):
    MoEConfig(n_routed_experts=8, n_activated_experts=9)
  with pytest.raises(ValueError, match=r"score_func='relu'"):
    MoEConfig(score_func="relu")
  with pytest.raises(ValueError, match=r"dispatch='dense'"):
    MoEConfig(dispatch="dense")
  cfg = MoEConfig(n_routed_experts=6, n_hash_layers=3)
  with pytest.raises(ValueError, match=r"n_hash_layers=3.*MoE layers \(2\)"):
    cfg.validate(n_moe_layers=2)
  with pytest.raises(ValueError, match=r"n_routed_experts=6.*'expert' mesh axis .*\(4\)"):
    cfg.validate(n_moe_layers=4, expert_axis_size=4)
  cfg.validate(n_moe_layers=4, expert_axis_size=3)
  with pytest.raises(ValueError, match=r"vocab_size=None.*layer_id=0"):
    MoE(cfg, D, layer_id=0, rngs=nnx.Rngs(0))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, conftest")
def test_expert_parallel_matches_single_device():
  x = jax.random.normal(jax.random.key(1), (8, 3, D))
  mesh = sharding.make_mesh(data=2, fsdp=1, expert=4)
  for dispatch in ("blocked", "ragged_dot"):
    cfg = MoEConfig(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=F,
                    dispatch=dispatch, block_size=4)
    build = lambda: MoE(cfg, D, layer_id=1, rngs=nnx.Rngs(0))

    def loss(m, x):
      y, aux = m(x)
      return jnp.sum(y * y) + aux.seq_aux_loss, y

    # gradients through the shard_map for one dispatch, forward for the other (runtime)
    grads = dispatch == "blocked"
    step = nnx.jit(nnx.value_and_grad(loss, has_aux=True) if grads else loss)
    out0 = step(build(), x)
    m = sharding.create_sharded(build, mesh)
    assert m.experts.w1[...].sharding.spec[0] == "expert"
    with sharding.use_mesh(mesh):
      out = step(m, jax.device_put(x, sharding.batch_sharding(mesh, x.shape)))
    (_, y0), (_, y) = (out0[0], out[0]) if grads else (out0, out)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)   # psum order vs one device
    if grads:
      g, g0 = out[1], out0[1]
      for a, b in ((g.experts.w2, g0.experts.w2), (g.gate, g0.gate)):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-4)  # same, summed
        # in another order
