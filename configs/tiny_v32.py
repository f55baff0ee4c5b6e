"""tiny preset, v32 geometry (576-dim MLA heads: 512 latent + 64 RoPE).

Run: python train.py --config=configs/tiny_v32.py
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("tiny", "v32"), "tiny_v32")
  return c
