"""bf16 vs FlashMLA FP8 KV cache at decode, for both head geometries: one trained model per
geometry (the variants differ only in ``eval.*``, so each model trains once), decoded
with each format. Reports bytes/token (V32 656, MODEL1 584 per layer in FP8), greedy
top-1 agreement and KL against the bf16 cache, and decode tokens/s.

Run: python -m model1.ablate --suite=kv_cache --tiny
"""
from model1 import ablate


def get_config(preset="tiny"):
  c = ablate.suite_config("kv_cache", preset)
  c.eval.compare_to = "bf16"
  v32 = {"model.attention.geometry": "v32"}
  c.variants = [
      ("model1_bf16", {"eval.cache_format": "bf16"}),
      ("model1_fp8", {"eval.cache_format": "fp8"}),
      ("v32_bf16", dict(v32, **{"eval.cache_format": "bf16"})),
      ("v32_fp8", dict(v32, **{"eval.cache_format": "fp8"})),
  ]
  return c
