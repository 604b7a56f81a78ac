"""Summarization as a text-to-text task: (document, summary) pairs and ROUGE-1/2/L/Lsum.

Data: a two-column TSV (document <TAB> summary, one pair a line; a first line
naming the two columns is skipped) or JSONL (one object a line with the
document and summary under configurable keys, 'document' and 'summary' by
default, as in XSum). An unlabelled test file may leave the summary out.

ROUGE follows Google's `rouge-score` package (the one the Hugging Face
summarization examples report) exactly, which a test checks: text is
lower-cased, every run of characters outside [a-z0-9] is a separator, and
with `use_stemmer` words longer than 3 characters are Porter-stemmed (NLTK's
original algorithm, as rouge-score). ROUGE-N is the clipped n-gram overlap,
ROUGE-L the longest common subsequence; each gives precision, recall and F1,
and a corpus figure is the mean F1 over pairs, times 100. ROUGE-Lsum is the
summary-level LCS of the ROUGE paper (section 3.2) as rouge-score computes it
(the figure BART and PEGASUS report on CNN/DM): the texts are split into
sentences at newlines; each reference sentence takes the union of its LCS
positions against every predicted sentence, and a token counts as a hit at
most as often as it occurs in both texts.

Decoded summaries have no newlines, so `summary_metrics` first puts one
after each sentence (as the Hugging Face examples do with nltk's punkt, which
needs a download; here a rule: after . ! or ? followed by a space and a
capital letter or digit) in any text that has none.

Fine-tuning (config.task = 'summarization', any encoder-decoder family) goes
through the text-to-text task of tasks/adapters.py, which uses the pieces here:

  pairs = read_pairs(path, document_key, summary_key)
  inputs, targets = pairs_to_text(pairs, prefix)        # T5: prefix 'summarize: '
  ... teacher-forced training, then greedy / beam decoding ...
  summary_metrics(pairs, decoded)                       # rouge1/2/L/Lsum x 100, lengths
  write_summaries(path, pairs, decoded)                 # JSONL: summary (+ reference)
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
# A sentence end: . ! or ? (closing quotes or brackets may follow), spaces, then
# a capital letter, digit or opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[A-Z0-9\"'(])")


@dataclasses.dataclass(frozen=True)
class SummaryPair:
  """One example: the document and its reference summary (None: unlabelled)."""
  document: str
  summary: Optional[str]


def read_pairs(path: str, document_key: str = "document",
               summary_key: str = "summary") -> List[SummaryPair]:
  """Reads (document, summary) pairs from a .tsv or .jsonl file.

  Raises:
    ValueError: naming the file and line of a malformed row (a TSV line
      without exactly two columns, JSON that does not parse, a missing key).
  """
  pairs = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  jsonl = path.endswith((".jsonl", ".json"))
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if jsonl:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
      if not isinstance(row, dict) or document_key not in row:
        raise ValueError(f"{path}:{number}: no {document_key!r} key in the JSON object")
      summary = row.get(summary_key)
      pairs.append(SummaryPair(str(row[document_key]),
                               None if summary is None else str(summary)))
      continue
    columns = line.split("\t")
    if len(columns) not in (1, 2):
      raise ValueError(f"{path}:{number}: {len(columns)} tab-separated columns, expected "
                       "document<TAB>summary")
    if number == 1 and columns == [document_key, summary_key][:len(columns)]:
      continue  # the header
    pairs.append(SummaryPair(columns[0], columns[1] if len(columns) == 2 else None))
  return pairs


def tokenize(text: str, stemmer=None) -> List[str]:
  """rouge-score's tokens: lower-cased [a-z0-9] runs, stemmed when longer than 3."""
  tokens = _NON_ALPHANUM.sub(" ", text.lower()).split()
  if stemmer is not None:
    tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
  return [t for t in tokens if t]


def porter_stemmer():
  """NLTK's Porter stemmer in its original form (what rouge-score uses)."""
  try:
    from nltk.stem import porter  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("ROUGE with use_stemmer=True needs the nltk package "
                     "(pip install nltk)") from None
  return porter.PorterStemmer(porter.PorterStemmer.ORIGINAL_ALGORITHM)


def _prf(overlap: int, predicted: int, reference: int) -> Dict[str, float]:
  precision = overlap / max(predicted, 1)
  recall = overlap / max(reference, 1)
  f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return dict(precision=precision, recall=recall, fmeasure=f)


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Longest common subsequence length, one row of the DP table at a time."""
  row = [0] * (len(b) + 1)
  for x in a:
    prev_diag, row[0] = 0, 0
    for j, y in enumerate(b, 1):
      prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def _lcs_positions(ref: Sequence[str], pred: Sequence[str]) -> set:
  """Positions in ref of one longest common subsequence with pred.

  Which one, when several exist, changes ROUGE-Lsum's union: this walks the
  full table back from the end, stepping along pred while that keeps the
  length and along ref otherwise, which is rouge-score's choice.
  """
  table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
  for i, x in enumerate(ref, 1):
    for j, y in enumerate(pred, 1):
      table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
  positions, i, j = set(), len(ref), len(pred)
  while i and j:
    if ref[i - 1] == pred[j - 1]:
      positions.add(i - 1)
      i, j = i - 1, j - 1
    elif table[i][j - 1] > table[i - 1][j]:
      j -= 1
    else:
      i -= 1
  return positions


def _summary_lcs(ref_sents: Sequence[List[str]], pred_sents: Sequence[List[str]]
                 ) -> Dict[str, float]:
  """ROUGE-Lsum of tokenized sentences: union-LCS hits, each token counted at most as
  often as it occurs in both texts."""
  m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
  if not m or not n:
    return dict(precision=0.0, recall=0.0, fmeasure=0.0)
  left_ref = collections.Counter(t for sent in ref_sents for t in sent)
  left_pred = collections.Counter(t for sent in pred_sents for t in sent)
  hits = 0
  for sent in ref_sents:
    union = set().union(*(_lcs_positions(sent, p) for p in pred_sents))
    for pos in sorted(union):
      token = sent[pos]
      if left_ref[token] > 0 and left_pred[token] > 0:
        hits += 1
        left_ref[token] -= 1
        left_pred[token] -= 1
  return _prf(hits, n, m)


def sentences(text: str, stemmer=None) -> List[List[str]]:
  """ROUGE-Lsum's sentences: the non-empty lines of text, each tokenized."""
  return [tokenize(line, stemmer) for line in text.split("\n") if line]


def split_sentences(text: str) -> str:
  """text with a newline after each sentence (see the module docstring), if it has none."""
  return text if "\n" in text else _SENTENCE_END.sub(lambda m: m.group(1) + "\n", text)


def rouge(reference: str, prediction: str, stemmer=None) -> Dict[str, Dict[str, float]]:
  """ROUGE-1/2/L/Lsum of one prediction: {type: {precision, recall, fmeasure}}.

  ROUGE-Lsum reads sentences from the newlines already in the texts (rouge-score's
  default); `summary_metrics` adds them to decoded text first.
  """
  ref, pred = tokenize(reference, stemmer), tokenize(prediction, stemmer)
  out = {}
  for n, name in ((1, "rouge1"), (2, "rouge2")):
    r, p = _ngrams(ref, n), _ngrams(pred, n)
    overlap = sum(min(count, p[g]) for g, count in r.items())
    out[name] = _prf(overlap, sum(p.values()), sum(r.values()))
  if ref and pred:
    out["rougeL"] = _prf(_lcs_length(ref, pred), len(pred), len(ref))
  else:
    out["rougeL"] = dict(precision=0.0, recall=0.0, fmeasure=0.0)
  out["rougeLsum"] = _summary_lcs(sentences(reference, stemmer), sentences(prediction, stemmer))
  return out


def corpus_rouge(references: Sequence[str], predictions: Sequence[str],
                 use_stemmer: bool = True) -> Dict[str, float]:
  """Mean F1 x 100 of each of ROUGE_TYPES over the pairs ({'rouge1': ..., 'rougeLsum': ...})."""
  if len(references) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("ROUGE of an empty set")
  stemmer = porter_stemmer() if use_stemmer else None
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for ref, pred in zip(references, predictions):
    for name, score in rouge(ref, pred, stemmer).items():
      totals[name] += score["fmeasure"]
  return {name: 100.0 * total / len(references) for name, total in totals.items()}


# ----------------------------------------------------------------------------
# Fine-tuning: pairs as text, scores and predictions
# ----------------------------------------------------------------------------

def pairs_to_text(pairs: Sequence[SummaryPair], prefix: str = ""
                  ) -> Tuple[List[str], List[Optional[str]]]:
  """(inputs = prefix + document, targets = summary, None where unlabelled)."""
  return [prefix + p.document for p in pairs], [p.summary for p in pairs]


def summary_metrics(pairs: Sequence[SummaryPair], predictions: Sequence[str],
                    use_stemmer: bool = True) -> Dict[str, float]:
  """corpus_rouge of decoded summaries (sentences split first, for ROUGE-Lsum), plus their
  mean length in ROUGE tokens ('gen_len').

  Stemming is on by default, as the Hugging Face summarization examples and
  the BART / PEGASUS evaluations use it.

  Raises:
    ValueError: if counts differ or a pair has no reference summary.
  """
  if len(predictions) != len(pairs):
    raise ValueError(f"{len(predictions)} predictions for {len(pairs)} documents")
  unlabelled = [i for i, p in enumerate(pairs) if p.summary is None]
  if unlabelled:
    raise ValueError(f"{len(unlabelled)} documents have no reference summary (first: "
                     f"example {unlabelled[0]}); an unlabelled split cannot be scored")
  out = corpus_rouge([split_sentences(p.summary) for p in pairs],
                     [split_sentences(t) for t in predictions], use_stemmer=use_stemmer)
  out["gen_len"] = sum(len(tokenize(t)) for t in predictions) / max(len(predictions), 1)
  return out


def write_summaries(path: str, pairs: Sequence[SummaryPair], predictions: Sequence[str]):
  """One JSON object a line, in input order: {'summary': decoded} (+ 'reference')."""
  if len(predictions) != len(pairs):
    raise ValueError(f"{len(predictions)} predictions for {len(pairs)} documents")
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for pair, text in zip(pairs, predictions):
      row = {"summary": text}
      if pair.summary is not None:
        row["reference"] = pair.summary
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
