"""GPU only (``-m gpu``; skipped without a CUDA device): every kernel impl really compiled
and run on the device, compared with the plain-jnp references.

  * each covering-array case of ``test_kernels`` (sparse decode, dense decode, sparse
    prefill), with ``interpret=False``, for every impl the entry point offers besides "xla";
  * the default tuning (automatic split-KV) on a larger shape per kernel;
  * FlashMLA packed bytes and a bf16 ``[Z, Y, 1, d]`` array as the cache argument;
  * 64-bit-safe addressing for real: a v32 cache of 4,194,368 tokens (2.15 GB of FP8
    codes, 2.7 GB in all) whose last tokens are picked, so their byte offsets pass 2^31.
Run by ``benchmarks/gpu_check.sh`` on the H200 machine.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.tuning import KernelTuning
from test_kernels import (DENSE_CASES, DV, PREFILL_CASES, SPARSE_CASES, _dense_case,
                          _prefill_case, _sparse_case, assert_attention_close, randn, vmax)

# The modules (the package re-exports functions of the same names).
sd_mod, dd_mod, sp_mod = (importlib.import_module(f"pallas_kernels.{m}")
                          for m in ("sparse_decode", "dense_decode", "sparse_prefill"))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


def _kernel_impls(module):
  return [i for i in module.IMPLS if i not in ("xla", "auto")]


def _kw(impl, **tuning):
  """Device execution; the Triton impl also takes the case's tuning."""
  kw = dict(impl=impl, interpret=False)
  if impl == "pallas" and tuning:
    kw["tuning"] = KernelTuning(**tuning)
  return kw


@pytest.mark.parametrize("impl", _kernel_impls(sd_mod))
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_decode_on_gpu(case, impl):
  *args, splits = case
  q, cache, idx, kw = _sparse_case(*args, seed=SPARSE_CASES.index(case))
  got = pk.sparse_decode(q, cache, idx, **kw, **_kw(impl, num_splits=splits))
  want = pk.sparse_decode(q, cache, idx, impl="xla", **kw)
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))


@pytest.mark.parametrize("impl", _kernel_impls(dd_mod))
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_decode_on_gpu(case, impl):
  *args, splits = case
  q, cache, table, seqlens = _dense_case(*args, seed=DENSE_CASES.index(case))
  kw = dict(head_dim_v=DV, causal=q.shape[1] > 1)
  if impl == "mosaic" and cache.fmt == "bf16" and cache.block_size % 8:
    # The Mosaic kernel's tiled bf16 TMA needs pages of a multiple of 8 tokens.
    with pytest.raises(ValueError, match="block_size"):
      pk.dense_decode(q, cache, table, seqlens, **kw, **_kw(impl))
    return
  got = pk.dense_decode(q, cache, table, seqlens, **kw, **_kw(impl, block_k=16, num_splits=splits))
  want = pk.dense_decode(q, cache, table, seqlens, impl="xla", **kw)
  assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))


@pytest.mark.parametrize("impl", _kernel_impls(sp_mod))
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_sparse_prefill_on_gpu(case, impl):
  q, kv, idx, kw = _prefill_case(*case, seed=PREFILL_CASES.index(case))
  got = pk.sparse_prefill(q, kv, idx, **kw, **_kw(impl))
  want = pk.sparse_prefill(q, kv, idx, impl="xla", **kw)
  v = np.asarray(kv).astype(np.float32)[..., :DV]
  assert_attention_close(got[0], want[0], got[2], want[2], float(np.nanmax(np.abs(v))))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_default_tuning_and_cache_forms_on_gpu(fmt):
  """Automatic splits on a long sequence; packed bytes and bf16 arrays as caches."""
  rng = np.random.default_rng(7)
  d, z, y = {"v32": 576, "model1": 512}[fmt], 64, 64
  x = jnp.asarray(randn(rng, z, y, 1, d))
  cache = pk.KCache.from_bf16(x, fmt)
  q = jnp.asarray(randn(rng, 2, 2, 64, d))
  table = jnp.asarray(rng.permutation(z).reshape(2, 32), jnp.int32)
  seqlens = jnp.asarray([2047, 1000], jnp.int32)
  idx = jnp.asarray(rng.integers(-1, z * y, (2, 2, 300)), jnp.int32)
  for impl in _kernel_impls(dd_mod):
    for c in (cache, pk.quantize_k_cache(x, fmt)):
      if impl == "mosaic" and not isinstance(c, pk.KCache):   # it reads KCache, not bytes
        with pytest.raises(ValueError, match="reads a KCache"):
          pk.dense_decode(q, c, table, seqlens, head_dim_v=DV, causal=True, impl=impl)
        continue
      got = pk.dense_decode(q, c, table, seqlens, head_dim_v=DV, causal=True, impl=impl,
                            interpret=False)
      want = pk.dense_decode(q, cache, table, seqlens, head_dim_v=DV, causal=True)
      assert_attention_close(got[0], want[0], got[1], want[1], vmax(cache))
  for impl in _kernel_impls(sd_mod):
    for c, ref in ((cache, cache), (pk.quantize_k_cache(x, fmt), cache), (x, x)):
      if impl == "mosaic" and c is not cache:  # it reads an FP8 KCache: not bytes, not bf16
        with pytest.raises(ValueError, match="impl='mosaic'"):
          pk.sparse_decode(q, c, idx, head_dim_v=DV, impl=impl, interpret=False)
        continue
      got = pk.sparse_decode(q, c, idx, head_dim_v=DV, impl=impl, interpret=False)
      want = pk.sparse_decode(q, ref, idx, head_dim_v=DV)
      v = float(np.abs(np.asarray(x).astype(np.float32)[..., :DV]).max()) if ref is x else vmax(cache)
      assert_attention_close(got[0], want[0], got[1], want[1], v)


def test_offsets_past_2gib_on_gpu():
  z, y, fmt = 65537, 64, "v32"                      # 4,194,368 tokens: codes 2^31 + 32 KiB
  rng = np.random.default_rng(3)
  tail = pk.KCache.from_bf16(jnp.asarray(randn(rng, 1, y, 1, 576)), fmt)
  big = pk.KCache.empty(z, y, fmt)
  big = pk.KCache(*(a.at[z - 1:].set(t) for a, t in
                    ((big.nope, tail.nope), (big.rope, tail.rope), (big.scales, tail.scales))), fmt)
  q = jnp.asarray(randn(rng, 1, 1, 64, 576))
  idx = jnp.asarray((z - 1) * y + rng.integers(0, y, (1, 1, 64)), jnp.int32)   # the last page
  small_idx = idx - (z - 1) * y
  for impl in _kernel_impls(sd_mod):
    got = pk.sparse_decode(q, big, idx, head_dim_v=DV, impl=impl, interpret=False)
    want = pk.sparse_decode(q, tail, small_idx, head_dim_v=DV)     # same keys, a 1-page cache
    assert_attention_close(got[0], want[0], got[1], want[1], vmax(tail))
