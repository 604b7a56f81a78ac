"""Where a run's starting weights come from: a Hugging Face folder or a pretraining workdir.

`config.init_from` of both jobs names one:
  * a Hugging Face folder (config.json + weights), read by `from_pretrained`;
  * a `bert-jax train` workdir (checkpoints/): its latest finished step, the
    model rebuilt from the config saved with it.
Fine-tuning (finetune_init.py) takes what the family carries over (a BERT
encoder, a whole T5); continued pretraining (train.py, Gururangan et al.
2020's DAPT/TAPT) takes every tensor the pretraining model has a place for:
the encoder and, when the checkpoint has one, the MLM head. `load_pretrained`
puts them into a freshly initialised state; the rest keeps its fresh init.
Fine-tuning from an ELECTRA-style workdir (objective 'electra') starts from
its discriminator as a plain encoder (`discriminator_weights`): DeBERTa-v3's
GDES tables, stored as deltas over the generator's, are added up first.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import defaults
from bert_jax import models
from bert_jax import recipe
from bert_jax import steps
from bert_jax.convert import distilbert, from_pretrained
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError
from bert_jax.models import electra

# Model fields a run may set differently from its init_from checkpoint: how it
# computes, not what the weights are.
RUN_FIELDS = ("dropout_rate", "attention_dropout_rate", "dtype", "remat")


@dataclasses.dataclass
class Pretrained:
  """A checkpoint to start from.

  Attributes:
    config: its model hyperparameters (the family's config dataclass).
    params: its parameters, as the checkpoint's model names them.
    tokenizer: the tokenizer it was trained with (a path).
    lower_case: whether that tokenizer lower-cases.
  """
  config: Any
  params: dict
  tokenizer: str
  lower_case: bool


def is_pretraining_workdir(path: str) -> bool:
  """Whether `path` is a `bert-jax train` workdir (checkpoints/, no config.json)."""
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and not os.path.isfile(os.path.join(path, "config.json")))


def pretraining_config(workdir: str) -> tuple[str, int, ml_collections.ConfigDict]:
  """(checkpoints folder, finished steps, the run's config) of a `bert-jax train` workdir."""
  folder = os.path.join(workdir, "checkpoints")
  finished = sorted(int(n) for n in os.listdir(folder) if n.isdigit() and os.path.isfile(
      os.path.join(folder, n, checkpoint_lib.COMMIT_MARKER)))
  if not finished:
    raise FileNotFoundError(f"config.init_from: no finished checkpoint in {folder}")
  with open(os.path.join(folder, str(finished[-1]), "config", "metadata"), encoding="utf-8") as f:
    fields = json.load(f)["value"]
  if "task" in fields:
    raise ConfigError("init_from", f"{workdir} is a fine-tuning workdir; give a pretraining one "
                      "(bert-jax train) or a Hugging Face folder")
  saved = defaults.train_config()
  model = fields.pop("model", None)
  saved.update(fields)
  if model is not None:  # the run's own fields only, not merged into the default BERT's
    saved.model = ml_collections.ConfigDict(model)
  return folder, len(finished), saved


def pretraining_tokenizer(workdir: str) -> tuple[str, bool]:
  """(tokenizer path, lower_case) a pretraining workdir's run used.

  A run with an empty `data.tokenizer` trained its SentencePiece model into
  the workdir; its path follows from the saved data config.
  """
  saved = pretraining_config(workdir)[2]
  if saved.data.tokenizer:
    return saved.data.tokenizer, saved.data.lower_case
  # train_for_source only returns the path of a model that exists already.
  return tokenizer_lib.train_for_source(saved.data, workdir), saved.data.lower_case


def discriminator_weights(model: Any, pretrained: Pretrained) -> Pretrained:
  """An 'electra' run's discriminator as the family's plain encoder (other runs as they are).

  A family whose replaced-token-detection model does not store the
  discriminator's tables whole gives `discriminator(model, params)` in its
  module (DeBERTa-v3's GDES: generator table + the discriminator's delta,
  and no EMD position table); the result is {'encoder': ...} with the plain
  encoder's names and its config. BERT's ELECTRA discriminator owns its
  tables, so its params['encoder'] is already a plain encoder.
  """
  if not isinstance(model, electra.ReplacedTokenDetection):
    return pretrained
  fold = getattr(importlib.import_module(models.family_of(model).module), "discriminator", None)
  if fold is None:
    return pretrained
  plain, params = fold(model, pretrained.params)
  # The fold keeps the saved run's dtype; the caller's is pretrained.config's.
  config = dataclasses.replace(plain.config, dtype=pretrained.config.dtype)
  return dataclasses.replace(pretrained, config=config, params=params)


def restore_workdir(workdir: str, family: str, dtype: Any, mesh, rules, *,
                    finetuning: bool = False) -> Pretrained:
  """The latest finished step of a `bert-jax train` workdir, onto `mesh`.

  The run's own config (stored with every checkpoint) rebuilds its model and
  optimizer, so the state restores exactly. With `finetuning`, an 'electra'
  run gives its discriminator as a plain encoder (`discriminator_weights`);
  without, every tensor as the run stored it (continued pretraining).
  """
  folder, num_finished, saved = pretraining_config(workdir)
  if saved.family != family:
    raise ConfigError("init_from", f"{folder} holds a {saved.family!r} run; config.family is "
                      f"{family!r}")
  spec = models.get(saved.family)
  model = recipe.build_model(saved)
  shapes = steps.init_shapes(spec.init_features)
  tx, _ = recipe.make_optimizer(saved, model, shapes)
  abstract, _ = steps.abstract_sharded_state(model, tx, shapes, mesh, rules)
  restored = checkpoint_lib.Checkpointer(folder, every_steps=1, keep=num_finished,
                                         async_save=False).restore(abstract)
  logging.info("init_from: step %d of %s", restored.step, folder)
  tokenizer, lower_case = pretraining_tokenizer(workdir)
  pretrained = Pretrained(spec.config_from_dict(dict(saved.model.to_dict(), dtype=dtype)),
                          restored.state.params, tokenizer, lower_case)
  return discriminator_weights(model, pretrained) if finetuning else pretrained


def load(init_from: str, family: str, dtype: Any, mesh, rules, *, lower_case: bool,
         task: str | None = None, finetuning: bool = False) -> Pretrained:
  """The checkpoint `init_from` (a HF folder or a pretraining workdir) of `family`.

  Args:
    init_from: the folder.
    family: the run's `config.family`; the checkpoint must be of it.
    dtype: the run's computation dtype.
    mesh, rules: where a workdir's state is restored.
    lower_case: a HF folder's tokenizer casing (the run's `data.lower_case`).
    task: the head `from_pretrained` builds (None: the one the folder names).
    finetuning: a workdir's 'electra' run gives its plain discriminator
      (restore_workdir).
  """
  if is_pretraining_workdir(init_from):
    return restore_workdir(init_from, family, dtype, mesh, rules, finetuning=finetuning)
  model, params = from_pretrained(init_from, task=task, dtype=dtype)
  if models.family_of(model) is not models.get(family):
    raise ConfigError("init_from", f"{init_from} holds a {type(model).__name__}; config.family "
                      f"is {family!r}")
  return Pretrained(model.config, params, init_from, lower_case)


def merged_model_fields(fields: dict, pretrained: Pretrained, init_from: str) -> dict:
  """`config.model` for a run from `pretrained`: the checkpoint's architecture.

  The config may differ from the checkpoint only in RUN_FIELDS (and
  `vocab_size` 0, meaning the checkpoint's); any other difference is an
  error naming every such field, so the config file stays a true record.
  """
  def plain(value):  # tuples and lists compare alike (a config holds lists)
    return list(value) if isinstance(value, (tuple, list)) else value
  out, wrong = dict(fields), []
  for key, value in dataclasses.asdict(pretrained.config).items():
    if key in RUN_FIELDS:
      continue
    if key == "vocab_size" and fields.get(key) == 0:
      out[key] = value
    elif plain(fields.get(key)) != plain(value):
      wrong.append((key, fields.get(key), plain(value)))
  if wrong:
    diffs = "; ".join(f"{k}={g!r} here, {w!r} there" for k, g, w in wrong)
    fixes = " ".join(f"--config.model.{k}={w}" for k, _, w in wrong)
    raise ConfigError(f"model.{wrong[0][0]}", f"differs from init_from {init_from}: {diffs} "
                      f"(set {fixes})")
  return out


def load_pretrained(params: Any, pretrained: dict, shardings: Any, family: models.Family,
                    layers: int, reinit_layers: int = 0) -> Any:
  """params with the pretrained weights put in, each onto its sharding.

  Heads and, with reinit_layers=K, the top K encoder layers and the pooler
  keep their fresh init (a pretrained head of another shape, e.g. another
  label count, too) (Zhang et al. 2021, "Revisiting few-sample BERT
  fine-tuning").
  """
  fresh_prefixes = tuple(family.layer_prefix.format(i=i)
                         for i in range(layers - reinit_layers, layers)) if reinit_layers else ()
  if reinit_layers and family.pooler_prefix:
    fresh_prefixes += (family.pooler_prefix,)
  source = {"/".join(k): v for k, v in traverse_util.flatten_dict(pretrained).items()}
  flat = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  fresh = []
  for key in flat:
    name = "/".join(key)
    value = source.get(name)
    if value is None or name.startswith(fresh_prefixes):
      fresh.append(name)
      continue
    if tuple(value.shape) != tuple(flat[key].shape):
      if family.carried_over is not None and key[0] not in family.carried_over:
        fresh.append(name)  # a head of another size (label count): the run's own
        continue
      raise ValueError(f"init_from: parameter {name} has shape {tuple(value.shape)}, the "
                       f"model expects {tuple(flat[key].shape)}")
    flat[key] = jax.device_put(np.asarray(value, np.float32), flat_shardings[key])
  logging.info("init_from: %d pretrained tensors; fresh init for %d: %s", len(flat) - len(fresh),
               len(fresh), sorted({n.rsplit("/", 1)[0] for n in fresh}))
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------- distillation

# Student fields that may differ from the teacher's: its depth, its Hugging
# Face naming (DistilBERT) and its token types (DistilBERT has none).
STUDENT_FIELDS = ("num_layers", "model_type", "type_vocab_size") + RUN_FIELDS


def load_teacher(path: str, family: str, dtype: Any, mesh, rules, *, lower_case: bool
                 ) -> Pretrained:
  """The frozen teacher of a distillation run (`config.train.teacher`): it needs an MLM head."""
  teacher = load(path, family, dtype, mesh, rules, lower_case=lower_case)
  if "mlm" not in teacher.params:
    raise ConfigError("train.teacher", f"{path} has no MLM head (give a *ForMaskedLM or "
                      f"*ForPreTraining folder, or a bert-jax train workdir)")
  return teacher


def student_model_fields(fields: dict, teacher: Pretrained, path: str) -> dict:
  """`config.model` of a student: the teacher's architecture but for STUDENT_FIELDS.

  The student starts from every other teacher layer (DistilBERT), so every
  other field must be the teacher's; `vocab_size` 0 means the teacher's.
  """
  out, wrong = dict(fields), []
  for key, value in dataclasses.asdict(teacher.config).items():
    if key in STUDENT_FIELDS:
      continue
    if key == "vocab_size" and fields.get(key) == 0:
      out[key] = value
    elif key != "dtype" and fields.get(key) != value:
      wrong.append(f"{key}={fields.get(key)!r} here, {value!r} in the teacher")
  if wrong:
    raise ConfigError(f"model.{wrong[0].split('=')[0]}", f"the student starts from the teacher's "
                      f"layers ({path}), so it must have its shape: {'; '.join(wrong)}")
  return out


def distillation_params(params: Any, teacher: Pretrained, shardings: Any,
                        family: models.Family, student_layers: int) -> Any:
  """A fresh distillation state's params: the teacher, and the student made from it.

  params['teacher'] takes the teacher's encoder and MLM head; the student
  ('encoder', 'mlm') starts as DistilBERT did (convert.distilbert.
  student_from_teacher: the teacher's embeddings, its MLM head and every
  other layer). A student without token types (type_vocab_size 0) leaves the
  teacher's table out.
  """
  masked_lm = {"encoder": teacher.params["encoder"], "mlm": teacher.params["mlm"]}
  _, student = distilbert.student_from_teacher(family.build(teacher.config, "mlm"), masked_lm,
                                               student_layers)
  return load_pretrained(params, {"teacher": masked_lm, **student}, shardings, family,
                         student_layers)
