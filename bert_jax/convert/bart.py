"""Hugging Face BART checkpoints <-> bert_jax BART parameters.

Handles transformers' BartModel (no prefix), BartForConditionalGeneration and
BartForSequenceClassification (under `model.`):

    shared.weight                                    -> shared/embedding (tied logits)
    {encoder,decoder}.embed_positions.weight         -> {stack}/position_embeddings
    {encoder,decoder}.layernorm_embedding            -> {stack}/layernorm_embedding
    encoder.layers.N.self_attn.{q,k,v,out}_proj      -> encoder/layers_N/attention/...
    encoder.layers.N.self_attn_layer_norm            -> encoder/layers_N/attention_norm
    decoder.layers.N.self_attn(_layer_norm)          -> self_attention(_norm)
    decoder.layers.N.encoder_attn(_layer_norm)       -> encoder_decoder_attention,
                                                        cross_attention_norm
    {stack}.layers.N.fc1, fc2, final_layer_norm      -> mlp/wi, mlp/wo, mlp_norm
    final_logits_bias [1, vocab]                     -> final_logits_bias [vocab]
    classification_head.{dense,out_proj}             -> classification_head/...

torch Linear weights are [out, in]; ours are [in, ...out] with the heads kept
apart ([d_model, heads, head_dim]). Tied copies (lm_head.weight,
{stack}.embed_tokens.weight) are checked to equal shared.weight and dropped.
"""
from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.convert.table import label_fields, num_labels
from bert_jax.models import bart
from bert_jax.models.bart_config import BartConfig

MODEL_TYPES = ("bart",)
_HF_ARCH = {"seq2seq": "BartForConditionalGeneration", "base": "BartModel",
            "sequence_classification": "BartForSequenceClassification"}
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "relu": "relu", "silu": "silu", "swish": "silu"}
_OUR_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "gelu_new": "gelu_new", "relu": "relu",
            "silu": "silu"}
_TIED = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def config_from_hf(hf: dict, dtype: Any = jnp.float32,
                   source: str = "config.json") -> BartConfig:
  """A BartConfig from a transformers config.json dict; unsupported layouts are errors."""
  for key in ("normalize_before", "add_final_layer_norm"):  # mBART's pre-LN layout
    if hf.get(key):
      raise CheckpointError(f"{source}: {key}=true (a pre-LN mBART layout) is not supported")
  if hf.get("tie_word_embeddings") is False:
    raise CheckpointError(f"{source}: tie_word_embeddings=false; bert_jax BART ties the logits "
                          "to the shared embedding")
  act = hf.get("activation_function", "gelu")
  if act not in _HF_ACT:
    raise CheckpointError(f"{source}: unsupported activation_function {act!r}")
  eos = hf.get("eos_token_id", 2)
  try:
    return BartConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"],
        num_encoder_layers=hf["encoder_layers"], num_decoder_layers=hf["decoder_layers"],
        encoder_attention_heads=hf["encoder_attention_heads"],
        decoder_attention_heads=hf["decoder_attention_heads"],
        encoder_ffn_dim=hf["encoder_ffn_dim"], decoder_ffn_dim=hf["decoder_ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"], activation=_HF_ACT[act],
        dropout_rate=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
        activation_dropout=hf.get("activation_dropout", 0.0),
        classifier_dropout=hf.get("classifier_dropout") or 0.0,
        scale_embedding=bool(hf.get("scale_embedding", False)),
        pad_token_id=hf.get("pad_token_id", 1), bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        decoder_start_token_id=hf.get("decoder_start_token_id", 2), dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{source}: missing BART config key {e.args[0]!r}") from e
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------
# Tensor layout, one direction each.
# ---------------------------------------------------------------------------
def _linear_in(state: StateDict, name: str, shape: tuple[int, int]) -> dict:
  """torch Linear `name` [out, in] -> {'kernel': [in, out], 'bias': [out]}."""
  return {"kernel": state.take(f"{name}.weight", shape).T,
          "bias": state.take(f"{name}.bias", shape[:1])}


def _linear_out(p: dict, name: str) -> dict:
  return {f"{name}.weight": np.asarray(p["kernel"]).T, f"{name}.bias": np.asarray(p["bias"])}


def _norm_in(state: StateDict, name: str, d: int) -> dict:
  return {"scale": state.take(f"{name}.weight", (d,)), "bias": state.take(f"{name}.bias", (d,))}


def _norm_out(p: dict, name: str) -> dict:
  return {f"{name}.weight": np.asarray(p["scale"]), f"{name}.bias": np.asarray(p["bias"])}


def _attention_in(state: StateDict, prefix: str, d: int, heads: int) -> dict:
  hd = d // heads
  out = {}
  for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    w = _linear_in(state, f"{prefix}.{hf}", (d, d))
    out[ours] = {"kernel": w["kernel"].reshape(d, heads, hd), "bias": w["bias"].reshape(heads, hd)}
  w = _linear_in(state, f"{prefix}.out_proj", (d, d))
  out["out"] = {"kernel": w["kernel"].reshape(heads, hd, d), "bias": w["bias"]}
  return out


def _attention_out(p: dict, prefix: str, d: int) -> dict:
  out = {}
  for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    out.update(_linear_out({"kernel": np.asarray(p[ours]["kernel"]).reshape(d, d),
                            "bias": np.asarray(p[ours]["bias"]).reshape(d)}, f"{prefix}.{hf}"))
  out.update(_linear_out({"kernel": np.asarray(p["out"]["kernel"]).reshape(d, d),
                          "bias": p["out"]["bias"]}, f"{prefix}.out_proj"))
  return out


# (our sub-tree, HF attention, HF norm) per layer, in order.
_BLOCKS = {
    "encoder": (("attention", "self_attn"),),
    "decoder": (("self_attention", "self_attn"), ("encoder_decoder_attention", "encoder_attn")),
}
_NORMS = {"attention": "attention_norm", "self_attention": "self_attention_norm",
          "encoder_decoder_attention": "cross_attention_norm"}


def _stack_in(state: StateDict, stack: str, prefix: str, c: BartConfig) -> dict:
  """{prefix}{stack}.* tensors -> our stack's parameter tree."""
  d, base = c.d_model, f"{prefix}{stack}"
  heads = getattr(c, f"{stack}_attention_heads")
  ffn = getattr(c, f"{stack}_ffn_dim")
  params = {
      "position_embeddings": {"embedding": state.take(
          f"{base}.embed_positions.weight", (c.max_position_embeddings + 2, d))},
      "layernorm_embedding": _norm_in(state, f"{base}.layernorm_embedding", d),
  }
  for i in range(getattr(c, f"num_{stack}_layers")):
    b, layer = f"{base}.layers.{i}", {}
    for ours, hf in _BLOCKS[stack]:
      layer[ours] = _attention_in(state, f"{b}.{hf}", d, heads)
      layer[_NORMS[ours]] = _norm_in(state, f"{b}.{hf}_layer_norm", d)
    layer["mlp"] = {"wi": _linear_in(state, f"{b}.fc1", (ffn, d)),
                    "wo": _linear_in(state, f"{b}.fc2", (d, ffn))}
    layer["mlp_norm"] = _norm_in(state, f"{b}.final_layer_norm", d)
    params[f"layers_{i}"] = layer
  return params


def _stack_out(p: dict, stack: str, prefix: str, c: BartConfig) -> dict:
  base = f"{prefix}{stack}"
  out = {f"{base}.embed_positions.weight": np.asarray(p["position_embeddings"]["embedding"])}
  out.update(_norm_out(p["layernorm_embedding"], f"{base}.layernorm_embedding"))
  for i in range(getattr(c, f"num_{stack}_layers")):
    b, layer = f"{base}.layers.{i}", p[f"layers_{i}"]
    for ours, hf in _BLOCKS[stack]:
      out.update(_attention_out(layer[ours], f"{b}.{hf}", c.d_model))
      out.update(_norm_out(layer[_NORMS[ours]], f"{b}.{hf}_layer_norm"))
    out.update(_linear_out(layer["mlp"]["wi"], f"{b}.fc1"))
    out.update(_linear_out(layer["mlp"]["wo"], f"{b}.fc2"))
    out.update(_norm_out(layer["mlp_norm"], f"{b}.final_layer_norm"))
  return out


# ---------------------------------------------------------------------------
# The family interface (see bert_jax/convert/__init__.py).
# ---------------------------------------------------------------------------
def _pick_task(hf_config: dict, task: str | None) -> str:
  if task is None:
    archs = hf_config.get("architectures") or ["BartModel"]
    task = next((t for t, a in _HF_ARCH.items() if a in archs), None)
    if task is None:
      raise CheckpointError(f"unsupported BART architectures {archs}; bert_jax loads "
                            f"{sorted(_HF_ARCH.values())}")
  if task not in _HF_ARCH:
    raise CheckpointError(f"unknown BART task {task!r}; choose one of {list(_HF_ARCH)}")
  return task


def _new_head(c: BartConfig, num_labels: int) -> dict:
  """A classification head initialised as transformers does (normal 0.02, zero biases)."""
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.normal(0, 0.02, (c.d_model, c.d_model)).astype(np.float32),
                    "bias": np.zeros((c.d_model,), np.float32)},
          "out_proj": {"kernel": rng.normal(0, 0.02, (c.d_model, num_labels)).astype(np.float32),
                       "bias": np.zeros((num_labels,), np.float32)}}


def load_hf(hf_config: dict, state: StateDict, task: str | None = None,
            dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """A transformers BART checkpoint -> (BART model of `task`, params).

  A task whose head the folder lacks (e.g. sequence_classification from a
  BartForConditionalGeneration folder) starts that head newly initialised.
  """
  task = _pick_task(hf_config, task)
  c = config_from_hf(hf_config, dtype, source=state.source)
  prefix = "model." if "model.shared.weight" in state else ""
  shared = state.take(f"{prefix}shared.weight", (c.vocab_size, c.d_model))
  for name in _TIED:
    for key in {name, prefix + name}:
      if key in state and not np.array_equal(state.take(key), shared):
        raise CheckpointError(f"{state.source}: {key} differs from shared.weight; bert_jax BART "
                              "ties it to the shared embedding")
  params = {"shared": {"embedding": shared},
            "encoder": _stack_in(state, "encoder", prefix, c),
            "decoder": _stack_in(state, "decoder", prefix, c)}
  kwargs = {}
  if task == "seq2seq":
    bias = (state.take("final_logits_bias", (1, c.vocab_size))[0] if "final_logits_bias" in state
            else np.zeros((c.vocab_size,), np.float32))  # transformers' default when absent
    params["final_logits_bias"] = bias
  elif task == "sequence_classification":
    kwargs["num_labels"] = num_labels(hf_config, default=3)  # transformers' BartConfig default
    if "classification_head.dense.weight" in state:
      d, n = c.d_model, kwargs["num_labels"]
      params["classification_head"] = {
          "dense": _linear_in(state, "classification_head.dense", (d, d)),
          "out_proj": _linear_in(state, "classification_head.out_proj", (n, d))}
    else:
      logging.info("%s: no classification_head; newly initialised (%d labels)", state.source,
                   kwargs["num_labels"])
      params["classification_head"] = _new_head(c, kwargs["num_labels"])
  leftover = [k for k in state.unused()
              if not (k.startswith("classification_head.") or k == "final_logits_bias")]
  if leftover:
    raise CheckpointError(f"{state.source}: {len(leftover)} tensor(s) not used by a BART {task} "
                          f"model, e.g. {leftover[:5]}")
  return bart.build(c, task, **kwargs), params


def handles(model: Any) -> bool:
  """True for the models this module exports."""
  return isinstance(model, bart.BartModel)


def export_hf(model: Any, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) that transformers' Bart classes load with the same outputs."""
  c = model.config
  task = bart.task_of(model)
  params = nn.unbox(params.get("params", params))
  if c.activation not in _OUR_ACT:
    raise CheckpointError(f"cannot export BART activation {c.activation!r} to transformers")
  hf = {
      "model_type": "bart", "architectures": [_HF_ARCH[task]],
      "vocab_size": c.vocab_size, "d_model": c.d_model,
      "encoder_layers": c.num_encoder_layers, "decoder_layers": c.num_decoder_layers,
      "encoder_attention_heads": c.encoder_attention_heads,
      "decoder_attention_heads": c.decoder_attention_heads,
      "encoder_ffn_dim": c.encoder_ffn_dim, "decoder_ffn_dim": c.decoder_ffn_dim,
      "max_position_embeddings": c.max_position_embeddings,
      "activation_function": _OUR_ACT[c.activation], "dropout": c.dropout_rate,
      "attention_dropout": c.attention_dropout, "activation_dropout": c.activation_dropout,
      "classifier_dropout": c.classifier_dropout, "scale_embedding": c.scale_embedding,
      "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id, "forced_eos_token_id": c.eos_token_id,
      "decoder_start_token_id": c.decoder_start_token_id, "is_encoder_decoder": True,
      "tie_word_embeddings": True,
  }
  prefix = "" if task == "base" else "model."
  tensors = {f"{prefix}shared.weight": np.asarray(params["shared"]["embedding"])}
  for stack in ("encoder", "decoder"):
    tensors.update(_stack_out(params[stack], stack, prefix, c))
  if task == "seq2seq":
    tensors["final_logits_bias"] = np.asarray(params["final_logits_bias"])[None]
  elif task == "sequence_classification":
    head = params["classification_head"]
    tensors.update(_linear_out(head["dense"], "classification_head.dense"))
    tensors.update(_linear_out(head["out_proj"], "classification_head.out_proj"))
    hf.update(label_fields(task, model.num_labels))
  return hf, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
