"""In-kernel building blocks shared by the three Triton kernels: key tiling, FP8
dequantisation per scale tile, the online softmax step and the epilogue.

Why tiles: Triton needs power-of-two block shapes, and the cached vector is 576 (V32) or
512 (MODEL1) wide with its FP8 scales per 128 (V32) or 64 (MODEL1) elements.  So a key is
read as a few column tiles, each exactly one scale tile of the NoPE part, plus one 64-wide
RoPE tile:

  v32 / bf16-576:     4 x 128 NoPE (fp32 scale each)  + 64 RoPE   (value: the 4 NoPE tiles)
  model1 / bf16-512:  7 x 64 NoPE (ue8m0 scale each)  + 64 RoPE   (value: all 8 tiles)

Each tile is gathered for a block of X keys (one row per key, any rows: paged, top-k, or
contiguous), dequantised *in registers* into a bf16 ``[X, w]`` operand, and used twice:
``q_tile @ k_tile.T`` (logits, fp32 accumulate, summed over tiles) and ``p @ v_tile``
(one fp32 accumulator per value tile).  Nothing dequantised is ever written to memory.
This is FlashMLA's scheme (its FP8 sparse kernels dequantise a 64-key block into shared
memory, then run bf16 MMAs); Triton decides where the bf16 tile lives.

FP8 codes arrive as uint16 pairs (``cache_view.code_words``, for 64-bit-safe offsets) and
are split into bytes in registers (``unpack_code_words``).

Invalid keys (index -1, past a length, past the sequence) are loaded with a mask (no
memory traffic on GPU) and then zeroed with a select on the dequantised tile, so their
bytes (even NaN) never reach a dot product; their logits are set to -inf by another
select.  0 * NaN would be NaN, which is why a zero probability alone is not enough.

Everything here is plain jax.numpy on Pallas refs: it runs in interpret mode on CPU and
lowers to Triton.  Letter key: M query rows of a program, X keys of a block, W tile width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import softmax
from pallas_kernels.fp8_cache import D_ROPE, e8m0_to_f32, host_value, require
from pallas_kernels.softmax import NEG_INF


@dataclasses.dataclass(frozen=True)
class Tile:
  """One column tile of the key: ``width`` columns of ref ``src`` (0 nope, 1 rope) from
  ``col``; ``scale_col`` = its scale column (FP8) or None; ``q_col`` = its offset in the
  d_qk-wide query/key; ``value`` = it is part of the first d_v dims (the value)."""
  src: int
  col: int
  width: int
  scale_col: int | None
  q_col: int
  value: bool


@dataclasses.dataclass(frozen=True)
class PackedAddress:
  """Where a token's parts sit in FlashMLA packed bytes read as uint16 words ``[R, C]``.

  Token row t is word row t // tokens_per_row; with o = t % tokens_per_row its data
  (codes, then RoPE) starts at word o * token_words and its scales at scale_word +
  o * scale_words.  v32 ``[Z*Y, 328]``: one token per row, RoPE at word 264, 4 fp32
  scales at words 256-263.  model1 ``[Z, block/2]``: Y tokens per row of 288 data words,
  RoPE at word 224, 7 ue8m0 scale bytes at word Y*288 + o*4."""
  tokens_per_row: int
  token_words: int
  rope_word: int
  scale_word: int
  scale_words: int


@dataclasses.dataclass(frozen=True)
class KeyLayout:
  fmt: str                        # "v32" | "model1" | "bf16"
  d_qk: int
  d_v: int
  tiles: tuple[Tile, ...]
  packed: PackedAddress | None = None

  @property
  def value_tiles(self) -> tuple[Tile, ...]:
    return tuple(t for t in self.tiles if t.value)


def key_layout(fmt: str, d_qk: int, d_v: int, rope_col: int = 0,
               packed: PackedAddress | None = None) -> KeyLayout:
  """Tiling of a ``d_qk``-wide key whose first ``d_v`` dims are the value.

  ``rope_col``: column of the RoPE part inside the rope ref (0 for a KCache, whose rope is
  its own array; d_qk - 64 when one bf16 array holds the whole key and is passed twice).
  """
  require(d_qk in (576, 512), f"d_qk={d_qk}: the kernels support 576 (v32) or 512 (model1)")
  d_nope = d_qk - D_ROPE
  width = 128 if d_qk == 576 else 64                   # = the FP8 scale tile of the geometry
  require(d_v in (d_nope, d_qk),
          f"head_dim_v (d_v)={d_v}: the Pallas kernels need whole key tiles for the value: "
          f"{d_nope} (the NoPE part) or {d_qk} (the whole key)")
  scaled = fmt != "bf16"
  tiles = [Tile(0, i * width, width, i if scaled else None, i * width, i * width < d_v)
           for i in range(d_nope // width)]
  tiles.append(Tile(1, rope_col, D_ROPE, None, d_nope, d_v == d_qk))
  return KeyLayout(fmt, d_qk, d_v, tuple(tiles), packed)


class KeyRefs(NamedTuple):
  """Refs of one cache as the kernel sees it, every array flattened to ``[rows, C]``."""
  nope: Any
  rope: Any
  scales: Any                     # None for bf16


def unpack_code_words(words_XH: jax.Array) -> jax.Array:
  """Inverse of ``code_words`` on a loaded tile: uint16 ``[X, W/2]`` -> fp8 ``[X, W]``
  (a 2-way join, which Triton lowers to ``tt.join``; little-endian as the bitcast)."""
  lo = (words_XH & 0xFF).astype(jnp.uint8)
  hi = (words_XH >> 8).astype(jnp.uint8)
  x, h = words_XH.shape
  codes_XW = jnp.stack([lo, hi], axis=-1).reshape(x, 2 * h)
  return jax.lax.bitcast_convert_type(codes_XW, jnp.float8_e4m3fn)


def dequant(codes_XW: jax.Array, scale_X: jax.Array, fmt: str) -> jax.Array:
  """One scale tile of keys -> bf16: v32 bf16(fp32(q)*s); model1 bf16(bf16(q)*bf16(s))."""
  if fmt == "v32":
    return (codes_XW.astype(jnp.float32) * scale_X[:, None]).astype(jnp.bfloat16)
  s_X = e8m0_to_f32(scale_X).astype(jnp.bfloat16)      # 2^k: exact in bf16
  return codes_XW.astype(jnp.bfloat16) * s_X[:, None]


def load_keys(layout: KeyLayout, refs: KeyRefs, rows_X: jax.Array, valid_X: jax.Array):
  """Gather and dequantise X keys -> list of bf16 ``[X, w]`` tiles, zero at invalid keys.

  rows_X (token rows) must already be in range (callers clamp invalid ones to 0): the
  loads are masked, but interpret mode reads them, and the select below is what makes
  the zeros exact."""
  if layout.packed is not None:
    return _load_packed_keys(layout, refs.nope, rows_X, valid_X)
  tiles = []
  for t in layout.tiles:
    ref = refs.nope if t.src == 0 else refs.rope
    if ref.dtype == jnp.uint16:                           # fp8 codes in uint16 pairs
      cols_1H = jax.lax.broadcasted_iota(jnp.int32, (1, t.width // 2), 1) + t.col // 2
      raw_XW = unpack_code_words(plgpu.load(ref.at[rows_X[:, None], cols_1H],
                                            mask=valid_X[:, None]))
    else:
      cols_1W = jax.lax.broadcasted_iota(jnp.int32, (1, t.width), 1) + t.col
      raw_XW = plgpu.load(ref.at[rows_X[:, None], cols_1W], mask=valid_X[:, None])
    k_XW = raw_XW                                        # bf16 cache, or the RoPE tile
    if t.scale_col is not None:
      scale_X = plgpu.load(refs.scales.at[rows_X, t.scale_col], mask=valid_X)
      k_XW = dequant(raw_XW, scale_X, layout.fmt)
    tiles.append(jnp.where(valid_X[:, None], k_XW, jnp.zeros_like(k_XW)))
  return tiles


def _load_packed_keys(layout: KeyLayout, words_ref, rows_X, valid_X):
  """``load_keys`` straight from FlashMLA packed bytes (uint16 words, ``PackedAddress``):
  codes split into bytes, RoPE words bitcast to bf16, fp32 scales joined from two words,
  ue8m0 scales picked out of one."""
  a = layout.packed
  r_X = rows_X // a.tokens_per_row
  o_X = rows_X % a.tokens_per_row
  data_X = o_X * a.token_words
  scale_X0 = a.scale_word + o_X * a.scale_words
  load = lambda cols, mask: plgpu.load(words_ref.at[r_X[:, None] if cols.ndim == 2 else r_X, cols],
                                       mask=mask)
  tiles = []
  for t in layout.tiles:
    w = t.width if t.src == 1 else t.width // 2
    cols_XW = data_X[:, None] + jax.lax.broadcasted_iota(jnp.int32, (1, w), 1) + (
        a.rope_word if t.src == 1 else t.col // 2)
    words_XW = load(cols_XW, valid_X[:, None])
    if t.src == 1:
      tiles.append(jnp.where(valid_X[:, None],
                             jax.lax.bitcast_convert_type(words_XW, jnp.bfloat16),
                             jnp.zeros((rows_X.shape[0], w), jnp.bfloat16)))
      continue
    if layout.fmt == "v32":                               # fp32 = low word | high word << 16
      lo = load(scale_X0 + 2 * t.scale_col, valid_X).astype(jnp.uint32)
      hi = load(scale_X0 + 2 * t.scale_col + 1, valid_X).astype(jnp.uint32)
      scale = jax.lax.bitcast_convert_type(lo | (hi << 16), jnp.float32)
    else:                                                 # ue8m0 byte k of the token's 8
      word = load(scale_X0 + t.scale_col // 2, valid_X)
      scale = ((word >> (8 * (t.scale_col % 2))) & 0xFF).astype(jnp.uint8)
    k_XW = dequant(unpack_code_words(words_XW), scale, layout.fmt)
    tiles.append(jnp.where(valid_X[:, None], k_XW, jnp.zeros_like(k_XW)))
  return tiles


def load_q(layout: KeyLayout, q_ref) -> list[jax.Array]:
  """The program's query block ``[M, d_qk]`` as bf16 tiles matching the key tiles."""
  return [q_ref[:, pl.ds(t.q_col, t.width)] for t in layout.tiles]


class SoftmaxState(NamedTuple):
  m_M: jax.Array                  # running max of the scaled logits (-inf: nothing yet)
  l_M: jax.Array                  # running sum of exp(logit - m), fp32
  acc: tuple                      # per value tile: fp32 [M, w], sum of p * v (unnormalised)


def init_state(layout: KeyLayout, m: int) -> SoftmaxState:
  m_M, l_M = softmax.online_init(m)
  return SoftmaxState(m_M, l_M,
                      tuple(jnp.zeros((m, t.width), jnp.float32) for t in layout.value_tiles))


def _dot_nt(a_MW, b_XW):
  return jax.lax.dot_general(a_MW, b_XW, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def softmax_step(layout: KeyLayout, state: SoftmaxState, q_tiles, k_tiles,
                 visible_MX: jax.Array, scale) -> SoftmaxState:
  """One block of keys of the online softmax (``softmax.online_step``).

  Logits are fp32 (bf16 x bf16 products, fp32 accumulation); P is rounded to bf16 before
  the PV product, as in FlashMLA; the running sum l uses the fp32 P."""
  s_MX = _dot_nt(q_tiles[0], k_tiles[0])
  for q_t, k_t in zip(q_tiles[1:], k_tiles[1:]):
    s_MX = s_MX + _dot_nt(q_t, k_t)
  s_MX = jnp.where(visible_MX, s_MX * scale, NEG_INF)
  m_new, alpha_M, p_MX, l_M = softmax.online_step(state.m_M, state.l_M, s_MX)
  p_MX = p_MX.astype(jnp.bfloat16)
  vi = [i for i, t in enumerate(layout.tiles) if t.value]
  acc = tuple(a * alpha_M[:, None] + jnp.dot(p_MX, k_tiles[i], preferred_element_type=jnp.float32)
              for a, i in zip(state.acc, vi))
  return SoftmaxState(m_new, l_M, acc)


def epilogue(state: SoftmaxState, sink_M: jax.Array | None, final: bool):
  """Normalise (``softmax.online_finish``).  Returns (value tiles, lse [M]).

  final=True (the whole key set was seen): the sink and FlashMLA's empty-row rule
  (out 0, lse +inf).  final=False (a split-KV partial): out = acc / l, lse = -inf for an
  empty part; ``combine.combine_splits`` merges them."""
  factor_M, lse_M = softmax.online_finish(state.m_M, state.l_M, sink_M, final)
  return [a * factor_M[:, None] for a in state.acc], lse_M


def store_value_tiles(layout: KeyLayout, o_ref, tiles) -> None:
  """Write value tiles into ``o_ref [M, d_v]`` column slices (value tiles are a prefix)."""
  for t, v in zip(layout.value_tiles, tiles):
    o_ref[:, pl.ds(t.q_col, t.width)] = v.astype(o_ref.dtype)


def default_interpret(interpret: bool | None) -> bool:
  """Interpret on CPU (no Triton there) unless told otherwise."""
  require(interpret is None or isinstance(interpret, bool),
          f"interpret={interpret!r}: expected None, True or False")
  return jax.default_backend() == "cpu" if interpret is None else interpret


def check_scale(name: str, scale):
  """A softmax scale: a Python number or a scalar float array; finite and > 0 when concrete."""
  require(isinstance(scale, (int, float)) and not isinstance(scale, bool)
          or (hasattr(scale, "shape") and scale.shape == () and hasattr(scale, "dtype")
              and jnp.issubdtype(scale.dtype, jnp.floating)),
          f"{name}={scale!r}: expected a positive float (or a scalar float array)")
  value = host_value(scale)
  if value is not None:
    require(bool(np.isfinite(value)) and float(value) > 0,
            f"{name}={float(value)!r}: expected a finite value > 0")
  return scale


def split_range(n_chunks, split, num_splits: int):
  """Chunks [c0, c1) of split ``split`` when n_chunks are dealt out in equal runs."""
  per = (n_chunks + num_splits - 1) // num_splits
  c0 = jnp.minimum(split * per, n_chunks)
  return c0, jnp.minimum(c0 + per, n_chunks)


