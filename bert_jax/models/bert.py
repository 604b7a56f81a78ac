"""BERT-family encoders (BERT, RoBERTa, ALBERT, ELECTRA, DistilBERT) and heads, in Flax Linen.

Every module here takes the same inputs, named by the batch contract:

    outputs = model.apply(
        {'params': params},
        encoder_input_tokens,          # int32 [batch, length]
        encoder_type_ids=None,         # int32 [batch, length], segment A/B (0/1); default 0
        encoder_segment_ids=None,      # int32 [batch, length], 1, 2, ... per packed example, 0 = pad
        encoder_positions=None,        # int32 [batch, length], 0-based within each example
        encoder_mask=None,             # [batch, length], 1 = real token, 0 = padding
        mlm_positions=None,            # int32 [batch, max_predictions] (MLM heads only)
        enable_dropout=False,          # True in training, with rngs={'dropout': key}
    )

`BertEncoder` returns `(hidden, pooled)`: hidden [batch, length, hidden] and
pooled [batch, hidden] = tanh(dense(hidden[:, 0])) (None when the encoder has
no pooler, as RoBERTa's task models). Heads return dicts:

  BertForPreTraining             {'mlm_logits', 'nsp_logits' [batch, 2]}
  BertForMaskedLM                {'mlm_logits'}
  BertForMaskedLMWithSbo         {'mlm_logits', 'sbo_logits' [batch, max_predictions, vocab]}
                                 (SpanBERT; also takes sbo_left/right_positions)
  BertForSequenceClassification  {'logits' [batch, num_labels]} (num_labels=1: regression)
  BertForTokenClassification     {'logits' [batch, length, num_labels]}
  BertForQuestionAnswering       {'start_logits', 'end_logits'} [batch, length]

`mlm_logits` is [batch, max_predictions, vocab] when `mlm_positions` is given
(the hidden states are gathered first, so the vocabulary matmul runs only
there, as original BERT does) and [batch, length, vocab] otherwise.

ALBERT is an option of the same modules: `embedding_size` factorises the
embeddings (and the MLM head) and `share_layers` applies one layer's
parameters (or one sub-block's) in every layer; see BertConfig.

Attention mask: with `encoder_segment_ids` (packed rows) a token attends only
to tokens of its own segment; otherwise to the non-padding keys of its row,
given by `encoder_mask` or, when both are None, by tokens != pad_token_id.
"""
from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import configs
from bert_jax.models import layers
from bert_jax.models.configs import BertConfig

Array = jax.Array


def _attention_mask(tokens: Array, segment_ids: Array | None, mask: Array | None,
                    pad_token_id: int) -> Array:
  """bool mask broadcastable to [batch, heads, q_len, kv_len]."""
  if segment_ids is not None:
    if mask is not None:
      segment_ids = segment_ids * (mask > 0)
    return layers.segment_mask(segment_ids, segment_ids)
  valid = (tokens != pad_token_id) if mask is None else (mask > 0)
  # Key-only mask: padding queries still attend to the real tokens (as HF
  # does), so their outputs stay finite and comparable; they are never scored.
  return valid[:, None, None, :]


def _default_positions(tokens: Array, config: BertConfig) -> Array:
  """Position-table rows when the batch gives no positions (see BertConfig)."""
  if config.position_offset == 0:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  valid = (tokens != config.pad_token_id).astype(jnp.int32)
  return jnp.where(valid > 0, jnp.cumsum(valid, axis=1) - 1 + config.position_offset,
                   config.pad_token_id)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout.

  With `embedding_size` set (ALBERT) the tables and the LayerNorm are that
  wide and a dense `projection` maps the result up to hidden_size, after the
  dropout, as Hugging Face's `embedding_hidden_mapping_in` does.
  """
  config: BertConfig

  def setup(self):
    cfg = self.config
    embed = lambda n, axes: layers.Embed(n, cfg.embed_dim, axes=axes)
    self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(cfg.max_position_embeddings, ("position", "embed"))
    if cfg.type_vocab_size:  # 0: no table (DistilBERT); type ids are then ignored
      self.token_type_embeddings = embed(cfg.type_vocab_size, ("type", "embed"))
    self.layer_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype)
    self.dropout = layers.Dropout(cfg.dropout_rate)
    if cfg.embedding_size:
      self.projection = _square_dense(cfg.hidden_size, cfg.dtype, "projection")

  def __call__(self, tokens: Array, type_ids: Array, position_rows: Array,
               deterministic: bool, tables: "BertEmbeddings | None" = None) -> Array:
    """[batch, length] ids -> [batch, length, hidden].

    `tables`: another BertEmbeddings whose tables and LayerNorm to read
    (ELECTRA's generator shares the discriminator's); this module then owns
    only its dropout and its projection.
    """
    src = self if tables is None else tables
    # Summed in float32: the tables are float32 and the LayerNorm follows.
    x = src.word_embeddings(tokens) + src.position_embeddings(position_rows)
    if self.config.type_vocab_size:
      x = x + src.token_type_embeddings(type_ids)
    x = self.dropout(src.layer_norm(x), deterministic=deterministic)
    if self.config.embedding_size:
      x = self.projection(x)  # [batch, length, embedding_size] -> [batch, length, hidden]
    # [batch, length, embed]
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def attend(self, x: Array) -> Array:
    """x [..., embed] -> logits [..., vocab] against the word embedding (tied MLM output)."""
    table = self.word_embeddings.embedding.astype(self.config.dtype)
    return jnp.einsum("...e,ve->...v", x.astype(self.config.dtype), table)


class BertLayer(nn.Module):
  """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x)).

  `part` runs one sub-block only ('attention' or 'ffn'; 'all' runs both):
  cross-layer sharing calls layer 0 for the shared sub-block and each layer
  for its own, so a sub-block's parameters exist only where it is called.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool, part: str = "all") -> Array:
    cfg = self.config
    if part in ("all", "attention"):
      h = layers.MultiHeadAttention(
          num_heads=cfg.num_heads, head_dim=cfg.head_dim,
          dropout_rate=cfg.attention_dropout_rate, dtype=cfg.dtype, name="attention")(
              x, x, mask=mask, deterministic=deterministic)
      if cfg.model_type != "distilbert":  # DistilBERT adds its attention output undropped
        h = layers.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
      x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="attention_norm")(x + h)
    if part in ("all", "ffn"):
      # BERT drops out only the MLP output, not its hidden layer (Mlp's own dropout).
      h = layers.Mlp(mlp_dim=cfg.intermediate_size, activations=(cfg.hidden_act,),
                     dtype=cfg.dtype, name="mlp")(x, deterministic=deterministic)
      h = layers.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
      x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="mlp_norm")(x + h)
    # [batch, length, embed]
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


def _square_dense(features: int, dtype, name: str) -> layers.DenseGeneral:
  # [embed, embed] kernels (also hidden <-> embedding_size under ALBERT) name
  # their output 'mlp': one logical name may not appear twice in a kernel
  # (both would map to the same mesh axis).
  return layers.DenseGeneral(features, kernel_axes=("embed", "mlp"), dtype=dtype, name=name)


class BertEncoder(nn.Module):
  """Embeddings, `num_layers` blocks and (optionally) the pooler.

  Attributes:
    config: the BertConfig.
    add_pooler: build the pooler (BertModel, pre-training, BERT classification).
  """
  config: BertConfig
  add_pooler: bool = True

  def setup(self):
    cfg = self.config
    self.embeddings = BertEmbeddings(cfg)
    # `deterministic` and `part` (arguments 3 and 4, counting self) are Python
    # values: static under remat.
    block = nn.remat(BertLayer, static_argnums=(3, 4)) if cfg.remat else BertLayer
    # share_layers='all' stores one layer, applied num_layers times.
    stored = 1 if cfg.share_layers == "all" else cfg.num_layers
    self.layers = [block(cfg, name=f"layer_{i}") for i in range(stored)]
    if self.add_pooler:
      self.pooler = _square_dense(self.config.hidden_size, self.config.dtype, "pooler")

  def __call__(self, encoder_input_tokens: Array, encoder_type_ids: Array | None = None,
               encoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               encoder_mask: Array | None = None, enable_dropout: bool = False,
               embeddings_from: "BertEncoder | None" = None) -> tuple[Array, Array | None]:
    """Returns (hidden [batch, length, hidden], pooled [batch, hidden] or None).

    `embeddings_from`: an encoder whose embedding tables this one reads
    instead of its own (ELECTRA's generator and discriminator share them).
    """
    cfg = self.config
    tokens = encoder_input_tokens
    deterministic = not enable_dropout
    # An out-of-range position would read NaN (jnp.take fills), not fail: check here.
    if tokens.shape[1] + cfg.position_offset > cfg.max_position_embeddings:
      raise ValueError(
          f"sequence length {tokens.shape[1]} exceeds the model's "
          f"{cfg.max_position_embeddings - cfg.position_offset} positions "
          f"(max_position_embeddings={cfg.max_position_embeddings}, "
          f"position_offset={cfg.position_offset})")
    type_ids = jnp.zeros_like(tokens) if encoder_type_ids is None else encoder_type_ids
    if encoder_positions is None:
      rows = _default_positions(tokens, cfg)
    else:
      rows = encoder_positions + cfg.position_offset
    mask = _attention_mask(tokens, encoder_segment_ids, encoder_mask, cfg.pad_token_id)
    tables = None if embeddings_from is None else embeddings_from.embeddings
    x = self.embeddings(tokens, type_ids, rows, deterministic, tables)  # [batch, length, embed]
    x = self._apply_layers(x, mask, deterministic)
    pooled = jnp.tanh(self.pooler(x[:, 0])) if self.add_pooler else None
    return x, pooled

  def _apply_layers(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """num_layers blocks over x [batch, length, embed], sharing as config.share_layers says."""
    share = self.config.share_layers
    for i in range(self.config.num_layers):
      if share in ("none", "all"):
        x = self.layers[0 if share == "all" else i](x, mask, deterministic, "all")
        continue
      # One sub-block from layer 0 (shared), the other from layer i (its own).
      for part in ("attention", "ffn"):
        x = self.layers[0 if part == share else i](x, mask, deterministic, part)
    return x

  def attend(self, x: Array) -> Array:
    """Logits against the word embedding, for tied MLM heads."""
    return self.embeddings.attend(x)


def _tied_logits(head: nn.Module, encoder: "BertEncoder", x: Array) -> Array:
  """[batch, n, vocab] logits of x through the word embedding table plus the head's bias."""
  logits = encoder.attend(x)  # [batch, n, vocab]
  bias = head.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                    (head.config.vocab_size,), jnp.float32)
  logits = layers.add_bias(logits, bias.astype(logits.dtype))
  return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


class MlmHead(nn.Module):
  """dense + activation + LayerNorm, then logits tied to the word embedding + bias.

  With factorised embeddings (ALBERT) the dense maps hidden_size down to
  embedding_size, the width of the tied table.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array, encoder: BertEncoder) -> Array:
    """hidden [batch, n, embed] -> logits [batch, n, vocab]."""
    cfg = self.config
    x = _square_dense(cfg.embed_dim, cfg.dtype, "transform")(hidden)  # [batch, n, embed_dim]
    # Pin the transform's output to the batch layout before the nonlinearity.
    # Left to the partitioner, fsdp_tensor keeps it split over 'tensor' and
    # XLA (jax 0.10.2, CPU SPMD) then computes a WRONG gradient of the
    # transform kernel through the tied projection (tests/test_steps.py has
    # the minimal repro, still failing without this constraint).
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    # ELECTRA's generator head uses exact GELU whatever the encoder's activation.
    act = "gelu" if cfg.model_type == "electra" else cfg.hidden_act
    x = layers.get_activation(act)(x)
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="transform_norm")(x)
    return _tied_logits(self, encoder, x)


def _gather(hidden: Array, positions: Array) -> Array:
  """hidden [batch, length, embed], positions [batch, n] -> [batch, n, embed]."""
  return jnp.take_along_axis(hidden, positions[:, :, None].astype(jnp.int32), axis=1)


def _mlm_logits(head: MlmHead, encoder: BertEncoder, hidden: Array,
                mlm_positions: Array | None) -> Array:
  if mlm_positions is not None:
    hidden = _gather(hidden, mlm_positions)  # [batch, max_predictions, embed]
  return head(hidden, encoder)


def sbo_relative_positions(mlm_positions: Array, sbo_left_positions: Array) -> Array:
  """i - s: 0-based index of each prediction slot's token within its span (p_{i-s+1})."""
  return mlm_positions.astype(jnp.int32) - sbo_left_positions.astype(jnp.int32) - 1


class SboHead(nn.Module):
  """SpanBERT's span boundary objective head (Joshi et al. 2020, section 3.2).

  Predicts token x_i of a span (s..e) from the boundary states x_{s-1},
  x_{e+1} and a position embedding p_{i-s+1}:
    h = LN(act(W2 . LN(act(W1 . [x_{s-1}; x_{e+1}; p]))))
  then logits tied to the word embedding plus the head's own bias (the
  reference's BertPairTargetPredictionHead / MLPWithLayerNorm). W1 is stored
  as three kernels (left, right, position) whose sum is W1 applied to the
  concatenation: each then has a clean logical layout.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array, left: Array, right: Array, relative: Array,
               encoder: BertEncoder) -> Array:
    """hidden [batch, length, embed]; left/right/relative int [batch, n] -> [batch, n, vocab]."""
    cfg = self.config
    act = layers.get_activation(cfg.hidden_act)
    table = layers.Embed(configs.SBO_MAX_TARGETS, configs.SBO_POSITION_SIZE,
                         axes=("position", "sbo_position"), name="position_embeddings")
    # Out-of-table slots are clipped only to stay in range; their loss weight is 0.
    p = table(jnp.clip(relative, 0, configs.SBO_MAX_TARGETS - 1))  # [batch, n, SBO_POSITION_SIZE]
    h = cfg.hidden_size
    x = (_square_dense(h, cfg.dtype, "left")(_gather(hidden, left))
         + layers.DenseGeneral(h, kernel_axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                               name="right")(_gather(hidden, right))
         + layers.DenseGeneral(h, kernel_axes=("sbo_position", "mlp"), use_bias=False,
                               dtype=cfg.dtype, name="position")(p))  # [batch, n, hidden]
    # Pinned to the batch layout before each nonlinearity, as in MlmHead (the
    # fsdp_tensor gradient bug through the tied projection).
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="norm1")(act(x))
    # W2 maps to the tied table's width (embedding_size under ALBERT).
    x = _square_dense(cfg.embed_dim, cfg.dtype, "dense2")(x)  # [batch, n, embed_dim]
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="norm2")(act(x))
    return _tied_logits(self, encoder, x)


def _classifier(num_labels: int, dtype, name: str) -> layers.DenseGeneral:
  return layers.DenseGeneral(num_labels, kernel_axes=("embed", "classes"), dtype=dtype,
                             name=name)


class _EncoderModel(nn.Module):
  """Shared calling convention of the task models; subclasses define `head`."""
  config: BertConfig

  def _encode(self, encoder: BertEncoder, tokens, type_ids, segment_ids, positions, mask,
              enable_dropout):
    return encoder(tokens, encoder_type_ids=type_ids, encoder_segment_ids=segment_ids,
                   encoder_positions=positions, encoder_mask=mask,
                   enable_dropout=enable_dropout)

  def _dropout(self, x: Array, enable_dropout: bool) -> Array:
    return layers.Dropout(self.config.dropout_rate)(x, deterministic=not enable_dropout)


class BertForPreTraining(_EncoderModel):
  """MLM + next-sentence (or sentence-order) prediction, as original BERT pre-training."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    encoder = BertEncoder(self.config, add_pooler=True, name="encoder")
    hidden, pooled = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                                  encoder_segment_ids, encoder_positions, encoder_mask,
                                  enable_dropout)
    mlm = _mlm_logits(MlmHead(self.config, name="mlm"), encoder, hidden, mlm_positions)
    nsp = _classifier(2, self.config.dtype, "nsp")(pooled)  # [batch, 2]
    return {"mlm_logits": mlm, "nsp_logits": nsp}


class BertForMaskedLM(_EncoderModel):
  """Masked language model only (RoBERTa-style pre-training; no pooler)."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    encoder = BertEncoder(self.config, add_pooler=False, name="encoder")
    hidden, _ = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                             encoder_segment_ids, encoder_positions, encoder_mask,
                             enable_dropout)
    return {"mlm_logits": _mlm_logits(MlmHead(self.config, name="mlm"), encoder, hidden,
                                      mlm_positions)}


class BertForMaskedLMWithSbo(_EncoderModel):
  """MLM + SpanBERT's span boundary objective (SBO); no NSP, no pooler.

  Reads the 'span' masking's per-slot boundaries `sbo_left_positions` (s-1)
  and `sbo_right_positions` (e+1), aligned with `mlm_positions`; the token's
  place in its span is mlm_positions - sbo_left_positions - 1. Returns
  {'mlm_logits', 'sbo_logits'}, both [batch, max_predictions, vocab].
  """

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               sbo_left_positions=None, sbo_right_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    encoder = BertEncoder(self.config, add_pooler=False, name="encoder")
    hidden, _ = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                             encoder_segment_ids, encoder_positions, encoder_mask,
                             enable_dropout)
    mlm = _mlm_logits(MlmHead(self.config, name="mlm"), encoder, hidden, mlm_positions)
    spans = (mlm_positions, sbo_left_positions, sbo_right_positions)
    if any(x is None for x in spans):
      if not self.is_initializing():
        raise ValueError("the span boundary objective needs mlm_positions, "
                         "sbo_left_positions and sbo_right_positions in the batch "
                         "(data.masking='span' emits them)")
      # Parameters are traced from the tokens alone (Family.init_features).
      zeros = jnp.zeros((encoder_input_tokens.shape[0], 1), jnp.int32)
      spans = (zeros + 1, zeros, zeros + 2)
    positions, left, right = spans
    sbo = SboHead(self.config, name="sbo")(
        hidden, left, right, sbo_relative_positions(positions, left), encoder)
    return {"mlm_logits": mlm, "sbo_logits": sbo}


class BertForSequenceClassification(_EncoderModel):
  """Sentence (pair) classification; num_labels=1 gives one regression output.

  BERT and ALBERT classify the pooled [CLS] vector; RoBERTa, ELECTRA and
  DistilBERT have no pooler and use their own dense + tanh (ELECTRA: GELU;
  DistilBERT: ReLU, its `pre_classifier`, as Hugging Face) over the first
  token instead.
  """
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions  # accepted so every model takes the same batch
    cfg = self.config
    encoder = BertEncoder(cfg, add_pooler=cfg.has_pooler, name="encoder")
    hidden, pooled = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                                  encoder_segment_ids, encoder_positions, encoder_mask,
                                  enable_dropout)
    if not cfg.has_pooler:
      act = {"electra": layers.get_activation("gelu"),
             "distilbert": jax.nn.relu}.get(cfg.model_type, jnp.tanh)
      x = hidden[:, 0]
      if cfg.model_type != "distilbert":  # DistilBERT's pre_classifier reads it undropped
        x = self._dropout(x, enable_dropout)
      pooled = act(_square_dense(cfg.hidden_size, cfg.dtype, "classifier_dense")(x))
    x = self._dropout(pooled, enable_dropout)  # [batch, embed]
    return {"logits": _classifier(self.num_labels, cfg.dtype, "classifier")(x)}


class BertForTokenClassification(_EncoderModel):
  """Per-token labels (NER); no pooler."""
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    encoder = BertEncoder(self.config, add_pooler=False, name="encoder")
    hidden, _ = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                             encoder_segment_ids, encoder_positions, encoder_mask,
                             enable_dropout)
    x = self._dropout(hidden, enable_dropout)  # [batch, length, embed]
    return {"logits": _classifier(self.num_labels, self.config.dtype, "classifier")(x)}


class BertForQuestionAnswering(_EncoderModel):
  """Extractive QA (SQuAD): start and end logits per token; no pooler."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    encoder = BertEncoder(self.config, add_pooler=False, name="encoder")
    hidden, _ = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                             encoder_segment_ids, encoder_positions, encoder_mask,
                             enable_dropout)
    if self.config.model_type == "distilbert":  # its qa_dropout, at our dropout_rate
      hidden = self._dropout(hidden, enable_dropout)
    logits = _classifier(2, self.config.dtype, "qa_outputs")(hidden)  # [batch, length, 2]
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


class RtdHead(nn.Module):
  """ELECTRA's discriminator head: dense + activation, then one logit per token."""
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """hidden [batch, length, embed] -> logits [batch, length] (> 0: 'replaced')."""
    cfg = self.config
    x = layers.get_activation(cfg.hidden_act)(_square_dense(cfg.hidden_size, cfg.dtype,
                                                            "dense")(hidden))
    return _classifier(1, cfg.dtype, "prediction")(x)[..., 0]


class BertForReplacedTokenDetection(_EncoderModel):
  """ELECTRA's discriminator alone (Hugging Face ElectraForPreTraining): {'rtd_logits'}."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    encoder = BertEncoder(self.config, add_pooler=False, name="encoder")
    hidden, _ = self._encode(encoder, encoder_input_tokens, encoder_type_ids,
                             encoder_segment_ids, encoder_positions, encoder_mask,
                             enable_dropout)
    return {"rtd_logits": RtdHead(self.config, name="rtd")(hidden)}


class BertModel(_EncoderModel):
  """The bare encoder as a task model: returns (hidden, pooled).

  Its parameters live under 'encoder', as in every head, so pre-trained
  encoder weights move between tasks as `params['encoder']`.
  """
  add_pooler: bool = True

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> tuple[Array, Array | None]:
    del mlm_positions
    encoder = BertEncoder(self.config, add_pooler=self.add_pooler, name="encoder")
    return self._encode(encoder, encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
                        encoder_positions, encoder_mask, enable_dropout)


# Task name -> model class, for the converters and the trainer.
TASKS = {
    "encoder": BertModel,
    "pretraining": BertForPreTraining,
    "mlm": BertForMaskedLM,
    "mlm_sbo": BertForMaskedLMWithSbo,
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "question_answering": BertForQuestionAnswering,
    "rtd": BertForReplacedTokenDetection,
}
# Plus the tasks that build on this module in their own files (so
# `task_class` imports them on first use): ELECTRA's generator +
# discriminator (models/electra.py), distillation's student + frozen teacher
# (models/distillation.py), and the NER heads: emissions + a linear-chain CRF
# (models/crf.py) and span classification (models/span.py).
_LAZY_TASKS = {
    "electra": ("electra", "ElectraForPreTraining"),
    "distillation": ("distillation", "DistillationModel"),
    "crf_token_classification": ("crf", "BertForCrfTokenClassification"),
    "span_classification": ("span", "BertForSpanClassification"),
}
TASK_NAMES = (*TASKS, *_LAZY_TASKS)


def task_class(task: str) -> type[nn.Module]:
  """The model class of `task` (one of TASK_NAMES)."""
  if task in _LAZY_TASKS:
    module, name = _LAZY_TASKS[task]
    return getattr(importlib.import_module(f"bert_jax.models.{module}"), name)
  if task not in TASKS:
    raise ValueError(f"unknown BERT task {task!r}; choose one of {list(TASK_NAMES)}")
  return TASKS[task]


def build(config: BertConfig, task: str = "encoder", **kwargs) -> nn.Module:
  """The model for `task` (see TASKS); kwargs go to the head (num_labels, add_pooler)."""
  return task_class(task)(config, **kwargs)


def task_of(model: nn.Module) -> str:
  """Inverse of `build`: the task name of a model instance."""
  for name in TASK_NAMES:
    if type(model) is task_class(name):
      return name
  raise ValueError(f"{type(model).__name__} is not a BERT-family model")
