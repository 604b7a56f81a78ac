"""Where a fine-tuning run's weights come from, and which of them train.

bert_jax/finetune.py starts the task model from one of:
  * a Hugging Face folder (`config.init_from` with a config.json), through
    `from_pretrained`: a BERT-family encoder (bert, roberta) or a T5
    encoder-decoder, picked by the folder's model_type;
  * a `bert-jax train` workdir (`config.init_from` with checkpoints/): its
    latest finished step, the model rebuilt from the config saved with it;
  * nothing (`init_from=''`): random weights of `config.model`.
For BERT only the encoder is carried over and the task head starts as BERT
initialises it; a T5 model keeps every weight (text-to-text needs no head).
This module also turns the `finetune.*` controls (frozen layers, layer-wise
LR decay) into the optimizer's rules.
"""
from __future__ import annotations

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
from bert_jax import optim
from bert_jax import steps
from bert_jax import train
from bert_jax.convert import from_pretrained
from bert_jax.defaults import ConfigError


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
  path = train.tokenizer_path(saved, workdir)
  return path, saved.data.lower_case


def _from_pretraining_workdir(config, mesh, rules) -> tuple[Any, dict]:
  """Model config and params of a `bert-jax train` workdir's latest step.

  The run's own config (stored with every checkpoint) rebuilds its model and
  optimizer, so the state restores exactly; the family's `carried_over`
  subtrees are kept (a BERT run's encoder, all of a T5 run).
  """
  folder, num_finished, saved = pretraining_config(config.init_from)
  if saved.family != config.family:
    raise ConfigError("init_from", f"{folder} holds a {saved.family!r} run; config.family is "
                      f"{config.family!r}")
  family = models.get(saved.family)
  model = train.build_model(saved)
  shapes = steps.init_shapes(family.init_features)
  tx, _ = optim.make_optimizer(saved.optim, steps.param_shapes(model, shapes),
                               num_steps=saved.train.num_steps)
  abstract, _ = steps.abstract_sharded_state(model, tx, shapes, mesh, rules)
  restored = checkpoint_lib.Checkpointer(folder, every_steps=1, keep=num_finished,
                                         async_save=False).restore(abstract)
  logging.info("init_from: step %d of %s", restored.step, folder)
  params = restored.state.params
  if family.carried_over is not None:
    params = {k: params[k] for k in family.carried_over}
  return family.config_from_dict(dict(saved.model.to_dict(), dtype=config.dtype)), params


def model_config(config, mesh, rules) -> tuple[Any, dict | None]:
  """The model's hyperparameters (the family's config) and pretrained params (None: random).

  Params hold what the family carries over: {'encoder': ...} for BERT, the
  whole model for T5.
  """
  family = models.get(config.family)
  if config.init_from and is_pretraining_workdir(config.init_from):
    return _from_pretraining_workdir(config, mesh, rules)
  if config.init_from:
    model, params = from_pretrained(config.init_from, task=family.finetune_task,
                                    dtype=config.dtype)
    if models.family_of(model) is not family:
      raise ConfigError("init_from", f"{config.init_from} holds a {type(model).__name__}; "
                        f"config.family is {config.family!r}")
    return model.config, params
  try:
    return family.config_from_dict(dict(config.model.to_dict(), dtype=config.dtype)), None
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def optimizer_rules(config, family: models.Family, layers: int) -> dict:
  """optim overrides for freezing and layer-wise LR decay (added to the config's own).

  The per-layer controls need the family's `layer_prefix`; without one (T5)
  only `freeze_encoder` applies.
  """
  ft = config.finetune
  if family.layer_prefix is None:
    for key in ("freeze_layers", "reinit_layers"):
      if ft[key]:
        raise ConfigError(f"finetune.{key}", f"needs per-layer names, which the "
                          f"{family.name!r} family lacks; use finetune.freeze_encoder")
    if ft.layerwise_lr_decay < 1.0:
      raise ConfigError("finetune.layerwise_lr_decay", f"needs per-layer names, which the "
                        f"{family.name!r} family lacks (1.0 = off)")
  if ft.freeze_layers > layers:
    raise ConfigError("finetune.freeze_layers", f"{ft.freeze_layers} > the encoder's {layers} "
                      "layers")
  if not 0 <= ft.reinit_layers <= layers:
    raise ConfigError("finetune.reinit_layers", f"{ft.reinit_layers} not in [0, {layers}]")
  freeze = list(optim.patterns(config.optim.freeze))
  if ft.freeze_encoder:
    freeze.append(r"^encoder/")
  elif ft.freeze_layers:
    freeze += [f"^{family.embeddings_prefix}"] + [
        "^" + family.layer_prefix.format(i=i) for i in range(ft.freeze_layers)]
  multipliers = [tuple(r) for r in config.optim.lr_multipliers]
  if ft.layerwise_lr_decay < 1.0:
    multipliers += optim.layerwise_lr_multipliers(layers, ft.layerwise_lr_decay)
  return {"freeze": tuple(freeze), "lr_multipliers": tuple(multipliers)}


def load_pretrained(params: Any, pretrained: dict, shardings: Any, family: models.Family,
                    layers: int, reinit_layers: int) -> Any:
  """params with the pretrained weights put in, each onto its sharding.

  Heads and, with reinit_layers=K, the top K encoder layers and the pooler
  keep their fresh init (Zhang et al. 2021, "Revisiting few-sample BERT
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
      raise ValueError(f"init_from: parameter {name} has shape {tuple(value.shape)}, the "
                       f"model expects {tuple(flat[key].shape)}")
    flat[key] = jax.device_put(np.asarray(value, np.float32), flat_shardings[key])
  logging.info("init_from: %d pretrained tensors; fresh init for %d: %s", len(flat) - len(fresh),
               len(fresh), sorted({n.rsplit("/", 1)[0] for n in fresh}))
  return traverse_util.unflatten_dict(flat)
