"""Engram: conditional memory by hashed n-gram lookup (DeepSeek, arXiv 2601.07372).

A transformer layer with Engram looks up a static memory keyed by the last N tokens and
lets the current hidden state decide, per residual stream, how much of it to add. This
file is the device side; hashing is host-side numpy in ``model1.engram_hash`` (the config
``EngramConfig`` and ``NgramHashMapping`` live there and are re-exported here). It follows
deepseek-ai/Engram ``engram_demo_v1.py`` op for op:

  e      = concat over the A hash heads of table[offset_a + hash_a]       [B, T, A*H]
  k_c    = RMSNorm_c(W_k,c e + b_k,c)      q_c = RMSNorm_c(h_c)          per stream c
  α_c    = σ(signed_sqrt(<k_c, q_c> / √D)),  signed_sqrt(g) = sign(g)·√max(|g|, 1e-6)
  u_c    = α_c · (W_v e + b_v)                                             [B, T, C, D]
  delta  = u + SiLU(depthwise_causal_conv(RMSNorm_c(u_c)))   kernel 4, dilation N

``Engram.__call__`` returns ``delta``, the value the demo's block adds to the residual
(``h = engram(h, ids) + h``); the caller does the add, before attention. C residual
streams are the mHC streams (C = 1 without mHC); the value projection is shared across
streams and only the gate is per stream.

Host-memory table (``cfg.host_table``): the embedding table is created in ``pinned_host``
memory and gathered under ``compute_on('device_host')`` (XLA refuses a gather that mixes
host and device operands, so the row ids are moved to the host first and only the
gathered rows [B, T, A, H] come back to the device). Training such a table must not build
a table-sized gradient on the device, so the table is left out of autodiff: the train step
gathers ``e = engram.lookup(ids)``, differentiates the loss w.r.t. ``e`` (passed back as
``embeddings_BTAH=``), and ``row_sparse_adam_update`` applies AdamW to the touched rows
only. Its moments m, v are table-shaped and live in pinned host memory beside the table;
the update gathers, updates and scatters just the U touched rows on the host ("lazy"
Adam: an untouched row keeps its moments and its value, so rows differ from dense Adam
once they have momentum; the step count is global). Exclude the table from the dense
optimiser with ``ENGRAM_TABLE_FILTER``.

Shape letters (the project's key, plus): A hash heads per layer = (N-1)·n_head_per_ngram,
H width of one head's rows (n_embed_per_ngram / n_head_per_ngram), R table rows,
U touched rows in a sparse update, S conv history positions = (kernel_size-1)·N.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.compute_on import compute_on

from model1 import sharding
from model1.engram_hash import (CompressedTokenizer, EngramConfig, NgramHashMapping,  # noqa: F401
                                demo_normalizer, head_sizes, row_offsets, table_rows,
                                unique_rows)

HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device


class RowSparseMoment(nnx.Variable):
  """Row-sparse Adam state of a host-resident table (m, v beside it; the step count)."""


# Selects Engram tables (to leave them out of the dense optimiser and of jax.grad).
ENGRAM_TABLE_FILTER = nnx.All(nnx.Param, nnx.PathContains("multi_head_embedding"))
# A host-table model: what the dense optimiser and autodiff see, and what they never touch.
HOST_TABLE_TRAINABLE = nnx.All(nnx.Param, nnx.Not(ENGRAM_TABLE_FILTER))
HOST_TABLE_STATE = nnx.Any(ENGRAM_TABLE_FILTER, RowSparseMoment)


def in_host_memory(x: jax.Array) -> bool:
  """True when ``x`` (array or tracer) lives in host memory."""
  return getattr(jax.typeof(x), "memory_space", None) == HOST


def _torch_linear_init(fan_in: int):
  # PyTorch nn.Linear default (weight and bias): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """PyTorch nn.RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


@jax.jit
def _gather_on_host(table_RH: jax.Array, rows: jax.Array) -> jax.Array:
  rows_h = jax.device_put(rows, HOST)
  # mode="clip": the bounds check of mode="fill" builds device-typed constants that
  # XLA refuses to mix with host operands; ids are in range by construction.
  take = compute_on(lambda t, r: jnp.take(t, r, axis=0, mode="clip"),
                    compute_type="device_host", out_memory_spaces=HOST)
  return jax.device_put(take(table_RH, rows_h), DEVICE)


def gather_rows(table_RH: jax.Array, rows: jax.Array) -> jax.Array:
  """table[rows] in device memory, gathering on the host when the table lives there."""
  if in_host_memory(table_RH):
    return _gather_on_host(table_RH, rows)
  return jnp.take(table_RH, rows, axis=0, mode="clip")


class MultiHeadEmbedding(nnx.Module):
  """One table for all A heads of a layer; head a owns rows [offsets[a], offsets[a]+p_a)."""

  def __init__(self, list_of_N: list[int], D: int, rngs: nnx.Rngs, host_table: bool = False,
               param_dtype=jnp.float32):
    self.offsets = tuple(int(o) for o in np.cumsum([0] + list(list_of_N[:-1])))  # static
    self.num_rows = int(sum(list_of_N))
    init = jax.nn.initializers.normal(1.0)  # PyTorch nn.Embedding default N(0, 1)
    if host_table:
      base = init
      init = lambda k, s, d: jax.device_put(base(k, s, d), HOST)  # noqa: E731
    self.embedding = sharding.param(init, rngs.params(), (self.num_rows, D),
                                    ("engram_rows", "engram_dim"), param_dtype)
    if host_table:
      # Read by whoever builds shardings (NamedSharding(..., memory_kind=...)).
      self.embedding.set_metadata("memory_kind", "pinned_host")
      zeros = lambda: jax.device_put(jnp.zeros((self.num_rows, D), jnp.float32), HOST)  # noqa: E731
      meta = dict(logical_axes=("engram_rows", "engram_dim"), memory_kind="pinned_host")
      self.adam_mu = RowSparseMoment(zeros(), **meta)
      self.adam_nu = RowSparseMoment(zeros(), **meta)
      self.adam_count = RowSparseMoment(jnp.zeros((), jnp.int32))

  def row_ids(self, hash_ids_BTA: jax.Array) -> jax.Array:
    return hash_ids_BTA.astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)

  def __call__(self, hash_ids_BTA: jax.Array) -> jax.Array:
    return gather_rows(self.embedding[...], self.row_ids(hash_ids_BTA))

  def sparse_update(self, rows_BTA: np.ndarray, grad_BTAH: jax.Array, learning_rate,
                    weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, bucket: int | None = 1024) -> None:
    """Host table: AdamW on the rows ``rows_BTA`` (global row ids, host numpy) only, in
    place, with the moments held here (so checkpoints carry them)."""
    rows_U, inverse = unique_rows(rows_BTA, self.num_rows, bucket)
    state = RowSparseAdamState(self.adam_mu.get_value(), self.adam_nu.get_value(),
                               self.adam_count.get_value())
    table, state = row_sparse_adam_update(
        self.embedding.get_value(), state, jnp.asarray(rows_U), jnp.asarray(inverse),
        grad_BTAH, learning_rate, weight_decay, b1=b1, b2=b2, eps=eps)
    self.embedding.set_value(table)
    self.adam_mu.set_value(state.mu)
    self.adam_nu.set_value(state.nu)
    self.adam_count.set_value(state.count)


class ShortConv(nnx.Module):
  """The demo's ShortConv: per-stream RMSNorm, depthwise causal conv over time (kernel K,
  dilation N), SiLU. ``conv`` [K, C, D]: tap k multiplies x[t - (K-1-k)·dilation]
  (PyTorch's Conv1d weight [C·D, 1, K] with channel c·D + d, transposed)."""

  def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int,
               rngs: nnx.Rngs, norm_eps: float = 1e-5, zero_init: bool = True,
               param_dtype=jnp.float32):
    self.kernel_size, self.dilation, self.norm_eps = kernel_size, dilation, norm_eps
    self.norms = sharding.param(_ones, rngs.params(), (hc_mult, hidden_size),
                                (None, "embed"), param_dtype)
    # PyTorch Conv1d default for a depthwise kernel: fan_in = kernel_size.
    init = jax.nn.initializers.zeros if zero_init else _torch_linear_init(kernel_size)
    self.conv = sharding.param(init, rngs.params(), (kernel_size, hc_mult, hidden_size),
                               (None, None, "embed"), param_dtype)

  @property
  def history(self) -> int:
    """S: past inputs one output needs, (K-1)·dilation."""
    return (self.kernel_size - 1) * self.dilation

  def __call__(self, x_BTCD: jax.Array, hist_BSCD: jax.Array,
               segment_ids_BT: jax.Array | None = None,
               end_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(SiLU(conv(RMSNorm(x))), new history). ``hist_BSCD`` holds the normalised inputs
    of the S positions before x (zeros at the sequence start = the demo's zero padding).
    With ``segment_ids_BT`` (packed documents) a tap that reaches into another document
    reads zero, exactly as at a sequence start. ``end_B`` (right-padded prompts of
    different lengths) takes each row's history just before position ``end_B[b]``
    instead of after the last position."""
    T = x_BTCD.shape[1]
    xn_BTCD = _rms_norm(x_BTCD, self.norms[...].astype(jnp.float32), self.norm_eps)
    xs_BLCD = jnp.concatenate([hist_BSCD.astype(jnp.float32), xn_BTCD], axis=1)
    w_KCD = self.conv[...].astype(jnp.float32)
    if segment_ids_BT is not None:
      S = self.history
      seg_BL = jnp.concatenate([jnp.full((segment_ids_BT.shape[0], S), -1,
                                         segment_ids_BT.dtype), segment_ids_BT], axis=1)
    taps = []
    for k in range(self.kernel_size):
      tap = xs_BLCD[:, k * self.dilation: k * self.dilation + T]
      if segment_ids_BT is not None and k < self.kernel_size - 1:
        same = seg_BL[:, k * self.dilation: k * self.dilation + T] == segment_ids_BT
        tap = jnp.where(same[:, :, None, None], tap, 0.0)
      taps.append(w_KCD[k] * tap)
    y_BTCD = sum(taps)
    if end_B is None:
      new_hist = xs_BLCD[:, xs_BLCD.shape[1] - self.history:]
    else:  # x position t sits at xs index t + S, so the S inputs before end are [end, end+S)
      idx_BS = end_B[:, None] + jnp.arange(self.history)
      new_hist = jnp.take_along_axis(xs_BLCD, idx_BS[:, :, None, None], axis=1)
    return jax.nn.silu(y_BTCD), new_hist


class Engram(nnx.Module):
  """Engram block for layer ``layer_id`` (must be in ``cfg.layer_ids``).

  Parameters (demo names): ``multi_head_embedding.embedding`` [R, H]; ``value_proj_weight``
  [A·H, D] and ``value_proj_bias`` [D]; ``key_projs_weight`` [A·H, C, D] and
  ``key_projs_bias`` [C, D] (one key projection per stream, stacked); ``norm1`` (keys) and
  ``norm2`` (queries) [C, D]; ``short_conv``. Weights are stored [in, out].
  """

  def __init__(self, cfg: EngramConfig, d_model: int, hc_mult: int, rngs: nnx.Rngs, *,
               layer_id: int, param_dtype=jnp.float32):
    if layer_id not in cfg.layer_ids:
      raise ValueError(f"layer_id={layer_id}; expected one of EngramConfig.layer_ids="
                       f"{cfg.layer_ids}")
    if hc_mult < 1:
      raise ValueError(f"hc_mult={hc_mult}; expected >= 1 residual streams")
    self.cfg, self.layer_id, self.d_model, self.hc_mult = cfg, layer_id, d_model, hc_mult
    self.gate_norm_eps = (float(jnp.finfo(jnp.float32).eps) if cfg.gate_norm_eps is None
                          else cfg.gate_norm_eps)
    sizes = [p for s in head_sizes(cfg)[layer_id] for p in s]
    self.multi_head_embedding = MultiHeadEmbedding(sizes, cfg.head_dim, rngs,
                                                   cfg.host_table, param_dtype)
    F = cfg.engram_hidden_size  # A·H
    init = _torch_linear_init(F)
    p = lambda i, shape, axes: sharding.param(i, rngs.params(), shape, axes, param_dtype)  # noqa: E731
    self.value_proj_weight = p(init, (F, d_model), ("engram_dim", "embed"))
    self.value_proj_bias = p(init, (d_model,), ("embed",))
    self.key_projs_weight = p(init, (F, hc_mult, d_model), ("engram_dim", None, "embed"))
    self.key_projs_bias = p(init, (hc_mult, d_model), (None, "embed"))
    self.norm1 = p(_ones, (hc_mult, d_model), (None, "embed"))
    self.norm2 = p(_ones, (hc_mult, d_model), (None, "embed"))
    self.short_conv = ShortConv(d_model, cfg.kernel_size, cfg.max_ngram_size, hc_mult, rngs,
                                cfg.conv_norm_eps, cfg.conv_zero_init, param_dtype)

  # --- memory ------------------------------------------------------------------------
  def lookup(self, hash_ids_BTA: jax.Array) -> jax.Array:
    """Hash ids [B, T, A] -> gathered rows e [B, T, A, H] in device memory."""
    return self.multi_head_embedding(jnp.asarray(hash_ids_BTA))

  def row_ids(self, hash_ids_BTA) -> np.ndarray:
    """Host numpy: global table rows [B, T, A] (for ``unique_rows``)."""
    return np.asarray(hash_ids_BTA, np.int64) + np.asarray(self.multi_head_embedding.offsets)

  # --- forward -----------------------------------------------------------------------
  def init_state(self, batch: int) -> jax.Array:
    """Conv history for ``decode_step``: zeros [B, S, C, D] (float32)."""
    return jnp.zeros((batch, self.short_conv.history, self.hc_mult, self.d_model),
                     jnp.float32)

  def decode_step(self, h_BTCD: jax.Array, hash_ids_BTA: jax.Array | None,
                  state_BSCD: jax.Array, *, embeddings_BTAH: jax.Array | None = None,
                  segment_ids_BT: jax.Array | None = None,
                  end_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """T new positions (T >= 1) given the conv history; returns (delta, new state).
    Chained calls equal one ``__call__`` over the concatenation. ``end_B``: a prefill of
    right-padded rows returns each row's state at its own length (``ShortConv``)."""
    if h_BTCD.ndim != 4 or h_BTCD.shape[2:] != (self.hc_mult, self.d_model):
      raise ValueError(f"h has shape {h_BTCD.shape}; expected [B, T, hc_mult="
                       f"{self.hc_mult}, d_model={self.d_model}]")
    e_BTAH = self.lookup(hash_ids_BTA) if embeddings_BTAH is None else embeddings_BTAH
    B, T = h_BTCD.shape[:2]
    e_BTF = e_BTAH.reshape(B, T, -1).astype(jnp.float32)
    h32 = h_BTCD.astype(jnp.float32)
    D = self.d_model
    # Gate: each stream's hidden state scores the memory key (the demo's per-stream loop).
    k_BTCD = (jnp.einsum("btf,fcd->btcd", e_BTF, self.key_projs_weight[...].astype(jnp.float32))
              + self.key_projs_bias[...].astype(jnp.float32))
    k_BTCD = _rms_norm(k_BTCD, self.norm1[...].astype(jnp.float32), self.gate_norm_eps)
    q_BTCD = _rms_norm(h32, self.norm2[...].astype(jnp.float32), self.gate_norm_eps)
    g_BTC = jnp.sum(k_BTCD * q_BTCD, axis=-1) / math.sqrt(D)
    # Signed square root compresses the logit so the sigmoid does not saturate.
    g_BTC = jnp.sqrt(jnp.maximum(jnp.abs(g_BTC), 1e-6)) * jnp.sign(g_BTC)
    alpha_BTC = jax.nn.sigmoid(g_BTC)
    v_BTD = e_BTF @ self.value_proj_weight[...].astype(jnp.float32) \
        + self.value_proj_bias[...].astype(jnp.float32)
    u_BTCD = alpha_BTC[..., None] * v_BTD[:, :, None, :]
    conv_BTCD, state_BSCD = self.short_conv(u_BTCD, state_BSCD, segment_ids_BT, end_B)
    delta_BTCD = (u_BTCD + conv_BTCD).astype(h_BTCD.dtype)
    delta_BTCD = sharding.constrain(delta_BTCD, ("batch", "activation_length", None,
                                                 "activation_embed"))
    return delta_BTCD, state_BSCD

  def __call__(self, h_BTCD: jax.Array, hash_ids_BTA: jax.Array | None = None, *,
               embeddings_BTAH: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, T, C, D] and hash ids [B, T, A] (or pre-gathered ``embeddings``
    [B, T, A, H]) -> delta [B, T, C, D], to be added to h by the caller."""
    delta, _ = self.decode_step(h_BTCD, hash_ids_BTA, self.init_state(h_BTCD.shape[0]),
                                embeddings_BTAH=embeddings_BTAH,
                                segment_ids_BT=segment_ids_BT)
    return delta


# ---------------------------------------------------------------------------------------
# Row-sparse AdamW for the (host-resident) table
# ---------------------------------------------------------------------------------------

class RowSparseAdamState(NamedTuple):
  mu: jax.Array       # [R, H] first moment, same memory kind as the table
  nu: jax.Array       # [R, H] second moment
  count: jax.Array    # [] int32 global step


def init_row_sparse_adam(table_RH: jax.Array) -> RowSparseAdamState:
  """Zero moments placed like the table. They are built in numpy and copied straight
  to the table's memory, so a host table's moments never touch device memory."""
  zeros = np.zeros(table_RH.shape, np.float32)
  return RowSparseAdamState(jax.device_put(zeros, table_RH.sharding),
                            jax.device_put(zeros, table_RH.sharding),
                            jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("b1", "b2", "eps"))
def row_sparse_adam_update(table_RH: jax.Array, state: RowSparseAdamState,
                           rows_U: jax.Array, inverse: jax.Array, grad_BTAH: jax.Array,
                           learning_rate: jax.Array | float, weight_decay: float = 0.0,
                           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                           ) -> tuple[jax.Array, RowSparseAdamState]:
  """AdamW (optax.adamw's formula: eps outside the sqrt, decoupled weight decay) on the
  rows ``rows_U`` only. ``rows_U``/``inverse`` come from ``unique_rows(engram.row_ids(
  hash_ids), R)``; ``grad_BTAH`` is d loss / d embeddings. Gradients of a row hit several
  times are summed on the device ([U, H], small) first; everything table-shaped runs
  where the table lives (host: under compute_on). Table and moments are donated."""
  U = rows_U.shape[0]
  H = grad_BTAH.shape[-1]
  g_UH = jax.ops.segment_sum(grad_BTAH.reshape(-1, H).astype(jnp.float32), inverse,
                             num_segments=U)
  count = state.count + 1
  host = in_host_memory(table_RH)
  step = count.astype(jnp.float32)
  lr = jnp.asarray(learning_rate, jnp.float32)
  wd = jnp.asarray(weight_decay, jnp.float32)
  rows = rows_U.astype(jnp.int32)
  if host:
    g_UH, step, lr, wd, rows = (jax.device_put(x, HOST) for x in (g_UH, step, lr, wd, rows))

  def update(table_RH, mu, nu, g_UH, step, lr, wd, rows):
    # Padding rows (index R) read the clipped last row and are dropped by the scatter.
    m = mu.at[rows].get(mode="clip") * b1 + (1 - b1) * g_UH
    v = nu.at[rows].get(mode="clip") * b2 + (1 - b2) * g_UH * g_UH
    p = table_RH.at[rows].get(mode="clip").astype(jnp.float32)
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    p = p - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * p)
    return (table_RH.at[rows].set(p.astype(table_RH.dtype), mode="drop"),
            mu.at[rows].set(m, mode="drop"), nu.at[rows].set(v, mode="drop"))

  if host:  # everything table-shaped stays in host memory and runs there
    update = compute_on(update, compute_type="device_host", out_memory_spaces=HOST)
  table_RH, mu, nu = update(table_RH, state.mu, state.nu, g_UH, step, lr, wd, rows)
  return table_RH, RowSparseAdamState(mu, nu, count)


def apply_row_sparse_adam(engram: Engram, state: RowSparseAdamState, hash_ids_BTA,
                          grad_BTAH: jax.Array, learning_rate: float,
                          weight_decay: float = 0.0, bucket: int | None = 1024
                          ) -> RowSparseAdamState:
  """Convenience (eager, host side): de-duplicate rows, update ``engram``'s table in place
  and return the new optimiser state."""
  param = engram.multi_head_embedding.embedding
  rows_U, inverse = unique_rows(engram.row_ids(hash_ids_BTA), param.shape[0], bucket)
  table, state = row_sparse_adam_update(param.get_value(), state, jnp.asarray(rows_U),
                                        jnp.asarray(inverse), grad_BTAH, learning_rate,
                                        weight_decay)
  param.set_value(table)
  return state
