"""Fake quantisation for quantisation-aware training (QAT), as DeepSeek-V4 does (docs/design.md §2).

What: in V4's forward pass some activations are rounded to a low-precision grid and
straight back to float ("quantise-dequantise", the ``inplace=True`` calls of its
``kernel.py``), so training sees the rounding its FP8/FP4 inference kernels will apply:

  * the NoPE dims of window keys and compressed keys: FP8 e4m3, 64-element tiles,
    power-of-two (ue8m0) scales; ``act_quant(kv[..., :-64], 64, "ue8m0", ...)``;
  * the indexer's queries and keys: a Hadamard rotation (spreads outliers over all dims)
    then FP4 e2m1 in 32-element blocks with power-of-two scales (``fp4_act_quant``).
    V3.2's indexer uses the same rotation with FP8 in 128-element tiles.

Per tile (``act_quant``): amax = max|x| clamped below at 1e-4; s = 2^ceil(log2(amax/448));
q = e4m3(clip(x/s, ±448)); x̂ = q·s. Note the clamp is on amax, not on amax/448 as in the
FP8 *cache* quantiser (``pallas_kernels.fp8_cache``, docs/design.md §3): the grids differ for tiny
tiles. FP4 (``fp4_act_quant``, indexer): amax clamped at 6·2^-126; s = 2^ceil(log2(amax/6));
q = e2m1(clip(x/s, ±6)) (round to nearest, ties to even: grid 0, .5, 1, 1.5, 2, 3, 4, 6).

Gradients: straight-through (x̂ = x + stop_gradient(x̂ − x)), so d x̂ / d x = 1.

Source: DeepSeek-V4-Flash ``inference/kernel.py`` (act_quant, fp4_act_quant) and
``inference/model.py`` (where they are called); DeepSeek-V3.2-Exp ``rotate_activation``.
Shapes: any ``[..., P]`` with P a multiple of the tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_cache import E4M3_MAX, pow2_ceil

FP4_MAX = 6.0
QAT_AMAX_FLOOR = 1e-4               # V4 act_quant: amax.clamp_min(1e-4)
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126  # V4 fp4_act_quant (ue8m0 scales)


def _ste(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Forward value x_hat, gradient of the identity."""
  return x + jax.lax.stop_gradient(x_hat.astype(x.dtype) - x)


def _tiles(x: jax.Array, tile: int) -> jax.Array:
  if x.shape[-1] % tile:
    raise ValueError(f"fake quantisation of last dim {x.shape[-1]}: expected a multiple "
                     f"of the tile {tile}")
  return x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // tile, tile)


def fake_quant_fp8(x: jax.Array, tile: int = 64) -> jax.Array:
  """V4 ``act_quant(x, tile, "ue8m0", inplace=True)`` with a straight-through gradient."""
  t = _tiles(x, tile)
  amax = jnp.maximum(jnp.max(jnp.abs(t), axis=-1, keepdims=True), QAT_AMAX_FLOOR)
  s, _ = pow2_ceil(amax / jnp.float32(E4M3_MAX))   # exact power of two (bit operations)
  q = jnp.clip(t / s, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  return _ste(x, (q * s).reshape(x.shape))


def fake_quant_fp4(x: jax.Array, block: int = 32) -> jax.Array:
  """V4 ``fp4_act_quant(x, block, inplace=True)`` (ue8m0 scales), straight-through."""
  t = _tiles(x, block)
  amax = jnp.maximum(jnp.max(jnp.abs(t), axis=-1, keepdims=True), FP4_AMAX_FLOOR)
  s, _ = pow2_ceil(amax / jnp.float32(FP4_MAX))
  q = jnp.clip(t / s, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn).astype(jnp.float32)
  return _ste(x, (q * s).reshape(x.shape))


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> np.ndarray:
  """Normalised Sylvester Hadamard matrix H/sqrt(n) (the order of fast_hadamard_transform)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard rotation of dim {n}: expected a power of two")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
  """x @ H/sqrt(n) on the last dim (orthogonal and symmetric: applying it to both q and
  k leaves q·k unchanged, so it only matters together with quantisation)."""
  h = jnp.asarray(hadamard_matrix(x.shape[-1]))
  return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h,
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def fake_quant_nope(kv: jax.Array, rope_dim: int, tile: int) -> jax.Array:
  """FP8-simulate the NoPE dims of a key (RoPE dims stay as they are, V4 ``Attention``)."""
  return jnp.concatenate([fake_quant_fp8(kv[..., :-rope_dim], tile), kv[..., -rope_dim:]],
                         axis=-1)


def indexer_quant(x: jax.Array, fmt: str | None) -> jax.Array:
  """Hadamard rotation (always, as DeepSeek's indexers do) then fake quantisation of
  indexer q/k: "fp4" (V4), "fp8" (V3.2) or None (rotation only: QAT off)."""
  x = hadamard(x)
  if fmt is None:
    return x
  return fake_quant_fp4(x, 32) if fmt == "fp4" else fake_quant_fp8(x, 128)
