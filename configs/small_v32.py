"""small preset, v32 geometry (576-dim MLA heads: 512 latent + 64 RoPE).

Run: python train.py --config=configs/small_v32.py  # one GPU
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("small", "v32"), "small_v32")
  c.data.seq_len, c.data.batch_size = 1024, 32
  c.train.update(steps=20000, lr=1e-3, warmup_steps=500, log_every=50, eval_every=1000,
                 ckpt_every=1000)
  return c
