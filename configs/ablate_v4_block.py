"""The DeepSeek-V4 block around MODEL1 attention: mHC (4 streams), DeepSeekMoE, MTP and the
Muon optimizer, each switched off alone, and all off ("plain").

Run: python -m model1.ablate --suite=v4_block --tiny
"""
from model1 import ablate


def get_config(preset="tiny"):
  c = ablate.suite_config("v4_block", preset, block="v4")
  c.base.train.optimizer = "muon"
  c.variants = [
      ("v4", {}),
      ("no_mhc", {"model.mhc.hc_mult": 1}),
      ("no_moe", {"model.use_moe": False}),
      ("no_mtp", {"model.mtp.n_layers": 0}),
      ("adamw", {"train.optimizer": "adamw"}),
      ("plain", {"model.mhc.hc_mult": 1, "model.use_moe": False, "model.mtp.n_layers": 0,
                 "train.optimizer": "adamw"}),
  ]
  return c
