"""T5 encoder-decoder (v1.0 and v1.1) with packing and cached decoding.

Calling convention (all token arrays int32, padding id 0):

    model = T5Model(T5Config.preset("t5_v1_1_small"))
    params = model.init(rng, enc_tokens, dec_tokens)["params"]
    logits = model.apply({"params": params}, enc_tokens, dec_tokens)  # [b, dec_len, vocab]

`decoder_input_tokens` are the targets shifted right, starting with
`decoder_start_token_id` (0, the same id as padding: that is why the decoder
never derives a padding mask from its input tokens; it is causal, plus
segment masks when packed, and padded positions are ignored by the loss).

Packed batches pass `encoder_segment_ids`/`decoder_segment_ids` (1, 2, ... per
example, 0 for padding) and `encoder_positions`/`decoder_positions` (restart at
0 for each example); relative positions are then taken from the positions, so a
packed example gives the same logits as when alone.

Incremental decoding (t5x style):

    encoded = model.apply({"params": p}, enc_tokens, method=T5Model.encode)
    # Allocate the cache: a [batch, max_decode_length] shape, decode=True.
    cache = model.init(rng, enc_tokens, jnp.zeros((b, max_len), jnp.int32),
                       decode=True)["cache"]
    # Project the encoder output to each layer's cross-attention keys/values once.
    cross = model.apply({"params": p}, encoded, method=T5Model.prefill_cross,
                        mutable=["cross_cache"])[1]["cross_cache"]
    for each step:   # dec_token: [batch, 1]
      logits, vars = model.apply({"params": p, "cache": cache, "cross_cache": cross},
                                 None, enc_tokens, dec_token, decode=True,
                                 method=T5Model.decode, mutable=["cache"])
      cache = vars["cache"]

Step i's logits equal position i of the teacher-forced forward pass. The
cache holds max_length steps; a step beyond it is not detected inside jit
(the write index is clamped), so callers stop at max_length. A step may
also pass `encoded` instead of None (no prefill): the same logits, but every
step projects the encoder output again.
`T5EncoderModel` is the encoder half alone (same parameter names, so it loads
the `shared` and `encoder` subtrees of a full checkpoint) and returns hidden
states [batch, length, d_model].
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import layers
from bert_jax.models.configs import T5Config

Array = jax.Array

# ---------------------------------------------------------------------------
# Relative position bias.
# ---------------------------------------------------------------------------
def relative_position_bucket(relative_position: Array, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucket of `relative_position` = memory position - query position.

  Half the buckets (per direction when bidirectional) hold exact small
  distances, the rest logarithmically wider bins up to `max_distance`; beyond
  it everything shares the last bucket. Causal attention only ever looks back,
  so there all positive distances fall into bucket 0.
  """
  relative_position = jnp.asarray(relative_position)
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # float32 log, truncated like the reference; max() keeps log(0) out of the graph.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(distance.dtype), num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """One learnt scalar per (bucket, head), added to every layer's attention logits."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """[batch, q], [batch, k] positions -> bias [batch, heads, q, k]."""
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("relpos_buckets", "heads")),
        (self.num_buckets, self.num_heads), jnp.float32)
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [batch, q, k]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = jnp.take(table, buckets, axis=0)  # [batch, q, k, heads]
    return jnp.transpose(bias, (0, 3, 1, 2)).astype(self.dtype)


# ---------------------------------------------------------------------------
# Attention with an optional key/value cache.
# ---------------------------------------------------------------------------
def _kernel_init(scale: float, in_axis, out_axis):
  return nn.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=in_axis,
                                          out_axis=out_axis)


class T5Attention(nn.Module):
  """Multi-head attention without biases or logit scaling, with a t5x-style cache.

  The 1/sqrt(d_kv) that other models apply to the logits is folded into the
  query initialisation instead (Mesh TensorFlow), so checkpoints use scale 1.

  With decode=True the first call (at init, on the full [batch, max_length]
  shape) creates `cached_key`/`cached_value`/`cache_index` in the 'cache'
  collection; later calls take one query token, write its key/value at
  `cache_index` and attend to every cached position up to it.

  Cross-attention decoding keeps the projected encoder output instead, in
  its own 'cross_cache' collection (the loop reads it but never updates it,
  so beam search neither carries nor reorders it): a call with inputs_q=None
  stores the keys/values of `inputs_kv` there as `cached_key`/`cached_value`
  [batch, kv_len, heads, kv] (the prefill); a call with inputs_kv=None attends
  to them, so decode steps do not project the encoder output again.
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
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init: run on the full shape, cache stays empty
      return key, value, None
    if key.shape[1] != 1:
      raise ValueError(f"{self.name}: decode=True takes one token per call, got {key.shape[1]}")
    i = cache_index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (0, i, 0, 0))
    value = jax.lax.dynamic_update_slice(cached_value.value,
                                         value.astype(cached_value.value.dtype), (0, i, 0, 0))
    cached_key.value, cached_value.value = key, value
    cache_index.value = i + 1
    mask = (jnp.arange(key.shape[1]) <= i)[None, None, None, :]  # [1, 1, 1, max_length]
    return key, value, mask

  @nn.compact
  def __call__(self, inputs_q: Array | None, inputs_kv: Array | None, *,
               mask: Array | None = None, bias: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array | None:
    """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed] -> [batch, q_len, embed].

    Cross-attention decoding: inputs_q=None stores the projected inputs_kv
    (returns None), inputs_kv=None reads them (see the class docstring).
    """
    proj = functools.partial(layers.DenseGeneral, features=(self.num_heads, self.head_dim),
                             kernel_axes=("embed", "heads", "kv"), use_bias=False,
                             dtype=self.dtype)
    qkv_init = functools.partial(_kernel_init, in_axis=0, out_axis=(1, 2))
    # [batch, length, heads, kv]
    axes = ("act_batch", "act_length", "act_heads", "act_kv")
    key = value = None
    if inputs_kv is not None:
      key = nn.with_logical_constraint(
          proj(kernel_init=qkv_init(1.0), name="key")(inputs_kv), axes)
      value = nn.with_logical_constraint(
          proj(kernel_init=qkv_init(1.0), name="value")(inputs_kv), axes)
    if inputs_q is None or inputs_kv is None:
      key, value = layers.cross_kv_cache(self, key, value)
      if inputs_q is None:  # the prefill: keys/values stored, nothing to attend
        return None
    query = proj(kernel_init=qkv_init(1.0 / self.head_dim), name="query")(inputs_q)
    query = nn.with_logical_constraint(query, axes)
    if decode:
      key, value, cache_mask = self._cached(key, value)
      if cache_mask is not None:
        mask = cache_mask if mask is None else mask & cache_mask
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    x = layers.dot_product_attention(
        query, key, value, mask=mask, bias=bias, scale=1.0, dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng, deterministic=deterministic, dtype=self.dtype)
    # [batch, q_len, heads, kv] -> [batch, q_len, embed]
    out = layers.DenseGeneral(
        features=inputs_q.shape[-1], kernel_axes=("heads", "kv", "embed"), axis=(-2, -1),
        use_bias=False, kernel_init=_kernel_init(1.0, (0, 1), 2), dtype=self.dtype, name="out")(x)
    return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_embed"))


# ---------------------------------------------------------------------------
# Layers and stacks.
# ---------------------------------------------------------------------------
_ACT = ("act_batch", "act_length", "act_embed")


def _norm(c: T5Config, name: str) -> nn.Module:
  return layers.RMSNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name=name)


def _attention(c: T5Config, name: str) -> nn.Module:
  return T5Attention(c.num_heads, c.d_kv, c.dropout_rate, c.dtype, name=name)


def _mlp(c: T5Config) -> nn.Module:
  return layers.Mlp(c.d_ff, c.activations, use_bias=False, dropout_rate=c.dropout_rate,
                    kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                    dtype=c.dtype, name="mlp")


class EncoderLayer(nn.Module):
  """Pre-norm self-attention then MLP, each added back to the residual stream."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool) -> Array:
    """x [batch, length, d_model] -> [batch, length, d_model]."""
    c = self.config
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    h = _norm(c, "pre_attention_norm")(x)
    x = x + drop(_attention(c, "attention")(h, h, mask=mask, bias=bias,
                                            deterministic=deterministic))
    x = x + drop(_mlp(c)(_norm(c, "pre_mlp_norm")(x), deterministic))
    return nn.with_logical_constraint(x, _ACT)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention to the encoder, MLP; all pre-norm."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array | None, encoded: Array | None, self_mask: Array | None,
               self_bias: Array | None, cross_mask: Array | None, deterministic: bool,
               decode: bool) -> Array | None:
    """x [batch, dec_len, d_model], encoded [batch, enc_len, d_model] -> like x.

    Cached decoding: x=None only stores the cross-attention keys/values of
    `encoded` (the prefill); encoded=None reads them.
    """
    c = self.config
    cross = _attention(c, "encoder_decoder_attention")
    if x is None:
      return cross(None, encoded)
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    h = _norm(c, "pre_self_attention_norm")(x)
    x = x + drop(_attention(c, "self_attention")(
        h, h, mask=self_mask, bias=self_bias, deterministic=deterministic, decode=decode))
    h = _norm(c, "pre_cross_attention_norm")(x)
    # No position bias across the two sequences: only self-attention has one.
    x = x + drop(cross(h, encoded, mask=cross_mask, deterministic=deterministic))
    x = x + drop(_mlp(c)(_norm(c, "pre_mlp_norm")(x), deterministic))
    return nn.with_logical_constraint(x, _ACT)


def _default_positions(tokens: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Encoder(nn.Module):
  """Embedding -> layers sharing one bidirectional position bias -> final norm."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    """tokens [batch, length] -> encoded [batch, length, d_model]."""
    c = self.config
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    if segment_ids is None:
      segment_ids = (tokens != c.pad_token_id).astype(jnp.int32)
    if positions is None:
      positions = _default_positions(tokens)
    mask = layers.segment_mask(segment_ids, segment_ids)  # [batch, 1, length, length]
    bias = RelativePositionBias(c.relative_attention_num_buckets,
                                c.relative_attention_max_distance, c.num_heads,
                                bidirectional=True, dtype=c.dtype,
                                name="relpos_bias")(positions, positions)
    x = drop(self.shared_embedding(tokens))  # [batch, length, d_model]
    x = nn.with_logical_constraint(x, _ACT)
    for i in range(c.num_encoder_layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, mask, bias, deterministic)
    return drop(_norm(c, "final_norm")(x))


class Decoder(nn.Module):
  """Embedding -> layers sharing one causal position bias -> final norm.

  With decode=True it keeps `cached_positions` [batch, max_length] and
  `cache_index` in the 'cache' collection, so the position bias of a single
  query token can be computed against every cached key. tokens=None is the
  prefill: every layer stores its cross-attention keys/values of `encoded`
  ('cross_cache' collection), which steps with encoded=None then read.
  """
  config: T5Config
  shared_embedding: nn.Module

  def _step_positions(self, tokens: Array, positions: Array | None):
    """Decode mode: (query positions, key positions, is_step); is_step False at init."""
    initialized = self.has_variable("cache", "cached_positions")
    cached = self.variable("cache", "cached_positions", jnp.zeros, tokens.shape, jnp.int32)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None, None, False
    i = index.value
    query = jnp.full(tokens.shape, i, jnp.int32) if positions is None else positions
    keys = jax.lax.dynamic_update_slice(cached.value, query.astype(jnp.int32), (0, i))
    cached.value = keys
    index.value = i + 1
    return query, keys, True

  @nn.compact
  def __call__(self, encoded: Array | None, encoder_segment_ids: Array | None,
               tokens: Array | None, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array | None:
    """encoded [batch, enc_len, d_model], tokens [batch, dec_len] -> [batch, dec_len, d_model].

    `encoder_segment_ids` are the encoder's segments (its padding mask when
    unpacked); cross-attention pairs decoder and encoder segments.
    """
    c = self.config
    if tokens is None:  # the prefill
      for i in range(c.num_decoder_layers):
        DecoderLayer(c, name=f"layers_{i}")(None, encoded, None, None, None, True, False)
      return None
    drop = functools.partial(layers.Dropout(c.dropout_rate), deterministic=deterministic)
    is_step = False
    if decode:
      query_pos, key_pos, is_step = self._step_positions(tokens, positions)
    if is_step:
      self_mask = None  # the attention cache masks positions not yet written
    else:
      query_pos = key_pos = _default_positions(tokens) if positions is None else positions
      self_mask = layers.causal_mask(tokens.shape[1])
      if segment_ids is not None:
        self_mask = self_mask & layers.segment_mask(segment_ids, segment_ids)
    query_segments = (jnp.ones(tokens.shape, jnp.int32) if segment_ids is None
                      else segment_ids)
    cross_mask = layers.segment_mask(query_segments, encoder_segment_ids)
    bias = RelativePositionBias(c.relative_attention_num_buckets,
                                c.relative_attention_max_distance, c.num_heads,
                                bidirectional=False, dtype=c.dtype,
                                name="relpos_bias")(query_pos, key_pos)
    x = drop(self.shared_embedding(tokens))  # [batch, dec_len, d_model]
    x = nn.with_logical_constraint(x, _ACT)
    for i in range(c.num_decoder_layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, encoded, self_mask, bias, cross_mask,
                                              deterministic, decode)
    return drop(_norm(c, "final_norm")(x))


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------
def _embedding(c: T5Config) -> layers.Embed:
  return layers.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(1.0),
                      dtype=c.dtype, name="shared")


def _encoder_segments(c: T5Config, tokens: Array, segment_ids: Array | None) -> Array:
  return (tokens != c.pad_token_id).astype(jnp.int32) if segment_ids is None else segment_ids


class T5Model(nn.Module):
  """T5 encoder-decoder returning vocabulary logits; see the module docstring."""
  config: T5Config

  def setup(self):
    c = self.config
    self.shared = _embedding(c)
    self.encoder = Encoder(c, self.shared)
    self.decoder = Decoder(c, self.shared)
    if not c.tie_word_embeddings:
      self.logits_dense = layers.DenseGeneral(
          c.vocab_size, kernel_axes=("embed", "vocab"), use_bias=False,
          kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
          dtype=c.dtype)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, enable_dropout: bool = False) -> Array:
    """encoder_input_tokens [batch, enc_len] -> encoded [batch, enc_len, d_model]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic=not enable_dropout)

  def prefill_cross(self, encoded: Array) -> None:
    """Decode mode: stores every decoder layer's cross-attention keys/values of `encoded`.

    encoded [batch, enc_len, d_model]; call with mutable=['cross_cache'] and
    pass the collection it returns to the decode steps, which take
    encoded=None (the projection then runs once, not once per step).
    """
    self.decoder(encoded, None, None)

  def decode(self, encoded: Array | None, encoder_input_tokens: Array,
             decoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = False, decode: bool = False) -> Array:
    """Decoder + logits: [batch, dec_len] tokens -> float32 logits [batch, dec_len, vocab].

    With decode=True call it with mutable=['cache'] and one token per call
    (after allocating the cache, see the module docstring); encoded=None
    reads the cross-attention keys/values stored by `prefill_cross`.
    """
    c = self.config
    enc_segments = _encoder_segments(c, encoder_input_tokens, encoder_segment_ids)
    x = self.decoder(encoded, enc_segments, decoder_input_tokens, decoder_segment_ids,
                     decoder_positions, deterministic=not enable_dropout, decode=decode)
    if c.tie_word_embeddings:
      # The embedding has unit-scale rows; rescaling keeps tied logits O(1).
      logits = self.shared.attend(x * (c.d_model ** -0.5))
    else:
      logits = self.logits_dense(x)
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
    return logits.astype(jnp.float32)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """Teacher-forced forward pass -> float32 logits [batch, dec_len, vocab].

    decode=True here only serves `init` to allocate the cache on the
    decoder input's [batch, max_length] shape.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, enable_dropout, decode)


class T5EncoderModel(nn.Module):
  """The T5 encoder alone: tokens -> hidden states [batch, length, d_model].

  Its parameters ('shared', 'encoder') are the same subtrees as T5Model's.
  """
  config: T5Config

  def setup(self):
    self.shared = _embedding(self.config)
    self.encoder = Encoder(self.config, self.shared)

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, enable_dropout: bool = False) -> Array:
    """encoder_input_tokens [batch, length] -> [batch, length, d_model] (computation dtype)."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic=not enable_dropout)


TASKS = {"seq2seq": T5Model, "encoder": T5EncoderModel}


def build(config: T5Config, task: str = "seq2seq", **kwargs) -> nn.Module:
  """The model for `task` ('seq2seq': encoder-decoder, 'encoder': the encoder alone)."""
  if task not in TASKS:
    raise ValueError(f"unknown T5 task {task!r}; choose one of {list(TASKS)}")
  if kwargs:
    raise ValueError(f"T5 {task!r} models take no head arguments, got {sorted(kwargs)}")
  return TASKS[task](config)
