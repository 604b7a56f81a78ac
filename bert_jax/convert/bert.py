"""BERT, RoBERTa, ALBERT, ELECTRA, DistilBERT: Hugging Face and original TF checkpoints <-> bert_jax params.

One table per naming scheme says, for every bert_jax parameter, which tensor
of the checkpoint holds it, how many of its leading dimensions are inputs (to
flatten a multi-head [embed, heads, kv] kernel into a 2-D matrix) and whether
the source stores it transposed (PyTorch Linear: [out, in]; TF kernels are
[in, out] as ours). Import and export walk the same table, so a name cannot be
mapped one way and forgotten the other. ALBERT's names live in albert.py,
ELECTRA's (and its joint generator + discriminator) in electra.py,
DistilBERT's (and its config.json field names) in distilbert.py.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Iterator, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.convert import albert
from bert_jax.convert import distilbert
from bert_jax.convert import electra
from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.convert.table import label_fields, num_labels
from bert_jax.models import bert, layers
from bert_jax.models import electra as electra_model

MODEL_TYPES = ("bert", "roberta", "albert", "electra", "distilbert")

# Hugging Face architecture -> (model_type, task).
ARCHITECTURES = {
    "BertModel": ("bert", "encoder"),
    "BertForPreTraining": ("bert", "pretraining"),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForSequenceClassification": ("bert", "sequence_classification"),
    "BertForTokenClassification": ("bert", "token_classification"),
    "BertForQuestionAnswering": ("bert", "question_answering"),
    "RobertaModel": ("roberta", "encoder"),
    "RobertaForMaskedLM": ("roberta", "mlm"),
    "RobertaForSequenceClassification": ("roberta", "sequence_classification"),
    "RobertaForTokenClassification": ("roberta", "token_classification"),
    "RobertaForQuestionAnswering": ("roberta", "question_answering"),
    "AlbertModel": ("albert", "encoder"),
    "AlbertForPreTraining": ("albert", "pretraining"),
    "AlbertForMaskedLM": ("albert", "mlm"),
    "AlbertForSequenceClassification": ("albert", "sequence_classification"),
    "AlbertForTokenClassification": ("albert", "token_classification"),
    "AlbertForQuestionAnswering": ("albert", "question_answering"),
    **electra.ARCHITECTURES,
    **distilbert.ARCHITECTURES,
}
# model_type -> the module naming what it names differently from BERT.
_NAMED_APART = {"albert": albert, "electra": electra, "distilbert": distilbert}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "gelu_new": "gelu_new", "relu": "relu",
              "silu": "silu"}
# Tensors that are not parameters: buffers, optimiser slots, step counters.
_NOT_PARAMS = ("position_ids", "adam_m", "adam_v", "global_step")


class Entry(NamedTuple):
  """One parameter: its path in params, its checkpoint name and layout."""
  path: tuple[str, ...]
  name: str
  n_in: int  # leading dims of our array that form the matrix's input side
  transposed: bool  # the checkpoint stores [out, in]


class _HFNames:
  """PyTorch naming: dots, Linear weights [out, in], LayerNorm weight/bias."""
  sep = "."

  def layer(self, i):
    return f"layer.{i}"

  def dense(self, path, name, n_in=1):
    yield Entry(path + ("kernel",), f"{name}.weight", n_in, True)
    yield Entry(path + ("bias",), f"{name}.bias", 0, False)

  def norm(self, path, name):
    yield Entry(path + ("scale",), f"{name}.weight", 0, False)
    yield Entry(path + ("bias",), f"{name}.bias", 0, False)

  def embed(self, path, name):
    return Entry(path + ("embedding",), f"{name}.weight", 1, False)

  def vector(self, path, name):
    return Entry(path, name, 0, False)


class _TFNames:
  """Original TF BERT naming: slashes, kernels [in, out], LayerNorm gamma/beta."""
  sep = "/"

  def layer(self, i):
    return f"layer_{i}"

  def dense(self, path, name, n_in=1):
    yield Entry(path + ("kernel",), f"{name}/kernel", n_in, False)
    yield Entry(path + ("bias",), f"{name}/bias", 0, False)

  def norm(self, path, name):
    yield Entry(path + ("scale",), f"{name}/gamma", 0, False)
    yield Entry(path + ("bias",), f"{name}/beta", 0, False)

  def embed(self, path, name):
    return Entry(path + ("embedding",), name, 1, False)


def _encoder_entries(cfg: bert.BertConfig, n, base: str, add_pooler: bool) -> Iterator[Entry]:
  """The encoder's parameters; `base` is the checkpoint prefix ('bert', 'roberta', ... or '')."""
  if cfg.model_type in ("albert", "distilbert"):
    yield from _NAMED_APART[cfg.model_type].encoder_entries(cfg, n, base, add_pooler)
    return
  j = lambda *parts: n.sep.join(p for p in parts if p)
  enc = ("encoder",)
  emb = enc + ("embeddings",)
  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    yield n.embed(emb + (table,), j(base, "embeddings", table))
  yield from n.norm(emb + ("layer_norm",), j(base, "embeddings", "LayerNorm"))
  if cfg.model_type == "electra":  # BERT's layers, after an optional projection
    yield from electra.projection_entries(cfg, n, base)
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), j(base, "encoder", n.layer(i))
    for proj in ("query", "key", "value"):
      yield from n.dense(ours + ("attention", proj), j(theirs, "attention", "self", proj))
    yield from n.dense(ours + ("attention", "out"), j(theirs, "attention", "output", "dense"),
                       n_in=2)
    yield from n.norm(ours + ("attention_norm",), j(theirs, "attention", "output", "LayerNorm"))
    yield from n.dense(ours + ("mlp", "wi"), j(theirs, "intermediate", "dense"))
    yield from n.dense(ours + ("mlp", "wo"), j(theirs, "output", "dense"))
    yield from n.norm(ours + ("mlp_norm",), j(theirs, "output", "LayerNorm"))
  if add_pooler:
    yield from n.dense(enc + ("pooler",), j(base, "pooler", "dense"))


def _hf_head_entries(model_type: str, task: str) -> Iterator[Entry]:
  n = _HFNames()
  if model_type in _NAMED_APART:
    yield from _NAMED_APART[model_type].head_entries(task, n)
    return
  if task in ("mlm", "pretraining"):
    if model_type == "roberta":
      yield from n.dense(("mlm", "transform"), "lm_head.dense")
      yield from n.norm(("mlm", "transform_norm"), "lm_head.layer_norm")
      yield Entry(("mlm", "output_bias"), "lm_head.bias", 0, False)
    else:
      yield from n.dense(("mlm", "transform"), "cls.predictions.transform.dense")
      yield from n.norm(("mlm", "transform_norm"), "cls.predictions.transform.LayerNorm")
      yield Entry(("mlm", "output_bias"), "cls.predictions.bias", 0, False)
  if task == "pretraining":
    yield from n.dense(("nsp",), "cls.seq_relationship")
  if task == "sequence_classification" and model_type == "roberta":
    yield from n.dense(("classifier_dense",), "classifier.dense")
    yield from n.dense(("classifier",), "classifier.out_proj")
  elif task in ("sequence_classification", "token_classification"):
    yield from n.dense(("classifier",), "classifier")
  if task == "question_answering":
    yield from n.dense(("qa_outputs",), "qa_outputs")


def _tf_head_entries(task: str) -> Iterator[Entry]:
  n = _TFNames()
  if task in ("mlm", "pretraining"):
    yield from n.dense(("mlm", "transform"), "cls/predictions/transform/dense")
    yield from n.norm(("mlm", "transform_norm"), "cls/predictions/transform/LayerNorm")
    yield Entry(("mlm", "output_bias"), "cls/predictions/output_bias", 0, False)
  # run_pretraining.py, run_classifier.py and run_squad.py store these heads
  # as [out, in] `output_weights`.
  heads = {"pretraining": ("nsp", "cls/seq_relationship/"),
           "sequence_classification": ("classifier", ""),
           "question_answering": ("qa_outputs", "cls/squad/")}
  if task in heads:
    ours, prefix = heads[task]
    yield Entry((ours, "kernel"), f"{prefix}output_weights", 1, True)
    yield Entry((ours, "bias"), f"{prefix}output_bias", 0, False)
  if task == "token_classification":
    raise CheckpointError("original TF BERT has no token-classification head format; load the "
                          "encoder (task='encoder') and fine-tune a new head")


def _uses_pooler(model) -> bool:
  if isinstance(model, bert.BertModel):
    return model.add_pooler
  if isinstance(model, bert.BertForSequenceClassification):
    return model.config.has_pooler
  return isinstance(model, bert.BertForPreTraining)


# ---------------------------------------------------------------------------
# Tensors <-> params, shared by every naming.
# ---------------------------------------------------------------------------
def _abstract_params(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  tokens = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return flax.traverse_util.flatten_dict(flax.linen.unbox(shapes)["params"])


def _matrix_shape(shape: tuple[int, ...], entry: Entry) -> tuple[int, ...]:
  """The checkpoint's shape of a parameter of our `shape`."""
  if entry.n_in == 0:
    return (int(np.prod(shape)),)
  rows, cols = int(np.prod(shape[:entry.n_in])), int(np.prod(shape[entry.n_in:]))
  return (cols, rows) if entry.transposed else (rows, cols)


def _params_from_state(model, entries: list[Entry], state: StateDict,
                       optional_heads: bool) -> dict:
  """Reads every parameter of `model`; head tensors absent from the checkpoint
  are freshly initialised (with a warning) only when `optional_heads`."""
  shapes = _abstract_params(model)
  by_path = {e.path: e for e in entries}
  flat, fresh = {}, []
  for path, abstract in shapes.items():
    entry = by_path.get(path)
    if entry is None:
      raise CheckpointError(f"{state.source}: no checkpoint name for parameter {'/'.join(path)}")
    if optional_heads and path[0] != "encoder" and entry.name not in state:
      fresh.append(path)
      continue
    value = state.take(entry.name, _matrix_shape(abstract.shape, entry))
    if entry.transposed:
      value = value.T
    flat[path] = np.ascontiguousarray(value).reshape(abstract.shape)
  if fresh:
    logging.warning("%s: newly initialised (not in the checkpoint): %s", state.source,
                    ", ".join("/".join(p) for p in fresh))
    # BERT's head initialisation, per parameter: initialising the whole model
    # (BERT-large on a host) just to get a classifier would be wasteful.
    keys = jax.random.split(jax.random.key(0), len(fresh))
    for key, path in zip(keys, fresh):
      shape = shapes[path].shape
      flat[path] = (np.ones(shape, np.float32) if path[-1] == "scale" else
                    np.asarray(layers.bert_init(key, shape, jnp.float32))
                    if path[-1] in ("kernel", "embedding") else np.zeros(shape, np.float32))
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def _check_tied(state: StateDict, tied: dict[str, str]):
  """Tied MLM decoder copies must equal what they are tied to: we keep one."""
  for name, source in tied.items():
    if name in state and source in state:
      if not np.allclose(state.tensors[name], state.tensors[source]):
        raise CheckpointError(f"{state.source}: parameter {name!r} differs from {source!r}; "
                              f"untied MLM output weights are not supported")
      state.take(name)


def _warn_unused(state: StateDict):
  unused = [k for k in state.unused() if not any(s in k for s in _NOT_PARAMS)]
  if unused:
    logging.warning("%s: tensors not used by this model: %s", state.source, ", ".join(unused))


# ---------------------------------------------------------------------------
# Hugging Face.
# ---------------------------------------------------------------------------
def _config_from_hf(hf: dict, source: str, dtype) -> bert.BertConfig:
  model_type = hf.get("model_type")
  if model_type == "distilbert":  # its own field names (dim, n_layers, ...)
    hf = distilbert.as_bert_config_json(hf, source)
  for key, ok in (("position_embedding_type", "absolute"), ("is_decoder", False),
                  ("add_cross_attention", False)):
    if hf.get(key, ok) != ok:
      raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (only {ok!r})")
  act = hf.get("hidden_act", "gelu")
  if act not in _ACT_FROM_HF:
    raise CheckpointError(f"{source}: unsupported hidden_act {act!r}; supported: "
                          f"{sorted(_ACT_FROM_HF)}")
  extra = (_NAMED_APART[model_type].config_fields_from_hf(hf, source)
           if model_type in _NAMED_APART else {})
  try:
    pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else
              (1 if model_type == "roberta" else 0))
    return bert.BertConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], hidden_act=_ACT_FROM_HF[act],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=pad, position_offset=pad + 1 if model_type == "roberta" else 0,
        model_type=model_type, dtype=dtype, **extra)
  except KeyError as e:
    raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from e


def _task_from_hf(hf: dict, source: str) -> str:
  archs = hf.get("architectures") or []
  if not archs:
    return "encoder"
  if archs[0] not in ARCHITECTURES:
    raise CheckpointError(f"{source}: unsupported architecture {archs[0]!r}; supported: "
                          f"{sorted(ARCHITECTURES)} (or pass task=... to load the encoder)")
  return ARCHITECTURES[archs[0]][1]


def load_hf(hf_config: dict, state: StateDict, task: str | None = None,
            dtype: Any = jnp.float32):
  """A Hugging Face BERT/RoBERTa/ALBERT/ELECTRA/DistilBERT checkpoint as `(model, params)`.

  Args:
    hf_config: the parsed config.json.
    state: its tensors.
    task: a key of `bert.TASKS`; None takes the head that config.json's
      `architectures` names. A task other than the checkpoint's gets fresh
      head weights (logged), as when fine-tuning from a pre-trained model.
    dtype: computation dtype.
  """
  source = state.source
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise CheckpointError(f"{source}: unsupported model_type {model_type!r} for the BERT "
                          f"family; supported: {list(MODEL_TYPES)}")
  config = _config_from_hf(hf_config, source, dtype)
  ckpt_task = _task_from_hf(hf_config, source)
  task = task or ckpt_task
  if task == "electra":
    raise CheckpointError(f"{source}: task 'electra' is a generator + discriminator pair: load "
                          f"the folder holding discriminator/ and generator/, or join two "
                          f"imports with bert_jax.convert.electra.join")
  _rename_old_layer_norms(state)
  base = model_type if any(k.startswith(model_type + ".") for k in state.keys()) else ""
  kwargs = {}
  if task in ("sequence_classification", "token_classification"):
    kwargs["num_labels"] = num_labels(hf_config)
  if task == "encoder":  # the pooler is optional in saved BertModels
    kwargs["add_pooler"] = (albert.pooler_name(base) if model_type == "albert" else
                            f"{base + '.' if base else ''}pooler.dense.weight") in state
  model = bert.build(config, task, **kwargs)
  entries = list(_encoder_entries(config, _HFNames(), base, _uses_pooler(model)))
  entries += list(_hf_head_entries(model_type, task))
  params = _params_from_state(model, entries, state, optional_heads=task != ckpt_task)
  if task in ("mlm", "pretraining") and model_type in _NAMED_APART:
    _check_tied(state, _NAMED_APART[model_type].tied(base))
  elif task in ("mlm", "pretraining"):
    word = f"{base + '.' if base else ''}embeddings.word_embeddings.weight"
    head = "lm_head" if model_type == "roberta" else "cls.predictions"
    _check_tied(state, {f"{head}.decoder.weight": word,
                              f"{head}.decoder.bias": f"{head}.bias"})
  _warn_unused(state)
  return model, params


def _rename_old_layer_norms(state: StateDict):
  """Old PyTorch BERT checkpoints name LayerNorm parameters gamma/beta."""
  for old in [k for k in state.keys() if "LayerNorm." in k and k.endswith((".gamma", ".beta"))]:
    new = old.rsplit(".", 1)[0] + (".weight" if old.endswith(".gamma") else ".bias")
    state.tensors[new] = state.tensors.pop(old)


def handles(model) -> bool:
  """Whether `model` belongs to this family."""
  return isinstance(model, (*bert.TASKS.values(), electra_model.ElectraForPreTraining))


def export_hf_folders(model, params) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
  """Subfolder -> `(config.json dict, tensors)`: '' (the folder itself) for a task model;
  ELECTRA's joint model is two Hugging Face models, 'discriminator' and 'generator'."""
  if isinstance(model, electra_model.ElectraForPreTraining):
    return {name: export_hf(*split(model, params))
            for name, split in electra.JOINT_FOLDERS.items()}
  return {"": export_hf(model, params)}


def export_hf(model, params) -> tuple[dict, dict[str, np.ndarray]]:
  """`(config.json dict, tensors)` that transformers' Bert*/Roberta*/Albert*/Electra*/DistilBert*
  loads.

  The tied MLM decoder is not written (transformers ties it on load). A bare
  encoder built without a pooler exports hidden states faithfully, but
  transformers' BertModel always has a pooler and initialises it randomly;
  ElectraModel has none, so an ELECTRA encoder's pooler is dropped (logged).
  """
  cfg: bert.BertConfig = model.config
  task = bert.task_of(model)
  if task == "electra":
    raise CheckpointError("the joint ELECTRA model is two Hugging Face models: save_pretrained "
                          "writes PATH/discriminator and PATH/generator (see convert.electra)")
  prefix = {"roberta": "Roberta", "albert": "Albert", "electra": "Electra",
            "distilbert": "DistilBert"}.get(cfg.model_type, "Bert")
  named_apart = _NAMED_APART.get(cfg.model_type)
  extra = named_apart.hf_config_fields(cfg) if named_apart else {}
  if not named_apart and (cfg.embedding_size or cfg.share_layers != "none"):
    raise CheckpointError(f"cannot export to Hugging Face {cfg.model_type}: it has no factorised "
                          f"embeddings or shared layers (embedding_size={cfg.embedding_size}, "
                          f"share_layers={cfg.share_layers!r}); set model_type='albert'")
  expected_offset = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
  if cfg.position_offset != expected_offset:
    raise CheckpointError(f"cannot export to Hugging Face {cfg.model_type}: it needs "
                          f"position_offset={expected_offset}, the model has "
                          f"{cfg.position_offset}")
  archs = [a for a, key in ARCHITECTURES.items() if key == (cfg.model_type, task)]
  if not archs:
    raise CheckpointError(f"no Hugging Face {prefix} architecture for task {task!r}")
  base = cfg.model_type if task != "encoder" else ""
  pooler = _uses_pooler(model)
  if pooler and cfg.model_type in ("electra", "distilbert"):
    logging.warning("Hugging Face %sModel has no pooler: encoder/pooler is not exported", prefix)
    pooler = False
  entries = list(_encoder_entries(cfg, _HFNames(), base, pooler))
  entries += list(_hf_head_entries(cfg.model_type, task))
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  tensors = {}
  for entry in entries:
    if entry.path not in flat:
      raise CheckpointError(f"params lack {'/'.join(entry.path)} needed for {entry.name}")
    value = np.asarray(flat[entry.path], np.float32)
    value = value.reshape(_matrix_shape(value.shape, entry._replace(transposed=False)))
    tensors[entry.name] = value.T if entry.transposed else value
  hf = {
      "architectures": archs, "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size, "hidden_act": _ACT_TO_HF[cfg.hidden_act],
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
      "hidden_dropout_prob": cfg.dropout_rate,
      "attention_probs_dropout_prob": cfg.attention_dropout_rate,
      "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02,
      "position_embedding_type": "absolute", "tie_word_embeddings": True,
  }
  if cfg.model_type == "roberta":
    hf.update(bos_token_id=0, eos_token_id=2)
  hf.update(extra)
  if cfg.model_type == "distilbert":  # its own field names (dim, n_layers, ...)
    hf = distilbert.as_hf_config_json(hf)
  hf.update(label_fields(task, getattr(model, "num_labels", 0)))
  return hf, tensors


# ---------------------------------------------------------------------------
# Original TF BERT (google-research/bert).
# ---------------------------------------------------------------------------
def _read_tf_config(file: pathlib.Path, dtype) -> bert.BertConfig:
  try:
    tf_cfg = json.loads(file.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                          ) from e
  # The original code's "gelu" is the tanh approximation.
  act = {"gelu": "gelu_tanh", "relu": "relu"}.get(tf_cfg.get("hidden_act", "gelu"))
  if act is None:
    raise CheckpointError(f"{file}: unsupported hidden_act {tf_cfg['hidden_act']!r}")
  try:
    return bert.BertConfig(
        vocab_size=tf_cfg["vocab_size"], hidden_size=tf_cfg["hidden_size"],
        num_layers=tf_cfg["num_hidden_layers"], num_heads=tf_cfg["num_attention_heads"],
        intermediate_size=tf_cfg["intermediate_size"], hidden_act=act,
        max_position_embeddings=tf_cfg.get("max_position_embeddings", 512),
        type_vocab_size=tf_cfg.get("type_vocab_size", 2),
        dropout_rate=tf_cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=tf_cfg.get("attention_probs_dropout_prob", 0.1), dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{file}: lacks {e.args[0]!r}") from e


def _tf_state(path: pathlib.Path) -> StateDict:
  from bert_jax.host_tf import tf
  prefix = path / "bert_model.ckpt"
  if not pathlib.Path(str(prefix) + ".index").is_file():
    found = tf.train.latest_checkpoint(str(path))
    if found is None:
      raise CheckpointError(f"{path}: no bert_model.ckpt.index (nor a TF checkpoint) found")
    prefix = pathlib.Path(found)
  reader = tf.train.load_checkpoint(str(prefix))
  names = [n for n in reader.get_variable_to_shape_map() if not any(s in n for s in _NOT_PARAMS)]
  return StateDict({n: reader.get_tensor(n) for n in names}, str(prefix))


def load_tf_checkpoint(path, task: str | None = None, dtype: Any = jnp.float32):
  """A Google TF BERT folder (bert_config.json + bert_model.ckpt.*) as `(model, params)`.

  task=None picks the richest head present: pre-training (MLM + NSP), MLM,
  classifier (`output_weights`), SQuAD (`cls/squad/...`) or the bare encoder.
  """
  path = pathlib.Path(path)
  if not (path / "bert_config.json").is_file():
    raise CheckpointError(f"{path}: no bert_config.json (original TF BERT folder expected)")
  config = _read_tf_config(path / "bert_config.json", dtype)
  state = _tf_state(path)
  present = set(state.keys())
  ckpt_task = ("pretraining" if "cls/seq_relationship/output_weights" in present else
               "mlm" if "cls/predictions/output_bias" in present else
               "sequence_classification" if "output_weights" in present else
               "question_answering" if "cls/squad/output_weights" in present else "encoder")
  task = task or ckpt_task
  kwargs = {}
  if task == "sequence_classification":
    kwargs["num_labels"] = (state.tensors["output_weights"].shape[0]
                            if "output_weights" in present else 2)
  if task == "encoder":
    kwargs["add_pooler"] = "bert/pooler/dense/kernel" in present
  model = bert.build(config, task, **kwargs)
  entries = list(_encoder_entries(config, _TFNames(), "bert", _uses_pooler(model)))
  entries += list(_tf_head_entries(task))
  params = _params_from_state(model, entries, state, optional_heads=task != ckpt_task)
  _warn_unused(state)
  return model, params
