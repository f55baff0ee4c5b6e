"""tiny MODEL1 four layers deep: the V4 layer pattern with a window-only first layer,
compress ratios (0, 4, 16, 4) (0 = window only, 4 = CSA with an indexer choosing top-16
entries, 16 = HCA), window 32, plus the preset's V4 block (mHC 4, MoE with a hash layer,
MTP 1). ``configs/tiny.py`` is the same model at two layers, ratios (4, 16).

Run: python train.py --config=configs/tiny_v4.py
"""
import dataclasses

from model1 import config


def get_config():
  base = config.preset("tiny", "model1")
  attn = dataclasses.replace(base.attention, compress_ratios=(0, 4, 16, 4))
  model = dataclasses.replace(base, n_layers=4, attention=attn).validate()
  c = config.run_config(model, "tiny_v4")
  c.data.seq_len = 128
  c.train.steps = 200
  return c
