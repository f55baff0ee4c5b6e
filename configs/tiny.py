"""tiny preset, model1 geometry (512-dim heads: 448 NoPE + 64 RoPE, VVPA, sink).

Run: python train.py --config=configs/tiny.py
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("tiny", "model1"), "tiny")
  c.data.seq_len = 128  # keeps `python train.py` to a few minutes on 2 CPU cores
  c.train.steps = 200
  return c
