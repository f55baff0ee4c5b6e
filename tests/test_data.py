"""Data pipeline and host-boundary validation."""
import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model1 import config, data, steps
from model1.model import Transformer


def test_stdlib_manifest_excludes_site_packages(dataset):
  paths = [e["path"] for e in dataset.manifest["files"]]
  assert len(paths) > 500 and all(p.endswith(".py") for p in paths)
  assert not any("site-packages" in p or "dist-packages" in p for p in paths)
  assert all(len(e["sha256"]) == 64 for e in dataset.manifest["files"])


def test_batches_are_a_pure_function_of_seed_and_step(dataset):
  a, b = dataset.batch(17), dataset.batch(17)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(dataset.batch(18)["inputs"], a["inputs"])
  # targets are the next tokens; loss is masked across document boundaries and padding
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  seg = a["segment_ids"]
  assert a["loss_mask"][a["segment_ids"] == 0].sum() == 0
  assert a["inputs"].max() < dataset.vocab_size


def test_train_and_validation_split_by_file(dataset):
  assert dataset.train.n_docs > 10 * dataset.val.n_docs > 0


def test_packing_segments_and_positions():
  s = data.pack([np.array([5, 6, 7]), np.array([8, 9])], seq_len=4)
  # stream: 5 6 7 eos 8 | 9 eos pad pad pad
  np.testing.assert_array_equal(s.segments, [[1, 1, 1, 1, 2], [1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(s.positions[0], [0, 1, 2, 3, 0])
  np.testing.assert_array_equal(s.positions[1][:2], [0, 1])


def test_packed_documents_do_not_attend_across_boundary():
  cfg = config.preset("tiny", "model1")
  cfg = dataclasses.replace(cfg, vocab_size=50, d_model=32, attention=dataclasses.replace(
      cfg.attention, n_heads=2, q_lora_rank=16, o_lora_rank=16), ffn=config.FFNConfig(64))
  m = Transformer(cfg, nnx.Rngs(0))
  doc1, doc2 = jnp.array([3, 4, 5, 6]), jnp.array([7, 8, 9])
  packed = jnp.concatenate([doc1, doc2])[None]
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
  fwd = nnx.jit(lambda m_, t, p, s: m_(t, p, s))
  out = fwd(m, packed, pos, seg)
  # doc2 alone, right-padded to the same shape (padding is segment 0): one compile
  alone = fwd(m, jnp.array([[7, 8, 9, 0, 0, 0, 0]]), jnp.array([[0, 1, 2, 3, 4, 5, 6]]),
              jnp.array([[1, 1, 1, 0, 0, 0, 0]]))
  # same computation, different batch layout: fp32 rounding only
  np.testing.assert_allclose(out[0, 4:], alone[0, :3], atol=1e-5)


def test_user_paths(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 50)
  (tmp_path / "b.py").write_text("print('x')\n" * 50)
  (tmp_path / "bin.dat").write_bytes(bytes([0xff, 0xfe, 0x80]) * 10)
  ds = data.Dataset(paths=[str(tmp_path)], seq_len=16, batch_size=2, tokenizer="byte",
                    cache_dir=str(tmp_path / "cache"))
  assert len(ds.manifest["files"]) == 2
  assert ds.batch(0)["inputs"].shape == (2, 16)


def test_bad_inputs_raise_clear_errors(tmp_path):
  cfg = config.preset("tiny", "model1")
  (tmp_path / "bin.dat").write_bytes(bytes([0xff, 0xfe, 0x80]) * 10)
  with pytest.raises(ValueError, match=r"data.paths=.*no readable"):
    data.corpus_files([str(tmp_path)])
  with pytest.raises(ValueError, match=r"token id 4096.*expected ids in \[0, 4096\)"):
    steps.check_batch({"inputs": np.full((1, 4), 4096), "targets": np.zeros((1, 4))}, cfg)
  with pytest.raises(ValueError, match=r"token id -1"):
    steps.check_batch({"inputs": np.full((1, 4), -1), "targets": np.zeros((1, 4))}, cfg)
  long = np.zeros((1, cfg.max_seq_len + 1), np.int32)
  with pytest.raises(ValueError, match=r"sequence length 257.*max_seq_len=256"):
    steps.check_batch({"inputs": long, "targets": long}, cfg)
  with pytest.raises(ValueError, match=r"geometry='v4'"):
    config.preset("tiny", "v4")
  with pytest.raises(ValueError, match=r"attention.geometry='mla'"):
    config.model_config_from_dict({"attention": {"geometry": "mla"}})
  with pytest.raises(ValueError, match=r"n_heads=6 is not divisible by attention.o_groups=4"):
    config.model_config_from_dict({"attention": {"n_heads": 6, "o_groups": 4}})
  with pytest.raises(ValueError, match=r"head_dim=32 must be at least rope.dim=64"):
    config.model_config_from_dict({"attention": {"head_dim": 32}})
  with pytest.raises(ValueError, match=r"unknown config field"):
    config.model_config_from_dict({"d_modle": 3})


def test_corpus_errors_and_text_detection(tmp_path):
  good = tmp_path / "good.py"
  good.write_text("x = 1\n" * 50)
  with pytest.raises(ValueError, match=r"data.paths entry '.*nope' does not exist"):
    data.corpus_files([str(good), str(tmp_path / "nope")])  # never dropped silently
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"every text file is empty"):
    data.corpus_files([str(tmp_path / "e")])
  # a valid UTF-8 file whose 3-byte character straddles the 4096-byte probe is text
  straddle = tmp_path / "straddle.txt"
  straddle.write_bytes(b"a" * 4095 + "€".encode() + b"tail\n")
  assert data.is_text_file(straddle)
  broken = tmp_path / "broken.txt"
  broken.write_bytes(b"a" * 10 + b"\xe2\x28\xa1" + b"a" * 10)  # invalid continuation byte
  nul = tmp_path / "nul.txt"
  nul.write_bytes(b"abc\0def")
  assert not data.is_text_file(broken) and not data.is_text_file(nul)
  _, files = data.corpus_files([str(tmp_path / "straddle.txt")])
  assert files == [straddle]


def test_one_file_corpus_validates_on_held_out_tokens(tmp_path):
  f = tmp_path / "one.txt"
  f.write_text("".join(f"line {i}: {i * i}\n" for i in range(400)))
  ds = data.Dataset(paths=[str(f)], seq_len=16, batch_size=2, tokenizer="byte",
                    cache_dir=str(tmp_path / "cache"))
  rows = lambda s: {tuple(r) for r in s.tokens.tolist()}
  assert ds.val.tokens.shape[0] >= 1 and ds.train.tokens.shape[0] > 10 * ds.val.tokens.shape[0]
  assert not rows(ds.train) & rows(ds.val)  # validation never sees a training row
  n = ds.train.tokens[ds.train.segments > 0].size + ds.val.tokens[ds.val.segments > 0].size
  assert n == len(f.read_bytes()) + 2  # every byte once, plus one <|eos|> per piece
  (tmp_path / "short.txt").write_text("tiny")
  with pytest.raises(ValueError, match=r"one file of \d+ tokens; expected at least 34"):
    data.Dataset(paths=[str(tmp_path / "short.txt")], seq_len=16, tokenizer="byte",
                 cache_dir=str(tmp_path / "cache"))


def test_runs_started_together_build_the_caches_once(tmp_path, monkeypatch):
  # a sweep's runs (and the test workers) start on a cold cache at once: one builds the
  # tokenizer and the token file under a lock, the others wait and read them
  import threading
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n  return x + {i}\n" * 40)
  built = {"bpe": 0, "tokens": 0}
  train_bpe, encode = data._train_bpe, data.BPETokenizer.encode_batch

  def counted(name, fn):
    def wrapped(*a, **k):
      built[name] += 1
      time.sleep(0.3)  # long enough that every thread reaches the lock meanwhile
      return fn(*a, **k)
    return wrapped
  monkeypatch.setattr(data, "_train_bpe", counted("bpe", train_bpe))
  monkeypatch.setattr(data.BPETokenizer, "encode_batch", counted("tokens", encode))
  out = [None] * 4

  def build(i):
    out[i] = data.Dataset(paths=[str(corpus)], seq_len=16, batch_size=2, vocab_size=300,
                          cache_dir=str(tmp_path / "cache"))
  threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert built == {"bpe": 1, "tokens": 1}, built
  for ds in out[1:]:
    np.testing.assert_array_equal(ds.train.tokens, out[0].train.tokens)
