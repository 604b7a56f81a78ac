"""bench/pretrain_quality.py: HF labels from a gathered batch, time to target, train_step's mini shape."""
import argparse

import numpy as np
import pytest

from conftest import load_bench

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
  return load_bench("pretrain_quality")


def test_hf_labels_only_at_weighted_positions(bench):
  tokens = np.array([[2, 7, 4, 9, 3, 0], [2, 5, 6, 3, 0, 0]], np.int32)
  batch = {"encoder_input_tokens": tokens, "encoder_type_ids": np.zeros_like(tokens),
           # the second row's last prediction slot is padding (weight 0, position 0)
           "mlm_positions": np.array([[1, 3], [2, 0]], np.int32),
           "mlm_targets": np.array([[11, 12], [13, 0]], np.int32),
           "mlm_weights": np.array([[1, 1], [1, 0]], np.float32)}
  out = bench.hf_inputs(batch)
  expected = np.full(tokens.shape, -100)
  expected[0, 1], expected[0, 3], expected[1, 2] = 11, 12, 13
  np.testing.assert_array_equal(out["labels"], expected)
  np.testing.assert_array_equal(out["attention_mask"], tokens != 0)
  np.testing.assert_array_equal(out["input_ids"], tokens)


def test_time_to_target_interpolates(bench):
  times, losses = [0.0, 10.0, 20.0], [10.0, 8.0, 6.0]
  assert bench.time_to(7.0, times, losses) == pytest.approx(15.0)
  # equal is not below: the first point below is at 20 s, the crossing at 10 s
  assert bench.time_to(8.0, times, losses) == pytest.approx(10.0)
  assert bench.time_to(11.0, times, losses) == 0.0
  assert bench.time_to(5.0, times, losses) is None


def test_torch_schedule_matches_optim_linear(bench):
  from bert_jax import optim
  ours = optim.make_schedule("linear", 1.0, num_steps=20, warmup_steps=4)
  theirs = bench._torch_schedule(4, 20)
  for step in range(0, 22):
    assert theirs(step) == pytest.approx(float(ours(step)), abs=1e-6), step


def test_seed_statistics_mean_and_spread_per_evaluation(bench):
  runs = {1: {"bert_jax": {"loss": [10.0, 8.0]}, "HF PyTorch": {"loss": [10.0, 6.0]}},
          2: {"bert_jax": {"loss": [10.0, 6.0]}, "HF PyTorch": {"loss": [10.0, 6.0]}}}
  mean, spread = bench.seed_statistics(runs)
  np.testing.assert_allclose(mean["bert_jax"], [10.0, 7.0])
  np.testing.assert_allclose(mean["HF PyTorch"], [10.0, 6.0])
  np.testing.assert_allclose(spread["bert_jax"], [0.0, 2.0 / 7.0])
  np.testing.assert_allclose(spread["HF PyTorch"], [0.0, 0.0])


def test_train_step_mini_shape_is_this_benchmarks_model_and_batch(bench):
  """bench/train_step.py --shapes=mini times this benchmark's step on its own."""
  from bert_jax import models  # pylint: disable=import-outside-toplevel
  preset, batch, overrides = load_bench("train_step").BERT_SHAPES["mini"]
  ours = models.get("bert").preset(preset, vocab_size=bench.VOCAB, **overrides)
  defaults = bench.recipe_flags(argparse.ArgumentParser()).parse_args([])
  assert batch == defaults.batch
  for field, value in bench.MINI.items():
    assert getattr(ours, field) == value, field
  assert ours.dropout_rate == ours.attention_dropout_rate == defaults.dropout
