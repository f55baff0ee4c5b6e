"""pallas_kernels: FlashMLA-compatible KV-cache formats and attention for JAX.

Imports jax and numpy only (never ``model1``).  The byte layouts and the attention
semantics are documented in ``fp8_cache`` and in each kernel module's docstring.

  fp8_cache       the "v32" (656 B/token), "model1" (584 B/token) and "bf16" cache
                  formats: byte-exact FlashMLA packing, the ``KCache`` structure-of-arrays
                  layout that kernels read, paged writes.
  sparse_decode   ``sparse_decode`` (FlashMLA flash_mla_with_kvcache + indices).
  mosaic_sparse_decode  its Hopper (sm_90a) Pallas Mosaic GPU kernel, FP8 caches.
  dispatch        ``resolve_impl``: which implementation ``impl="auto"`` means, per kernel.
  dense_decode    ``dense_decode`` (flash_mla_with_kvcache, paged, optional causal).
  mosaic_dense_decode   its Hopper (sm_90a) Pallas Mosaic GPU kernel, FP8 and bf16 caches.
  sparse_prefill  ``sparse_prefill`` (flash_mla_sparse_fwd).
  mosaic_sparse_prefill  its Hopper (sm_90a) Pallas Mosaic GPU kernel (bf16 keys).
  combine         split-KV log-sum-exp combine.
  softmax         the one sink-aware masked softmax / LSE (one-shot and online forms),
                  shared by the references, the kernels, the combine and ``model1``.
  tuning          ``KernelTuning`` (block sizes, splits, warps, stages) for every kernel
                  and the one split-KV heuristic.
  cache_view      the cache arguments the kernels accept and the copy-free 2-D views
                  (with 64-bit-safe addressing) they read.

Each attention function takes ``impl="xla"`` (plain-jnp reference, the test oracle) or
``impl="pallas"`` (Pallas Triton kernels; interpret mode on CPU), ``impl="mosaic"`` (the Hopper
Pallas Mosaic GPU kernels ``mosaic_sparse_decode`` / ``mosaic_dense_decode`` /
``mosaic_sparse_prefill``; GPU interpret mode on CPU) or ``impl="auto"``
(``dispatch.resolve_impl``); ``*_reference`` are the oracles themselves.  Bad arguments raise
``ValueError`` before anything runs.
"""
from pallas_kernels.combine import combine_splits
from pallas_kernels.dense_decode import dense_decode, dense_decode_reference
from pallas_kernels.fp8_cache import (
    FORMATS,
    GEOMETRY,
    KCache,
    as_kcache,
    block_bytes,
    bytes_per_token,
    dequantize_k_cache,
    quantize_k_cache,
    write_k_cache,
)
from pallas_kernels.sparse_decode import sparse_decode, sparse_decode_reference
from pallas_kernels.sparse_prefill import sparse_prefill, sparse_prefill_reference
from pallas_kernels.tuning import KernelTuning

__all__ = [
    "FORMATS", "GEOMETRY", "KCache", "KernelTuning", "as_kcache", "block_bytes", "bytes_per_token",
    "combine_splits", "dense_decode", "dense_decode_reference", "dequantize_k_cache",
    "quantize_k_cache", "sparse_decode", "sparse_decode_reference", "sparse_prefill",
    "sparse_prefill_reference", "write_k_cache",
]
