"""Hugging Face DeBERTa-v2/v3 checkpoints <-> bert_jax DeBERTa params.

One table says, for every Hugging Face tensor, which of our parameters it
holds (PyTorch Linear weights are [out, in], ours [in, ...out]); import and
export walk it. Task models prefix the encoder's names with 'deberta.'.

    embeddings.word_embeddings / position_embeddings / token_type_embeddings
                                          -> encoder/{word,position,token_type}_embeddings
    embeddings.LayerNorm                  -> encoder/embeddings_norm
    encoder.rel_embeddings, encoder.LayerNorm -> encoder/rel_embeddings, encoder/rel_norm
    encoder.conv.{conv,LayerNorm}         -> encoder/conv/{kernel,bias}, encoder/conv/norm
      (conv_kernel_size > 0; the Conv1d weight [out, in / groups, k] is read
      as the Linear [out, k x in / groups] of our [k, in / groups, out] kernel)
    encoder.layer.N.attention.self.{query,key,value}_proj
                                          -> encoder/layer_N/attention/{query,key,value}
    ....self.pos_{key,query}_proj (share_att_key false) -> attention/pos_{key,query}
    ....attention.output.{dense,LayerNorm} -> attention/out, attention_norm
    ....intermediate.dense, output.dense, output.LayerNorm -> mlp/wi, mlp/wo, mlp_norm
    lm_predictions.lm_head.{dense,LayerNorm,bias}   (MaskedLM, legacy=false)
      or cls.predictions.{transform.dense,transform.LayerNorm,bias} (legacy=true)
                                          -> mlm/{dense,norm,output_bias}
    pooler.dense, classifier              -> pooler, classifier (sequence classification)
    classifier / qa_outputs               -> classifier (token classification / QA)

Both MLM layouts compute the same thing (the legacy decoder is tied to the
word table); export writes the current one (legacy=false). Not supported,
each refused naming the config field: an even conv_kernel_size (it changes
the length in the reference), embedding_size != hidden_size, attention_head_size != hidden / heads,
pooler_hidden_size != hidden_size.
"""
from __future__ import annotations

from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.convert.table import (Entry, head_kwargs, label_fields, linear_entry,
                                    params_from_state, take_tied, task_from_architectures,
                                    tensors_from_params, warn_unused)
from bert_jax.models import deberta
from bert_jax.models.deberta_config import DebertaConfig

MODEL_TYPES = ("deberta-v2",)
ARCHITECTURES = {
    "DebertaV2Model": "encoder",
    "DebertaV2ForMaskedLM": "mlm",
    "DebertaV2ForSequenceClassification": "sequence_classification",
    "DebertaV2ForTokenClassification": "token_classification",
    "DebertaV2ForQuestionAnswering": "question_answering",
}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu", "linear": "linear"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "gelu_new": "gelu_new", "relu": "relu",
              "silu": "silu", "linear": "linear"}
# config.json field -> ours, copied as they are; the value is HF's default when absent.
# conv_act names Hugging Face's ACT2FN accepts for ours (tanh: its default).
_CONV_ACT_FROM_HF = {**_ACT_FROM_HF, "tanh": "tanh"}
_CONV_ACT_TO_HF = {**_ACT_TO_HF, "tanh": "tanh"}
_SAME_FIELDS = {
    "vocab_size": ("vocab_size", None), "hidden_size": ("hidden_size", None),
    "num_hidden_layers": ("num_layers", None), "num_attention_heads": ("num_heads", None),
    "intermediate_size": ("intermediate_size", None),
    "hidden_dropout_prob": ("hidden_dropout", 0.1),
    "attention_probs_dropout_prob": ("attention_dropout", 0.1),
    "max_position_embeddings": ("max_position_embeddings", 512),
    "type_vocab_size": ("type_vocab_size", 0), "layer_norm_eps": ("layer_norm_eps", 1e-7),
    "relative_attention": ("relative_attention", False),
    "max_relative_positions": ("max_relative_positions", -1),
    "position_buckets": ("position_buckets", -1), "share_att_key": ("share_att_key", False),
    "position_biased_input": ("position_biased_input", True),
    "pooler_dropout": ("pooler_dropout", 0.0),
}


def _layer_norm(ours: tuple[str, ...], name: str) -> Iterator[Entry]:
  yield Entry(f"{name}.weight", (ours + ("scale",),), 0, False)
  yield Entry(f"{name}.bias", (ours + ("bias",),), 0, False)


def _entries(cfg: DebertaConfig, task: str, base: str, legacy: bool = False) -> Iterator[Entry]:
  """Every tensor of a `task` model; `base` prefixes the encoder's names ('deberta.' or '')."""
  enc = ("encoder",)
  for table, on in (("word_embeddings", True), ("position_embeddings", cfg.position_biased_input),
                    ("token_type_embeddings", cfg.type_vocab_size > 0)):
    if on:
      yield Entry(f"{base}embeddings.{table}.weight", (enc + (table, "embedding"),), 1, False)
  yield from _layer_norm(enc + ("embeddings_norm",), f"{base}embeddings.LayerNorm")
  if cfg.relative_attention:
    yield Entry(f"{base}encoder.rel_embeddings.weight", (enc + ("rel_embeddings", "embedding"),),
                1, False)
    if cfg.norm_rel_ebd == "layer_norm":
      yield from _layer_norm(enc + ("rel_norm",), f"{base}encoder.LayerNorm")
  if cfg.conv_kernel_size:
    yield from linear_entry(enc + ("conv",), f"{base}encoder.conv.conv", True, n_in=2)
    yield from _layer_norm(enc + ("conv", "norm"), f"{base}encoder.conv.LayerNorm")
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), f"{base}encoder.layer.{i}"
    att = ours + ("attention",)
    for part in ("query", "key", "value"):
      yield from linear_entry(att + (part,), f"{theirs}.attention.self.{part}_proj", True)
    if cfg.relative_attention and not cfg.share_att_key:
      for part, term in (("pos_key", "c2p"), ("pos_query", "p2c")):
        if term in cfg.pos_att_type:
          yield from linear_entry(att + (part,), f"{theirs}.attention.self.{part}_proj", True)
    yield from linear_entry(att + ("out",), f"{theirs}.attention.output.dense", True, n_in=2)
    yield from _layer_norm(ours + ("attention_norm",), f"{theirs}.attention.output.LayerNorm")
    yield from linear_entry(ours + ("mlp", "wi"), f"{theirs}.intermediate.dense", True)
    yield from linear_entry(ours + ("mlp", "wo"), f"{theirs}.output.dense", True)
    yield from _layer_norm(ours + ("mlp_norm",), f"{theirs}.output.LayerNorm")
  if task == "mlm":
    if legacy:
      head, dense, norm = "cls.predictions", "transform.dense", "transform.LayerNorm"
    else:
      head, dense, norm = "lm_predictions.lm_head", "dense", "LayerNorm"
    yield from linear_entry(("mlm", "dense"), f"{head}.{dense}", True)
    yield from _layer_norm(("mlm", "norm"), f"{head}.{norm}")
    yield Entry(f"{head}.bias", (("mlm", "output_bias"),), 0, False)
  elif task == "sequence_classification":
    yield from linear_entry(("pooler",), "pooler.dense", True)
    yield from linear_entry(("classifier",), "classifier", True)
  elif task == "token_classification":
    yield from linear_entry(("classifier",), "classifier", True)
  elif task == "question_answering":
    yield from linear_entry(("classifier",), "qa_outputs", True)


# ---------------------------------------------------------------------------
# config.json <-> DebertaConfig.
# ---------------------------------------------------------------------------
def _conv_as_linear(state: StateDict, name: str, cfg: DebertaConfig) -> None:
  """Rewrites the Conv1d weight `name` [out, in / groups, k] in `state` as the
  Linear [out, k x in / groups] that the table reads into our [k, in / groups, out]."""
  if name not in state:
    return  # the table reports it missing
  value = np.asarray(state.tensors[name])
  want = (cfg.hidden_size, cfg.hidden_size // cfg.conv_groups, cfg.conv_kernel_size)
  if value.shape != want:
    raise CheckpointError(f"{state.source}: parameter {name!r} has shape {value.shape}, "
                          f"expected {want} from the config (conv_kernel_size, conv_groups)")
  state.tensors[name] = np.swapaxes(value, 1, 2).reshape(value.shape[0], -1)


def _conv_from_linear(tensors: dict[str, np.ndarray], name: str, cfg: DebertaConfig) -> None:
  """Inverse of `_conv_as_linear`, on exported `tensors`."""
  k, width = cfg.conv_kernel_size, cfg.hidden_size
  tensors[name] = np.ascontiguousarray(
      np.swapaxes(tensors[name].reshape(width, k, width // cfg.conv_groups), 1, 2))


def _refuse_unsupported(hf: dict, source: str) -> None:
  """One-line errors for the options bert_jax's DeBERTa does not implement."""
  hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
  kernel = hf.get("conv_kernel_size") or 0
  if kernel > 0 and kernel % 2 == 0:
    raise CheckpointError(f"{source}: conv_kernel_size={kernel} is not supported (even kernels "
                          f"change the length in transformers' ConvLayer; only odd ones)")
  if kernel > 0 and hf.get("conv_act", "tanh") not in _CONV_ACT_FROM_HF:
    raise CheckpointError(f"{source}: unsupported conv_act {hf['conv_act']!r}; supported: "
                          f"{sorted(_CONV_ACT_FROM_HF)}")
  for field, want in (("embedding_size", hidden), ("pooler_hidden_size", hidden),
                      ("attention_head_size", hidden // heads)):
    if hf.get(field) not in (None, want):
      raise CheckpointError(f"{source}: {field}={hf[field]} is not supported (only {want})")
  norms = [x.strip() for x in str(hf.get("norm_rel_ebd") or "none").lower().split("|")]
  if set(norms) - {"none", "layer_norm"}:
    raise CheckpointError(f"{source}: norm_rel_ebd={hf['norm_rel_ebd']!r} is not supported "
                          f"(only 'layer_norm' or 'none')")
  for field in ("hidden_act", "pooler_hidden_act"):
    if hf.get(field, "gelu") not in _ACT_FROM_HF:
      raise CheckpointError(f"{source}: unsupported {field} {hf[field]!r}; supported: "
                            f"{sorted(_ACT_FROM_HF)}")


def config_from_hf(hf: dict, dtype: Any = jnp.float32,
                   source: str = "config.json") -> DebertaConfig:
  """A DebertaConfig from a transformers DebertaV2Config config.json dict."""
  missing = [k for k, (_, default) in _SAME_FIELDS.items() if default is None and k not in hf]
  if missing:
    raise CheckpointError(f"{source}: config.json lacks {missing[0]!r}")
  _refuse_unsupported(hf, source)
  fields = {ours: hf.get(theirs, default) for theirs, (ours, default) in _SAME_FIELDS.items()}
  types = hf.get("pos_att_type") or []
  if isinstance(types, str):
    types = [t.strip() for t in types.lower().split("|") if t.strip()]
  norm = "layer_norm" if "layer_norm" in str(hf.get("norm_rel_ebd") or "").lower() else "none"
  hidden_dropout = fields["hidden_dropout"]
  try:
    return DebertaConfig(
        **fields, pos_att_type=tuple(types), norm_rel_ebd=norm,
        hidden_act=_ACT_FROM_HF[hf.get("hidden_act", "gelu")],
        pooler_hidden_act=_ACT_FROM_HF[hf.get("pooler_hidden_act", "gelu")],
        classifier_dropout=(hidden_dropout if hf.get("cls_dropout") is None
                            else hf["cls_dropout"]),
        pad_token_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else 0,
        # transformers reads conv_groups / conv_act only with a kernel (defaults 1, tanh).
        conv_kernel_size=max(0, hf.get("conv_kernel_size") or 0),
        conv_groups=(hf.get("conv_groups") or 1) if hf.get("conv_kernel_size") else 1,
        conv_act=(_CONV_ACT_FROM_HF[hf.get("conv_act", "tanh")] if hf.get("conv_kernel_size")
                  else "tanh"),
        dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from None


def hf_config_fields(cfg: DebertaConfig) -> dict:
  """The config.json fields of `cfg` (transformers' DebertaV2Config)."""
  hf = {theirs: getattr(cfg, ours) for theirs, (ours, _) in _SAME_FIELDS.items()}
  hf.update(
      model_type="deberta-v2", hidden_act=_ACT_TO_HF[cfg.hidden_act],
      pooler_hidden_act=_ACT_TO_HF[cfg.pooler_hidden_act], pooler_hidden_size=cfg.hidden_size,
      pos_att_type=list(cfg.pos_att_type), norm_rel_ebd=cfg.norm_rel_ebd,
      cls_dropout=cfg.classifier_dropout, pad_token_id=cfg.pad_token_id, legacy=False,
      conv_kernel_size=cfg.conv_kernel_size, tie_word_embeddings=True, initializer_range=0.02)
  if cfg.conv_kernel_size:
    hf.update(conv_groups=cfg.conv_groups, conv_act=_CONV_ACT_TO_HF[cfg.conv_act])
  return hf


# ---------------------------------------------------------------------------
# The family interface (see bert_jax/convert/__init__.py).
# ---------------------------------------------------------------------------
def load_hf(hf_config: dict, state: StateDict, task: str | None = None,
            dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """A transformers DebertaV2* checkpoint as `(model, params)`.

  Args:
    hf_config: the parsed config.json.
    state: its tensors.
    task: a key of `deberta.TASKS`; None takes the head config.json's
      `architectures` names. Another task gets fresh head weights (logged).
    dtype: computation dtype.
  """
  source = state.source
  if hf_config.get("model_type") not in MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type {hf_config.get('model_type')!r} is not "
                          f"DeBERTa-v2's {MODEL_TYPES}")
  config = config_from_hf(hf_config, dtype, source)
  ckpt_task = task_from_architectures(hf_config, source, ARCHITECTURES)
  task = task or ckpt_task
  deberta.task_class(task)  # an unknown task fails here, naming the known ones
  base = "deberta." if any(k.startswith("deberta.") for k in state.keys()) else ""
  # Real v3 checkpoints carry lm_predictions.* whatever their `legacy` says.
  legacy = not any(k.startswith("lm_predictions.") for k in state.keys()) and \
      any(k.startswith("cls.predictions.") for k in state.keys())
  model = deberta.build(config, task, **head_kwargs(task, hf_config))
  if config.conv_kernel_size:
    _conv_as_linear(state, f"{base}encoder.conv.conv.weight", config)
  params = params_from_state(model, list(_entries(config, task, base, legacy)), state,
                              optional_heads=task != ckpt_task)
  if task == "mlm" and legacy:
    take_tied(state, "cls.predictions.decoder.weight", f"{base}embeddings.word_embeddings.weight")
    take_tied(state, "cls.predictions.decoder.bias", "cls.predictions.bias")
  warn_unused(state)
  return model, params


def handles(model) -> bool:
  """Whether `model` belongs to this family."""
  return isinstance(model, tuple(deberta.TASKS.values()))


def export_hf(model, params) -> tuple[dict, dict[str, np.ndarray]]:
  """`(config.json dict, tensors)` that transformers' DebertaV2* loads with the same outputs.

  The MLM head is written in the current layout (legacy=false), whose output
  projection reads the word table itself, so no tied copy is written.
  """
  cfg: DebertaConfig = model.config
  task = deberta.task_of(model)
  base = "" if task == "encoder" else "deberta."
  tensors = tensors_from_params(_entries(cfg, task, base), params)
  if cfg.conv_kernel_size:
    _conv_from_linear(tensors, f"{base}encoder.conv.conv.weight", cfg)
  hf = hf_config_fields(cfg)
  hf["architectures"] = [a for a, t in ARCHITECTURES.items() if t == task]
  hf.update(label_fields(task, getattr(model, "num_labels", 0)))
  return hf, tensors
