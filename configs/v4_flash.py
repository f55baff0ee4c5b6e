"""DeepSeek-V4-Flash at full size (284B total, 13B activated per token): for parameter
counts and the long-context cost model only — it is never allocated or trained here.

Hyperparameters are DeepSeek's released inference ``config.json`` of DeepSeek-V4-Flash
(public copy: github.com/Mockingjay1316/deepseek-v4-flash-spark, ``inference/config.json``,
byte-identical to the release at commit 0825add): dim 4096, 43 layers, 64 heads of 512
(448 NoPE + 64 RoPE), q_lora_rank 1024, o_groups 8 x o_lora_rank 1024, window 128,
compress_ratios [0, 0, (4, 128) x 20, 4] + [0] for the MTP block, indexer 64 heads x 128,
top-512 compressed entries, MoE 256 routed experts (top-6, sqrt-softplus, route_scale 1.5,
the first 3 layers hash-routed) of width 2048 + 1 shared expert, SwiGLU clamp 10, mHC 4
streams with 20 Sinkhorn iterations, vocab 129280, one MTP module; RoPE theta 10000
(window-only layers) and 160000 with YaRN x16 from 65536 (compressed layers). The
release stores weights in FP8 (experts FP4) with ue8m0 scales; that changes bytes, not
counts.

``full_size=True`` tells tests and tools to use ``nnx.eval_shape`` (shapes, no memory).

Run: python benchmarks/long_context_cost.py --params   # parameter counts vs published
"""
from model1 import config
from model1.config import AttentionConfig, FFNConfig, ModelConfig, MTPConfig
from model1.mhc import MHCConfig
from model1.moe import MoEConfig

RATIOS = (0, 0) + (4, 128) * 20 + (4,) + (0,)   # 43 layers, then the MTP block's


def model_config() -> ModelConfig:
  attn = AttentionConfig(
      geometry="model1", n_heads=64, q_lora_rank=1024, head_dim=512, o_groups=8,
      o_lora_rank=1024, sparse="compressed", window_size=128, compress_ratios=RATIOS,
      index_n_heads=64, index_head_dim=128, index_topk=512)
  moe = MoEConfig(n_routed_experts=256, n_activated_experts=6, n_shared_experts=1,
                  moe_inter_dim=2048, route_scale=1.5, n_hash_layers=3,
                  score_func="sqrtsoftplus", swiglu_limit=10.0)
  return ModelConfig(
      vocab_size=129280, d_model=4096, n_layers=43, max_seq_len=1 << 20, attention=attn,
      ffn=FFNConfig(hidden=2048), dtype="bfloat16", remat="full", mhc=MHCConfig(hc_mult=4),
      use_moe=True, n_dense_layers=0, moe=moe, mtp=MTPConfig(n_layers=1)).validate()


PUBLISHED = dict(total=284e9, activated=13e9)


def get_config():
  c = config.run_config(model_config(), "v4_flash")
  c.full_size = True
  c.published = PUBLISHED
  return c
