"""Optimiser: Muon/AdamW partition by path and shape, schedule, accumulation, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model1 import sharding
from model1.optim import (OptimConfig, is_accumulation_boundary, lr_schedule,
                          make_optimizer, muon_mask)

V, D, F, E = 16, 8, 12, 3


class Toy(nnx.Module):
  """Every kind of leaf a MODEL1 transformer has, with the project's names."""

  def __init__(self, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(0.3)
    p = lambda shape, axes: sharding.param(init, rngs.params(), shape, axes)
    self.embed = nnx.Embed(V, D, rngs=rngs)                  # path embed/embedding
    self.attn_norm = nnx.RMSNorm(D, rngs=rngs)               # 1-D scale
    self.wq = nnx.Linear(D, D, rngs=rngs)                    # kernel 2-D, bias 1-D
    self.wq_b = p((D, 2, 4), ("embed", "heads", "head_dim"))  # Dense [in, *out]: 3-D
    self.wo_a = p((2, D, 4), ("o_groups", "embed", None))    # grouped output: 3-D
    self.gate = p((D, E), ("embed", None))                   # MoE router
    self.experts = nnx.Dict(w1=p((E, D, F), ("exp", "embed", "mlp")),
                            w2=p((E, F, D), ("exp", "mlp", "embed")))
    self.hc_attn = nnx.Dict(fn=p((8, 2 * D), (None, None)),  # mHC dynamic projection
                            base=p((8,), (None,)), scale=p((3,), (None,)))
    self.hc_head = nnx.Dict(fn=p((2, 2 * D), (None, None)))  # "hc_head" is not "head"
    self.head = p((D, V), ("embed", "vocab"))                # output head

  def __call__(self, ids):
    x = self.attn_norm(self.embed(ids))
    x = self.wq(x) + jnp.einsum("td,gdr->tr", x, self.wo_a[...]).sum(-1, keepdims=True)
    x = x + jnp.einsum("td,dnh->t", x, self.wq_b[...])[:, None]
    r = jax.nn.softmax(x @ self.gate[...])
    x = x + jnp.einsum("te,tf,efd->td", r, jax.nn.silu(
        jnp.einsum("td,edf->tf", x, self.experts["w1"][...])), self.experts["w2"][...])
    x2 = jnp.concatenate([x, x], -1)
    x = x * jnp.sum(x2 @ self.hc_attn["fn"][...].T, -1, keepdims=True) * self.hc_attn[
        "scale"][...][0] + self.hc_attn["base"][...][0] + (x2 @ self.hc_head["fn"][...].T)[
            :, :1]
    return x @ self.head[...]


_toy_state = []


def _toy() -> Toy:
  """A fresh Toy; built once under jit (one compile instead of one per eager init op),
  then merged anew for each test so updates never leak between tests."""
  if not _toy_state:
    _toy_state.extend(nnx.split(nnx.jit(lambda: Toy(nnx.Rngs(0)))()))
  return nnx.merge(*_toy_state)


MUON = {"wq/kernel", "wq_b", "wo_a", "experts/w1", "experts/w2", "hc_attn/fn", "hc_head/fn"}


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, (bool, np.bool_)))[0]
  out = {}
  for path, v in leaves:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out["/".join(n for n in names if n != "value")] = v
  return out


def test_muon_mask_takes_exactly_the_weight_matrices():
  model = _toy()
  mask = _flat(muon_mask(nnx.state(model, nnx.Param)))
  assert {k for k, v in mask.items() if v} == MUON
  assert {"embed/embedding", "attn_norm/scale", "wq/bias", "gate", "head",
          "hc_attn/base", "hc_attn/scale"} <= {k for k, v in mask.items() if not v}
  # same answer on pure arrays (what optax sees at update time)
  pure = _flat(muon_mask(nnx.as_pure(nnx.state(model, nnx.Param))))
  assert pure == mask


def test_names_that_disagree_with_logical_axes_are_refused():
  # the update pass only sees names, so init refuses metadata the names would misread
  def bad(name, shape, axes):
    class Bad(nnx.Module):
      def __init__(self, rngs):
        setattr(self, name, sharding.param(jax.nn.initializers.zeros, rngs.params(),
                                           shape, axes))
    return nnx.state(Bad(nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match=r"lm_out.*'vocab'.*adamw_names"):
    muon_mask(bad("lm_out", (D, V), ("embed", "vocab")))
  with pytest.raises(ValueError, match=r"w_stack.*'exp'.*experts"):
    muon_mask(bad("w_stack", (E, D, F), ("exp", "embed", "mlp")))


def _loss(model, ids):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids), (ids + 1) % V).mean()


@nnx.jit
def _train_step(model, opt, ids):
  loss, grads = nnx.value_and_grad(_loss)(model, ids)
  opt.update(model, grads)
  return loss, is_accumulation_boundary(opt.opt_state)


@pytest.mark.parametrize("muon", [False, True])
def test_optimizer_steps_and_learns(muon):
  model = _toy()
  cfg = OptimConfig(lr=1e-2, muon_lr=2e-2, warmup_steps=2, total_steps=40, muon=muon)
  opt = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
  ids = jnp.arange(12) % V
  before = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
  losses = [float(_train_step(model, opt, ids)[0]) for _ in range(15)]
  assert losses[-1] < 0.8 * losses[0], losses
  after = _flat(nnx.state(model, nnx.Param))
  assert all(not np.array_equal(before[k], after[k]) for k in MUON)


def test_gradient_accumulation_moves_params_every_k_steps():
  model = _toy()
  cfg = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=20, grad_accum=2, muon=True)
  opt = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
  ids = jnp.arange(12) % V
  w0 = np.asarray(model.wq.kernel[...])
  _, boundary = _train_step(model, opt, ids)
  assert not bool(boundary)
  np.testing.assert_array_equal(model.wq.kernel[...], w0)     # accumulated, not applied
  _, boundary = _train_step(model, opt, ids)
  assert bool(boundary)
  assert not np.array_equal(np.asarray(model.wq.kernel[...]), w0)


def test_schedule_shape():
  cfg = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  s = lr_schedule(cfg)
  np.testing.assert_allclose([s(0), s(10), s(60), s(110)], [0.1, 1.0, 0.55, 0.1], rtol=1e-5)
  # rtol: fp32 cosine
  np.testing.assert_allclose(lr_schedule(cfg, 0.02)(10), 0.02, rtol=1e-6)


def test_config_errors():
  with pytest.raises(ValueError, match=r"total_steps=5.*warmup_steps=10"):
    OptimConfig(warmup_steps=10, total_steps=5)
  with pytest.raises(ValueError, match=r"grad_accum=0"):
    OptimConfig(grad_accum=0)
  with pytest.raises(ValueError, match=r"b2=1.0"):
    OptimConfig(b2=1.0)
  with pytest.raises(ValueError, match=r"lr=0"):
    OptimConfig(lr=0)


def test_first_step_updates_are_adam_signs_and_muon_orthogonal():
  # pure-array tree (what optax sees inside nnx.Optimizer.update); no clip, no decay
  cfg = OptimConfig(lr=1e-3, muon_lr=1e-2, warmup_steps=1, total_steps=10, clip=0,
                    weight_decay=0.0, muon=True)
  shapes = {"embed": (V, D), "attn_norm": (D,), "wq": (D, 2 * D), "gate": (D, E),
            "experts": {"w1": (E, D, F)}, "wq_b": (D, 2, 4)}
  keys = iter(jax.random.split(jax.random.key(0), 8))
  params = jax.tree.map(jnp.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  tx = make_optimizer(cfg)
  upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  lr0 = float(lr_schedule(cfg)(0))
  for name in ("embed", "attn_norm", "gate"):   # Adam step 1: m/sqrt(v) = g/|g|
    np.testing.assert_allclose(upd[name], -lr0 * np.sign(grads[name]), rtol=1e-4)
    # rtol: eps = 1e-8 against |g| ~ 1
  mlr = float(lr_schedule(cfg, cfg.muon_lr)(0))
  # Newton–Schulz (5 steps, Jordan's coefficients) maps singular values into ~[0.6, 1.2];
  # shape scaling sqrt(max(1, fan_out/fan_in)) = sqrt(2) for wq [8, 16]
  sv = np.linalg.svd(np.asarray(upd["wq"]) / (-mlr * np.sqrt(2)), compute_uv=False)
  assert 0.5 < sv.min() and sv.max() < 1.3, sv
  # Dense [in, *out]: wq_b [8, 2, 4] is one [8, 8] matrix (scale 1)
  sv = np.linalg.svd(np.asarray(upd["wq_b"]).reshape(D, 8) / -mlr, compute_uv=False)
  assert 0.5 < sv.min() and sv.max() < 1.3, sv
  for e in range(E):                             # each expert orthogonalised on its own
    sv = np.linalg.svd(np.asarray(upd["experts"]["w1"][e]) / (-mlr * np.sqrt(F / D)),
                       compute_uv=False)
    assert 0.5 < sv.min() and sv.max() < 1.3, (e, sv)


def test_stacked_layers_update_like_the_same_layers_stored_apart():
  """A scanned slot's leaves (path ``scanned``, leading axis = its layers): each layer's
  matrix is orthogonalised on its own, its norm stays on AdamW and is not decayed, and
  the update equals that of the same layers stored per layer."""
  from model1 import scan
  cfg = OptimConfig(lr=1e-3, muon_lr=1e-2, warmup_steps=1, total_steps=10, clip=0,
                    weight_decay=0.1, muon=True)
  keys = iter(jax.random.split(jax.random.key(1), 18))
  layer = lambda: {"attn_norm": {"weight": jax.random.normal(next(keys), (D,))},  # noqa: E731
                   "wq": {"weight": jax.random.normal(next(keys), (D, 2 * D))},
                   "experts": {"w1": jax.random.normal(next(keys), (E, D, F))}}
  per = {"layers": {0: layer(), 1: layer(), 2: layer()}}
  grads_per = {"layers": {i: layer() for i in range(3)}}
  slot_ids = ((0, 2), )   # layers 0 and 2 share a slot, layer 1 stays apart
  stacked, grads_st = scan.to_stacked(per, slot_ids), scan.to_stacked(grads_per, slot_ids)
  assert stacked["scanned"][0]["wq"]["weight"].shape == (2, D, 2 * D)
  assert muon_mask(stacked)["scanned"][0] == {"attn_norm": {"weight": False},
                                              "wq": {"weight": True},
                                              "experts": {"w1": True}}
  tx = make_optimizer(cfg)
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  want, got = step(grads_per, per), scan.to_per_layer(step(grads_st, stacked), slot_ids)
  for path, w in jax.tree_util.tree_leaves_with_path(want):
    g = got
    for k in path:
      g = g[k.key]
    # the same per-matrix arithmetic in a batched program: fp32 rounding only
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7, err_msg=str(path))
