"""tiny preset, the full MODEL1 (DeepSeek-V4) model scaled down: 512-dim heads (448 NoPE +
64 RoPE, VVPA, sink), sliding window 32 + compressed attention (layer 0 CSA ratio 4 with a
top-16 indexer, layer 1 HCA ratio 16), mHC 4 streams, MoE with a hash-routed layer, MTP 1.

Run: python train.py --config=configs/tiny.py
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("tiny", "model1"), "tiny")
  c.data.seq_len = 128  # keeps `python train.py` to a few minutes on 2 CPU cores
  c.train.steps = 200
  return c
