"""tiny preset, v32 geometry (576-dim MLA heads: 512 latent + 64 RoPE).

Run: python train.py --config=configs/tiny_v32.py
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("tiny", "v32"), "tiny_v32")
  c.data.seq_len = 128
  c.train.steps = 200
  return c
