"""Sharded training on 8 fake CPU devices equals the one-device step; parameters are
sharded as their logical axes say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from conftest import shrink
from model1 import config, optim, scan, sharding, steps, trainer

pytestmark = pytest.mark.xdist_group("sharding")  # one worker builds the module fixtures once

# every mesh axis split in at least one, and split together: data x fsdp x tensor (the
# batch over two axes, weights over two), fsdp x expert (experts split both ways). Each
# mesh is a ~55 CPU-s SPMD compile; a pure data-parallel mesh and fsdp=4 added nothing
MESHES = [dict(data=2, fsdp=2, tensor=2, expert=1), dict(data=1, fsdp=2, tensor=1, expert=4)]


@pytest.fixture(scope="module")
def setup(tiny_cfg, dataset):
  cfg = shrink(tiny_cfg.copy_and_resolve_references(), seq_len=64, batch_size=8)
  cfg.model.attention.n_heads = 4  # divisible by tensor=2
  # a hash-routed CSA layer, then two identical HCA layers stored stacked (model1.scan):
  # the stacked "layers" axis is laid out and trained on every mesh too
  cfg.model.n_layers, cfg.model.attention.compress_ratios = 3, (4, 16, 16)
  mcfg = config.model_config_from_dict(cfg.model)
  assert [len(ids) for ids in scan.slots(mcfg)] == [2]
  batch = dataset.batch(0)
  model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, None, 0)
  out = steps.train_step(model, opt, trainer.put_batch(batch, None))
  return cfg, mcfg, batch, float(out["loss"]), nnx.state(model, nnx.Param)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(map(str, a.values())))
def test_sharded_step_matches_single_device(setup, axes):
  cfg, mcfg, batch, loss1, params1 = setup
  mesh = sharding.make_mesh(**axes)
  model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, 0)
  if axes["expert"] > 1:  # experts really are split over the expert axis
    w1 = model.block(0).ffn.experts.w1[...]
    assert w1.sharding.spec[0] == "expert", w1.sharding.spec
    w1 = model.scanned[0].ffn.experts.w1[...]  # [layers, experts, ...]
    assert w1.sharding.spec[:2] == (None, "expert"), w1.sharding.spec
  for path, v in jax.tree.leaves_with_path(nnx.state(model, nnx.Param),
                                           is_leaf=lambda x: isinstance(x, nnx.Variable)):
    want = sharding.logical_to_spec(v.logical_axes, mesh, v.shape)
    assert v[...].sharding.spec == want, (path, v[...].sharding.spec, want)
  with sharding.use_mesh(mesh):
    out = steps.train_step(model, opt, trainer.put_batch(batch, mesh))
  # fp32 with reductions split across devices: only summation order differs
  np.testing.assert_allclose(float(out["loss"]), loss1, rtol=2e-6)
  # Adam's first step moves each weight by ~lr0 whatever |g|: a gradient within rounding
  # of 0 may flip sign with the summation order, a 2·lr0 difference in that one weight
  # (seen: 1 of 65,536); a mis-sharded layer would be off everywhere
  lr0 = float(optim.lr_schedule(trainer.optim_config(cfg.train))(0))
  for (p, a), (_, b) in zip(jax.tree.leaves_with_path(params1),
                            jax.tree.leaves_with_path(nnx.state(model, nnx.Param))):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, atol=2.5 * lr0, rtol=1e-4, err_msg=str(p))
    assert np.mean(np.abs(b - a) > 2e-5) < 1e-3, p


def test_rules_shard_what_they_say(setup):
  cfg, mcfg, *_ = setup
  mesh = sharding.make_mesh(**MESHES[0])  # the sharded init is compiled once, above
  model, _ = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, 0)
  a = model.block(0).attn
  assert a.wq_b.weight[...].sharding.spec == PartitionSpec(None, "tensor", None)
  assert model.embed.weight[...].sharding.spec == PartitionSpec("tensor", "fsdp")
  # MLA's single shared KV vector is never split over tensor
  assert a.wkv.weight[...].sharding.spec == PartitionSpec("fsdp", None)


def test_experts_must_divide_the_expert_axis(setup):
  cfg, mcfg, *_ = setup
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, expert=-1)  # 8-way expert axis
  bad = config.model_config_from_dict(dict(cfg.model.to_dict(), moe=dict(
      cfg.model.moe.to_dict(), n_routed_experts=6, n_activated_experts=2)))
  with pytest.raises(ValueError, match="expert"):
    trainer.build_model_and_optimizer(bad, cfg.train, mesh, 0)


def test_mesh_must_match_device_count():
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=3, fsdp=1, tensor=1, expert=1)
  with pytest.raises(ValueError, match="mesh.tensor"):
    sharding.make_mesh(tensor=0)
