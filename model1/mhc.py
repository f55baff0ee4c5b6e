"""mHC: manifold-constrained hyper-connections (DeepSeek-V4's residual streams).

What. The residual stream is widened to C = ``hc_mult`` parallel streams h_BTCD. Around
every sub-layer f (attention, FFN) one mHC site computes, per token and from the token's
own streams, three input-dependent mixings:

  mixes = (flatten(h) @ fnᵀ) · rsqrt(mean(flatten(h)²) + norm_eps)      [(2+C)·C]
  pre   = σ(mixes[:C]·s0 + base[:C]) + eps                              [C]
  post  = 2·σ(mixes[C:2C]·s1 + base[C:2C])                              [C]
  comb  = Sinkhorn(mixes[2C:] viewed C×C · s2 + base[2C:])               [C, C]

  layer input  x   = Σ_j pre_j · h_j          (the caller then applies RMSNorm and f)
  layer output h'_k = post_k · f(norm(x)) + Σ_j comb[j, k] · h_j

Sinkhorn (exactly V4's ``hc_split_sinkhorn`` kernel): softmax over the last axis k, + eps,
one column normalisation, then ``sinkhorn_iters − 1`` rounds of (row, column)
normalisation, each divide by (sum + eps) — ``sinkhorn_iters`` column normalisations in
all, ending on columns, so columns sum to 1 up to eps and rows to within the Sinkhorn
residual (measured: ~1e-6 for O(1) logits; logits of std ≳ 1 can leave rare row sums
off by 1e-3–1e-2 after 20 rounds — V4's behaviour, kept). The embedding is copied into the C streams (``expand``); after the last block
``HCHead`` merges them with σ pre-weights and no Sinkhorn.

Source. Official DeepSeek-V4-Flash ``inference/model.py`` (``Block.hc_pre``,
``Block.hc_post``, ``Transformer.hc_head``) and ``inference/kernel.py``
(``hc_split_sinkhorn``); public copy: Mockingjay1316/deepseek-v4-flash-spark. mHC paper:
arXiv 2512.24880. Peer: MaxText ``layers/mhc.py`` (same Sinkhorn start; it normalises
with a clip instead of + eps and puts an RMSNorm weight before the projections).

Parameters (names mirror V4; the block owns two sites, ``hc_attn`` and ``hc_ffn``, so
``hc_attn.fn`` here is V4's ``hc_attn_fn``, and the model's ``hc_head.fn`` is
``hc_head_fn``): ``fn`` [(2+C)·C, C·D] fp32, ``base`` [(2+C)·C] fp32, ``scale`` [3] fp32
(``HCHead``: ``fn`` [C, C·D], ``base`` [C], ``scale`` [1]). All mixing math runs in fp32;
results are cast back to the stream dtype as V4 does.

Initialisation (V4 ships no init; ours follows the MaxText peer): ``fn`` ~ N(0, 1/(C·D))
(fan-in, so mixes ≈ N(0, 1) on unit-RMS input), ``scale`` = 0.01, ``base`` = 0 (plus an
optional ``comb_diag_init`` on the diagonal of the comb logits). A random ``fn`` is
required, not a style choice: with ``fn`` = 0 every stream starts as the same copy of
the embedding and every stream gets the same gradient, so the streams never separate.

hc_mult = 1. With one stream there is nothing to mix: the only 1×1 doubly stochastic
matrix is [1], and a scale on the layer input is removed by the following RMSNorm (up
to its eps). V4's
formulas nevertheless cannot give the plain residual bit-exactly in fp32 — pre =
σ(·) + eps is never exactly 1 (σ saturates at 1.0, then + eps) and the eps-damped
Sinkhorn of [1] is 1 − O(eps) — so no init of (fn, base, scale) makes C = 1 exact. We
therefore define C = 1 as the plain pre-norm residual: the site holds no parameters and
uses pre = post = comb = 1 as exact constants, so h' = h + f(norm(h)) bit for bit (the
ablation baseline). The V4 formulas are used unchanged for every C ≥ 2.

Shapes: B batch, T positions, C streams, D model width (letter key in ``model1``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import sharding

STREAM_AXES = ("batch", "activation_length", "streams", "activation_embed")


@dataclasses.dataclass(frozen=True)
class MHCConfig:
  """mHC settings (V4-Flash: hc_mult 4, hc_sinkhorn_iters 20, hc_eps 1e-6, norm_eps 1e-6).

  hc_mult: C, number of residual streams; 1 = plain residual (see module docstring).
  sinkhorn_iters: column normalisations in the Sinkhorn projection (V4: 20).
  eps: V4's ``hc_eps`` — added to pre, to the softmax, and to every Sinkhorn denominator.
  norm_eps: eps inside the rsqrt(mean(h²)) that normalises the mixing projection.
  fn_init_std: std of ``fn``; None = 1/sqrt(C·D) (fan-in).
  scale_init: initial value of the three (head: one) ``scale`` gates.
  comb_diag_init: added to the diagonal of the comb logits in ``base`` (0 = peer's init;
    > 0 starts the stream mixing closer to the identity).
  """
  hc_mult: int = 4
  sinkhorn_iters: int = 20
  eps: float = 1e-6
  norm_eps: float = 1e-6
  fn_init_std: float | None = None
  scale_init: float = 0.01
  comb_diag_init: float = 0.0

  def __post_init__(self):
    if not isinstance(self.hc_mult, int) or self.hc_mult < 1:
      raise ValueError(f"MHCConfig.hc_mult={self.hc_mult!r}; expected an int >= 1 "
                       f"(1 = plain residual, V4 uses 4)")
    if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
      raise ValueError(f"MHCConfig.sinkhorn_iters={self.sinkhorn_iters!r}; expected an "
                       f"int >= 1 (V4 uses 20)")
    if not self.eps >= 0:
      raise ValueError(f"MHCConfig.eps={self.eps!r}; expected a float >= 0 (V4: 1e-6)")
    if not self.norm_eps > 0:
      raise ValueError(f"MHCConfig.norm_eps={self.norm_eps!r}; expected a float > 0")
    if self.fn_init_std is not None and not self.fn_init_std >= 0:
      raise ValueError(f"MHCConfig.fn_init_std={self.fn_init_std!r}; expected None or a "
                       f"float >= 0")

  @property
  def n_mixes(self) -> int:
    """(2 + C)·C: C pre, C post and C² comb logits."""
    return (2 + self.hc_mult) * self.hc_mult


# ----------------------------------------------------------------------------- functions


def sinkhorn(logits: jax.Array, iters: int = 20, eps: float = 1e-6) -> jax.Array:
  """V4's Sinkhorn projection of [..., C, C] logits (fp32), rows j, columns k.

  softmax over k, + eps, column-normalise; then ``iters − 1`` x (row, column) — each
  divide is by (sum + eps). Ends on columns: columns sum to 1/(1 + eps/colsum) ≈ 1.
  """
  c = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
  c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  def body(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  # fori_loop keeps the graph small; reverse-mode through it is fine (static trip count).
  return jax.lax.fori_loop(0, iters - 1, body, c)


def hc_mixes(h_BTCD: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
  """mixes_BTM = (flatten(h) @ fnᵀ) · rsqrt(mean(flatten(h)²) + norm_eps), in fp32."""
  b, t, c, d = h_BTCD.shape
  x = h_BTCD.reshape(b, t, c * d).astype(jnp.float32)
  rs = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + norm_eps)
  # HIGHEST: on TPU/GPU a default-precision fp32 matmul may run in bf16 passes; the mixing
  # logits feed a 20-step Sinkhorn, so keep them fp32 (the matmul is tiny: M = (2+C)·C).
  mix = jnp.einsum("btk,mk->btm", x, fn.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return mix * rs


def hc_split_sinkhorn(mixes: jax.Array, scale: jax.Array, base: jax.Array, hc_mult: int,
                      sinkhorn_iters: int = 20, eps: float = 1e-6
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """V4's ``hc_split_sinkhorn``: mixes [..., (2+C)·C] -> pre [..., C], post [..., C],
  comb [..., C, C] (comb[j, k]: weight of input stream j in output stream k)."""
  c = hc_mult
  mixes = mixes.astype(jnp.float32)
  scale = scale.astype(jnp.float32)
  base = base.astype(jnp.float32)
  pre = jax.nn.sigmoid(mixes[..., :c] * scale[0] + base[:c]) + eps
  post = 2.0 * jax.nn.sigmoid(mixes[..., c:2 * c] * scale[1] + base[c:2 * c])
  logits = mixes[..., 2 * c:] * scale[2] + base[2 * c:]
  comb = sinkhorn(logits.reshape(*logits.shape[:-1], c, c), sinkhorn_iters, eps)
  return pre, post, comb


def expand(x_BTD: jax.Array, hc_mult: int) -> jax.Array:
  """Copy the embedding into C streams: x_BTD -> h_BTCD (V4: unsqueeze(2).repeat)."""
  h = jnp.broadcast_to(x_BTD[:, :, None, :],
                       (x_BTD.shape[0], x_BTD.shape[1], hc_mult, x_BTD.shape[2]))
  return sharding.constrain(h, STREAM_AXES)


def weighted_sum(h_BTCD: jax.Array, w_BTC: jax.Array) -> jax.Array:
  """x_BTD = Σ_j w_j h_j in fp32, cast back to h's dtype (V4 hc_pre / hc_head)."""
  x = jnp.einsum("btc,btcd->btd", w_BTC.astype(jnp.float32), h_BTCD.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return x.astype(h_BTCD.dtype)


def hc_post(f_BTD: jax.Array, h_BTCD: jax.Array, post_BTC: jax.Array,
            comb_BTCC: jax.Array) -> jax.Array:
  """h'_k = post_k · f + Σ_j comb[j, k] · h_j, fp32 math, result in f's dtype (V4)."""
  f = f_BTD.astype(jnp.float32)
  out = (post_BTC.astype(jnp.float32)[..., None] * f[:, :, None, :]
         + jnp.einsum("btjk,btjd->btkd", comb_BTCC.astype(jnp.float32),
                      h_BTCD.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST))
  return sharding.constrain(out.astype(f_BTD.dtype), STREAM_AXES)


# ----------------------------------------------------------------------------- modules


def _fn_init(cfg: MHCConfig, d_model: int):
  std = cfg.fn_init_std if cfg.fn_init_std is not None else (cfg.hc_mult * d_model) ** -0.5
  return jax.nn.initializers.normal(std)


class HyperConnection(nnx.Module):
  """One mHC site around a sub-layer (V4's ``hc_attn_*`` or ``hc_ffn_*``).

  Usage in a block (what V4's ``Block.forward`` does)::

      x_BTD, post_BTC, comb_BTCC = site.pre(h_BTCD)
      h_BTCD = site.post(attn(attn_norm(x_BTD)), h_BTCD, post_BTC, comb_BTCC)

  or ``h_BTCD, extra = site(h_BTCD, lambda x: attn(attn_norm(x)))``.
  Parameters (C ≥ 2 only), fp32: ``fn`` [(2+C)·C, C·D], ``base`` [(2+C)·C], ``scale`` [3].
  """

  def __init__(self, cfg: MHCConfig, d_model: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.d_model = d_model
    c = cfg.hc_mult
    if c == 1:
      return  # plain residual: no parameters (see module docstring)
    self.fn = sharding.param(_fn_init(cfg, d_model), rngs.params(),
                             (cfg.n_mixes, c * d_model), (None, None), jnp.float32)
    base = jnp.zeros((cfg.n_mixes,), jnp.float32)
    base = base.at[2 * c:].add((jnp.eye(c) * cfg.comb_diag_init).reshape(-1))
    self.base = sharding.param(lambda *_: base, rngs.params(), (cfg.n_mixes,), (None,),
                               jnp.float32)
    self.scale = sharding.param(jax.nn.initializers.constant(cfg.scale_init), rngs.params(),
                                (3,), (None,), jnp.float32)

  def mixing(self, h_BTCD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """pre_BTC, post_BTC, comb_BTCC (fp32) for the current streams."""
    b, t, c, _ = h_BTCD.shape
    self._check(h_BTCD)
    if c == 1:
      one = jnp.ones((b, t, 1), jnp.float32)
      return one, one, one[..., None]
    mixes = hc_mixes(h_BTCD, self.fn[...], self.cfg.norm_eps)
    return hc_split_sinkhorn(mixes, self.scale[...], self.base[...], c,
                             self.cfg.sinkhorn_iters, self.cfg.eps)

  def pre(self, h_BTCD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h_BTCD -> (x_BTD layer input in h's dtype, post_BTC, comb_BTCC)."""
    if self.cfg.hc_mult == 1:
      self._check(h_BTCD)
      one = jnp.ones(h_BTCD.shape[:2] + (1,), jnp.float32)
      return h_BTCD[:, :, 0, :], one, one[..., None]   # exact: no arithmetic at all
    pre, post, comb = self.mixing(h_BTCD)
    return weighted_sum(h_BTCD, pre), post, comb

  def post(self, f_BTD: jax.Array, h_BTCD: jax.Array, post_BTC: jax.Array,
           comb_BTCC: jax.Array) -> jax.Array:
    """Sub-layer output f_BTD and the streams it read -> new streams h_BTCD."""
    if self.cfg.hc_mult == 1:
      # h + f exactly (the 1·f + 1·h of the general formula, without the fp32 round trip).
      return h_BTCD + f_BTD[:, :, None, :]
    return hc_post(f_BTD, h_BTCD, post_BTC, comb_BTCC)

  def __call__(self, h_BTCD: jax.Array, branch: Callable[[jax.Array], Any]
               ) -> tuple[jax.Array, Any]:
    """Run ``branch`` (norm + sub-layer) inside this site. ``branch`` returns y_BTD or
    (y_BTD, extra); returns (new h_BTCD, extra or None)."""
    x, post, comb = self.pre(h_BTCD)
    out = branch(x)
    y, extra = (out if isinstance(out, tuple) else (out, None))
    return self.post(y, h_BTCD, post, comb), extra

  def expand(self, x_BTD: jax.Array) -> jax.Array:
    """x_BTD -> h_BTCD, the embedding copied into the C streams."""
    return expand(x_BTD, self.cfg.hc_mult)

  def _check(self, h_BTCD):
    if h_BTCD.ndim != 4 or h_BTCD.shape[2:] != (self.cfg.hc_mult, self.d_model):
      raise ValueError(f"h_BTCD.shape={h_BTCD.shape}; expected [B, T, hc_mult="
                       f"{self.cfg.hc_mult}, d_model={self.d_model}]")


class HCHead(nnx.Module):
  """Final merge of the C streams into one (V4 ``hc_head``): σ pre-weights, no Sinkhorn.

  x_BTD = Σ_j (σ(mixes_j · scale + base_j) + eps) · h_j, mixes as in ``HyperConnection``
  with ``fn`` [C, C·D]; the model's final RMSNorm and output head follow.
  Parameters (C ≥ 2 only): ``fn`` [C, C·D], ``base`` [C], ``scale`` [1], fp32.
  """

  def __init__(self, cfg: MHCConfig, d_model: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.d_model = d_model
    c = cfg.hc_mult
    if c == 1:
      return
    self.fn = sharding.param(_fn_init(cfg, d_model), rngs.params(), (c, c * d_model),
                             (None, None), jnp.float32)
    self.base = sharding.param(jax.nn.initializers.zeros, rngs.params(), (c,), (None,),
                               jnp.float32)
    self.scale = sharding.param(jax.nn.initializers.constant(cfg.scale_init), rngs.params(),
                                (1,), (None,), jnp.float32)

  def __call__(self, h_BTCD: jax.Array) -> jax.Array:
    c = self.cfg.hc_mult
    if h_BTCD.ndim != 4 or h_BTCD.shape[2:] != (c, self.d_model):
      raise ValueError(f"h_BTCD.shape={h_BTCD.shape}; expected [B, T, hc_mult={c}, "
                       f"d_model={self.d_model}]")
    if c == 1:
      return h_BTCD[:, :, 0, :]
    mixes = hc_mixes(h_BTCD, self.fn[...], self.cfg.norm_eps)
    pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.cfg.eps
    return weighted_sum(h_BTCD, pre)
