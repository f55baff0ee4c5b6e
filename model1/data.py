"""Data: a real local corpus, a BPE tokenizer trained on it, packed deterministic batches.

Default corpus: the Python standard library sources of the running
interpreter (``sysconfig`` stdlib path), excluding ``site-packages``/``dist-packages``.
Users pass their own files or folders instead (``data.paths``). Each file is a document.

* ``build_manifest`` lists the files (relative path + sha256); its hash keys every cache.
* ``load_tokenizer`` trains a byte-level BPE with the ``tokenizers`` package on the
  training files (cached by manifest hash and vocabulary size); ``byte`` is the fallback.
  Cache files are built under a file lock: runs started together on a cold cache (a
  sweep, the test workers) build each once and the others wait for it.
* ``corpus_files`` refuses missing paths and corpora with no non-empty UTF-8 text
  (``is_text_file``: no NUL bytes, valid UTF-8 in the first 4 KB, a character cut at the
  boundary allowed).
* ``Dataset`` tokenizes every file once (cached), splits train/validation *by file*
  deterministically (a hash of the path; a one-file corpus holds out its last
  ``val_percent`` of tokens), and packs each split into rows of
  ``seq_len + 1`` tokens with segment ids (one per document piece) and positions that
  restart at each piece. ``batch(step)`` is a pure function of (seed, step): resuming at
  step s yields exactly the batch the uninterrupted run saw.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
PAD_ID = 0


def default_cache_dir() -> Path:
  return Path(os.environ.get("MODEL1_CACHE", Path.home() / ".cache" / "model1"))


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    for f in sorted(filenames):
      if suffixes is None or f.endswith(suffixes):
        out.append(Path(dirpath) / f)
  return out


def corpus_files(paths: Sequence[str] | None = None) -> tuple[Path, list[Path]]:
  """(root, files). No paths: stdlib ``*.py``. Else every readable UTF-8 file under each
  path (folders are walked). Raises ValueError when nothing readable is found."""
  if not paths:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _walk(root, (".py",))
  files: list[Path] = []
  for p in paths:
    pp = Path(p).expanduser()
    if pp.is_dir():
      files += _walk(pp, None)
    elif pp.is_file():
      files.append(pp)
    else:  # one missing path among good ones would otherwise shrink the corpus silently
      raise ValueError(f"data.paths entry {p!r} does not exist; expected existing files or "
                       f"folders (comma-separated)")
  readable = [f for f in files if is_text_file(f)]
  if not readable:
    raise ValueError(f"data.paths={list(paths)!r} contains no readable UTF-8 text files;"
                     f" expected files or folders of text/code")
  if not any(f.stat().st_size for f in readable):
    raise ValueError(f"data.paths={list(paths)!r}: every text file is empty; expected "
                     f"some text to train on")
  root = Path(os.path.commonpath([str(f.resolve().parent) for f in readable]))
  return root, sorted(readable)


def is_text_file(path: Path, probe: int = 4096) -> bool:
  """UTF-8 text without NUL bytes, judged on the first ``probe`` bytes. The decoder is
  incremental, so a multi-byte character cut by the probe boundary is not an error."""
  import codecs
  try:
    with open(path, "rb") as f:
      head = f.read(probe)
  except OSError:
    return False
  if b"\0" in head:
    return False
  try:
    codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
  except UnicodeDecodeError:
    return False
  return True


def build_manifest(paths: Sequence[str] | None = None) -> dict:
  root, files = corpus_files(paths)
  entries = []
  for f in files:
    data = f.read_bytes()
    entries.append({"path": str(f.resolve().relative_to(root)) if f.resolve().is_relative_to(root)
                    else str(f), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
  body = json.dumps(entries, sort_keys=True).encode()
  return {"root": str(root), "files": entries, "hash": hashlib.sha256(body).hexdigest()[:16]}


def _is_val(path: str, val_percent: float) -> bool:
  h = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)
  return (h % 10000) < val_percent * 100


def _read(manifest: dict, entry: dict) -> str:
  p = Path(entry["path"])
  p = p if p.is_absolute() else Path(manifest["root"]) / p
  return p.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- tokenizer

class ByteTokenizer:
  """Fallback: bytes shifted past the special tokens (vocab 256 + 3)."""
  vocab_size = 256 + len(SPECIAL_TOKENS)

  def encode_batch(self, texts):
    return [[b + len(SPECIAL_TOKENS) for b in t.encode("utf-8")] for t in texts]

  def decode(self, ids):
    return bytes(i - len(SPECIAL_TOKENS) for i in ids if i >= len(SPECIAL_TOKENS)).decode(
        "utf-8", errors="replace")

  def get_vocab_size(self):
    return self.vocab_size


class BPETokenizer:
  """Thin wrapper over a ``tokenizers.Tokenizer`` giving id lists."""

  def __init__(self, tok):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()

  def encode_batch(self, texts):
    return [e.ids for e in self.tok.encode_batch(list(texts))]

  def decode(self, ids):
    return self.tok.decode(list(ids))

  def get_vocab_size(self):
    return self.vocab_size


@contextlib.contextmanager
def _build_lock(path: Path):
  """Hold an exclusive lock while building the cache file ``path``: runs started together
  on a cold cache (a sweep, the test workers) wait for the first build and read it
  instead of each tokenizing the same corpus (~27 CPU-s for the stdlib). The lock is released
  when the process dies, so a killed builder never blocks the next one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_name(path.name + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_tokenizer(manifest: dict, kind: str, vocab_size: int, cache_dir: Path | None = None,
                   max_train_bytes: int = 8_000_000):
  if kind == "byte":
    return ByteTokenizer()
  if kind != "bpe":
    raise ValueError(f"data.tokenizer={kind!r}; expected 'bpe' or 'byte'")
  from tokenizers import Tokenizer
  cache = Path(cache_dir or default_cache_dir())
  path = cache / f"tokenizer-{manifest['hash']}-{vocab_size}.json"
  if path.exists():
    return BPETokenizer(Tokenizer.from_file(str(path)))
  with _build_lock(path):
    if path.exists():  # built by another process while this one waited
      return BPETokenizer(Tokenizer.from_file(str(path)))
    return BPETokenizer(_train_bpe(manifest, vocab_size, path, max_train_bytes))


def _train_bpe(manifest: dict, vocab_size: int, path: Path, max_train_bytes: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  # Train on a deterministic, evenly spread sample of the files (speed on 2 cores).
  entries = manifest["files"]
  total = sum(e["bytes"] for e in entries)
  stride = max(1, int(np.ceil(total / max_train_bytes)))

  def texts():
    for e in entries[::stride]:
      yield _read(manifest, e)
  tok.train_from_iterator(texts(), trainer=trainer)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tok.save(str(tmp))
  os.replace(tmp, path)
  return tok


def tokenizer_from_file(path: str | Path):
  """The tokenizer a run saved (``tokenizer.json``: a BPE file or the byte marker)."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f"tokenizer file {path} does not exist; expected the run's tokenizer.json")
  text = path.read_text()
  if '"model1_byte_tokenizer"' in text[:100]:
    return ByteTokenizer()
  from tokenizers import Tokenizer
  return BPETokenizer(Tokenizer.from_str(text))


# --------------------------------------------------------------------------- dataset

@dataclasses.dataclass
class Split:
  tokens: np.ndarray      # [rows, seq_len + 1] int32
  segments: np.ndarray    # [rows, seq_len + 1] int32, 0 = padding
  positions: np.ndarray   # [rows, seq_len + 1] int32
  n_docs: int


def pack(docs: list[np.ndarray], seq_len: int) -> Split:
  """Concatenate documents (each followed by <|eos|>) and cut into rows of seq_len+1.
  Segment ids number the document pieces within each row (1, 2, ...)."""
  L = seq_len + 1
  eos = SPECIAL_TOKENS.index("<|eos|>")
  stream = np.concatenate([np.append(d, eos).astype(np.int32) for d in docs]) if docs else \
      np.zeros((0,), np.int32)
  doc_id = np.concatenate([np.full(len(d) + 1, i, np.int32) for i, d in enumerate(docs)]) \
      if docs else np.zeros((0,), np.int32)
  rows = max(1, int(np.ceil(len(stream) / L)))
  pad = rows * L - len(stream)
  tokens = np.concatenate([stream, np.full(pad, PAD_ID, np.int32)]).reshape(rows, L)
  did = np.concatenate([doc_id, np.full(pad, -1, np.int32)]).reshape(rows, L)
  new = np.ones_like(did, bool)
  new[:, 1:] = did[:, 1:] != did[:, :-1]
  seg = np.cumsum(new, axis=1).astype(np.int32)
  seg = np.where(did < 0, 0, seg)
  idx = np.broadcast_to(np.arange(L), (rows, L))
  start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
  pos = (idx - start).astype(np.int32)
  return Split(tokens, seg, pos, len(docs))


class Dataset:
  """Tokenized, split and packed corpus; ``batch(step, split)`` is deterministic."""

  def __init__(self, paths=None, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
               tokenizer: str = "bpe", vocab_size: int = 4096, val_percent: float = 5.0,
               cache_dir: str | None = None, manifest: dict | None = None,
               tokenizer_file: str | Path | None = None):
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"data.seq_len={seq_len}, data.batch_size={batch_size}; "
                       f"expected positive ints")
    if not 0 < val_percent < 100:
      raise ValueError(f"data.val_percent={val_percent}; expected a percentage in (0, 100)")
    self.manifest = manifest or build_manifest(paths)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    cache = Path(cache_dir or default_cache_dir())
    if tokenizer_file is not None:  # a run's own tokenizer (checkpoint.save_run_tokenizer)
      self.tokenizer = tokenizer_from_file(tokenizer_file)
    else:
      self.tokenizer = load_tokenizer(self.manifest, tokenizer, vocab_size, cache)
    # the token cache is keyed by the tokenizer's content, so a run's saved copy of the
    # cached tokenizer shares its tokens
    tok = getattr(self.tokenizer, "tok", None)
    key = "byte" if tok is None else "bpe" + hashlib.sha256(
        tok.to_str().encode()).hexdigest()[:12]
    self.vocab_size = self.tokenizer.get_vocab_size()
    docs = self._tokenize(cache, key)
    if not sum(len(d) for d in docs):
      raise ValueError(f"data.paths={paths!r} tokenizes to no tokens; expected some text")
    paths_ = [e["path"] for e in self.manifest["files"]]
    val = [d for p, d in zip(paths_, docs) if _is_val(p, val_percent)]
    train = [d for p, d in zip(paths_, docs) if not _is_val(p, val_percent)]
    if len(docs) == 1:  # one file: validate on its tail, never on training rows
      (doc,) = docs
      cut = len(doc) - max(seq_len + 1, int(len(doc) * val_percent / 100))
      if cut < seq_len + 1:
        raise ValueError(f"the corpus has one file of {len(doc)} tokens; expected at least "
                         f"{2 * (seq_len + 1)} (data.seq_len={seq_len}) to hold out a "
                         f"validation row, or more files")
      train, val = [doc[:cut]], [doc[cut:]]
    elif not val:  # tiny user corpora: hold out the last file
      val, train = train[-1:], train[:-1]
    elif not train:
      train, val = val[:-1], val[-1:]
    order = np.random.default_rng(seed).permutation(len(train))
    self.train = pack([train[i] for i in order], seq_len)
    self.val = pack(val, seq_len)

  def _tokenize(self, cache: Path, key: str) -> list[np.ndarray]:
    path = cache / f"tokens-{self.manifest['hash']}-{key}.npz"

    def load():
      z = np.load(path)
      return np.split(z["ids"], z["offsets"][1:-1])
    if path.exists():
      return load()
    with _build_lock(path):
      if path.exists():  # tokenized by another process while this one waited
        return load()
      texts = [_read(self.manifest, e) for e in self.manifest["files"]]
      docs = [np.asarray(x, np.int32) for x in self.tokenizer.encode_batch(texts)]
      offsets = np.cumsum([0] + [len(d) for d in docs])
      tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
      np.savez(tmp, ids=np.concatenate(docs), offsets=offsets)
      os.replace(tmp, path)
      return docs

  def batch(self, step: int, split: str = "train", batch_size: int | None = None) -> dict:
    """Batch for ``step``: inputs/targets [B, seq_len], segment ids, positions, loss mask.
    Train rows follow a fresh seeded permutation each epoch; validation is sequential."""
    s = self.train if split == "train" else self.val
    B = batch_size or self.batch_size
    n = s.tokens.shape[0]
    if split == "train":
      flat = np.arange(step * B, (step + 1) * B)
      epoch, within = flat // n, flat % n
      rows = np.array([np.random.default_rng((self.seed, int(e))).permutation(n)[w]
                       for e, w in zip(epoch, within)])
    else:
      rows = np.arange(step * B, (step + 1) * B) % n
    tok, seg, pos = s.tokens[rows], s.segments[rows], s.positions[rows]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1], "loss_mask": mask.astype(np.float32)}

  def num_val_batches(self, batch_size: int | None = None) -> int:
    return max(1, self.val.tokens.shape[0] // (batch_size or self.batch_size))

  def bytes_per_token(self, split: str = "val") -> float:
    """Average UTF-8 bytes per non-special token (for bits per byte)."""
    s = self.val if split == "val" else self.train
    toks = s.tokens[s.segments > 0]
    toks = toks[toks >= len(SPECIAL_TOKENS)][:200_000]
    text = self.tokenizer.decode(toks.tolist())
    return len(text.encode("utf-8")) / max(1, len(toks))
