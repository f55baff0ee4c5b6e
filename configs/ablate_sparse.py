"""Dense attention vs V3.2 DSA (lightning indexer, top-k tokens) vs V4 compressed
attention (sliding window + CSA/HCA entries), MODEL1 heads in a plain block.

--tiny/--smoke clamp window and top-k to a quarter of the sequence (ablate.fit_size) so
sparsity actually drops keys. A mode that fails to build or train is reported in the
table, not raised.

Run: python -m model1.ablate --suite=sparse --tiny
"""
from model1 import ablate

A = "model.attention."


def get_config(preset="tiny"):
  c = ablate.suite_config("sparse", preset)
  c.base.data.synthetic_ratio = 0.25
  c.variants = [
      ("dense", {}),
      ("dsa", {A + "sparse": "dsa", A + "index_topk": 64}),
      ("compressed", {A + "sparse": "compressed", A + "window_size": 64,
                      A + "compress_ratios": (4, 64), A + "index_topk": 16}),
  ]
  return c
