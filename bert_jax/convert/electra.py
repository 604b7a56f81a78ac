"""ELECTRA's Hugging Face naming, and the joint generator + discriminator split in two.

ELECTRA is a BertConfig with model_type='electra'; convert/bert.py reads and
writes its task models (encoder, rtd, mlm, the classifiers, QA) through the
same table-driven import and export as BERT and asks this module only for
what is named differently: `embeddings_project` (present when the embedding
tables are narrower than the hidden size), the heads, and config.json's
`embedding_size`. The encoder layers carry BERT's names.

Hugging Face ELECTRA                  bert_jax
  ElectraModel                          task 'encoder' (no pooler)
  ElectraForPreTraining                 task 'rtd' (the discriminator)
  ElectraForMaskedLM                    task 'mlm' (a generator)
  ElectraFor{Sequence,Token}Classification, ElectraForQuestionAnswering

config.json's embedding_size equal to hidden_size is our embedding_size=0
(no projection); an export writes the tables' width either way.

The joint pre-training model (task 'electra', models/electra.py) is two
Hugging Face models: `discriminator` and `generator` split it, `join` puts an
imported pair back together, and save_pretrained writes the pair as
PATH/discriminator and PATH/generator (JOINT_FOLDERS).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError
from bert_jax.models import bert
from bert_jax.models import electra as electra_model
from bert_jax.models.configs import BertConfig, generator_config

# Hugging Face architecture -> (model_type, task); merged into convert/bert.py's table.
ARCHITECTURES = {
    "ElectraModel": ("electra", "encoder"),
    "ElectraForPreTraining": ("electra", "rtd"),
    "ElectraForMaskedLM": ("electra", "mlm"),
    "ElectraForSequenceClassification": ("electra", "sequence_classification"),
    "ElectraForTokenClassification": ("electra", "token_classification"),
    "ElectraForQuestionAnswering": ("electra", "question_answering"),
}
TASKS = tuple(task for _, task in ARCHITECTURES.values())
# The embedding tables and their LayerNorm: the discriminator owns them, the
# generator reads them (its own `projection`, if any, is not shared).
SHARED_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings",
                     "layer_norm")
# Generator fields join() does not compare: generator_size is derived from
# the two widths; dtype and remat say how to compute, not what.
_NOT_COMPARED = ("generator_size", "dtype", "remat")


# ---------------------------------------------------------------------------
# Names and config.json fields, for convert/bert.py.
# ---------------------------------------------------------------------------
def config_fields_from_hf(hf: dict, source: str) -> dict:
  """The BertConfig fields an ELECTRA config.json sets beyond BERT's own."""
  if "embedding_size" not in hf:
    # transformers would silently take 128; a checkpoint that omits it is ambiguous.
    raise CheckpointError(f"{source}: config.json lacks 'embedding_size'")
  size = hf["embedding_size"]
  return dict(embedding_size=0 if size == hf.get("hidden_size") else size)


def hf_config_fields(cfg: BertConfig) -> dict:
  """The config.json fields of an ELECTRA export beyond BERT's own; checks it can be written."""
  if cfg.share_layers != "none":
    raise CheckpointError(f"cannot export share_layers={cfg.share_layers!r} to Hugging Face "
                          f"electra: it has no shared layers (set model_type='albert')")
  # Our classifiers drop out at dropout_rate, as transformers does when
  # classifier_dropout is None; written out so the two cannot drift apart.
  return dict(embedding_size=cfg.embed_dim, classifier_dropout=cfg.dropout_rate)


def projection_entries(cfg: BertConfig, n, base: str) -> Iterator:
  """`embeddings_project`, present when the tables are narrower (or wider) than hidden."""
  if cfg.embedding_size:
    yield from n.dense(("encoder", "embeddings", "projection"),
                       f"{base + '.' if base else ''}embeddings_project")


def head_entries(task: str, n) -> Iterator:
  """The task head's parameters under ELECTRA's names; `n` is convert/bert.py's _HFNames."""
  if task not in TASKS:
    raise CheckpointError(f"Hugging Face ELECTRA has no head for task {task!r}; its heads: "
                          f"{list(TASKS)} (task 'electra' is the pair: see convert.electra.join)")
  if task == "rtd":
    yield from n.dense(("rtd", "dense"), "discriminator_predictions.dense")
    yield from n.dense(("rtd", "prediction"), "discriminator_predictions.dense_prediction")
  if task == "mlm":
    yield from n.dense(("mlm", "transform"), "generator_predictions.dense")
    yield from n.norm(("mlm", "transform_norm"), "generator_predictions.LayerNorm")
    yield n.vector(("mlm", "output_bias"), "generator_lm_head.bias")
  if task == "sequence_classification":  # ElectraClassificationHead: dense, GELU, out_proj
    yield from n.dense(("classifier_dense",), "classifier.dense")
    yield from n.dense(("classifier",), "classifier.out_proj")
  if task == "token_classification":
    yield from n.dense(("classifier",), "classifier")
  if task == "question_answering":
    yield from n.dense(("qa_outputs",), "qa_outputs")


def tied(base: str) -> dict[str, str]:
  """The MLM decoder's stored copy -> the tensor it is tied to (its bias is our output_bias)."""
  return {"generator_lm_head.weight": f"{base + '.' if base else ''}embeddings."
                                      f"word_embeddings.weight"}


# ---------------------------------------------------------------------------
# The joint model <-> a Hugging Face discriminator + generator.
# ---------------------------------------------------------------------------
def _joint_parts(model, params) -> tuple[BertConfig, dict]:
  if not isinstance(model, electra_model.ElectraForPreTraining):
    raise CheckpointError(f"expected the joint ELECTRA model (task 'electra'), got "
                          f"{type(model).__name__}")
  params = flax.linen.unbox(params)
  missing = [k for k in ("encoder", "rtd", "generator", "generator_mlm") if k not in params]
  if missing:
    raise CheckpointError(f"joint ELECTRA params lack {missing}")
  return model.config, params


def discriminator(model, params) -> tuple[bert.BertForReplacedTokenDetection, dict]:
  """The joint model's discriminator as a task 'rtd' model (Hugging Face ElectraForPreTraining)."""
  cfg, params = _joint_parts(model, params)
  return bert.build(cfg, "rtd"), {"encoder": params["encoder"], "rtd": params["rtd"]}


def generator(model, params) -> tuple[bert.BertForMaskedLM, dict]:
  """The joint model's generator as a task 'mlm' model of `generator_config(config)`
  (Hugging Face ElectraForMaskedLM), holding the discriminator's embedding tables."""
  cfg, params = _joint_parts(model, params)
  tables = params["encoder"]["embeddings"]
  embeddings = {k: tables[k] for k in SHARED_EMBEDDINGS}
  own = dict(params["generator"])
  embeddings.update(own.pop("embeddings", {}))  # its projection, when it has one
  return (bert.build(generator_config(cfg), "mlm"),
          {"encoder": {"embeddings": embeddings, **own}, "mlm": params["generator_mlm"]})


def _check_generator(disc: BertConfig, gen: BertConfig) -> BertConfig:
  """The joint config whose generator_config is `gen`; else an error naming the field."""
  try:
    cfg = dataclasses.replace(disc, generator_size=gen.hidden_size / disc.hidden_size)
    expected = generator_config(cfg)
  except ValueError as e:  # wider than the discriminator, or heads that do not divide it
    raise CheckpointError(f"generator hidden_size={gen.hidden_size} does not fit the "
                          f"discriminator (hidden_size={disc.hidden_size}): {e}") from e
  for field in dataclasses.fields(BertConfig):
    if field.name in _NOT_COMPARED:
      continue
    got, want = getattr(gen, field.name), getattr(expected, field.name)
    if got != want:
      raise CheckpointError(
          f"generator {field.name}={got!r} does not fit the discriminator's generator_config "
          f"({field.name}={want!r} for a {gen.hidden_size}-wide generator of a "
          f"{disc.hidden_size}-wide discriminator)")
  return cfg


def join(disc_model, disc_params, gen_model, gen_params,
         temperature: float = 1.0) -> tuple[electra_model.ElectraForPreTraining, dict]:
  """The joint ELECTRA model from a discriminator (task 'rtd') and a generator (task 'mlm').

  generator_size is the ratio of the two hidden sizes; every other field of
  the generator must be what `generator_config` derives from the
  discriminator (a CheckpointError names the first that is not). The joint
  model has one set of embedding tables, the discriminator's: generator
  tables that differ are dropped with a warning.
  """
  for role, model, task in (("discriminator", disc_model, "rtd"), ("generator", gen_model, "mlm")):
    if not isinstance(model, bert.task_class(task)):
      raise CheckpointError(f"the {role} must be a task {task!r} model "
                            f"({bert.task_class(task).__name__}), got {type(model).__name__}")
    if model.config.model_type != "electra":
      raise CheckpointError(f"the {role} has model_type={model.config.model_type!r}, not "
                            f"'electra'")
  cfg = _check_generator(disc_model.config, gen_model.config)
  disc_params, gen_params = flax.linen.unbox(disc_params), flax.linen.unbox(gen_params)
  disc_tables, gen_tables = (p["encoder"]["embeddings"] for p in (disc_params, gen_params))
  shared = lambda tables: flax.traverse_util.flatten_dict({k: tables[k] for k in SHARED_EMBEDDINGS
                                                           if k in tables})
  theirs = shared(gen_tables)
  # Same shapes: _check_generator compared the vocabulary, positions, types and width.
  differ = ["/".join(path) for path, ours in shared(disc_tables).items()
            if path not in theirs or not np.array_equal(np.asarray(ours), np.asarray(theirs[path]))]
  if differ:
    logging.warning("the generator's embeddings differ from the discriminator's (%s); the joint "
                    "model shares one set and keeps the discriminator's", ", ".join(differ))
  gen_encoder = {k: v for k, v in gen_params["encoder"].items() if k != "embeddings"}
  if "projection" in gen_tables:
    gen_encoder["embeddings"] = {"projection": gen_tables["projection"]}
  model = electra_model.ElectraForPreTraining(cfg, temperature=temperature)
  params = {"encoder": disc_params["encoder"], "rtd": disc_params["rtd"],
            "generator": gen_encoder, "generator_mlm": gen_params["mlm"]}
  _check_shapes(model, params)
  return model, params


def _check_shapes(model, params: dict):
  """Every parameter of `model` is in `params` with its shape, and nothing else is."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  want = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract)["params"])
  have = flax.traverse_util.flatten_dict(params)
  for path in sorted(set(want) | set(have)):
    name = "/".join(path)
    if path not in have:
      raise CheckpointError(f"joint ELECTRA params lack {name}")
    if path not in want:
      raise CheckpointError(f"joint ELECTRA params have {name}, which the model does not use")
    if tuple(np.shape(have[path])) != tuple(want[path].shape):
      raise CheckpointError(f"joint ELECTRA parameter {name} has shape "
                            f"{tuple(np.shape(have[path]))}, expected {tuple(want[path].shape)}")


# Subfolder -> how the joint model's part is cut out, for save_pretrained.
JOINT_FOLDERS = {"discriminator": discriminator, "generator": generator}
