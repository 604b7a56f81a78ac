"""BART encoder-decoder (Lewis et al. 2019) with cached decoding and a classification head.

Architecture (fairseq's bart.base / bart.large, Hugging Face's Bart*):
token embedding (shared by both stacks and the output logits, optionally
scaled by sqrt(d_model)) + a learned position table read at position + 2 ->
`layernorm_embedding` -> post-LN layers (sub-layer, dropout, residual add,
LayerNorm) with biases everywhere and a GELU MLP. The decoder adds
cross-attention between its self-attention and MLP. Logits are the decoder
output against the shared embedding plus `final_logits_bias`.

Calling convention, as T5Model's (bert_jax/models/t5.py), so the decoding of
bert_jax/decoding.py (greedy_decode, beam_search) serves both:

    model = BartForConditionalGeneration(BartConfig.preset("base"))
    logits = model.apply({"params": p}, enc_tokens, dec_tokens)   # [b, dec_len, vocab]
    encoded = model.apply({"params": p}, enc_tokens, method=type(model).encode)
    cache = model.init(rng, enc_tokens, jnp.zeros((b, max_len), jnp.int32),
                       decode=True)["cache"]
    cross = model.apply({"params": p}, encoded, method=type(model).prefill_cross,
                        mutable=["cross_cache"])[1]["cross_cache"]   # cross K/V, once
    logits, vars = model.apply({"params": p, "cache": cache, "cross_cache": cross},
                               None, enc_tokens, dec_token, decode=True,
                               method=type(model).decode,
                               mutable=["cache"])   # one token [b, 1] per call

Ids are the checkpoint's (RoBERTa BPE: <s>=0, <pad>=1, </s>=2): the encoder
masks `pad_token_id` unless `encoder_segment_ids` are given (packed batches,
0 = padding); the decoder is causal (plus segments when packed) and never
derives a mask from its tokens, so whatever follows a target is ignored by
the loss alone. Step i of cached decoding equals position i of the full pass.

Tasks: 'seq2seq' (BartForConditionalGeneration), 'base' (BartModel: decoder
hidden states) and 'sequence_classification' (BartForSequenceClassification:
the encoder input is also the decoder input shifted right, and the decoder
state at each row's last </s> goes through dense -> tanh -> out_proj).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import layers
from bert_jax.models.bart_config import BartConfig

Array = jax.Array
_ACT = ("act_batch", "act_length", "act_embed")
POSITION_OFFSET = 2  # fairseq's learned positions start after two reserved rows


# ---------------------------------------------------------------------------
# Attention with biases and an optional key/value cache.
# ---------------------------------------------------------------------------
class BartAttention(nn.Module):
  """Multi-head attention (q, k, v, out with biases), logits scaled by 1/sqrt(head_dim).

  With decode=True the first call (init, on the full [batch, max_length]
  shape) creates `cached_key`/`cached_value`/`cache_index` in the 'cache'
  collection; later calls take one query token, write its key/value at
  `cache_index` and attend to every cached position up to it (as
  t5.T5Attention does). Cross-attention decoding, as there: inputs_q=None
  stores the projected `inputs_kv` in the 'cross_cache' collection (the
  prefill), inputs_kv=None attends to them.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def _cached(self, key: Array, value: Array) -> tuple[Array, Array, Array | None]:
    """Stores this step's key/value; returns the full cache and its causal mask."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init: run on the full shape, the cache stays empty
      return key, value, None
    if key.shape[1] != 1:
      raise ValueError(f"{self.name}: decode=True takes one token per call, got {key.shape[1]}")
    i = index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (0, i, 0, 0))
    value = jax.lax.dynamic_update_slice(cached_value.value,
                                         value.astype(cached_value.value.dtype), (0, i, 0, 0))
    cached_key.value, cached_value.value = key, value
    index.value = i + 1
    return key, value, (jnp.arange(key.shape[1]) <= i)[None, None, None, :]

  @nn.compact
  def __call__(self, inputs_q: Array | None, inputs_kv: Array | None, *,
               mask: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array | None:
    """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed] -> [batch, q_len, embed].

    Cross-attention decoding: inputs_q=None stores the projected inputs_kv
    (returns None), inputs_kv=None reads them (see the class docstring).
    """
    proj = functools.partial(layers.DenseGeneral, features=(self.num_heads, self.head_dim),
                             kernel_axes=("embed", "heads", "kv"), dtype=self.dtype)
    axes = ("act_batch", "act_length", "act_heads", "act_kv")
    # [batch, length, heads, kv]
    key = value = None
    if inputs_kv is not None:
      key = nn.with_logical_constraint(proj(name="key")(inputs_kv), axes)
      value = nn.with_logical_constraint(proj(name="value")(inputs_kv), axes)
    if inputs_q is None or inputs_kv is None:
      key, value = layers.cross_kv_cache(self, key, value)
      if inputs_q is None:  # the prefill: keys/values stored, nothing to attend
        return None
    query = nn.with_logical_constraint(proj(name="query")(inputs_q), axes)
    if decode:
      key, value, cache_mask = self._cached(key, value)
      if cache_mask is not None:
        mask = cache_mask if mask is None else mask & cache_mask
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    x = layers.dot_product_attention(query, key, value, mask=mask, dropout_rate=self.dropout_rate,
                                     dropout_rng=dropout_rng, deterministic=deterministic,
                                     dtype=self.dtype)
    out = layers.DenseGeneral(features=inputs_q.shape[-1], kernel_axes=("heads", "kv", "embed"),
                              axis=(-2, -1), dtype=self.dtype, name="out")(x)
    return nn.with_logical_constraint(out, _ACT)  # [batch, q_len, embed]


# ---------------------------------------------------------------------------
# Layers and stacks.
# ---------------------------------------------------------------------------
def _norm(c: BartConfig, name: str) -> nn.Module:
  return layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name=name)


def _mlp(c: BartConfig, width: int) -> nn.Module:
  return layers.Mlp(width, (c.activation,), dropout_rate=c.activation_dropout, dtype=c.dtype,
                    name="mlp")


class EncoderLayer(nn.Module):
  """Self-attention then MLP, each: dropout, residual add, LayerNorm (post-LN)."""
  config: BartConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [batch, length, d_model] -> [batch, length, d_model]."""
    c = self.config
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    attention = BartAttention(c.encoder_attention_heads, c.encoder_head_dim, c.attention_dropout,
                              c.dtype, name="attention")
    x = _norm(c, "attention_norm")(x + drop(attention(x, x, mask=mask,
                                                      deterministic=deterministic)))
    x = _norm(c, "mlp_norm")(x + drop(_mlp(c, c.encoder_ffn_dim)(x, deterministic)))
    return nn.with_logical_constraint(x, _ACT)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention to the encoder, MLP; each post-LN."""
  config: BartConfig

  @nn.compact
  def __call__(self, x: Array | None, encoded: Array | None, self_mask: Array | None,
               cross_mask: Array | None, deterministic: bool, decode: bool) -> Array | None:
    """x [batch, dec_len, d_model], encoded [batch, enc_len, d_model] -> like x.

    Cached decoding: x=None only stores the cross-attention keys/values of
    `encoded` (the prefill); encoded=None reads them.
    """
    c = self.config
    attention = functools.partial(BartAttention, c.decoder_attention_heads, c.decoder_head_dim,
                                  c.attention_dropout, c.dtype)
    cross = attention(name="encoder_decoder_attention")
    if x is None:
      return cross(None, encoded)
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    h = attention(name="self_attention")(x, x, mask=self_mask, deterministic=deterministic,
                                         decode=decode)
    x = _norm(c, "self_attention_norm")(x + drop(h))
    h = cross(x, encoded, mask=cross_mask, deterministic=deterministic)
    x = _norm(c, "cross_attention_norm")(x + drop(h))
    x = _norm(c, "mlp_norm")(x + drop(_mlp(c, c.decoder_ffn_dim)(x, deterministic)))
    return nn.with_logical_constraint(x, _ACT)


def _default_positions(tokens: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _embed(c: BartConfig, shared: nn.Module, tokens: Array, positions: Array) -> Array:
  """Scaled token embedding + learned position (row position + 2) -> layernorm_embedding."""
  table = layers.Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model,
                       axes=("position", "embed"), dtype=c.dtype, name="position_embeddings")
  x = shared(tokens)
  if c.scale_embedding:
    x = x * jnp.asarray(c.d_model ** 0.5, x.dtype)
  x = x + table(positions + POSITION_OFFSET)  # [batch, length, d_model]
  return nn.with_logical_constraint(_norm(c, "layernorm_embedding")(x), _ACT)


class Encoder(nn.Module):
  """Embedding -> post-LN layers; [batch, length] tokens -> [batch, length, d_model]."""
  config: BartConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array, positions: Array | None = None,
               deterministic: bool = True) -> Array:
    """segment_ids: the padding mask (1 real, 0 pad) or packed segments 1, 2, ..."""
    c = self.config
    positions = _default_positions(tokens) if positions is None else positions
    x = _embed(c, self.shared_embedding, tokens, positions)
    x = layers.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    mask = layers.segment_mask(segment_ids, segment_ids)  # [batch, 1, length, length]
    for i in range(c.num_encoder_layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, mask, deterministic)
    return x


class Decoder(nn.Module):
  """Embedding -> post-LN layers with cross-attention; [batch, dec_len] -> [..., d_model].

  With decode=True it keeps `cache_index` in the 'cache' collection: the
  position of the single token each step embeds. tokens=None is the
  prefill: every layer stores its cross-attention keys/values of `encoded`
  ('cross_cache' collection), which steps with encoded=None then read.
  """
  config: BartConfig
  shared_embedding: nn.Module

  def _step_position(self, tokens: Array) -> tuple[Array | None, bool]:
    """Decode mode: (the step's positions [batch, 1], is_step); is_step False at init."""
    initialized = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None, False
    i = index.value
    index.value = i + 1
    return jnp.full(tokens.shape, i, jnp.int32), True

  @nn.compact
  def __call__(self, encoded: Array | None, encoder_segment_ids: Array | None,
               tokens: Array | None, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array | None:
    """encoded [batch, enc_len, d_model], tokens [batch, dec_len] -> [batch, dec_len, d_model]."""
    c = self.config
    if tokens is None:  # the prefill
      for i in range(c.num_decoder_layers):
        DecoderLayer(c, name=f"layers_{i}")(None, encoded, None, None, True, False)
      return None
    is_step = False
    if decode:
      step_positions, is_step = self._step_position(tokens)
      if is_step and positions is None:
        positions = step_positions
    if positions is None:
      positions = _default_positions(tokens)
    if is_step:
      self_mask = None  # the attention cache masks positions not yet written
    else:
      self_mask = layers.causal_mask(tokens.shape[1])
      if segment_ids is not None:
        self_mask = self_mask & layers.segment_mask(segment_ids, segment_ids)
    query_segments = jnp.ones(tokens.shape, jnp.int32) if segment_ids is None else segment_ids
    cross_mask = layers.segment_mask(query_segments, encoder_segment_ids)
    x = _embed(c, self.shared_embedding, tokens, positions)
    x = layers.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    for i in range(c.num_decoder_layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, encoded, self_mask, cross_mask, deterministic,
                                              decode)
    return x


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------
def _encoder_segments(c: BartConfig, tokens: Array, segment_ids: Array | None) -> Array:
  return (tokens != c.pad_token_id).astype(jnp.int32) if segment_ids is None else segment_ids


class BartModel(nn.Module):
  """Shared embedding, encoder and decoder; returns decoder hidden states (HF BartModel)."""
  config: BartConfig

  def setup(self):
    c = self.config
    self.shared = layers.Embed(c.vocab_size, c.d_model, dtype=c.dtype, name="shared")
    self.encoder = Encoder(c, self.shared)
    self.decoder = Decoder(c, self.shared)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, enable_dropout: bool = False) -> Array:
    """encoder_input_tokens [batch, enc_len] -> encoded [batch, enc_len, d_model]."""
    segments = _encoder_segments(self.config, encoder_input_tokens, encoder_segment_ids)
    return self.encoder(encoder_input_tokens, segments, encoder_positions,
                        deterministic=not enable_dropout)

  def prefill_cross(self, encoded: Array) -> None:
    """Decode mode: stores every decoder layer's cross-attention keys/values of `encoded`.

    encoded [batch, enc_len, d_model]; call with mutable=['cross_cache'] and
    pass the collection it returns to the decode steps, which take
    encoded=None (the projection then runs once, not once per step).
    """
    self.decoder(encoded, None, None)

  def hidden(self, encoded: Array | None, encoder_input_tokens: Array,
             decoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = False, decode: bool = False) -> Array:
    """Decoder hidden states [batch, dec_len, d_model] (computation dtype).

    encoded=None (decode steps) reads the keys/values stored by `prefill_cross`.
    """
    segments = _encoder_segments(self.config, encoder_input_tokens, encoder_segment_ids)
    return self.decoder(encoded, segments, decoder_input_tokens, decoder_segment_ids,
                        decoder_positions, deterministic=not enable_dropout, decode=decode)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """Teacher-forced pass -> decoder hidden states [batch, dec_len, d_model]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout)
    return self.hidden(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, enable_dropout, decode)


class BartForConditionalGeneration(BartModel):
  """BART with tied logits + final_logits_bias; the text-to-text model (task 'seq2seq')."""

  def setup(self):
    super().setup()
    self.final_logits_bias = self.param(
        "final_logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        (self.config.vocab_size,), jnp.float32)

  def decode(self, encoded: Array | None, encoder_input_tokens: Array,
             decoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = False, decode: bool = False) -> Array:
    """Decoder + logits: [batch, dec_len] tokens -> float32 logits [batch, dec_len, vocab].

    With decode=True call it with mutable=['cache'] and one token per call;
    encoded=None reads the cross-attention keys/values of `prefill_cross`.
    """
    x = self.hidden(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                    decoder_segment_ids, decoder_positions, enable_dropout, decode)
    logits = layers.add_bias(self.shared.attend(x),
                             self.final_logits_bias.astype(self.config.dtype))
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
    return logits.astype(jnp.float32)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """Teacher-forced pass -> float32 logits [batch, dec_len, vocab].

    decode=True here only serves `init` to allocate the cache on the decoder
    input's [batch, max_length] shape.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, enable_dropout, decode)


def shift_right(tokens: Array, start_id: int) -> Array:
  """[batch, length] -> the same shifted one to the right, `start_id` first."""
  return jnp.concatenate([jnp.full_like(tokens[:, :1], start_id), tokens[:, :-1]], axis=1)


def last_eos_index(tokens: Array, eos_id: int, pad_id: int) -> Array:
  """[batch, length] -> int32 [batch]: each row's last EOS (its last non-pad token if none).

  Hugging Face takes the last EOS of every row (and requires equal EOS counts).
  """
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  last_eos = jnp.max(jnp.where(tokens == eos_id, positions, -1), axis=1)
  last_real = jnp.max(jnp.where(tokens != pad_id, positions, 0), axis=1)
  return jnp.where(last_eos >= 0, last_eos, last_real)


class ClassificationHead(nn.Module):
  """dropout, dense, tanh, dropout, out_proj: [batch, d_model] -> float32 [batch, num_labels]."""
  config: BartConfig
  num_labels: int

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c = self.config
    drop = functools.partial(layers.Dropout(c.classifier_dropout), deterministic=deterministic)
    head = functools.partial(layers.DenseGeneral, dtype=c.dtype)
    x = jnp.tanh(head(c.d_model, kernel_axes=("embed", "mlp"), name="dense")(drop(x)))
    logits = head(self.num_labels, kernel_axes=("embed", "classes"), name="out_proj")(drop(x))
    return logits.astype(jnp.float32)


class BartForSequenceClassification(BartModel):
  """The decoder state at each row's last </s> -> ClassificationHead."""
  num_labels: int = 2

  def setup(self):
    super().setup()
    self.classification_head = ClassificationHead(self.config, self.num_labels)

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               enable_dropout: bool = False) -> dict[str, Array]:
    """encoder_input_tokens [batch, length] -> {'logits': float32 [batch, num_labels]}."""
    c = self.config
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout=enable_dropout)
    decoder_tokens = shift_right(encoder_input_tokens, c.decoder_start_token_id)
    x = self.hidden(encoded, encoder_input_tokens, decoder_tokens, encoder_segment_ids,
                    enable_dropout=enable_dropout)  # [batch, length, d_model]
    index = last_eos_index(encoder_input_tokens, c.eos_token_id, c.pad_token_id)
    x = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]  # [batch, d_model]
    return {"logits": self.classification_head(x, not enable_dropout)}


TASKS = {"seq2seq": BartForConditionalGeneration, "base": BartModel,
         "sequence_classification": BartForSequenceClassification}
TASK_NAMES = tuple(TASKS)


def build(config: BartConfig, task: str = "seq2seq", **kwargs) -> nn.Module:
  """The model for `task` (see TASKS); kwargs go to the head (num_labels)."""
  if task not in TASKS:
    raise ValueError(f"unknown BART task {task!r}; choose one of {list(TASKS)}")
  if kwargs and task != "sequence_classification":
    raise ValueError(f"BART {task!r} models take no head arguments, got {sorted(kwargs)}")
  return TASKS[task](config, **kwargs)


def task_of(model: nn.Module) -> str:
  """Inverse of `build`: the task name of a model instance."""
  for name, cls in TASKS.items():
    if type(model) is cls:
      return name
  raise ValueError(f"{type(model).__name__} is not a BART model")
