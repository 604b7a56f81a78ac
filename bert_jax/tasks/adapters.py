"""Fine-tuning task adapters: one class per task kind, what the loop needs of it.

bert_jax/finetune.py trains any BERT-family head the same way; what differs
between GLUE, CoNLL NER and SQuAD is here: which head (`model_task`,
`num_labels`), which loss (`objective`), how a split is read and encoded
(`load`), how model outputs are scored with the task's own metric (`score`,
`metric` names the one that picks the best epoch), how features become a
padded batch (`pad`) and how predictions are written (`write`). Readers,
features and metrics themselves live in glue.py, ner.py, squad.py,
squad_eval.py and text2text.py; these classes only join them up.

CoNLL NER has three heads (`config.finetune.ner_head`, the NER_HEADS
records): 'softmax' per token, 'crf' (models/crf.py: trained on the CRF's
negative log-likelihood, Viterbi-decoded in the predict step) and 'span'
(models/span.py: spans of up to `finetune.max_span_length` words, decoded on
the host). Each turns its outputs into word tags that ner.entity_metrics
scores alike.

An encoder-decoder family (T5, BART) casts a task as text (Text2TextTask):
the model is trained teacher-forced on (input text, target text) pairs and
scored by decoding texts (greedy or beam search from the key/value cache)
and parsing them back into the task's labels, entities or answers. A family
that also builds a 'sequence_classification' model (BART: the decoder state
at the last </s> through a dense/tanh/out_proj head) runs GLUE through
GlueTask with that head instead; `config.finetune.head` picks ('auto', the
default: the head where the family has one; 'classification'; 'text2text'),
see `output_head`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import numpy as np

import jax
from jax.experimental import multihost_utils

from bert_jax import decoding
from bert_jax import models
from bert_jax.defaults import ConfigError
from bert_jax.models import crf
from bert_jax.tasks import batching
from bert_jax.tasks import glue
from bert_jax.tasks import ner
from bert_jax.tasks import squad
from bert_jax.tasks import squad_eval
from bert_jax.tasks import summarization
from bert_jax.tasks import text2text


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


def _glue_task(config) -> glue.GlueTask:
  try:
    return glue.get_task(config.glue_task)
  except ValueError as e:
    raise ValueError(f"config.glue_task: {e}") from None


def _ner_scores(metrics: dict) -> dict:
  """The overall entity scores of ner.entity_metrics (per-type ones left out)."""
  return {k: float(metrics[k]) for k in ("precision", "recall", "f1", "accuracy")}


def _squad_scores(scores: dict) -> dict:
  """Official EM/F1; v2.0 also scores answerable (HasAns_) and unanswerable
  (NoAns_) questions apart."""
  return {k: float(v) for k, v in scores.items() if k.endswith(("exact", "f1"))}


def _read_glue(config, task: glue.GlueTask, split: str) -> list:
  """A GLUE split from the TSV folders or, with data.glue_source='tfds', from a
  prepared tfds `glue/<task>` in data.data_dir (never downloaded)."""
  if config.data.glue_source == "tfds":
    return glue.read_tfds(task, split, config.data.data_dir)
  return glue.read_tsv(config.data.data_dir, task, split)


class _Task:
  """What every task shares: padding of encoder features by `config.data.padding`."""
  decodes = False  # True: outputs are decoded texts (Text2TextTask.decode)

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer

  @property
  def model_kwargs(self) -> dict:
    """Head arguments of the task model (models.Family.build)."""
    return {} if self.num_labels is None else {"num_labels": self.num_labels}

  def predict_outputs(self, outputs: dict, batch: dict) -> dict:
    """What `score` / `write` read, computed in the jitted predict step from the model's
    outputs and the batch; every value has the batch as its leading axis."""
    del batch
    return outputs

  def pad(self, features: list, batch_size: int) -> dict:
    """One padded batch (filler rows up to batch_size weigh nothing)."""
    c, pad_id = self.config.data, self.tokenizer.pad_id  # RoBERTa's <pad> is 1
    if c.padding == "max":
      return batching.pad_batch(features, length=c.max_length, batch_size=batch_size,
                                pad_id=pad_id)
    return batching.pad_batch(features, multiple=c.pad_multiple, batch_size=batch_size,
                              pad_id=pad_id)


class GlueTask(_Task):
  """A GLUE task: sequence classification (regression for STS-B)."""
  model_task = "sequence_classification"

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.task = _glue_task(config)
    self.objective = "regression" if self.task.is_regression else "classification"
    self.num_labels = self.task.num_labels
    self.metric = self.task.primary_metric

  def load(self, split: str, limit: int) -> Split:
    examples = _limit(_read_glue(self.config, self.task, split), limit)
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


def _labelled(batch) -> Any:
  """[batch, length] bool: the positions that carry a label (each word's first sub-word)."""
  return batch["token_labels"] != ner.IGNORE_LABEL


def _span_features(batch: dict, features: list, label_names: tuple, config) -> dict:
  """The span head's inputs: `word_starts` [batch, length] and `span_labels` [batch,
  length, max_span_length] (ner.span_label_array of each sentence's gold entities)."""
  labelled = _labelled(batch)
  width, types = config.finetune.max_span_length, ner.entity_types(label_names)
  spans = np.full(labelled.shape + (width,), ner.IGNORE_LABEL, np.int32)
  for row, f in enumerate(features):
    tags = [label_names[i] for i in f["token_labels"][f["token_labels"] != ner.IGNORE_LABEL]]
    spans[row] = ner.span_label_array(ner.extract_entities(tags), len(tags),
                                      labelled.shape[1], width, types)
  return {"word_starts": labelled.astype(np.int32), "span_labels": spans}


@dataclasses.dataclass(frozen=True)
class NerHead:
  """One NER head (`config.finetune.ner_head`): its model, loss and decoding.

  Attributes:
    model_task: the BERT task the family builds.
    objective: the objectives.OBJECTIVES entry it trains with.
    model_kwargs: (label names, config) -> the head's arguments (num_labels, ...).
    predict: (model outputs, batch) -> per-row outputs, inside the jitted
      predict step (CRF: Viterbi tags at the labelled positions).
    word_tags: (one row's outputs, word positions, label names) -> word tags,
      which ner.entity_metrics scores as it scores every head.
    features: (padded batch, its features, label names, config) -> features
      the head adds to every batch; None: none.
    first_subwords_only: its words are the first sub-words alone (it cannot
      train with data.label_all_subwords).
  """
  model_task: str
  objective: str
  model_kwargs: Callable[[tuple, Any], dict]
  predict: Callable[[dict, dict], dict]
  word_tags: Callable[[dict, np.ndarray, tuple], list]
  features: Callable[[dict, list, tuple, Any], dict] | None = None
  first_subwords_only: bool = False


NER_HEADS = {
    # Softmax per token; a word's tag is the argmax at its first sub-word.
    "softmax": NerHead(
        "token_classification", "token_classification",
        model_kwargs=lambda names, config: {"num_labels": len(names)},
        predict=lambda outputs, batch: {"logits": outputs["logits"]},
        word_tags=lambda o, positions, names: ner.word_predictions(o["logits"], positions,
                                                                   names)),
    # Emissions + a BIO-constrained linear-chain CRF over the words (models/crf.py).
    "crf": NerHead(
        "crf_token_classification", "crf_token_classification",
        model_kwargs=lambda names, config: {"num_labels": len(names),
                                            "label_names": tuple(names)},
        predict=lambda outputs, batch: {"tags": crf.decode(outputs, _labelled(batch))},
        word_tags=lambda o, positions, names: ner.word_predictions(o["tags"], positions,
                                                                   names)),
    # Every span of up to finetune.max_span_length words classified (models/span.py);
    # class 0 is 'not an entity'.
    "span": NerHead(
        "span_classification", "span_classification",
        model_kwargs=lambda names, config: {
            "num_labels": 1 + len(ner.entity_types(names)),
            "max_span_length": config.finetune.max_span_length},
        predict=lambda outputs, batch: outputs,
        word_tags=lambda o, positions, names: ner.span_word_predictions(o["span_logits"],
                                                                        positions, names),
        features=_span_features, first_subwords_only=True),
}


def ner_head(config) -> NerHead:
  """The head `config.finetune.ner_head` names, its settings checked (one-line errors)."""
  ft = config.finetune
  if ft.ner_head not in NER_HEADS:
    raise ConfigError("finetune.ner_head", f"unknown NER head {ft.ner_head!r}; choose one of "
                      f"{list(NER_HEADS)}")
  if ft.max_span_length < 1:
    raise ConfigError("finetune.max_span_length", f"must be >= 1, got {ft.max_span_length}")
  if NER_HEADS[ft.ner_head].first_subwords_only and config.data.label_all_subwords:
    raise ConfigError("data.label_all_subwords", f"ner_head {ft.ner_head!r} reads words "
                      "from their first sub-words alone; set it False")
  return NER_HEADS[ft.ner_head]


class ConllTask(_Task):
  """CoNLL NER with the head `finetune.ner_head`; labels from the training file's tags."""
  metric = "f1"

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self._read = functools.lru_cache(maxsize=4)(ner.read_conll)
    train_data = self._read(_data_file(config, config.data.train_split))
    self.label_names = ner.label_names_of(train_data.sentences)
    self.head = ner_head(config)
    self.model_task, self.objective = self.head.model_task, self.head.objective
    self.num_labels = self.model_kwargs["num_labels"]

  @property
  def model_kwargs(self) -> dict:
    return self.head.model_kwargs(self.label_names, self.config)

  def pad(self, features: list, batch_size: int) -> dict:
    """The padded batch, plus the features the head needs (the span head's targets)."""
    batch = super().pad(features, batch_size)
    if self.head.features is not None:
      batch.update(self.head.features(batch, features, self.label_names, self.config))
    return batch

  def predict_outputs(self, outputs: dict, batch: dict) -> dict:
    return self.head.predict(outputs, batch)

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
    return [self.head.word_tags(o, positions, self.label_names)
            for o, positions in zip(outputs, split.extra)]

  def score(self, split: Split, outputs: list) -> dict:
    return _ner_scores(ner.entity_metrics([s.tags for s in split.examples],
                                          self._tags(split, outputs)))

  def write(self, split: Split, outputs: list, folder: str) -> str:
    path = os.path.join(folder, os.path.basename(split.name).replace(".gz", "") + ".conll")
    ner.write_predictions(path, split.examples, self._tags(split, outputs))
    return path


class SquadTask(_Task):
  """SQuAD: start/end span logits, answers by n-best post-processing."""
  model_task = "question_answering"
  objective = "question_answering"
  metric = "f1"
  num_labels = None

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
      # Windows end at their [SEP] (RoBERTa pads with 1, and its <s> is 0).
      n = int(np.sum(b["encoder_input_tokens"][i] != self.tokenizer.pad_id))
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
    return _squad_scores(squad_eval.evaluate(split.extra[0], self._answers(split, outputs)))

  def write(self, split: Split, outputs: list, folder: str) -> str:
    path = os.path.join(folder, os.path.basename(split.name).split(".json")[0]
                        + "-predictions.json")
    os.makedirs(folder, exist_ok=True)
    squad_eval.write_predictions(path, self._answers(split, outputs))
    return path


class Text2TextTask(_Task):
  """Any task as text for a T5 model: seq2seq loss, scored on decoded texts.

  Casting (text2text.py): GLUE 'sst2 sentence: ...' -> 'positive', CoNLL
  'ner sentence: ...' -> 'EU = ORG ; German = MISC', SQuAD 'question: Q
  context: C' -> the first gold answer, summarization (summarization.py)
  data.source_prefix + document -> the summary, scored by ROUGE-1/2/L
  (best epoch by rougeL). Features are the input ids + EOS
  (cut to data.max_length) and the target ids + EOS (cut to
  data.max_target_length); `pad` makes the teacher-forced decoder inputs.
  """
  model_task = "seq2seq"
  objective = "seq2seq"
  num_labels = None
  decodes = True

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if config.task == "summarization" and not models.get(config.family).encoder_decoder:
      raise ConfigError("family", f"task 'summarization' writes text: it needs an "
                        f"encoder-decoder family (t5, bart), not {config.family!r}")
    if tokenizer.eos_id is None:
      raise ValueError(f"config.data.tokenizer: {tokenizer.path} has no EOS id; text-to-text "
                       "needs a T5-layout SentencePiece model")
    self.kind = config.task
    # The decoder's first input: the family's start id (T5: 0, its padding id;
    # BART: </s>); decode() checks the model agrees.
    self.decoder_start_id = getattr(models.get(config.family).config_class,
                                    "decoder_start_token_id", 0)
    if self.kind == "glue":
      self.glue = _glue_task(config)
      self.metric = self.glue.primary_metric
    elif self.kind == "summarization":
      summarization.porter_stemmer()  # ROUGE stems (nltk): fail now, not after an epoch
      self.metric = "rougeL"
    else:
      self.metric = "f1"

  def _read(self, split: str, limit: int):
    """(examples, inputs, targets (None where unlabelled), extra) of a split."""
    if self.kind == "glue":
      examples = _limit(_read_glue(self.config, self.glue, split), limit)
      return (examples,) + text2text.glue_to_text(self.glue, examples) + (None,)
    if self.kind == "conll":
      sentences = _limit(ner.read_conll(_data_file(self.config, split)).sentences, limit)
      return (sentences,) + text2text.ner_to_text(sentences) + (None,)
    if self.kind == "summarization":
      c = self.config.data
      pairs = _limit(summarization.read_pairs(_data_file(self.config, split), c.document_key,
                                              c.summary_key), limit)
      return (pairs,) + summarization.pairs_to_text(pairs, c.source_prefix) + (None,)
    data = squad.read_squad(_data_file(self.config, split))
    data = dataclasses.replace(data, examples=_limit(data.examples, limit))
    return (data.examples,) + text2text.squad_to_text(data.examples) + (data,)

  def load(self, split: str, limit: int) -> Split:
    examples, inputs, targets, extra = self._read(split, limit)
    if not examples:
      raise ValueError(f"{self.config.task} split {split!r} in {self.config.data.data_dir} "
                       "has no examples")
    c, eos = self.config.data, self.tokenizer.eos_id
    features = [{"encoder_input_tokens": np.append(ids[:c.max_length - 1], eos).astype(np.int32)}
                for ids in glue.token_ids(self.tokenizer, inputs)]
    labelled = [i for i, t in enumerate(targets) if t is not None]
    for i, ids in zip(labelled, glue.token_ids(self.tokenizer, [targets[i] for i in labelled])):
      features[i]["decoder_target_tokens"] = np.append(
          ids[:c.max_target_length - 1], eos).astype(np.int32)
    cut = sum(len(f["encoder_input_tokens"]) >= c.max_length for f in features)
    if cut:
      logging.info("%s: %d of %d inputs cut to max_length=%d", split, cut, len(features),
                   c.max_length)
    return Split(split, examples, features, extra)

  def pad(self, features: list, batch_size: int) -> dict:
    """Encoder tokens, decoder targets / inputs (targets shifted right) and loss weights.

    Filler rows hold just EOS, so no encoder row is all padding, and weigh 0.
    """
    c = self.config.data
    def width(key, max_length):
      if c.padding == "max":
        return max_length
      longest = max(len(f[key]) for f in features)
      return batching.padded_length(longest, c.pad_multiple, max_length)
    # Encoder padding is the tokenizer's (0 for T5; RoBERTa BPE, BART: 1).
    batch = {"encoder_input_tokens": np.full((batch_size, width("encoder_input_tokens",
                                                                c.max_length)),
                                             self.tokenizer.pad_id, np.int32)}
    batch["encoder_input_tokens"][len(features):, 0] = self.tokenizer.eos_id
    with_targets = all("decoder_target_tokens" in f for f in features)
    if with_targets:
      batch["decoder_target_tokens"] = np.zeros(
          (batch_size, width("decoder_target_tokens", c.max_target_length)), np.int32)
    for i, f in enumerate(features):
      batch["encoder_input_tokens"][i, :len(f["encoder_input_tokens"])] = f["encoder_input_tokens"]
      if with_targets:
        batch["decoder_target_tokens"][i, :len(f["decoder_target_tokens"])] = (
            f["decoder_target_tokens"])
    if with_targets:
      targets = batch["decoder_target_tokens"]  # [batch, dec_len]
      batch["decoder_input_tokens"] = np.pad(targets[:, :-1], ((0, 0), (1, 0)),
                                             constant_values=self.decoder_start_id)
      batch["decoder_loss_weights"] = (targets > 0).astype(np.float32)
    return batch

  def decode(self, model, params, split: Split, batch_size: int, batch_sharding) -> list:
    """Decoded texts of every feature of `split`, in feature order.

    Batches of similar input length (padded to data.pad_multiple) are put on
    the mesh split over the batch axis, so every device (and host) decodes
    its share; each host then gathers all rows.
    """
    d = self.config.decode
    if model.config.decoder_start_token_id != self.decoder_start_id:
      raise ValueError(f"the model's decoder_start_token_id {model.config.decoder_start_token_id} "
                       f"is not the {self.config.family} family's {self.decoder_start_id} that "
                       "training batches start with")
    max_decode = d.max_decode_length or self.config.data.max_target_length
    constraints = dict(min_length=d.get("min_length", 0),
                       no_repeat_ngram=d.get("no_repeat_ngram", 0))
    lengths = [len(f["encoder_input_tokens"]) for f in split.features]
    texts = [None] * len(lengths)
    for indices in batching.bucket_batches(lengths, batch_size):
      padded = self.pad([split.features[i] for i in indices], batch_size)
      tokens = batching.on_mesh({"tokens": padded["encoder_input_tokens"]},
                                batch_sharding)["tokens"]  # [batch, enc_len]
      if d.beam_size == 1:
        out, _ = decoding.greedy_decode(model, params, tokens, max_decode_length=max_decode,
                                        eos_id=self.tokenizer.eos_id, **constraints)
      else:
        out, _ = decoding.beam_search(model, params, tokens, beam_size=d.beam_size,
                                      max_decode_length=max_decode, alpha=d.alpha,
                                      eos_id=self.tokenizer.eos_id, **constraints)
        out = out[:, 0]  # the best beam
      out = (multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1
             else jax.device_get(out))
      for text, i in zip(text2text.ids_to_texts(self.tokenizer, out), indices):
        texts[i] = text
    return texts

  def score(self, split: Split, outputs: list) -> dict:
    """The scores the encoder task reports, plus 'num_unparseable' (GLUE, NER)."""
    if self.kind == "glue":
      return {k: float(v) for k, v in
              text2text.glue_metrics(self.glue, outputs, split.examples).items()}
    if self.kind == "conll":
      m = text2text.ner_metrics(split.examples, outputs)
      return dict(_ner_scores(m), num_unparseable=float(m["num_unparseable"]))
    if self.kind == "summarization":  # ROUGE-1/2/L F-measure x 100, stemmed
      return summarization.summary_metrics(split.examples, outputs)
    return _squad_scores(text2text.squad_metrics(split.extra, outputs))

  def write(self, split: Split, outputs: list, folder: str) -> str:
    """The task's own predictions file (unparseable texts: class 0 / score 0.0, counted)."""
    if self.kind == "glue":
      predictions = text2text.glue_predictions(self.glue, outputs)
      bad = int(np.sum(predictions < 0))
      if bad:
        logging.warning("%s: %d of %d predictions are not %s labels; written as %s", split.name,
                        bad, len(outputs), self.glue.name,
                        "0.0" if self.glue.is_regression else self.glue.label_names[0])
      path = os.path.join(folder, self.glue.submission.get(split.name,
                                                           f"{self.glue.name}-{split.name}.tsv"))
      glue.write_predictions(path, self.glue, split.examples, np.maximum(predictions, 0))
      return path
    if self.kind == "conll":
      path = os.path.join(folder, os.path.basename(split.name).replace(".gz", "") + ".conll")
      ner.write_predictions(path, split.examples, [
          text2text.ner_tags(s.words, t)[0] for s, t in zip(split.examples, outputs)])
      return path
    if self.kind == "summarization":
      path = os.path.join(folder, os.path.basename(split.name).rsplit(".", 1)[0]
                          + "-summaries.jsonl")
      summarization.write_summaries(path, split.examples, outputs)
      return path
    path = os.path.join(folder, os.path.basename(split.name).split(".json")[0]
                        + "-predictions.json")
    os.makedirs(folder, exist_ok=True)
    squad_eval.write_predictions(path, {ex.qas_id: t for ex, t in zip(split.examples, outputs)})
    return path


TASKS = {"glue": GlueTask, "conll": ConllTask, "squad": SquadTask,
         "summarization": Text2TextTask}  # text-to-text only (encoder-decoder families)

# Sentence embeddings: a siamese bi-encoder trained on pairs (tasks/sentence.py).
from bert_jax.tasks import sentence  # noqa: E402  (kept with its entry; sentence.py reads Split)
TASKS["sbert"] = sentence.SentencePairTask


def _cloze_task(config, tokenizer):
  """PET's cloze few-shot task (tasks/cloze.py; it subclasses GlueTask, so it is
  imported on use, not here)."""
  from bert_jax.tasks import cloze  # pylint: disable=import-outside-toplevel
  return cloze.ClozeTask(config, tokenizer)


TASKS["cloze"] = _cloze_task


HEADS = ("auto", "classification", "text2text")  # config.finetune.head
# Tasks that read an encoder's token states (sentence embeddings) or its MLM head (PET's
# cloze): they have no text-to-text form.
ENCODER_TASKS = ("sbert", "cloze")
# PEFT methods that run inside the model's apply (peft_modules.py): text-to-text decoding
# applies the unwrapped model (finetune._make_predictor), which would drop them.
_IN_MODEL_METHODS = ("prompt", "houlsby", "pfeiffer")


def output_head(config) -> str:
  """How `config.task` trains on `config.family`: 'classification' (the task's own head
  on the model) or 'text2text' (Text2TextTask), as `config.finetune.head` says.

  'auto': encoders take their task heads; an encoder-decoder takes its
  sequence-classification head for GLUE when the family builds one (BART),
  text-to-text otherwise (T5; BART's NER and SQuAD). An impossible choice is
  a one-line ConfigError naming finetune.head.
  """
  family = models.get(config.family)
  head = config.finetune.get("head", "auto")
  if family.encoder_decoder and config.task in ENCODER_TASKS:
    raise ConfigError("task", f"{config.task!r} needs an encoder family (bert, modernbert, "
                      f"deberta, ...); {family.name!r} is an encoder-decoder")
  if head not in HEADS:
    raise ConfigError("finetune.head", f"unknown head {head!r}; choose one of {list(HEADS)}")
  if not family.encoder_decoder:
    if head == "text2text":
      raise ConfigError("finetune.head", f"'text2text' needs an encoder-decoder family; "
                        f"{family.name!r} is an encoder (use 'auto')")
    return "classification"
  has_head = "sequence_classification" in family.tasks
  if head == "auto":
    return "classification" if has_head and config.task == "glue" else "text2text"
  if head == "classification" and not has_head:
    raise ConfigError("finetune.head", f"the {family.name!r} family has no classification "
                      "head; use 'text2text'")
  if head == "classification" and config.task != "glue":
    raise ConfigError("finetune.head", f"the {family.name!r} family's classification head "
                      f"serves task 'glue', not {config.task!r}; use 'text2text'")
  return head


def make_task(config, tokenizer):
  """The task object of `config.task` under `output_head` (Text2TextTask or TASKS')."""
  if config.task not in TASKS:
    raise ValueError(f"config.task: unknown task {config.task!r}; choose one of "
                     f"{list(TASKS)}")
  if not config.data.data_dir or not os.path.isdir(config.data.data_dir):
    raise FileNotFoundError(f"config.data.data_dir: folder {config.data.data_dir!r} does not "
                            "exist")
  if output_head(config) == "text2text":
    method = config.finetune.method
    if method in _IN_MODEL_METHODS:
      raise ConfigError("finetune.method", f"{method!r} is not supported for text-to-text "
                        f"decoding of the {config.family!r} family (decoding runs the plain "
                        "model); use 'lora', 'bitfit' or 'full'")
    return Text2TextTask(config, tokenizer)
  return TASKS[config.task](config, tokenizer)
