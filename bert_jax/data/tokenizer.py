"""Tokenizers: WordPiece (BERT vocab.txt) and SentencePiece (T5-style), in-graph.

Both implement the small `Tokenizer` interface of bert_jax.data.tokenizer_base
(tokenize in-graph, special ids, special / word_start tables, decode), which
is all the pipeline needs; `load_tokenizer` picks WordPiece, SentencePiece or
byte-level BPE (bert_jax.data.bpe) from the vocabulary path, and
`train_for_source` trains a SentencePiece model on a text source
(bert_jax.data.sources). Module order, no cycle: files -> tokenizer_base ->
bpe / sources -> tokenizer.

WordPiece reproduces Hugging Face's BertTokenizer (the `tokenizers` BertNormalizer
+ BertPreTokenizer + WordPiece) id for id; tf_text's own BERT normalisation is
NOT used because it applies NFKC case folding ('ﬁ' -> 'fi', 'ß' -> 'ss', full
width -> ASCII, '™' -> 'tm'), which Hugging Face and the original BERT do not.

Invalid UTF-8 never raises: see tokenizer_base (every `tokenize` replaces and
counts it).

Files may be local or remote (`gs://...`, or any filesystem TensorFlow knows,
e.g. `ram://` in tests): reading goes through tf.io.gfile, and a remote
SentencePiece model is trained in a local temporary folder, then copied (see
bert_jax/data/files.py).
"""
import contextlib
import os
import re
import shutil
import tempfile
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
from bert_jax.host_tf import tf
import tensorflow_text as tf_text

from bert_jax.data import bpe
from bert_jax.data import sources
from bert_jax.data.files import glob_paths, is_remote, isfile, open_text
from bert_jax.data.tokenizer_base import Tokenizer

# T5's convention: the sentinels are appended after the SentencePiece pieces,
# <extra_id_0> last, so sentinel i is vocab_size - 1 - i.
T5_EXTRA_IDS = 100
_WORDPIECE_SUFFIX = "##"
_SP_WORD_START = "\u2581"  # '▁', SentencePiece's marker of a preceding space


# ----------------------------------------------------------------------------
# WordPiece
# ----------------------------------------------------------------------------

# Hugging Face's BertNormalizer(clean_text=True) deletes NUL, U+FFFD and every
# "other" character except tab/newline/CR (Cc, Cf, Co; Cs cannot occur in
# valid UTF-8 and RE2 has no class for unassigned Cn), then maps whitespace
# (Rust's White_Space: Zs, tab/LF/CR, U+2028/9) to a space.
_CONTROL_RE = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\p{Cf}\p{Co}\x{FFFD}]"
_WHITESPACE_RE = r"[\t\n\r\p{Zs}\x{2028}\x{2029}]"
# CJK ideographs become words of their own (BERT's _is_chinese_char ranges).
_CJK_RE = (r"([\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
           r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}])")
# BertPreTokenizer: ASCII punctuation plus every Unicode P* character is a word.
_PUNCT_RE = r"[!-/:-@\[-`{-~\p{P}]"


class WordPieceTokenizer(Tokenizer):
  """BERT WordPiece from a vocab.txt, equal to Hugging Face's BertTokenizer.

  Text is normalised as BertNormalizer does (clean control characters, space
  out CJK ideographs; with lower_case also NFD + strip accents (Mn) + simple
  per-character lower-casing), split on spaces and punctuation, and each word
  is split greedily longest-match-first into pieces; a word longer than
  `max_chars_per_word` characters or with no segmentation is one [UNK].
  Bracketed strings such as "[MASK]" in raw text are ordinary text here.
  """

  def __init__(self, vocab_path: str, *, lower_case: bool = True,
               max_chars_per_word: int = 100, unk_token: str = "[UNK]"):
    """Loads `vocab_path` (one piece per line, id = line number).

    Args:
      vocab_path: BERT vocab.txt.
      lower_case: True for uncased vocabularies (lower-case and strip accents),
        False for cased ones.
      max_chars_per_word: longer words become [UNK] (Hugging Face's 100).
      unk_token: the unknown piece.
    """
    if not isfile(vocab_path):
      raise FileNotFoundError(f"WordPiece vocabulary {vocab_path} does not exist")
    with open_text(vocab_path) as f:
      pieces = [line.rstrip("\n") for line in f]
    if not pieces:
      raise ValueError(f"WordPiece vocabulary {vocab_path} is empty")
    index = {}
    for i, p in enumerate(pieces):
      index.setdefault(p, i)
    if unk_token not in index:
      raise ValueError(f"WordPiece vocabulary {vocab_path} has no unknown token {unk_token!r}")
    bracketed = re.compile(r"^\[[^\[\]]+\]$")
    super().__init__(
        vocab_path, pieces, pad_id=index.get("[PAD]"), unk_id=index[unk_token],
        cls_id=index.get("[CLS]"), sep_id=index.get("[SEP]"), mask_id=index.get("[MASK]"),
        special=[bool(bracketed.match(p)) for p in pieces],
        word_start=[not p.startswith(_WORDPIECE_SUFFIX) for p in pieces])
    self.lower_case = lower_case
    self.max_chars_per_word = max_chars_per_word
    self._unk_token = unk_token
    # Words reach it already split and bounded in characters, so its byte
    # limit (4 bytes per character at most) never fires on its own.
    self._wordpiece = tf_text.FastWordpieceTokenizer(
        vocab=pieces, suffix_indicator=_WORDPIECE_SUFFIX,
        max_bytes_per_word=4 * max_chars_per_word, token_out_type=tf.int32,
        unknown_token=unk_token, no_pretokenization=True)

  def normalize(self, texts: tf.Tensor) -> tf.Tensor:
    """BertNormalizer in graph: [n] valid-UTF-8 strings -> [n] normalised strings."""
    texts = tf.strings.regex_replace(texts, _CONTROL_RE, "")
    texts = tf.strings.regex_replace(texts, _WHITESPACE_RE, " ")
    texts = tf.strings.regex_replace(texts, _CJK_RE, r" \1 ")
    if self.lower_case:
      # Hugging Face strips accents before lower-casing, character by character.
      texts = tf_text.normalize_utf8(texts, "NFD")
      texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
      # ICU lower-cases a word-final capital sigma to 'ς'; Rust's per-character
      # to_lowercase (Hugging Face) always gives 'σ'.
      texts = tf.strings.regex_replace(texts, "\u03a3", "\u03c3")
      texts = tf.strings.lower(texts, encoding="utf-8")
    return texts

  def _encode(self, texts: tf.Tensor) -> tf.RaggedTensor:
    words = tf_text.regex_split(self.normalize(texts), " +|" + _PUNCT_RE, _PUNCT_RE)
    flat = words.flat_values  # [total_words]
    too_long = tf.strings.length(flat, unit="UTF8_CHAR") > self.max_chars_per_word
    flat = tf.where(too_long, self._unk_token, flat)
    pieces = self._wordpiece.tokenize(flat)  # [total_words, (pieces)]
    return words.with_flat_values(pieces).merge_dims(1, 2)  # [n, (ids)]

  def decode(self, ids) -> str:
    """Joins pieces, gluing '##' continuations; drops padding."""
    out = []
    for i in np.asarray(ids).reshape(-1):
      if i == self.pad_id:
        continue
      p = self.pieces[int(i)]
      if p.startswith(_WORDPIECE_SUFFIX) and out:
        out[-1] += p[len(_WORDPIECE_SUFFIX):]
      else:
        out.append(p)
    return " ".join(out)


# ----------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------

_BERT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")


def _extra_id_piece(i: int) -> str:
  return f"<extra_id_{i}>"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece .model, with T5 sentinels appended after its pieces.

  Ids 0 .. n-1 are the model's own pieces; ids n .. n+extra_ids-1 are the
  sentinels, <extra_id_0> being the last id (vocab_size - 1) and counting down,
  exactly as T5's vocabulary; `vocab_size` = n + extra_ids.
  """

  def __init__(self, model_path: str, *, extra_ids: int = T5_EXTRA_IDS):
    """Loads `model_path`.

    Args:
      model_path: a SentencePiece .model file; its pad id must be 0.
      extra_ids: number of T5 sentinels appended (100 in T5; 0 for none).
    """
    if not isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path} does not exist")
    with tf.io.gfile.GFile(model_path, "rb") as f:
      proto = f.read()
    try:
      sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
      raise ValueError(f"{model_path} is not a SentencePiece model: {e}") from e
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    clash = [p for p in pieces if re.fullmatch(r"<extra_id_\d+>", p)]
    if extra_ids and clash:
      raise ValueError(f"SentencePiece model {model_path} already contains sentinel "
                       f"pieces ({clash[:3]}...); load it with extra_ids=0")
    pieces += [_extra_id_piece(i) for i in reversed(range(extra_ids))]
    special = [sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(n)]
    special += [True] * extra_ids

    def user_id(token):
      # piece_to_id answers the unknown id for an absent piece.
      i = sp.piece_to_id(token)
      return None if i == sp.unk_id() else i

    super().__init__(
        model_path, pieces, pad_id=sp.pad_id(), unk_id=sp.unk_id(),
        cls_id=user_id("[CLS]"), sep_id=user_id("[SEP]"), mask_id=user_id("[MASK]"),
        eos_id=None if sp.eos_id() < 0 else sp.eos_id(), num_extra_ids=extra_ids,
        special=special,
        word_start=[p.startswith(_SP_WORD_START) for p in pieces])
    self._sp = sp
    self._num_model_pieces = n
    self._tf_sp = tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32)

  def _encode(self, texts: tf.Tensor) -> tf.RaggedTensor:
    return self._tf_sp.tokenize(texts)

  def decode(self, ids) -> str:
    """SentencePiece detokenisation, sentinels shown as <extra_id_i>; drops padding."""
    out, run = [], []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.pad_id:
        continue
      if i < self._num_model_pieces:
        run.append(i)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      out.append(self.pieces[i])
    if run:
      out.append(self._sp.decode(run))
    return " ".join(out)


def _iter_lines(inputs: Union[str, Sequence[str], Iterable[str]]) -> Iterable[str]:
  """Non-blank lines of files/globs (str, list or tuple), or of an iterable of text."""
  if isinstance(inputs, str):
    inputs = [inputs]
  inputs = list(inputs) if isinstance(inputs, (list, tuple)) else inputs
  if isinstance(inputs, list) and all(isinstance(x, (str, os.PathLike)) for x in inputs):
    paths = []
    for pattern in map(str, inputs):
      matched = sorted(glob_paths(pattern))
      if not matched:
        raise FileNotFoundError(f"tokenizer training input {pattern} matches no file")
      paths += matched
    def lines():
      for path in paths:
        with open_text(path, errors="replace") as f:
          for line in f:
            if line.strip():
              yield line.rstrip("\n")
    return lines()
  return (s for s in inputs if s.strip())


def train_sentencepiece(inputs, model_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", extra_ids: int = T5_EXTRA_IDS,
                        bert_special_tokens: bool = False,
                        character_coverage: float = 0.9995,
                        input_sentence_size: int = 1_000_000, seed: int = 0,
                        num_threads: Optional[int] = None) -> "SentencePieceTokenizer":
  """Trains a SentencePiece model on text (the `bert-jax train-tokenizer` command).

  Special ids: pad=0 always (the batch contract). T5 style (default): eos=1,
  unk=2, no bos, and `extra_ids` sentinels are NOT part of the model but
  appended after it when loaded (SentencePieceTokenizer(path, extra_ids=...)),
  so <extra_id_0> = vocab_size + extra_ids - 1. With bert_special_tokens:
  unk=1, [CLS]=2, [SEP]=3, [MASK]=4, no bos/eos. [CLS]/[SEP]/[MASK] are
  control symbols rather than user-defined ones: a literal "[MASK]" in the
  corpus then stays text instead of becoming the mask id (a label leak).

  Args:
    inputs: a path or glob, local or remote (plain or .gz text, one sentence
      or paragraph per line) or a list/tuple of them; any other iterable (a
      generator, e.g. bert_jax.data.sources.iter_paragraphs(spec)) yields the
      text itself.
    model_prefix: writes `<model_prefix>.model` and `<model_prefix>.vocab`;
      local or remote (gs://...).
    vocab_size: pieces in the SentencePiece model itself (T5: 32000); the
      loaded tokenizer's vocab_size adds `extra_ids`.
    model_type: 'unigram' (T5) or 'bpe', 'char', 'word'.
    extra_ids: sentinels appended by the returned tokenizer. T5 keeps them
      outside the .model file, so load it later with the same number:
      SentencePieceTokenizer(path, extra_ids=extra_ids).
    bert_special_tokens: reserve [CLS] [SEP] [MASK] for BERT-style pretraining.
    character_coverage: fraction of characters covered by the model.
    input_sentence_size: at most this many lines are sampled (shuffled) for
      training; 0 uses all.
    seed: seed of that sampling (SentencePiece's own random source).
    num_threads: trainer threads (default: all cores).

  Returns:
    The trained model loaded as a SentencePieceTokenizer (`.path` is the
    written .model file, `.vocab_size` counts the sentinels).

  Raises:
    ValueError naming `model_prefix` when SentencePiece refuses (e.g. no text,
    or a vocab_size the corpus cannot fill).
  """
  if extra_ids < 0:
    raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ValueError(f"model_type must be unigram, bpe, char or word, got {model_type!r}")
  lines = _iter_lines(inputs)
  ids = (dict(pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
              control_symbols=",".join(_BERT_SPECIAL_TOKENS))
         if bert_special_tokens else dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
  spm.set_random_generator_seed(seed)
  with _written_locally(model_prefix) as local_prefix:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_prefix=local_prefix, vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage,
          input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
          num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **ids)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training of {model_prefix}.model failed "
                       f"(vocab_size={vocab_size}): {e}") from e
  return SentencePieceTokenizer(model_prefix + ".model", extra_ids=extra_ids)


@contextlib.contextmanager
def _written_locally(model_prefix: str) -> Iterator[str]:
  """Yields a local prefix for SentencePiece to write `<prefix>.model/.vocab` to.

  SentencePiece writes with C++ file streams, so local files only: for a
  remote `model_prefix` it writes into a temporary folder, and the files are
  copied out on success. The .model goes last: a restarted run that finds it
  (train_for_source) finds a complete pair, and a GCS object appears whole.
  """
  if not is_remote(model_prefix):
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    yield model_prefix
    return
  tmp = tempfile.mkdtemp(prefix="bert_jax_spm_")
  try:
    local_prefix = os.path.join(tmp, "spm")
    yield local_prefix
    tf.io.gfile.makedirs(os.path.dirname(model_prefix))
    for ext in (".vocab", ".model"):
      tf.io.gfile.copy(local_prefix + ext, model_prefix + ext, overwrite=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


DEBERTA_SPM_FILE = "spm.model"  # the SentencePiece file of Hugging Face DeBERTa-v2/v3 folders


def load_tokenizer(path: str, *, lower_case: bool = True,
                   extra_ids: int = T5_EXTRA_IDS) -> Tokenizer:
  """WordPiece for a .txt vocabulary, SentencePiece for a .model file, BPE for vocab.json.

  A folder holding vocab.json + merges.txt (RoBERTa) gives the byte-level BPE
  of bert_jax.data.bpe; any other folder is searched for vocab.txt, then
  spiece.model / sentencepiece.model, then spm.model (DeBERTa-v2/v3's, loaded
  without T5 sentinels).
  `lower_case` applies to WordPiece, `extra_ids` to SentencePiece.
  """
  if bpe.is_bpe_folder(path) or os.path.basename(path) == bpe.VOCAB_FILE:
    return bpe.BpeTokenizer(path)  # RoBERTa / GPT-2 byte-level BPE
  if tf.io.gfile.isdir(path):
    for name in ("vocab.txt", "spiece.model", "sentencepiece.model"):
      if isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name), lower_case=lower_case,
                              extra_ids=extra_ids)
    # DeBERTa-v2/v3 folders ship spm.model: an encoder's vocabulary, no T5 sentinels.
    if isfile(os.path.join(path, DEBERTA_SPM_FILE)):
      return SentencePieceTokenizer(os.path.join(path, DEBERTA_SPM_FILE), extra_ids=0)
    raise FileNotFoundError(f"no vocab.txt or spiece.model in folder {path} (nor "
                            f"sentencepiece.model or {DEBERTA_SPM_FILE})")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, extra_ids=extra_ids)
  return WordPieceTokenizer(path, lower_case=lower_case)


def _naming_source(paragraphs: Iterator[str]) -> Iterator[str]:
  """The source's own errors (missing file, empty corpus) name its config key."""
  try:
    yield from paragraphs
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"config.data.source: {e}") from e


def train_for_source(data_config, out_dir: str) -> str:
  """Trains (once) a SentencePiece model on `data_config.source`; returns its path.

  For configs whose `data.tokenizer` is empty, e.g. the quick start on a
  builtin corpus: BERT-style objectives get [CLS]/[SEP]/[MASK] and no extra
  ids, span corruption gets T5's layout with `data.extra_ids` sentinels. The
  model is written to `out_dir/spm_<objective>_<vocab_size>.model` and reused
  when already there, so a restarted run tokenizes exactly as before.
  `out_dir` may be remote (gs://...; see train_sentencepiece).
  """
  t5_style = data_config.objective == "span_corruption"
  prefix = os.path.join(out_dir, f"spm_{data_config.objective}_{data_config.vocab_size}")
  if not isfile(prefix + ".model"):
    paragraphs = _naming_source(sources.iter_paragraphs(
        data_config.source, data_dir=data_config.data_dir or None, split=data_config.split))
    train_sentencepiece(paragraphs, prefix, data_config.vocab_size,
                        extra_ids=data_config.extra_ids if t5_style else 0,
                        bert_special_tokens=not t5_style)
  return prefix + ".model"
