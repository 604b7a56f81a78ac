"""ModernBERT (Warner et al. 2024) encoders and heads, in Flax Linen.

The architecture of Hugging Face's ModernBert*: a token table (no position
table) with a LayerNorm; pre-norm layers whose attention applies rotary
position embeddings to queries and keys, globally in every
`global_attn_every_n_layers`-th layer (from layer 0, rotary base
global_rope_theta) and within a sliding window elsewhere (a token sees the
tokens at most local_attention // 2 positions away, base local_rope_theta);
a GeGLU MLP; a final LayerNorm. Layer 0 has no attention norm (the embedding
norm precedes it). No biases and bias-free norms by default.

Models take the batch contract's names, as bert.py's do:

    outputs = model.apply(
        {'params': params},
        encoder_input_tokens,          # int32 [batch, length]
        encoder_type_ids=None,         # accepted and ignored (no token-type table)
        encoder_segment_ids=None,      # int32 [batch, length], 1, 2, ... per packed example, 0 = pad
        encoder_positions=None,        # int32 [batch, length], 0-based within each example
        encoder_mask=None,             # [batch, length], 1 = real token, 0 = padding
        mlm_positions=None,            # int32 [batch, max_predictions] (MLM only)
        enable_dropout=False,          # True in training, with rngs={'dropout': key}
    )

  ModernBertModel                      (hidden [batch, length, hidden], None), as
                                       BertModel without a pooler
  ModernBertForMaskedLM                {'mlm_logits'} [batch, max_predictions or length, vocab]
  ModernBertForSequenceClassification  {'logits' [batch, num_labels]}
  ModernBertForTokenClassification     {'logits' [batch, length, num_labels]}
  ModernBertForQuestionAnswering       {'start_logits', 'end_logits'} [batch, length]

Attention mask, built once per kind: with `encoder_segment_ids` (packed rows)
a token attends only within its segment, otherwise to the non-padding keys of
its row (`encoder_mask`, or tokens != pad_token_id); local layers further
keep |query index - key index| <= local_attention // 2. Packed segments
restart their rotary positions through `encoder_positions`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import layers
from bert_jax.models.configs import ModernBertConfig

Array = jax.Array
_ACT = ("act_batch", "act_length", "act_embed")


class LayerNorm(nn.Module):
  """LayerNorm in float32 with an optional bias (ModernBERT's norms have none by default)."""
  epsilon: float = 1e-5
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       features, jnp.float32)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                         features, jnp.float32)
    return y.astype(self.dtype)


def _norm(cfg: ModernBertConfig, name: str) -> LayerNorm:
  return LayerNorm(cfg.norm_eps, cfg.norm_bias, cfg.dtype, name=name)


# ---------------------------------------------------------------- positions


def rotary_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos, sin float32 [batch, length, head_dim] of rotary embeddings at `positions`.

  Frequencies theta^(-2i/d) for i < d/2, repeated for both halves (the
  rotate-half layout of Hugging Face's apply_rotary_pos_emb).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """x [batch, length, heads, head_dim] rotated by cos/sin [batch, length, head_dim]."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[:, :, None] + rotated * sin[:, :, None]).astype(dtype)


def attention_masks(tokens: Array, segment_ids: Array | None, mask: Array | None,
                    pad_token_id: int, local_attention: int) -> tuple[Array, Array]:
  """(global, local) bool masks broadcastable to [batch, heads, q_len, kv_len]."""
  if segment_ids is not None:
    if mask is not None:
      segment_ids = segment_ids * (mask > 0)
    full = layers.segment_mask(segment_ids, segment_ids)  # [batch, 1, q, k]
  else:
    valid = (tokens != pad_token_id) if mask is None else (mask > 0)
    # Key-only, as Hugging Face: padding queries still see real keys (never scored).
    full = valid[:, None, None, :]
  idx = jnp.arange(tokens.shape[1])
  window = jnp.abs(idx[:, None] - idx[None, :]) <= local_attention // 2
  return full, full & window[None, None]


def _valid_tokens(tokens: Array, segment_ids: Array | None, mask: Array | None,
                  pad_token_id: int) -> Array:
  """[batch, length] 1.0 for real tokens (mean pooling's weights)."""
  if mask is not None:
    valid = mask > 0
  elif segment_ids is not None:
    valid = segment_ids > 0
  else:
    valid = tokens != pad_token_id
  return valid.astype(jnp.float32)


# ------------------------------------------------------------------ encoder


class ModernBertAttention(nn.Module):
  """Self-attention with rotary q/k; [embed, heads, kv] projections."""
  config: ModernBertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               deterministic: bool) -> Array:
    """x [batch, length, embed] -> [batch, length, embed]."""
    cfg = self.config
    qkv_axes = ("act_batch", "act_length", "act_heads", "act_kv")
    proj = lambda name: layers.DenseGeneral(  # noqa: E731
        (cfg.num_heads, cfg.head_dim), kernel_axes=("embed", "heads", "kv"),
        use_bias=cfg.attention_bias, dtype=cfg.dtype, name=name)
    # [batch, length, heads, kv]
    query = apply_rotary(proj("query")(x), cos, sin)
    key = apply_rotary(proj("key")(x), cos, sin)
    value = proj("value")(x)
    query, key, value = (nn.with_logical_constraint(t, qkv_axes) for t in (query, key, value))
    use_dropout = cfg.attention_dropout > 0.0 and not deterministic
    h = layers.dot_product_attention(
        query, key, value, mask=mask, dropout_rate=cfg.attention_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=deterministic, dtype=cfg.dtype)
    h = layers.DenseGeneral(cfg.hidden_size, kernel_axes=("heads", "kv", "embed"), axis=(-2, -1),
                            use_bias=cfg.attention_bias, dtype=cfg.dtype, name="out")(h)
    h = layers.Dropout(cfg.attention_dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(h, _ACT)


class ModernBertLayer(nn.Module):
  """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)). Layer 0 has no attention norm."""
  config: ModernBertConfig
  index: int

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               deterministic: bool) -> Array:
    cfg = self.config
    h = x if self.index == 0 else _norm(cfg, "attention_norm")(x)
    x = x + ModernBertAttention(cfg, name="attention")(h, mask, cos, sin, deterministic)
    # GeGLU: wi_0 is Hugging Face's input half (activated), wi_1 its gate half.
    h = layers.Mlp(mlp_dim=cfg.intermediate_size, activations=(cfg.hidden_act, "linear"),
                   use_bias=cfg.mlp_bias, dropout_rate=cfg.mlp_dropout, dtype=cfg.dtype,
                   name="mlp")(_norm(cfg, "mlp_norm")(x), deterministic=deterministic)
    # [batch, length, embed]
    return nn.with_logical_constraint(x + h, _ACT)


class ModernBertEncoder(nn.Module):
  """Token embeddings + norm, num_layers blocks, final norm."""
  config: ModernBertConfig

  def setup(self):
    cfg = self.config
    self.embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"))
    self.embeddings_norm = _norm(cfg, "embeddings_norm")
    # `deterministic` (argument 6, counting self) is a Python value: static under remat.
    block = nn.remat(ModernBertLayer, static_argnums=(5,)) if cfg.remat else ModernBertLayer
    self.layers = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = _norm(cfg, "final_norm")
    self.embeddings_dropout = layers.Dropout(cfg.embedding_dropout)

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, encoder_mask: Array | None = None,
               enable_dropout: bool = False) -> Array:
    """Returns the last hidden state [batch, length, hidden] (after the final norm)."""
    cfg = self.config
    tokens = encoder_input_tokens
    deterministic = not enable_dropout
    if tokens.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                 if encoder_positions is None else encoder_positions)
    global_mask, local_mask = attention_masks(tokens, encoder_segment_ids, encoder_mask,
                                              cfg.pad_token_id, cfg.local_attention)
    rotary = {True: rotary_tables(positions, cfg.head_dim, cfg.global_rope_theta),
              False: rotary_tables(positions, cfg.head_dim, cfg.local_rope_theta)}
    x = self.embeddings_norm(self.embeddings(tokens))
    x = self.embeddings_dropout(x, deterministic=deterministic)
    # (The classifier heads call it on pooled [batch, embed] rows.)
    x = nn.with_logical_constraint(x, _ACT if x.ndim == 3 else ("act_batch", "act_embed"))  # [batch, length, embed]
    for i, layer in enumerate(self.layers):
      kind = cfg.is_global(i)
      x = layer(x, global_mask if kind else local_mask, *rotary[kind], deterministic)
    return self.final_norm(x)

  def attend(self, x: Array) -> Array:
    """x [..., embed] -> logits [..., vocab] against the token table (tied MLM output)."""
    table = self.embeddings.embedding.astype(self.config.dtype)
    return jnp.einsum("...e,ve->...v", x.astype(self.config.dtype), table)


# -------------------------------------------------------------------- heads


class PredictionHead(nn.Module):
  """Hugging Face's ModernBertPredictionHead: dense, activation, norm."""
  config: ModernBertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    # [embed, embed] kernels name their output 'mlp': one logical name may not repeat.
    x = layers.DenseGeneral(cfg.hidden_size, kernel_axes=("embed", "mlp"),
                            use_bias=cfg.classifier_bias, dtype=cfg.dtype, name="dense")(x)
    # Pinned to the batch layout before the nonlinearity (see bert.MlmHead).
    # (The classifier heads call it on pooled [batch, embed] rows.)
    x = nn.with_logical_constraint(x, _ACT if x.ndim == 3 else ("act_batch", "act_embed"))
    x = layers.get_activation(cfg.classifier_activation)(x)
    return _norm(cfg, "norm")(x)


class MlmHead(nn.Module):
  """The prediction head, then logits tied to the token table (+ bias when decoder_bias)."""
  config: ModernBertConfig

  @nn.compact
  def __call__(self, hidden: Array, encoder: ModernBertEncoder) -> Array:
    """hidden [batch, n, embed] -> logits [batch, n, vocab]."""
    cfg = self.config
    x = PredictionHead(cfg, name="head")(hidden)
    logits = encoder.attend(x)
    if cfg.decoder_bias:
      bias = self.param("output_bias",
                        nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), jnp.float32)
      logits = layers.add_bias(logits, bias.astype(logits.dtype))
    return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


def _classifier(num_labels: int, dtype, name: str) -> layers.DenseGeneral:
  return layers.DenseGeneral(num_labels, kernel_axes=("embed", "classes"), dtype=dtype,
                             name=name)


class _TaskModel(nn.Module):
  """The calling convention every ModernBERT model shares; subclasses define `head`."""
  config: ModernBertConfig

  def _encode(self, tokens, segment_ids, positions, mask, enable_dropout):
    encoder = ModernBertEncoder(self.config, name="encoder")
    hidden = encoder(tokens, encoder_segment_ids=segment_ids, encoder_positions=positions,
                     encoder_mask=mask, enable_dropout=enable_dropout)
    return encoder, hidden

  def _head(self, x: Array, enable_dropout: bool) -> Array:
    """prediction head -> classifier dropout (the task heads' shared start)."""
    x = PredictionHead(self.config, name="head")(x)
    return layers.Dropout(self.config.classifier_dropout)(x, deterministic=not enable_dropout)


class ModernBertModel(_TaskModel):
  """The bare encoder as a task model: returns (hidden, None), as BertModel without a pooler.

  Its parameters live under 'encoder', as in every head, so pre-trained
  encoder weights move between tasks as `params['encoder']`.
  """

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> tuple[Array, None]:
    del encoder_type_ids, mlm_positions  # accepted so every model takes the same batch
    _, hidden = self._encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                             encoder_mask, enable_dropout)
    return hidden, None


class ModernBertForMaskedLM(_TaskModel):
  """Masked language model; with `mlm_positions` the head runs only at those positions."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del encoder_type_ids
    encoder, hidden = self._encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                                   encoder_mask, enable_dropout)
    if mlm_positions is not None:  # [batch, max_predictions, embed]
      hidden = jnp.take_along_axis(hidden, mlm_positions[:, :, None].astype(jnp.int32), axis=1)
    return {"mlm_logits": MlmHead(self.config, name="mlm")(hidden, encoder)}


class ModernBertForSequenceClassification(_TaskModel):
  """Pooling ('cls' or 'mean', config.classifier_pooling), head, dropout, classifier."""
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del encoder_type_ids, mlm_positions
    cfg = self.config
    _, hidden = self._encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                             encoder_mask, enable_dropout)
    if cfg.classifier_pooling == "cls":
      pooled = hidden[:, 0]
    else:
      weights = _valid_tokens(encoder_input_tokens, encoder_segment_ids, encoder_mask,
                              cfg.pad_token_id)  # [batch, length]
      total = jnp.einsum("bl,ble->be", weights, hidden.astype(jnp.float32))
      pooled = (total / jnp.sum(weights, axis=1, keepdims=True)).astype(cfg.dtype)
    x = self._head(pooled, enable_dropout)  # [batch, embed]
    return {"logits": _classifier(self.num_labels, cfg.dtype, "classifier")(x)}


class ModernBertForTokenClassification(_TaskModel):
  """Per-token labels (NER): head, dropout, classifier at every token."""
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del encoder_type_ids, mlm_positions
    _, hidden = self._encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                             encoder_mask, enable_dropout)
    x = self._head(hidden, enable_dropout)  # [batch, length, embed]
    return {"logits": _classifier(self.num_labels, self.config.dtype, "classifier")(x)}


class ModernBertForQuestionAnswering(_TaskModel):
  """Extractive QA: head, dropout, then start and end logits per token."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del encoder_type_ids, mlm_positions
    _, hidden = self._encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                             encoder_mask, enable_dropout)
    x = self._head(hidden, enable_dropout)
    logits = _classifier(2, self.config.dtype, "classifier")(x)  # [batch, length, 2]
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


# Task name -> model class, for the converter and the trainers.
TASKS = {
    "encoder": ModernBertModel,
    "mlm": ModernBertForMaskedLM,
    "sequence_classification": ModernBertForSequenceClassification,
    "token_classification": ModernBertForTokenClassification,
    "question_answering": ModernBertForQuestionAnswering,
}
TASK_NAMES = tuple(TASKS)


def task_class(task: str) -> type[nn.Module]:
  """The model class of `task` (one of TASK_NAMES)."""
  if task not in TASKS:
    raise ValueError(f"unknown ModernBERT task {task!r}; choose one of {list(TASK_NAMES)}")
  return TASKS[task]


def build(config: ModernBertConfig, task: str = "encoder", **kwargs) -> nn.Module:
  """The model for `task` (see TASKS); kwargs go to the head (num_labels)."""
  return task_class(task)(config, **kwargs)


def task_of(model: nn.Module) -> str:
  """Inverse of `build`: the task name of a model instance."""
  for name, cls in TASKS.items():
    if type(model) is cls:
      return name
  raise ValueError(f"{type(model).__name__} is not a ModernBERT model")
