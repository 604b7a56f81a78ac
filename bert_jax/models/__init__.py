"""The model-family registry: what the trainers need to know about each family.

A family (BERT-style encoders, T5 encoder-decoders, ...) is one `Family`
record: its config dataclass and presets (models/configs.py), the module whose
`build(config, task, **head_kwargs)` makes a flax model for a task, the
features its parameters are traced with, its FLOPs formula, its Hugging Face
converter, and the few facts fine-tuning needs (which parameters carry over
from pretraining, how its layers are named for per-layer controls). train.py,
finetune.py and finetune_init.py ask the record; none of them branches on a
family's name, so a new family is one `register(Family(...))` plus its
modules.

This module imports no JAX: config files read `model_config` through
`bert_jax.defaults`, and the flax modules load on first `build`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from bert_jax.models import configs
from bert_jax.models import deberta_config
from bert_jax.models import flops


def _bert_flops(config, shapes: Mapping[str, tuple[int, ...]], task: str) -> float:
  predictions = shapes["mlm_positions"][1] if "mlm_positions" in shapes else None
  if task == "electra":
    return flops.electra_train_flops(config, shapes["encoder_input_tokens"][1], predictions)
  return flops.bert_train_flops(config, shapes["encoder_input_tokens"][1], predictions,
                                nsp="nsp_labels" in shapes, sbo="sbo_left_positions" in shapes)


def _t5_flops(config, shapes: Mapping[str, tuple[int, ...]], task: str) -> float:
  del task  # the seq2seq step is the only one
  return flops.t5_train_flops(config, shapes["encoder_input_tokens"][1],
                              shapes["decoder_target_tokens"][1])


def _modernbert_flops(config, shapes: Mapping[str, tuple[int, ...]], task: str) -> float:
  del task  # the masked LM is the one pretraining model
  predictions = shapes["mlm_positions"][1] if "mlm_positions" in shapes else None
  return flops.modernbert_train_flops(config, shapes["encoder_input_tokens"][1], predictions)


def _deberta_flops(config, shapes: Mapping[str, tuple[int, ...]], task: str) -> float:
  predictions = shapes["mlm_positions"][1] if "mlm_positions" in shapes else None
  if task == "electra":  # DeBERTa-v3's RTD: generator + discriminator
    return flops.deberta_electra_train_flops(config, shapes["encoder_input_tokens"][1],
                                             predictions)
  return flops.deberta_train_flops(config, shapes["encoder_input_tokens"][1], predictions)


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family, as the trainers see it.

  Attributes:
    name: the `config.family` value.
    config_class: its frozen hyperparameter dataclass (with `preset` and
      `from_dict`), importable without JAX.
    module: the flax module; `module.build(config, task, **kwargs)` makes the
      model of a task and `module.TASK_NAMES` (or TASKS) names the tasks.
    convert_module: its Hugging Face converter (`bert_jax.convert.*`).
    init_features: the features the model's parameters are traced with
      (int32 [1, 1] each; no parameter shape depends on lengths).
    train_flops: (config, {feature: shape}, model task) -> training FLOPs of
      one example.
    finetune_task: the task `from_pretrained` loads for fine-tuning ('encoder':
      a head is added; 'seq2seq': the whole encoder-decoder, to which a task
      may still add a head, as BART's classification head).
    encoder_decoder: an encoder-decoder family. Its tasks may run text-to-text
      (tasks/adapters.Text2TextTask); `finetune.head` picks: 'auto' (BART
      runs GLUE through BartForSequenceClassification's head, T5 and other
      tasks text-to-text), 'classification' or 'text2text'.
    carried_over: top-level parameter subtrees a fine-tuning model takes from
      a pretraining run (None: all of them).
    depth_field: the config field counting the (encoder) layers.
    layer_prefix: parameter path of layer i ('{i}' filled in) for per-layer
      controls (freezing, re-init, layer-wise LR decay); None: unsupported.
    embeddings_prefix, pooler_prefix: frozen with the lower layers / re-initialised
      with the top ones.
    checks_pad_id: the tokenizer's pad id must equal the model's pad_token_id.
    positions: config -> how many positions an input may have (None: unbounded).
  """
  name: str
  config_class: type
  module: str
  convert_module: str
  init_features: tuple[str, ...]
  train_flops: Callable[[Any, Mapping[str, tuple[int, ...]], str], float]
  finetune_task: str
  encoder_decoder: bool = False
  carried_over: tuple[str, ...] | None = None
  depth_field: str = "num_layers"
  layer_prefix: str | None = None
  embeddings_prefix: str | None = None
  pooler_prefix: str | None = None
  checks_pad_id: bool = True
  positions: Callable[[Any], int | None] = lambda config: None

  # ------------------------------------------------------------- configs

  def preset(self, name: str, **overrides):
    """The config dataclass of preset `name` with fields overridden."""
    return self.config_class.preset(name, **overrides)

  def config_from_dict(self, fields: Mapping[str, Any]):
    """The config dataclass from `config.model`'s fields; a bad field is an error naming it."""
    return self.config_class.from_dict(dict(fields))

  def num_layers(self, config) -> int:
    return getattr(config, self.depth_field)

  # -------------------------------------------------------------- models

  @property
  def tasks(self) -> tuple[str, ...]:
    module = importlib.import_module(self.module)
    return tuple(getattr(module, "TASK_NAMES", module.TASKS))

  def build(self, config, task: str, **kwargs):
    """The flax model of `task` (e.g. 'mlm', 'pretraining', 'seq2seq', 'token_classification')."""
    return importlib.import_module(self.module).build(config, task, **kwargs)

  def converter(self):
    """The family's `bert_jax.convert` module (load_hf, export_hf, MODEL_TYPES, handles)."""
    return importlib.import_module(self.convert_module)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds `family` to the registry (a name may be registered once)."""
  if family.name in FAMILIES:
    raise ValueError(f"model family {family.name!r} is already registered")
  FAMILIES[family.name] = family
  return family


def get(name: str) -> Family:
  """The family called `name`; an unknown name is an error listing the known ones."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[name]


def family_of(model) -> Family:
  """The family of a built flax model (by its config dataclass)."""
  for family in FAMILIES.values():
    if type(getattr(model, "config", None)) is family.config_class:
      return family
  raise ValueError(f"{type(model).__name__} is not a model of a registered family "
                   f"({sorted(FAMILIES)})")


def model_config(family: str, preset: str, **overrides) -> dict[str, Any]:
  """Every field of `family`'s `preset`, overridden, as plain values (dtype by name).

  `config.model` of the config files; `vocab_size=0` there means "the
  tokenizer's size, rounded up" (filled in at start-up).
  """
  fields = dataclasses.asdict(get(family).preset(preset))
  fields["dtype"] = fields["dtype"].name
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"{family} model: unknown field(s) {unknown}; valid fields: "
                     f"{sorted(fields)}")
  fields.update(overrides)
  return fields


register(Family(
    name="bert", config_class=configs.BertConfig, module="bert_jax.models.bert",
    convert_module="bert_jax.convert.bert", init_features=("encoder_input_tokens",),
    train_flops=_bert_flops, finetune_task="encoder", carried_over=("encoder",),
    layer_prefix="encoder/layer_{i}/", embeddings_prefix="encoder/embeddings/",
    pooler_prefix="encoder/pooler/",
    positions=lambda c: c.max_position_embeddings - c.position_offset))
register(Family(
    name="t5", config_class=configs.T5Config, module="bert_jax.models.t5",
    convert_module="bert_jax.convert.t5",
    init_features=("encoder_input_tokens", "decoder_input_tokens"),
    train_flops=_t5_flops, finetune_task="seq2seq", encoder_decoder=True,
    depth_field="num_encoder_layers", checks_pad_id=False))
register(Family(
    name="modernbert", config_class=configs.ModernBertConfig,
    module="bert_jax.models.modernbert", convert_module="bert_jax.convert.modernbert",
    init_features=("encoder_input_tokens",), train_flops=_modernbert_flops,
    finetune_task="encoder", carried_over=("encoder",), layer_prefix="encoder/layer_{i}/",
    embeddings_prefix="encoder/embeddings",  # and embeddings_norm
    positions=lambda c: c.max_position_embeddings))
register(Family(
    name="deberta", config_class=deberta_config.DebertaConfig,
    module="bert_jax.models.deberta", convert_module="bert_jax.convert.deberta",
    init_features=("encoder_input_tokens",), train_flops=_deberta_flops,
    finetune_task="encoder", carried_over=("encoder",), layer_prefix="encoder/layer_{i}/",
    # A regex (freezing): the input tables, their norm, and the relative table and its norm.
    embeddings_prefix="encoder/(word_embeddings|position_embeddings|token_type_embeddings"
                      "|embeddings_norm|rel_embeddings|rel_norm)/",
    positions=lambda c: c.max_position_embeddings))

# BART (bert_jax/models/bart.py): an encoder-decoder; GLUE through its classification head,
# other tasks text-to-text (finetune.head).
from bert_jax.models.bart_config import BartConfig  # noqa: E402  (kept with its block)


def _bart_flops(config, shapes: Mapping[str, tuple[int, ...]], task: str) -> float:
  inputs = shapes["encoder_input_tokens"][1]
  # sequence_classification feeds the encoder input to the decoder too.
  targets = inputs if task == "sequence_classification" else shapes["decoder_target_tokens"][1]
  return flops.bart_train_flops(config, inputs, targets)


register(Family(
    name="bart", config_class=BartConfig, module="bert_jax.models.bart",
    convert_module="bert_jax.convert.bart",
    init_features=("encoder_input_tokens", "decoder_input_tokens"),
    train_flops=_bart_flops, finetune_task="seq2seq", encoder_decoder=True,
    # Named (not None) so a GLUE head (classification_head) is not taken for pretrained.
    carried_over=("shared", "encoder", "decoder", "final_logits_bias"),
    depth_field="num_encoder_layers", positions=lambda c: c.max_position_embeddings))
