"""Engram's host-side hashing: token ids -> compressed ids -> n-gram hash ids (numpy int64).

Engram (DeepSeek, "Conditional Memory via Scalable Lookup", arXiv 2601.07372; reference code
deepseek-ai/Engram ``engram_demo_v1.py``) gives chosen layers a table lookup keyed by the
last N tokens. Everything here runs on the host in numpy int64 and is bit-exact with the
demo for the same tokenizer, seed, ``engram_vocab_size`` and n-gram settings:

1. ``CompressedTokenizer``: every token id is decoded alone, normalised by the demo's
   normaliser sequence (NFKC, NFD, StripAccents, Lowercase, whitespace runs -> " ", and
   the sentinel trick that keeps a lone " " alive through ``Strip``), and tokens with the
   same key share one compressed id ("Hello", " hello" and "HELLO" become one id). A
   decoded text containing U+FFFD (a partial UTF-8 byte) is keyed by its raw token string
   instead, so distinct byte tokens stay distinct. An empty normal form falls back to the
   text itself (``key = norm or text``).
2. Per layer, ``max_ngram_size`` odd multipliers from ``np.random.default_rng(seed +
   10007 * layer_id)``, drawn below half of int64_max // compressed_vocab so products
   of valid ids never overflow.
3. For n = 2..N: mix = (x_t m_0) XOR (x_{t-1} m_1) XOR ... XOR (x_{t-n+1} m_{n-1}), with
   positions before the start filled by the compressed pad id; head j of order n takes
   mix mod p_{n,j}.
4. The moduli p are distinct primes: the first head of (layer, n) takes the smallest prime
   >= engram_vocab_size[n-2] not used yet, each next head the next unused prime strictly
   above the previous one; one used-set is shared across all layers in ``layer_ids`` order.
5. A layer's heads share one embedding table; head a's rows start at offsets[a] =
   p_0 + ... + p_{a-1} (``row_offsets``).

Shapes: B batch, T positions, A = (N-1) * n_head_per_ngram hash heads per layer,
S = N-1 positions of n-gram history kept for incremental hashing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from tokenizers import Regex, normalizers

PRIME_1 = 10007               # the demo's per-layer seed stride
SENTINEL = "\uE000"           # private-use char protecting a lone " " through Strip
INT32_MAX = 2**31 - 1         # hash ids / table rows travel to the device as int32


def demo_normalizer() -> normalizers.Sequence:
  """The demo's normaliser sequence, verbatim (order matters: NFKC before NFD)."""
  return normalizers.Sequence([
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), SENTINEL),
      normalizers.Strip(),
      normalizers.Replace(SENTINEL, " "),
  ])


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Engram settings; field names follow the demo's ``EngramConfig``.

  engram_vocab_size: per n-gram order (n = 2..N) the smallest modulus of a head (the table
    budget knob: a layer's table has about (N-1) * n_head_per_ngram * size rows; see
    ``vocab_sizes_for_budget``).
  n_embed_per_ngram: width of one order's embedding, split evenly over its heads.
  layer_ids: the blocks (0-based) that carry an Engram module.
  pad_id: raw token id used before the sequence start (mapped through the compressed table).
  kernel_size: taps of the short causal conv; its dilation is max_ngram_size.
  conv_norm_eps: the ShortConv RMSNorm eps (demo: 1e-5). gate_norm_eps: the key/query
    RMSNorm eps; None = float32 machine eps (PyTorch ``nn.RMSNorm(eps=None)``, as the demo).
  conv_zero_init: start the conv kernel at zero so the conv branch is silent at init (the
    paper's choice, also MaxText's); False = the demo's PyTorch default uniform init.
  host_table: keep the embedding table (and its row-sparse Adam moments) in pinned host
    memory and gather on the host (see ``model1.engram``).
  """
  engram_vocab_size: tuple[int, ...] = (129280 * 5, 129280 * 5)
  max_ngram_size: int = 3
  n_embed_per_ngram: int = 512
  n_head_per_ngram: int = 8
  layer_ids: tuple[int, ...] = (1, 15)
  pad_id: int = 2
  seed: int = 0
  kernel_size: int = 4
  conv_norm_eps: float = 1e-5
  gate_norm_eps: float | None = None
  conv_zero_init: bool = True
  host_table: bool = False

  def __post_init__(self):
    # Lists from config files become tuples so the config stays hashable (prime cache key).
    for name in ("engram_vocab_size", "layer_ids"):
      value = getattr(self, name)
      if not isinstance(value, (list, tuple)):
        raise ValueError(f"EngramConfig.{name}={value!r}; expected a list or tuple of ints")
      object.__setattr__(self, name, tuple(int(v) for v in value))
    n = self.max_ngram_size
    if not isinstance(n, int) or n < 2:
      raise ValueError(f"EngramConfig.max_ngram_size={n!r}; expected an int >= 2 "
                       "(Engram hashes n-grams for n = 2..max_ngram_size)")
    if len(self.engram_vocab_size) != n - 1:
      raise ValueError(f"EngramConfig.engram_vocab_size={self.engram_vocab_size!r} has "
                       f"{len(self.engram_vocab_size)} entries; expected max_ngram_size-1 = "
                       f"{n - 1} (one per n-gram order 2..{n})")
    for i, size in enumerate(self.engram_vocab_size):
      if size < 1:
        raise ValueError(f"EngramConfig.engram_vocab_size[{i}]={size}; expected >= 1")
    if self.n_head_per_ngram < 1:
      raise ValueError(f"EngramConfig.n_head_per_ngram={self.n_head_per_ngram!r}; "
                       "expected an int >= 1")
    if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
      raise ValueError(f"EngramConfig.n_embed_per_ngram={self.n_embed_per_ngram!r}; expected"
                       f" a positive multiple of n_head_per_ngram={self.n_head_per_ngram}")
    if not self.layer_ids:
      raise ValueError("EngramConfig.layer_ids=(); expected at least one layer id")
    if len(set(self.layer_ids)) != len(self.layer_ids):
      raise ValueError(f"EngramConfig.layer_ids={self.layer_ids!r}; expected distinct ids")
    if self.kernel_size < 1:
      raise ValueError(f"EngramConfig.kernel_size={self.kernel_size!r}; expected >= 1")
    if not isinstance(self.pad_id, int) or self.pad_id < 0:
      raise ValueError(f"EngramConfig.pad_id={self.pad_id!r}; expected a token id >= 0")

  @property
  def n_heads_total(self) -> int:
    """A: hash heads per layer, (N-1) * n_head_per_ngram."""
    return (self.max_ngram_size - 1) * self.n_head_per_ngram

  @property
  def head_dim(self) -> int:
    """H: width of one head's table rows."""
    return self.n_embed_per_ngram // self.n_head_per_ngram

  @property
  def engram_hidden_size(self) -> int:
    """A * H: the concatenated embedding width fed to the key/value projections."""
    return (self.max_ngram_size - 1) * self.n_embed_per_ngram

  def validate(self, n_layers: int) -> "EngramConfig":
    """Check against the model: layer ids inside [0, n_layers), primes fit int32."""
    for lid in self.layer_ids:
      if not 0 <= lid < n_layers:
        raise ValueError(f"EngramConfig.layer_ids contains {lid}; expected 0 <= id < "
                         f"n_layers={n_layers}")
    head_sizes(self)  # raises ValueError when a size leaves no prime usable as int32 ids
    return self

  @staticmethod
  def vocab_sizes_for_budget(rows_per_layer: int, max_ngram_size: int = 3,
                             n_head_per_ngram: int = 8) -> tuple[int, ...]:
    """Equal per-order sizes so one layer's table holds about ``rows_per_layer`` rows."""
    heads = (max_ngram_size - 1) * n_head_per_ngram
    if rows_per_layer < heads:
      raise ValueError(f"rows_per_layer={rows_per_layer}; expected >= {heads} (one row per "
                       "hash head at least)")
    return (rows_per_layer // heads,) * (max_ngram_size - 1)


# ---------------------------------------------------------------------------------------
# Primes
# ---------------------------------------------------------------------------------------

def is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin (exact for n < 3.3e24 with these 12 bases); the demo uses
  sympy.isprime, which gives the same answers."""
  if n < 2:
    return False
  bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
  for p in bases:
    if n % p == 0:
      return n == p
  d, r = n - 1, 0
  while d % 2 == 0:
    d //= 2
    r += 1
  for a in bases:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(r - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def find_next_prime(start: int, seen_primes: set[int]) -> int:
  """The demo's search: the smallest prime > start that is not in ``seen_primes``."""
  candidate = start + 1
  while True:
    if is_prime(candidate) and candidate not in seen_primes:
      return candidate
    candidate += 1


@functools.lru_cache(maxsize=64)
def head_sizes(cfg: EngramConfig) -> dict[int, tuple[tuple[int, ...], ...]]:
  """{layer_id: ((p for each head of n=2), ..., (... of n=N))}: the demo's
  ``vocab_size_across_layers``. Raises ValueError when a layer's table rows (sum of its
  primes) would not fit the int32 row ids used on the device."""
  seen_primes: set[int] = set()
  out = {}
  for layer_id in cfg.layer_ids:
    per_ngram = []
    for ngram in range(2, cfg.max_ngram_size + 1):
      start = cfg.engram_vocab_size[ngram - 2] - 1  # so the first candidate is the size
      sizes = []
      for _ in range(cfg.n_head_per_ngram):
        prime = find_next_prime(start, seen_primes)
        seen_primes.add(prime)
        sizes.append(prime)
        start = prime
      per_ngram.append(tuple(sizes))
    total = sum(sum(s) for s in per_ngram)
    if total > INT32_MAX:
      raise ValueError(
          f"EngramConfig.engram_vocab_size={cfg.engram_vocab_size!r} leaves no primes that "
          f"fit: layer {layer_id} would need {total} table rows; expected the sum of its "
          f"{cfg.n_heads_total} prime moduli <= 2**31-1 (row ids are int32 on the device)")
    out[layer_id] = tuple(per_ngram)
  return out


def row_offsets(cfg: EngramConfig, layer_id: int) -> np.ndarray:
  """[A] int64: first table row of each head of ``layer_id`` (heads ordered n=2 first)."""
  flat = [p for sizes in head_sizes(cfg)[layer_id] for p in sizes]
  return np.concatenate([[0], np.cumsum(flat[:-1], dtype=np.int64)]).astype(np.int64)


def table_rows(cfg: EngramConfig, layer_id: int) -> int:
  """Rows of ``layer_id``'s embedding table: the sum of its prime moduli."""
  return int(sum(sum(s) for s in head_sizes(cfg)[layer_id]))


# ---------------------------------------------------------------------------------------
# Compressed tokenizer
# ---------------------------------------------------------------------------------------

def _vocab_len(tokenizer: Any) -> int:
  if hasattr(tokenizer, "get_vocab_size"):        # tokenizers.Tokenizer
    return int(tokenizer.get_vocab_size(with_added_tokens=True))
  return len(tokenizer)                           # transformers tokenizers (the demo)


def _raw_token(tokenizer: Any, tid: int) -> str:
  if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers (the demo)
    return tokenizer.convert_ids_to_tokens(tid)
  return tokenizer.id_to_token(tid)               # tokenizers.Tokenizer


class CompressedTokenizer:
  """Maps raw token ids to compressed ids (the demo's class, given a tokenizer object).

  ``tokenizer`` needs ``decode([tid], skip_special_tokens=False)``, the raw token string
  through ``convert_ids_to_tokens(tid)`` or ``id_to_token(tid)``, and its size through
  ``len()`` or ``get_vocab_size(with_added_tokens=True)``. A transformers tokenizer gives
  the demo's table exactly; a bare ``tokenizers.Tokenizer`` matches it when its decoder
  does what the transformers wrapper does (no extra clean-up of spaces).
  """

  def __init__(self, tokenizer: Any):
    self.normalizer = demo_normalizer()
    self.lookup_table, self.num_new_token = self._build_lookup_table(tokenizer)

  def __len__(self) -> int:
    return self.num_new_token

  def _build_lookup_table(self, tokenizer: Any) -> tuple[np.ndarray, int]:
    vocab_size = _vocab_len(tokenizer)
    key2new: dict[str, int] = {}
    lookup_V = np.empty(vocab_size, dtype=np.int64)
    for tid in range(vocab_size):
      text = tokenizer.decode([tid], skip_special_tokens=False)
      if "\ufffd" in text:
        # A partial UTF-8 byte decodes to U+FFFD; normalising would merge all of them.
        key = _raw_token(tokenizer, tid)
      else:
        norm = self.normalizer.normalize_str(text)
        key = norm if norm else text
      lookup_V[tid] = key2new.setdefault(key, len(key2new))
    return lookup_V, len(key2new)

  def __call__(self, input_ids: Any) -> np.ndarray:
    """Compress ids of any shape; negative ids (padding/ignore markers) pass through."""
    arr = np.asarray(input_ids, dtype=np.int64)
    if arr.size and arr.max() >= len(self.lookup_table):
      raise ValueError(f"input_ids contains {int(arr.max())}; expected ids < tokenizer "
                       f"vocab size {len(self.lookup_table)}")
    out = arr.copy()
    pos_mask = arr >= 0
    out[pos_mask] = self.lookup_table[arr[pos_mask]]
    return out


# ---------------------------------------------------------------------------------------
# N-gram hashing
# ---------------------------------------------------------------------------------------

class NgramHashMapping:
  """Raw token ids -> per-layer hash ids [B, T, A] (the demo's class of the same name).

  ``tokenizer`` is a tokenizer object or an already built ``CompressedTokenizer``.
  Attributes keep the demo's names: ``pad_id`` (compressed), ``tokenizer_vocab_size``,
  ``layer_multipliers`` {layer_id: [N] int64}, ``vocab_size_across_layers``.
  """

  def __init__(self, cfg: EngramConfig, tokenizer: Any):
    self.cfg = cfg
    self.max_ngram_size = cfg.max_ngram_size
    self.n_head_per_ngram = cfg.n_head_per_ngram
    self.layer_ids = cfg.layer_ids
    self.compressed_tokenizer = (tokenizer if isinstance(tokenizer, CompressedTokenizer)
                                 else CompressedTokenizer(tokenizer))
    self.tokenizer_vocab_size = len(self.compressed_tokenizer)
    table_V = self.compressed_tokenizer.lookup_table
    if cfg.pad_id >= len(table_V):
      raise ValueError(f"EngramConfig.pad_id={cfg.pad_id}; expected a token id < tokenizer "
                       f"vocab size {len(table_V)}")
    self.pad_id = int(table_V[cfg.pad_id])

    max_long = np.iinfo(np.int64).max
    m_max = int(max_long // self.tokenizer_vocab_size)
    half_bound = max(1, m_max // 2)
    self.layer_multipliers = {}
    for layer_id in self.layer_ids:
      g = np.random.default_rng(int(cfg.seed + PRIME_1 * int(layer_id)))
      r = g.integers(low=0, high=half_bound, size=(self.max_ngram_size,), dtype=np.int64)
      self.layer_multipliers[layer_id] = r * 2 + 1
    self.vocab_size_across_layers = {k: [list(s) for s in v]
                                     for k, v in head_sizes(cfg).items()}
    self._mods = {k: [np.int64(p) for s in v for p in s] for k, v in head_sizes(cfg).items()}

  def get_vocab_sizes(self, layer_id: int) -> list[int]:
    """The A prime moduli of ``layer_id``, heads of n=2 first."""
    return [p for s in self.vocab_size_across_layers[layer_id] for p in s]

  def _hash_with_history(self, ctx_BL: np.ndarray, layer_id: int) -> np.ndarray:
    """Hashes for the last T = L - (N-1) positions of ``ctx_BL`` (compressed ids whose
    first N-1 columns are the history before them)."""
    n_max = self.max_ngram_size
    t_len = ctx_BL.shape[1] - (n_max - 1)
    # shifted[k][:, t] = id at position t - k (the history supplies t - k < 0).
    shifted = [ctx_BL[:, n_max - 1 - k: n_max - 1 - k + t_len] for k in range(n_max)]
    return self._mix(shifted, layer_id)

  def _mix(self, shifted: list[np.ndarray], layer_id: int) -> np.ndarray:
    """XOR-mixed n-gram hashes from shifted[k] = compressed id k positions back."""
    n_max = self.max_ngram_size
    mult = self.layer_multipliers[layer_id]
    mods = self._mods[layer_id]
    out_BTA = np.empty(shifted[0].shape + (len(mods),), dtype=np.int64)
    mix = shifted[0] * mult[0]
    a = 0
    for n in range(2, n_max + 1):
      # XOR is associative, so each order extends the previous order's mix.
      mix = np.bitwise_xor(mix, shifted[n - 1] * mult[n - 1])
      for _ in range(self.n_head_per_ngram):
        out_BTA[:, :, a] = mix % mods[a]
        a += 1
    return out_BTA

  def hash_packed(self, input_ids: Any, segment_ids: Any) -> dict[int, np.ndarray]:
    """Like ``hash`` for packed rows: an n-gram never reaches into a previous document
    (ids from another segment read as the pad id, as before a sequence start), so each
    document hashes exactly as if it were alone. Returns int32 ids."""
    x_BT = self.compressed_tokenizer(np.asarray(input_ids))
    seg_BT = np.asarray(segment_ids)
    shifted = [x_BT]
    for k in range(1, self.max_ngram_size):
      sx = np.full_like(x_BT, self.pad_id)
      sx[:, k:] = x_BT[:, :-k]
      ss = np.full_like(seg_BT, -1)
      ss[:, k:] = seg_BT[:, :-k]
      shifted.append(np.where(ss == seg_BT, sx, self.pad_id))
    return {lid: self._mix(shifted, lid).astype(np.int32) for lid in self.layer_ids}

  def init_state(self, batch: int) -> np.ndarray:
    """History for ``hash_step``: [B, S=N-1] compressed pad ids (nothing seen yet)."""
    return np.full((batch, self.max_ngram_size - 1), self.pad_id, dtype=np.int64)

  def hash(self, input_ids: Any) -> dict[int, np.ndarray]:
    """Raw ids [B, T] -> {layer_id: hash ids [B, T, A] int64} (the demo's ``hash``)."""
    x_BT = self.compressed_tokenizer(np.asarray(input_ids))
    if x_BT.ndim != 2:
      raise ValueError(f"input_ids has shape {x_BT.shape}; expected [batch, positions]")
    ctx = np.concatenate([self.init_state(x_BT.shape[0]), x_BT], axis=1)
    return {lid: self._hash_with_history(ctx, lid) for lid in self.layer_ids}

  def hash_step(self, state_BS: np.ndarray, new_ids: Any
                ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Incremental hashing for generation: hash T new raw ids per sequence given the last
    N-1 compressed ids (``init_state`` at the start); returns ({layer_id: [B, T, A]},
    new state). Chaining calls equals ``hash`` of the concatenated ids."""
    x_BT = self.compressed_tokenizer(np.asarray(new_ids))
    if x_BT.ndim != 2 or x_BT.shape[0] != state_BS.shape[0]:
      raise ValueError(f"new_ids has shape {x_BT.shape}; expected [{state_BS.shape[0]}, T]")
    ctx = np.concatenate([np.asarray(state_BS, np.int64), x_BT], axis=1)
    hashes = {lid: self._hash_with_history(ctx, lid) for lid in self.layer_ids}
    return hashes, ctx[:, ctx.shape[1] - (self.max_ngram_size - 1):]

  def row_ids(self, hash_ids_BTA: np.ndarray, layer_id: int) -> np.ndarray:
    """Hash ids -> global rows of ``layer_id``'s table (adds the per-head offsets)."""
    return np.asarray(hash_ids_BTA, np.int64) + row_offsets(self.cfg, layer_id)


def unique_rows(row_ids: np.ndarray, n_rows: int, bucket: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Host-side de-duplication for the row-sparse update: (rows [U] int32, inverse [B*T*A]
  int32). U is rounded up to a multiple of ``bucket`` (fewer recompilations); the padding
  rows are ``n_rows``, one past the table, which the update's scatter drops."""
  rows, inverse = np.unique(np.asarray(row_ids).reshape(-1), return_inverse=True)
  u = len(rows)
  if bucket:
    u = -(-u // bucket) * bucket
  padded = np.full((u,), n_rows, dtype=np.int32)
  padded[:len(rows)] = rows
  return padded, inverse.astype(np.int32).reshape(-1)


def hash_ids_for_layers(mapping: NgramHashMapping, input_ids: Any) -> dict[int, np.ndarray]:
  """Convenience: ``mapping.hash`` with int32 results, ready to feed the device."""
  return {k: v.astype(np.int32) for k, v in mapping.hash(input_ids).items()}
