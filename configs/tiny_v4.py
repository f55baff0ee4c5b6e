"""tiny MODEL1 with V4's layer pattern scaled down: sliding window 32, compress ratios
(0, 4, 16, 4) (0 = window only, 4 = CSA with an indexer choosing top-16 entries, larger =
HCA), plus the V4 block of the preset (mHC 4, MoE with a hash layer, MTP 1).

Run: python train.py --config=configs/tiny_v4.py
"""
import dataclasses

from model1 import config


def get_config():
  base = config.preset("tiny", "model1")
  attn = dataclasses.replace(base.attention, sparse="compressed", window_size=32,
                             compress_ratios=(0, 4, 16, 4), index_n_heads=4, index_head_dim=64,
                             index_topk=16)
  model = dataclasses.replace(base, n_layers=4, attention=attn).validate()
  c = config.run_config(model, "tiny_v4")
  c.data.seq_len = 128
  c.train.steps = 200
  return c
