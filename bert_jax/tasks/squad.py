"""Extractive question answering (SQuAD v1.1 and v2.0): reading files, building windows.

This module is the input side of a SQuAD run: everything that happens before
the model, from the JSON file and the tokenizer alone. The output side (logits
-> answer texts, the official EM/F1, predictions files) is
bert_jax.tasks.squad_eval; the split sits at the model because nothing after it
needs the file format or the tokenizer's vocabulary beyond `pieces`.

The pieces, in the order a fine-tuning run uses them:

  data = squad.read_squad("dev-v1.1.json")               # examples + counts + offset problems
  feats = squad.make_features(data.examples, tokenizer)   # numpy windows, batch contract names
  ...  model -> start_logits, end_logits, each [len(feats), max_seq_length]
  preds = squad_eval.postprocess(data.examples, feats, start_logits, end_logits,
                                 tokenizer, version_2=data.version_2)
  scores = squad_eval.evaluate(data, preds.texts)         # official EM / F1 (x 100)
  squad_eval.write_predictions("predictions.json", preds.texts)

Windows follow original BERT's run_squad: the context is split into
whitespace words (with a char -> word map), each word is WordPiece-tokenized on
its own, the answer's words become a sub-token span that is then narrowed to
the sub-tokens of the answer text itself; each window is
`[CLS] query [SEP] doc-window [SEP]` (type ids 0 then 1), windows start every
`doc_stride` sub-tokens, and the answer label is its position in the window, or
0 ([CLS]) when the answer is not wholly inside it or the question has none.
A doc token seen by several windows is marked as scored only in the window
where it has the most context (min(left, right) + 0.01 * window length);
squad_eval applies that mark. Windows and labels were checked equal to
run_squad's own on the SQuAD dev set (v1.1, and a v2.0 variant of it).

RoBERTa (byte-level BPE, bert_jax.data.bpe): the special tokens are the
tokenizer's own (`build_inputs`: `<s> query </s></s> doc </s>`, type ids all
0), padding is its pad_id, and every context word is tokenized as ' word'
(the space that precedes it in running text belongs to its first piece; the
word-by-word SQuAD features of Hugging Face did the same for RoBERTa), the
answer text likewise. The word mapping above then holds unchanged.
"""
import collections
import dataclasses
import gzip
import json
import logging
from typing import Optional, Sequence

import numpy as np

_log = logging.getLogger(__name__)


class SquadFormatError(ValueError):
  """A SQuAD file that is not valid JSON or lacks a required key (names both)."""


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Paragraph:
  """A context split into whitespace words, shared by all of its questions.

  Attributes:
    context: the original text.
    words: whitespace-separated words (run_squad's doc_tokens).
    char_to_word: int32 [len(context)], the word of each character; whitespace
      belongs to the word before it (-1 before the first word).
  """
  context: str
  words: tuple
  char_to_word: np.ndarray


@dataclasses.dataclass(eq=False)
class SquadExample:
  """One question with its paragraph and gold answers.

  Attributes:
    qas_id: the question id (the key of the predictions file).
    question: the question text.
    paragraph: the Paragraph it is asked about.
    answers: gold answer texts (empty for a v2.0 impossible question).
    answer_starts: their character offsets in the context, as given in the file.
    is_impossible: v2.0 question with no answer.
    start_word, end_word: word span of the training answer (the first answer
      whose text is found at its offset or, failing that, elsewhere in the
      context); -1 when impossible or when no answer could be located.
    label_text: the text of that answer ('' when none).
    title: the article title.
  """
  qas_id: str
  question: str
  paragraph: Paragraph
  answers: tuple
  answer_starts: tuple
  is_impossible: bool = False
  start_word: int = -1
  end_word: int = -1
  label_text: str = ""
  title: str = ""


@dataclasses.dataclass(frozen=True)
class OffsetMismatch:
  """A gold answer whose `answer_start` does not point at its text.

  Attributes:
    qas_id: the question.
    answer_index: which of its answers.
    answer_start: the offset in the file.
    text: the answer text.
    found_at: the occurrence of `text` in the context nearest to
      `answer_start` (used instead), or -1 when the context lacks it.
  """
  qas_id: str
  answer_index: int
  answer_start: int
  text: str
  found_at: int


@dataclasses.dataclass(eq=False)
class SquadData:
  """A parsed SQuAD file.

  Attributes:
    path: the file read.
    version_2: True for SQuAD v2.0 (impossible questions, null answers).
    examples: every question, in file order.
    num_articles, num_paragraphs, num_answers: counts in the file.
    offset_mismatches: answers whose offset does not match their text.
    unlocated: answerable examples none of whose answers could be placed in the
      context words (no training label; make_features(training=True) drops them).
  """
  path: str
  version_2: bool
  examples: list
  num_articles: int
  num_paragraphs: int
  num_answers: int
  offset_mismatches: list
  unlocated: list

  @property
  def num_questions(self) -> int:
    return len(self.examples)


def _is_whitespace(c: str) -> bool:
  # run_squad's definition (U+202F, the narrow no-break space, included).
  return c in " \t\r\n" or ord(c) == 0x202F


def split_words(context: str) -> Paragraph:
  """Splits `context` into whitespace words with the char -> word map."""
  words, char_to_word, prev_space = [], [], True
  for c in context:
    if _is_whitespace(c):
      prev_space = True
    else:
      if prev_space:
        words.append(c)
      else:
        words[-1] += c
      prev_space = False
    char_to_word.append(len(words) - 1)
  return Paragraph(context, tuple(words), np.asarray(char_to_word, np.int32))


def _get(obj, key: str, where: str, path: str, kind=None):
  """obj[key], or a SquadFormatError naming the file, the location and the key."""
  if not isinstance(obj, dict):
    raise SquadFormatError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise SquadFormatError(f"{path}: {where} has no key {key!r}")
  value = obj[key]
  if kind is not None and not isinstance(value, kind):
    raise SquadFormatError(f"{path}: {where}[{key!r}] should be {kind.__name__}, "
                           f"got {type(value).__name__}")
  return value


def _nearest_occurrence(context: str, text: str, start: int) -> int:
  best = -1
  i = context.find(text)
  while i >= 0:
    if best < 0 or abs(i - start) < abs(best - start):
      best = i
    i = context.find(text, i + 1)
  return best


def _place_answer(paragraph: Paragraph, text: str, start: int):
  """(start_word, end_word) of an answer at char `start`, or None (run_squad's check)."""
  if not text.strip():
    return None
  s = int(paragraph.char_to_word[start])
  e = int(paragraph.char_to_word[start + len(text) - 1])
  covered = " ".join(paragraph.words[max(s, 0):e + 1])
  if s < 0 or covered.find(" ".join(text.split())) < 0:
    return None
  return s, e


def _read_question(qa, where, path, paragraph, title, version_2, mismatches):
  """One SquadExample from a `qas` entry; appends offset problems to `mismatches`."""
  qas_id = str(_get(qa, "id", where, path))
  question = _get(qa, "question", where, path, str)
  raw = _get(qa, "answers", where, path, list)
  impossible = bool(qa.get("is_impossible", False)) if version_2 else False
  if impossible:
    raw = []  # v2.0 files may list answers for impossible questions: not gold
  elif not raw:
    raise SquadFormatError(f"{path}: {where} (id {qas_id}) has no answers and is not "
                           "marked is_impossible")
  texts, starts, span, label = [], [], None, ""
  for j, ans in enumerate(raw):
    a_where = f"{where}.answers[{j}]"
    text = _get(ans, "text", a_where, path, str)
    start = _get(ans, "answer_start", a_where, path, int)
    texts.append(text)
    starts.append(start)
    context = paragraph.context
    at = start
    if start < 0 or not text.strip() or context[start:start + len(text)] != text:
      at = _nearest_occurrence(context, text, start) if text.strip() else -1
      mismatches.append(OffsetMismatch(qas_id, j, start, text, at))
    if span is None and at >= 0:
      span = _place_answer(paragraph, text, at)
      label = text if span is not None else ""
  s, e = span if span is not None else (-1, -1)
  return SquadExample(qas_id, question, paragraph, tuple(texts), tuple(starts), impossible,
                      s, e, label, title)


def load_json(path: str):
  """Parsed JSON of a plain or .gz file; SquadFormatError naming the file otherwise."""
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise SquadFormatError(f"{path} is not valid JSON: {e}") from e
  except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
    raise SquadFormatError(f"{path} cannot be read as (gzipped) UTF-8 JSON: {e}") from e


def read_squad(path: str, *, version_2: Optional[bool] = None,
               max_mismatch_fraction: float = 0.01) -> SquadData:
  """Reads a SQuAD v1.1 / v2.0 JSON file (plain or .gz).

  Answers whose `answer_start` does not point at their text are counted in
  `offset_mismatches`, logged as a warning, and placed at the nearest
  occurrence of the text when there is one.

  Args:
    path: the file.
    version_2: True/False to force the format; None detects it from the
      "version" field ("v2.0") or the presence of "is_impossible".
    max_mismatch_fraction: more mismatched answers than this fraction of all
      answers is an error (the file is likely broken or not SQuAD).

  Returns:
    SquadData.

  Raises:
    SquadFormatError naming the file (and the location and key) for invalid
    JSON, a missing key, a wrong type, or too many offset mismatches.
  """
  path = str(path)
  root = load_json(path)
  articles = _get(root, "data", "the top level", path, list)
  if version_2 is None:
    version_2 = str(root.get("version", "")).lstrip("v").startswith("2") or any(
        "is_impossible" in qa for a in articles if isinstance(a, dict)
        for p in a.get("paragraphs", ()) if isinstance(p, dict) for qa in p.get("qas", ())
        if isinstance(qa, dict))
  examples, mismatches, num_paragraphs = [], [], 0
  for i, article in enumerate(articles):
    title = str(article.get("title", "")) if isinstance(article, dict) else ""
    paragraphs = _get(article, "paragraphs", f"data[{i}]", path, list)
    for k, para in enumerate(paragraphs):
      where = f"data[{i}].paragraphs[{k}]"
      paragraph = split_words(_get(para, "context", where, path, str))
      num_paragraphs += 1
      for q, qa in enumerate(_get(para, "qas", where, path, list)):
        examples.append(_read_question(qa, f"{where}.qas[{q}]", path, paragraph, title,
                                       version_2, mismatches))
  num_answers = sum(len(ex.answers) for ex in examples)
  unlocated = [ex.qas_id for ex in examples if not ex.is_impossible and ex.start_word < 0]
  if mismatches:
    lost = sum(m.found_at < 0 for m in mismatches)
    _log.warning("%s: %d of %d answers have an answer_start that does not match their text "
                 "(%d placed at the nearest occurrence, %d not in the context), e.g. %s",
                 path, len(mismatches), num_answers, len(mismatches) - lost, lost, mismatches[0])
    if len(mismatches) > max_mismatch_fraction * max(num_answers, 1):
      raise SquadFormatError(
          f"{path}: {len(mismatches)} of {num_answers} answers do not match their "
          f"answer_start offset (more than max_mismatch_fraction={max_mismatch_fraction}), "
          f"first: {mismatches[0]}")
  if unlocated:
    _log.warning("%s: %d answerable questions have no answer that can be placed in the "
                 "context (no training label), e.g. id %s", path, len(unlocated), unlocated[0])
  return SquadData(path, bool(version_2), examples, len(articles), num_paragraphs,
                   num_answers, mismatches, unlocated)


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class SquadFeatures:
  """Windows of all examples: the batch arrays plus bookkeeping kept outside it.

  Attributes:
    batch: int32 arrays named by the batch contract: `encoder_input_tokens`,
      `encoder_type_ids` [n, max_seq_length] and `start_positions`,
      `end_positions` [n] (0 = [CLS]: no answer inside this window).
    example_index: int32 [n], index of each window's example in the list given.
    token_to_orig: int32 [n, max_seq_length], word index (in the paragraph) of
      each doc token; -1 for [CLS], query, [SEP] and padding.
    token_is_max_context: bool [n, max_seq_length], True where this window is
      the one where that doc token has the most context.
    num_dropped: training only: answerable examples left out because their
      answer could not be placed.
  """
  batch: dict
  example_index: np.ndarray
  token_to_orig: np.ndarray
  token_is_max_context: np.ndarray
  num_dropped: int = 0

  def __len__(self) -> int:
    return len(self.example_index)


def doc_spans(num_tokens: int, max_tokens: int, doc_stride: int) -> list:
  """(start, length) of each window over `num_tokens` doc tokens (run_squad's rule).

  A window holds at most `max_tokens`; the next one starts `doc_stride` later
  (or right after it, if it was shorter); the last one reaches the end. An
  empty document still gets one empty window, so every question is answered.
  """
  spans, start = [], 0
  while True:
    length = min(num_tokens - start, max_tokens)
    spans.append((start, length))
    if start + length >= num_tokens:
      return spans
    start += min(length, doc_stride)


def max_context_window(spans: Sequence, num_tokens: int) -> np.ndarray:
  """int [num_tokens]: the window in which each doc token has the most context.

  Score of token p in window (s, l): min(p - s, s + l - 1 - p) + 0.01 * l; ties
  go to the earlier window, as in run_squad's _check_is_max_context.
  """
  pos = np.arange(num_tokens)
  best = np.full(num_tokens, -1)
  best_score = np.full(num_tokens, -np.inf)
  for w, (s, l) in enumerate(spans):
    score = np.minimum(pos - s, s + l - 1 - pos) + 0.01 * l
    better = (pos >= s) & (pos < s + l) & (score > best_score)
    best[better] = w
    best_score[better] = score[better]
  return best


def _tokenize_many(tokenizer, texts: Sequence[str]) -> list:
  """Token ids of each text, in one in-graph call: list of int32 arrays."""
  if not texts:
    return []
  ragged = tokenizer.tokenize(list(texts))
  flat = ragged.flat_values.numpy().astype(np.int32)
  splits = ragged.row_splits.numpy()
  return [flat[splits[i]:splits[i + 1]] for i in range(len(texts))]


def _improve_span(doc: list, start: int, end: int, answer: list):
  """The sub-span of doc[start:end+1] equal to the answer's own tokens, if any.

  Words such as "1895," hold the answer "1895" and more: the word span is
  narrowed to the leftmost sub-span tokenised exactly as the answer text, as
  run_squad's _improve_answer_span does; the word span stays when none is.
  """
  n = len(answer)
  for s in range(start, end + 1):
    e = s + n - 1
    if e <= end and doc[s:e + 1] == answer:
      return s, e
  return start, end


def _doc_tokens(paragraph: Paragraph, word_ids: list):
  """Sub-tokens of a paragraph, their word index, and each word's first sub-token."""
  lengths = np.array([len(w) for w in word_ids], np.int64)
  tokens = np.concatenate(word_ids).astype(np.int32) if word_ids else np.zeros(0, np.int32)
  tok_to_word = np.repeat(np.arange(len(word_ids), dtype=np.int32), lengths)
  word_to_tok = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  return tokens, tok_to_word, word_to_tok


def _answer_tokens(ex: SquadExample, doc: np.ndarray, word_to_tok: np.ndarray,
                   answer_ids: np.ndarray):
  """(start, end) sub-token span of the example's training answer, or None."""
  if ex.is_impossible or ex.start_word < 0:
    return None
  start = int(word_to_tok[ex.start_word])
  end = int(word_to_tok[ex.end_word + 1]) - 1  # last sub-token of the end word
  if end < start:
    return None
  return _improve_span(doc.tolist(), start, end, answer_ids.tolist())


def _windows(doc, tok_to_word, query, answer, tokenizer, max_seq_length, doc_stride, rows):
  """Appends one example's windows (arrays and labels) to the lists in `rows`."""
  specials = tokenizer.num_special_tokens(True)
  spans = doc_spans(len(doc), max_seq_length - len(query) - specials, doc_stride)
  best = max_context_window(spans, len(doc))
  for w, (s, l) in enumerate(spans):
    ids, type_ids = tokenizer.build_inputs(query, doc[s:s + l])
    # Every layout ends with the window and one closing [SEP] (</s>), so the
    # doc starts at len - l - 1: after [CLS] query [SEP] (<s> query </s></s>).
    offset = len(ids) - l - 1
    tokens = np.full(max_seq_length, tokenizer.pad_id, np.int32)  # [length]
    tokens[:len(ids)] = ids
    types = np.zeros(max_seq_length, np.int32)
    types[:len(ids)] = type_ids
    to_orig = np.full(max_seq_length, -1, np.int32)
    to_orig[offset:offset + l] = tok_to_word[s:s + l]
    is_max = np.zeros(max_seq_length, bool)
    is_max[offset:offset + l] = best[s:s + l] == w
    inside = answer is not None and answer[0] >= s and answer[1] < s + l
    rows["encoder_input_tokens"].append(tokens)
    rows["encoder_type_ids"].append(types)
    rows["to_orig"].append(to_orig)
    rows["is_max"].append(is_max)
    rows["start_positions"].append(answer[0] - s + offset if inside else 0)
    rows["end_positions"].append(answer[1] - s + offset if inside else 0)
  return len(spans)


def make_features(examples: Sequence[SquadExample], tokenizer, *, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64,
                  training: bool = False) -> SquadFeatures:
  """Windows `[CLS] query [SEP] doc [SEP]` of every example (see the module docstring).

  Args:
    examples: from read_squad.
    tokenizer: a WordPieceTokenizer (needs [CLS] and [SEP]) or a RoBERTa
      BpeTokenizer (windows `<s> query </s></s> doc </s>`, type ids 0,
      padded with its pad_id).
    max_seq_length: window length, padding included.
    doc_stride: distance between window starts, in doc sub-tokens.
    max_query_length: the question is cut to this many sub-tokens.
    training: leave out answerable examples whose answer cannot be placed
      (counted in `num_dropped`, logged); otherwise they stay, labelled 0.

  Returns:
    SquadFeatures.
  """
  if tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise ValueError(f"SQuAD features need [CLS] and [SEP]; vocabulary {tokenizer.path} lacks them")
  specials = tokenizer.num_special_tokens(True)
  if max_seq_length - max_query_length - specials <= 0:
    raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the document after "
                     f"max_query_length={max_query_length} and {specials} special tokens")
  if doc_stride <= 0:
    raise ValueError(f"doc_stride must be positive, got {doc_stride}")
  # One tokenizer call for every word, question and answer (each word on its own).
  paragraphs = list({id(ex.paragraph): ex.paragraph for ex in examples}.values())
  # Byte-level BPE: a word after a space is `word_prefix + word` (see
  # bert_jax.data.bpe); the answer mostly starts a word, so it gets the prefix too.
  prefix = tokenizer.word_prefix
  texts = [prefix + w for p in paragraphs for w in p.words]
  texts += [ex.question for ex in examples] + [prefix + ex.label_text for ex in examples]
  ids = _tokenize_many(tokenizer, texts)
  docs, k = {}, 0
  for p in paragraphs:
    docs[id(p)] = _doc_tokens(p, ids[k:k + len(p.words)])
    k += len(p.words)
  questions, answers = ids[k:k + len(examples)], ids[k + len(examples):]

  rows, example_index, dropped = collections.defaultdict(list), [], 0
  for i, ex in enumerate(examples):
    doc, tok_to_word, word_to_tok = docs[id(ex.paragraph)]
    answer = _answer_tokens(ex, doc, word_to_tok, answers[i])
    if training and answer is None and not ex.is_impossible:
      dropped += 1
      continue
    n = _windows(doc, tok_to_word, questions[i][:max_query_length], answer, tokenizer,
                 max_seq_length, doc_stride, rows)
    example_index += [i] * n
  if dropped:
    _log.warning("make_features: %d of %d answerable examples dropped from training: their "
                 "answer could not be placed in the context", dropped,
                 sum(not ex.is_impossible for ex in examples))
  shape = (-1, max_seq_length)
  batch = {name: np.asarray(rows[name], np.int32).reshape(shape)
           for name in ("encoder_input_tokens", "encoder_type_ids")}
  for name in ("start_positions", "end_positions"):
    batch[name] = np.asarray(rows[name], np.int32).reshape(-1)
  return SquadFeatures(batch, np.asarray(example_index, np.int32),
                       np.asarray(rows["to_orig"], np.int32).reshape(shape),
                       np.asarray(rows["is_max"], bool).reshape(shape), dropped)
