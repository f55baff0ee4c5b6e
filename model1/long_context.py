"""Synthetic long-context tasks: passkey retrieval and multi-query associative recall.

Both are generated deterministically from (seed, index) in *token-id space*, so they work
with any tokenizer and vocabulary, and can be mixed into training at a ratio
(``mix_into_batch``) or scored on a trained model (``score``).

* **Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention"): filler tokens,
  with ``[PASS] d1 .. dk`` hidden at a random depth, and ``[QUERY] d1 .. dk`` at the end.
  The model must reproduce the k digits after ``[QUERY]``; a trial counts as correct only
  when every digit is the argmax prediction (teacher-forced).
* **MQAR** (Arora et al. 2023, "Zoology"): ``k1 v1 k2 v2 ... kn vn`` (keys and values from
  disjoint id ranges, keys distinct), filler, then queries ``ki vi`` in shuffled order;
  each query's value must be predicted from its key. Accuracy is per query.

Shapes: an example is ``tokens [T]`` plus ``answer_mask [T]`` marking positions whose
*next* token is an answer (the positions scored and, when mixed into training, the only
positions with loss).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskVocab:
  """Which token ids the tasks use (a slice of the model's vocabulary)."""
  vocab_size: int
  n_digits: int = 10
  n_keys: int = 64
  n_values: int = 64
  n_filler: int = 256

  def __post_init__(self):
    need = 2 + self.n_digits + self.n_keys + self.n_values + self.n_filler
    if need > self.vocab_size - 8:
      raise ValueError(f"vocab_size={self.vocab_size} is too small for the synthetic tasks; "
                       f"expected at least {need + 8} ids (markers, digits, keys, values, filler)")

  @property
  def base(self) -> int:  # skip the lowest ids (specials such as pad/bos/eos)
    return 8

  @property
  def pass_mark(self) -> int:
    return self.base

  @property
  def query_mark(self) -> int:
    return self.base + 1

  def digits(self) -> np.ndarray:
    return self.base + 2 + np.arange(self.n_digits)

  def keys(self) -> np.ndarray:
    return self.base + 2 + self.n_digits + np.arange(self.n_keys)

  def values(self) -> np.ndarray:
    return self.base + 2 + self.n_digits + self.n_keys + np.arange(self.n_values)

  def filler(self) -> np.ndarray:
    s = self.base + 2 + self.n_digits + self.n_keys + self.n_values
    return s + np.arange(self.n_filler)


def passkey_example(tv: TaskVocab, length: int, seed: int, n_passkey_digits: int = 5):
  """(tokens [length], answer_mask [length]); the passkey depth is uniform in the filler."""
  need = 2 * (n_passkey_digits + 1) + 1
  if length < need:
    raise ValueError(f"length={length}; expected at least {need} for a "
                     f"{n_passkey_digits}-digit passkey")
  rng = np.random.default_rng((seed, 1))
  key = rng.choice(tv.digits(), n_passkey_digits)
  toks = rng.choice(tv.filler(), length)
  q0 = length - (n_passkey_digits + 1)
  depth = int(rng.integers(0, q0 - (n_passkey_digits + 1) + 1))
  toks[depth] = tv.pass_mark
  toks[depth + 1:depth + 1 + n_passkey_digits] = key
  toks[q0] = tv.query_mark
  toks[q0 + 1:] = key
  mask = np.zeros(length, bool)
  mask[q0:length - 1] = True  # position p predicts token p+1: the digits after [QUERY]
  return toks.astype(np.int32), mask


def mqar_example(tv: TaskVocab, length: int, seed: int, n_pairs: int = 8):
  """(tokens [length], answer_mask [length]) with n_pairs key-value pairs then queries."""
  if n_pairs > min(tv.n_keys, tv.n_values) or n_pairs < 1:
    raise ValueError(f"n_pairs={n_pairs}; expected 1..{min(tv.n_keys, tv.n_values)}")
  if length < 4 * n_pairs:
    raise ValueError(f"length={length}; expected at least 4*n_pairs={4 * n_pairs}")
  rng = np.random.default_rng((seed, 2))
  keys = rng.choice(tv.keys(), n_pairs, replace=False)
  vals = rng.choice(tv.values(), n_pairs)
  pairs = np.stack([keys, vals], 1).reshape(-1)
  order = rng.permutation(n_pairs)
  queries = np.stack([keys[order], vals[order]], 1).reshape(-1)
  filler = rng.choice(tv.filler(), length - 4 * n_pairs)
  toks = np.concatenate([pairs, filler, queries])
  mask = np.zeros(length, bool)
  q0 = length - 2 * n_pairs
  mask[q0:length:2] = True  # each query key position predicts its value
  return toks.astype(np.int32), mask


TASKS = {"passkey": passkey_example, "mqar": mqar_example}


def make_batch(task: str, tv: TaskVocab, length: int, seeds) -> dict:
  """A training/eval batch in the data pipeline's format (one document per row)."""
  if task not in TASKS:
    raise ValueError(f"task={task!r}; expected one of {sorted(TASKS)}")
  ex = [TASKS[task](tv, length + 1, int(s)) for s in seeds]
  toks = np.stack([e[0] for e in ex])
  mask = np.stack([e[1] for e in ex])
  B = len(ex)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((B, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (B, length)).copy(),
          "loss_mask": mask[:, :-1].astype(np.float32)}


def mix_into_batch(batch: dict, step: int, ratio: float, tv: TaskVocab, seed: int = 0,
                   tasks=("mqar", "passkey")) -> dict:
  """Replace round(ratio*B) rows of a text batch with synthetic rows (deterministic in
  (seed, step)), alternating tasks."""
  B, T = batch["inputs"].shape
  n = int(round(ratio * B))
  if n == 0:
    return batch
  out = {k: v.copy() for k, v in batch.items()}
  for i in range(n):
    task = tasks[(step * n + i) % len(tasks)]
    syn = make_batch(task, tv, T, [seed * 1_000_003 + step * B + i])
    for k in out:
      out[k][B - 1 - i] = syn[k][0]
  return out


def score(predict: Callable[[np.ndarray], np.ndarray], task: str, tv: TaskVocab, length: int,
          n_trials: int, seed: int = 10_000, batch_size: int = 16) -> dict:
  """Accuracy of ``predict(inputs [B,T]) -> logits [B,T,V]`` on ``n_trials`` examples.
  passkey: a trial is correct iff all digits are the argmax; mqar: per query."""
  correct = total = 0
  for s in range(0, n_trials, batch_size):
    seeds = np.arange(seed + s, seed + min(n_trials, s + batch_size))
    b = make_batch(task, tv, length, seeds)
    pred = np.asarray(predict(b["inputs"])).argmax(-1)
    hit = (pred == b["targets"]) | (b["loss_mask"] == 0)
    if task == "passkey":
      correct += int(hit.all(-1).sum())
      total += len(seeds)
    else:
      m = b["loss_mask"] > 0
      correct += int((hit & m).sum())
      total += int(m.sum())
  return {"task": task, "length": length, "accuracy": correct / max(total, 1),
          "n": total, "chance": chance(task, tv)}


def chance(task: str, tv: TaskVocab, n_passkey_digits: int = 5) -> float:
  """Accuracy of uniform guessing among the task's answer ids."""
  return (1 / tv.n_digits) ** n_passkey_digits if task == "passkey" else 1 / tv.n_values


def binomial_upper(p: float, n: int, z: float = 4.0) -> float:
  """p + z standard errors: a random predictor exceeds it with probability < 1e-4."""
  return p + z * math.sqrt(p * (1 - p) / n)
