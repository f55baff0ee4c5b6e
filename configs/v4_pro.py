"""DeepSeek-V4-Pro at full size (1.6T total, 49B activated per token): for parameter
counts and the long-context cost model only — it is never allocated or trained here.

Hyperparameters are DeepSeek's released ``config.json`` of DeepSeek-V4-Pro
(huggingface.co/deepseek-ai/DeepSeek-V4-Pro; the file itself is not in this project's
offline source index, so the values were read from verbatim stored copies of it, which
agree with each other): hidden 7168, 61 layers, 128 heads of 512 (448 NoPE + 64 RoPE),
q_lora_rank 1536, o_groups 16 x o_lora_rank 1024, sliding window 128, compress_ratios
[128, 128, (4, 128) x 29, 4] + [0] for the MTP block (31 HCA and 30 CSA layers, no
window-only layer), indexer 64 heads x 128 with top-1024 compressed entries, MoE 384
routed experts (top-6, sqrt-softplus, routed_scaling_factor 2.5, 3 hash-routed layers)
of width 3072 + 1 shared expert, SwiGLU clamp 10, mHC 4 streams / 20 Sinkhorn
iterations, vocab 129280, one MTP module (num_nextn_predict_layers 1), RoPE theta 10000
and compress_rope_theta 160000 with YaRN x16 from 65536.

``full_size=True`` tells tests and tools to use ``nnx.eval_shape`` (shapes, no memory).

Run: python benchmarks/long_context_cost.py --params   # parameter counts vs published
"""
from model1 import config
from model1.config import AttentionConfig, FFNConfig, ModelConfig, MTPConfig
from model1.mhc import MHCConfig
from model1.moe import MoEConfig

RATIOS = (128, 128) + (4, 128) * 29 + (4,) + (0,)   # 61 layers, then the MTP block's


def model_config() -> ModelConfig:
  attn = AttentionConfig(
      geometry="model1", n_heads=128, q_lora_rank=1536, head_dim=512, o_groups=16,
      o_lora_rank=1024, sparse="compressed", window_size=128, compress_ratios=RATIOS,
      index_n_heads=64, index_head_dim=128, index_topk=1024)
  moe = MoEConfig(n_routed_experts=384, n_activated_experts=6, n_shared_experts=1,
                  moe_inter_dim=3072, route_scale=2.5, n_hash_layers=3,
                  score_func="sqrtsoftplus", swiglu_limit=10.0)
  return ModelConfig(
      vocab_size=129280, d_model=7168, n_layers=61, max_seq_len=1 << 20, attention=attn,
      ffn=FFNConfig(hidden=3072), dtype="bfloat16", remat="full", mhc=MHCConfig(hc_mult=4),
      use_moe=True, n_dense_layers=0, moe=moe, mtp=MTPConfig(n_layers=1)).validate()


PUBLISHED = dict(total=1.6e12, activated=49e9)


def get_config():
  c = config.run_config(model_config(), "v4_pro")
  c.full_size = True
  c.published = PUBLISHED
  return c
