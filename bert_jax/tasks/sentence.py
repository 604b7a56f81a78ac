"""Sentence-embedding fine-tuning: a siamese bi-encoder (Sentence-BERT, Reimers & Gurevych 2019).

`config.task = 'sbert'` (configs/sbert.py) trains an encoder of any
BERT-style family to embed sentences: both sentences of a pair go through
the SAME encoder (one set of weights, called twice: a two-tower model with
shared towers) and the same pooling (`finetune.pooling`: mean | cls | max,
models/pooling.py), giving u and v [batch, hidden]; `finetune.loss` scores
them (losses.py):

  mnr      multiple negatives ranking (in-batch softmax over scale * cosines,
           `finetune.mnr_scale` 20): positive pairs only; every other
           positive of the GLOBAL batch is a negative. Under jit with the
           batch split over the mesh's data axes u and v are the global
           arrays, so the similarity matrix spans every device and host.
  cosine   mean squared error of cos(u, v) against the gold similarity (MRPC's
           0/1 label, STS-B's score / 5).
  softmax  cross entropy of a linear layer over (u, v, |u - v|) (SBERT's NLI
           objective); the layer is dropped when embedding.

Data: the GLUE pair tasks' TSV files through glue.read_tsv (`glue_task`:
mrpc, qqp with 0/1 labels; stsb with 0-5 scores). Each epoch the dev pairs
are scored as sentence_eval.py does without training: a pair is a
paraphrase when its cosine reaches a threshold chosen on
`finetune.threshold_split` (train: the honest figure; '' = dev's own best,
an upper bound); the best epoch is kept by F1. STS-B is scored by the
Spearman correlation of the cosines with the gold scores.

The model is the family's bare encoder ('encoder' task) wrapped in
`TwoTowerModel`; its parameters stay at the top level (params['encoder']),
so init_from's weights load as for any task and the best/ checkpoint holds
the encoder `bert-jax embed --init_from=WORKDIR` embeds with
(`restore_encoder`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from bert_jax import losses
from bert_jax import models
from bert_jax import objectives
from bert_jax import steps
from bert_jax.defaults import ConfigError
from bert_jax.models import layers
from bert_jax.models import pooling as pooling_lib
from bert_jax.tasks import batching
from bert_jax.tasks import glue
from bert_jax.tasks import sentence_eval

LOSSES = ("mnr", "cosine", "softmax")
# The sentence-embedding options of `config.finetune` (configs/sbert.py sets them).
OPTIONS = ("pooling", "loss", "mnr_scale", "threshold_split")


# ------------------------------------------------------------------- the model


class TwoTowerModel(nn.Module):
  """One encoder applied to both sentences of a pair, pooled into u and v.

  Attributes:
    tower: the family's bare encoder task model (`build(config, 'encoder')`);
      its parameters are this model's own (shared scope), so they sit at
      params['encoder'] as in every other task model.
    pooling: how token states become one vector.
    num_labels: > 0 adds SBERT's classifier over (u, v, |u - v|) ('softmax').
  """
  tower: nn.Module
  pooling: pooling_lib.PoolingConfig
  num_labels: int = 0

  @property
  def config(self):
    """The encoder's hyperparameters (what the trainer asks a task model for)."""
    return self.tower.config

  def setup(self):
    nn.share_scope(self, self.tower)  # the tower's params at the top: params['encoder']
    if self.num_labels:
      self.pair_classifier = layers.DenseGeneral(self.num_labels, kernel_axes=("embed", "classes"),
                                                 name="pair_classifier")

  def embed(self, tokens, mask, enable_dropout: bool = False):
    """[batch, length] tokens (mask: 1 = real) -> float32 [batch, dim] pooled vectors."""
    if mask is None:  # init traces with tokens alone
      mask = (tokens != self.tower.config.pad_token_id).astype(jnp.int32)
    inputs = {"encoder_input_tokens": tokens, "encoder_mask": mask}
    out = self.tower(**steps.model_inputs(self.tower, inputs), enable_dropout=enable_dropout)
    hidden = out[0] if isinstance(out, tuple) else out  # [batch, length, hidden]
    return pooling_lib.pool(hidden, mask, self.pooling)

  def __call__(self, encoder_input_tokens, encoder_mask=None, pair_input_tokens=None,
               pair_mask=None, enable_dropout: bool = False) -> dict:
    """{'u', 'v'} [batch, dim] of sentence A and B (and 'logits' [batch, labels])."""
    u = self.embed(encoder_input_tokens, encoder_mask, enable_dropout)
    v = u if pair_input_tokens is None else self.embed(pair_input_tokens, pair_mask,
                                                       enable_dropout)
    out = {"u": u, "v": v}
    if self.num_labels:
      out["logits"] = self.pair_classifier(losses.sbert_pair_features(u, v))
    return out


# --------------------------------------------------------------- the losses


def _mnr_metrics(outputs, batch, *, prefix, scale):
  return losses.multiple_negatives_ranking_loss(
      outputs["u"], outputs["v"], objectives.example_weights(batch), scale=scale,
      prefix=prefix)[1]


def _cosine_metrics(outputs, batch, *, prefix):
  return losses.cosine_similarity_loss(outputs["u"], outputs["v"], batch["pair_scores"],
                                       objectives.example_weights(batch), prefix=prefix)[1]


def _softmax_metrics(outputs, batch, *, prefix):
  labels = jnp.maximum(batch["classifier_labels"], 0)  # filler rows: -1, weight 0
  return losses.categorical(outputs["logits"], labels, objectives.classifier_weights(batch),
                            prefix)[1]


def _examples(batch):
  return jnp.sum(objectives.example_weights(batch))


def make_objective(loss: str, scale: float = 20.0) -> objectives.Objective:
  """The training objective of `finetune.loss` (a record, not registered: scale is a run option)."""
  weights = ("example_weights",)
  terms = {
      "mnr": objectives.Term("mnrl", functools.partial(_mnr_metrics, scale=float(scale)),
                             _examples, ("u", "v"), weights),
      "cosine": objectives.Term("cos_sim", _cosine_metrics, _examples, ("u", "v"),
                                ("pair_scores",) + weights),
      "softmax": objectives.Term("sbert_cls", _softmax_metrics,
                                 lambda b: jnp.sum(objectives.classifier_weights(b)),
                                 ("logits",), ("classifier_labels", "classifier_weights")),
  }
  if loss not in terms:
    raise ConfigError("finetune.loss", f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
  return objectives.Objective(f"sbert_{loss}", "encoder", (terms[loss],))


# --------------------------------------------------------------- the config


def pooling_config(config) -> pooling_lib.PoolingConfig:
  """`finetune.pooling` ('mean', 'cls', 'max' or several joined by ',') as a PoolingConfig."""
  try:
    return pooling_lib.PoolingConfig(pooling_lib.parse_modes(config.finetune.pooling))
  except ValueError as e:
    raise ConfigError("finetune.pooling", str(e)) from None


def check_config(config) -> glue.GlueTask:
  """Checks the sentence-embedding options (one-line errors); returns the GLUE pair task."""
  missing = [k for k in OPTIONS if k not in config.finetune]
  if missing:
    raise ConfigError(f"finetune.{missing[0]}", "missing; start from configs/sbert.py, which "
                      f"sets finetune.{', finetune.'.join(OPTIONS)}")
  ft = config.finetune
  if ft.loss not in LOSSES:
    raise ConfigError("finetune.loss", f"unknown loss {ft.loss!r}; choose one of {list(LOSSES)}")
  pooling_config(config)
  if not ft.mnr_scale > 0:
    raise ConfigError("finetune.mnr_scale", f"must be > 0, got {ft.mnr_scale}")
  try:
    task = glue.get_task(config.glue_task)
  except ValueError as e:
    raise ConfigError("glue_task", str(e)) from None
  if not task.is_pair or not (task.is_regression or task.num_labels == 2):
    raise ConfigError("glue_task", f"sbert trains on sentence pairs with 0/1 labels or "
                      f"similarity scores (mrpc, qqp, stsb), not {task.name!r}")
  if task.is_regression and ft.loss != "cosine":
    raise ConfigError("finetune.loss", f"{ft.loss!r} needs 0/1 labels; {task.name} has "
                      "similarity scores: use 'cosine'")
  return task


# ----------------------------------------------------------------- the task


def _target(task: glue.GlueTask, label) -> float:
  """The cosine target: the 0/1 label, or the 0-5 score scaled to [0, 1]."""
  return float(label) / 5.0 if task.is_regression else float(glue.label_id(task, label))


class SentencePairTask:
  """The task adapter (adapters.TASKS['sbert']): pairs in, two pooled vectors out."""
  decodes = False
  model_task = "encoder"

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.glue = check_config(config)
    ft = config.finetune
    self.loss, self.pooling = ft.loss, pooling_config(config)
    self.num_labels = self.glue.num_labels if ft.loss == "softmax" else None
    self.objective = make_objective(ft.loss, ft.mnr_scale)
    if self.glue.is_regression:
      self.metric = "spearman"
    else:
      self.metric = "f1" if ft.threshold_split else "dev_best_f1"
    self._features = functools.lru_cache(maxsize=4)(self._encode)

  @property
  def model_kwargs(self) -> dict:
    """The bare encoder takes no head arguments (the classifier is the wrapper's)."""
    return {}

  def wrap_model(self, model: nn.Module) -> TwoTowerModel:
    """The family's bare encoder -> the two-tower model that trains (finetune._setup)."""
    return TwoTowerModel(model, self.pooling, self.num_labels or 0)

  # ---- data

  def _encode(self, split: str, limit: int) -> tuple[list, list]:
    """(examples, features) of every labelled pair of `split` (its first `limit`)."""
    c = self.config
    examples = glue.read_tsv(c.data.data_dir, self.glue, split)
    examples = [e for e in examples if e.label is not None]
    examples = examples[:limit] if limit > 0 else examples
    if not examples:
      raise ValueError(f"config.data: {self.glue.name} split {split!r} has no labelled pairs")
    budget = c.data.max_length - self.tokenizer.num_special_tokens(False)
    if budget < 1:
      raise ConfigError("data.max_length", f"{c.data.max_length} leaves no room for a word")
    ids_a = glue.token_ids(self.tokenizer, [e.text_a for e in examples])
    ids_b = glue.token_ids(self.tokenizer, [e.text_b for e in examples])
    features = []
    for e, a, b in zip(examples, ids_a, ids_b):
      features.append({
          "encoder_input_tokens": self.tokenizer.build_inputs(a[:budget])[0],
          "pair_input_tokens": self.tokenizer.build_inputs(b[:budget])[0],
          "classifier_labels": (np.int32(-1) if self.glue.is_regression
                                else glue.label_id(self.glue, e.label)),
          "pair_scores": np.float32(_target(self.glue, e.label))})
    return examples, features

  def load(self, split: str, limit: int):
    """A split's pairs. Training with mnr keeps the positive pairs alone; an eval
    split carries the threshold split's pairs after its own (extra: how many are its own)."""
    from bert_jax.tasks import adapters  # pylint: disable=import-outside-toplevel  (a cycle)
    c = self.config
    examples, features = self._features(split, limit)
    if split == c.data.train_split:
      if self.loss == "mnr":
        keep = [i for i, f in enumerate(features) if f["pair_scores"] > 0.5]
        examples, features = [examples[i] for i in keep], [features[i] for i in keep]
      return adapters.Split(split, examples, features, len(features))
    own = len(features)
    if c.finetune.threshold_split and not self.glue.is_regression:
      features = features + self._features(c.finetune.threshold_split,
                                           c.data.max_train_examples)[1]
    return adapters.Split(split, examples, features, own)

  def pad(self, features: list, batch_size: int) -> dict:
    """Sentence A and B padded apart (each to its longest, or data.max_length) + masks."""
    c, pad_id = self.config.data, self.tokenizer.pad_id
    batch = {}
    for key, mask_key in (("encoder_input_tokens", "encoder_mask"),
                          ("pair_input_tokens", "pair_mask")):
      longest = max(len(f[key]) for f in features)
      length = c.max_length if c.padding == "max" else batching.padded_length(
          longest, c.pad_multiple, c.max_length)
      tokens = np.full((batch_size, length), pad_id, np.int32)  # [batch, length]
      mask = np.zeros((batch_size, length), np.int32)
      for i, f in enumerate(features):
        tokens[i, :len(f[key])] = f[key]
        mask[i, :len(f[key])] = 1
      batch[key], batch[mask_key] = tokens, mask
    n = len(features)
    batch["example_weights"] = (np.arange(batch_size) < n).astype(np.float32)
    batch["classifier_weights"] = batch["example_weights"]
    batch["classifier_labels"] = np.full((batch_size,), -1, np.int32)
    batch["classifier_labels"][:n] = [f["classifier_labels"] for f in features]
    batch["pair_scores"] = np.zeros((batch_size,), np.float32)
    batch["pair_scores"][:n] = [f["pair_scores"] for f in features]
    return batch

  # ---- scoring

  def predict_outputs(self, outputs: dict, batch: dict) -> dict:
    del batch
    return {"u": outputs["u"], "v": outputs["v"]}

  def _scores(self, split, outputs: list) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, labels or gold scores) of every pair of `split`, threshold pairs included."""
    u = np.stack([o["u"] for o in outputs])
    v = np.stack([o["v"] for o in outputs])
    key = "pair_scores" if self.glue.is_regression else "classifier_labels"
    return (sentence_eval.cosine_scores(u, v),
            np.array([f[key] for f in split.features]))

  def score(self, split, outputs: list) -> dict:
    """Cosine-threshold accuracy / F1 (thresholds from finetune.threshold_split), or Spearman."""
    scores, labels = self._scores(split, outputs)
    own = split.extra
    if self.glue.is_regression:
      return {"spearman": sentence_eval.spearman(scores[:own], labels[:own]),
              "pearson": float(np.corrcoef(scores[:own], labels[:own])[0, 1])}
    train = (scores[own:], labels[own:]) if len(scores) > own else None
    return sentence_eval.pair_classification(train, (scores[:own], labels[:own]))

  def write(self, split, outputs: list, folder: str) -> str:
    """One line per pair: its cosine (a .tsv with index and score)."""
    scores, _ = self._scores(split, outputs)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{self.glue.name}-{split.name}-cosine.tsv")
    with open(path, "w", encoding="utf-8") as f:
      f.write("index\tcosine\n")
      for e, s in zip(split.examples, scores[:split.extra]):
        f.write(f"{e.index}\t{s:.6f}\n")
    return path


# ------------------------------------------------------------ embed's side


def is_trained_workdir(path: str) -> bool:
  """Whether `path` is a `bert-jax finetune` workdir of this task (best/ with its config)."""
  return saved_config(path, must=False) is not None


def saved_config(workdir: str, must: bool = True) -> ml_collections.ConfigDict | None:
  """The config saved with the best/ checkpoint of a sentence-embedding workdir."""
  folder = os.path.join(workdir, "best")
  steps_done = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(
      folder) else []
  for step in reversed(steps_done):
    path = os.path.join(folder, str(step), "config", "metadata")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        fields = json.load(f)["value"]
      if fields.get("task") == "sbert":
        return ml_collections.ConfigDict(fields)
      break
  if must:
    raise FileNotFoundError(f"--init_from={workdir}: no best/ checkpoint of a sentence-embedding "
                            "(task 'sbert') fine-tuning run")
  return None


def restore_encoder(workdir: str, dtype: Any, mesh, rules) -> tuple[Any, dict, Any, Any, int]:
  """(bare encoder, its params on mesh, tokenizer, pooling, max_length) of a trained workdir.

  The run's saved config rebuilds the model (its init_from or `model` fields
  give the architecture) and its tokenizer; best/ gives the weights.
  """
  import optax  # pylint: disable=import-outside-toplevel
  from bert_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from bert_jax import finetune_init  # pylint: disable=import-outside-toplevel
  from bert_jax import init_from as init_from_lib  # pylint: disable=import-outside-toplevel
  from bert_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  config = saved_config(workdir)
  if config.finetune.method != "full":
    raise ValueError(f"--init_from={workdir}: a {config.finetune.method!r} run saves a delta; "
                     "embed reads full (finetune.method='full') runs")
  config.dtype = jnp.dtype(dtype).name
  family = models.get(config.family)
  model_cfg, _ = finetune_init.model_config(config, mesh, rules)
  tower = family.build(model_cfg, "encoder")
  ft = config.finetune
  model = TwoTowerModel(tower, pooling_config(config),
                        glue.get_task(config.glue_task).num_labels if ft.loss == "softmax" else 0)
  abstract, _ = steps.abstract_sharded_state(model, optax.identity(),
                                             steps.init_shapes(family.init_features), mesh, rules)
  best = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), every_steps=1, keep=1,
                                     async_save=False)
  restored = best.restore({"params": abstract.params})
  best.close()
  params = {"encoder": restored.state["params"]["encoder"]}
  tokenizer_path, lower_case = config.data.tokenizer, config.data.lower_case
  if not tokenizer_path and init_from_lib.is_pretraining_workdir(config.init_from):
    tokenizer_path, lower_case = init_from_lib.pretraining_tokenizer(config.init_from)
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path or config.init_from,
                                           lower_case=lower_case)
  return tower, params, tokenizer, model.pooling, int(config.data.max_length)
