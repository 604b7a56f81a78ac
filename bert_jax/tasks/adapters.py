"""Fine-tuning task adapters: one class per task kind, what the loop needs of it.

bert_jax/finetune.py trains any BERT-family head the same way; what differs
between GLUE, CoNLL NER and SQuAD is here: which head (`model_task`,
`num_labels`), which loss (`objective`), how a split is read and encoded
(`load`), how model outputs are scored with the task's own metric (`score`,
`metric` names the one that picks the best epoch) and how predictions are
written (`write`). Readers, features and metrics themselves live in glue.py,
ner.py, squad.py and squad_eval.py; these classes only join them up.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import numpy as np

from bert_jax.tasks import glue
from bert_jax.tasks import ner
from bert_jax.tasks import squad
from bert_jax.tasks import squad_eval


@dataclasses.dataclass
class Split:
  """One read and encoded split.

  Attributes:
    name: the split (GLUE split name or file name).
    examples: the task's examples (GlueExample, NerSentence, SquadExample).
    features: one unpadded feature dict per model input (GLUE example, CoNLL
      sentence, SQuAD window), batch-contract names.
    extra: what scoring needs besides them (CoNLL word positions, SQuAD data
      and windows).
  """
  name: str
  examples: list
  features: list
  extra: Any = None


def _data_file(config, split: str) -> str:
  path = os.path.join(config.data.data_dir, split)
  if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
    return path + ".gz"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data: {config.task} split file {path} (or {path}.gz) "
                            "does not exist")
  return path


def _limit(items: list, n: int) -> list:
  return items[:n] if n > 0 else items


class GlueTask:
  """A GLUE task: sequence classification (regression for STS-B)."""
  model_task = "sequence_classification"

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    try:
      self.task = glue.get_task(config.glue_task)
    except ValueError as e:
      raise ValueError(f"config.glue_task: {e}") from None
    self.objective = "regression" if self.task.is_regression else "classification"
    self.num_labels = self.task.num_labels
    self.metric = self.task.primary_metric

  def load(self, split: str, limit: int) -> Split:
    examples = _limit(glue.read_tsv(self.config.data.data_dir, self.task, split), limit)
    features = glue.encode_examples(examples, self.tokenizer, self.task,
                                    max_length=self.config.data.max_length)
    return Split(split, examples, features)

  def score(self, split: Split, outputs: list) -> dict:
    labels = np.stack([f["classifier_labels"] for f in split.features])
    return glue.compute_metrics(self.task, np.stack([o["logits"] for o in outputs]), labels)

  def write(self, split: Split, outputs: list, folder: str) -> str:
    path = os.path.join(folder, self.task.submission.get(split.name,
                                                         f"{self.task.name}-{split.name}.tsv"))
    glue.write_predictions(path, self.task, split.examples,
                           np.stack([o["logits"] for o in outputs]))
    return path


class ConllTask:
  """CoNLL NER: token classification, labels from the training file's tags."""
  model_task = "token_classification"
  objective = "token_classification"
  metric = "f1"

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self._read = functools.lru_cache(maxsize=4)(ner.read_conll)
    train_data = self._read(_data_file(config, config.data.train_split))
    self.label_names = ner.label_names_of(train_data.sentences)
    self.num_labels = len(self.label_names)

  def load(self, split: str, limit: int) -> Split:
    data = self._read(_data_file(self.config, split))
    unknown = sorted({t for s in data.sentences for t in s.tags} - set(self.label_names))
    if unknown:
      raise ValueError(f"{data.path}: tags {unknown} are not in the label set of the "
                       f"training file {self.label_names}")
    sentences = _limit(data.sentences, limit)
    encoded = ner.encode_sentences(sentences, self.tokenizer, self.label_names,
                                   max_length=self.config.data.max_length,
                                   label_all_subwords=self.config.data.label_all_subwords)
    if encoded.num_truncated_words:
      logging.info("%s: %d sentences truncated to max_length (%d words predicted 'O')", split,
                   encoded.num_truncated_sentences, encoded.num_truncated_words)
    return Split(split, sentences, encoded.features, encoded.word_positions)

  def _tags(self, split: Split, outputs: list) -> list:
    return [ner.word_predictions(o["logits"], positions, self.label_names)
            for o, positions in zip(outputs, split.extra)]

  def score(self, split: Split, outputs: list) -> dict:
    m = ner.entity_metrics([s.tags for s in split.examples], self._tags(split, outputs))
    return {k: float(m[k]) for k in ("precision", "recall", "f1", "accuracy")}

  def write(self, split: Split, outputs: list, folder: str) -> str:
    path = os.path.join(folder, os.path.basename(split.name).replace(".gz", "") + ".conll")
    ner.write_predictions(path, split.examples, self._tags(split, outputs))
    return path


class SquadTask:
  """SQuAD: start/end span logits, answers by n-best post-processing."""
  model_task = "question_answering"
  objective = "question_answering"
  metric = "f1"
  num_labels = None

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer

  def load(self, split: str, limit: int) -> Split:
    c = self.config.data
    data = squad.read_squad(_data_file(self.config, split))
    data = dataclasses.replace(data, examples=_limit(data.examples, limit))
    windows = squad.make_features(
        data.examples, self.tokenizer, max_seq_length=c.max_length, doc_stride=c.doc_stride,
        max_query_length=c.max_query_length, training=split == c.train_split)
    b = windows.batch
    features = []
    for i in range(len(windows)):
      n = int(np.sum(b["encoder_input_tokens"][i] != 0))  # windows end at their [SEP]
      features.append({"encoder_input_tokens": b["encoder_input_tokens"][i, :n],
                       "encoder_type_ids": b["encoder_type_ids"][i, :n],
                       "start_positions": b["start_positions"][i],
                       "end_positions": b["end_positions"][i]})
    return Split(split, data.examples, features, (data, windows))

  def _answers(self, split: Split, outputs: list) -> dict:
    data, windows = split.extra
    shape = windows.batch["encoder_input_tokens"].shape
    logits = {}
    for key in ("start_logits", "end_logits"):
      full = np.full(shape, -1e4, np.float32)  # padding is never a doc token anyway
      for i, o in enumerate(outputs):
        full[i, :len(o[key])] = o[key][:shape[1]]
      logits[key] = full
    c = self.config.data
    return squad_eval.postprocess(data.examples, windows, logits["start_logits"],
                             logits["end_logits"], self.tokenizer, n_best_size=c.n_best_size,
                             max_answer_length=c.max_answer_length,
                             version_2=data.version_2).texts

  def score(self, split: Split, outputs: list) -> dict:
    scores = squad_eval.evaluate(split.extra[0], self._answers(split, outputs))
    return {k: float(v) for k, v in scores.items() if k in ("exact", "f1")}

  def write(self, split: Split, outputs: list, folder: str) -> str:
    path = os.path.join(folder, os.path.basename(split.name).split(".json")[0]
                        + "-predictions.json")
    os.makedirs(folder, exist_ok=True)
    squad_eval.write_predictions(path, self._answers(split, outputs))
    return path


TASKS = {"glue": GlueTask, "conll": ConllTask, "squad": SquadTask}


def make_task(config, tokenizer):
  """The task object of `config.task` (GlueTask, ConllTask or SquadTask)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task: unknown task {config.task!r}; choose one of "
                     f"{list(TASKS)}")
  if not config.data.data_dir or not os.path.isdir(config.data.data_dir):
    raise FileNotFoundError(f"config.data.data_dir: folder {config.data.data_dir!r} does not "
                            "exist")
  return TASKS[config.task](config, tokenizer)
