"""Passkey and MQAR: generators and scorers on models with known answers."""
import numpy as np
import pytest

from model1 import long_context as lc

TV = lc.TaskVocab(vocab_size=512)


def _oracle(task):
  """A model that copies perfectly: reads the answer out of its own input."""
  def predict(x_BT):
    B, T = x_BT.shape
    logits = np.zeros((B, T, TV.vocab_size), np.float32)
    for b in range(B):
      row = x_BT[b]
      for t in range(T):
        tok = row[t]
        if task == "mqar" and tok in TV.keys():
          first = int(np.argmax(row == tok))
          if first < t and first + 1 < T:
            logits[b, t, row[first + 1]] = 1
        if task == "passkey":
          pm = np.flatnonzero(row == TV.pass_mark)
          qm = np.flatnonzero(row == TV.query_mark)
          if len(pm) and len(qm) and t >= qm[0]:
            logits[b, t, row[pm[0] + 1 + (t - qm[0])]] = 1
    return logits
  return predict


def _random(seed):
  rng = np.random.default_rng(seed)
  def predict(x_BT):
    return rng.standard_normal(x_BT.shape + (TV.vocab_size,)).astype(np.float32)
  return predict


def _random_among_answers(task, seed):
  """Uniform guesses among the task's answer ids (chance level by construction)."""
  rng = np.random.default_rng(seed)
  ids = TV.digits() if task == "passkey" else TV.values()
  def predict(x_BT):
    logits = np.zeros(x_BT.shape + (TV.vocab_size,), np.float32)
    pick = rng.choice(ids, x_BT.shape)
    np.put_along_axis(logits, pick[..., None], 1.0, axis=-1)
    return logits
  return predict


@pytest.mark.parametrize("task", ["passkey", "mqar"])
def test_perfect_copier_scores_100(task):
  r = lc.score(_oracle(task), task, TV, length=96, n_trials=40)
  assert r["accuracy"] == 1.0


@pytest.mark.parametrize("task", ["mqar", "passkey"])
def test_random_model_stays_near_chance(task):
  for predict in (_random(0), _random_among_answers(task, 1)):
    r = lc.score(predict, task, TV, length=64, n_trials=240)
    # 4 binomial standard errors above chance: a chance-level predictor exceeds it with
    # probability < 1e-4
    assert r["accuracy"] <= lc.binomial_upper(r["chance"], r["n"]), r


def test_examples_are_deterministic_and_well_formed():
  a, ma = lc.mqar_example(TV, 64, seed=3)
  b, mb = lc.mqar_example(TV, 64, seed=3)
  np.testing.assert_array_equal(a, b)
  assert ma.sum() == 8 and set(a[np.flatnonzero(ma)]) <= set(TV.keys())
  p, mp = lc.passkey_example(TV, 50, seed=1)
  q = np.flatnonzero(p == TV.query_mark)[0]
  k = np.flatnonzero(p == TV.pass_mark)[0]
  np.testing.assert_array_equal(p[q + 1:], p[k + 1:k + 6])
  with pytest.raises(ValueError, match="vocab_size=64"):
    lc.TaskVocab(vocab_size=64)
  with pytest.raises(ValueError, match="length=5"):
    lc.passkey_example(TV, 5, 0)


def test_mix_into_batch_is_deterministic():
  B, T = 8, 32
  batch = {"inputs": np.zeros((B, T), np.int32), "targets": np.zeros((B, T), np.int32),
           "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "loss_mask": np.ones((B, T), np.float32)}
  a = lc.mix_into_batch(batch, 5, 0.25, TV)
  b = lc.mix_into_batch(batch, 5, 0.25, TV)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert (a["inputs"][:6] == 0).all() and (a["inputs"][6:] != 0).any()
