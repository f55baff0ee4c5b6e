"""DeepSeek checkpoint import/export (model1.convert) on synthetic checkpoints.

The checkpoints are written here from DeepSeek's own module layout (names, [out, in]
shapes, FP8 e4m3 + block-128 scales, packed FP4 experts + 1x32 e8m0 scales, several
shards with an index), independently of model1.hub's name table, at tiny dims chosen so
blocks are partial (dim 160 = 128 + 32)."""
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stn
from flax import nnx

from model1 import convert, evals, hub

D, V, F, E, X = 160, 96, 32, 4, 2

V4_CONFIG = {
    "vocab_size": V, "dim": D, "moe_inter_dim": F, "n_layers": 3, "n_hash_layers": 1,
    "n_mtp_layers": 1, "n_heads": 2, "n_routed_experts": E, "n_shared_experts": 1,
    "n_activated_experts": X, "score_func": "sqrtsoftplus", "route_scale": 1.5,
    "swiglu_limit": 10.0, "q_lora_rank": 48, "head_dim": 48, "rope_head_dim": 16,
    "o_groups": 2, "o_lora_rank": 24, "window_size": 8, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 2, "index_head_dim": 32, "index_topk": 4, "hc_mult": 2,
    "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
    "compress_rope_theta": 160000, "compress_ratios": [0, 4, 8, 4]}

V32_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
    "vocab_size": V, "hidden_size": D, "intermediate_size": 64, "moe_intermediate_size": F,
    "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": E,
    "n_shared_experts": 1, "num_experts_per_tok": X, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16, "v_head_dim": 16, "index_n_heads": 2, "index_head_dim": 32,
    "index_topk": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000, "hidden_act": "silu",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


# ------------------------------------------------------------- synthetic checkpoints

def _fp8(rng, out, inp, f32_scales=False):
  """Random FP8 codes (never NaN) and power-of-two block scales."""
  q = np.clip(rng.randn(out, inp) * 40, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  e = rng.randint(120, 124, size=(-(-out // 128), -(-inp // 128))).astype(np.uint8)
  if f32_scales:
    return q, np.ldexp(1.0, e.astype(np.int32) - 127).astype(np.float32)
  return q, e.view(ml_dtypes.float8_e8m0fnu)


def _fp4(rng, out, inp):
  packed = rng.randint(0, 256, size=(out, inp // 2)).astype(np.uint8).view(np.int8)
  e = rng.randint(122, 128, size=(out, -(-inp // 32))).astype(np.uint8)
  return packed, e.view(ml_dtypes.float8_e8m0fnu)


def _bf16(rng, *shape, scale=0.05):
  return (rng.randn(*shape) * scale + (1.0 if len(shape) == 1 else 0.0)).astype(ml_dtypes.bfloat16)


def _v4_layer(rng, p, ratio, hash_layer, C=2, N=2, H=48, Q=48, G=2, R=24, I=2, J=32):
  t = {}
  def lin(name, out, inp):
    t[p + name + ".weight"], t[p + name + ".scale"] = _fp8(rng, out, inp)
  for site in ("attn", "ffn"):
    t[f"{p}hc_{site}_fn"] = (rng.randn((2 + C) * C, C * D) * 0.01).astype(np.float32)
    t[f"{p}hc_{site}_base"] = (rng.randn((2 + C) * C) * 0.1).astype(np.float32)
    t[f"{p}hc_{site}_scale"] = (rng.rand(3) * 0.1).astype(np.float32)
  t[p + "attn_norm.weight"], t[p + "ffn_norm.weight"] = _bf16(rng, D), _bf16(rng, D)
  lin("attn.wq_a", Q, D)
  t[p + "attn.q_norm.weight"] = _bf16(rng, Q)
  lin("attn.wq_b", N * H, Q)
  lin("attn.wkv", H, D)
  t[p + "attn.kv_norm.weight"] = _bf16(rng, H)
  lin("attn.wo_a", G * R, N * H // G)
  lin("attn.wo_b", D, G * R)
  t[p + "attn.attn_sink"] = rng.randn(N).astype(np.float32)
  def compressor(q, width):
    coff = 2 if ratio == 4 else 1
    t[q + "wkv.weight"] = _bf16(rng, coff * width, D)
    t[q + "wgate.weight"] = _bf16(rng, coff * width, D)
    t[q + "ape"] = (rng.randn(ratio, coff * width) * 0.1).astype(np.float32)
    t[q + "norm.weight"] = _bf16(rng, width)
  if ratio:
    compressor(p + "attn.compressor.", H)
  if ratio == 4:
    lin("attn.indexer.wq_b", I * J, Q)
    t[p + "attn.indexer.weights_proj.weight"] = _bf16(rng, I, D)
    compressor(p + "attn.indexer.compressor.", J)
  t[p + "ffn.gate.weight"] = _bf16(rng, E, D)
  if hash_layer:
    t[p + "ffn.gate.tid2eid"] = np.stack([rng.permutation(E)[:X] for _ in range(V)]).astype(np.int32)
  else:
    t[p + "ffn.gate.bias"] = (rng.randn(E) * 0.1).astype(np.float32)
  for e in range(E):
    for w, (o, i) in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
      t[f"{p}ffn.experts.{e}.{w}.weight"], t[f"{p}ffn.experts.{e}.{w}.scale"] = _fp4(rng, o, i)
  for w, (o, i) in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
    lin(f"ffn.shared_experts.{w}", o, i)
  return t


def write_v4(root: Path, seed=0) -> dict:
  rng = np.random.RandomState(seed)
  shards = {"top": {"embed.weight": _bf16(rng, V, D, scale=1.0), "head.weight": _bf16(rng, V, D),
                    "norm.weight": _bf16(rng, D),
                    "hc_head_fn": (rng.randn(2, 2 * D) * 0.01).astype(np.float32),
                    "hc_head_base": (rng.randn(2) * 0.1).astype(np.float32),
                    "hc_head_scale": np.array([0.05], np.float32)}}
  for i, r in enumerate(V4_CONFIG["compress_ratios"][:3]):
    shards[f"layer{i}"] = _v4_layer(rng, f"layers.{i}.", r, i < 1)
  m = _v4_layer(rng, "mtp.0.", 4, False)
  m.update({"mtp.0.enorm.weight": _bf16(rng, D), "mtp.0.hnorm.weight": _bf16(rng, D),
            "mtp.0.norm.weight": _bf16(rng, D),
            "mtp.0.hc_head_fn": (rng.randn(2, 2 * D) * 0.01).astype(np.float32),
            "mtp.0.hc_head_base": (rng.randn(2) * 0.1).astype(np.float32),
            "mtp.0.hc_head_scale": np.array([0.05], np.float32)})
  for w in ("e_proj", "h_proj"):
    m[f"mtp.0.{w}.weight"], m[f"mtp.0.{w}.scale"] = _fp8(rng, D, D)
  shards["mtp"] = m
  return _write(root, V4_CONFIG, shards)


def write_v32(root: Path, seed=1) -> dict:
  rng = np.random.RandomState(seed)
  N, Q, L, P, R, Vh, I, J = 2, 48, 32, 16, 16, 16, 2, 32
  shards = {"top": {"model.embed_tokens.weight": _bf16(rng, V, D, scale=1.0),
                    "lm_head.weight": _bf16(rng, V, D), "model.norm.weight": _bf16(rng, D)}}
  for i in range(4):                                  # layer 3 is the MTP layer (ignored)
    p, t = f"model.layers.{i}.", {}
    def lin(name, out, inp):
      t[p + name + ".weight"], t[p + name + ".weight_scale_inv"] = _fp8(rng, out, inp, True)
    t[p + "input_layernorm.weight"] = _bf16(rng, D)
    t[p + "post_attention_layernorm.weight"] = _bf16(rng, D)
    lin("self_attn.q_a_proj", Q, D)
    t[p + "self_attn.q_a_layernorm.weight"] = _bf16(rng, Q)
    lin("self_attn.q_b_proj", N * (P + R), Q)
    lin("self_attn.kv_a_proj_with_mqa", L + R, D)
    t[p + "self_attn.kv_a_layernorm.weight"] = _bf16(rng, L)
    lin("self_attn.kv_b_proj", N * (P + Vh), L)
    lin("self_attn.o_proj", D, N * Vh)
    lin("self_attn.indexer.wq_b", I * J, Q)
    lin("self_attn.indexer.wk", J, D)
    t[p + "self_attn.indexer.k_norm.weight"] = _bf16(rng, J)
    t[p + "self_attn.indexer.k_norm.bias"] = _bf16(rng, J) - 1
    t[p + "self_attn.indexer.weights_proj.weight"] = _bf16(rng, I, D)
    if i == 0:
      for w, (o, n) in (("gate_proj", (64, D)), ("up_proj", (64, D)), ("down_proj", (D, 64))):
        lin(f"mlp.{w}", o, n)
    else:
      t[p + "mlp.gate.weight"] = _bf16(rng, E, D)
      t[p + "mlp.gate.e_score_correction_bias"] = (rng.randn(E) * 0.1).astype(np.float32)
      for e in range(E):
        for w, (o, n) in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
          lin(f"mlp.experts.{e}.{w}", o, n)
      for w, (o, n) in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
        lin(f"mlp.shared_experts.{w}", o, n)
    if i == 3:
      t[p + "eh_proj.weight"] = _bf16(rng, D, 2 * D)
    shards[f"layer{i}"] = t
  return _write(root, V32_CONFIG, shards)


def _write(root: Path, config: dict, shards: dict) -> dict:
  root.mkdir(parents=True)
  weight_map, files = {}, {}
  for k, (name, tensors) in enumerate(shards.items()):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    stn.save_file(tensors, str(root / fname))
    weight_map.update({t: fname for t in tensors})
    files[name] = fname
  (root / hub.INDEX).write_text(json.dumps({"weight_map": weight_map}))
  (root / "config.json").write_text(json.dumps(config))
  return files


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ds")
  v4_files = write_v4(root / "v4")
  write_v32(root / "v32")
  run = root / "run_v4"
  res = convert.import_checkpoint(root / "v4", run, dtype="float32")
  return {"root": root, "v4_files": v4_files, "run_v4": run, "import": res}


def _params(run):
  model, _, _ = evals.load_trained(run)
  return model, jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())


def _assert_same(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(p)


# ------------------------------------------------------------- tests

def test_v4_import_values_run_and_roundtrip(ckpts):
  root, run = ckpts["root"], ckpts["run_v4"]
  model, p = _params(run)
  # spot checks against the stored tensors, dequantised here independently
  with hub.numpy_low_precision_names():
    from safetensors import safe_open
    with safe_open(str(root / "v4" / ckpts["v4_files"]["layer1"]), framework="numpy") as f:
      q, s = f.get_tensor("layers.1.attn.wq_a.weight"), f.get_tensor("layers.1.attn.wq_a.scale")
      packed = f.get_tensor("layers.1.ffn.experts.2.w2.weight")
      s4 = f.get_tensor("layers.1.ffn.experts.2.w2.scale")
  sc = np.ldexp(1.0, s.view(np.uint8).astype(np.int32) - 127)
  want = q.astype(np.float32) * np.kron(sc, np.ones((128, 128)))[:q.shape[0], :q.shape[1]]
  np.testing.assert_array_equal(p["layers"][1]["attn"]["wq_a"]["weight"], want.T)
  table = [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6]
  b = packed.view(np.uint8)
  codes = np.stack([b & 15, b >> 4], -1).reshape(b.shape[0], -1)
  sc4 = np.ldexp(1.0, s4.view(np.uint8).astype(np.int32) - 127)
  want4 = np.asarray(table, np.float64)[codes] * np.repeat(sc4, 32, axis=1)[:, :codes.shape[1]]
  np.testing.assert_array_equal(p["layers"][1]["ffn"]["experts"]["w2"][2], want4.T)
  # runs (window, CSA and HCA layers), every component finite
  acts = dict(convert.check(run, list(range(1, 13))))
  assert acts["logits"].shape == (1, 12, V) and acts["layers.2.ffn"].shape == (1, 12, D)
  assert all(np.all(np.isfinite(x)) for x in acts.values())
  # export in DeepSeek's formats and in bf16, re-import: bit-identical parameters
  for fmt in ("fp8", "bf16"):
    out = root / f"v4_export_{fmt}"
    convert.export_checkpoint(run, out, fmt)
    run2 = root / f"run_v4_again_{fmt}"
    convert.import_checkpoint(out, run2, dtype="float32")
    _assert_same(p, _params(run2)[1])


def test_v4_slice_reads_only_its_shards(ckpts, capsys):
  root, files = ckpts["root"], ckpts["v4_files"]
  res = convert.import_checkpoint(root / "v4", root / "run_slice", layers=(0, 1), dtype="float32")
  assert set(res["shards_opened"]) == {files["top"], files["layer0"], files["layer1"]}
  total = sum((root / "v4" / f).stat().st_size for f in files.values())
  assert res["bytes_read"] < total * 0.7   # 3 of 5 shards (layer 2 and MTP never read)
  full = _params(ckpts["run_v4"])[1]
  model, sl = _params(root / "run_slice")
  assert model.cfg.n_layers == 2 and model.cfg.mtp.n_layers == 0
  _assert_same(sl["layers"], {k: full["layers"][k] for k in (0, 1)})
  # parity printout of one layer fed with given hidden states
  h = np.random.RandomState(0).randn(3, D).astype(np.float32)
  np.save(root / "h.npy", h)
  assert convert.main(["--check", f"--from={root / 'run_slice'}", "--tokens=1,2,3",
                       "--layers=1-1", f"--inputs={root / 'h.npy'}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [ln.split()[0] for ln in lines] == [
      "layers.1.in", "layers.1.attn_norm", "layers.1.attn", "layers.1.ffn_norm",
      "layers.1.ffn", "layers.1.out", "norm", "logits"]
  assert "(1, 3, 96)" in lines[-1] and "nan" not in " ".join(lines)


def test_v32_hf_names_roundtrip(ckpts):
  root = ckpts["root"]
  res = convert.import_checkpoint(root / "v32", root / "run_v32", dtype="float32")
  model, p = _params(root / "run_v32")
  assert model.cfg.attention.geometry == "v32" and model.cfg.n_dense_layers == 1
  assert res["params"] > 0
  assert all(np.all(np.isfinite(x)) for _, x in convert.check(root / "run_v32", [5, 6, 7, 8]))
  out = root / "v32_export"
  convert.export_checkpoint(root / "run_v32", out, "fp8")
  keys = json.loads((out / hub.INDEX).read_text())["weight_map"]
  assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in keys
  convert.import_checkpoint(out, root / "run_v32_again", dtype="float32")
  _assert_same(p, _params(root / "run_v32_again")[1])


def _broken_copy(root: Path, name: str) -> Path:
  dst = root / name
  shutil.copytree(root / "v4", dst)
  return dst


@pytest.mark.parametrize("case", ["missing_shard", "unknown_tensor", "shape", "config"])
def test_bad_input_one_line_error_nothing_written(ckpts, case, capsys):
  root, files = ckpts["root"], ckpts["v4_files"]
  src = _broken_copy(root, f"bad_{case}")
  expect = {"missing_shard": files["layer1"], "unknown_tensor": "layers.0.attn.wq_c.weight",
            "shape": "layers.0.attn.wkv.weight", "config": "moe_group_size"}[case]
  if case == "missing_shard":
    (src / files["layer1"]).unlink()
  elif case in ("unknown_tensor", "shape"):
    f = src / files["layer0"]
    with hub.numpy_low_precision_names():
      t = stn.load_file(str(f))
    if case == "unknown_tensor":
      t["layers.0.attn.wq_c.weight"] = np.zeros((2, 2), ml_dtypes.bfloat16)
      idx = json.loads((src / hub.INDEX).read_text())
      idx["weight_map"]["layers.0.attn.wq_c.weight"] = files["layer0"]
      (src / hub.INDEX).write_text(json.dumps(idx))
    else:
      t["layers.0.attn.wkv.weight"] = t["layers.0.attn.wkv.weight"][:-1]
    stn.save_file(t, str(f))
  else:
    cfg = dict(V4_CONFIG, moe_group_size=8, n_expert_groups=2)
    (src / "config.json").write_text(json.dumps(cfg))
  dst = root / f"out_{case}"
  rc = convert.main([f"--from={src}", f"--to={dst}", "--layers=0-1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
  if case == "config":
    assert "n_expert_groups=2" in err[0]       # every unsupported field is named
  assert not dst.exists() and not list(root.glob(f".out_{case}.tmp-*"))
