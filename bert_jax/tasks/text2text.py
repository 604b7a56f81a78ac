"""Text-to-text fine-tuning (T5): tasks cast as text, features, cached decoding, scoring.

The pieces, in the order a fine-tuning run uses them:

  inputs, targets = glue_to_text("sst2", examples)   # or squad_to_text, ner_to_text
  feats = make_features(inputs, targets, tokenizer)  # numpy, batch contract names
  ... teacher-forced training on feats.arrays (losses.seq2seq_loss) ...
  tokens, scores = decoding.beam_search(model, params, enc_tokens, beam_size=4,
                                       max_decode_length=8)
  texts = ids_to_texts(tokenizer, tokens[:, 0])      # best beam; or greedy_decode
  glue_metrics("sst2", texts, examples)               # the task's own metric

Casting follows the T5 paper (appendix D): the benchmark name, then each field
as `name: text`; class labels become words.

  task  input                                         target
  cola  cola sentence: S                              unacceptable | acceptable
  sst2  sst2 sentence: S                              negative | positive
  mrpc  mrpc sentence1: A sentence2: B                not_equivalent | equivalent
  qqp   qqp question1: A question2: B                 not_duplicate | duplicate
  stsb  stsb sentence1: A sentence2: B                score rounded to 0.2, '3.8'
  mnli  mnli hypothesis: B premise: A                 entailment | neutral | contradiction
  qnli  qnli question: A sentence: B                  entailment | not_entailment
  rte   rte sentence1: A sentence2: B                 entailment | not_entailment
  wnli  wnli sentence1: A sentence2: B                not_entailment | entailment
  ax    mnli hypothesis: B premise: A (MNLI's model)  as mnli
  SQuAD question: Q context: C                        the first gold answer ('' if none)
  NER   ner sentence: w1 w2 ...                       EU = ORG ; German = MISC  ('none')

The NER target lists the entities in sentence order, each as its words joined
by spaces, ' = ', its type, separated by ' ; '; a sentence without entities is
'none'. Parsing places each listed entity at its first occurrence after the
previous one, so repeated names are placed in order; an item that is not
`words = TYPE` or whose words do not occur is dropped (counted, and scored as
a missing entity). SQuAD text is kept as is (T5 additionally spaced out
punctuation, which changes the official normalisation; we do not).

Unparseable predictions count as wrong, as in T5: a class word not in the
task's list becomes class id -1, an STS-B text that is not a number the score
-1.0; the metric functions report how many there were.

Decoding (greedy and beam search from the key/value cache, with the min-length
and no-repeat-n-gram constraints) is bert_jax/decoding.py.
"""
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from bert_jax import decoding
from bert_jax.tasks import batching
from bert_jax.tasks import glue
from bert_jax.tasks import ner
from bert_jax.tasks import squad
from bert_jax.tasks import squad_eval


# ----------------------------------------------------------------------------
# GLUE as text
# ----------------------------------------------------------------------------

# task -> (prefix, ((field name, 'a' | 'b'), ...)); T5 lists the fields in
# alphabetical order of their tfds names, hence hypothesis before premise.
_GLUE_INPUTS = {
    "cola": ("cola", (("sentence", "a"),)),
    "sst2": ("sst2", (("sentence", "a"),)),
    "mrpc": ("mrpc", (("sentence1", "a"), ("sentence2", "b"))),
    "stsb": ("stsb", (("sentence1", "a"), ("sentence2", "b"))),
    "qqp": ("qqp", (("question1", "a"), ("question2", "b"))),
    "mnli": ("mnli", (("hypothesis", "b"), ("premise", "a"))),
    "qnli": ("qnli", (("question", "a"), ("sentence", "b"))),
    "rte": ("rte", (("sentence1", "a"), ("sentence2", "b"))),
    "wnli": ("wnli", (("sentence1", "a"), ("sentence2", "b"))),
    "ax": ("mnli", (("hypothesis", "b"), ("premise", "a"))),
}
# task -> the word of each label, in glue.TASKS[task].label_names order.
_GLUE_WORDS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("contradiction", "entailment", "neutral"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
    "ax": ("contradiction", "entailment", "neutral"),
}


def glue_inputs(task: Union[str, glue.GlueTask], example: glue.GlueExample) -> str:
  """The encoder text of one GLUE example, e.g. 'sst2 sentence: a gem .'."""
  task = glue.get_task(task)
  prefix, fields = _GLUE_INPUTS[task.name]
  texts = {"a": example.text_a, "b": example.text_b}
  if task.is_pair and example.text_b is None:
    raise ValueError(f"{example.guid}: {task.name} needs a sentence pair, text_b is None")
  return " ".join([prefix] + [f"{name}: {texts[which]}" for name, which in fields])


def glue_target(task: Union[str, glue.GlueTask], label) -> str:
  """The target text of a label: its word, or the STS-B score rounded to 0.2 ('3.8')."""
  task = glue.get_task(task)
  if task.is_regression:
    # T5 rounds to the nearest 0.2 (half to even, as tf.round) and prints one decimal.
    return f"{np.round(float(label) * 5.0) / 5.0:.1f}"
  return _GLUE_WORDS[task.name][int(glue.label_id(task, label))]


def glue_label(task: Union[str, glue.GlueTask], text: str):
  """The label (as in GlueExample.label: class name or float) of a text, None if unparseable."""
  task = glue.get_task(task)
  text = text.strip()
  if task.is_regression:
    try:
      value = float(text)
    except ValueError:
      return None
    return value if math.isfinite(value) else None
  words = _GLUE_WORDS[task.name]
  return task.label_names[words.index(text)] if text in words else None


def glue_to_text(task: Union[str, glue.GlueTask], examples: Sequence[glue.GlueExample]
                 ) -> Tuple[List[str], List[Optional[str]]]:
  """(inputs, targets) of examples; a target is None where the label is (test files)."""
  inputs = [glue_inputs(task, ex) for ex in examples]
  targets = [None if ex.label is None else glue_target(task, ex.label) for ex in examples]
  return inputs, targets


def glue_predictions(task: Union[str, glue.GlueTask], texts: Sequence[str]) -> np.ndarray:
  """Decoded texts -> class ids int32 [n] (-1 unparseable), or float32 scores (-1.0)."""
  task = glue.get_task(task)
  labels = [glue_label(task, t) for t in texts]
  if task.is_regression:
    return np.array([-1.0 if v is None else v for v in labels], np.float32)
  return np.array([-1 if v is None else task.label_names.index(v) for v in labels], np.int32)


def glue_metrics(task: Union[str, glue.GlueTask], texts: Sequence[str],
                 examples: Sequence[glue.GlueExample]) -> Dict[str, float]:
  """glue.compute_metrics of decoded texts against the examples' labels.

  Returns the task's metrics plus 'num_unparseable' (predictions that are
  not a label word / number, scored as wrong).
  """
  task = glue.get_task(task)
  if len(texts) != len(examples):
    raise ValueError(f"{len(texts)} predictions for {len(examples)} {task.name} examples")
  unlabelled = [ex.guid for ex in examples if ex.label is None]
  if unlabelled:
    raise ValueError(f"{task.name}: {len(unlabelled)} examples have no label "
                     f"(first {unlabelled[0]}); test splits cannot be scored")
  predictions = glue_predictions(task, texts)
  labels = np.stack([glue.label_id(task, ex.label) for ex in examples])
  out = glue.compute_metrics(task, predictions, labels)
  out["num_unparseable"] = sum(glue_label(task, t) is None for t in texts)
  return out


# ----------------------------------------------------------------------------
# SQuAD and NER as text
# ----------------------------------------------------------------------------

def squad_to_text(examples: Sequence[squad.SquadExample]) -> Tuple[List[str], List[str]]:
  """(inputs 'question: Q context: C', targets = first gold answer, '' when none)."""
  inputs = [f"question: {ex.question} context: {ex.paragraph.context}" for ex in examples]
  targets = [ex.answers[0] if ex.answers else "" for ex in examples]
  return inputs, targets


def squad_metrics(data: squad.SquadData, texts: Sequence[str]) -> dict:
  """Official EM/F1 (squad_eval.evaluate) of texts decoded for every question of `data`, in order."""
  if len(texts) != len(data.examples):
    raise ValueError(f"{len(texts)} predictions for {len(data.examples)} questions of "
                     f"{data.path}")
  return squad_eval.evaluate(data, {ex.qas_id: t for ex, t in zip(data.examples, texts)})


_NER_NONE = "none"
_NER_ITEM_SEP = " ; "
_NER_TYPE_SEP = " = "


def ner_target(words: Sequence[str], tags: Sequence[str]) -> str:
  """'EU = ORG ; German = MISC' (entities in order, conlleval chunks), 'none' if none."""
  if len(words) != len(tags):
    raise ValueError(f"{len(words)} words but {len(tags)} tags")
  items = [" ".join(words[first:last + 1]) + _NER_TYPE_SEP + type_
           for type_, first, last in ner.extract_entities(tags)]
  return _NER_ITEM_SEP.join(items) if items else _NER_NONE


def ner_tags(words: Sequence[str], text: str) -> Tuple[List[str], int]:
  """IOB2 tags of `words` from a target text; also the number of items that could not be placed."""
  tags = ["O"] * len(words)
  text = text.strip()
  if text == _NER_NONE or not text:
    return tags, 0
  cursor, dropped = 0, 0
  for item in text.split(_NER_ITEM_SEP):
    span, sep, type_ = item.strip().rpartition(_NER_TYPE_SEP)
    entity, type_ = tuple(span.split()), type_.strip()
    if not sep or not entity or not type_ or " " in type_:
      dropped += 1
      continue
    n = len(entity)
    start = next((i for i in range(cursor, len(words) - n + 1)
                  if tuple(words[i:i + n]) == entity), None)
    if start is None:
      dropped += 1
      continue
    tags[start:start + n] = [f"B-{type_}"] + [f"I-{type_}"] * (n - 1)
    cursor = start + n
  return tags, dropped


def ner_to_text(sentences: Sequence[ner.NerSentence]) -> Tuple[List[str], List[str]]:
  """(inputs 'ner sentence: w1 w2 ...', targets as ner_target)."""
  inputs = ["ner sentence: " + " ".join(s.words) for s in sentences]
  return inputs, [ner_target(s.words, s.tags) for s in sentences]


def ner_metrics(sentences: Sequence[ner.NerSentence], texts: Sequence[str]) -> Dict[str, object]:
  """ner.entity_metrics of decoded texts, plus 'num_unparseable' dropped entity items."""
  if len(texts) != len(sentences):
    raise ValueError(f"{len(texts)} predictions for {len(sentences)} sentences")
  predicted, dropped = [], 0
  for s, t in zip(sentences, texts):
    tags, n = ner_tags(s.words, t)
    predicted.append(tags)
    dropped += n
  out = ner.entity_metrics([s.tags for s in sentences], predicted)
  out["num_unparseable"] = dropped
  return out


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Text2TextFeatures:
  """Encoded text pairs.

  Attributes:
    arrays: 'encoder_input_tokens' int32 [n, enc_len] (text + EOS, 0-padded);
      with targets also 'decoder_target_tokens' (target + EOS),
      'decoder_input_tokens' (the same shifted right, starting with 0) int32
      [n, dec_len] and 'decoder_loss_weights' float32 (1.0 on real tokens).
    num_truncated_inputs, num_truncated_targets: texts cut to fit (EOS kept).
  """
  arrays: Dict[str, np.ndarray]
  num_truncated_inputs: int
  num_truncated_targets: int


def _with_eos(ids: Sequence[np.ndarray], eos: int, max_length: int, multiple: Optional[int]
              ) -> Tuple[np.ndarray, np.ndarray, int]:
  """Truncates to max_length - 1, appends EOS, pads; (tokens, lengths, number truncated)."""
  cut = [np.append(x[:max_length - 1], eos).astype(np.int32) for x in ids]
  lengths = np.array([len(x) for x in cut], np.int32)
  width = (max_length if multiple is None
           else batching.padded_length(int(lengths.max()), multiple, max_length))
  out = np.zeros((len(cut), width), np.int32)
  for i, x in enumerate(cut):
    out[i, :len(x)] = x
  return out, lengths, sum(len(x) >= max_length for x in ids)


def make_features(inputs: Sequence[str], targets: Optional[Sequence[Optional[str]]], tokenizer,
                  *, max_input_length: int = 512, max_target_length: int = 128,
                  multiple: Optional[int] = 8) -> Text2TextFeatures:
  """Tokenizes text pairs into the encoder-decoder batch contract.

  Each side gets EOS appended after truncation to its max length (seqio's
  append_eos_after_trim) and is padded to its longest sequence rounded up to
  `multiple` (dynamic padding: call it per batch, e.g. on the index groups of
  batching.bucket_batches), capped at the max length; multiple=None pads to
  the max lengths exactly (one static shape).

  Args:
    inputs: encoder texts.
    targets: target texts (same length), or None for prediction only; a
      mix of None and text is an error.
    tokenizer: a Tokenizer with an EOS id (SentencePieceTokenizer, T5 layout).
    max_input_length, max_target_length: lengths including EOS.
    multiple: padded lengths are multiples of it; None for the max lengths.
  """
  if tokenizer.eos_id is None:
    raise ValueError(f"tokenizer {tokenizer.path} has no EOS id; text-to-text needs one "
                     "(train_sentencepiece without bert_special_tokens)")
  if not inputs:
    raise ValueError("make_features: no examples")
  encoder, _, cut_inputs = _with_eos(glue.token_ids(tokenizer, list(inputs)), tokenizer.eos_id,
                                     max_input_length, multiple)
  arrays = {"encoder_input_tokens": encoder}
  cut_targets = 0
  if targets is not None:
    if len(targets) != len(inputs):
      raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    missing = [i for i, t in enumerate(targets) if t is None]
    if missing:
      raise ValueError(f"{len(missing)} targets are None (first: example {missing[0]}); "
                       "pass targets=None to build prediction features")
    decoder, lengths, cut_targets = _with_eos(glue.token_ids(tokenizer, list(targets)),
                                              tokenizer.eos_id, max_target_length, multiple)
    arrays["decoder_target_tokens"] = decoder
    shifted = np.zeros_like(decoder)  # the start id is 0, the padding id
    shifted[:, 1:] = decoder[:, :-1]
    arrays["decoder_input_tokens"] = shifted
    arrays["decoder_loss_weights"] = (
        np.arange(decoder.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
  return Text2TextFeatures(arrays, int(cut_inputs), int(cut_targets))


def ids_to_texts(tokenizer, tokens, eos_id: Optional[int] = None) -> List[str]:
  """Decoded ids [n, length] -> n texts, each cut at its first EOS.

  Ids beyond the tokenizer's vocabulary (T5's embedding is padded to a
  multiple of 128) decode as the unknown piece, as seqio does.
  """
  eos = tokenizer.eos_id if eos_id is None else eos_id
  texts = []
  for row in np.asarray(tokens).reshape(len(tokens), -1):
    row = row.tolist()
    if eos in row:
      row = row[:row.index(eos)]
    texts.append(tokenizer.decode([i if i < tokenizer.vocab_size else tokenizer.unk_id
                                   for i in row]))
  return texts


# ----------------------------------------------------------------------------
# Decoding many texts
# ----------------------------------------------------------------------------


def predict_texts(model, params, tokenizer, encoder_input_tokens, *, batch_size: int,
                  max_decode_length: int, beam_size: int = 1, alpha: float = 0.6,
                  min_length: int = 0, no_repeat_ngram: int = 0) -> List[str]:
  """Decodes all rows of encoder_input_tokens [n, enc_len] in batches -> n texts.

  The last batch is padded with empty rows so every batch has one shape (one
  compilation).

  Args:
    model, params: the T5Model and its parameters.
    tokenizer: turns ids back into text (ids_to_texts); its EOS ends decoding.
    encoder_input_tokens: int [n, enc_len], e.g. make_features(...).arrays[
      'encoder_input_tokens'].
    batch_size: rows decoded at once.
    max_decode_length: most tokens generated per text (EOS included).
    beam_size: 1 for greedy_decode, else beam_search's best beam.
    alpha: beam search length penalty exponent (>= 0).
    min_length, no_repeat_ngram: decoding constraints (bert_jax/decoding.py).

  Returns:
    n decoded texts, in row order.
  """
  if alpha < 0:
    raise ValueError(f"predict_texts: alpha must be >= 0 (beam search's early stop "
                     f"assumes the penalty grows with length), got {alpha}")
  tokens = np.asarray(encoder_input_tokens, np.int32)
  eos = tokenizer.eos_id
  if eos is None:
    raise ValueError(f"tokenizer {tokenizer.path} has no EOS id")
  constraints = dict(min_length=min_length, no_repeat_ngram=no_repeat_ngram)
  texts = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    rows = len(chunk)
    if rows < batch_size:
      filler = np.zeros((batch_size - rows, chunk.shape[1]), np.int32)
      filler[:, 0] = eos  # an empty text, so no row is all padding
      chunk = np.concatenate([chunk, filler])
    if beam_size == 1:
      out, _ = decoding.greedy_decode(model, params, chunk, max_decode_length=max_decode_length,
                                      eos_id=eos, **constraints)
    else:
      out, _ = decoding.beam_search(model, params, chunk, beam_size=beam_size,
                                    max_decode_length=max_decode_length, alpha=alpha,
                                    eos_id=eos, **constraints)
      out = out[:, 0]
    texts += ids_to_texts(tokenizer, np.asarray(out)[:rows], eos)
  return texts
