"""small preset, model1 geometry, with Engram conditional memory (hashed 2/3-gram tables).

The table budget knob is ROWS (rows per Engram layer); Engram sits in layers (1, 5).
Run: python train.py --config=configs/small_engram.py
"""
from model1 import config

ROWS = 262144


def get_config():
  model = config.with_engram(config.preset("small", "model1"), rows_per_layer=ROWS, layer_ids=(1, 5))
  c = config.run_config(model, "small_engram")
  c.data.seq_len, c.data.batch_size = 1024, 32
  c.train.update(steps=20000, lr=1e-3, warmup_steps=500, log_every=50, eval_every=1000,
                 ckpt_every=1000)
  return c
