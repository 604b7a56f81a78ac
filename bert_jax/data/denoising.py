"""BART's noising functions as tf.data graph ops (Lewis et al. 2020).

One raw chunk of token ids (no BOS/EOS) is corrupted into the encoder input;
the decoder reconstructs the chunk itself. The noises, applied in fairseq's
order (sentence permutation, then masking, then insertion, then rotation):

  * sentence permutation: the chunk is split after each run of full-stop
    tokens and the sentences are shuffled;
  * text infilling: span lengths ~ Poisson(lambda), in words, until
    `mask_ratio` of the words are covered; each span becomes ONE mask token
    (or, with probability `mask_random`, one random ordinary token), and a
    span of length 0 inserts a mask; spans start at word starts and run over
    whole words, as fairseq's `mask_length='span-poisson'`;
  * token deletion: `delete_ratio` of the tokens are removed;
  * document rotation: with probability `rotate_ratio` the chunk is rotated to
    start at a uniformly drawn token.

The paper's best combination (and the defaults of configs/bart.py) is text
infilling with 30% of the words at lambda 3 plus sentence permutation.

Every draw comes from the example's stateless seed (masking.example_seed), so
an example is a pure function of (seed, epoch, index): the pipeline's exact
resume and per-host sharding hold as for the other objectives. Lengths: the
inputs never exceed the chunk plus its inserted masks; the pipeline cuts a
row that would overflow (keeping the front).

  ex = bart_denoising(chunk, seed, vocab, options)   # inputs, targets
  row = span_corruption.pad_seq2seq_example(ex, seq_length, seq_length)
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from bert_jax.host_tf import tf

# Poisson probabilities below this are dropped, as fairseq truncates its
# categorical (it stops at the first k with P(k) < 1e-7).
_POISSON_TAIL = 1e-7
# Extra span lengths drawn beyond the masking budget, so that the drawn
# lengths cover it even when many are 0 (see _span_lengths).
_EXTRA_DRAWS = 16


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
  """The noising rates (config.data fields of objective 'denoising').

  Attributes:
    mask_ratio: fraction of the words covered by infilled spans (0.3).
    poisson_lambda: mean span length in words (3.0; fairseq's released
      recipe uses 3.5).
    mask_random: probability that a span becomes a random token instead of
      the mask token (0.1 in fairseq's BART recipe).
    permute_sentences: fraction of sentences that are shuffled (1.0: all).
    delete_ratio: fraction of tokens deleted (token deletion; 0: off).
    rotate_ratio: probability of a document rotation (0: off).
  """
  mask_ratio: float = 0.3
  poisson_lambda: float = 3.0
  mask_random: float = 0.1
  permute_sentences: float = 1.0
  delete_ratio: float = 0.0
  rotate_ratio: float = 0.0

  def __post_init__(self):
    for name in ("mask_ratio", "mask_random", "permute_sentences", "delete_ratio",
                 "rotate_ratio"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"data.{name}={value} must be in [0, 1]")
    if self.mask_ratio > 0 and self.poisson_lambda <= 0:
      raise ValueError(f"data.poisson_lambda={self.poisson_lambda} must be > 0")


def options_from_config(cfg) -> NoiseOptions:
  """The NoiseOptions of a data config (mask_rate and random_prob carry over from MLM)."""
  return NoiseOptions(mask_ratio=cfg.mask_rate, poisson_lambda=cfg.poisson_lambda,
                      mask_random=cfg.random_prob, permute_sentences=cfg.permute_sentences,
                      delete_ratio=cfg.delete_ratio, rotate_ratio=cfg.rotate_ratio)


def poisson_probs(lam: float) -> np.ndarray:
  """P(k) of Poisson(lam) for k = 0, 1, ... until it drops below 1e-7 (float64)."""
  probs, p, k = [], math.exp(-lam), 0
  while True:
    probs.append(p)
    if p < _POISSON_TAIL or k >= 127:
      return np.array(probs)
    k += 1
    p *= lam / k


def _span_lengths(budget, lam: float, seed):
  """Span lengths (>= 0, in words) whose sum is exactly `budget`.

  Draws budget + 16 Poisson lengths, keeps them up to the first whose running
  sum reaches the budget, and trims that last one to the budget, as fairseq
  does. In the astronomically rare case that the draws fall short, the last
  kept span is lengthened to the budget.

  Args:
    budget: int32 scalar >= 0, words to cover.
    lam: Poisson mean.
    seed: int [2] stateless seed.

  Returns:
    int32 [num_spans] lengths (zeros are inserts), summing to `budget`.
  """
  logits = tf.math.log(tf.constant(poisson_probs(lam), tf.float32))[None]  # [1, K]
  # No budget, no spans (and no insert): fairseq returns the chunk unchanged.
  draws = tf.random.stateless_categorical(logits, budget + _EXTRA_DRAWS, seed,
                                          dtype=tf.int32)[0]  # [budget + 16]
  total = tf.cumsum(draws)
  reached = tf.cast(total >= budget, tf.int32)
  count = tf.where(tf.reduce_any(total >= budget), tf.argmax(reached, output_type=tf.int32) + 1,
                   tf.size(draws))
  lengths = draws[:count]
  before = tf.reduce_sum(lengths[:-1])
  last = tf.reshape(budget - before, [1])
  lengths = tf.concat([lengths[:-1], last], 0)
  return lengths[:tf.where(budget > 0, tf.size(lengths), 0)]


def _random_choice(n, k, seed):
  """k distinct indices of [0, n) in random order (k <= n), from a stateless seed."""
  order = tf.argsort(tf.random.stateless_uniform([n], seed))
  return order[:k]


def _random_ordinary(n, ordinary_ids, seed):
  """n ids drawn uniformly from `ordinary_ids` (int32 [V'])."""
  pick = tf.random.stateless_uniform([n], seed, 0, tf.size(ordinary_ids), dtype=tf.int32)
  return tf.gather(ordinary_ids, pick)


def permute_sentences(tokens, is_full_stop, seed, ratio: float = 1.0):
  """Shuffles the chunk's sentences (`ratio` of them change places).

  A sentence ends after each run of full-stop tokens; the chunk's end closes
  the last one, as if a full stop followed it.

  Args:
    tokens: int32 [n].
    is_full_stop: bool [n].
    seed: int [2] stateless seed.
    ratio: fraction of the sentences that are permuted among themselves.

  Returns:
    int32 [n], the same tokens with the sentences reordered.
  """
  n = tf.size(tokens)
  nxt = tf.concat([is_full_stop[1:], [False]], 0)
  ends = (is_full_stop & ~nxt) | (tf.range(n) == n - 1)  # last token of each sentence
  sentence = tf.cumsum(tf.cast(ends, tf.int32), exclusive=True)  # [n] sentence of each token
  sentences = tf.RaggedTensor.from_value_rowids(tokens, sentence)  # [S, (len)]
  num = sentences.nrows(out_type=tf.int32)
  moved = tf.cast(tf.math.ceil(tf.cast(num, tf.float32) * ratio), tf.int32)
  s_pick, s_order = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  chosen = _random_choice(num, moved, s_pick)  # [moved] sentences that change places
  shuffled = tf.gather(chosen, _random_choice(moved, moved, s_order))
  order = tf.tensor_scatter_nd_update(tf.range(num), chosen[:, None], shuffled)  # [S]
  return tf.gather(sentences, order).flat_values


def text_infilling(tokens, is_word_start, seed, *, mask_id: int, ordinary_ids,
                   mask_ratio: float, poisson_lambda: float, mask_random: float):
  """Replaces Poisson-length word spans by one mask each; 0-length spans insert one.

  Args:
    tokens: int32 [n] raw ids.
    is_word_start: bool [n]; spans start at word starts and cover whole words.
    seed: int [2] stateless seed.
    mask_id: the mask token.
    ordinary_ids: int32 [V'] ids a random replacement is drawn from.
    mask_ratio: fraction of the words to cover.
    poisson_lambda: mean span length in words.
    mask_random: probability that a span's replacement is a random id.

  Returns:
    int32 [n'] the noised tokens.
  """
  n = tf.size(tokens)
  num_words = tf.reduce_sum(tf.cast(is_word_start, tf.int32))
  budget = tf.cast(tf.math.ceil(tf.cast(num_words, tf.float32) * mask_ratio), tf.int32)
  s_len, s_start, s_rand, s_ids, s_ins = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  lengths = _span_lengths(budget, poisson_lambda, s_len)  # [m] in words
  spans = tf.boolean_mask(lengths, lengths > 0)  # [k]
  num_inserts = tf.size(lengths) - tf.size(spans)
  k = tf.minimum(tf.size(spans), num_words)  # every span starts at its own word
  spans = spans[:k]
  start_word = _random_choice(num_words, k, s_start)  # [k]
  # Token offsets of the words, plus n as the end of the last one.
  word_tok = tf.concat([tf.cast(tf.where(is_word_start)[:, 0], tf.int32), [n]], 0)
  start_tok = tf.gather(word_tok, start_word)  # [k]
  end_tok = tf.gather(word_tok, tf.minimum(start_word + spans, num_words))  # [k]
  # A span keeps its first token (as its mask) and drops the rest; a token
  # inside another span's rest is dropped even if a span starts on it, as in
  # fairseq, where the deletions come after the mask writes.
  delta = (tf.math.unsorted_segment_sum(tf.ones_like(start_tok), start_tok + 1, n + 1)
           - tf.math.unsorted_segment_sum(tf.ones_like(end_tok), end_tok, n + 1))
  dropped = tf.cumsum(delta)[:n] > 0  # [n]
  is_start = tf.scatter_nd(start_tok[:, None], tf.ones([k], tf.bool), [n])
  replace = tf.where(tf.random.stateless_uniform([n], s_rand) < mask_random,
                     _random_ordinary(n, ordinary_ids, s_ids), mask_id)
  noised = tf.boolean_mask(tf.where(is_start, replace, tokens), ~dropped)
  return insert_masks(noised, num_inserts, s_ins, mask_id=mask_id, ordinary_ids=ordinary_ids,
                      mask_random=mask_random)


def insert_masks(tokens, count, seed, *, mask_id: int, ordinary_ids, mask_random: float):
  """Inserts `count` masks (a `mask_random` share of them random ids) at random places."""
  n = tf.size(tokens)
  total = n + count
  s_slot, s_ids = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  slots = _random_choice(total, count, s_slot)  # [count] positions of the inserts
  is_insert = tf.scatter_nd(slots[:, None], tf.ones([count], tf.bool), [total])
  num_random = tf.cast(tf.math.ceil(tf.cast(count, tf.float32) * mask_random), tf.int32)
  fill = tf.where(tf.range(count) < num_random, _random_ordinary(count, ordinary_ids, s_ids),
                  mask_id)  # the first ceil(count * mask_random) inserts are random ids
  out = tf.scatter_nd(slots[:, None], fill, [total])
  keep_at = tf.cast(tf.where(~is_insert)[:, 0], tf.int32)
  return tf.tensor_scatter_nd_update(out, keep_at[:, None], tokens)


def delete_tokens(tokens, seed, ratio: float):
  """Removes ceil(n * ratio) tokens chosen uniformly."""
  n = tf.size(tokens)
  count = tf.cast(tf.math.ceil(tf.cast(n, tf.float32) * ratio), tf.int32)
  gone = tf.scatter_nd(_random_choice(n, count, seed)[:, None], tf.ones([count], tf.bool), [n])
  return tf.boolean_mask(tokens, ~gone)


def rotate(tokens, seed, probability: float):
  """With `probability`, rotates the chunk to start at a uniformly drawn token."""
  n = tf.size(tokens)
  s_coin, s_at = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  at = tf.random.stateless_uniform([], s_at, 0, tf.maximum(n, 1), dtype=tf.int32)
  at = tf.where(tf.random.stateless_uniform([], s_coin) < probability, at, 0)
  return tf.concat([tokens[at:], tokens[:at]], 0)


def bart_denoising(tokens, seed, *, options: NoiseOptions, mask_id: int, bos_id: int,
                   eos_id: int, word_start: np.ndarray, full_stop: np.ndarray,
                   ordinary_ids: np.ndarray):
  """BART's corruption of one raw chunk: {inputs, targets}, each BOS ... EOS.

  Args:
    tokens: int [n] raw ids (no BOS/EOS, no padding).
    seed: int [2] stateless seed (see masking.example_seed).
    options: the noising rates.
    mask_id, bos_id, eos_id: special ids.
    word_start: bool [vocab] table, True for pieces that begin a word.
    full_stop: bool [vocab] table, True for sentence-ending pieces.
    ordinary_ids: int32 ids random replacements are drawn from.

  Returns:
    dict: inputs int32 [n_in] (the noised chunk), targets int32 [n + 2]
    (the chunk), both wrapped in BOS ... EOS.
  """
  tokens = tf.cast(tokens, tf.int32)
  s_perm, s_mask, s_del, s_rot = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  word_start = tf.constant(np.asarray(word_start, bool))
  full_stop = tf.constant(np.asarray(full_stop, bool))
  ordinary = tf.constant(np.asarray(ordinary_ids, np.int32))
  noised = tokens
  if options.permute_sentences > 0:
    noised = permute_sentences(noised, tf.gather(full_stop, noised), s_perm,
                               options.permute_sentences)
  if options.mask_ratio > 0:
    noised = text_infilling(noised, tf.gather(word_start, noised), s_mask, mask_id=mask_id,
                            ordinary_ids=ordinary, mask_ratio=options.mask_ratio,
                            poisson_lambda=options.poisson_lambda,
                            mask_random=options.mask_random)
  if options.delete_ratio > 0:
    noised = delete_tokens(noised, s_del, options.delete_ratio)
  if options.rotate_ratio > 0:
    noised = rotate(noised, s_rot, options.rotate_ratio)
  bos, eos = tf.constant([bos_id], tf.int32), tf.constant([eos_id], tf.int32)
  return dict(inputs=tf.concat([bos, noised, eos], 0), targets=tf.concat([bos, tokens, eos], 0))


def full_stop_table(pieces) -> np.ndarray:
  """bool [vocab]: pieces that end a sentence ('.', '!', '?' alone, any word-start marker)."""
  marks = {".", "!", "?"}
  return np.array([p.lstrip("\u0120\u2581") in marks for p in pieces], bool)
