"""Hugging Face T5 / mT5 checkpoints <-> bert_jax T5 parameters.

Handles the parameter names of transformers' T5Model, T5ForConditionalGeneration
and T5EncoderModel (and MT5*, which share them):

    shared.weight                                       -> shared/embedding
    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}     -> encoder/layers_N/attention/...
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias -> encoder/relpos_bias
    encoder.block.N.layer.{0,1}.layer_norm              -> pre_attention_norm, pre_mlp_norm
    encoder.block.N.layer.1.DenseReluDense.{wi|wi_0,wi_1,wo} -> encoder/layers_N/mlp/...
    decoder.block.N.layer.{0,1,2}                       -> self_attention,
                                                           encoder_decoder_attention, mlp
    {encoder,decoder}.final_layer_norm                  -> final_norm
    lm_head.weight (v1.1, untied)                       -> logits_dense

torch Linear weights are [out, in]; ours are [in, ...out] with the heads kept
apart ([d_model, heads, d_kv]), hence the transposes and reshapes below.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.models import t5

MODEL_TYPES = ("t5", "mt5")
TASKS = ("seq2seq", "encoder")
# Hugging Face activation names -> ours (HF's "gelu" is the exact erf GELU).
_HF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh":
           "gelu_tanh", "silu": "silu", "swish": "silu"}
_OUR_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}
# Copies of `shared.weight` that tied checkpoints may carry, and a bias T5 never uses.
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _activations(feed_forward_proj: str, source: str) -> tuple[str, ...]:
  gated = feed_forward_proj.startswith("gated-")
  name = feed_forward_proj[len("gated-"):] if gated else feed_forward_proj
  if gated and name == "gelu":
    name = "gelu_new"  # transformers' historical meaning of 'gated-gelu'
  if name not in _HF_ACT:
    raise CheckpointError(f"{source}: unsupported feed_forward_proj {feed_forward_proj!r}")
  return (_HF_ACT[name], "linear") if gated else (_HF_ACT[name],)


def config_from_hf(hf: dict, dtype: Any = jnp.float32, tie_word_embeddings: bool = True,
                   source: str = "config.json") -> t5.T5Config:
  """A T5Config from a transformers config.json dict."""
  try:
    return t5.T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.1),
        activations=_activations(hf.get("feed_forward_proj", "relu"), source),
        tie_word_embeddings=tie_word_embeddings,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        eos_token_id=hf.get("eos_token_id", 1) if isinstance(hf.get("eos_token_id", 1), int)
        else hf["eos_token_id"][0],
        decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0, dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{source}: missing T5 config key {e.args[0]!r}") from e


# ---------------------------------------------------------------------------
# Tensor layout, one direction each.
# ---------------------------------------------------------------------------
def _attention_in(state: StateDict, prefix: str, c: t5.T5Config) -> dict:
  inner = c.num_heads * c.d_kv
  out = {}
  for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    w = state.take(f"{prefix}.{hf}.weight", (inner, c.d_model))
    out[ours] = {"kernel": w.T.reshape(c.d_model, c.num_heads, c.d_kv)}
  w = state.take(f"{prefix}.o.weight", (c.d_model, inner))
  out["out"] = {"kernel": w.T.reshape(c.num_heads, c.d_kv, c.d_model)}
  return out


def _attention_out(p: dict, prefix: str, c: t5.T5Config) -> dict:
  inner = c.num_heads * c.d_kv
  out = {f"{prefix}.{hf}.weight": np.asarray(p[ours]["kernel"]).reshape(c.d_model, inner).T
         for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))}
  out[f"{prefix}.o.weight"] = np.asarray(p["out"]["kernel"]).reshape(inner, c.d_model).T
  return out


def _mlp_names(c: t5.T5Config) -> list[str]:
  return ["wi"] if len(c.activations) == 1 else [f"wi_{i}" for i in range(len(c.activations))]


def _mlp_in(state: StateDict, prefix: str, c: t5.T5Config) -> dict:
  out = {n: {"kernel": state.take(f"{prefix}.{n}.weight", (c.d_ff, c.d_model)).T}
         for n in _mlp_names(c)}
  out["wo"] = {"kernel": state.take(f"{prefix}.wo.weight", (c.d_model, c.d_ff)).T}
  return out


def _mlp_out(p: dict, prefix: str, c: t5.T5Config) -> dict:
  out = {f"{prefix}.{n}.weight": np.asarray(p[n]["kernel"]).T for n in _mlp_names(c)}
  out[f"{prefix}.wo.weight"] = np.asarray(p["wo"]["kernel"]).T
  return out


def _norm_in(state: StateDict, name: str, c: t5.T5Config) -> dict:
  return {"scale": state.take(name, (c.d_model,))}


def _stack_in(state: StateDict, stack: str, c: t5.T5Config) -> dict:
  """encoder.* or decoder.* tensors -> our stack's parameter tree."""
  decoder = stack == "decoder"
  params = {
      "relpos_bias": {"rel_embedding": state.take(
          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          (c.relative_attention_num_buckets, c.num_heads))},
      "final_norm": _norm_in(state, f"{stack}.final_layer_norm.weight", c),
  }
  for i in range(c.num_decoder_layers if decoder else c.num_encoder_layers):
    b = f"{stack}.block.{i}.layer"
    layer = {
        "pre_self_attention_norm" if decoder else "pre_attention_norm":
            _norm_in(state, f"{b}.0.layer_norm.weight", c),
        "self_attention" if decoder else "attention":
            _attention_in(state, f"{b}.0.SelfAttention", c),
    }
    mlp = 1
    if decoder:
      layer["pre_cross_attention_norm"] = _norm_in(state, f"{b}.1.layer_norm.weight", c)
      layer["encoder_decoder_attention"] = _attention_in(state, f"{b}.1.EncDecAttention", c)
      mlp = 2
    layer["pre_mlp_norm"] = _norm_in(state, f"{b}.{mlp}.layer_norm.weight", c)
    layer["mlp"] = _mlp_in(state, f"{b}.{mlp}.DenseReluDense", c)
    params[f"layers_{i}"] = layer
  return params


def _stack_out(p: dict, stack: str, c: t5.T5Config) -> dict:
  decoder = stack == "decoder"
  out = {
      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          np.asarray(p["relpos_bias"]["rel_embedding"]),
      f"{stack}.final_layer_norm.weight": np.asarray(p["final_norm"]["scale"]),
  }
  for i in range(c.num_decoder_layers if decoder else c.num_encoder_layers):
    b, layer = f"{stack}.block.{i}.layer", p[f"layers_{i}"]
    self_name = "self_attention" if decoder else "attention"
    out[f"{b}.0.layer_norm.weight"] = np.asarray(
        layer["pre_self_attention_norm" if decoder else "pre_attention_norm"]["scale"])
    out.update(_attention_out(layer[self_name], f"{b}.0.SelfAttention", c))
    mlp = 1
    if decoder:
      out[f"{b}.1.layer_norm.weight"] = np.asarray(layer["pre_cross_attention_norm"]["scale"])
      out.update(_attention_out(layer["encoder_decoder_attention"], f"{b}.1.EncDecAttention", c))
      mlp = 2
    out[f"{b}.{mlp}.layer_norm.weight"] = np.asarray(layer["pre_mlp_norm"]["scale"])
    out.update(_mlp_out(layer["mlp"], f"{b}.{mlp}.DenseReluDense", c))
  return out


# ---------------------------------------------------------------------------
# The family interface (see bert_jax/convert/__init__.py).
# ---------------------------------------------------------------------------
def _pick_task(hf_config: dict, task: str | None) -> str:
  if task is None:
    archs = hf_config.get("architectures") or []
    task = "encoder" if any("EncoderModel" in a for a in archs) else "seq2seq"
  if task not in TASKS:
    raise CheckpointError(f"unknown T5 task {task!r}; choose one of {TASKS}")
  return task


def _logit_layout(hf_config: dict, state: StateDict, shape: tuple[int, int]) -> tuple[bool, Any]:
  """(tie_word_embeddings, lm_head kernel or None) for a seq2seq checkpoint.

  v1.0 scales decoder outputs by d_model**-0.5 and uses the embedding as
  lm_head; v1.1 does neither. transformers 5 records the scaling as
  `scale_decoder_outputs` (its `tie_word_embeddings` is then always true);
  older configs say `tie_word_embeddings: false` for v1.1.
  """
  scaled = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
  shared = state.tensors["shared.weight"]
  if "lm_head.weight" not in state:
    lm_head = None if scaled else np.asarray(shared, np.float32).T  # unscaled, tied: copy
    return bool(scaled), lm_head
  lm_head = state.take("lm_head.weight", shape)
  if scaled and not np.array_equal(lm_head, shared):
    raise CheckpointError(f"{state.source}: lm_head.weight differs from shared.weight but the "
                          f"config scales decoder outputs (a tied v1.0 layout); bert_jax "
                          f"supports tied+scaled (v1.0) or untied+unscaled (v1.1) logits")
  return bool(scaled), None if scaled else lm_head.T


def load_hf(hf_config: dict, state: StateDict, task: str | None = None,
            dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """A transformers T5/mT5 checkpoint -> (T5Model or T5EncoderModel, params)."""
  task = _pick_task(hf_config, task)
  source = state.source
  base = config_from_hf(hf_config, dtype, source=source)
  params = {"shared": {"embedding": state.take("shared.weight", (base.vocab_size, base.d_model))}}
  params["encoder"] = _stack_in(state, "encoder", base)
  if task == "encoder":
    model = t5.T5EncoderModel(base)
    allowed = lambda k: k.startswith(("decoder.", "lm_head.")) or k in _IGNORED  # noqa: E731
  else:
    tied, lm_head = _logit_layout(hf_config, state, (base.vocab_size, base.d_model))
    config = t5.T5Config.from_dict({**_fields(base), "tie_word_embeddings": tied})
    params["decoder"] = _stack_in(state, "decoder", config)
    if lm_head is not None:
      params["logits_dense"] = {"kernel": lm_head}
    model = t5.T5Model(config)
    allowed = lambda k: k in _IGNORED  # noqa: E731
  leftover = [k for k in state.unused() if not allowed(k)]
  if leftover:
    raise CheckpointError(f"{source}: {len(leftover)} tensor(s) not used by a T5 {task} model, "
                          f"e.g. {leftover[:5]}; is this a T5 head bert_jax does not support?")
  return model, params


def _fields(c: t5.T5Config) -> dict:
  return {f: getattr(c, f) for f in c.__dataclass_fields__}


def handles(model: Any) -> bool:
  """True for the models this module exports."""
  return isinstance(model, (t5.T5Model, t5.T5EncoderModel))


def _feed_forward_proj(c: t5.T5Config) -> str:
  acts = c.activations
  if len(acts) == 2 and acts[1] == "linear" and acts[0] in _OUR_ACT:
    return "gated-gelu" if acts[0] == "gelu_tanh" else f"gated-{_OUR_ACT[acts[0]]}"
  if len(acts) == 1 and acts[0] in _OUR_ACT:
    return _OUR_ACT[acts[0]]
  raise CheckpointError(f"cannot export T5 activations {acts} to transformers' feed_forward_proj")


def export_hf(model: Any, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) that transformers' T5 classes load with the same outputs."""
  c = model.config
  params = nn.unbox(params.get("params", params))  # boxed straight from init is fine too
  encoder_only = isinstance(model, t5.T5EncoderModel)
  hf = {
      "model_type": "t5",
      "architectures": ["T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"],
      "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff,
      "num_heads": c.num_heads, "num_layers": c.num_encoder_layers,
      "num_decoder_layers": c.num_decoder_layers,
      "relative_attention_num_buckets": c.relative_attention_num_buckets,
      "relative_attention_max_distance": c.relative_attention_max_distance,
      "dropout_rate": c.dropout_rate, "layer_norm_epsilon": c.layer_norm_eps,
      "feed_forward_proj": _feed_forward_proj(c), "is_encoder_decoder": True,
      "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
      "decoder_start_token_id": c.decoder_start_token_id,
      # Both spellings: transformers 5 reads the scaling from the first, 4.x from the second.
      "scale_decoder_outputs": c.tie_word_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings,
  }
  tensors = {"shared.weight": np.asarray(params["shared"]["embedding"])}
  tensors.update(_stack_out(params["encoder"], "encoder", c))
  if not encoder_only:
    tensors.update(_stack_out(params["decoder"], "decoder", c))
    if not c.tie_word_embeddings:
      tensors["lm_head.weight"] = np.asarray(params["logits_dense"]["kernel"]).T
  return hf, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
