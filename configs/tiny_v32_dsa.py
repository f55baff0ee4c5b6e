"""tiny V3.2: 576-dim MLA heads with DSA (lightning indexer, top-32 tokens per query).

Two-stage recipe: first a dense warm-up where only the indexer learns (KL to the main
attention), then sparse training of everything (indexer input detached):
Run: python train.py --config=configs/tiny_v32_dsa.py --config.model.attention.dsa_stage=warmup \
         --config.train.steps=100 --workdir=runs/dsa
     python train.py --config=configs/tiny_v32_dsa.py --workdir=runs/dsa --config.train.steps=300
"""
from model1 import config


def get_config():
  c = config.run_config(config.preset("tiny", "v32", sparse="dsa"), "tiny_v32_dsa")
  c.data.seq_len = 128
  c.train.steps = 200
  return c
