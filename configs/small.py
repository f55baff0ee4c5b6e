"""small preset, the full MODEL1 (DeepSeek-V4) model at ~100M parameters: 512-dim heads,
window 128 + compress ratios (0, 4, 128, 4, 128, 4, 128, 4) (CSA top-128, HCA), mHC 4,
MoE 16 experts with a hash-routed layer, MTP 1.

Run: python train.py --config=configs/small.py  # one GPU
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("small", "model1"), "small")
  c.data.seq_len, c.data.batch_size = 1024, 32
  c.train.update(steps=20000, lr=1e-3, warmup_steps=500, log_every=50, eval_every=1000,
                 ckpt_every=1000)
  return c
