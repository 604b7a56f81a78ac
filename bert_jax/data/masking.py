"""BERT-family pretraining objectives as tf.data graph ops on token ids.

Dynamic masked-LM masking (token, whole-word, SpanBERT span, ALBERT n-gram) and
NSP / SOP sentence pairing. Everything here works on ONE example (1-D int32 id
tensors) inside `tf.data.Dataset.map`, and every random choice is a stateless
op seeded by a `[2]` seed tensor, so a pipeline is reproducible bit for bit:

  seed = example_seed(run_seed, epoch, index)   # one per example, new each epoch
  pair_seed, mask_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

The pipeline masks on whole padded batches instead, every scheme
(bert_jax.data.batch_masking, same contract, a counter-based generator); the
per-example functions here stay the reference the batched ones are tested
against, and serve per-example maps (e.g. before packing.pack_mlm).

No tokenizer is needed: vocabulary facts come in a `VocabInfo` (special ids, a
bool table of special ids, and for whole-word schemes a bool table of word-start
pieces, both built by the tokenizer module).

MLM output is the gathered form of original BERT (see DESIGN.md, batch
contract): `encoder_input_tokens` (same length as the input, after masking) and
`mlm_positions` / `mlm_targets` / `mlm_weights`, each `max_predictions` wide,
positions ascending, padding slots 0 with weight 0.0.
"""
import dataclasses
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

MASKING_SCHEMES = ("token", "whole_word", "span", "ngram")


def example_seed(seed, epoch, index):
  """Derives the stateless seed of one example from (run seed, epoch, index).

  seed' = fold_in(fold_in([seed, 0], epoch), index). Same triple -> same seed,
  so reruns and restarts see identical masks; another epoch -> another seed, so
  masks are dynamic (RoBERTa style). Split it further with
  `tf.random.experimental.stateless_split` when one example needs several
  independent draws.

  Args:
    seed: run seed, Python int or int scalar tensor.
    epoch: epoch number, int scalar (tensor or Python int).
    index: example index within the epoch, int scalar (e.g. from
      `Dataset.enumerate()`).

  Returns:
    int64 tensor of shape [2], usable as `seed=` of any `tf.random.stateless_*`.
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(index, tf.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class VocabInfo:
  """Vocabulary facts the objectives need, without the tokenizer itself.

  Attributes:
    vocab_size: number of ids (rows of the embedding that may be produced).
    pad_id: padding id (0 in this project).
    cls_id: [CLS] id.
    sep_id: [SEP] id.
    mask_id: [MASK] id.
    special: bool [vocab_size]; True for ids that are never masked and never
      used as random replacements ([PAD], [CLS], [SEP], [MASK], [UNK], unused
      or sentinel ids, ...). pad/cls/sep/mask are forced True by `create`.
    word_start: bool [vocab_size] or None; True for pieces that begin a word
      (WordPiece: no '##' prefix; SentencePiece: '▁' prefix). Needed by the
      whole-word, span and n-gram schemes.
  """
  vocab_size: int
  pad_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  special: np.ndarray
  word_start: Optional[np.ndarray] = None

  @classmethod
  def create(cls, vocab_size: int, *, pad_id: int, cls_id: int, sep_id: int,
             mask_id: int, special_ids: Sequence[int] = (),
             special: Optional[np.ndarray] = None,
             word_start: Optional[np.ndarray] = None) -> "VocabInfo":
    """Builds a VocabInfo, marking pad/cls/sep/mask and `special_ids` special.

    Args:
      vocab_size: number of ids.
      pad_id: padding id.
      cls_id: [CLS] id.
      sep_id: [SEP] id.
      mask_id: [MASK] id.
      special_ids: further special ids (e.g. [UNK], sentinels).
      special: optional bool [vocab_size] table to start from.
      word_start: optional bool [vocab_size] word-start table.

    Returns:
      The validated VocabInfo.
    """
    table = (np.zeros(vocab_size, bool) if special is None
             else np.array(special, bool).copy())
    ids = [pad_id, cls_id, sep_id, mask_id, *special_ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"special ids {bad} are outside the vocabulary [0, {vocab_size})")
    if table.shape == (vocab_size,):
      table[ids] = True
    ws = None if word_start is None else np.asarray(word_start, bool)
    return cls(vocab_size, pad_id, cls_id, sep_id, mask_id, table, ws)

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "VocabInfo":
    """VocabInfo of a bert_jax.data.tokenizer.Tokenizer (its special/word_start tables).

    Raises:
      ValueError: naming the missing token when the vocabulary lacks
        [CLS], [SEP] or [MASK].
    """
    missing = [n for n in ("cls_id", "sep_id", "mask_id") if getattr(tokenizer, n) is None]
    if missing:
      raise ValueError(f"masked-LM pretraining needs {missing} but the vocabulary "
                       f"{getattr(tokenizer, 'path', '?')} has none")
    return cls.create(tokenizer.vocab_size, pad_id=tokenizer.pad_id, cls_id=tokenizer.cls_id,
                      sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
                      special=tokenizer.special, word_start=tokenizer.word_start)

  def __post_init__(self):
    if np.shape(self.special) != (self.vocab_size,):
      raise ValueError(f"VocabInfo.special has shape {np.shape(self.special)}, "
                       f"expected ({self.vocab_size},)")
    if self.word_start is not None and np.shape(self.word_start) != (self.vocab_size,):
      raise ValueError(f"VocabInfo.word_start has shape {np.shape(self.word_start)}, "
                       f"expected ({self.vocab_size},)")
    if np.all(self.special):
      raise ValueError("VocabInfo.special marks every id special: no ordinary token "
                       "is left for random replacements")

  @property
  def ordinary_ids(self) -> np.ndarray:
    """int32 ids that are not special (the pool for random replacements)."""
    return np.flatnonzero(~self.special).astype(np.int32)


def spanbert_length_probs(p: float = 0.2, max_len: int = 10) -> np.ndarray:
  """P(span length = 1..max_len words): geometric(p) clipped and renormalised."""
  lengths = np.arange(1, max_len + 1)
  probs = p * (1 - p) ** (lengths - 1)
  return probs / probs.sum()


def ngram_length_probs(max_n: int = 3) -> np.ndarray:
  """ALBERT n-gram lengths 1..max_n with P(n) proportional to 1/n."""
  probs = 1.0 / np.arange(1, max_n + 1)
  return probs / probs.sum()


def num_to_predict(tokens, pad_id: int, max_predictions: int, rate: float = 0.15):
  """min(max_predictions, max(1, round(len * rate))), len counting [CLS]/[SEP].

  `round` is half-to-even on float64, as Python 3's `round` in the original
  create_pretraining_data.py (float32 would turn 30 * 0.15 into 5, not 4).
  """
  length = tf.reduce_sum(tf.cast(tf.not_equal(tokens, pad_id), tf.float64))
  n = tf.cast(tf.round(length * rate), tf.int32)
  return tf.minimum(max_predictions, tf.maximum(1, n))


def _word_structure(tokens, vocab: VocabInfo):
  """Groups maskable tokens into words.

  Returns a dict: cand [L] bool (maskable), word_of_token [L] int32 (-1 when
  not maskable), starts [W] / lengths [W] int32 (token start, #tokens of each
  word), run [W] int32 (id of the maximal run of maskable tokens holding the
  word; spans never leave a run, so never cross [SEP]).
  """
  special = tf.constant(vocab.special)
  cand = tf.logical_not(tf.gather(special, tokens))  # [L]
  prev_cand = tf.pad(cand[:-1], [[1, 0]])
  run_start = tf.logical_and(cand, tf.logical_not(prev_cand))
  if vocab.word_start is None:
    raise ValueError("whole-word, span and n-gram masking need VocabInfo.word_start "
                     "(the word-start table from the tokenizer)")
  is_start = tf.gather(tf.constant(vocab.word_start), tokens)
  start = tf.logical_and(cand, tf.logical_or(is_start, run_start))
  word_id = tf.cumsum(tf.cast(start, tf.int32)) - 1
  word_of_token = tf.where(cand, word_id, -1)
  num_words = tf.reduce_sum(tf.cast(start, tf.int32))
  positions = tf.range(tf.size(tokens))
  starts = tf.boolean_mask(positions, start)  # [W]
  lengths = tf.math.unsorted_segment_sum(
      tf.cast(cand, tf.int32), tf.where(cand, word_id, num_words), num_words + 1)[:-1]
  run_of_token = tf.cumsum(tf.cast(run_start, tf.int32))
  run = tf.gather(run_of_token, starts)
  return dict(cand=cand, word_of_token=word_of_token, starts=starts,
              lengths=lengths, run=run, num_words=num_words)


def _select_words(lengths, budget, seed):
  """Original BERT word selection: shuffle words, take each that still fits.

  A word that would overflow the budget is skipped and later (shorter) words
  may still be taken, exactly as create_pretraining_data.py does. Computed in
  vectorised rounds: each round takes the longest fitting prefix of the
  undecided words, then drops the first word that overflowed, so the number of
  rounds is the number of skipped words + 1, not the number of words.

  Returns:
    bool [W]: True for selected words (in the original word order).
  """
  num_words = tf.size(lengths)
  order = tf.argsort(tf.random.stateless_uniform([num_words], seed))
  shuffled = tf.gather(lengths, order)  # [W] lengths in visiting order
  idx = tf.range(num_words)

  def body(taken, alive, left):
    alive = tf.logical_and(alive, shuffled <= left)  # can never fit again
    cum = tf.cumsum(tf.where(alive, shuffled, 0))
    fit = tf.logical_and(alive, cum <= left)
    overflow = tf.logical_and(alive, tf.logical_not(fit))
    first_over = tf.reduce_min(tf.where(overflow, idx, num_words))
    left -= tf.reduce_sum(tf.where(fit, shuffled, 0))
    return tf.logical_or(taken, fit), tf.logical_and(alive, idx > first_over), left

  def cond(taken, alive, left):
    del taken
    return tf.logical_and(left > 0, tf.reduce_any(alive))

  taken, _, _ = tf.while_loop(
      cond, body, (tf.zeros([num_words], tf.bool), tf.ones([num_words], tf.bool), budget))
  return tf.scatter_nd(order[:, None], taken, [num_words])


def sample_span_lengths(num, probs: np.ndarray, seed):
  """Draws `num` span lengths in 1..len(probs) with P(length = k) = probs[k-1]."""
  logits = tf.math.log(tf.constant(probs, tf.float32))[None, :]
  return tf.cast(tf.random.stateless_categorical(logits, num, seed)[0], tf.int32) + 1


def _select_spans(words, budget, probs: np.ndarray, truncate: bool, seed):
  """Greedy span selection from random anchor words (SpanBERT / ALBERT n-gram).

  Visits the words in random order; at each anchor draws a length in words
  from `probs` (P(length = 1..len(probs))), clipped at the end of the run of
  maskable tokens. A span that overlaps an earlier one is dropped. A span that
  overflows the budget keeps the whole words that fit when `truncate`
  (SpanBERT) or is skipped (ALBERT n-grams, like whole words in BERT).

  Returns:
    span_of_word [W] int32: 1 + attempt index of the span holding the word,
    0 if none; the attempt index keys the per-span random draws.
  """
  s_order, s_len = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  num_words = words["num_words"]
  order = tf.argsort(tf.random.stateless_uniform([num_words], s_order))
  span_len = sample_span_lengths(num_words, probs, s_len)  # [W] one per attempt
  return _greedy_spans(order, span_len, words["lengths"], words["run"], budget, truncate)


def _greedy_spans(anchor, span_len, lengths, run, budget, truncate: bool):
  """The sequential attempt-by-attempt selection, computed in vectorised rounds.

  Attempt i covers words [lo_i, hi_i). Each round settles, in attempt order,
  every attempt up to the first one that overlaps an attempt accepted in the
  same round or overflows the budget; attempts overlapping spans of earlier
  rounds are rejected on the spot. So rounds = conflicts + overflows + 1, a
  few per example, instead of one loop step per attempt.

  Args:
    anchor: int32 [A] first word of each attempt, in visiting order.
    span_len: int32 [A] drawn length in words.
    lengths: int32 [W] tokens per word.
    run: int32 [W] run id of each word (non-decreasing).
    budget: int32 scalar, most tokens to select.
    truncate: keep the fitting words of an overflowing span (else skip it).

  Returns:
    span_of_word [W] int32 (1 + accepted attempt index, 0 = not selected).
  """
  num_words = tf.size(lengths)
  idx = tf.range(num_words)
  run_end = tf.math.unsorted_segment_max(idx, run, tf.reduce_max(tf.concat([run, [0]], 0)) + 1) + 1
  lo = anchor
  hi = tf.minimum(anchor + span_len, tf.gather(run_end, tf.gather(run, anchor)))
  before = tf.pad(tf.cumsum(lengths), [[1, 0]])  # [W + 1] tokens before each word
  tokens = tf.gather(before, hi) - tf.gather(before, lo)  # [A]
  cover = (lo[:, None] <= idx[None, :]) & (idx[None, :] < hi[:, None])  # [A, W]
  overlap = (lo[:, None] < hi[None, :]) & (lo[None, :] < hi[:, None])  # [A, A]
  earlier_overlap = overlap & (idx[None, :] < idx[:, None])  # j before i

  def body(span_of_word, alive, left):
    taken = tf.pad(tf.cumsum(tf.cast(span_of_word > 0, tf.int32)), [[1, 0]])
    alive &= tf.gather(taken, hi) == tf.gather(taken, lo)  # no word already taken
    conflict = alive & tf.reduce_any(earlier_overlap & alive[None, :], axis=1)
    cum = tf.cumsum(tf.where(alive, tokens, 0))
    over = alive & (cum > left)
    first = tf.reduce_min(tf.where(conflict | over, idx, num_words))
    accept = alive & (idx < first)
    left -= tf.reduce_sum(tf.where(accept, tokens, 0))
    owner = tf.reduce_max(tf.where(accept[:, None] & cover, idx[:, None] + 1, 0), axis=0)
    span_of_word = tf.maximum(span_of_word, owner)
    if truncate:  # SpanBERT keeps the whole words of an overflowing span that fit
      f = tf.minimum(first, num_words - 1)
      cut = (tf.gather(cover, f) & (tf.gather(before, idx + 1) - before[lo[f]] <= left)
             & (first < num_words) & tf.logical_not(conflict[f]))
      span_of_word = tf.where(cut, f + 1, span_of_word)
      left -= tf.reduce_sum(tf.where(cut, lengths, 0))
    return span_of_word, alive & (idx > first), left

  def cond(span_of_word, alive, left):
    del span_of_word
    return (left > 0) & tf.reduce_any(alive)

  span_of_word, _, _ = tf.while_loop(
      cond, body, (tf.zeros([num_words], tf.int32), tf.ones([num_words], tf.bool), budget))
  return span_of_word


def _span_boundaries(selected, group):
  """For each selected token, the positions just before and after its group."""
  pos = tf.range(tf.size(group))
  num = tf.reduce_max(tf.concat([group, [0]], 0)) + 1
  # Unselected tokens go to an extra segment `num`, dropped afterwards. A
  # group's tokens are contiguous, so its first/last position bound it.
  key = tf.where(selected, group, num)
  first = tf.math.unsorted_segment_min(pos, key, num + 1)
  last = tf.math.unsorted_segment_max(pos, key, num + 1)
  return tf.gather(first, key) - 1, tf.gather(last, key) + 1


def _apply_outcomes(tokens, selected, span_of_token, vocab: VocabInfo, mask_prob: float,
                    random_prob: float, seed_outcome, seed_random):
  """80/10/10: [MASK], a random ordinary id, or the token itself, at selected tokens.

  One uniform draw per token, or per span when `span_of_token` (span index
  per token) is given: then all tokens of a span share the outcome (SpanBERT),
  though each randomly replaced token gets its own random id.
  """
  length = tf.size(tokens)
  u = tf.random.stateless_uniform([length], seed_outcome)
  if span_of_token is not None:
    u = tf.gather(u, tf.maximum(span_of_token, 0))
  ordinary = tf.constant(vocab.ordinary_ids)
  random_ids = tf.gather(ordinary, tf.random.stateless_uniform(
      [length], seed_random, 0, ordinary.shape[0], tf.int32))
  replaced = tf.where(u < mask_prob, vocab.mask_id,
                      tf.where(u < mask_prob + random_prob, random_ids, tokens))
  return tf.where(selected, replaced, tokens)


def mask_tokens(tokens, seed, vocab: VocabInfo, *, max_predictions: int,
                scheme: str = "token", rate: float = 0.15, mask_prob: float = 0.8,
                random_prob: float = 0.1, span_probs: Optional[np.ndarray] = None):
  """Masked-LM masking of one example, in the gathered form of original BERT.

  Budget: `num_to_predict` (at most `max_predictions`, and never more than the
  maskable tokens). Maskable tokens: all but special ids and padding. Each
  chosen token becomes [MASK] with `mask_prob`, a uniform random ordinary
  (non-special) id with `random_prob`, and stays itself otherwise.

  Schemes:
    token: a uniform random set of tokens (BERT, RoBERTa).
    whole_word: whole words in random order, skipping a word that does not
      fit (BERT wwm); each sub-token draws its own 80/10/10 outcome.
    span: SpanBERT: spans of whole words, lengths geometric(0.2) clipped to
      1..10 words (`span_probs` overrides), ONE outcome per span. Also returns
      `sbo_left_positions` / `sbo_right_positions`: per prediction slot, the
      positions just outside its span (for the span-boundary objective).
    ngram: ALBERT: n-grams of whole words, P(n) ∝ 1/n for n <= 3
      (`span_probs` overrides), per-token outcome, skip when it does not fit.

  Args:
    tokens: int32 [length] ids, e.g. [CLS] A [SEP] B [SEP]; trailing padding
      (pad_id) allowed and never masked.
    seed: int [2] stateless seed (see `example_seed`).
    vocab: vocabulary facts.
    max_predictions: width of the mlm_* outputs (20 at length 128 in BERT).
    scheme: one of MASKING_SCHEMES.
    rate: fraction of tokens to predict (0.15).
    mask_prob: probability of [MASK] for a chosen token (0.8).
    random_prob: probability of a random token (0.1); keep = the rest.
    span_probs: length distribution for span/ngram schemes.

  Returns:
    dict: encoder_input_tokens int32 [length]; mlm_positions, mlm_targets int32
    [max_predictions]; mlm_weights float32 [max_predictions] (1.0 real, 0.0
    padding); plus sbo_left_positions / sbo_right_positions for scheme='span'.
  """
  if scheme not in MASKING_SCHEMES:
    raise ValueError(f"unknown masking scheme {scheme!r}; expected one of {MASKING_SCHEMES}")
  if not 0 <= mask_prob + random_prob <= 1 or min(mask_prob, random_prob) < 0:
    raise ValueError(f"mask_prob={mask_prob} and random_prob={random_prob} must be >= 0 "
                     "and sum to <= 1 (keep is the rest)")
  tokens = tf.cast(tokens, tf.int32)  # tokenizers may give int64
  budget = num_to_predict(tokens, vocab.pad_id, max_predictions, rate)
  s_select, s_outcome, s_random = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if scheme == "token":
    # Every word is one token: a random set of `budget` candidates, no loop.
    cand = tf.logical_not(tf.gather(tf.constant(vocab.special), tokens))
    scores = tf.where(cand, tf.random.stateless_uniform(tf.shape(tokens), s_select), -1.0)
    top = tf.math.top_k(scores, tf.minimum(budget, tf.size(tokens)), sorted=True)
    chosen = tf.boolean_mask(top.indices, top.values >= 0.0)  # never a non-candidate
    selected = tf.scatter_nd(chosen[:, None], tf.ones_like(chosen, tf.bool),
                             tf.shape(tokens))  # [L]
  elif scheme == "whole_word":
    words = _word_structure(tokens, vocab)
    taken = _select_words(words["lengths"], budget, s_select)
    selected = words["cand"] & tf.gather(taken, tf.maximum(words["word_of_token"], 0))
  else:
    words = _word_structure(tokens, vocab)
    safe_word = tf.maximum(words["word_of_token"], 0)
    if span_probs is None:
      span_probs = spanbert_length_probs() if scheme == "span" else ngram_length_probs()
    span_of_word = _select_spans(words, budget, np.asarray(span_probs), scheme == "span",
                                 s_select)
    span_of_token = tf.where(words["cand"], tf.gather(span_of_word, safe_word), 0)
    selected = span_of_token > 0
    group = span_of_token - 1  # attempt index of the span

  masked = _apply_outcomes(tokens, selected, group if scheme == "span" else None, vocab,
                           mask_prob, random_prob, s_outcome, s_random)

  # [max_predictions] gathered form; positions come out ascending.
  positions = tf.cast(tf.where(selected)[:, 0], tf.int32)
  num = tf.size(positions)
  pad = [[0, max_predictions - num]]
  out = dict(
      encoder_input_tokens=masked,
      mlm_positions=tf.ensure_shape(tf.pad(positions, pad), [max_predictions]),
      mlm_targets=tf.ensure_shape(tf.pad(tf.gather(tokens, positions), pad),
                                  [max_predictions]),
      mlm_weights=tf.ensure_shape(tf.pad(tf.ones([num], tf.float32), pad),
                                  [max_predictions]))
  if scheme == "span":
    left, right = _span_boundaries(selected, group)
    for name, value in (("sbo_left_positions", left), ("sbo_right_positions", right)):
      out[name] = tf.ensure_shape(tf.pad(tf.gather(value, positions), pad),
                                  [max_predictions])
  return out


def truncate_pair(a, b, max_num_tokens: int, seed):
  """Original BERT truncate_seq_pair, vectorised.

  The original removes one token at a time from the longer side (from `b` on a
  tie), each from the front or the back with probability 1/2. The final
  lengths follow in closed form; the number removed from the front of each
  side is then Binomial(removed, 1/2).

  Args:
    a: int32 [la] first segment.
    b: int32 [lb] second segment.
    max_num_tokens: the most tokens a and b may keep together.
    seed: int [2] stateless seed.

  Returns:
    (a, b) truncated.
  """
  la, lb = tf.size(a), tf.size(b)
  excess = tf.maximum(la + lb - max_num_tokens, 0)
  first = tf.minimum(excess, tf.abs(la - lb))  # from the longer side alone
  rest = excess - first
  cut_a = tf.where(la > lb, first, 0) + rest // 2
  cut_b = tf.where(la > lb, 0, first) + rest - rest // 2
  s_a, s_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def cut(x, n, s):
    front = tf.cast(tf.random.stateless_binomial([], s, tf.cast(n, tf.float32), 0.5),
                    tf.int32)
    return x[front:tf.size(x) - (n - front)]

  return cut(a, cut_a, s_a), cut(b, cut_b, s_b)


def _join_pair(a, b, vocab: VocabInfo):
  """[CLS] a [SEP] b [SEP] and its token types (0 up to the first [SEP], then 1)."""
  cls = tf.constant([vocab.cls_id], tf.int32)
  sep = tf.constant([vocab.sep_id], tf.int32)
  tokens = tf.concat([cls, a, sep, b, sep], 0)
  types = tf.concat([tf.zeros([tf.size(a) + 2], tf.int32),
                     tf.ones([tf.size(b) + 1], tf.int32)], 0)
  return tokens, types


def labelled_pair(segment_a, segment_b, label, seed, vocab: VocabInfo, *,
                  max_seq_length: int, target_length=None):
  """[CLS] A [SEP] B [SEP] of an already chosen pair, truncated, with its label.

  The pair is truncated with `truncate_pair` to max_seq_length - 3 tokens, or
  to `target_length` when that is smaller (BERT's short_seq_prob targets).

  Args:
    segment_a: int32 [la].
    segment_b: int32 [lb].
    label: int scalar, stored as nsp_labels.
    seed: int [2] stateless seed (truncation).
    vocab: vocabulary facts (cls/sep ids).
    max_seq_length: full length including [CLS] and two [SEP].
    target_length: optional int scalar (tensor or Python), most tokens of A
      and B together; None means max_seq_length - 3.

  Returns:
    dict: encoder_input_tokens, encoder_type_ids int32 (unpadded), nsp_labels
    int32 scalar.
  """
  limit = tf.constant(max_seq_length - 3, tf.int32)
  if target_length is not None:
    limit = tf.minimum(limit, tf.cast(target_length, tf.int32))
  a, b = truncate_pair(tf.cast(segment_a, tf.int32), tf.cast(segment_b, tf.int32), limit, seed)
  tokens, types = _join_pair(a, b, vocab)
  return dict(encoder_input_tokens=tokens, encoder_type_ids=types,
              nsp_labels=tf.cast(label, tf.int32))


def nsp_pair(segment_a, segment_b, random_segment, seed, vocab: VocabInfo, *,
             max_seq_length: int, random_next_prob: float = 0.5):
  """Next-sentence prediction example: [CLS] A [SEP] B [SEP].

  Input format: `segment_a` and `segment_b` are consecutive chunks of ONE
  document (each the concatenated ids of whole sentences, no [CLS]/[SEP]);
  `random_segment` is a chunk of ANOTHER document. With `random_next_prob`,
  B is replaced by `random_segment` (label 1, "random next"); else B follows
  A (label 0), as in the original. The pair is then truncated to
  max_seq_length - 3 tokens with `truncate_pair`. (The pipeline draws the
  coin when it builds the segments, bert_jax.data.examples, and calls
  `labelled_pair` instead.)

  Args:
    segment_a: int32 [la].
    segment_b: int32 [lb], the true continuation of segment_a.
    random_segment: int32 [lr], from another document.
    seed: int [2] stateless seed.
    vocab: vocabulary facts (cls/sep ids).
    max_seq_length: full length including [CLS] and two [SEP].
    random_next_prob: probability of a random B.

  Returns:
    dict: encoder_input_tokens, encoder_type_ids int32 [<= max_seq_length]
    (unpadded), nsp_labels int32 scalar (1 = B is random).
  """
  s_coin, s_trunc = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  is_random = tf.random.stateless_uniform([], s_coin) < random_next_prob
  b = tf.cond(is_random, lambda: tf.cast(random_segment, tf.int32),
              lambda: tf.cast(segment_b, tf.int32))
  return labelled_pair(segment_a, b, is_random, s_trunc, vocab, max_seq_length=max_seq_length)


def sop_pair(segment_a, segment_b, seed, vocab: VocabInfo, *, max_seq_length: int,
             swap_prob: float = 0.5, target_length=None):
  """Sentence-order prediction example (ALBERT): [CLS] A [SEP] B [SEP].

  Input format: `segment_a`, `segment_b` consecutive chunks of one document.
  With `swap_prob` they are swapped (label 1 = swapped order), then truncated
  with `labelled_pair` (to max_seq_length - 3 tokens or `target_length`).

  Args:
    segment_a: int32 [la], the earlier chunk.
    segment_b: int32 [lb], the chunk that follows it.
    seed: int [2] stateless seed.
    vocab: vocabulary facts (cls/sep ids).
    max_seq_length: full length including [CLS] and two [SEP].
    swap_prob: probability of swapping.
    target_length: optional int scalar, most tokens of A and B together.

  Returns:
    dict: encoder_input_tokens, encoder_type_ids int32 (unpadded), nsp_labels
    int32 scalar (1 = swapped); the label keeps the batch-contract name.
  """
  s_coin, s_trunc = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  swap = tf.random.stateless_uniform([], s_coin) < swap_prob
  a, b = tf.cast(segment_a, tf.int32), tf.cast(segment_b, tf.int32)
  first, second = tf.cond(swap, lambda: (b, a), lambda: (a, b))
  return labelled_pair(first, second, swap, s_trunc, vocab, max_seq_length=max_seq_length,
                       target_length=target_length)
