"""576-dim (V3.2) vs 512-dim (MODEL1) attention heads — the project's central ablation.

Same plain block (dense FFN, one residual stream, no MTP), data, seeds and steps; only the
attention geometry changes: at equal width/depth, and with the V3.2 model resized
(d_model, then n_layers) to MODEL1's parameter count. A quarter of the training rows are
passkey/MQAR examples, so retrieval accuracy is measurable (docs/design.md §1).

Run: python -m model1.ablate --suite=heads --tiny          # CPU, minutes
     python -m model1.ablate --suite=heads --seeds=0,1,2   # tiny preset, seq 256, 2000 steps
"""
from model1 import ablate


def get_config(preset="tiny"):
  c = ablate.suite_config("heads", preset)
  c.base.data.synthetic_ratio = 0.25
  c.variants = [
      ("model1_512", {}),
      ("v32_576", {"model.attention.geometry": "v32"}),
      ("v32_576_matched", {"model.attention.geometry": "v32", "match_params": "model1_512"}),
  ]
  return c
