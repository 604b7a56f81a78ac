"""Tests of bert_jax.data.packing: packed rows unpack to the exact examples."""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import masking
from bert_jax.data import packing
from bert_jax.data import span_corruption as sc


def _mlm_examples(n, seed=0, max_len=40):
  """Unpadded [CLS] ... [SEP] examples masked with the span scheme (carries sbo_*)."""
  rng = np.random.default_rng(seed)
  ws = np.ones(500, bool)
  vocab = masking.VocabInfo.create(500, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                                   word_start=ws)
  lengths = rng.integers(3, max_len, n)
  rows = [np.concatenate([[2], rng.integers(5, 500, k - 2), [3]]).astype(np.int32)
          for k in lengths]
  ds = tf.data.Dataset.from_generator(lambda: iter(rows),
                                      output_signature=tf.TensorSpec([None], tf.int32))

  def mask(i, t):
    out = masking.mask_tokens(t, masking.example_seed(0, 0, i), vocab, max_predictions=8,
                              scheme="span")
    out["encoder_type_ids"] = tf.cast(tf.range(tf.size(t)) % 2, tf.int32)
    return out

  ds = ds.enumerate().map(mask)
  return ds, list(ds.as_numpy_iterator())


def _unpack(row, key, seg_key):
  """Splits one packed row back into per-segment arrays."""
  seg = row[seg_key]
  return [row[key][seg == s] for s in range(1, seg.max() + 1)]


@pytest.mark.parametrize("block_size", [1024, 7])
def test_pack_mlm_roundtrip(block_size):
  ds, examples = _mlm_examples(120)
  rows = list(packing.pack_mlm(ds, seq_length=64, max_predictions=12,
                               block_size=block_size).as_numpy_iterator())
  assert len(rows) < len(examples) / 2, "rows hold several examples"
  got = []
  for row in rows:
    assert row["encoder_input_tokens"].shape == (64,) and row["mlm_positions"].shape == (12,)
    seg, pos = row["encoder_segment_ids"], row["encoder_positions"]
    # Segments 1, 2, 3, ... contiguous, then only padding (0).
    n = int((seg > 0).sum())
    assert np.all(seg[n:] == 0) and np.all(row["encoder_input_tokens"][n:] == 0)
    assert np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1 and np.all(np.diff(seg[:n]) <= 1)
    tokens = _unpack(row, "encoder_input_tokens", "encoder_segment_ids")
    types = _unpack(row, "encoder_type_ids", "encoder_segment_ids")
    starts = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    for s, toks in enumerate(tokens):
      np.testing.assert_array_equal(pos[seg == s + 1], np.arange(len(toks)))
      w = row["mlm_weights"] > 0
      p = row["mlm_positions"][w]
      in_seg = (p >= starts[s]) & (p < starts[s + 1])
      got.append(dict(tokens=toks, types=types[s],
                      positions=p[in_seg] - starts[s],
                      targets=row["mlm_targets"][w][in_seg],
                      left=row["sbo_left_positions"][w][in_seg] - starts[s],
                      right=row["sbo_right_positions"][w][in_seg] - starts[s]))
    assert np.all(row["mlm_weights"][~(row["mlm_weights"] > 0)] == 0)
  assert len(got) == len(examples), "no example dropped"
  for g, ex in zip(got, examples):
    k = int(ex["mlm_weights"].sum())
    np.testing.assert_array_equal(g["tokens"], ex["encoder_input_tokens"])
    np.testing.assert_array_equal(g["types"], ex["encoder_type_ids"])
    np.testing.assert_array_equal(g["positions"], ex["mlm_positions"][:k])
    np.testing.assert_array_equal(g["targets"], ex["mlm_targets"][:k])
    np.testing.assert_array_equal(g["left"], ex["sbo_left_positions"][:k])
    np.testing.assert_array_equal(g["right"], ex["sbo_right_positions"][:k])


def test_pack_mlm_truncates_overlong_examples():
  ds, examples = _mlm_examples(30, seed=1, max_len=60)
  rows = list(packing.pack_mlm(ds, seq_length=16, max_predictions=3).as_numpy_iterator())
  tokens = [t for r in rows for t in _unpack(r, "encoder_input_tokens", "encoder_segment_ids")]
  assert len(tokens) == len(examples)
  for t, ex in zip(tokens, examples):
    np.testing.assert_array_equal(t, ex["encoder_input_tokens"][:16])
  for r in rows:
    w = r["mlm_weights"] > 0
    assert np.all(r["mlm_positions"][w] < 16)


def test_next_fit_fills_rows_in_order():
  lengths = [5, 3, 4, 8, 1, 1, 6, 2]
  ds = tf.data.Dataset.from_generator(
      lambda: (dict(inputs=np.full(n, n, np.int32), targets=np.ones(1, np.int32))
               for n in lengths),
      output_signature=dict(inputs=tf.TensorSpec([None], tf.int32),
                            targets=tf.TensorSpec([None], tf.int32)))
  rows = list(packing.pack_seq2seq(ds, 8, 4).as_numpy_iterator())
  # Next-fit: [5 3] [4] [8] [1 1 6] [2]; a 4th target in a row would not fit.
  got = [r["encoder_input_tokens"][r["encoder_segment_ids"] > 0].tolist() for r in rows]
  assert got == [[5] * 5 + [3] * 3, [4] * 4, [8] * 8, [1, 1] + [6] * 6, [2, 2]]
  assert rows[3]["encoder_segment_ids"].tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
  assert rows[3]["encoder_positions"].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
  assert rows[3]["decoder_segment_ids"].tolist() == [1, 2, 3, 0]


def test_pad_mlm():
  ds, examples = _mlm_examples(10)
  rows = list(packing.pad_mlm(ds, 48).as_numpy_iterator())
  for r, ex in zip(rows, examples):
    n = len(ex["encoder_input_tokens"])
    np.testing.assert_array_equal(r["encoder_input_tokens"][:n], ex["encoder_input_tokens"])
    assert np.all(r["encoder_input_tokens"][n:] == 0)
    np.testing.assert_array_equal(r["encoder_segment_ids"], np.arange(48) < n)
    np.testing.assert_array_equal(r["encoder_positions"], np.where(np.arange(48) < n,
                                                                   np.arange(48), 0))
    np.testing.assert_array_equal(r["mlm_positions"], ex["mlm_positions"])


def test_pack_mlm_refuses_nsp():
  ds = tf.data.Dataset.from_tensors(dict(
      encoder_input_tokens=tf.constant([2, 9, 3]), mlm_positions=tf.constant([1]),
      mlm_targets=tf.constant([9]), mlm_weights=tf.constant([1.0]),
      nsp_labels=tf.constant(0)))
  with pytest.raises(ValueError, match="nsp_labels"):
    packing.pack_mlm(ds, 8, 2)


def _seq2seq_examples(n, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(2, 32000, rng.integers(1, 60)).astype(np.int32) for _ in range(n)]
  ds = tf.data.Dataset.from_generator(lambda: iter(docs),
                                      output_signature=tf.TensorSpec([None], tf.int32))
  ds = ds.enumerate().map(lambda i, t: sc.span_corruption(
      t, masking.example_seed(0, 0, i), vocab_size=32100))
  return ds, list(ds.as_numpy_iterator())


def _check_decoder(row):
  seg, pos = row["decoder_segment_ids"], row["decoder_positions"]
  tgt, inp = row["decoder_target_tokens"], row["decoder_input_tokens"]
  np.testing.assert_array_equal(row["decoder_loss_weights"], (seg > 0).astype(np.float32))
  for i in range(len(seg)):
    if seg[i] == 0 or pos[i] == 0:
      assert inp[i] == 0
    else:
      assert inp[i] == tgt[i - 1] and seg[i - 1] == seg[i]


@pytest.mark.parametrize("block_size", [1024, 5])
def test_pack_seq2seq_roundtrip(block_size):
  ds, examples = _seq2seq_examples(80)
  rows = list(packing.pack_seq2seq(ds, 64, 24, block_size=block_size).as_numpy_iterator())
  inputs, targets = [], []
  for r in rows:
    assert r["encoder_input_tokens"].shape == (64,) and r["decoder_target_tokens"].shape == (24,)
    assert r["encoder_segment_ids"].max() == r["decoder_segment_ids"].max()
    _check_decoder(r)
    enc = _unpack(r, "encoder_input_tokens", "encoder_segment_ids")
    for s, x in enumerate(enc):
      np.testing.assert_array_equal(r["encoder_positions"][r["encoder_segment_ids"] == s + 1],
                                    np.arange(len(x)))
    inputs += enc
    targets += _unpack(r, "decoder_target_tokens", "decoder_segment_ids")
  assert len(rows) < len(examples) and len(inputs) == len(examples)
  for x, t, ex in zip(inputs, targets, examples):
    np.testing.assert_array_equal(x, ex["inputs"][:64])
    np.testing.assert_array_equal(t, ex["targets"][:24])


def test_pad_seq2seq():
  ds, examples = _seq2seq_examples(10, seed=2)
  rows = list(packing.pad_seq2seq(ds, 64, 24).as_numpy_iterator())
  for r, ex in zip(rows, examples):
    _check_decoder(r)
    n = min(len(ex["targets"]), 24)
    np.testing.assert_array_equal(r["decoder_target_tokens"][:n], ex["targets"][:n])
    assert r["decoder_input_tokens"][0] == 0 and r["decoder_segment_ids"].max() == 1
    np.testing.assert_array_equal(r["encoder_input_tokens"][:len(ex["inputs"])],
                                  ex["inputs"][:64])
  # One example at a time, extra keys kept (e.g. provenance of a resumable pipeline).
  one = packing.pad_seq2seq_example(dict(examples[0], index=tf.constant(7)), 64, 24)
  assert int(one["index"]) == 7 and "inputs" not in one
  np.testing.assert_array_equal(one["decoder_input_tokens"], rows[0]["decoder_input_tokens"])


def test_pipelines_compose_with_static_shapes():
  vocab = masking.VocabInfo.create(500, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                                   word_start=np.ones(500, bool))
  docs = tf.data.Dataset.range(40).map(
      lambda i: tf.cast(tf.range(5, 5 + 30 + i % 20) % 490 + 5, tf.int32))
  # BERT: NSP pairs -> whole-word masking -> padding -> batches.
  pairs = docs.enumerate().map(lambda i, d: masking.nsp_pair(
      d[:10], d[10:], d[::-1], masking.example_seed(1, 0, i), vocab, max_seq_length=32))
  bert = packing.pad_mlm(pairs.enumerate().map(lambda i, ex: {**ex, **masking.mask_tokens(
      ex["encoder_input_tokens"], masking.example_seed(2, 0, i), vocab, max_predictions=5,
      scheme="whole_word")}), 32).batch(8, drop_remainder=True)
  spec = bert.element_spec
  for k in ("encoder_input_tokens", "encoder_type_ids", "encoder_segment_ids",
            "encoder_positions"):
    assert spec[k].shape.as_list() == [8, 32], k
  assert spec["mlm_positions"].shape.as_list() == [8, 5] and spec["nsp_labels"].shape == [8]
  assert len(list(bert)) == 5
  # T5: concat + split -> span corruption -> packing -> batches.
  tokens_length, targets_length = sc.compute_input_and_target_lengths(64)
  chunks = sc.concat_and_split(docs, tokens_length, batch_size=16)
  t5 = packing.pack_seq2seq(chunks.enumerate().map(lambda i, t: sc.span_corruption(
      t, masking.example_seed(3, 0, i), vocab_size=500)), 64, targets_length)
  batches = list(t5.batch(2, drop_remainder=True).as_numpy_iterator())
  spec = t5.batch(2, drop_remainder=True).element_spec
  assert spec["encoder_input_tokens"].shape.as_list() == [2, 64]
  assert spec["decoder_input_tokens"].shape.as_list() == [2, targets_length]
  assert batches and all(b["decoder_loss_weights"].dtype == np.float32 for b in batches)
  # Full-length chunks fill a row exactly: inputs_length and targets_length tokens.
  full = [b for b in batches if b["encoder_segment_ids"][0].max() == 1]
  assert any((f["encoder_segment_ids"][0] > 0).sum() == 64 and
             (f["decoder_segment_ids"][0] > 0).sum() == targets_length for f in full)
