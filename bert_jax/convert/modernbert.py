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

import logging
from typing import Any, Iterator, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.models import layers, modernbert
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


class Entry(NamedTuple):
  """One Hugging Face tensor: its name and the params it holds, concatenated along its rows."""
  name: str
  paths: tuple[tuple[str, ...], ...]
  n_in: int  # leading dims of our arrays that are the matrix's input side (0: a vector)
  transposed: bool  # stored [out, in] (PyTorch Linear)


def linear_entry(ours: tuple[str, ...], name: str, bias: bool, parts=("",), n_in=1):
  paths = tuple(ours + (p,) if p else ours for p in parts)
  yield Entry(f"{name}.weight", tuple(p + ("kernel",) for p in paths), n_in, True)
  if bias:
    yield Entry(f"{name}.bias", tuple(p + ("bias",) for p in paths), 0, False)


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
# Tensors <-> params.
# ---------------------------------------------------------------------------
def _abstract_params(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return flax.traverse_util.flatten_dict(flax.linen.unbox(shapes)["params"])


def _hf_shape(shape: tuple[int, ...], entry: Entry) -> tuple[int, ...]:
  """The checkpoint's shape of a tensor holding len(entry.paths) params of our `shape`."""
  k = len(entry.paths)
  if entry.n_in == 0:
    return (k * int(np.prod(shape)),)
  rows, cols = int(np.prod(shape[:entry.n_in])), int(np.prod(shape[entry.n_in:]))
  return (k * cols, rows) if entry.transposed else (k * rows, cols)


def _split(value: np.ndarray, shape: tuple[int, ...], entry: Entry) -> list[np.ndarray]:
  """A checkpoint tensor -> our len(entry.paths) arrays of `shape`."""
  k = len(entry.paths)
  value = value.reshape(k, -1, *value.shape[1:])  # [k, rows of one part, ...]
  if entry.transposed:
    value = np.swapaxes(value, 1, 2)
  return [np.ascontiguousarray(v).reshape(shape) for v in value]


def join_entries(arrays: list[np.ndarray], entry: Entry) -> np.ndarray:
  """Inverse of `_split`."""
  if entry.n_in == 0:
    return np.concatenate([a.reshape(-1) for a in arrays])
  n = entry.n_in
  mats = [a.reshape(int(np.prod(a.shape[:n])), -1) for a in arrays]
  return np.concatenate([m.T if entry.transposed else m for m in mats], axis=0)


def _fresh(path: tuple[str, ...], shape: tuple[int, ...], key) -> np.ndarray:
  """A newly initialised head parameter: norm scales 1, kernels N(0, 0.02), biases 0."""
  if path[-1] == "scale":
    return np.ones(shape, np.float32)
  if path[-1] == "kernel":
    return np.asarray(layers.bert_init(key, shape, jnp.float32))
  return np.zeros(shape, np.float32)


def params_from_state(model, entries: list[Entry], state: StateDict,
                       optional_heads: bool) -> dict:
  """Every parameter of `model` from `state`; with `optional_heads`, head tensors the
  checkpoint lacks are freshly initialised (logged)."""
  shapes = _abstract_params(model)
  flat, fresh = {}, []
  for entry in entries:
    shape = shapes[entry.paths[0]].shape
    if optional_heads and entry.paths[0][0] != "encoder" and entry.name not in state:
      fresh.extend(entry.paths)
      continue
    value = state.take(entry.name, _hf_shape(shape, entry))
    flat.update(zip(entry.paths, _split(value, shape, entry)))
  missing = sorted(set(shapes) - set(flat) - set(fresh))
  if missing:  # the table and the model disagree: a bug here, not in the checkpoint
    raise CheckpointError(f"{state.source}: no checkpoint name for parameter(s) "
                          f"{['/'.join(p) for p in missing]}")
  if fresh:
    logging.warning("%s: newly initialised (not in the checkpoint): %s", state.source,
                    ", ".join("/".join(p) for p in fresh))
    for key, path in zip(jax.random.split(jax.random.key(0), len(fresh)), fresh):
      flat[path] = _fresh(path, shapes[path].shape, key)
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


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
def _task_from_hf(hf: dict, source: str) -> str:
  archs = hf.get("architectures") or []
  if not archs:
    return "encoder"
  if archs[0] not in ARCHITECTURES:
    raise CheckpointError(f"{source}: unsupported architecture {archs[0]!r}; supported: "
                          f"{sorted(ARCHITECTURES)} (or pass task=... to load the encoder)")
  return ARCHITECTURES[archs[0]]


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
  ckpt_task = _task_from_hf(hf_config, source)
  task = task or ckpt_task
  modernbert.task_class(task)  # an unknown task fails here, naming the known ones
  base = "model." if any(k.startswith("model.") for k in state.keys()) else ""
  kwargs = {}
  if task in ("sequence_classification", "token_classification"):
    labels = hf_config.get("id2label")
    kwargs["num_labels"] = len(labels) if labels else int(hf_config.get("num_labels", 2))
  model = modernbert.build(config, task, **kwargs)
  params = params_from_state(model, list(_entries(config, task, base)), state,
                              optional_heads=task != ckpt_task)
  word = f"{base}embeddings.tok_embeddings.weight"
  if "decoder.weight" in state:
    if not np.allclose(state.tensors["decoder.weight"], state.tensors[word]):
      raise CheckpointError(f"{source}: decoder.weight differs from {word}; untied MLM output "
                            f"weights are not supported")
    state.take("decoder.weight")
  unused = state.unused()
  if unused:
    logging.warning("%s: tensors not used by this model: %s", source, ", ".join(unused))
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
  params = flax.linen.unbox(params.get("params", params))
  flat = flax.traverse_util.flatten_dict(params)
  tensors = {}
  for entry in _entries(cfg, task, "" if task == "encoder" else "model."):
    lacking = [p for p in entry.paths if p not in flat]
    if lacking:
      raise CheckpointError(f"params lack {'/'.join(lacking[0])} needed for {entry.name}")
    arrays = [np.asarray(flat[p], np.float32) for p in entry.paths]
    tensors[entry.name] = np.ascontiguousarray(join_entries(arrays, entry))
  hf = hf_config_fields(cfg)
  hf["architectures"] = [a for a, t in ARCHITECTURES.items() if t == task]
  if task in ("sequence_classification", "token_classification"):
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    if model.num_labels == 1:
      hf["problem_type"] = "regression"
  return hf, tensors
