"""Generation through the sparse attention kernels (``impl="pallas"``, interpret mode on
CPU) matches the XLA reference path on the two sparse models, and the comparison is tight
enough to catch a kernel that drops a single key.

  * V4 compressed (``preset("tiny", "model1")``: every layer a sliding window of W slots,
    layer 0 CSA (ratio 4, the indexer's top-k entries), layer 1 HCA (ratio 16)): decode is
    ``sparse_decode`` over the window ring (main cache) + the compressed entries (extra
    cache) with the sink; prefill is ``sparse_prefill`` over the window rows + entries.
  * V3.2 DSA (``preset("tiny", "v32", sparse="dsa")``, one layer): ``sparse_decode`` over
    the paged token cache with the lightning indexer's top-k (8, smaller than the context,
    so the selection matters); prefill is ``sparse_prefill`` over the indexer's top-k.

The two runs of a model share it (module fixture). The comparison is shown to be tight: a
kernel that drops one key per query fails it (V4 decode, DSA prefill).
"""
import dataclasses
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model1 import config, generate as gen
from model1.generate import SamplingConfig, generate
from model1.model import Transformer
from pallas_kernels import dispatch

pytestmark = pytest.mark.xdist_group("generate_sparse_kernels")  # one worker builds the module fixtures once


STEPS = 12
# V4: W = 16, so both sequences wrap the ring; sequence 0's prefill emits the first HCA
# entry (tokens 0-15), sequence 1 emits its HCA entry and CSA entries during decode.
V4_PROMPTS = [list(range(3, 22)), [7, 8, 9, 10, 11, 12]]
# DSA: top-8 of up to 30 tokens.
DSA_PROMPTS = [list(range(3, 22)), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def _v4():
  cfg = config.preset("tiny", "model1")
  a = dataclasses.replace(cfg.attention, n_heads=2, q_lora_rank=32, o_lora_rank=32,
                          index_n_heads=2, window_size=16, index_topk=4)
  return dataclasses.replace(cfg, vocab_size=97, d_model=64, attention=a,
                             ffn=config.FFNConfig(128), mhc=config.MHCConfig(hc_mult=1),
                             use_moe=False, mtp=config.MTPConfig(0))


def _dsa():
  cfg = config.preset("tiny", "v32", sparse="dsa")
  a = dataclasses.replace(cfg.attention, n_heads=2, q_lora_rank=32, index_n_heads=2,
                          index_topk=8)
  return dataclasses.replace(cfg, vocab_size=97, d_model=64, n_layers=1, attention=a,
                             ffn=config.FFNConfig(128), use_moe=False, mtp=config.MTPConfig(0))


MODELS = {"v4": (_v4, V4_PROMPTS), "dsa": (_dsa, DSA_PROMPTS)}


def _run(model, prompts, impl):
  return generate(model, prompts, SamplingConfig(max_new_tokens=STEPS), block_size=5,
                  impl=impl, return_logits=True)


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request):
  make, prompts = MODELS[request.param]
  model = Transformer(make(), nnx.Rngs(0))
  return request.param, model, prompts, {impl: _run(model, prompts, impl)
                                         for impl in ("xla", "pallas")}


def _max_error(ref, ker):
  """max |logit difference| over the steps where both runs have seen the same tokens."""
  err = 0.0
  for b in range(len(ref.tokens)):
    n = min(len(ref.tokens[b]), len(ker.tokens[b]))
    diff = [t for t in range(n) if ref.tokens[b][t] != ker.tokens[b][t]]
    n = diff[0] + 1 if diff else n
    err = max(err, float(np.abs(ref.logits[:n, b] - ker.logits[:n, b]).max()))
  return err


# Largest |logit difference| seen, as a fraction of max|logits| (bf16 q, keys and P in the
# kernels vs fp32 math in the reference): V4 (2 layers) 0.0066, DSA (1 layer) 0.0030.
# Bound ~2x that; a kernel that drops one key moves the logits 35-60x the bound.
BOUND = {"v4": 2.0**-6.25, "dsa": 2.0**-7.25}


def _bound(name, ref):
  return BOUND[name] * float(np.abs(ref.logits).max())


def test_kernel_generation_matches_xla(runs):
  name, model, prompts, r = runs
  ref, ker = r["xla"], r["pallas"]
  assert (ref.impl, ker.impl) == ("xla", "pallas")
  a = model.cfg.attention
  lens = np.array([len(p) for p in prompts])
  fed = lens + STEPS - 1                               # the last sampled token is never fed
  if name == "v4":                                     # what the prompts are chosen to reach
    assert (fed > a.window_size).all()                 # every ring wraps
    for r_ in a.compress_ratios:                       # entries emitted by decode steps
      assert (fed // r_ > lens // r_).any(), r_
  else:
    assert (lens > a.index_topk).all()                 # top-k is a real selection
  bound = _bound(name, ref)
  err = _max_error(ref, ker)
  print(f"{name}: max|logit diff| xla vs pallas {err:.4g} "
        f"({err / np.abs(ref.logits).max():.4f} max|logits|), bound {bound:.4g}")
  assert err <= bound
  decided = 0
  for b in range(len(prompts)):
    for t in range(STEPS):
      top2 = np.sort(ref.logits[t, b])[-2:]
      if top2[1] - top2[0] > 2 * bound:   # each logit moves by <= bound: argmax is fixed
        assert ref.tokens[b][t] == ker.tokens[b][t], (b, t)
        decided += 1
      if ref.tokens[b][t] != ker.tokens[b][t]:
        break                             # after a near-tie flip the inputs differ
  assert decided >= STEPS, decided        # untrained models: ~20% of steps are near-ties
  print(f"{name}: tokens identical: {ref.tokens == ker.tokens}, {decided} steps decided")


def _drop_one_key(real):
  """A broken kernel: in every query row, the first valid index (main cache) -> -1."""
  def broken(q, kv, indices, **kw):
    if kw.get("impl") == "pallas":
      first = jnp.argmax(indices >= 0, axis=-1)[..., None]       # traced: runs in the step
      hit = (jnp.arange(indices.shape[-1]) == first) & (indices >= 0)
      indices = jnp.where(hit, -1, indices)
    return real(q, kv, indices, **kw)
  return broken


def test_a_kernel_dropping_one_key_fails_the_comparison(runs, monkeypatch):
  name, model, prompts, r = runs
  # one broken kernel per model (each costs a compilation): V4 decode (main + extra
  # cache), DSA prefill
  path = "decode" if name == "v4" else "prefill"
  mod = importlib.import_module(f"pallas_kernels.sparse_{path}")
  fn = f"sparse_{path}"
  monkeypatch.setattr(mod, fn, _drop_one_key(getattr(mod, fn)))
  step = gen._decode_step if path == "decode" else gen._prefill
  step.clear_cache()                     # retrace, so the broken kernel is what runs
  try:                                   # prefill: its logits are the first step's
    bad = generate(model, prompts, SamplingConfig(max_new_tokens=STEPS if path == "decode"
                                                  else 1), block_size=5, impl="pallas",
                   return_logits=True)
  finally:
    step.clear_cache()
  ref = r["xla"]
  err = _max_error(ref, bad)             # prefill: over its one step
  if path == "decode":
    np.testing.assert_array_equal(bad.logits[0], r["pallas"].logits[0])  # prefill intact
  bound = _bound(name, ref)
  print(f"{name}: {path} drops one key: max|logit diff| {err:.4g}, bound {bound:.4g}")
  assert err > bound


def test_resolve_impl(monkeypatch):
  # every kernel has a Mosaic GPU version, so one name for a whole model may be "mosaic"
  assert dispatch.mosaic_registered() and set(dispatch.KERNELS) == {
      "sparse_decode", "dense_decode", "sparse_prefill"}
  if jax.default_backend() != "gpu":
    assert dispatch.resolve_impl("auto") == "xla"
  for name in ("xla", "pallas", "mosaic"):
    assert dispatch.resolve_impl(name) == name
  for bad in ("triton", None, "AUTO"):
    with pytest.raises(ValueError,
                       match=r"impl=.*expected one of \('auto', 'xla', 'pallas', 'mosaic'\)"):
      dispatch.resolve_impl(bad)
  # a kernel without a Mosaic version refuses "mosaic", and so does the whole-model name
  monkeypatch.setattr(dispatch, "_mosaic_kernels", {"sparse_decode", "sparse_prefill"})
  with pytest.raises(ValueError, match="impl='mosaic'.*for dense_decode"):
    dispatch.resolve_impl("mosaic", kernel="dense_decode")
  with pytest.raises(ValueError, match=r"impl='mosaic': expected one of \('auto', 'xla', 'pallas'\)"):
    dispatch.resolve_impl("mosaic")
  with pytest.raises(ValueError, match="kernel='decode'"):
    dispatch.resolve_impl("auto", kernel="decode")

  class FakeGPU:
    def __init__(self, cc):
      self.compute_capability = cc
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert dispatch.resolve_impl("auto", kernel="sparse_decode") == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  every = set(dispatch.KERNELS)
  for cc, kernels, kernel, want in [
      ("9.0", {"sparse_decode"}, "sparse_decode", "mosaic"),
      ("10.0", {"sparse_decode"}, "sparse_decode", "mosaic"),
      ("9.0", {"sparse_decode"}, "dense_decode", "pallas"),
      ("9.0", {"sparse_decode"}, None, "pallas"),     # not every kernel has one
      ("9.0", every, None, "mosaic"), ("8.0", every, None, "pallas"),
      ("8.0", every, "sparse_decode", "pallas"), (None, every, "sparse_decode", "pallas"),
      ("9.0", set(), "sparse_decode", "pallas")]:
    monkeypatch.setattr(jax, "devices", lambda cc=cc: [FakeGPU(cc)])
    monkeypatch.setattr(dispatch, "_mosaic_kernels", kernels)
    assert dispatch.resolve_impl("auto", kernel=kernel) == want, (cc, kernels, kernel)
  monkeypatch.setattr(dispatch, "_mosaic_kernels", every)
  assert dispatch.resolve_impl("mosaic") == "mosaic"   # accepted once every kernel has one
  # generate() resolves first: a bad impl fails before the model is even looked at
  with pytest.raises(ValueError, match="impl='triton'"):
    generate(types.SimpleNamespace(cfg=None), [[1]], impl="triton")


def test_a_models_mosaic_falls_back_to_triton_where_a_kernel_does_not_cover_the_call():
  from pallas_kernels import mosaic_dense_decode, mosaic_sparse_decode, mosaic_sparse_prefill
  from pallas_kernels.fp8_cache import KCache
  q_BTNH = jnp.zeros((1, 1, 2, 576), jnp.bfloat16)
  cover = {fmt: KCache.empty(2, 64, fmt, head_dim=576) for fmt in ("v32", "bf16")}
  sparse = lambda c: mosaic_sparse_decode.supports(  # noqa: E731
      {"cache": c, "extra_cache": None, "q": q_BTNH}, 512)
  dense = lambda c: mosaic_dense_decode.supports({"cache": c, "q": q_BTNH}, 512)  # noqa: E731
  assert sparse(cover["v32"]) and not sparse(cover["bf16"])  # sparse decode reads FP8 only
  assert dense(cover["v32"]) and dense(cover["bf16"])
  assert not dense(KCache.empty(2, 61, "bf16", head_dim=576))  # bf16 pages: multiples of 8
  prefill = lambda d, dv: mosaic_sparse_prefill.supports(  # noqa: E731
      {"q": jnp.zeros((4, 2, d), jnp.bfloat16), "kv": jnp.zeros((8, 1, d), jnp.bfloat16)}, dv)
  assert prefill(576, 512) and prefill(512, 512) and not prefill(128, 64)
  for covered, want in ((True, "mosaic"), (False, "pallas")):
    assert dispatch.model_kernel_impl("mosaic", lambda c=covered: c) == want
  assert dispatch.model_kernel_impl("xla", lambda: False) == "xla"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_format", ["model1", "bf16"])
def test_mosaic_generation_matches_xla_on_gpu(cache_format):
  # the whole V4 model through the Mosaic GPU kernels (sparse prefill, sparse decode over the
  # FP8 cache; a bf16 cache's sparse decode falls back to Triton). On CPU in interpret mode
  # the same run (4 new tokens, FP8 cache) gave identical tokens and a max |logit diff| of
  # 1.8% of max|logits|, so the bound is the V4 pallas bound with 2x headroom.
  model = Transformer(_v4(), nnx.Rngs(0))
  ref, ker = (generate(model, V4_PROMPTS, SamplingConfig(max_new_tokens=STEPS), block_size=64,
                       cache_format=cache_format, impl=impl, return_logits=True)
              for impl in ("xla", "mosaic"))
  assert ker.impl == "mosaic"
  assert _max_error(ref, ker) <= 2 * _bound("v4", ref)
