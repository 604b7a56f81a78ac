"""Batching for fine-tuning: dynamic padding (pad_batch, padded_length) and length bucketing."""
import numpy as np
import pytest

from bert_jax.tasks import batching


def test_pad_batch_dynamic_and_fillers():
  feats = [{"encoder_input_tokens": np.array([101, 5, 102], np.int32),
            "encoder_type_ids": np.zeros(3, np.int32), "classifier_labels": np.int32(1)},
           {"encoder_input_tokens": np.arange(1, 11, dtype=np.int32),
            "encoder_type_ids": np.ones(10, np.int32), "classifier_labels": np.int32(0)}]
  batch = batching.pad_batch(feats, multiple=8)
  assert batch["encoder_input_tokens"].shape == (2, 16)  # longest 10 -> 16
  assert batch["encoder_input_tokens"][0].tolist() == [101, 5, 102] + [0] * 13
  assert batch["encoder_type_ids"][1].tolist() == [1] * 10 + [0] * 6
  assert batch["classifier_labels"].tolist() == [1, 0]
  assert batch["classifier_weights"].tolist() == [1.0, 1.0]
  batch = batching.pad_batch(feats, length=12, batch_size=4)
  assert batch["encoder_input_tokens"].shape == (4, 12)
  assert not batch["encoder_input_tokens"][2:].any()
  assert batch["classifier_labels"].tolist() == [1, 0, -1, -1]
  assert batch["classifier_weights"].tolist() == [1.0, 1.0, 0.0, 0.0]
  assert batch["example_weights"].tolist() == [1.0, 1.0, 0.0, 0.0]
  token = [{"encoder_input_tokens": np.array([1, 2], np.int32),
            "token_labels": np.array([-100, 3], np.int32)}]
  assert batching.pad_batch(token, multiple=4)["token_labels"].tolist() == [[-100, 3, -100, -100]]
  with pytest.raises(ValueError, match="more than length 8"):
    batching.pad_batch(feats, length=8)
  assert batching.padded_length(9, 8) == 16 and batching.padded_length(9, 8, max_length=12) == 12


def test_bucket_batches():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 128, size=1000)
  batches = batching.bucket_batches(lengths, 32, seed=7, pool_batches=4)
  flat = np.concatenate(batches)
  assert sorted(flat.tolist()) == list(range(1000))  # each example exactly once
  assert [b.tolist() for b in batches] == [
      b.tolist() for b in batching.bucket_batches(lengths, 32, seed=7, pool_batches=4)]
  assert [b.tolist() for b in batches] != [
      b.tolist() for b in batching.bucket_batches(lengths, 32, seed=8, pool_batches=4)]
  # Bucketing pads far less than random batches of the same size.
  padded = sum(32 * lengths[b].max() for b in batches)
  random_padded = sum(32 * lengths[b].max() for b in np.array_split(rng.permutation(1000), 32))
  assert padded < 0.8 * random_padded
  eval_batches = batching.bucket_batches(lengths, 100)
  assert np.all(np.diff(lengths[np.concatenate(eval_batches)]) >= 0)
  assert len(batching.bucket_batches(lengths, 300, seed=1, drop_remainder=True)) == 3
