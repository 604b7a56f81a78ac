"""Packing variable-length examples into fixed-length rows, and the padding path.

Packed rows follow the batch contract (DESIGN.md): `*_segment_ids` number the
examples of a row 1, 2, 3, ... (0 = padding) and `*_positions` restart at 0 for
each example, so attention and position embeddings never cross examples.

Packing is greedy (next-fit, what t5x/seqio's trim_and_pack does within its
buffer): blocks of `block_size` consecutive examples are packed independently
and in parallel; within a block, examples go into the current row while every
stream still fits, and the first that does not closes the row and opens the
next. Order is kept and nothing is dropped (but examples with no encoder
tokens, which hold nothing to train on); an example longer than a row is
truncated to the row (its tokens beyond the row length, and MLM predictions
pointing there, are lost). Only the last row of each block may be emptier than
packing the whole stream at once would leave it.

Encoder-only (MLM):  pack_mlm / pad_mlm (pad_mlm_example for one example)
  in:  encoder_input_tokens [n], optional encoder_type_ids [n], mlm_positions,
       mlm_targets, mlm_weights [P_ex] (from masking.mask_tokens; SpanBERT's
       sbo_left_positions / sbo_right_positions are carried too).
  out: encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
       encoder_positions [seq_length]; mlm_* [max_predictions] with positions
       offset into the row.
Encoder-decoder:     pack_seq2seq / pad_seq2seq (pad_seq2seq_example)
  in:  inputs [n], targets [m] (e.g. span_corruption.span_corruption).
  out: encoder_input_tokens, encoder_segment_ids, encoder_positions
       [inputs_length]; decoder_input_tokens (targets shifted right, 0 at the
       start of every example), decoder_target_tokens, decoder_loss_weights,
       decoder_segment_ids, decoder_positions [targets_length].
"""
from typing import Dict, Sequence, Tuple

import tensorflow as tf

_MLM_KEYS = ("mlm_positions", "mlm_targets", "mlm_weights")
_SBO_KEYS = ("sbo_left_positions", "sbo_right_positions")
# stream name -> (feature keys, row length, whether it gets segment ids/positions)
Streams = Dict[str, Tuple[Sequence[str], int, bool]]


def _assign_rows(lengths, caps):
  """Next-fit: row index and start offset of each example of a block.

  Args:
    lengths: int32 [K, S], tokens of each example in each stream.
    caps: int32 [S], row length of each stream.

  Returns:
    (rows [K], starts [K, S]).
  """
  def step(carry, lens):
    row, _, end = carry
    fits = tf.reduce_all(end + lens <= caps)
    start = tf.where(fits, end, tf.zeros_like(end))
    return tf.where(fits, row, row + 1), start, start + lens

  zeros = tf.zeros_like(caps)
  rows, starts, _ = tf.scan(step, lengths, initializer=(tf.constant(0), zeros, zeros))
  return rows, starts


def _pack_block(block, streams: Streams, offsets: Dict[str, str]):
  """Packs one padded block of K examples into [num_rows, length] features."""
  names = list(streams)
  caps = tf.constant([streams[n][1] for n in names], tf.int32)
  lengths = tf.stack([block[n + "/len"] for n in names], 1)  # [K, S]
  rows, starts = _assign_rows(lengths, caps)
  num_rows = rows[-1] + 1
  k = tf.range(tf.size(rows))
  # Segment number inside the row: 1 for the row's first example, then 2, ...
  first_in_row = tf.math.unsorted_segment_min(k, rows, num_rows)
  segment = k - tf.gather(first_in_row, rows) + 1  # [K]
  out = {}
  for s, name in enumerate(names):
    keys, length, segmented = streams[name]
    width = tf.shape(block[keys[0]])[1]
    j = tf.range(width)[None, :]  # [1, width]
    valid = j < lengths[:, s:s + 1]  # [K, width]
    where = tf.stack([tf.broadcast_to(rows[:, None], tf.shape(valid)),
                      starts[:, s:s + 1] + j], -1)
    index = tf.boolean_mask(where, valid)  # [n, 2]

    def scatter(values):
      return tf.scatter_nd(index, tf.boolean_mask(values, valid), [num_rows, length])

    for key in keys:
      values = block[key]
      if key in offsets:
        shift = starts[:, names.index(offsets[key])][:, None]
        values += tf.cast(shift, values.dtype)
      out[key] = scatter(values)
    if segmented:
      out[name + "_segment_ids"] = scatter(tf.broadcast_to(segment[:, None], tf.shape(valid)))
      out[name + "_positions"] = scatter(tf.broadcast_to(j, tf.shape(valid)))
  return out


def _greedy_pack(dataset: tf.data.Dataset, streams: Streams, offsets: Dict[str, str],
                 block_size: int) -> tf.data.Dataset:
  """Packs trimmed examples (every feature 1-D, unpadded, fits its row).

  Blocks of `block_size` consecutive examples are packed independently, in
  parallel, each greedily (next-fit, order kept); only the last row of a block
  may be emptier than greedy packing of the whole stream would leave it.

  Args:
    dataset: dict elements; keys of one stream share their length.
    streams: stream name -> (keys, row length, segmented).
    offsets: key -> stream whose start offset is added to the key's values
      (positions that must point into the packed row).
    block_size: examples per block.

  Returns:
    Dataset of packed rows (keys, plus <stream>_segment_ids/_positions).
  """
  def add_lengths(ex):
    return {**ex, **{n + "/len": tf.size(ex[keys[0]]) for n, (keys, _, _) in streams.items()}}

  keys = [k for keys, _, _ in streams.values() for k in keys]
  first = next(iter(streams)) + "/len"
  return (dataset.map(lambda ex: add_lengths({k: ex[k] for k in keys}),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .filter(lambda ex: ex[first] > 0)  # an empty example would leave a hole
          .padded_batch(block_size)
          .map(lambda b: _pack_block(b, streams, offsets), num_parallel_calls=tf.data.AUTOTUNE,
               deterministic=True)
          .unbatch())


def _trim_mlm(ex, seq_length: int, max_predictions: int):
  """Unpadded MLM example cut to the row: tokens to seq_length, predictions inside it."""
  if "nsp_labels" in ex:
    raise ValueError("pack_mlm cannot pack examples with nsp_labels (one label per row); "
                     "use pad_mlm for NSP/SOP data")
  tokens = ex["encoder_input_tokens"][:seq_length]
  tokens = tf.boolean_mask(tokens, tf.not_equal(tokens, 0))  # drop padding from masking
  n = tf.size(tokens)
  types = ex.get("encoder_type_ids", tf.zeros_like(ex["encoder_input_tokens"]))
  keep = (ex["mlm_weights"] > 0) & (ex["mlm_positions"] < n)
  out = dict(encoder_input_tokens=tokens, encoder_type_ids=types[:n])
  for k in _MLM_KEYS + _SBO_KEYS:
    if k in ex:
      out[k] = tf.boolean_mask(ex[k], keep)[:max_predictions]
  return out


def pack_mlm(dataset: tf.data.Dataset, seq_length: int, max_predictions: int,
             block_size: int = 1024) -> tf.data.Dataset:
  """Packs masked examples into rows of seq_length tokens and max_predictions slots.

  A row closes when the next example's tokens or its predictions do not fit.
  Examples are cut to seq_length tokens (predictions beyond dropped) and to
  max_predictions predictions. NSP/SOP examples are refused (use pad_mlm).

  Args:
    dataset: elements from masking.mask_tokens (+ encoder_type_ids).
    seq_length: row length in tokens.
    max_predictions: mlm_* width of a packed row (e.g. round(0.15 * seq_length)
      plus a margin, since several examples share it).
    block_size: examples packed together (see module docstring).

  Returns:
    Dataset of packed rows in the batch-contract form.
  """
  missing = [k for k in ("encoder_input_tokens",) + _MLM_KEYS if k not in dataset.element_spec]
  if missing:
    raise ValueError(f"pack_mlm needs the features {missing} (from masking.mask_tokens)")
  data = dataset.map(lambda ex: _trim_mlm(ex, seq_length, max_predictions),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  mlm_keys = [k for k in _MLM_KEYS + _SBO_KEYS if k in data.element_spec]
  streams = {"encoder": (("encoder_input_tokens", "encoder_type_ids"), seq_length, True),
             "mlm": (tuple(mlm_keys), max_predictions, False)}
  offsets = {k: "encoder" for k in ("mlm_positions",) + _SBO_KEYS if k in mlm_keys}
  return _greedy_pack(data, streams, offsets, block_size)


def pad_mlm_example(ex, seq_length: int):
  """Pads (or cuts) one MLM example to seq_length; other features pass through.

  Segment ids are 1 on real tokens, positions count from 0, so models can use
  the same attention path as for packed rows. mlm_*, sbo_*, nsp_labels and
  any other keys pass through; predictions beyond seq_length get weight 0.

  Args:
    ex: dict with encoder_input_tokens [n] (+ optional encoder_type_ids,
      mlm_*, nsp_labels, ...).
    seq_length: row length.

  Returns:
    The dict with static [seq_length] encoder_* features.
  """
  ex = dict(ex)
  tokens = ex["encoder_input_tokens"][:seq_length]
  n = tf.size(tokens)
  types = ex.get("encoder_type_ids", tf.zeros_like(ex["encoder_input_tokens"]))[:n]
  ex["encoder_input_tokens"] = tf.ensure_shape(
      tf.pad(tokens, [[0, seq_length - n]]), [seq_length])
  real = tf.not_equal(ex["encoder_input_tokens"], 0)
  ex["encoder_type_ids"] = tf.ensure_shape(tf.pad(types, [[0, seq_length - n]]), [seq_length])
  ex["encoder_segment_ids"] = tf.cast(real, tf.int32)
  ex["encoder_positions"] = tf.where(real, tf.range(seq_length), 0)
  if "mlm_weights" in ex:
    ex["mlm_weights"] = tf.where(ex["mlm_positions"] < seq_length, ex["mlm_weights"], 0.0)
  return ex


def pad_mlm(dataset: tf.data.Dataset, seq_length: int) -> tf.data.Dataset:
  """No-packing path: `pad_mlm_example` on every element (one example per row).

  Args:
    dataset: elements with encoder_input_tokens [n] (+ optional
      encoder_type_ids and mlm_*/nsp_labels).
    seq_length: row length.

  Returns:
    Dataset with static [seq_length] encoder_* features.
  """
  return dataset.map(lambda ex: pad_mlm_example(ex, seq_length),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _decoder_features(ex):
  """Adds decoder_input_tokens (shift right per example) and loss weights."""
  targets = ex.pop("decoder_target_tokens")
  seg, pos = ex["decoder_segment_ids"], ex["decoder_positions"]
  shifted = tf.pad(targets[:-1], [[1, 0]])
  ex["decoder_input_tokens"] = tf.where((pos == 0) | (seg == 0), 0, shifted)
  ex["decoder_target_tokens"] = targets
  ex["decoder_loss_weights"] = tf.cast(seg > 0, tf.float32)
  return ex


def pack_seq2seq(dataset: tf.data.Dataset, inputs_length: int, targets_length: int,
                 block_size: int = 1024) -> tf.data.Dataset:
  """Packs {inputs, targets} examples into encoder/decoder rows.

  A row closes when the next example's inputs or targets do not fit. Inputs
  and targets longer than a row are cut to it (keeping the front, so a cut
  sequence loses its EOS, as with t5's trim).

  Args:
    dataset: elements {"inputs": int [n], "targets": int [m]}.
    inputs_length: encoder row length.
    targets_length: decoder row length.
    block_size: examples packed together (see module docstring).

  Returns:
    Dataset of packed rows with encoder_* and decoder_* features.
  """
  def trim(ex):
    return dict(encoder_input_tokens=tf.cast(ex["inputs"][:inputs_length], tf.int32),
                decoder_target_tokens=tf.cast(ex["targets"][:targets_length], tf.int32))

  streams = {"encoder": (("encoder_input_tokens",), inputs_length, True),
             "decoder": (("decoder_target_tokens",), targets_length, True)}
  data = dataset.map(trim, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _greedy_pack(data, streams, {}, block_size).map(
      _decoder_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pad_seq2seq_example(ex, inputs_length: int, targets_length: int):
  """Pads (or cuts) one {inputs, targets} example; other keys pass through.

  Args:
    ex: dict with inputs int [n] and targets int [m] (+ any other keys).
    inputs_length: encoder row length.
    targets_length: decoder row length.

  Returns:
    dict with the features of pack_seq2seq (one example: segment id 1) in
    place of inputs/targets.
  """
  out = {k: v for k, v in ex.items() if k not in ("inputs", "targets")}
  for name, key, length in (("encoder", "inputs", inputs_length),
                            ("decoder", "targets", targets_length)):
    x = tf.cast(ex[key][:length], tf.int32)
    n = tf.size(x)
    inside = tf.range(length) < n
    tokens = tf.ensure_shape(tf.pad(x, [[0, length - n]]), [length])
    out["encoder_input_tokens" if name == "encoder" else "decoder_target_tokens"] = tokens
    out[name + "_segment_ids"] = tf.cast(inside, tf.int32)
    out[name + "_positions"] = tf.where(inside, tf.range(length), 0)
  return _decoder_features(out)


def pad_seq2seq(dataset: tf.data.Dataset, inputs_length: int,
                targets_length: int) -> tf.data.Dataset:
  """No-packing path for {inputs, targets}: `pad_seq2seq_example` on every element.

  Args:
    dataset: elements {"inputs": int [n], "targets": int [m]}.
    inputs_length: encoder row length.
    targets_length: decoder row length.

  Returns:
    Dataset with the same features as pack_seq2seq, one example per row.
  """
  return dataset.map(lambda ex: pad_seq2seq_example(ex, inputs_length, targets_length),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
