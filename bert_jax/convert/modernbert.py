"""Hugging Face ModernBERT checkpoints <-> bert_jax ModernBERT params.

One table says, for every Hugging Face tensor, which of our parameters it
holds. Fused tensors are split along their output rows: `attn.Wqkv` (rows
[3, heads, head_dim]) into attention/query, key and value ([embed, heads,
kv] each), and `mlp.Wi` (rows [2, intermediate]) into mlp/wi_0 (the
activated input half) and wi_1 (the gate half). PyTorch Linear weights are
[out, in], ours [in, ...out]. Import and export walk the same table.

    embeddings.tok_embeddings            -> encoder/embeddings
    embeddings.norm                      -> encoder/embeddings_norm
    layers.N.attn_norm (N > 0)           -> encoder/layer_N/attention_norm
    layers.N.attn.{Wqkv,Wo}              -> encoder/layer_N/attention/{query,key,value},out
    layers.N.mlp_norm, layers.N.mlp.{Wi,Wo} -> encoder/layer_N/mlp_norm, mlp/{wi_0,wi_1},wo
    final_norm                           -> encoder/final_norm
    head.{dense,norm}, decoder.bias      -> mlm/head/{dense,norm}, mlm/output_bias (MaskedLM)
    head.{dense,norm}, classifier        -> head/{dense,norm}, classifier (task models)

Task models prefix the encoder's names with 'model.'; the MLM decoder weight
is tied to the token table (transformers ties it on load; a checkpoint whose
copy differs is refused).
"""
from __future__ import annotations

from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.convert.table import (Entry, head_kwargs, label_fields, linear_entry,
                                    params_from_state, take_tied, task_from_architectures,
                                    tensors_from_params, warn_unused)
from bert_jax.models import modernbert
from bert_jax.models.configs import ModernBertConfig

MODEL_TYPES = ("modernbert",)
ARCHITECTURES = {
    "ModernBertModel": "encoder",
    "ModernBertForMaskedLM": "mlm",
    "ModernBertForSequenceClassification": "sequence_classification",
    "ModernBertForTokenClassification": "token_classification",
    "ModernBertForQuestionAnswering": "question_answering",
}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# config.json field -> ours, copied as they are.
_SAME_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size", "norm_eps": "norm_eps", "norm_bias": "norm_bias",
    "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
    "classifier_bias": "classifier_bias", "decoder_bias": "decoder_bias",
    "local_attention": "local_attention", "max_position_embeddings": "max_position_embeddings",
    "embedding_dropout": "embedding_dropout", "attention_dropout": "attention_dropout",
    "mlp_dropout": "mlp_dropout", "classifier_dropout": "classifier_dropout",
    "classifier_pooling": "classifier_pooling",
}
_GLOBAL, _LOCAL = "full_attention", "sliding_attention"


def _norm(cfg: ModernBertConfig, ours: tuple[str, ...], name: str):
  yield Entry(f"{name}.weight", (ours + ("scale",),), 0, False)
  if cfg.norm_bias:
    yield Entry(f"{name}.bias", (ours + ("bias",),), 0, False)


def _entries(cfg: ModernBertConfig, task: str, base: str) -> Iterator[Entry]:
  """Every tensor of a `task` model; `base` prefixes the encoder's names ('model.' or '')."""
  enc = ("encoder",)
  yield Entry(f"{base}embeddings.tok_embeddings.weight",
              (enc + ("embeddings", "embedding"),), 1, False)
  yield from _norm(cfg, enc + ("embeddings_norm",), f"{base}embeddings.norm")
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), f"{base}layers.{i}"
    if i:  # layer 0's attention norm is the identity
      yield from _norm(cfg, ours + ("attention_norm",), f"{theirs}.attn_norm")
    yield from linear_entry(ours + ("attention",), f"{theirs}.attn.Wqkv", cfg.attention_bias,
                       ("query", "key", "value"))
    yield from linear_entry(ours + ("attention", "out"), f"{theirs}.attn.Wo", cfg.attention_bias,
                       n_in=2)
    yield from _norm(cfg, ours + ("mlp_norm",), f"{theirs}.mlp_norm")
    yield from linear_entry(ours + ("mlp",), f"{theirs}.mlp.Wi", cfg.mlp_bias, ("wi_0", "wi_1"))
    yield from linear_entry(ours + ("mlp", "wo"), f"{theirs}.mlp.Wo", cfg.mlp_bias)
  yield from _norm(cfg, enc + ("final_norm",), f"{base}final_norm")
  if task == "encoder":
    return
  head = ("mlm", "head") if task == "mlm" else ("head",)
  yield from linear_entry(head + ("dense",), "head.dense", cfg.classifier_bias)
  yield from _norm(cfg, head + ("norm",), "head.norm")
  if task == "mlm":
    if cfg.decoder_bias:
      yield Entry("decoder.bias", (("mlm", "output_bias"),), 0, False)
  else:
    yield from linear_entry(("classifier",), "classifier", True)


# ---------------------------------------------------------------------------
# config.json <-> ModernBertConfig.
# ---------------------------------------------------------------------------
def _global_every(hf: dict, source: str) -> int:
  """global_attn_every_n_layers from `layer_types` (transformers 5) or the field itself."""
  types = hf.get("layer_types")
  if not types:
    return int(hf.get("global_attn_every_n_layers", 3))
  later = [i for i, t in enumerate(types) if t == _GLOBAL and i > 0]
  n = later[0] if later else len(types)
  if [_GLOBAL if i % n == 0 else _LOCAL for i in range(len(types))] != list(types):
    raise CheckpointError(f"{source}: layer_types {types} is not a global layer every n layers "
                          f"from layer 0 (the pattern bert_jax supports)")
  return n


def _rope_theta(hf: dict, kind: str, field: str, default: float, source: str) -> float:
  params = (hf.get("rope_parameters") or {}).get(kind) or {}
  if params.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
    raise CheckpointError(f"{source}: rope scaling ({params or hf.get('rope_scaling')}) is not "
                          f"supported; only default rotary embeddings")
  return float(params.get("rope_theta", hf.get(field, default)))


def config_from_hf(hf: dict, dtype: Any = jnp.float32,
                   source: str = "config.json") -> ModernBertConfig:
  """A ModernBertConfig from a transformers config.json dict."""
  act, cls_act = hf.get("hidden_activation", "gelu"), hf.get("classifier_activation", "gelu")
  for field, value in (("hidden_activation", act), ("classifier_activation", cls_act)):
    if value not in _ACT_FROM_HF:
      raise CheckpointError(f"{source}: unsupported {field} {value!r}; supported: "
                            f"{sorted(_ACT_FROM_HF)}")
  if not hf.get("tie_word_embeddings", True):
    raise CheckpointError(f"{source}: tie_word_embeddings=false (an untied MLM decoder) is not "
                          f"supported")
  missing = [k for k in _SAME_FIELDS if k not in hf and k in (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "intermediate_size")]
  if missing:
    raise CheckpointError(f"{source}: config.json lacks {missing[0]!r}")
  fields = {ours: hf[theirs] for theirs, ours in _SAME_FIELDS.items() if theirs in hf}
  try:
    return ModernBertConfig(
        **fields, hidden_act=_ACT_FROM_HF[act], classifier_activation=_ACT_FROM_HF[cls_act],
        global_rope_theta=_rope_theta(hf, _GLOBAL, "global_rope_theta", 160_000.0, source),
        local_rope_theta=_rope_theta(hf, _LOCAL, "local_rope_theta", 10_000.0, source),
        global_attn_every_n_layers=_global_every(hf, source),
        pad_token_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else 0,
        dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from None


def hf_config_fields(cfg: ModernBertConfig) -> dict:
  """The config.json fields of `cfg`, in both transformers 4 and 5 spellings."""
  hf = {theirs: getattr(cfg, ours) for theirs, ours in _SAME_FIELDS.items()}
  thetas = {_GLOBAL: cfg.global_rope_theta, _LOCAL: cfg.local_rope_theta}
  hf.update(
      model_type="modernbert", hidden_activation=_ACT_TO_HF[cfg.hidden_act],
      classifier_activation=_ACT_TO_HF[cfg.classifier_activation],
      global_attn_every_n_layers=cfg.global_attn_every_n_layers,
      global_rope_theta=cfg.global_rope_theta, local_rope_theta=cfg.local_rope_theta,
      layer_types=[_GLOBAL if cfg.is_global(i) else _LOCAL for i in range(cfg.num_layers)],
      rope_parameters={k: {"rope_type": "default", "rope_theta": v} for k, v in thetas.items()},
      pad_token_id=cfg.pad_token_id, bos_token_id=None, eos_token_id=None, cls_token_id=None,
      sep_token_id=None, tie_word_embeddings=True, initializer_range=0.02)
  return hf


# ---------------------------------------------------------------------------
# The family interface (see bert_jax/convert/__init__.py).
# ---------------------------------------------------------------------------
def load_hf(hf_config: dict, state: StateDict, task: str | None = None,
            dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """A transformers ModernBert* checkpoint as `(model, params)`.

  Args:
    hf_config: the parsed config.json.
    state: its tensors.
    task: a key of `modernbert.TASKS`; None takes the head config.json's
      `architectures` names. Another task gets fresh head weights (logged).
    dtype: computation dtype.
  """
  source = state.source
  if hf_config.get("model_type") not in MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type {hf_config.get('model_type')!r} is not "
                          f"ModernBERT's {MODEL_TYPES}")
  config = config_from_hf(hf_config, dtype, source)
  ckpt_task = task_from_architectures(hf_config, source, ARCHITECTURES)
  task = task or ckpt_task
  modernbert.task_class(task)  # an unknown task fails here, naming the known ones
  base = "model." if any(k.startswith("model.") for k in state.keys()) else ""
  model = modernbert.build(config, task, **head_kwargs(task, hf_config))
  params = params_from_state(model, list(_entries(config, task, base)), state,
                              optional_heads=task != ckpt_task)
  take_tied(state, "decoder.weight", f"{base}embeddings.tok_embeddings.weight")
  warn_unused(state)
  return model, params


def handles(model) -> bool:
  """Whether `model` belongs to this family."""
  return isinstance(model, tuple(modernbert.TASKS.values()))


def export_hf(model, params) -> tuple[dict, dict[str, np.ndarray]]:
  """`(config.json dict, tensors)` that transformers' ModernBert* loads with the same outputs.

  The tied MLM decoder weight is not written (transformers ties it on load).
  """
  cfg: ModernBertConfig = model.config
  task = modernbert.task_of(model)
  tensors = tensors_from_params(_entries(cfg, task, "" if task == "encoder" else "model."), params)
  hf = hf_config_fields(cfg)
  hf["architectures"] = [a for a, t in ARCHITECTURES.items() if t == task]
  hf.update(label_fields(task, getattr(model, "num_labels", 0)))
  return hf, tensors
