"""BERT-family pretraining pieces as tf.data graph ops on token ids.

What the masking and pairing of examples share: the per-example stateless
seed, the vocabulary facts (`VocabInfo`), the SpanBERT / ALBERT span-length
tables, NSP / SOP pairing of one example, and its padding to the batch
contract. Every random choice is a stateless op seeded by a `[2]` seed
tensor, so a pipeline is reproducible bit for bit:

  seed = example_seed(run_seed, epoch, index)   # one per example, new each epoch
  pair_seed, mask_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

Masked-LM masking itself (token, whole-word, SpanBERT span, ALBERT n-gram)
runs on whole padded batches: bert_jax.data.batch_masking.

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
from bert_jax.host_tf import tf

# The schemes data.masking accepts; batch_masking.mask_tokens_batch implements them.
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
    """VocabInfo of a bert_jax.data.tokenizer_base.Tokenizer (its special/word_start tables).

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
  For NSP the pipeline has already drawn the random-next coin when it built
  the segments (bert_jax.data.examples), and passes it as `label`.

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


def pad_mlm_example(ex, seq_length: int):
  """Pads (or cuts) one MLM example to seq_length; other features pass through.

  One example per row (the pipeline does not pack): segment ids are 1 on real
  tokens and positions count from 0, the features a packed row would carry,
  so models take one attention path. mlm_*, sbo_*, nsp_labels and any other
  keys pass through; predictions beyond seq_length get weight 0.

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
