"""Each MODEL1 attention ingredient switched off alone: VVPA, attention sink, q-norm,
grouped low-rank output (docs/design.md §1), plus all four off.

Run: python -m model1.ablate --suite=model1_parts --tiny
"""
from model1 import ablate

A = "model.attention."


def get_config(preset="tiny"):
  c = ablate.suite_config("model1_parts", preset)
  c.base.data.synthetic_ratio = 0.25
  c.variants = [
      ("model1", {}),
      ("no_vvpa", {A + "vvpa": False}),
      ("no_sink", {A + "sink": False}),
      ("no_q_norm", {A + "q_norm": False}),
      ("plain_output", {A + "grouped_output": False}),
      ("none", {A + "vvpa": False, A + "sink": False, A + "q_norm": False,
                A + "grouped_output": False}),
  ]
  return c
