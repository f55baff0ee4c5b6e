"""How much synthetic long-context data (passkey + MQAR rows, ``data.synthetic_ratio``) the
training mix needs before retrieval works, and what it costs in text loss.

The test suite runs ``mqar_mix`` alone to check that a tiny model beats chance on MQAR.
Run: python -m model1.ablate --suite=synthetic --tiny --steps=150
"""
from model1 import ablate


def get_config(preset="tiny"):
  c = ablate.suite_config("synthetic", preset)
  c.variants = [
      ("text_only", {"data.synthetic_ratio": 0.0}),
      ("mix_25", {"data.synthetic_ratio": 0.25}),
      ("mqar_mix", {"data.synthetic_ratio": 1.0}),
  ]
  return c
