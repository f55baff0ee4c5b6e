"""small MODEL1 with V4's layer pattern scaled down: sliding window 128, compress ratios
(0, 4, 128, 4, 128, 4, 128, 4) (0 = window only, 4 = CSA with an indexer choosing top-64 entries, larger =
HCA), plus the V4 block of the preset (mHC 4, MoE with a hash layer, MTP 1).

Run: python train.py --config=configs/small_v4.py
"""
import dataclasses

from model1 import config


def get_config():
  base = config.preset("small", "model1")
  attn = dataclasses.replace(base.attention, sparse="compressed", window_size=128,
                             compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4), index_n_heads=4, index_head_dim=64,
                             index_topk=64)
  model = dataclasses.replace(base, n_layers=8, attention=attn).validate()
  c = config.run_config(model, "small_v4")
  c.data.seq_len, c.data.batch_size = 1024, 32
  c.train.update(steps=20000, lr=1e-3, warmup_steps=500, log_every=50, eval_every=1000,
                 ckpt_every=1000)
  return c
