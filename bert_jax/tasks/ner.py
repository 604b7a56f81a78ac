"""Named-entity recognition on CoNLL-format files: reader, features, entity F1, predictions.

Reader. `read_conll(path)` reads the CoNLL-2003 layout: one token per line,
whitespace-separated columns `word POS chunk NER` (the word first, the NER tag
last), a blank line between sentences, `-DOCSTART-` lines between documents
(not sentences). Every token line must have `num_columns` columns (4 for
CoNLL-2003; None takes the count of the first token line).

Tagging scheme. The original Reuters CoNLL-2003 files are IOB1 (an entity
starts with I-, B- only separates two adjacent entities of one type); many
re-distributions, including the copy under ../shared/data/conll2003
(kamalkraj/BERT-NER), are IOB2 (every entity starts with B-). The reader
always returns IOB2: it rewrites an I-X that follows O, a sentence start or
another type as B-X. That is the identity on IOB2 files (0 tags rewritten on
the shared copy, checked by the tests) and exactly the IOB1 -> IOB2
conversion otherwise; `ConllData.num_retagged` says how many tags changed.

Features follow BERT's NER recipe: [CLS] word pieces [SEP] (RoBERTa BPE:
<s> ... </s>, each word tokenized with a leading space), the word's label
on its first sub-word and -100 (ignored by the loss) on the others and on
[CLS]/[SEP]; `label_all_subwords=True` labels every sub-word instead
(continuations of a B-X word get I-X). Sentences longer than max_length are
truncated at a word boundary (words are not split across windows); the
dropped words are counted in `NerFeatures.num_truncated_sentences` /
`num_truncated_words` and predicted 'O' by `word_predictions`, so the metric
still scores every gold entity. A word that tokenizes to nothing (e.g. only
control characters) becomes [UNK] so that it keeps its label.

Spans (the span head, models/span.py). `span_label_array` turns a
sentence's entities (extract_entities of its tags, or any list, nested ones
included) into targets [length, max_span_length] indexed [first word, width
- 1]: 0 = not an entity, 1 + type index (`entity_types`), -100 past the
sentence. `decode_spans` reads the head's logits back into entities (flat:
greedily by descending probability, skipping overlaps) and `spans_to_tags`
into IOB2 tags, so all heads are scored by the same metric.

Metric. `entity_metrics` is conlleval's (and seqeval's default mode): an
entity is a maximal chunk (type, first token, last token); a predicted entity
is correct only when its type and both boundaries equal a gold one; an I-X
after O, after a sentence start or after another type starts a new entity (as
conlleval does); precision = correct / predicted, recall = correct / gold,
F1 = 2PR / (P + R), overall (micro) and per type, as fractions (conlleval
prints percentages).
"""
import collections
import dataclasses
import gzip
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bert_jax.tasks import glue

IGNORE_LABEL = -100
_TAG_RE = re.compile(r"^(O|[BIES]-\S+)$")


@dataclasses.dataclass(frozen=True)
class NerSentence:
  """One sentence: its words and IOB2 tags, and where it starts ('file:line')."""
  words: Tuple[str, ...]
  tags: Tuple[str, ...]
  source: str


@dataclasses.dataclass
class ConllData:
  """A read CoNLL file.

  Attributes:
    path: the file.
    sentences: in file order (-DOCSTART- lines are not sentences).
    num_documents: -DOCSTART- lines seen.
    num_retagged: tags rewritten by the IOB1 -> IOB2 conversion (0 when the
      file already was IOB2).
  """
  path: str
  sentences: List[NerSentence]
  num_documents: int
  num_retagged: int


def iob1_to_iob2(tags: Sequence[str]) -> List[str]:
  """IOB2 tags: an I-X not continuing an X chunk becomes B-X (identity on IOB2)."""
  out, previous = [], "O"
  for tag in tags:
    if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
      tag = "B-" + tag[2:]
    out.append(tag)
    previous = tag
  return out


def _conll_lines(path: str):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", newline="\n") as f:
    for number, line in enumerate(f, 1):
      yield number, line.rstrip("\n").rstrip("\r")


def read_conll(path: str, *, label_names: Optional[Sequence[str]] = None,
               num_columns: Optional[int] = 4) -> ConllData:
  """Reads a CoNLL-format NER file (plain or .gz) into IOB2 sentences.

  Args:
    path: the file.
    label_names: if given (e.g. the training set's labels), every tag after
      conversion must be one of them.
    num_columns: columns of every token line; None = as the first token line.

  Returns:
    ConllData.

  Raises:
    FileNotFoundError; ValueError naming file:line for a line with the wrong
    number of columns, a malformed tag or one outside label_names, or a file
    without sentences.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CoNLL file {path} does not exist")
  allowed = set(label_names) if label_names is not None else None
  sentences, words, tags, lines = [], [], [], []
  documents = retagged = 0

  def flush():
    nonlocal retagged
    if not words:
      return
    fixed = iob1_to_iob2(tags)
    for tag, new, number in zip(tags, fixed, lines):
      retagged += tag != new
      if allowed is not None and new not in allowed:
        raise ValueError(f"{path}:{number}: tag {new!r} is not in the label set "
                         f"{sorted(allowed)}")
    sentences.append(NerSentence(tuple(words), tuple(fixed), f"{path}:{lines[0]}"))
    words.clear(), tags.clear(), lines.clear()

  for number, line in _conll_lines(path):
    fields = line.split()
    if not fields:
      flush()
      continue
    if fields[0] == "-DOCSTART-":
      flush()
      documents += 1
      continue
    if num_columns is None:
      num_columns = len(fields)
    if len(fields) != num_columns:
      raise ValueError(f"{path}:{number}: {len(fields)} columns, expected {num_columns} "
                       "(word ... NER tag)")
    if not _TAG_RE.match(fields[-1]) or fields[-1][0] in "ES":
      raise ValueError(f"{path}:{number}: NER tag {fields[-1]!r} is not O, B-TYPE or "
                       "I-TYPE (IOB1/IOB2)")
    words.append(fields[0])
    tags.append(fields[-1])
    lines.append(number)
  flush()
  if not sentences:
    raise ValueError(f"{path}: no sentences (empty split)")
  return ConllData(path, sentences, documents, retagged)


def label_names_of(sentences: Sequence[NerSentence]) -> Tuple[str, ...]:
  """'O' then B-/I- of every entity type seen, types sorted: the label-id order.

  Both B-X and I-X are listed for each type X seen, so the model can emit
  either even if one never occurs in the data.
  """
  types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
  return ("O",) + tuple(f"{p}-{t}" for t in types for p in "BI")


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class NerFeatures:
  """Encoded sentences.

  Attributes:
    features: per sentence, 'encoder_input_tokens', 'encoder_type_ids' and
      'token_labels' int32 [length] (batch contract; pad with batching.pad_batch).
    word_positions: per sentence, int32 [num_words]: the position of each
      word's first sub-word, -1 for words dropped by truncation.
    num_truncated_sentences: sentences that lost words to max_length.
    num_truncated_words: words dropped in all.
  """
  features: List[Dict[str, np.ndarray]]
  word_positions: List[np.ndarray]
  num_truncated_sentences: int
  num_truncated_words: int


def encode_sentences(sentences: Sequence[NerSentence], tokenizer,
                     label_names: Sequence[str], *, max_length: int = 128,
                     label_all_subwords: bool = False) -> NerFeatures:
  """Token-classification features of each sentence (see the module docstring).

  Args:
    sentences: from read_conll.
    tokenizer: a bert_jax.data.tokenizer Tokenizer with [CLS] and [SEP].
    label_names: label-id order (label_names_of the training sentences).
    max_length: tokens per sentence, [CLS]/[SEP] included.
    label_all_subwords: label every sub-word, not just the first.

  Returns:
    NerFeatures.
  """
  if tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise ValueError(f"NER features need [CLS] and [SEP]; vocabulary {tokenizer.path} "
                     "lacks one")
  if max_length < 3:
    raise ValueError(f"max_length {max_length} leaves no room for a word")
  ids = {name: i for i, name in enumerate(label_names)}
  for s in sentences:
    for tag in s.tags:
      if tag not in ids:
        raise ValueError(f"{s.source}: tag {tag!r} of this sentence is not in the label set "
                         f"{list(label_names)}")
  # Byte-level BPE folds a word's preceding space into its first piece:
  # word_prefix (' ' there, '' for WordPiece) makes each word the pieces it
  # has after a space, for the first word too (Hugging Face's
  # is_split_into_words with add_prefix_space=True).
  pieces = glue.token_ids(tokenizer, [tokenizer.word_prefix + w
                                      for s in sentences for w in s.words])
  out = NerFeatures([], [], 0, 0)
  cursor = 0
  for s in sentences:
    word_pieces = pieces[cursor:cursor + len(s.words)]
    cursor += len(s.words)
    tokens, labels = [tokenizer.cls_id], [IGNORE_LABEL]
    positions = np.full(len(s.words), -1, np.int32)
    for w, (tag, p) in enumerate(zip(s.tags, word_pieces)):
      if not len(p):
        p = [tokenizer.unk_id]
      if len(tokens) + len(p) > max_length - 1:
        break  # the word and all after it are dropped, never half a word
      positions[w] = len(tokens)
      follow = (ids.get("I-" + tag[2:], ids[tag]) if tag.startswith("B-") else ids[tag])
      rest = follow if label_all_subwords else IGNORE_LABEL
      tokens.extend(p)
      labels.extend([ids[tag]] + [rest] * (len(p) - 1))
    dropped = int(np.sum(positions < 0))
    out.num_truncated_sentences += dropped > 0
    out.num_truncated_words += dropped
    tokens.append(tokenizer.sep_id)
    labels.append(IGNORE_LABEL)
    tokens = np.asarray(tokens, np.int32)
    out.features.append({"encoder_input_tokens": tokens,
                         "encoder_type_ids": np.zeros_like(tokens),
                         "token_labels": np.asarray(labels, np.int32)})
    out.word_positions.append(positions)
  return out


def word_predictions(token_predictions, word_positions: np.ndarray,
                     label_names: Sequence[str]) -> List[str]:
  """Word tags from one sentence's token predictions (first sub-word of each word).

  Args:
    token_predictions: label ids [length] or logits [length, num_labels]
      (padding allowed past the sentence).
    word_positions: NerFeatures.word_positions of the sentence.
    label_names: label-id order.

  Returns:
    One tag per word; 'O' for words dropped by truncation.
  """
  p = np.asarray(token_predictions)
  if p.ndim == 2:
    p = p.argmax(-1)
  return [label_names[int(p[i])] if i >= 0 else "O" for i in word_positions]


# ----------------------------------------------------------------------------
# Spans (the span-classification head, models/span.py)
# ----------------------------------------------------------------------------

def entity_types(label_names: Sequence[str]) -> Tuple[str, ...]:
  """The entity types of a BIO label set in label order: span class c + 1 is type c."""
  return tuple(name[2:] for name in label_names if name.startswith("B-"))


def span_label_array(spans: Sequence[Tuple[str, int, int]], num_words: int, length: int,
                     max_span_length: int, types: Sequence[str]) -> np.ndarray:
  """Span targets of one sentence: int32 [length, max_span_length].

  Cell [i, k] is the span of words i .. i + k: IGNORE_LABEL when it runs past
  the sentence (or i >= length), 0 when it is not an entity, 1 + the type's
  index when `spans` holds (type, i, i + k). Spans may nest or overlap (each
  is its own cell); one longer than max_span_length has no cell and is
  dropped (a miss the metric counts).
  """
  out = np.full((length, max_span_length), IGNORE_LABEL, np.int32)
  for i in range(min(num_words, length)):
    out[i, :min(max_span_length, num_words - i)] = 0
  ids = {t: c + 1 for c, t in enumerate(types)}
  for type_, first, last in spans:
    if last - first < max_span_length and first < length:
      out[first, last - first] = ids[type_]
  return out


def decode_spans(span_logits: np.ndarray, num_words: int, types: Sequence[str], *,
                 flat: bool = True) -> List[Tuple[str, int, int]]:
  """Predicted entities (type, first, last) of one sentence from its span logits.

  Args:
    span_logits: [>= num_words, max_span_length, 1 + len(types)], class 0 = 'O'.
    num_words: the sentence's (kept) words; spans past them are skipped.
    types: entity_types of the label set.
    flat: keep the spans whose best class is an entity by descending
      probability of that class, skipping any that overlaps one kept before
      (flat CoNLL output); False returns every such span (nested entities).

  Returns:
    Entities sorted by first word.
  """
  logits = np.asarray(span_logits, np.float64)[:num_words]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  label = probs.argmax(-1)  # [words, max_span_length]
  found = [(-probs[i, k, label[i, k]], i, i + k, types[label[i, k] - 1])
           for i, k in zip(*np.nonzero(label)) if i + k < num_words]
  taken = np.zeros(num_words, bool)
  out = []
  for _, first, last, type_ in sorted(found):
    if flat and taken[first:last + 1].any():
      continue
    taken[first:last + 1] = True
    out.append((type_, int(first), int(last)))
  return sorted(out, key=lambda e: (e[1], e[2]))


def spans_to_tags(spans: Sequence[Tuple[str, int, int]], num_words: int) -> List[str]:
  """IOB2 tags of non-overlapping entities (the inverse of extract_entities on IOB2)."""
  tags = ["O"] * num_words
  for type_, first, last in spans:
    if any(t != "O" for t in tags[first:last + 1]):
      raise ValueError(f"entity {(type_, first, last)} overlaps another; flat tags need "
                       "non-overlapping spans")
    tags[first:last + 1] = [f"B-{type_}"] + [f"I-{type_}"] * (last - first)
  return tags


def span_word_predictions(span_logits: np.ndarray, word_positions: np.ndarray,
                          label_names: Sequence[str]) -> List[str]:
  """Word tags of one sentence from the span head's logits ('O' for truncated words).

  Truncation drops the last words, so the kept words are the first ones.
  """
  kept = int(np.sum(np.asarray(word_positions) >= 0))
  spans = decode_spans(span_logits, kept, entity_types(label_names))
  return spans_to_tags(spans, kept) + ["O"] * (len(word_positions) - kept)


# ----------------------------------------------------------------------------
# Entity-level metric (conlleval)
# ----------------------------------------------------------------------------

def _split_tag(tag: str) -> Tuple[str, str]:
  return ("O", "") if tag == "O" else (tag[0], tag[2:])


def _chunk_ends(prev_prefix, prev_type, prefix, type_) -> bool:
  """conlleval's endOfChunk: does the chunk holding the previous tag end before this one?"""
  if prev_prefix in ("E", "S"):
    return True
  if prev_prefix in ("B", "I"):
    return prefix in ("B", "S", "O") or prev_type != type_
  return False


def _chunk_starts(prev_prefix, prev_type, prefix, type_) -> bool:
  """conlleval's startOfChunk: does a chunk start at this tag?"""
  if prefix in ("B", "S"):
    return True
  if prefix in ("I", "E"):
    return prev_prefix in ("E", "S", "O") or prev_type != type_
  return False


def extract_entities(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
  """Entities (type, first, last) of one sentence, by conlleval's chunk rules.

  Handles IOB1, IOB2 and IOBES tags as conlleval does; for IOB2 an I-X after
  O or after another type opens a new entity.
  """
  entities, start = [], None
  prev_prefix, prev_type = "O", ""
  for i, tag in enumerate(list(tags) + ["O"]):  # the trailing O closes the last chunk
    prefix, type_ = _split_tag(tag)
    if start is not None and _chunk_ends(prev_prefix, prev_type, prefix, type_):
      entities.append((prev_type, start, i - 1))
      start = None
    if _chunk_starts(prev_prefix, prev_type, prefix, type_):
      start = i
    prev_prefix, prev_type = prefix, type_
  return entities


def _prf(correct: int, predicted: int, gold: int) -> Dict[str, float]:
  precision = correct / predicted if predicted else 0.0
  recall = correct / gold if gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1,
          "num_gold": gold, "num_predicted": predicted, "num_correct": correct}


def entity_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
                   ) -> Dict[str, object]:
  """conlleval/seqeval entity precision, recall and F1, overall and per type.

  Args:
    gold: per sentence, the gold tags.
    predicted: per sentence, the predicted tags (same lengths).

  Returns:
    {'precision', 'recall', 'f1' (overall, micro), 'accuracy' (token level),
     'num_gold', 'num_predicted', 'num_correct', 'per_type': {type: the
     same precision/recall/f1/counts}}. Metrics without a denominator are 0.0.
  """
  if len(gold) != len(predicted):
    raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
  counts = collections.defaultdict(lambda: [0, 0, 0])  # type -> correct, predicted, gold
  tokens = right = 0
  for i, (g, p) in enumerate(zip(gold, predicted)):
    if len(g) != len(p):
      raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    tokens += len(g)
    right += sum(a == b for a, b in zip(g, p))
    gold_entities, pred_entities = set(extract_entities(g)), set(extract_entities(p))
    for e in gold_entities:
      counts[e[0]][2] += 1
    for e in pred_entities:
      counts[e[0]][1] += 1
    for e in gold_entities & pred_entities:
      counts[e[0]][0] += 1
  total = np.sum(list(counts.values()) or [[0, 0, 0]], axis=0)
  out = _prf(*map(int, total))
  out["accuracy"] = right / tokens if tokens else 0.0
  out["per_type"] = {t: _prf(*c) for t, c in sorted(counts.items())}
  return out


# ----------------------------------------------------------------------------
# Predictions file
# ----------------------------------------------------------------------------

def write_predictions(path: str, sentences: Sequence[NerSentence],
                      predicted: Sequence[Sequence[str]]) -> None:
  """Writes `word gold predicted` per token, a blank line after each sentence.

  This is conlleval's input layout (its last two columns are gold and
  prediction), so the official script can score the file.
  """
  if len(sentences) != len(predicted):
    raise ValueError(f"{len(sentences)} sentences but {len(predicted)} predictions")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for s, p in zip(sentences, predicted):
      if len(p) != len(s.words):
        raise ValueError(f"{s.source}: {len(s.words)} words but {len(p)} predicted tags")
      for word, gold, tag in zip(s.words, s.tags, p):
        f.write(f"{word} {gold} {tag}\n")
      f.write("\n")
