"""Layers under lax.scan (model1.scan) against the unrolled Python loop: the layer plan,
loss and gradients (V4 with mHC, hash + routed MoE, CSA/HCA and MTP; V3.2 with DSA),
generation, remat, and checkpoints moving between the two modes."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model1 import checkpoint, config, generate, scan, steps
from model1.model import Transformer


def _v4(head_dim=32, **kw):
  """Tiny V4: window-only hash layer, then [CSA 4, HCA 8] x 2 routed-MoE layers
  (``head_dim=512``: FlashMLA's MODEL1 head, which the decode caches need)."""
  r = min(head_dim, 64)
  a = config.AttentionConfig(
      geometry="model1", n_heads=2, q_lora_rank=16, head_dim=head_dim,
      rope=config.RopeConfig(dim=r), o_groups=2, o_lora_rank=16, sparse="compressed",
      window_size=8, compress_ratios=(0, 4, 8, 4, 8),
      compress_rope=config.RopeConfig(dim=r, theta=160000.0, yarn_factor=16.0,
                                      original_max_len=65536),
      index_n_heads=2, index_head_dim=r, index_topk=2, attn_chunk=8)
  moe = config.MoEConfig(n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
                         moe_inter_dim=32, n_hash_layers=1, block_size=8)
  return config.ModelConfig(vocab_size=128, d_model=32, n_layers=5, max_seq_len=64,
                            attention=a, mhc=config.MHCConfig(hc_mult=4, sinkhorn_iters=4),
                            use_moe=True, moe=moe, mtp=config.MTPConfig(n_layers=1),
                            **kw).validate()


def _v32_dsa(**kw):
  """Tiny V3.2 with DSA: a hash layer, then two identical routed-MoE layers."""
  a = config.AttentionConfig(geometry="v32", n_heads=2, q_lora_rank=16, kv_lora_rank=32,
                             qk_nope_head_dim=16, v_head_dim=16, rope=config.RopeConfig(dim=32),
                             sparse="dsa", index_n_heads=2, index_head_dim=32, index_topk=4,
                             attn_chunk=8)
  moe = config.MoEConfig(n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
                         moe_inter_dim=32, n_hash_layers=1, block_size=8)
  return config.ModelConfig(vocab_size=128, d_model=32, n_layers=3, max_seq_len=64,
                            attention=a, use_moe=True, moe=moe, **kw).validate()


def _batch(cfg, B=2, T=16, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((B, T), np.int32)
  seg[1, T // 2:] = 2                                   # two documents in row 1
  pos = np.concatenate([np.arange(T)[None], np.concatenate(
      [np.arange(T // 2), np.arange(T - T // 2)])[None]]).astype(np.int32)
  return {"inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
          "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
          "loss_mask": jnp.ones((B, T), jnp.float32)}


def test_plan_finds_the_repeating_groups():
  assert scan.plan(list("aabcbcbc")) == (scan.Segment(0, 1, 2), scan.Segment(2, 2, 3))
  assert scan.plan(list("abc")) == tuple(scan.Segment(i, 1, 1) for i in range(3))
  assert scan.layer_plan(_v4()) == (scan.Segment(0, 1, 1), scan.Segment(1, 2, 2))
  assert scan.layer_plan(_v4(scan_layers=False)) == tuple(scan.Segment(i, 1, 1)
                                                          for i in range(5))
  # the peer config: 2 window hash layers, 1 CSA hash layer, then [HCA 128, CSA 4] x 20
  from configs import v4_tiny_peer
  peer = config.model_config_from_dict(v4_tiny_peer.get_config().model)
  assert scan.layer_plan(peer) == (scan.Segment(0, 1, 2), scan.Segment(2, 1, 1),
                                   scan.Segment(3, 2, 20))
  # an Engram layer never joins a scanned group (its table size is its own)
  e = config.with_engram(dataclasses.replace(_v32_dsa(), n_layers=4), 500, layer_ids=(2,))
  assert scan.Segment(2, 1, 1) in scan.layer_plan(e)


def test_remat_flag_keeps_its_boolean_form():
  assert _v4(remat=True).remat == "full" and _v4(remat="False").remat == "none"
  assert config.model_config_from_dict({"remat": "dots_saveable"}).remat == "dots_saveable"
  with pytest.raises(ValueError, match="model.remat"):
    _v4(remat="sometimes")


def _loss_and_grads(cfg, batch):
  model = Transformer(cfg, nnx.Rngs(0))

  @nnx.jit
  def f(m, b):
    (_, aux), g = nnx.value_and_grad(steps.loss_fn, has_aux=True)(m, b)
    return aux, g
  aux, g = f(model, batch)
  # compared in DeepSeek's per-layer names whatever the storage (stacked slots unstacked)
  def per(st):
    tree = scan.to_per_layer(st.to_pure_dict(), model.slot_ids)
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  return aux, per(g), per(nnx.state(model, nnx.Not(nnx.Param)))


@pytest.mark.parametrize("make,remat", [(_v4, "none"), (_v32_dsa, "full")])
def test_scanned_matches_unrolled(make, remat):
  batch = _batch(make())
  a0, g0, s0 = _loss_and_grads(make(scan_layers=False, remat=remat), batch)
  a1, g1, s1 = _loss_and_grads(make(scan_layers=True, remat=remat), batch)
  # same math in a different XLA program: fp32 reassociation only (~1e-6 relative)
  np.testing.assert_allclose(a1["loss"], a0["loss"], rtol=1e-5)
  assert set(a1["aux"]) == set(a0["aux"]) and set(a1["metrics"]) == set(a0["metrics"])
  for k in a0["aux"]:  # per-layer sown losses keep their per-layer paths and values
    np.testing.assert_allclose(a1["aux"][k], a0["aux"][k], rtol=1e-4, atol=1e-7, err_msg=k)
  flat0, flat1 = g0, g1
  assert flat0.keys() == flat1.keys()
  gmax = max(np.linalg.norm(np.asarray(v)) for v in flat0.values())
  for path, v in flat0.items():
    x, y = np.asarray(v), np.asarray(flat1[path])
    # fp32 summation order differs between the two XLA programs: ~1e-6 of the leaf's
    # norm, more for leaves whose terms cancel (mHC head scale: 2e-4 of a 7e-6 value),
    # hence the floor at 1e-6 of the largest leaf; a wrong layer would be O(1)
    assert np.linalg.norm(y - x) <= 1e-4 * np.linalg.norm(x) + 1e-6 * gmax, path
  # MoE load counters written back into each scanned layer
  assert s0.keys() == s1.keys()
  for path, v in s0.items():
    np.testing.assert_array_equal(s1[path], v, err_msg=str(path))


def test_generate_same_tokens_both_ways():
  prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6], [11, 12, 13]]
  sampling = generate.SamplingConfig(max_new_tokens=4)
  out = []
  for sc in (False, True):
    m = Transformer(_v4(512, scan_layers=sc), nnx.Rngs(1))
    g = generate.generate(m, prompts, sampling, return_logits=True)
    out.append(g)
  assert out[0].tokens == out[1].tokens
  # bf16 caches and queries in both: an fp32 reassociation difference upstream can flip
  # one bf16 rounding (2^-8 relative) of a cached vector, so logits agree to ~1e-2
  np.testing.assert_allclose(out[1].logits, out[0].logits, atol=5e-2)


def _save_restore(tmp_path, cfg_from, cfg_to, meta_edit=None):
  tx = optax.adam(1e-3)
  src = Transformer(cfg_from, nnx.Rngs(3))
  opt = nnx.Optimizer(src, tx, wrt=nnx.Param)
  meta = config.to_dict(cfg_from)
  if meta_edit:
    meta_edit(meta)
  ck = checkpoint.Checkpointer(tmp_path)
  ck.save(1, src, opt, jax.random.key(0), meta)
  ck.wait()
  if meta_edit:  # the metadata as written before stacked storage: no "slots" entry
    f = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
    on_disk = json.loads(f.read_text())
    assert on_disk.pop("slots") == []
    f.write_text(json.dumps(on_disk))
  # an abstract target (shapes only, nothing initialised): every leaf must come from disk
  dst, dopt = nnx.eval_shape(lambda: _with_opt(Transformer(cfg_to, nnx.Rngs(4)), tx))
  ck.restore(1, dst, dopt, config.to_dict(cfg_to))
  ck.close()
  # the same values in DeepSeek's per-layer names, whichever layout each side stores
  per = lambda m, o: (m.per_layer_state(),  # noqa: E731
                      scan.to_per_layer(nnx.state(o).to_pure_dict(), m.slot_ids))
  want, got = per(src, opt), per(dst, dopt)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert isinstance(b, jax.Array)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return dst


def _with_opt(model, tx):
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_checkpoint_moves_between_scanned_and_unrolled(tmp_path):
  scanned, unrolled = _v4(), _v4(scan_layers=False, remat="full")
  m = _save_restore(tmp_path / "a", scanned, unrolled)
  assert "layers" in nnx.state(m, nnx.Param)  # per-layer names: layers.i.attn.wq_a ...
  assert nnx.state(m, nnx.Param)["layers"][3]["attn"]["wq_a"]["weight"].shape == (32, 16)
  _save_restore(tmp_path / "b", unrolled, scanned)


def test_checkpoint_from_before_scan_layers_restores(tmp_path):
  """Checkpoints written before model.scan_layers and stacked storage existed (remat a
  bool, every layer stored per layer, no layout in the metadata) restore stacked."""
  def old(meta):
    meta.pop("scan_layers")
    meta["remat"] = False
  _save_restore(tmp_path, _v4(scan_layers=False), _v4(), meta_edit=old)
