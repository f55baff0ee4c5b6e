"""tiny preset, model1 geometry, with Engram conditional memory (hashed 2/3-gram tables).

The table budget knob is ROWS (rows per Engram layer); Engram sits in layers (1,).
Run: python train.py --config=configs/tiny_engram.py
"""
from model1 import config

ROWS = 16384


def get_config():
  model = config.with_engram(config.preset("tiny", "model1"), rows_per_layer=ROWS, layer_ids=(1,))
  c = config.run_config(model, "tiny_engram")
  c.data.seq_len = 128
  c.train.steps = 200
  return c
