"""The long-context cost model (``model1.cost``) against the code it describes: the cache
bytes it predicts are the bytes ``PagedKVCache`` allocates, per layer and part, and the
keys it says a new token attends to are the valid indices the decode paths hand to the
attention kernels during a real ``generate`` (prefill + decode) of tiny models."""
import dataclasses
import importlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from model1 import config, cost, generate, kv_cache
from model1.model import Transformer

pytestmark = pytest.mark.xdist_group("cost")  # one worker builds the module fixtures once


def _plain(cfg, **kw):
  # plain blocks (no MoE/mHC/MTP): the caches and attention paths are what is under test
  return dataclasses.replace(cfg, vocab_size=97, use_moe=False, mhc=config.MHCConfig(1),
                             mtp=config.MTPConfig(0), ffn=config.FFNConfig(128), **kw).validate()


def _v4():
  """Every V4 layer kind: window-only, CSA (top-16 of ratio-4 entries), HCA (ratio 16)."""
  cfg = config.preset("tiny", "model1")
  a = dataclasses.replace(cfg.attention, n_heads=2, compress_ratios=(0, 4, 16))
  return _plain(cfg, n_layers=3, attention=a)


def _dsa():
  cfg = config.preset("tiny", "v32", sparse="dsa")  # top-32 tokens
  return _plain(cfg, n_layers=1, attention=dataclasses.replace(cfg.attention, n_heads=2))


def _dense():
  cfg = config.preset("tiny", "v32", sparse="dense")
  return _plain(cfg, n_layers=1, attention=dataclasses.replace(cfg.attention, n_heads=2))


CONFIGS = {"v4": _v4, "dsa": _dsa, "dense": _dense}
# prompt lengths: windows (32) that wrap and not, top-k (V4 16 entries, DSA 32 tokens)
# saturated and not, entries emitted during decode (positions 71 and 47: (p+1) % 4 == 0,
# and 47: (p+1) % 16 == 0)
PROMPTS = {"v4": (70, 45, 9), "dsa": (40, 20), "dense": (30, 12)}
NEW = 4                                              # 3 decode steps after the prefill


def _nbytes(*arrays):  # arrays or ShapeDtypeStructs
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(arrays))


def _parts(layer) -> dict:
  """Bytes a layer cache holds, by the cost model's part names."""
  if isinstance(layer, pk.KCache):
    return {"kv": _nbytes(layer.nope, layer.rope, layer.scales)}
  if isinstance(layer, kv_cache.DSALayerCache):
    return {"kv": _nbytes(layer.kv.nope, layer.kv.rope, layer.kv.scales),
            "indexer_keys": _nbytes(layer.index_k)}
  w = layer.window
  out = {"window": _nbytes(w.nope, w.rope, w.scales)}
  if layer.ratio:
    out["entries"] = _nbytes(layer.comp.nope, layer.comp.rope, layer.comp.scales)
    out["state"] = _nbytes(layer.state, layer.istate)
    if layer.icomp is not None:
      out["indexer_keys"] = _nbytes(layer.icomp)
  return out


def _expected(cfg, L, fmt, batch):
  storage = dataclasses.replace(cost.PROJECT, kv="bf16" if fmt == "bf16" else "fp8")
  kv = cost.kv_cache_bytes(cfg, L, storage)
  return [{k: batch * v for k, v in parts.items()} for _, _, parts in kv.per_layer], kv.total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cache_bytes_equal_allocations(name):
  """Shapes only (``jax.eval_shape``: no memory, no compilation): every layer part,
  both formats, several lengths."""
  cfg = CONFIGS[name]()
  for fmt in ("fp8", "bf16"):
    for L in (1, 31, 64, 65, 200):
      fmt_k = kv_cache.kcache_format(fmt, cfg.attention.geometry)
      layers = jax.eval_shape(lambda: kv_cache.PagedKVCache.for_model(cfg, 2, L, fmt_k).layers)
      want, total = _expected(cfg, L, fmt, 2)
      assert [_parts(x) for x in layers] == want, (name, fmt, L)
      assert sum(sum(p.values()) for p in want) == 2 * total


def test_storage_formats_match_flashmla_and_released_models():
  v4, v32 = _v4(), _dsa()
  # FlashMLA's bytes per token (pallas_kernels, written from FlashMLA's quant.py)
  assert cost.kv_vector_bytes(v4) == pk.bytes_per_token("model1")
  assert cost.kv_vector_bytes(v32) == pk.bytes_per_token("v32")
  assert cost.kv_vector_bytes(v4, cost.PROJECT) == pk.bytes_per_token("model1") - 1  # no pad
  full = dataclasses.replace(v32.attention, index_head_dim=128)
  assert cost.indexer_key_bytes(dataclasses.replace(v32, attention=full)) == 128 + 4
  full = dataclasses.replace(v4.attention, index_head_dim=128)
  assert cost.indexer_key_bytes(dataclasses.replace(v4, attention=full)) == 64 + 4
  with pytest.raises(ValueError, match="L=0"):
    cost.kv_cache_bytes(v4, 0)
  with pytest.raises(ValueError, match="Storage.indexer='fp16'"):
    cost.Storage(indexer="fp16")


@pytest.fixture(scope="module", params=["dsa", "v4"])  # dense: L keys, shapes checked above
def run(request):
  """One real generate (prefill + 3 decode steps, FP8 caches) per model, recording the
  valid indices the decode paths pass to sparse_decode / the lengths to dense_decode."""
  # the modules (the package re-exports functions of the same names)
  sd = importlib.import_module("pallas_kernels.sparse_decode")
  dd = importlib.import_module("pallas_kernels.dense_decode")
  name = request.param
  cfg = CONFIGS[name]()
  model = Transformer(cfg, nnx.Rngs(0))
  records = []

  def rec(mx, main_B, extra_B):
    records.append((mx, np.asarray(main_B), np.asarray(extra_B)))

  def sparse(q, k_cache, indices, **kw):
    ek, ei = kw.get("extra_k_cache"), kw.get("extra_indices_in_kvcache")
    main = jnp.sum(indices[:, 0] >= 0, axis=-1)
    extra = jnp.zeros_like(main) if ei is None else jnp.sum(ei[:, 0] >= 0, axis=-1)
    jax.debug.callback(partial(rec, -1 if ek is None else ek.block_size), main, extra)
    return orig_sparse(q, k_cache, indices, **kw)

  def dense(q, k_cache, block_table, cache_seqlens, **kw):
    jax.debug.callback(partial(rec, -2), cache_seqlens, jnp.zeros_like(cache_seqlens))
    return orig_dense(q, k_cache, block_table, cache_seqlens, **kw)

  orig_sparse, orig_dense = sd.sparse_decode, dd.dense_decode
  mp = pytest.MonkeyPatch()
  mp.setattr(sd, "sparse_decode", sparse)
  mp.setattr(dd, "dense_decode", dense)
  try:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in PROMPTS[name]]
    gen = generate.generate(model, prompts, generate.SamplingConfig(max_new_tokens=NEW),
                            cache_format="fp8")
    jax.effects_barrier()
  finally:
    mp.undo()
  return name, cfg, gen, records


def test_generate_cache_bytes_match_cost_model(run):
  name, cfg, gen, _ = run
  want, _ = _expected(cfg, max(PROMPTS[name]) + NEW, "fp8", len(PROMPTS[name]))
  assert [_parts(x) for x in gen.cache.layers] == want


def test_attended_keys_match_decode_indices(run):
  name, cfg, _, records = run
  lens = np.asarray(PROMPTS[name])
  L_total = int(lens.max()) + NEW
  steps = NEW - 1
  # each decode step calls the attention kernel once per layer (fails if jit reused a
  # trace made without the recorder)
  assert len(records) == steps * cfg.n_layers, len(records)
  by_layer = {}
  for i, kind, r in cost.layer_kinds(cfg):
    key = -2 if kind == "dense" else (-1 if r == 0 else -(-L_total // r))
    by_layer[key] = i
  assert len(by_layer) == cfg.n_layers  # the layers are told apart by their extra cache
  for n, (mx, main_B, extra_B) in enumerate(records):
    s = n // cfg.n_layers                           # decode step: position lens + s
    att = [cost.attended(cfg, int(L), by_layer[mx]) for L in lens + s + 1]
    np.testing.assert_array_equal(
        main_B, [a.get("tokens", 0) + a.get("window", 0) for a in att], err_msg=name)
    np.testing.assert_array_equal(extra_B, [a.get("compressed", 0) for a in att],
                                  err_msg=name)


FULL = ("v32_671b", "v4_flash", "v4_pro")


def _full(name):
  from conftest import ROOT, load_config
  return config.model_config_from_dict(load_config(ROOT / "configs" / f"{name}.py").model)


@pytest.mark.parametrize("name", FULL)
def test_matmul_flops_are_twice_the_activated_parameters(name):
  """Two independent counts agree: the FLOP formulas' weight matmuls (everything but the
  attention core and the indexer's scoring) at L = 1 are 2 x the parameters a token
  activates (config.param_count, which tests check against the model's shapes)."""
  cfg = _full(name)
  f = cost.decode_flops(cfg, 1)
  mm = sum(v for k, v in f.items() if k not in ("attn_core", "indexer_scores", "mhc"))
  act = cost.param_counts(cfg)["activated_no_embed"]
  # the rest are norm weights, ape, sinks and mHC's fn (whose FLOPs are the "mhc" term)
  assert abs(mm / (2 * act) - 1) < 0.005, (mm, 2 * act)


def test_benchmark_writes_table_json_and_plot(tmp_path, capsys):
  import importlib.util as iu

  from conftest import ROOT
  spec = iu.spec_from_file_location("lcc", ROOT / "benchmarks" / "long_context_cost.py")
  mod = iu.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main(["--out", str(tmp_path), "--lengths", "4096,1048576"]) == 0
  import json
  res = json.loads((tmp_path / "results.json").read_text())
  rows = {(r["model"], r["L"]): r for r in res["rows"]}
  for name in FULL:  # the table is the cost model's, ratios to V3.2 at the same L
    s = cost.summary(_full(name), 1048576)
    assert rows[(name, 1048576)]["kv_gib"] == s["kv_gib"]
    assert rows[(name, 1048576)]["gflops_fp8eq"] == s["gflops_fp8eq"]
  assert rows[("v32_671b", 4096)]["kv_vs_v32"] == 1.0
  assert (tmp_path / "plot.png").stat().st_size > 10_000
  assert "| 1M | DeepSeek-V4-Pro |" in (tmp_path / "results.md").read_text()
  assert mod.main(["--out", "", "--lengths", "0"]) == 1
  assert "error: --lengths='0'" in capsys.readouterr().err
