"""DistilBERT's Hugging Face naming, and DistilBERT's student initialisation from a teacher.

DistilBERT (Sanh et al. 2019) is a BertConfig with model_type='distilbert'
and type_vocab_size=0 (no token-type table); convert/bert.py reads and writes
its task models through the same table-driven import and export as BERT and
asks this module only for what is named differently: the encoder's and the
heads' tensor names and config.json, whose fields DistilBERT names its own
way (dim, n_layers, ...; `_CONFIG_NAMES`).

Hugging Face DistilBERT                    bert_jax
  DistilBertModel                            task 'encoder' (no pooler)
  DistilBertForMaskedLM                      task 'mlm'
  DistilBertForSequenceClassification        task 'sequence_classification'
    (pre_classifier + ReLU + classifier)       (classifier_dense + ReLU + classifier)
  DistilBertForTokenClassification           task 'token_classification'
  DistilBertForQuestionAnswering             task 'question_answering'

Fixed by Hugging Face, hence required of an export: every LayerNorm's eps is
1e-12 (hard-coded, not in config.json), no token types, learned positions
(sinusoidal_pos_embds=True is refused on import). The classifier and QA
dropouts (seq_classif_dropout, qa_dropout) run at our dropout_rate: an
export writes them equal to it, an import that differs is logged.

`student_from_teacher` is DistilBERT's initialisation: a half-depth student
taking every other layer of a BERT-family teacher (see `student_from_teacher`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import flax
import flax.linen as nn

from bert_jax.convert.hf import CheckpointError
from bert_jax.models import bert
from bert_jax.models import distillation

# Hugging Face architecture -> (model_type, task); merged into convert/bert.py's table.
ARCHITECTURES = {
    "DistilBertModel": ("distilbert", "encoder"),
    "DistilBertForMaskedLM": ("distilbert", "mlm"),
    "DistilBertForSequenceClassification": ("distilbert", "sequence_classification"),
    "DistilBertForTokenClassification": ("distilbert", "token_classification"),
    "DistilBertForQuestionAnswering": ("distilbert", "question_answering"),
}
TASKS = tuple(task for _, task in ARCHITECTURES.values())
# DistilBERT's config.json field -> BERT's, which convert/bert.py reads and writes.
_CONFIG_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size", "activation": "hidden_act",
    "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
}
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings")
# Hugging Face's nn.LayerNorm(dim, eps=1e-12) everywhere in modeling_distilbert.py.
LAYER_NORM_EPS = 1e-12


# ---------------------------------------------------------------------------
# config.json, for convert/bert.py.
# ---------------------------------------------------------------------------
def as_bert_config_json(hf: dict, source: str) -> dict:
  """A DistilBERT config.json under BERT's field names, for convert/bert.py's reader."""
  if hf.get("sinusoidal_pos_embds", False):
    raise CheckpointError(f"{source}: sinusoidal_pos_embds=True is not supported (only learned "
                          f"position embeddings, sinusoidal_pos_embds=False)")
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: config.json lacks {missing[0]!r}")
  dropout = hf.get("dropout", 0.1)
  for key in ("seq_classif_dropout", "qa_dropout"):
    if hf.get(key, dropout) != dropout:
      logging.info("%s: %s=%s runs at dropout=%s (bert_jax has one dropout_rate)", source, key,
                   hf[key], dropout)
  out = {k: v for k, v in hf.items() if k not in _CONFIG_NAMES}
  out.update({bert_name: hf[k] for k, bert_name in _CONFIG_NAMES.items() if k in hf})
  out.setdefault("hidden_act", "gelu")  # DistilBertConfig's defaults
  out.setdefault("pad_token_id", 0)
  out.update(type_vocab_size=0, layer_norm_eps=LAYER_NORM_EPS)
  return out


def config_fields_from_hf(hf: dict, source: str) -> dict:
  """Nothing beyond BERT's fields: as_bert_config_json has translated them."""
  del hf, source
  return {}


def hf_config_fields(cfg: bert.BertConfig) -> dict:
  """The config.json fields of a DistilBERT export beyond BERT's own; checks it can be written."""
  cannot = "cannot export to Hugging Face distilbert"
  if cfg.type_vocab_size:
    raise CheckpointError(f"{cannot}: it has no token-type embeddings (type_vocab_size=0), the "
                          f"model has type_vocab_size={cfg.type_vocab_size}")
  if cfg.embedding_size:
    raise CheckpointError(f"{cannot}: it has no factorised embeddings (embedding_size=0), the "
                          f"model has embedding_size={cfg.embedding_size}")
  if cfg.share_layers != "none":
    raise CheckpointError(f"{cannot}: it has no shared layers (share_layers='none'), the model "
                          f"has share_layers={cfg.share_layers!r}")
  if cfg.layer_norm_eps != LAYER_NORM_EPS:
    raise CheckpointError(f"{cannot}: its LayerNorms use eps {LAYER_NORM_EPS} (hard-coded), the "
                          f"model has layer_norm_eps={cfg.layer_norm_eps}")
  return dict(sinusoidal_pos_embds=False, seq_classif_dropout=cfg.dropout_rate,
              qa_dropout=cfg.dropout_rate)


def as_hf_config_json(hf: dict) -> dict:
  """convert/bert.py's export config.json under DistilBERT's names, without BERT-only fields."""
  bert_only = ("type_vocab_size", "layer_norm_eps", "position_embedding_type")
  to_distil = {bert_name: k for k, bert_name in _CONFIG_NAMES.items()}
  return {to_distil.get(k, k): v for k, v in hf.items() if k not in bert_only}


# ---------------------------------------------------------------------------
# Tensor names, for convert/bert.py.
# ---------------------------------------------------------------------------
def encoder_entries(cfg: bert.BertConfig, n, base: str, add_pooler: bool) -> Iterator:
  """The encoder's parameters under DistilBERT's names; `n` is convert/bert.py's _HFNames.

  DistilBERT has no pooler: convert/bert.py drops it (logged) before export,
  and an import never builds one.
  """
  del add_pooler
  j = lambda *parts: ".".join(p for p in parts if p)
  enc = ("encoder",)
  emb = enc + ("embeddings",)
  for table in ("word_embeddings", "position_embeddings"):
    yield n.embed(emb + (table,), j(base, "embeddings", table))
  yield from n.norm(emb + ("layer_norm",), j(base, "embeddings", "LayerNorm"))
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), j(base, "transformer", "layer", str(i))
    for proj, lin in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
      yield from n.dense(ours + ("attention", proj), j(theirs, "attention", lin))
    yield from n.dense(ours + ("attention", "out"), j(theirs, "attention", "out_lin"), n_in=2)
    yield from n.norm(ours + ("attention_norm",), j(theirs, "sa_layer_norm"))
    yield from n.dense(ours + ("mlp", "wi"), j(theirs, "ffn", "lin1"))
    yield from n.dense(ours + ("mlp", "wo"), j(theirs, "ffn", "lin2"))
    yield from n.norm(ours + ("mlp_norm",), j(theirs, "output_layer_norm"))


def head_entries(task: str, n) -> Iterator:
  """The task head's parameters under DistilBERT's names."""
  if task not in TASKS:
    raise CheckpointError(f"Hugging Face DistilBERT has no head for task {task!r}; its heads: "
                          f"{list(TASKS)}")
  if task == "mlm":  # vocab_projector's weight is tied to the word embeddings
    yield from n.dense(("mlm", "transform"), "vocab_transform")
    yield from n.norm(("mlm", "transform_norm"), "vocab_layer_norm")
    yield n.vector(("mlm", "output_bias"), "vocab_projector.bias")
  if task == "sequence_classification":
    yield from n.dense(("classifier_dense",), "pre_classifier")
  if task in ("sequence_classification", "token_classification"):
    yield from n.dense(("classifier",), "classifier")
  if task == "question_answering":
    yield from n.dense(("qa_outputs",), "qa_outputs")


def tied(base: str) -> dict[str, str]:
  """The MLM decoder's stored copy -> the tensor it is tied to (its bias is our output_bias)."""
  return {"vocab_projector.weight": f"{base + '.' if base else ''}embeddings."
                                    f"word_embeddings.weight"}


# ---------------------------------------------------------------------------
# DistilBERT's initialisation: a student from every other teacher layer.
# ---------------------------------------------------------------------------
def student_from_teacher(teacher_model, teacher_params: dict,
                         num_layers: int | None = None) -> tuple[nn.Module, dict]:
  """A shallower student initialised from a BERT-family teacher, as DistilBERT was.

  Args:
    teacher_model: a BERT-family task model (any model_type; usually task
      'mlm' or 'encoder', the student of DistilBERT's distillation).
    teacher_params: its parameters (returned unboxed).
    num_layers: the student's depth; default half the teacher's (at least 1).

  Returns:
    `(student_model, student_params)`: the teacher's model class and config
    with `num_layers`; its embeddings and every head (the MLM head included)
    are the teacher's, and student layer j is teacher layer
    `distillation.every_other_layer(L, num_layers)[j]` (for 12 -> 6
    the reference extraction script's [0, 2, 4, 7, 9, 11]). With share_layers='all' the one
    stored layer is copied; with 'attention'/'ffn' student layer 0 is
    teacher layer 0 (always chosen), which holds the shared sub-block.
  """
  if type(teacher_model) not in bert.TASKS.values():
    raise ValueError(f"the teacher must be a BERT-family task model ({list(bert.TASKS)}), got "
                     f"{type(teacher_model).__name__}")
  cfg = teacher_model.config
  num_layers = max(1, cfg.num_layers // 2) if num_layers is None else num_layers
  chosen = distillation.every_other_layer(cfg.num_layers, num_layers)
  params = flax.linen.unbox(teacher_params)
  encoder = {k: v for k, v in params["encoder"].items() if not k.startswith("layer_")}
  stored = 1 if cfg.share_layers == "all" else num_layers
  for j in range(stored):
    encoder[f"layer_{j}"] = params["encoder"][f"layer_{chosen[j]}"]
  student = teacher_model.clone(config=dataclasses.replace(cfg, num_layers=num_layers))
  return student, {**params, "encoder": encoder}
