"""SQuAD output side: logits -> answer texts, official EM/F1, predictions files.

The input side (reading SQuAD files, whitespace words, windows and labels) is
bert_jax.tasks.squad; this module starts from the model's start/end logits of
those windows, so the split sits at the model (see squad's docstring for the
whole pipeline).

Post-processing follows original BERT's run_squad: per window the n-best start
and end logits are paired; a pair counts only where its start token has its
maximum context in that window (squad.SquadFeatures.token_is_max_context); the
answer text is mapped back to the original context words with get_final_text;
for v2.0 the null answer competes through the null score threshold. n-best
lists and answer texts were checked equal to run_squad's own on the SQuAD dev
set (v1.1, and a v2.0 variant of it).

The metrics reproduce the official evaluation scripts (evaluate-v1.1.py and
evaluate-v2.0.py): answers are lower-cased, stripped of ASCII punctuation and
of the articles a/an/the, whitespace collapsed; EM and F1 take the maximum over
the gold answers. For v2.0 an unanswerable question's gold is [""], so it
scores 1 only when the prediction is empty too. Questions without a
prediction score 0 and are counted in `missing`.
"""
import collections
import dataclasses
import gzip
import json
import logging
import re
import string
import unicodedata
from typing import Mapping, Sequence

import numpy as np

from bert_jax.tasks import squad

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Post-processing: logits -> answer text
# ----------------------------------------------------------------------------

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_punctuation(c: str) -> bool:
  o = ord(c)
  return (33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126
          or unicodedata.category(c).startswith("P"))


class _CharTable(dict):
  """str.translate table filled on first use of each character (C-speed afterwards)."""

  def __init__(self, fn):
    super().__init__()
    self._fn = fn

  def __missing__(self, ordinal: int) -> str:
    self[ordinal] = self._fn(chr(ordinal))
    return self[ordinal]


def _clean_char(c: str) -> str:
  cat = unicodedata.category(c)
  if c == "\ufffd" or (cat in ("Cc", "Cf", "Co") and c not in "\t\n\r"):
    return ""
  if c in "\t\n\r\u2028\u2029" or cat == "Zs":
    return " "
  if any(lo <= ord(c) <= hi for lo, hi in _CJK_RANGES):
    return f" {c} "
  return c


_CLEAN = _CharTable(_clean_char)
_DROP_MARKS = _CharTable(lambda c: "" if unicodedata.category(c) == "Mn" else c)
_SPACE_PUNCTUATION = _CharTable(lambda c: f" {c} " if _is_punctuation(c) else c)


def basic_tokens(text: str, lower_case: bool = True) -> list:
  """The words WordPieceTokenizer makes before WordPiece, in pure Python.

  Same normalisation as WordPieceTokenizer.normalize (drop control and format
  characters, whitespace -> space, CJK ideographs apart; when lower-casing:
  NFD, drop combining marks, lower case), then a split on spaces and punctuation.
  """
  text = text.translate(_CLEAN)
  if lower_case:
    text = unicodedata.normalize("NFD", text).translate(_DROP_MARKS)
    # Python lower-cases a word-final capital sigma to 'ς'; the tokenizer never does.
    text = text.replace("\u03a3", "\u03c3").lower()
  return text.translate(_SPACE_PUNCTUATION).split()


def _nonspace_index(text: str, k: int) -> int:
  """Index in `text` of its k-th (0-based) character that is not a space."""
  for run in re.finditer(r"[^ ]+", text):
    if k < run.end() - run.start():
      return run.start() + k
    k -= run.end() - run.start()
  raise IndexError(f"{text!r} has fewer than {k + 1} non-space characters")


def get_final_text(pred_text: str, orig_text: str, lower_case: bool = True) -> str:
  """The span of `orig_text` that the normalised prediction `pred_text` stands for.

  `pred_text` is de-tokenised WordPiece ("john smith 's"), lower-cased and
  spaced around punctuation; `orig_text` is the original words it came from
  ("John Smith's."). Both are brought to the tokenizer's basic words, aligned
  character by character with spaces removed, and the matching slice of
  `orig_text` is returned. When they cannot be aligned (the prediction is not
  inside the normalised text, or normalisation changed the length) the whole
  `orig_text` is the answer, as in run_squad.
  """
  tok_text = " ".join(basic_tokens(orig_text, lower_case))
  start = tok_text.find(pred_text) if pred_text else -1
  if start < 0:
    return orig_text
  end = start + len(pred_text) - 1  # pred_text has no outer spaces: both non-space
  if len(orig_text.replace(" ", "")) != len(tok_text.replace(" ", "")):
    return orig_text
  first = _nonspace_index(orig_text, start - tok_text.count(" ", 0, start))
  last = _nonspace_index(orig_text, end - tok_text.count(" ", 0, end))
  return orig_text[first:last + 1]


@dataclasses.dataclass(eq=False)
class SquadPredictions:
  """Answers of every example.

  Attributes:
    texts: {qas_id: answer text} ('' = no answer), the predictions file.
    null_score_diff: v2.0 only: {qas_id: null score - best non-null score}
      (predict '' above the threshold; for tuning it on dev).
    nbest: {qas_id: [{'text', 'start_logit', 'end_logit', 'probability'}]},
      best first, distinct texts.
  """
  texts: dict
  null_score_diff: dict
  nbest: dict


def _top_indices(logits: np.ndarray, n: int) -> np.ndarray:
  # Stable, so equal logits keep position order as run_squad's sorted() does.
  return np.argsort(-logits, kind="stable")[:n]


def _window_candidates(features, f, start_logits, end_logits, n_best_size, max_answer_length):
  """(start, end) pairs of window f that pass run_squad's filters, start-major order."""
  starts = _top_indices(start_logits[f], n_best_size)
  ends = _top_indices(end_logits[f], n_best_size)
  to_orig = features.token_to_orig[f]
  ok_start = (to_orig[starts] >= 0) & features.token_is_max_context[f][starts]
  ok_end = to_orig[ends] >= 0
  s, e = np.meshgrid(starts, ends, indexing="ij")  # [n_best, n_best]
  valid = ok_start[:, None] & ok_end[None, :] & (e >= s) & (e - s + 1 <= max_answer_length)
  return s[valid], e[valid]


def _span_text(features, f, s, e, example, detokenize, lower_case) -> str:
  """Original-text answer for sub-tokens s..e of window f."""
  pred = " ".join(detokenize(features.batch["encoder_input_tokens"][f, s:e + 1]).split())
  words = example.paragraph.words
  orig = " ".join(words[features.token_to_orig[f, s]:features.token_to_orig[f, e] + 1])
  return get_final_text(pred, orig, lower_case)


def _detokenizer(tokenizer):
  """ids -> text of a sub-token span: run_squad's '##' joining for WordPiece, the
  tokenizer's own decode for byte-level BPE (whose pieces are byte strings)."""
  if tokenizer.word_prefix:  # BPE: words carry their leading space
    return lambda ids: tokenizer.decode([int(i) for i in ids])
  pieces = tokenizer.pieces
  return lambda ids: " ".join(pieces[t] for t in ids).replace(" ##", "").replace("##", "")


def _example_answers(example, feature_ids, features, start_logits, end_logits, detokenize,
                     lower_case, n_best_size, max_answer_length, version_2):
  """n-best list of one example and its null score (None unless version_2)."""
  cands = []  # (feature, start, end, start_logit, end_logit) in run_squad's order
  null = None
  for f in feature_ids:
    if version_2:
      score = float(start_logits[f, 0]) + float(end_logits[f, 0])
      if null is None or score < null[0]:
        null = (score, f)
    for s, e in zip(*_window_candidates(features, f, start_logits, end_logits, n_best_size,
                                        max_answer_length)):
      cands.append((f, int(s), int(e), float(start_logits[f, s]), float(end_logits[f, e])))
  if version_2:
    f = null[1]
    cands.append((f, 0, 0, float(start_logits[f, 0]), float(end_logits[f, 0])))
  order = sorted(range(len(cands)), key=lambda k: -(cands[k][3] + cands[k][4]))
  nbest, seen = [], set()
  for k in order:
    if len(nbest) >= n_best_size:
      break
    f, s, e, sl, el = cands[k]
    text = "" if s == 0 else _span_text(features, f, s, e, example, detokenize, lower_case)
    if text in seen:
      continue
    seen.add(text)
    nbest.append({"text": text, "start_logit": sl, "end_logit": el})
  if version_2 and "" not in seen:
    f = null[1]
    nbest.append({"text": "", "start_logit": float(start_logits[f, 0]),
                  "end_logit": float(end_logits[f, 0])})
  if nbest:
    scores = np.array([c["start_logit"] + c["end_logit"] for c in nbest])
    probs = np.exp(scores - scores.max())
    for c, p in zip(nbest, probs / probs.sum()):
      c["probability"] = float(p)
  return nbest, (None if null is None else null[0])


def postprocess(examples: Sequence[squad.SquadExample], features: squad.SquadFeatures,
                start_logits, end_logits, tokenizer, *, n_best_size: int = 20,
                max_answer_length: int = 30, version_2: bool = False,
                null_score_diff_threshold: float = 0.0) -> SquadPredictions:
  """Answer texts from the start/end logits of every window (run_squad's rules).

  Per window, the `n_best_size` highest start and end logits are paired;
  a pair is kept when both are doc tokens, the start is at its max-context
  window, start <= end and the span has at most `max_answer_length` tokens.
  Pairs are ranked by start + end logit across all windows of the example, and
  the first `n_best_size` distinct texts form the n-best list. For v2.0 the
  null score is min over windows of start_logit[0] + end_logit[0], and the
  answer is '' when null - best non-null score > `null_score_diff_threshold`.

  Args:
    examples: the examples the features were made from.
    features: from squad.make_features(examples, ...).
    start_logits, end_logits: float [len(features), max_seq_length].
    tokenizer: the tokenizer of the features (pieces and lower_case).
    n_best_size, max_answer_length, version_2, null_score_diff_threshold: see above.

  Returns:
    SquadPredictions; an example without any valid span gets '' (run_squad
    writes 'empty').
  """
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  shape = features.batch["encoder_input_tokens"].shape
  if start_logits.shape != shape or end_logits.shape != shape:
    raise ValueError(f"logits {start_logits.shape} / {end_logits.shape} do not match the "
                     f"features {shape} ([windows, max_seq_length])")
  if len(features) and features.example_index.max() >= len(examples):
    raise ValueError(f"features refer to example {features.example_index.max()} but only "
                     f"{len(examples)} examples were given")
  by_example = collections.defaultdict(list)
  for f, i in enumerate(features.example_index.tolist()):
    by_example[i].append(f)
  windowless = [ex.qas_id for i, ex in enumerate(examples) if not by_example[i]]
  if windowless:
    raise ValueError(f"{len(windowless)} examples have no window in the features (e.g. id "
                     f"{windowless[0]}): make evaluation features with training=False")
  lower_case = getattr(tokenizer, "lower_case", True)
  texts, diffs, nbests = {}, {}, {}
  for i, ex in enumerate(examples):
    nbest, null = _example_answers(ex, by_example[i], features, start_logits, end_logits,
                                   _detokenizer(tokenizer), lower_case, n_best_size,
                                   max_answer_length, version_2)
    nbests[ex.qas_id] = nbest
    best = next((c for c in nbest if c["text"]), None)
    if not version_2:
      texts[ex.qas_id] = best["text"] if best else ""
      continue
    diff = np.inf if best is None else null - best["start_logit"] - best["end_logit"]
    diffs[ex.qas_id] = float(diff)
    texts[ex.qas_id] = "" if diff > null_score_diff_threshold else best["text"]
  return SquadPredictions(texts, diffs, nbests)


# ----------------------------------------------------------------------------
# Predictions files
# ----------------------------------------------------------------------------

def write_predictions(path: str, texts: Mapping[str, str]) -> None:
  """Writes the SQuAD predictions file {qas_id: text} (plain or .gz JSON)."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    json.dump(dict(texts), f, ensure_ascii=False)


def read_predictions(path: str) -> dict:
  """Reads a predictions file {qas_id: text}; an error names the file otherwise."""
  preds = squad.load_json(str(path))
  if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
    raise squad.SquadFormatError(f"{path}: a predictions file must be a JSON object "
                           "{question id: answer text}")
  return preds


# ----------------------------------------------------------------------------
# Official metrics
# ----------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """The official normalisation: lower, drop punctuation, drop a/an/the, squash spaces."""
  s = "".join(c for c in s.lower() if c not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 when both normalise to the same string."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, *, empty_matches_empty: bool = False) -> float:
  """Bag-of-tokens F1 of the normalised answers.

  `empty_matches_empty` is the v2.0 script's rule (an empty answer on either
  side scores 1 if both are empty, else 0); v1.1 scores no overlap as 0.
  """
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if empty_matches_empty and (not pred or not ref):
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = 1.0 * same / len(pred), 1.0 * same / len(ref)
  return (2 * precision * recall) / (precision + recall)


def _gold_texts(example: squad.SquadExample, version_2: bool) -> list:
  if not version_2:
    return list(example.answers)
  # evaluate-v2.0.py ignores golds that normalise to nothing; none left -> [''].
  return [a for a in example.answers if normalize_answer(a)] or [""]


def evaluate(data: squad.SquadData, predictions: Mapping[str, str]) -> dict:
  """Official SQuAD EM and F1 (percent) of `predictions` on `data`.

  v1.1 follows evaluate-v1.1.py, v2.0 evaluate-v2.0.py (at its default no-answer
  threshold, i.e. the texts as given). Every question counts: one without a
  prediction scores 0 (and is counted in `missing`); predictions for unknown
  ids are ignored.

  Returns:
    {'exact', 'f1', 'total', 'missing'}; for v2.0 also 'HasAns_exact',
    'HasAns_f1', 'HasAns_total', 'NoAns_exact', 'NoAns_f1', 'NoAns_total'.
  """
  v2 = data.version_2
  sums = collections.defaultdict(float)
  missing = 0
  for ex in data.examples:
    if ex.qas_id not in predictions:
      missing += 1
      em = f1 = 0.0
    else:
      pred = predictions[ex.qas_id]
      golds = _gold_texts(ex, v2)
      em = max(exact_match(pred, g) for g in golds)
      f1 = max(f1_score(pred, g, empty_matches_empty=v2) for g in golds)
    for split in ("", "NoAns_" if ex.is_impossible else "HasAns_"):
      sums[split + "exact"] += em
      sums[split + "f1"] += f1
      sums[split + "total"] += 1
  if missing:
    _log.warning("%s: %d of %d questions have no prediction (scored 0)", data.path, missing,
                 len(data.examples))
  out = {"total": len(data.examples), "missing": missing}
  splits = ("", "HasAns_", "NoAns_") if v2 else ("",)
  for split in splits:
    n = sums[split + "total"]
    if split:
      out[split + "total"] = int(n)
    if n or not split:
      out[split + "exact"] = 100.0 * sums[split + "exact"] / max(n, 1)
      out[split + "f1"] = 100.0 * sums[split + "f1"] / max(n, 1)
  return out

