"""small preset, model1 geometry (512-dim heads: 448 NoPE + 64 RoPE, VVPA, sink).

Run: python train.py --config=configs/small.py  # one GPU
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("small", "model1"), "small")
  c.data.seq_len, c.data.batch_size = 1024, 32
  c.train.update(steps=20000, lr=1e-3, warmup_steps=500, log_every=50, eval_every=1000,
                 ckpt_every=1000)
  return c
