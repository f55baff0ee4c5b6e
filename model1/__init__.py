"""model1: a JAX/Flax NNX research reimplementation of DeepSeek MODEL1 (DeepSeek-V4).

The two attention geometries of FlashMLA live side by side: ``v32`` (576-dim MLA heads:
512 latent + 64 RoPE, value = latent) and ``model1`` (512-dim heads: 448 NoPE + 64 RoPE,
key = value, VVPA). Each module's docstring states what it implements and its source.

Shape-suffix letter key (tensor names and einsum letters use the same letters):

  B  batch                      T  query positions (target)      S  key positions (source)
  D  model width (d_model)      V  vocabulary                    F  feed-forward hidden
  N  query heads                K  key/value heads (1 for MLA)   H  per-head dim
  L  MLA latent (kv_lora_rank)  R  RoPE dims (64)                P  NoPE dims
  Q  q low-rank (q_lora_rank)   G  output groups                 O  output low-rank (o_lora)
  E  experts                    C  residual streams (mHC)        I  indexer heads
  J  indexer head dim           M  compressed entries            W  window slots
  X  top-k selected             Z  page blocks                   Y  tokens per page block
  A  query rows of one chunk    U  keys of one attention source (window band, entries)
"""

__version__ = "0.1.0"
