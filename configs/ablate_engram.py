"""Engram conditional memory (hashed 2/3-gram tables, gated per stream) off vs on, at two
table sizes (rows per Engram layer), MODEL1 heads in a plain block.

Run: python -m model1.ablate --suite=engram --tiny
"""
from model1 import ablate, config


def _engram(preset, rows):
  m = config.with_engram(config.preset(preset, "model1"), rows_per_layer=rows, layer_ids=(1,))
  return {"model.use_engram": True, "model.engram": config.to_dict(m.engram)}


def get_config(preset="tiny"):
  c = ablate.suite_config("engram", preset)
  c.variants = [
      ("off", {}),
      ("rows_4k", _engram(preset, 4096)),
      ("rows_32k", _engram(preset, 32768)),
  ]
  return c
