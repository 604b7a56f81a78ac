"""Where a fine-tuning run's weights come from (init_from.py reads them), and which train.

bert_jax/finetune.py starts the task model from one of:
  * a Hugging Face folder (`config.init_from` with a config.json), through
    `from_pretrained`: a BERT-family encoder (bert, roberta) or a T5
    encoder-decoder, picked by the folder's model_type;
  * a `bert-jax train` workdir (`config.init_from` with checkpoints/): its
    latest finished step, the model rebuilt from the config saved with it
    (an ELECTRA-style run, objective 'electra': its discriminator, with
    DeBERTa-v3's GDES tables added up to the plain encoder's);
  * nothing (`init_from=''`): random weights of `config.model`.
For BERT only the encoder is carried over and the task head starts as BERT
initialises it; a T5 model keeps every weight (text-to-text needs no head).
This module also turns the `finetune.*` controls (frozen layers, layer-wise
LR decay, the LoRA / BitFit method of peft.py) into the optimizer's rules.
"""
from __future__ import annotations

from typing import Any

from bert_jax import init_from
from bert_jax import models
from bert_jax import optim
from bert_jax import peft
from bert_jax.defaults import ConfigError


def model_config(config, mesh, rules, *, mlm_head: bool = False,
                 task: str | None = None) -> tuple[Any, dict | None]:
  """The model's hyperparameters (the family's config) and pretrained params (None: random).

  Params hold what the family carries over: {'encoder': ...} for BERT, the
  whole model for T5. With `mlm_head` (the cloze task) the checkpoint's MLM
  head ('mlm') is carried over too, and a checkpoint without one is an error.
  `task` (the run's model task): a family that fine-tunes whole models
  (finetune_task 'seq2seq') and a run with a head of its own (BART's
  sequence_classification) load a Hugging Face folder with the head its
  `architectures` name, and carry that head over (an exported
  BartForSequenceClassification folder restarts as one; a head of another
  label count starts fresh in init_from.load_pretrained).
  """
  family = models.get(config.family)
  if config.init_from:
    load_task = family.finetune_task
    folder_head = (task is not None and family.finetune_task != "encoder"
                   and task != family.finetune_task)
    if mlm_head or folder_head or init_from.is_pretraining_workdir(config.init_from):
      load_task = None  # the head the checkpoint has (a HF *ForMaskedLM folder: its MLM head)
    pretrained = init_from.load(config.init_from, config.family, config.dtype, mesh, rules,
                                lower_case=config.data.lower_case, task=load_task,
                                finetuning=True)
    params = pretrained.params
    if mlm_head and "mlm" not in params:
      raise ConfigError("init_from", f"{config.init_from} has no MLM head, which the cloze "
                        "task reads (give a *ForMaskedLM or *ForPreTraining folder, or a "
                        "bert-jax train workdir)")
    if family.carried_over is not None:
      keep = family.carried_over + (("mlm",) if mlm_head else ())
      if folder_head and not init_from.is_pretraining_workdir(config.init_from):
        keep += tuple(k for k in params if k not in keep)  # the folder's head
      params = {k: params[k] for k in keep if k in params}
    return pretrained.config, params
  try:
    return family.config_from_dict(dict(config.model.to_dict(), dtype=config.dtype)), None
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def optimizer_rules(config, family: models.Family, model_config) -> dict:
  """optim overrides for freezing and layer-wise LR decay (added to the config's own).

  The per-layer controls need a parameter tree per layer: the family's
  `layer_prefix`, and no cross-layer sharing (ALBERT stores one layer for
  all); otherwise only `freeze_encoder` applies.
  """
  ft = config.finetune
  layers = family.num_layers(model_config)
  if family.layer_prefix is None:
    lacking = f"per-layer names, which the {family.name!r} family lacks"
  elif getattr(model_config, "share_layers", "none") != "none":
    lacking = f"a parameter tree per layer; share_layers={model_config.share_layers!r}"
  else:
    lacking = None
  if lacking:
    for key in ("freeze_layers", "reinit_layers"):
      if ft[key]:
        raise ConfigError(f"finetune.{key}", f"needs {lacking}; use finetune.freeze_encoder")
    if ft.layerwise_lr_decay < 1.0:
      raise ConfigError("finetune.layerwise_lr_decay", f"needs {lacking} (1.0 = off)")
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
  freeze += peft.freeze_rules(config, family)
  multipliers = [tuple(r) for r in config.optim.lr_multipliers]
  if ft.layerwise_lr_decay < 1.0:
    multipliers += optim.layerwise_lr_multipliers(layers, ft.layerwise_lr_decay)
  return {"freeze": tuple(freeze), "lr_multipliers": tuple(multipliers)}


