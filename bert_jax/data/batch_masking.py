"""Vectorised masked-LM masking of a [batch, length] block (all four schemes).

`mask_tokens_batch` masks a padded batch with a handful of elementwise ops,
with the per-row contract of one example (see its docstring). It replaced a
per-example tf.data map, whose per-element overhead and per-example
stateless RNG calls made it slower than a numpy collator.

Randomness is counter based: every random number is a pure function of (the
row's own [2] seed, position, stream), computed as the splitmix64 output
  mix(key + (2 * position + stream + 1) * 0x9E3779B97F4A7C15),
  key = mix(seed[1] ^ mix(seed[0] ^ salt))
with 64-bit unsigned integer ops (mix = the splitmix64 / Stafford "Mix13"
finaliser). So a row's mask does not depend on which other rows share its
batch, nor on the padded length, and the pipeline stays reproducible and
exactly resumable.

Selection of exactly the per-row budget ('token'): each maskable token gets a
unique int64 score (40 random bits above its position), non-maskable ones
-1; top_k(max_predictions) then keeps the first `budget` of the sorted
choices. 'whole_word' scores each word at its first piece, visits the words
in score order and takes each that still fits, in vectorised rounds.

'span' (SpanBERT) and 'ngram' (ALBERT) visit the words in the same score
order as anchors; each anchor's length in words comes from the low 32 bits
of stream 1 at its first piece (inverse CDF of the scheme's distribution),
and the attempt-by-attempt greedy span pass (its plain reference:
sequential_spans in tests/conftest.py) runs for all rows at once, one
accepted span per row and loop step. SpanBERT's one 80/10/10 draw per span
is the outcome draw of the span's first token.
Distinct uses of one position's bits take disjoint bit ranges: stream 0
high 40 (order) / low 24 (outcome), stream 1 high 32 (random id) / low 32
(span length).
"""
import numpy as np
from bert_jax.host_tf import tf

from bert_jax.data import masking

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Keeps this generator's streams apart from other uses of the same seed.
_SALT = 0x6D61736B5F746F6B  # "mask_tok"
_POS_BITS = 20  # positions < 2**20 share an int64 score with 40 random bits
BATCH_SCHEMES = ("token", "whole_word", "span", "ngram")


def _u64(value: int):
  return tf.constant(value, tf.uint64)


def _mix(z):
  """splitmix64 finaliser on uint64 tensors (a bijection with good avalanche)."""
  shr = tf.bitwise.right_shift
  z = tf.bitwise.bitwise_xor(z, shr(z, _u64(30))) * _u64(_MIX1)
  z = tf.bitwise.bitwise_xor(z, shr(z, _u64(27))) * _u64(_MIX2)
  return tf.bitwise.bitwise_xor(z, shr(z, _u64(31)))


def row_keys(seeds):
  """[batch, 2] int seeds (e.g. masking.example_seed per row) -> [batch] uint64 keys."""
  seeds = tf.bitcast(tf.cast(seeds, tf.int64), tf.uint64)  # two's complement bits
  inner = _mix(tf.bitwise.bitwise_xor(seeds[:, 0], _u64(_SALT)))
  return _mix(tf.bitwise.bitwise_xor(seeds[:, 1], inner))


def random_bits(keys, positions, stream: int):
  """uint64 random bits per (row key, position, stream in {0, 1}).

  Args:
    keys: uint64 [batch] row keys.
    positions: int [length] (the same for every row) or [batch, k].
    stream: 0 or 1.

  Returns:
    uint64 [batch, length] or [batch, k].
  """
  counter = tf.cast(positions, tf.int64) * 2 + (stream + 1)
  counter = tf.bitcast(counter, tf.uint64) * _u64(_GOLDEN)
  if counter.shape.rank == 1:
    counter = counter[None, :]
  return _mix(keys[:, None] + counter)


def num_to_predict_batch(tokens, pad_id: int, max_predictions: int, rate: float):
  """Per row min(max_predictions, max(1, round(len * rate))), len = non-pad tokens.

  `round` is half-to-even on float64, as Python 3's `round` in the original
  create_pretraining_data.py (float32 would turn 30 * 0.15 into 5, not 4).
  """
  length = tf.reduce_sum(tf.cast(tf.not_equal(tokens, pad_id), tf.float64), axis=1)
  n = tf.cast(tf.round(length * rate), tf.int32)
  return tf.minimum(max_predictions, tf.maximum(1, n))  # [batch]


def _scores(bits, cand):
  """int64 scores: 40 random high bits above the position (unique), -1 off `cand`."""
  pos = tf.range(tf.shape(bits)[1], dtype=tf.int64)
  score = tf.bitwise.bitwise_or(
      tf.bitwise.left_shift(tf.cast(tf.bitwise.right_shift(bits, _u64(24)), tf.int64),
                            tf.constant(_POS_BITS, tf.int64)), pos[None, :])
  return tf.where(cand, score, -1)


def _select_tokens(bits, cand, budget, k):
  """'token': the `budget` best-scored candidates -> (positions ascending, real) [batch, k]."""
  top = tf.math.top_k(_scores(bits, cand), k, sorted=True)  # [batch, k]
  valid = (tf.range(k)[None, :] < budget[:, None]) & (top.values >= 0)
  length = tf.shape(cand)[1]
  positions = tf.sort(tf.where(valid, top.indices, length), axis=1)  # invalid last
  return positions, positions < length


def _select_whole_words(tokens, bits, cand, budget, k, vocab: masking.VocabInfo):
  """'whole_word': words in random order, each taken if it still fits (BERT wwm).

  A word that would overflow the budget is skipped and later (shorter) words
  may still be taken, exactly as create_pretraining_data.py does. The per-row
  greedy pass runs in vectorised rounds for the whole batch: a round takes
  every row's longest fitting prefix of undecided words and drops its first
  overflowing word.
  """
  if vocab.word_start is None:
    raise ValueError("whole-word masking needs VocabInfo.word_start "
                     "(the word-start table from the tokenizer)")
  batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
  idx = tf.range(length)
  prev = tf.pad(cand[:, :-1], [[0, 0], [1, 0]])
  start = cand & (tf.gather(tf.constant(vocab.word_start), tokens) | ~prev)  # [batch, length]
  # Start position of the word holding each token: its word number indexes
  # the row's start positions in ascending order.
  word_num = tf.cumsum(tf.cast(start, tf.int32), axis=1) - 1  # [batch, length]
  starts = tf.sort(tf.where(start, idx[None, :], length), axis=1)
  word_start = tf.where(word_num >= 0,
                        tf.gather(starts, tf.maximum(word_num, 0), batch_dims=1), -1)
  in_word = cand & (word_start >= 0)
  flat = tf.where(in_word, word_start + (tf.range(batch) * length)[:, None],
                  batch * length)
  lengths = tf.reshape(tf.math.unsorted_segment_sum(
      tf.ones([batch * length], tf.int32), tf.reshape(flat, [-1]), batch * length + 1)[:-1],
      [batch, length])  # tokens per word, at its start position
  order = tf.argsort(_scores(bits, start), axis=1, direction="DESCENDING")
  shuffled = tf.gather(tf.where(start, lengths, 0), order, batch_dims=1)  # visiting order
  alive0 = tf.gather(start, order, batch_dims=1)

  def body(taken, alive, left):
    alive &= shuffled <= left[:, None]  # can never fit again
    cum = tf.cumsum(tf.where(alive, shuffled, 0), axis=1)
    fit = alive & (cum <= left[:, None])
    first_over = tf.reduce_min(tf.where(alive & ~fit, idx[None, :], length), axis=1)
    left -= tf.reduce_sum(tf.where(fit, shuffled, 0), axis=1)
    return taken | fit, alive & (idx[None, :] > first_over[:, None]), left

  def cond(taken, alive, left):
    del taken
    return tf.reduce_any((left[:, None] > 0) & alive)

  taken, _, _ = tf.while_loop(cond, body, (tf.zeros_like(alive0), alive0, budget))
  taken_at = tf.gather(taken, tf.argsort(order, axis=1), batch_dims=1)  # by start position
  selected = in_word & tf.gather(taken_at, tf.maximum(word_start, 0), batch_dims=1)
  return _first_k(selected, k)


def _first_k(selected, k):
  """The (at most k) selected positions, ascending -> (positions, real) [batch, k].

  Slots past a row's selections hold `length` and real=False.
  """
  length = tf.shape(selected)[1]
  idx = tf.range(length)
  top = tf.math.top_k(tf.where(selected, length - idx[None, :], -1), k, sorted=True)
  real = top.values >= 0
  return tf.where(real, top.indices, length), real


def _word_table(tokens, cand, vocab: masking.VocabInfo):
  """Words of maskable tokens, per row indexed by word number.

  A word starts at a word-start piece (no '##' / a '▁' piece) or where a run
  of maskable tokens starts, so specials split words and runs.

  Returns:
    dict of [batch, length] tensors: start (bool, token begins a word),
    word_num (word of each token, -1 before the first word), starts (first
    token of word w, `length` past the row's last word), lengths (tokens of
    word w, 0 past the last), run_end (1 + the last word of w's run of
    maskable tokens: spans never leave a run, so never cross [SEP]).
  """
  if vocab.word_start is None:
    raise ValueError("span and n-gram masking need VocabInfo.word_start "
                     "(the word-start table from the tokenizer)")
  batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
  idx = tf.range(length)
  run_start = cand & ~tf.pad(cand[:, :-1], [[0, 0], [1, 0]])
  start = cand & (tf.gather(tf.constant(vocab.word_start), tokens) | run_start)
  word_num = tf.cumsum(tf.cast(start, tf.int32), axis=1) - 1  # [batch, length]
  # A run's first token starts a word, so every maskable token has word_num
  # >= 0; the rest go to a dropped extra segment. One segment per (row, word).
  flat = tf.reshape(
      tf.where(cand, word_num + (tf.range(batch) * length)[:, None], batch * length), [-1])
  num = batch * length + 1

  def per_word(reduce, values):  # [batch, length] per-word reduction, by word number
    return tf.reshape(reduce(tf.reshape(values, [-1]), flat, num)[:-1], [batch, length])

  lengths = per_word(tf.math.unsorted_segment_sum, tf.ones_like(tokens))
  pos = tf.broadcast_to(idx[None, :], [batch, length])
  starts = tf.where(lengths > 0, per_word(tf.math.unsorted_segment_min, pos), length)
  run_of_token = tf.cumsum(tf.cast(run_start, tf.int32), axis=1)
  run = tf.where(lengths > 0, per_word(tf.math.unsorted_segment_min, run_of_token),
                 length + 1)  # non-decreasing along each row
  run_end = tf.searchsorted(run, run, side="right", out_type=tf.int32)
  return dict(start=start, word_num=word_num, starts=starts, lengths=lengths,
              run_end=run_end)


def _draw_lengths(bits, probs):
  """Span lengths 1..len(probs) from the low 32 bits of `bits` (inverse CDF, float64)."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 1 or probs.size == 0 or np.any(probs < 0) or probs.sum() <= 0:
    raise ValueError(f"span_probs={probs.tolist()} must be a non-empty 1-D list of "
                     "probabilities (P(length = 1), P(length = 2), ...) with a positive sum")
  cdf = tf.constant(np.cumsum(probs / probs.sum())[:-1])
  u = tf.cast(tf.bitwise.bitwise_and(bits, _u64(0xFFFFFFFF)), tf.float64) / 2.0**32
  table = tf.broadcast_to(cdf, tf.concat([tf.shape(u)[:-1], tf.shape(cdf)], 0))
  return 1 + tf.searchsorted(table, u, side="right", out_type=tf.int32)  # #(cdf <= u)


def _take_spans(lo, hi, need, before, blocked, left, truncate: bool, max_len: int):
  """Takes attempts [batch, A] in visiting order, one per row and loop step.

  An attempt that cannot be taken now never can later (words only get
  taken, the budget only shrinks), so each step moves every row straight to
  its first attempt that can be taken: steps = most spans in one row + 1,
  not the number of attempts. The loop holds [batch, A] and [batch] tensors
  only, updated elementwise (taking a span blocks the attempts it touches).

  Args:
    lo, hi: int32 [batch, A] word range of each attempt (hi - lo <= max_len).
    need: int32 [batch, A] tokens the attempt needs to be taken at all.
    before: int32 [batch, W + 1] tokens before each word.
    blocked: bool [batch, A] attempts that can never be taken.
    left: int32 [batch] budget left.
    truncate: keep the fitting words of an overflowing span.
    max_len: most words of a span.

  Returns:
    (end int32 [batch, A]: the word after the taken part of each taken
    attempt, 0 otherwise; left int32 [batch]).
  """
  num = tf.shape(lo)[1]
  aidx = tf.range(num)[None, :]
  steps = tf.range(1, max_len + 1)[None, :]  # [1, max_len]
  last = tf.shape(before)[1] - 1

  def at_pick(pick, values):  # [batch, 1] value of the picked attempt (0 if none)
    return tf.reduce_sum(tf.where(pick, values, 0), axis=1, keepdims=True)

  def body(end, blocked, left, more):
    del more
    ok = ~blocked & (need <= left[:, None])  # [batch, A]
    first = tf.reduce_min(tf.where(ok, aidx, num), axis=1, keepdims=True)
    pick = tf.equal(aidx, first)  # one-hot, or none when nothing can be taken
    lo_f, hi_f = at_pick(pick, lo), at_pick(pick, hi)  # [batch, 1]
    if truncate:  # tokens of the span's first 1..max_len words; keep those that fit
      cum = (tf.gather(before, tf.minimum(lo_f + steps, last), batch_dims=1)
             - tf.gather(before, lo_f, batch_dims=1))  # [batch, max_len]
      fits = (steps <= hi_f - lo_f) & (cum <= left[:, None])
      hi_f = lo_f + tf.reduce_sum(tf.cast(fits, tf.int32), axis=1, keepdims=True)
      used = tf.reduce_max(tf.where(fits, cum, 0), axis=1)
    else:
      used = at_pick(pick, need)[:, 0]
    return (tf.where(pick, hi_f, end), blocked | ((lo < hi_f) & (hi > lo_f)), left - used,
            tf.reduce_any(first < num))

  more = tf.reduce_any(~blocked & (need <= left[:, None]))
  end, _, left, _ = tf.while_loop(lambda end, blocked, left, more: more, body,
                                  (tf.zeros_like(lo), blocked, left, more))
  return end, left


def _owner_of_words(lo, end, num_words):
  """[batch, W]: 1 + anchor word of the taken span holding each word, 0 if none.

  Taken spans [lo, end) never overlap, so +(lo + 1) at lo and -(lo + 1) at
  end, summed along the row, mark exactly their words.
  """
  batch, size = tf.shape(lo)[0], num_words + 1
  offset = (tf.range(batch) * size)[:, None]
  dump = batch * size
  taken = end > 0
  keys = tf.concat([tf.where(taken, lo + offset, dump), tf.where(taken, end + offset, dump)], 1)
  delta = tf.math.unsorted_segment_sum(tf.reshape(tf.concat([lo + 1, -lo - 1], 1), [-1]),
                                       tf.reshape(keys, [-1]), dump + 1)[:-1]
  return tf.cumsum(tf.reshape(delta, [batch, size]), axis=1)[:, :num_words]


def _greedy_spans_batch(anchor, span_len, valid, lengths, run_end, budget, truncate: bool,
                        max_len: int = 10, window=None):
  """The sequential span attempts (conftest.sequential_spans), for every row at once.

  Attempt i of a row covers words [anchor_i, min(anchor_i + span_len_i,
  run_end)). In visiting order, an attempt touching a taken word is
  rejected; one that overflows the budget keeps its whole words that fit
  when `truncate` (SpanBERT), else is skipped (ALBERT, BERT wwm).

  Most rows fill their budget within their first few attempts, so the loop
  first runs on the first `window` attempts (cheaper steps), then on the
  rest from the state it left (usually over at once).

  Args:
    anchor: int32 [batch, A] first word of each attempt, in visiting order.
    span_len: int32 [batch, A] drawn length of each attempt, in words.
    valid: bool [batch, A]; False for slots past the row's attempts.
    lengths: int32 [batch, W] tokens per word.
    run_end: int32 [batch, W] 1 + the last word of each word's run.
    budget: int32 [batch] most tokens to select.
    truncate: keep the fitting words of an overflowing span (else skip it).
    max_len: most words of a span (>= every span_len).
    window: int (scalar tensor or Python) attempts of the first pass; None
      = all in one pass.

  Returns:
    int32 [batch, W]: 1 + anchor word of the span holding each word, 0 if none.
  """
  num_words = tf.shape(lengths)[1]
  lo = tf.where(valid, anchor, 0)
  hi = tf.minimum(lo + span_len, tf.gather(run_end, lo, batch_dims=1))  # [batch, A]
  before = tf.pad(tf.cumsum(lengths, axis=1), [[0, 0], [1, 0]])  # [batch, W + 1]
  # Tokens an attempt needs to be taken at all: its first word when a
  # prefix may be kept, else the whole span.
  need = (tf.gather(lengths, lo, batch_dims=1) if truncate else
          tf.gather(before, hi, batch_dims=1) - tf.gather(before, lo, batch_dims=1))
  if window is None:
    end, _ = _take_spans(lo, hi, need, before, ~valid, budget, truncate, max_len)
    return _owner_of_words(lo, end, num_words)
  c = tf.minimum(tf.cast(window, tf.int32), tf.shape(lo)[1])
  end, left = _take_spans(lo[:, :c], hi[:, :c], need[:, :c], before, ~valid[:, :c], budget,
                          truncate, max_len)
  owner = _owner_of_words(lo[:, :c], end, num_words)
  # The remaining attempts, blocked where they touch a span already taken.
  taken = tf.pad(tf.cumsum(tf.cast(owner > 0, tf.int32), axis=1), [[0, 0], [1, 0]])
  lo, hi = lo[:, c:], hi[:, c:]
  blocked = ~valid[:, c:] | (tf.gather(taken, hi, batch_dims=1)
                             != tf.gather(taken, lo, batch_dims=1))
  end, _ = _take_spans(lo, hi, need[:, c:], before, blocked, left, truncate, max_len)
  return owner + _owner_of_words(lo, end, num_words)


def _select_spans(tokens, keys, bits, cand, budget, vocab: masking.VocabInfo, probs,
                  truncate: bool):
  """'span' / 'ngram' -> int32 [batch, length]: first token of each selected token's span, -1 off.

  Anchors: every word once, in the order of its first piece's score (as
  'whole_word'); lengths drawn per anchor (stream 1, low bits).
  """
  words = _word_table(tokens, cand, vocab)
  order = tf.argsort(_scores(bits, words["start"]), axis=1, direction="DESCENDING")
  valid = tf.gather(words["start"], order, batch_dims=1)  # [batch, A]
  anchor = tf.maximum(tf.gather(words["word_num"], order, batch_dims=1), 0)
  span_len = _draw_lengths(random_bits(keys, order, 1), probs)
  # Twice the largest budget: most rows are done within that many attempts.
  window = 2 * tf.reduce_max(budget)
  owner = _greedy_spans_batch(anchor, span_len, valid, words["lengths"], words["run_end"],
                              budget, truncate, len(probs), window)  # [batch, W]
  word_num = tf.maximum(words["word_num"], 0)
  tok_owner = tf.where(cand, tf.gather(owner, word_num, batch_dims=1), 0)  # [batch, length]
  first = tf.gather(words["starts"], tf.maximum(tok_owner - 1, 0), batch_dims=1)
  return tf.where(tok_owner > 0, first, -1)


def _span_last(span_start):
  """Last token of each selected token's span ([batch, length], from the span starts)."""
  batch, length = tf.shape(span_start)[0], tf.shape(span_start)[1]
  key = tf.where(span_start >= 0, span_start + (tf.range(batch) * length)[:, None],
                 batch * length)
  pos = tf.broadcast_to(tf.range(length)[None, :], [batch, length])
  last = tf.math.unsorted_segment_max(tf.reshape(pos, [-1]), tf.reshape(key, [-1]),
                                      batch * length + 1)[:-1]
  return tf.gather(tf.reshape(last, [batch, length]), tf.maximum(span_start, 0), batch_dims=1)


def _apply_outcomes(tokens, keys, positions, real, targets, outcome_at,
                    vocab: masking.VocabInfo, mask_prob: float, random_prob: float):
  """80/10/10 at the k chosen slots -> the masked [batch, length] tokens.

  The outcome comes from the 24 low bits of stream 0 at `outcome_at` (the
  position itself, or its span's first token), independent of the high
  bits that ordered the choices; the replacement id from the high 32 bits of
  stream 1 at the position (multiply-shift into the ordinary ids).
  """
  length = tf.shape(tokens)[1]
  chosen_bits = random_bits(keys, outcome_at, 0)  # [batch, k]
  u = tf.cast(tf.bitwise.bitwise_and(chosen_bits, _u64((1 << 24) - 1)), tf.float32)
  u /= float(1 << 24)
  high = tf.bitwise.right_shift(random_bits(keys, positions, 1), _u64(32))
  pick = tf.bitwise.right_shift(high * _u64(len(vocab.ordinary_ids)), _u64(32))
  random_ids = tf.gather(tf.constant(vocab.ordinary_ids), tf.cast(pick, tf.int32))
  new = tf.where(u < mask_prob, vocab.mask_id,
                 tf.where(u < mask_prob + random_prob, random_ids, targets))
  # Unused slots write into an extra column that is cut off again (real
  # positions are distinct, so the scatter has no conflicting writes).
  rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(positions))
  cols = tf.where(real, positions, length)
  return tf.tensor_scatter_nd_update(tf.pad(tokens, [[0, 0], [0, 1]]),
                                     tf.stack([rows, cols], -1), new)[:, :length]


def mask_tokens_batch(tokens, seeds, vocab: masking.VocabInfo, *, max_predictions: int,
                      scheme: str = "token", rate: float = 0.15, mask_prob: float = 0.8,
                      random_prob: float = 0.1, span_probs=None):
  """Masked-LM masking of a padded batch (any of BATCH_SCHEMES), one seed per row.

  Per row: budget num_to_predict_batch (never more than the maskable tokens); special ids and
  padding never chosen; whole_word takes whole words in random order,
  skipping a word that no longer fits; span (SpanBERT) takes spans of whole
  words from random anchors, lengths geometric(0.2) in 1..10 words, keeping
  the fitting words of the span that overflows the budget; ngram (ALBERT)
  the same with P(n) ∝ 1/n, n <= 3, skipping an n-gram that does not fit;
  spans never overlap nor cross a special token. Each chosen token becomes
  [MASK] with `mask_prob`, a uniform random ordinary id with `random_prob`,
  else stays; 'span' draws that outcome once per span (each randomly
  replaced token still gets its own id).

  Args:
    tokens: int [batch, length] ids, trailing padding (pad_id) allowed;
      length < 2**20.
    seeds: int [batch, 2], one stateless seed per row (masking.example_seed).
    vocab: vocabulary facts (whole_word, span, ngram need vocab.word_start).
    max_predictions: width of the mlm_* outputs.
    scheme: one of BATCH_SCHEMES ('token', 'whole_word', 'span', 'ngram').
    rate: fraction of (non-pad) tokens to predict.
    mask_prob: probability of [MASK] for a chosen token.
    random_prob: probability of a random ordinary id; keep = the rest.
    span_probs: span/ngram: P(length = 1, 2, ... words); None = the scheme's
      default (masking.spanbert_length_probs / ngram_length_probs).

  Returns:
    dict: encoder_input_tokens int32 [batch, length]; mlm_positions (ascending),
    mlm_targets int32 [batch, max_predictions]; mlm_weights float32
    [batch, max_predictions] (1.0 real, 0.0 padding slots, whose position and
    target are 0); for 'span' also sbo_left_positions / sbo_right_positions
    int32 [batch, max_predictions]: the positions just before and after the
    slot's span (0 in padding slots).
  """
  if scheme not in BATCH_SCHEMES:
    raise ValueError(f"scheme={scheme!r} has no batched masking; expected one of "
                     f"{BATCH_SCHEMES}")
  if not 0 <= mask_prob + random_prob <= 1 or min(mask_prob, random_prob) < 0:
    raise ValueError(f"mask_prob={mask_prob} and random_prob={random_prob} must be >= 0 "
                     "and sum to <= 1 (keep is the rest)")
  if max_predictions < 1:
    raise ValueError(f"max_predictions={max_predictions} must be >= 1")
  tokens = tf.cast(tokens, tf.int32)  # [batch, length]
  length = tf.shape(tokens)[1]
  budget = num_to_predict_batch(tokens, vocab.pad_id, max_predictions, rate)  # [batch]
  keys = row_keys(seeds)  # [batch]
  bits = random_bits(keys, tf.range(length), 0)  # [batch, length]
  cand = tf.logical_not(tf.gather(tf.constant(vocab.special), tokens))
  k = tf.minimum(max_predictions, length)
  span_start = None
  if scheme == "token":
    positions, real = _select_tokens(bits, cand, budget, k)
  elif scheme == "whole_word":
    positions, real = _select_whole_words(tokens, bits, cand, budget, k, vocab)
  else:
    if span_probs is None:
      span_probs = (masking.spanbert_length_probs() if scheme == "span"
                    else masking.ngram_length_probs())
    span_start = _select_spans(tokens, keys, bits, cand, budget, vocab, span_probs,
                               truncate=scheme == "span")  # [batch, length]
    positions, real = _first_k(span_start >= 0, k)
  positions = tf.where(real, positions, 0)  # [batch, k]
  targets = tf.where(real, tf.gather(tokens, positions, batch_dims=1), 0)
  # SpanBERT: every token of a span reads the outcome draw of its first token.
  outcome_at = positions
  if scheme == "span":
    outcome_at = tf.where(real, tf.gather(span_start, positions, batch_dims=1), 0)
  masked = _apply_outcomes(tokens, keys, positions, real, targets, outcome_at, vocab,
                           mask_prob, random_prob)

  pad = [[0, 0], [0, tf.maximum(max_predictions - k, 0)]]
  width = [None, max_predictions]
  out = dict(encoder_input_tokens=tf.ensure_shape(masked, tokens.shape),
             mlm_positions=tf.ensure_shape(tf.pad(positions, pad), width),
             mlm_targets=tf.ensure_shape(tf.pad(targets, pad), width),
             mlm_weights=tf.ensure_shape(tf.pad(tf.cast(real, tf.float32), pad), width))
  if scheme == "span":  # span-boundary objective inputs, per prediction slot
    right = tf.gather(_span_last(span_start), positions, batch_dims=1) + 1
    for name, value in (("sbo_left_positions", outcome_at - 1), ("sbo_right_positions", right)):
      out[name] = tf.ensure_shape(tf.pad(tf.where(real, value, 0), pad), width)
  return out


def example_seeds(seed, epoch, indices):
  """Vectorised masking.example_seed: [n] indices -> [n, 2] int64 seeds.

  Equal row by row to example_seed(seed, epoch, index): fold_in(s, d) is
  [one draw from s, d], so the first word only depends on (seed, epoch)
  (checked by the tests against example_seed).
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  first = tf.random.stateless_uniform([], s, minval=None, maxval=None, dtype=tf.int64)
  indices = tf.cast(indices, tf.int64)
  return tf.stack([tf.fill(tf.shape(indices), first), indices], axis=1)
