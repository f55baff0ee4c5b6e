"""Batched generation over the paged KV cache (bf16 or FlashMLA FP8 formats).

Prompts of different lengths are right-padded and prefilled in one full forward
(padding is segment 0, so it is never attended); each layer's cache vectors of the real
tokens are then written into the paged cache. Decoding feeds one token per sequence at
its own position: every layer writes its new cache vector and attends over the cache
with FlashMLA semantics (``pallas_kernels.dense_decode``). V32 decodes in absorbed form
over the 576-dim latent; MODEL1 over the shared 512-dim key=value with VVPA and the sink.
Sparse models (``attention.sparse``) decode with ``pallas_kernels.sparse_decode``: DSA
over the paged token cache with the indexer's top-k; V4 compressed attention over a ring
of W window slots (main cache) plus the compressed entries (extra cache;
``kv_cache.CompressedLayerCache``), the prefill leaving each compressor's unfinished
block in its state. Query heads are padded to the kernel's head block inside the kernel.

``impl`` picks the attention implementation (``pallas_kernels.dispatch.resolve_impl``):
"auto" (default) = the Pallas kernels on a GPU, the XLA reference on CPU/TPU; "xla";
"pallas" (interpret mode on CPU). With kernels, the prefill of DSA and V4 compressed
layers runs ``pallas_kernels.sparse_prefill`` (``attention.prefill_kernels``): all the
batch's queries as rows, the batch's tokens (DSA; plus, V4, its compressed entries) as key
rows, indices = the indexer's top-k tokens (DSA) or the W window rows + the HCA/CSA
entries (V4), the sink passed through. Dense layers prefill in the training form: their
causal attention within segments is dense (``sparse_prefill`` would need every earlier
token as an index, T^2 indices), and the V32 training form expands per-head keys through
``wkv_b`` (192-dim heads, 128-dim values) -- not the shared 576-dim key the kernel reads.
With ``impl="xla"`` prefill stays in the training form, the oracle the kernels are
compared with.

The decode step is one jitted function of (params, caches, tokens, positions, block
table): it compiles once per batch size and cache shape, never per token.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1.attention import prefill_kernels
from model1.kv_cache import PagedKVCache, kcache_format, write_prefill
from pallas_kernels.dispatch import resolve_impl


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0       # 0 = greedy
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  seed: int = 0


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]              # generated ids per prompt (stop token included)
  logits: np.ndarray | None            # [steps, B, V] next-token logits (return_logits)
  cache: PagedKVCache
  impl: str = "xla"                    # the attention implementation that ran (resolved)


def sample(logits_BV: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
  """Greedy when temperature == 0, else nucleus (top-p) sampling at that temperature."""
  greedy = jnp.argmax(logits_BV, axis=-1)
  t = jnp.maximum(temperature, 1e-6)
  probs = jax.nn.softmax(logits_BV / t, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  keep = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p  # always keeps the top token
  logp = jnp.where(keep, jnp.log(sorted_p), -jnp.inf)
  choice = jax.random.categorical(key, logp, axis=-1)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 1))
def _prefill(graphdef, impl, state, tokens_BT, segment_ids_BT, engram_hash, lens_B):
  model = nnx.merge(graphdef, state)
  pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  # the XLA path keeps the training form (the oracle); kernels: sparse_prefill
  with prefill_kernels(None if impl == "xla" else impl):
    return model.prefill(tokens_BT, pos_BT, segment_ids_BT, engram_hash, lens_B)


@partial(jax.jit, donate_argnums=(0,))
def _write_prefill(caches, kvs, block_table_BZ, lens_B):
  return [write_prefill(c, kv, block_table_BZ, lens_B) for c, kv in zip(caches, kvs)]


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _decode_step(graphdef, impl, state, caches, engram_state, tokens_B, pos_B, block_table_BZ,
                 engram_hash, key, temperature, top_p):
  model = nnx.merge(graphdef, state)
  logits_B1V, caches, engram_state = model.decode(
      tokens_B[:, None], pos_B[:, None], caches, block_table_BZ, pos_B + 1,
      jnp.ones((tokens_B.shape[0], 1), bool), impl, engram_hash, engram_state)
  nxt = sample(logits_B1V[:, 0], key, temperature, top_p)
  return logits_B1V[:, 0], nxt, caches, engram_state


def _ids(hashes: dict) -> dict:
  return {str(k): jnp.asarray(v, jnp.int32) for k, v in hashes.items()}


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             *, cache_format: str = "bf16", block_size: int = 64, impl: str = "auto",
             return_logits: bool = False, mapping=None) -> Generation:
  """Generate continuations of token-id ``prompts`` (lists of different lengths).

  Engram models need ``mapping`` (the run's ``NgramHashMapping``,
  ``trainer.engram_mapping``): the prompts are hashed once, then each new token is hashed
  from the last N-1 ids of its sequence (``hash_step``) and each Engram layer carries its
  short-conv history, so decoding never recomputes the prefix.

  ``impl``: the attention implementation (``pallas_kernels.dispatch``): "auto" (default)
  = the Pallas kernels on a GPU, the XLA reference elsewhere; "xla"; "pallas" (on CPU the
  kernels run in Pallas interpret mode: their arithmetic, slowly). ``Generation.impl`` says which ran."""
  cfg = model.cfg
  impl = resolve_impl(impl)
  if cfg.use_engram and mapping is None:
    raise ValueError("mapping=None but model.use_engram=True; expected the run's "
                     "NgramHashMapping (model1.trainer.engram_mapping(model_cfg, dataset))")
  n_raw = len(mapping.compressed_tokenizer.lookup_table) if cfg.use_engram else 0
  if cfg.use_engram and n_raw < cfg.vocab_size:
    raise ValueError(f"mapping's tokenizer has {n_raw} ids but "
                     f"model.vocab_size={cfg.vocab_size}; expected the tokenizer the model "
                     f"was trained with (it must cover every id the model can sample)")
  fmt = kcache_format(cache_format, cfg.attention.geometry)
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"prompts lengths={[len(p) for p in prompts]}; expected a non-empty "
                     f"list of non-empty token-id lists")
  for i, p in enumerate(prompts):
    bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] contains token id {bad[0]}; expected ids in "
                       f"[0, {cfg.vocab_size})")
  if sampling.max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={sampling.max_new_tokens}; expected >= 1")
  longest = max(len(p) for p in prompts)
  if longest + sampling.max_new_tokens > cfg.max_seq_len:
    # checked before the cache is allocated: positions past max_seq_len were never trained
    raise ValueError(f"prompt length {longest} + max_new_tokens={sampling.max_new_tokens} = "
                     f"{longest + sampling.max_new_tokens}; expected at most "
                     f"model.max_seq_len={cfg.max_seq_len} (shorten the prompt or ask for "
                     f"fewer tokens)")
  B = len(prompts)
  lens = np.array([len(p) for p in prompts], np.int32)
  total = int(lens.max()) + sampling.max_new_tokens
  cache = PagedKVCache.for_model(cfg, B, total, fmt, block_size)
  cache.reserve(lens + sampling.max_new_tokens)

  graphdef, state = nnx.split(model)
  T = int(lens.max())
  toks = np.zeros((B, T), np.int32)
  seg = np.zeros((B, T), np.int32)
  for b, p in enumerate(prompts):
    toks[b, :len(p)], seg[b, :len(p)] = p, 1
  engram_hash = hash_state = None
  if cfg.use_engram:
    engram_hash = _ids(mapping.hash_packed(toks, seg))
    # hash_step history per sequence: the last N-1 compressed ids of its own prompt
    hash_state = np.concatenate([mapping.hash_step(mapping.init_state(1), np.asarray([p]))[1]
                                 for p in prompts])
  logits_BTV, kvs, engram_state = _prefill(graphdef, impl, state, jnp.asarray(toks),
                                           jnp.asarray(seg), engram_hash, jnp.asarray(lens))
  table = jnp.asarray(cache.block_table)
  cache.layers = _write_prefill(cache.layers, kvs, table, jnp.asarray(lens))
  cache.seqlens[:] = lens
  last_BV = logits_BTV[jnp.arange(B), jnp.asarray(lens) - 1]

  key = jax.random.key(sampling.seed)
  key, sub = jax.random.split(key)
  nxt = sample(last_BV, sub, sampling.temperature, sampling.top_p)
  out = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  trace = [np.asarray(last_BV)] if return_logits else None
  pos = jnp.asarray(lens)
  stop = set(int(s) for s in sampling.stop_tokens)
  for step in range(sampling.max_new_tokens):
    nxt_np = np.asarray(nxt)
    for b in range(B):
      if not done[b]:
        out[b].append(int(nxt_np[b]))
        done[b] = int(nxt_np[b]) in stop or len(out[b]) >= sampling.max_new_tokens
    if done.all():
      break
    key, sub = jax.random.split(key)
    if cfg.use_engram:
      step_hash, hash_state = mapping.hash_step(hash_state, nxt_np[:, None])
      engram_hash = _ids(step_hash)
    logits_BV, nxt, cache.layers, engram_state = _decode_step(
        graphdef, impl, state, cache.layers, engram_state, nxt, pos, table, engram_hash, sub,
        sampling.temperature, sampling.top_p)
    pos = pos + 1
    cache.seqlens[:] = np.asarray(pos)
    if return_logits:
      trace.append(np.asarray(logits_BV))
  return Generation(out, np.stack(trace) if return_logits else None, cache, impl)
