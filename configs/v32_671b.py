"""DeepSeek-V3.2(-Exp) at full size (671B total, 37B activated per token): for parameter
counts and the long-context cost model only — it is never allocated or trained here.

Hyperparameters are DeepSeek's ``inference/config_671B_v3.2.json`` of DeepSeek-V3.2-Exp
(github.com/deepseek-ai/DeepSeek-V3.2-Exp; values as quoted verbatim by several stored
copies of that file): dim 7168, 61 layers of which the first 3 use a dense FFN of 18432,
128 heads, MLA with q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64,
v_head 128 (the "576" geometry), DSA lightning indexer 64 heads x 128 with top-2048
tokens, MoE 256 routed experts (top-8, sigmoid scores, route_scale 2.5) of width 2048
+ 1 shared expert, vocab 129280, YaRN x40 from 4096 with mscale 1.0, plus one MTP module
(``num_nextn_predict_layers`` 1 in the released HF config; DeepSeek's 671B excludes it).
Group-limited routing (8 groups, top-4 groups) is not modelled: it changes which experts
a token uses, not how many parameters exist or are active.

``full_size=True`` tells tests and tools to use ``nnx.eval_shape`` (shapes, no memory).

Run: python benchmarks/long_context_cost.py --params   # parameter counts vs published
"""
from model1 import config
from model1.config import AttentionConfig, FFNConfig, ModelConfig, MTPConfig, RopeConfig
from model1.mhc import MHCConfig
from model1.moe import MoEConfig


def model_config() -> ModelConfig:
  attn = AttentionConfig(
      geometry="v32", n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
      v_head_dim=128, rope=RopeConfig(dim=64, theta=10000.0, yarn_factor=40.0,
                                      original_max_len=4096, mscale_all_dim=1.0),
      sparse="dsa", index_n_heads=64, index_head_dim=128, index_topk=2048)
  moe = MoEConfig(n_routed_experts=256, n_activated_experts=8, n_shared_experts=1,
                  moe_inter_dim=2048, route_scale=2.5, n_hash_layers=0, score_func="sigmoid",
                  swiglu_limit=0.0)
  return ModelConfig(
      vocab_size=129280, d_model=7168, n_layers=61, max_seq_len=163840, attention=attn,
      ffn=FFNConfig(hidden=18432), dtype="bfloat16", remat="full", mhc=MHCConfig(hc_mult=1),
      use_moe=True, n_dense_layers=3, moe=moe, mtp=MTPConfig(n_layers=1)).validate()


PUBLISHED = dict(total=671e9, activated=37e9)


def get_config():
  c = config.run_config(model_config(), "v32_671b")
  c.full_size = True
  c.published = PUBLISHED
  return c
