"""T5 span corruption as tf.data graph ops, exact to t5.data.preprocessors.

The algorithm (noise mask, sentinel replacement, lengths) follows the
reference preprocessors step for step, so a chunk of `tokens_length` raw
tokens gives exactly `inputs_length` input and `targets_length` target tokens:

  tokens_length, targets_length = compute_input_and_target_lengths(512)  # 568, 114
  check_sentinel_budget(tokens_length, num_extra_ids=100)  # fails fast
  # chunks of tokens_length raw ids: examples.t5_examples (in the pipeline)
  ex = span_corruption(chunk, example_seed(seed, epoch, i), vocab_size=32100, eos_id=1)
  row = pad_seq2seq_example(ex, 512, targets_length)       # one example per row

EOS: as in the t5 span_corruption task (tokenize without EOS ->
reduce_concat_tokens -> split_tokens -> span_corruption -> append EOS),
documents are concatenated WITHOUT separators and one EOS is appended after
the corrupted inputs and after the targets. That is the +1 in the lengths.
"""
import numpy as np
from bert_jax.host_tf import tf


def _lengths_for(tokens_length: int, noise_density: float, mean_noise_span_length: float):
  """(inputs, targets, noise tokens, spans) for a chunk of raw tokens, as t5 counts."""
  num_noise = int(round(tokens_length * noise_density))
  num_spans = int(round(num_noise / mean_noise_span_length))
  inputs = tokens_length - num_noise + num_spans + 1  # a sentinel per span, EOS
  targets = num_noise + num_spans + 1
  return inputs, targets, num_noise, num_spans


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0):
  """Raw chunk length and targets length for a given inputs length (t5's random_spans_helper).

  Picks the largest raw length whose corrupted inputs (with sentinels and EOS)
  still fit in `inputs_length`. Vectors: 128 -> (141, 29), 256 -> (284, 58),
  512 -> (568, 114), 1024 -> (1137, 229).

  Args:
    inputs_length: encoder length, EOS included.
    noise_density: fraction of raw tokens that become noise.
    mean_noise_span_length: mean span length in tokens.

  Returns:
    (tokens_length, targets_length): raw tokens per chunk, decoder length.
  """
  if inputs_length < 2:
    raise ValueError(f"inputs_length={inputs_length} leaves no room for a token and EOS")
  tokens_length = inputs_length  # where t5 starts the search, kept for equality
  while _lengths_for(tokens_length + 1, noise_density, mean_noise_span_length)[0] \
      <= inputs_length:
    tokens_length += 1
  inputs, targets = _lengths_for(tokens_length, noise_density, mean_noise_span_length)[:2]
  # t5 does this too: at density 0.5 targets would exceed inputs by one token.
  if noise_density == 0.5 and targets > inputs:
    tokens_length -= 1
    targets -= 1
  return tokens_length, targets


def max_noise_spans(tokens_length: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> int:
  """Number of noise spans `random_spans_noise_mask` makes at this length."""
  # float32 like the graph op, so a product that lands on .5 rounds the same way.
  length = max(tokens_length, 2)
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  return max(spans, 1)


def check_sentinel_budget(tokens_length: int, num_extra_ids: int, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0):
  """Raises when a chunk can have more noise spans than there are sentinel ids.

  Beyond `num_extra_ids` spans the sentinels would run into ordinary
  vocabulary ids (from ~1800 raw tokens with 100 extra ids at density 0.15).
  Call at start-up with the longest raw chunk length.

  Args:
    tokens_length: longest raw chunk length.
    num_extra_ids: sentinel ids at the top of the vocabulary (100 for T5).
    noise_density: fraction of noise tokens.
    mean_noise_span_length: mean span length.

  Raises:
    ValueError: naming the numbers, when spans > num_extra_ids.
  """
  spans = max_noise_spans(tokens_length, noise_density, mean_noise_span_length)
  if spans > num_extra_ids:
    raise ValueError(
        f"span corruption of {tokens_length} raw tokens (noise_density={noise_density}, "
        f"mean_noise_span_length={mean_noise_span_length}) makes {spans} noise spans but "
        f"the vocabulary has only num_extra_ids={num_extra_ids} sentinels: shorten the "
        "inputs or add extra ids")


def _random_segmentation(num_items, num_segments, seed):
  """Lengths of a uniformly random split of num_items into num_segments (each >= 1)."""
  # A random set of num_segments - 1 cut points among the num_items - 1 gaps.
  cuts = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  cuts = tf.gather(cuts, tf.argsort(tf.random.stateless_uniform([num_items - 1], seed)))
  segment_id = tf.cumsum(tf.pad(cuts, [[1, 0]]))  # [num_items]
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)  # [num_segments]


def random_spans_noise_mask(length, seed, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0):
  """T5's noise mask: alternating non-noise / noise spans, no random roll.

  num_noise = clip(round(length * density), 1, length - 1);
  num_spans = max(round(num_noise / mean), 1); noise and non-noise token counts
  are each split into num_spans random positive parts; the parts interleave
  starting with non-noise, so the first token is never noise and the last one
  always is.

  Args:
    length: int scalar, number of tokens.
    seed: int [2] stateless seed.
    noise_density: fraction of noise tokens.
    mean_noise_span_length: mean span length.

  Returns:
    bool [length], True at noise tokens.
  """
  orig_length = length
  length = tf.maximum(length, 2)  # one token cannot be split into both kinds
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
                      tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  s_noise, s_keep = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  noise_lengths = _random_segmentation(num_noise, num_spans, s_noise)
  keep_lengths = _random_segmentation(length - num_noise, num_spans, s_keep)
  interleaved = tf.reshape(tf.stack([keep_lengths, noise_lengths], 1), [-1])
  span_starts = tf.cumsum(interleaved)[:-1]
  is_start = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
  is_noise = tf.equal(tf.cumsum(is_start) % 2, 1)
  return is_noise[:orig_length]


def _replace_spans(tokens, noise_mask, first_sentinel):
  """Each run of masked tokens -> one sentinel, counting down from first_sentinel."""
  prev = tf.pad(noise_mask[:-1], [[1, 0]])
  first = noise_mask & tf.logical_not(prev)
  later = noise_mask & prev
  sentinel = first_sentinel + 1 - tf.cumsum(tf.cast(first, tokens.dtype))
  return tf.boolean_mask(tf.where(first, sentinel, tokens), tf.logical_not(later))


def span_corruption(tokens, seed, *, vocab_size: int, eos_id: int = 1,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
  """T5 span corruption of one chunk of raw token ids.

  Inputs: non-noise tokens, each noise span replaced by one sentinel, then
  EOS. Targets: each sentinel followed by its span's tokens, then EOS (no
  trailing sentinel). Sentinels count down from vocab_size - 1 (<extra_id_0>).

  Args:
    tokens: int32 [length] raw ids (no EOS, no padding).
    seed: int [2] stateless seed (see masking.example_seed).
    vocab_size: vocabulary size INCLUDING the extra ids (32100 for T5).
    eos_id: end-of-sequence id appended to inputs and targets.
    noise_density: fraction of noise tokens.
    mean_noise_span_length: mean span length.

  Returns:
    dict: inputs int32 [n_in], targets int32 [n_tgt] (unpadded).
  """
  tokens = tf.cast(tokens, tf.int32)
  noise = random_spans_noise_mask(tf.size(tokens), seed, noise_density,
                                  mean_noise_span_length)
  first = tf.constant(vocab_size - 1, tf.int32)
  eos = tf.constant([eos_id], tf.int32)
  inputs = _replace_spans(tokens, noise, first)
  targets = _replace_spans(tokens, tf.logical_not(noise), first)
  return dict(inputs=tf.concat([inputs, eos], 0), targets=tf.concat([targets, eos], 0))


def _decoder_features(ex):
  """Adds decoder_input_tokens (targets shifted right, 0 at position 0) and loss weights."""
  targets = ex.pop("decoder_target_tokens")
  seg, pos = ex["decoder_segment_ids"], ex["decoder_positions"]
  shifted = tf.pad(targets[:-1], [[1, 0]])
  ex["decoder_input_tokens"] = tf.where((pos == 0) | (seg == 0), 0, shifted)
  ex["decoder_target_tokens"] = targets
  ex["decoder_loss_weights"] = tf.cast(seg > 0, tf.float32)
  return ex


def pad_seq2seq_example(ex, inputs_length: int, targets_length: int):
  """Pads (or cuts) one {inputs, targets} example to the batch contract.

  One example per row (the pipeline does not pack): segment ids are 1 on real
  tokens and positions count from 0, the features a packed row would carry.
  Inputs and targets longer than their row are cut (keeping the front, so a
  cut sequence loses its EOS, as with t5's trim). Other keys pass through.

  Args:
    ex: dict with inputs int [n] and targets int [m] (+ any other keys).
    inputs_length: encoder row length.
    targets_length: decoder row length.

  Returns:
    dict with encoder_input_tokens, encoder_segment_ids, encoder_positions
    [inputs_length]; decoder_input_tokens (targets shifted right),
    decoder_target_tokens, decoder_loss_weights, decoder_segment_ids,
    decoder_positions [targets_length], in place of inputs/targets.
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
