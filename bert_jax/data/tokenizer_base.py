"""The interface every in-graph tokenizer implements: `Tokenizer`.

WordPiece and SentencePiece (bert_jax.data.tokenizer) and byte-level BPE
(bert_jax.data.bpe) subclass it; the pipeline needs only this:
  * `tokenize(texts)`: tf.string tensor -> int32 ids, traceable inside a
    tf.data `map` (graph mode, no Python per example);
  * `vocab_size` and the special ids (`pad_id`, `unk_id`, `cls_id`, `sep_id`,
    `mask_id`, `eos_id`; None where the vocabulary has no such token);
  * `special` and `word_start`: numpy bool tables over the vocabulary, for the
    masking objectives (never mask / never sample a special id; whole-word
    masking needs to know which pieces start a word);
  * `require_mask_token()` and `sentinel_ids(n)`: fail early, naming the
    vocabulary, when an objective needs a token the vocabulary lacks;
  * `decode(ids)` and `id_to_piece(i)` for inspection.
It sits below the concrete tokenizers (and below tokenizer.load_tokenizer,
which picks one), so bpe.py can subclass it without importing tokenizer.py.

Invalid UTF-8: text is bytes in TensorFlow, and a corpus may hold stray
Latin-1 or truncated bytes. Every `tokenize` call first replaces each invalid
byte sequence with U+FFFD (files.fix_utf8; BERT normalisation then deletes it
and SentencePiece maps it to its unknown piece), and adds the number of
invalid bytes to the tokenizer's `invalid_utf8_bytes` counter (a tf.Variable,
summed over all calls, also inside tf.data). Nothing ever raises on bad bytes.
"""
from typing import Sequence, Union

import numpy as np
from bert_jax.host_tf import tf

from bert_jax.data import files as files_lib


class Tokenizer:
  """Common interface of the in-graph tokenizers (see the module docstring).

  Attributes:
    path: the vocabulary file it was built from (named in every error).
    pieces: tuple of str, the piece of every id (length vocab_size).
    vocab_size: number of ids, sentinels (extra ids) included.
    pad_id, unk_id, cls_id, sep_id, mask_id, eos_id: int or None.
    num_extra_ids: number of T5 sentinels at the top of the vocabulary.
    special: np.bool_ [vocab_size]; ids never to be masked nor used as random
      replacements (pad, unk, cls, sep, mask, eos, control pieces, sentinels,
      BERT's bracketed [unusedN] slots).
    word_start: np.bool_ [vocab_size]; True for pieces that begin a word
      (WordPiece: no '##' prefix; SentencePiece: a '▁' prefix). Special ids
      count as word starts (each is a word of its own).
    invalid_utf8_bytes: int64 tf.Variable, invalid input bytes seen so far.
  """

  # Put before a word tokenized on its own that follows other words (CoNLL
  # words, SQuAD context words); byte-level BPE (bpe.py) folds the space into
  # the word's first piece, WordPiece and SentencePiece need nothing.
  word_prefix = ""

  def __init__(self, path: str, pieces: Sequence[str], *, pad_id, unk_id,
               cls_id=None, sep_id=None, mask_id=None, eos_id=None,
               num_extra_ids=0, special=None, word_start=None, require_zero_pad=True):
    self.path = str(path)
    self.pieces = tuple(pieces)
    self.vocab_size = len(self.pieces)
    # Only checkpoints whose padding id is fixed (RoBERTa's BPE: 1) opt out.
    if require_zero_pad and pad_id != 0:
      raise ValueError(f"{self.path}: the padding id must be 0 (batch contract), "
                       f"this vocabulary has pad id {pad_id}")
    self.pad_id, self.unk_id = pad_id, unk_id
    self.cls_id, self.sep_id, self.mask_id, self.eos_id = cls_id, sep_id, mask_id, eos_id
    self.num_extra_ids = num_extra_ids
    self.special = np.array(special, bool)  # a copy: marked read-only below
    for i in (pad_id, unk_id, cls_id, sep_id, mask_id, eos_id):
      if i is not None:
        self.special[i] = True
    self.word_start = np.asarray(word_start, bool) | self.special
    self.special.setflags(write=False)
    self.word_start.setflags(write=False)
    self.invalid_utf8_bytes = tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name="invalid_utf8_bytes")

  def tokenize(self, texts) -> Union[tf.Tensor, tf.RaggedTensor]:
    """Token ids of each string, without [CLS]/[SEP]/EOS.

    Args:
      texts: tf.string scalar or 1-D tensor (or Python str / list of str).

    Returns:
      For a 1-D input of n strings, an int32 RaggedTensor [n, (ids)]; for a
      scalar, an int32 Tensor [ids].
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    if texts.shape.rank == 0:
      return self.tokenize(texts[tf.newaxis])[0]
    if texts.shape.rank not in (1, None):
      raise ValueError(f"tokenize takes a scalar or 1-D string tensor, got shape {texts.shape}")
    return self._encode(files_lib.fix_utf8(texts, self.invalid_utf8_bytes))

  def _encode(self, texts: tf.Tensor) -> tf.RaggedTensor:
    # Abstract: WordPieceTokenizer and SentencePieceTokenizer each define it.
    raise NotImplementedError(f"{type(self).__name__} must define _encode")

  def id_to_piece(self, i: int) -> str:
    """The vocabulary piece of id `i`."""
    return self.pieces[int(i)]

  def decode(self, ids) -> str:
    """Readable text for a sequence of ids (padding dropped), for inspection."""
    raise NotImplementedError(f"{type(self).__name__} must define decode")

  def num_special_tokens(self, pair: bool) -> int:
    """Special tokens `build_inputs` adds: [CLS] A [SEP] (2), [CLS] A [SEP] B [SEP] (3)."""
    return 3 if pair else 2

  def build_inputs(self, a, b=None):
    """BERT's `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]`, type ids 0 then 1 for B [SEP].

    Args:
      a: ids of the first text (no special tokens).
      b: ids of the second text, or None.

    Returns:
      (tokens, type_ids), int32 numpy arrays [length].
    """
    cls, sep = [self.cls_id], [self.sep_id]
    parts = [cls, a, sep] + ([b, sep] if b is not None else [])
    tokens = np.concatenate([np.asarray(p, np.int32) for p in parts]).astype(np.int32)
    types = np.zeros_like(tokens)
    types[len(a) + 2:] = 1  # B and its [SEP]
    return tokens, types

  def require_mask_token(self) -> int:
    """The [MASK] id; raises ValueError naming the vocabulary if it has none."""
    if self.mask_id is None:
      raise ValueError(
          f"masked-LM objective needs a [MASK] token, but the vocabulary {self.path} "
          "has none (train one with train_sentencepiece(..., bert_special_tokens=True) "
          "or use a BERT vocab.txt)")
    return self.mask_id

  def sentinel_ids(self, n: int) -> np.ndarray:
    """Ids of T5 sentinels <extra_id_0> .. <extra_id_{n-1}>: vocab_size-1 counting down.

    Raises:
      ValueError naming the vocabulary if it has fewer than n extra ids (more
      spans than sentinels would silently reuse ordinary tokens).
    """
    if n > self.num_extra_ids:
      raise ValueError(
          f"span corruption needs {n} sentinel ids but the vocabulary {self.path} has "
          f"{self.num_extra_ids} extra ids (load a SentencePiece model with "
          f"extra_ids >= {n}, or shorten the inputs so fewer spans are made)")
    return np.arange(self.vocab_size - 1, self.vocab_size - 1 - n, -1, dtype=np.int32)
