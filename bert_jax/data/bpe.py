"""Byte-level BPE (GPT-2 / RoBERTa vocab.json + merges.txt), equal to Hugging Face's.

RoBERTa checkpoints on the Hugging Face hub ship their tokenizer as two files:
`vocab.json` (piece -> id) and `merges.txt` (the BPE merges, best first). The
algorithm is GPT-2's:

  1. Pre-tokenisation: GPT-2's regular expression cuts the text into
     contractions ('s 't 're 've 'm 'll 'd), runs of letters, runs of digits,
     runs of other symbols (each optionally led by one space), and runs of
     whitespace (the last space of a run before a word stays with the word).
  2. Each pre-token's UTF-8 bytes are written as printable characters (GPT-2's
     byte -> character table: printable Latin-1 bytes stand for themselves,
     the other 68 bytes for U+0100 onwards, so a space is 'Ġ').
  3. BPE: the adjacent pair with the lowest merge rank is merged, everywhere
     in the word, until no adjacent pair has a rank.
  4. Each resulting piece is looked up in vocab.json.

Special tokens are looked up by name in vocab.json: <s> (classifier token,
also BOS), </s> (separator, also EOS), <pad>, <unk>, <mask>. A sequence is
`<s> A </s>`, a pair `<s> A </s></s> B </s>`, and RoBERTa has no token types
(`build_inputs` gives all zeros). The padding id is the vocabulary's <pad>
(1 for RoBERTa), not 0: the models read `BertConfig.pad_token_id`, and
bert_jax.tasks.batching.pad_batch takes `pad_id`.

Exactness. Ids equal Hugging Face's RobertaTokenizer (the `tokenizers` BPE
with the ByteLevel pre-tokenizer, add_prefix_space=False) on ordinary text;
tests/test_bpe.py checks every SST-2 dev sentence, pairs, and hand-written
Unicode. Differences, by design: special-token strings such as "<mask>" in
raw text are ordinary text here (Hugging Face turns them into the special id:
a label leak in fine-tuning data), and the letter/digit classes come from
Python's unicodedata (Unicode 14 in Python 3.11), so characters assigned in
later Unicode versions may be classed differently.

Words on their own. Token classification (CoNLL) and SQuAD tokenize each
word separately. In running text every word but the first follows a space,
which byte-level BPE folds into the word's first piece ('Ġword'), so such a
word is tokenized as `word_prefix + word` (' word'), the first word too:
that is what Hugging Face does for pre-split words (`is_split_into_words`
with add_prefix_space=True, which its token-classification examples require
for RoBERTa), so a word's pieces do not depend on where it stands.

Speed. Pure Python with a cache of pre-token -> ids: the BPE loop runs once
per distinct pre-token. `tokenize` serves tf.data too (through
tf.py_function), but fine-tuning calls it eagerly on lists of texts.
"""
import functools
import json
import os
import re
import sys
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from bert_jax.host_tf import tf

from bert_jax.data import files as files_lib
from bert_jax.data import tokenizer_base

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
_WORD_START = "\u0120"  # 'Ġ': a space byte in GPT-2's byte alphabet
# Unicode White_Space (what the Rust regex engine behind `tokenizers` calls
# \s). Python's own \s adds U+001C..U+001F, which GPT-2 treats as symbols.
_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f"
               "\u3000")


def bytes_to_unicode() -> Dict[int, str]:
  """GPT-2's table: each byte value -> the printable character standing for it.

  Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
  the 68 others (controls, space, soft hyphen, ...) take U+0100, U+0101, ...
  in byte order, so that no piece contains whitespace or control characters.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
               + list(range(0xAE, 0xFF + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _class_ranges(categories: Tuple[str, ...]) -> str:
  """A regex character-class body: every code point whose major category is listed."""
  parts, start, prev = [], None, None
  for cp in range(sys.maxunicode + 1):
    if unicodedata.category(chr(cp))[0] in categories:
      if start is None:
        start = cp
      prev = cp
      continue
    if start is not None:
      parts.append(re.escape(chr(start)) if start == prev
                   else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
      start = None
  if start is not None:
    parts.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
  return "".join(parts)


@functools.lru_cache(maxsize=None)
def pretokenize_pattern() -> "re.Pattern":
  """GPT-2's pre-tokenisation regex, with Unicode letter/number classes spelt out.

  Python's `re` has no \\p{L}/\\p{N}, so the classes are built once from
  unicodedata (about a second; cached for the process).
  """
  letters = _class_ranges(("L",))
  numbers = _class_ranges(("N",))
  ws = _WHITESPACE
  return re.compile(
      rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"
      rf"| ?[^{ws}{letters}{numbers}]+|[{ws}]+(?![^{ws}])|[{ws}]+")


def _read_vocab(path: str) -> Dict[str, int]:
  with files_lib.open_text(path) as f:
    try:
      vocab = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"BPE vocabulary {path} is not valid JSON: {e}") from e
  if not isinstance(vocab, dict) or not vocab:
    raise ValueError(f"BPE vocabulary {path} should be a non-empty JSON object piece -> id")
  ids = sorted(vocab.values())
  if ids != list(range(len(ids))):
    raise ValueError(f"BPE vocabulary {path}: ids are not 0..{len(ids) - 1} without gaps "
                     "or repeats")
  return vocab


def _read_merges(path: str) -> Dict[Tuple[str, str], int]:
  """(left, right) -> rank; the '#version' header line is skipped."""
  ranks = {}
  with files_lib.open_text(path) as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if (number == 1 and line.startswith("#version")) or not line:
        continue
      pair = line.split(" ")
      if len(pair) != 2:
        raise ValueError(f"{path}:{number}: a merge is two pieces separated by one space, "
                         f"got {line!r}")
      ranks.setdefault((pair[0], pair[1]), len(ranks))
  return ranks


class BpeTokenizer(tokenizer_base.Tokenizer):
  """Byte-level BPE from vocab.json + merges.txt (RoBERTa, GPT-2); see the module docstring.

  Attributes (besides Tokenizer's):
    merges_path: the merges file.
    add_prefix_space: whether a space is put before each text (Hugging Face's
      option of the same name; False for RoBERTa sequence tasks).
    lower_case: always False (read by SQuAD post-processing).
  """
  word_prefix = " "
  lower_case = False

  def __init__(self, vocab_path: str, merges_path: Optional[str] = None, *,
               add_prefix_space: bool = False):
    """Loads the two files.

    Args:
      vocab_path: vocab.json, or a folder holding vocab.json and merges.txt.
      merges_path: merges.txt (default: beside vocab_path).
      add_prefix_space: put a space before each text, as if it followed a word.
    """
    if tf.io.gfile.isdir(vocab_path):
      vocab_path = os.path.join(vocab_path, VOCAB_FILE)
    merges_path = merges_path or os.path.join(os.path.dirname(vocab_path), MERGES_FILE)
    for path in (vocab_path, merges_path):
      if not files_lib.isfile(path):
        raise FileNotFoundError(f"BPE tokenizer file {path} does not exist")
    vocab = _read_vocab(vocab_path)
    pieces = [None] * len(vocab)
    for piece, i in vocab.items():
      pieces[i] = piece
    if "<unk>" not in vocab:
      raise ValueError(f"BPE vocabulary {vocab_path} has no unknown token '<unk>'")
    names = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
    super().__init__(
        vocab_path, pieces, pad_id=vocab.get("<pad>"), unk_id=vocab["<unk>"],
        cls_id=vocab.get("<s>"), sep_id=vocab.get("</s>"), mask_id=vocab.get("<mask>"),
        eos_id=vocab.get("</s>"), special=[p in names for p in pieces],
        word_start=[p.startswith(_WORD_START) for p in pieces], require_zero_pad=False)
    if self.pad_id is None:
      raise ValueError(f"BPE vocabulary {vocab_path} has no padding token '<pad>'")
    self.merges_path = str(merges_path)
    self.add_prefix_space = add_prefix_space
    self._vocab = vocab
    self._ranks = _read_merges(merges_path)
    self._byte_char = bytes_to_unicode()
    self._char_byte = {c: b for b, c in self._byte_char.items()}
    self._pattern = pretokenize_pattern()
    self._cache: Dict[str, Tuple[int, ...]] = {}

  # -------------------------------------------------------------- encoding
  def _bpe(self, word: str) -> List[str]:
    """The merged pieces of one pre-token written in the byte alphabet."""
    parts = list(word)
    ranks = self._ranks
    while len(parts) > 1:
      best, best_rank = None, None
      for pair in zip(parts, parts[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best, best_rank = pair, rank
      if best is None:
        break
      # Merge every occurrence of the best pair, left to right, no overlaps.
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _pretoken_ids(self, pretoken: str) -> Tuple[int, ...]:
    ids = self._cache.get(pretoken)
    if ids is None:
      word = "".join(self._byte_char[b] for b in pretoken.encode("utf-8"))
      # Every byte is a piece of any trained byte-level vocabulary; <unk>
      # only stands in for one missing from a hand-made one.
      ids = tuple(self._vocab.get(p, self.unk_id) for p in self._bpe(word))
      self._cache[pretoken] = ids
    return ids

  def encode(self, text: str) -> List[int]:
    """Ids of one text, without <s>/</s>."""
    if self.add_prefix_space and text and not text.startswith(" "):
      text = " " + text
    ids = []
    for pretoken in self._pattern.findall(text):
      ids.extend(self._pretoken_ids(pretoken))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
    """`encode` of each text."""
    return [self.encode(t) for t in texts]

  def _ragged(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(flat ids int32, row splits int64) of the texts."""
    encoded = self.encode_batch(texts)
    splits = np.zeros(len(encoded) + 1, np.int64)
    splits[1:] = np.cumsum([len(e) for e in encoded])
    flat = np.fromiter((i for e in encoded for i in e), np.int32, count=int(splits[-1]))
    return flat, splits

  def _encode(self, texts: tf.Tensor) -> tf.RaggedTensor:
    # Python BPE: eagerly when called from Python, through tf.py_function
    # inside a tf.data map or a tf.function.
    if tf.executing_eagerly():
      flat, splits = self._ragged([t.decode("utf-8") for t in texts.numpy().tolist()])
    else:
      def run(t):
        return self._ragged([s.decode("utf-8") for s in t.numpy().tolist()])
      flat, splits = tf.py_function(run, [texts], (tf.int32, tf.int64))
      flat.set_shape([None])
      splits.set_shape([None])
    return tf.RaggedTensor.from_row_splits(flat, splits, validate=False)

  # ---------------------------------------------------------- layout
  def num_special_tokens(self, pair: bool) -> int:
    """<s> A </s> (2) or <s> A </s></s> B </s> (4)."""
    return 4 if pair else 2

  def build_inputs(self, a, b=None) -> Tuple[np.ndarray, np.ndarray]:
    """RoBERTa's `<s> A </s>` / `<s> A </s></s> B </s>`; type ids all 0 (none in RoBERTa).

    Args:
      a: ids of the first text (no special tokens).
      b: ids of the second text, or None.

    Returns:
      (tokens, type_ids), int32 [length] each.
    """
    cls, sep = [self.cls_id], [self.sep_id]
    parts = [cls, a, sep] + ([sep, b, sep] if b is not None else [])
    tokens = np.concatenate([np.asarray(p, np.int32) for p in parts]).astype(np.int32)
    return tokens, np.zeros_like(tokens)

  # ---------------------------------------------------------- decoding
  def decode(self, ids) -> str:
    """The text of `ids` (padding dropped; other special tokens written as their piece).

    Bytes that do not form valid UTF-8 (a cut multi-byte character) become U+FFFD.
    """
    out, run = [], []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.pad_id:
        continue
      piece = self.pieces[int(i)]
      if self.special[i]:
        out.append(bytes(run).decode("utf-8", errors="replace"))
        out.append(piece)
        run = []
      else:
        run.extend(self._char_byte[c] for c in piece)
    out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)


def is_bpe_folder(path: str) -> bool:
  """True when `path` is a folder holding vocab.json and merges.txt."""
  return (tf.io.gfile.isdir(path) and files_lib.isfile(os.path.join(path, VOCAB_FILE))
          and files_lib.isfile(os.path.join(path, MERGES_FILE)))
