"""MaxText's ``deepseek4-tiny`` hyperparameters, to race the two codebases on one machine.

43 layers with compress ratios [0, 0, 4] + 20 x [128, 4], d_model 64, 4 query heads of
head_dim 32 (all 32 dims rotary), q_lora 16, 4 output groups with o_lora 16, window 32,
indexer 4 heads x 32 with top-k 16, 16 routed experts (top-4) + 1 shared of width 64,
3 hash-routed layers, mHC with 4 streams and 20 Sinkhorn iterations, vocabulary 129280,
no MTP. (Head geometry is MaxText's, not FlashMLA's: this config is for speed races, not
for the FP8 cache.)

Run:  python benchmarks/train_throughput.py --config=configs/v4_tiny_peer.py --batch=4 --seq=256
      python train.py --config=configs/v4_tiny_peer.py --config.data.tokenizer=byte
"""
from model1 import config


def get_config():
  attn = config.AttentionConfig(
      geometry="model1", n_heads=4, q_lora_rank=16, head_dim=32,
      rope=config.RopeConfig(dim=32), o_groups=4, o_lora_rank=16,
      sparse="compressed", window_size=32, compress_ratios=(0, 0, 4) + (128, 4) * 20,
      compress_rope=config.RopeConfig(dim=32, theta=160000.0, yarn_factor=16.0,
                                      original_max_len=65536),
      index_n_heads=4, index_head_dim=32, index_topk=16)
  moe = config.MoEConfig(n_routed_experts=16, n_activated_experts=4, n_shared_experts=1,
                         moe_inter_dim=64, n_hash_layers=3)
  model = config.ModelConfig(
      vocab_size=129280, d_model=64, n_layers=43, max_seq_len=1024, attention=attn,
      mhc=config.MHCConfig(hc_mult=4, sinkhorn_iters=20), use_moe=True, moe=moe,
      mtp=config.MTPConfig(n_layers=0), dtype="float32",
      remat="full")  # as MaxText's default policy; on CPU as fast as none, 3.7 vs 5.9 GB
  c = config.run_config(model.validate(), "v4_tiny_peer")
  c.data.tokenizer = "byte"  # our corpus BPE has 4096 ids; the peer's vocabulary is kept
  c.data.seq_len, c.data.batch_size = 256, 4
  return c
