"""Basic layers: Dense, Embed, RMSNorm, SwiGLU, and rotary embeddings (with YaRN).

Weights are float32 ``nnx.Param``s annotated with logical axes (``model1.sharding``);
matmuls run in the compute dtype given at call time. Dense weights are stored [in, out]
(PyTorch's ``nn.Linear.weight`` is [out, in]: checkpoint conversion transposes).

RoPE follows DeepSeek: interleaved pairs (x[2i], x[2i+1]) on the **last** ``rope.dim``
dims, frequencies from ``precompute_freqs_cis`` (DeepSeek-V3 / V4 ``inference/model.py``),
with YaRN's frequency interpolation when ``yarn_factor > 1``. The inverse rotation is the
rotation with conjugate frequencies (VVPA uses it on the attention output).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import sharding
from model1.config import RopeConfig


class AuxLoss(nnx.Intermediate):
  """A scalar loss term a module reports with ``self.sow(AuxLoss, name, value)`` (MoE
  balance, indexer KL, MTP, ...). ``steps.loss_fn`` adds every sown value, already
  weighted by the module, to the training loss and logs each by name."""


class Metric(nnx.Intermediate):
  """A value a module reports for logging only (e.g. expert load); never in the loss."""


def dense_init(fan_in: int):
  return jax.nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(fan_in))


class Dense(nnx.Module):
  """y = x @ weight with weight [in, *out]; ``axes`` names (in, *out)."""

  def __init__(self, d_in: int, out_shape: int | Sequence[int], axes: Sequence[str | None],
               rngs: nnx.Rngs, std: float | None = None):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    init = (jax.nn.initializers.truncated_normal(stddev=std) if std is not None
            else dense_init(d_in))
    self.weight = sharding.param(init, rngs.params(), (d_in,) + out_shape, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    if getattr(self, "fp8_qat", False):  # V4 FP8 linear (model1.quant.enable_qat)
      from model1.quant import qat_dense
      return qat_dense(x, self.weight[...])
    w = self.weight[...].astype(x.dtype)
    return jnp.tensordot(x, w, axes=((x.ndim - 1,), (0,)))


class Embed(nnx.Module):
  def __init__(self, vocab: int, d: int, rngs: nnx.Rngs, std: float = 0.02):
    self.weight = sharding.param(jax.nn.initializers.normal(std), rngs.params(), (vocab, d),
                                 ("vocab", "embed"))

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


def rms_norm(x: jax.Array, eps: float, weight: jax.Array | None = None) -> jax.Array:
  """RMSNorm in fp32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float = 1e-6, axis_name: str = "norm"):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.eps, self.weight[...])


class SwiGLU(nnx.Module):
  """DeepSeek's MLP: w2(silu(w1 x) * w3 x)."""

  def __init__(self, d: int, hidden: int, rngs: nnx.Rngs, out_std: float | None = None):
    self.w1 = Dense(d, hidden, ("embed", "mlp"), rngs)
    self.w3 = Dense(d, hidden, ("embed", "mlp"), rngs)
    self.w2 = Dense(hidden, d, ("mlp", "embed"), rngs, std=out_std)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = jax.nn.silu(self.w1(x_BTD)) * self.w3(x_BTD)
    h_BTF = sharding.constrain(h_BTF, ("batch", "activation_length", "activation_mlp"))
    return self.w2(h_BTF)


# ------------------------------------------------------------------------ RoPE

def rope_frequencies(cfg: RopeConfig) -> jax.Array:
  """Per-pair angular frequencies [dim/2] (DeepSeek's precompute_freqs_cis, YaRN)."""
  dim, base = cfg.dim, cfg.theta
  freqs = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.yarn_factor > 1.0:
    def correction_dim(num_rot):
      return dim * math.log(cfg.original_max_len / (num_rot * 2 * math.pi)) / (
          2 * math.log(base))
    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
      high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    smooth = 1.0 - ramp
    freqs = freqs / cfg.yarn_factor * (1 - smooth) + freqs * smooth
  return freqs


def yarn_mscale(cfg: RopeConfig) -> float:
  """Softmax-scale multiplier (mscale^2) of DeepSeek-V3 when YaRN and mscale are on."""
  if cfg.yarn_factor <= 1.0 or cfg.mscale_all_dim <= 0:
    return 1.0
  m = 0.1 * cfg.mscale_all_dim * math.log(cfg.yarn_factor) + 1.0
  return m * m


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig,
               inverse: bool = False) -> jax.Array:
  """Rotate the last ``cfg.dim`` dims of x [..., T, (heads...), H] by position.

  ``positions`` has x's leading batch/time shape (e.g. [B, T]); head axes between time
  and the feature axis broadcast. Rotation is done in fp32 (bf16 angles lose the phase
  at long positions)."""
  r = cfg.dim
  freqs = rope_frequencies(cfg)
  ang = positions.astype(jnp.float32)[..., None] * freqs  # [..., T, r/2]
  extra = x.ndim - positions.ndim - 1
  ang = ang.reshape(ang.shape[:-1] + (1,) * extra + ang.shape[-1:])
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  if inverse:
    sin = -sin
  xr = x[..., -r:].astype(jnp.float32)
  xr = xr.reshape(xr.shape[:-1] + (r // 2, 2))
  a, b = xr[..., 0], xr[..., 1]
  rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  rot = rot.reshape(rot.shape[:-2] + (r,)).astype(x.dtype)
  return jnp.concatenate([x[..., :-r], rot], axis=-1)
