"""Tests of bert_jax.data.span_corruption against the T5 reference rules."""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import masking
from bert_jax.data import span_corruption as sc

VOCAB = 32100  # 32000 pieces + 100 extra ids, as T5
EOS = 1


@pytest.mark.parametrize("inputs_length,tokens_length,targets_length",
                         [(128, 141, 29), (256, 284, 58), (512, 568, 114), (1024, 1137, 229)])
def test_input_and_target_lengths(inputs_length, tokens_length, targets_length):
  assert sc.compute_input_and_target_lengths(inputs_length) == (tokens_length, targets_length)


def test_lengths_at_half_density_match_t5():
  # t5 trims one raw token at density 0.5 so targets do not outgrow inputs.
  tokens_length, targets_length = sc.compute_input_and_target_lengths(512, 0.5, 3.0)
  assert targets_length <= 512
  assert sc._lengths_for(tokens_length, 0.5, 3.0)[0] <= 512


def _mask(length, i):
  return sc.random_spans_noise_mask(tf.constant(length), masking.example_seed(0, 0, i)).numpy()


def test_noise_mask_properties():
  for length in list(range(2, 60)) + [141, 284, 568, 1137]:
    for i in range(3):
      m = _mask(length, i)
      noise = min(max(int(np.round(np.float32(length) * np.float32(0.15))), 1), length - 1)
      spans = max(int(np.round(np.float32(noise) / np.float32(3.0))), 1)
      assert m.shape == (length,) and m.sum() == noise, (length, i)
      starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
      assert len(starts) == spans == sc.max_noise_spans(length), (length, i)
      assert not m[0] and m[-1], "first token never noise, last always noise"
  assert _mask(568, 0).sum() == 85 and sc.max_noise_spans(568) == 28
  assert _mask(1, 0).tolist() == [False]


def test_noise_span_lengths_vary_with_seed():
  masks = {tuple(_mask(141, i)) for i in range(20)}
  assert len(masks) == 20
  lengths = []
  for i in range(50):
    m = _mask(568, i).astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
    lengths += (edges[1::2] - edges[::2]).tolist()
  assert abs(np.mean(lengths) - 85 / 28) < 1e-9 and max(lengths) > 5


def _reconstruct(inputs, targets):
  """Interleave inputs and targets by sentinel -> the original tokens."""
  assert inputs[-1] == EOS and targets[-1] == EOS
  inputs, targets = list(inputs[:-1]), list(targets[:-1])
  spans, current = {}, None
  for t in targets:
    if t >= VOCAB - 100:
      current = t
      spans[t] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out += spans.pop(t) if t >= VOCAB - 100 else [t]
  assert not spans, "every target span has its sentinel in the inputs"
  return out


def test_corruption_reconstructs_and_has_exact_lengths():
  rng = np.random.default_rng(0)
  for i in range(40):
    length = 568 if i < 20 else int(rng.integers(2, 400))
    tokens = rng.integers(2, 32000, length).astype(np.int32)
    out = sc.span_corruption(tokens, masking.example_seed(5, 0, i), vocab_size=VOCAB,
                             eos_id=EOS)
    inputs, targets = out["inputs"].numpy(), out["targets"].numpy()
    assert _reconstruct(inputs, targets) == tokens.tolist()
    sentinels = inputs[inputs >= VOCAB - 100]
    # <extra_id_0> = vocab_size - 1, counting down; same order in targets.
    np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(len(sentinels)))
    np.testing.assert_array_equal(targets[targets >= VOCAB - 100], sentinels)
    assert targets[0] == VOCAB - 1 and targets[-2] < VOCAB - 100, "no trailing sentinel"
    if length == 568:
      assert (len(inputs), len(targets)) == (512, 114)


def test_determinism_in_tf_data():
  tokens = np.arange(2, 2 + 141 * 8, dtype=np.int32).reshape(8, 141)

  def run(epoch):
    ds = tf.data.Dataset.from_tensor_slices(tokens).enumerate().map(
        lambda i, t: sc.span_corruption(t, masking.example_seed(3, epoch, i),
                                        vocab_size=VOCAB))
    return [(x["inputs"].tolist(), x["targets"].tolist()) for x in ds.as_numpy_iterator()]

  a, b, c = run(0), run(0), run(1)
  assert a == b and a != c
  assert all(len(x) == 128 and len(y) == 29 for x, y in a)


def test_sentinel_budget_check():
  sc.check_sentinel_budget(568, num_extra_ids=100)
  sc.check_sentinel_budget(sc.compute_input_and_target_lengths(1024)[0], num_extra_ids=100)
  with pytest.raises(ValueError, match=r"makes 28 noise spans .* num_extra_ids=20"):
    sc.check_sentinel_budget(568, num_extra_ids=20)
  # From ~1800 raw tokens at density 0.15 the 100 T5 sentinels run out.
  with pytest.raises(ValueError, match="num_extra_ids=100"):
    sc.check_sentinel_budget(2100, num_extra_ids=100)
  assert sc.max_noise_spans(1660) == 83 and sc.max_noise_spans(2100) == 105


def _check_decoder(row):
  """decoder_input_tokens are the targets shifted right (0 first), weights 1 on targets."""
  seg, pos = row["decoder_segment_ids"], row["decoder_positions"]
  tgt, inp = row["decoder_target_tokens"], row["decoder_input_tokens"]
  np.testing.assert_array_equal(row["decoder_loss_weights"], (seg > 0).astype(np.float32))
  for i in range(len(seg)):
    if seg[i] == 0 or pos[i] == 0:
      assert inp[i] == 0
    else:
      assert inp[i] == tgt[i - 1] and seg[i - 1] == seg[i]


def test_pad_seq2seq_example():
  rng = np.random.default_rng(2)
  docs = [rng.integers(2, 32000, rng.integers(1, 200)).astype(np.int32) for _ in range(10)]
  ds = tf.data.Dataset.from_generator(lambda: iter(docs),
                                      output_signature=tf.TensorSpec([None], tf.int32))
  ds = ds.enumerate().map(lambda i, t: sc.span_corruption(
      t, masking.example_seed(0, 0, i), vocab_size=VOCAB, eos_id=EOS))
  examples = list(ds.as_numpy_iterator())
  padded = ds.map(lambda ex: sc.pad_seq2seq_example(ex, 64, 24))
  assert padded.element_spec["encoder_input_tokens"].shape.as_list() == [64]
  assert padded.element_spec["decoder_input_tokens"].shape.as_list() == [24]
  for row, ex in zip(padded.as_numpy_iterator(), examples):
    _check_decoder(row)
    for key, stream, length in (("inputs", "encoder", 64), ("targets", "decoder", 24)):
      n = min(len(ex[key]), length)  # cut to the row (an overlong one loses its EOS)
      tokens = row["encoder_input_tokens" if stream == "encoder" else "decoder_target_tokens"]
      np.testing.assert_array_equal(tokens[:n], ex[key][:n])
      np.testing.assert_array_equal(tokens[n:], 0)
      np.testing.assert_array_equal(row[stream + "_segment_ids"], np.arange(length) < n)
      np.testing.assert_array_equal(row[stream + "_positions"],
                                    np.where(np.arange(length) < n, np.arange(length), 0))
  for key, length in (("inputs", 64), ("targets", 24)):
    lengths = [len(ex[key]) for ex in examples]
    assert min(lengths) < length < max(lengths), f"{key}: padding and cutting are exercised"
  # Extra keys pass through (e.g. a resumable pipeline's provenance).
  one = sc.pad_seq2seq_example(dict(examples[0], index=tf.constant(7)), 64, 24)
  assert int(one["index"]) == 7 and "inputs" not in one and "targets" not in one
