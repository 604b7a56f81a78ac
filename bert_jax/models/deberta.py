"""DeBERTa-v2/v3 (He et al. 2021, 2023) encoders and heads, in Flax Linen.

The architecture of Hugging Face's DebertaV2*: BERT's post-norm layers, but
attention adds two disentangled relative-position terms to the
content-to-content logits. With Q, K the content projections of the tokens
and Pq, Pk projections of a learnt table of relative positions R
([2 x span, hidden], LayerNormed in v3), for query i and key j:

    logit[i, j] = (Q_i . K_j  +  Q_i . Pk[d(i, j)]  +  K_j . Pq[d(i, j)]) / sqrt(head_dim x s)
                   content       c2p                   p2c

where d(i, j) = clip(bucket(i - j) + span, 0, 2 span - 1) is the table row
of the (log-bucketed) distance i - j and s = 1 + the number of position
terms (3 for c2p|p2c). The reference writes p2c with the key's distance to
the query, bucket(j - i) negated; `bucket` is odd, so it is the same row.
With share_att_key (v3) Pq and Pk come from the content query / key
projections; otherwise from their own pos_query / pos_key projections (v2).

With conv_kernel_size > 0 (DeBERTa-v2 xlarge / xxlarge) a 1-D convolution
over the embeddings joins layer 0's output (ConvLayer).

Models take the batch contract's names, as bert.py's do:

    outputs = model.apply(
        {'params': params},
        encoder_input_tokens,          # int32 [batch, length]
        encoder_type_ids=None,         # int32 [batch, length] (used when type_vocab_size > 0)
        encoder_segment_ids=None,      # int32 [batch, length], 1, 2, ... per packed example, 0 = pad
        encoder_positions=None,        # int32 [batch, length] (the absolute table, if any)
        encoder_mask=None,             # [batch, length], 1 = real token, 0 = padding
        mlm_positions=None,            # int32 [batch, max_predictions] (MLM only)
        enable_dropout=False,          # True in training, with rngs={'dropout': key}
    )

  DebertaModel                      (hidden [batch, length, hidden], None)
  DebertaForMaskedLM                {'mlm_logits'} [batch, max_predictions or length, vocab]
  DebertaForSequenceClassification  {'logits' [batch, num_labels]} (pooler over token 0)
  DebertaForTokenClassification     {'logits' [batch, length, num_labels]}
  DebertaForQuestionAnswering       {'start_logits', 'end_logits'} [batch, length]
  DebertaForReplacedTokenDetection  {'mlm_logits', 'rtd_logits', 'rtd_labels'} (task 'electra':
                                    DeBERTa-v3's RTD with GDES; see electra.py)

Packed rows: a token attends within its segment. Relative distances are
index differences, which equal position differences inside a contiguous
segment, so packing needs no per-example distance table.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import electra
from bert_jax.models import layers
from bert_jax.models.deberta_config import DebertaConfig

Array = jax.Array
_ACT = ("act_batch", "act_length", "act_embed")


# ---------------------------------------------------------------- positions


def log_bucket_position(relative: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
  """Relative distances -> bucketed distances, exact within +-buckets/2, log-spaced beyond.

  The reference's make_log_bucket_position, in float32 as it computes it so
  the rounding (ceil) agrees: distances |r| <= mid = buckets // 2 stay; larger
  ones map to mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) x (mid - 1)),
  with r's sign.
  """
  relative = np.asarray(relative, np.int64)
  mid = buckets // 2
  sign = np.sign(relative)
  near = (relative < mid) & (relative > -mid)
  abs_pos = np.where(near, mid - 1, np.abs(relative)).astype(np.float32)
  log_pos = np.ceil(np.log(abs_pos / np.float32(mid))
                    / np.log(np.float32((max_position - 1) / mid))
                    * np.float32(mid - 1)) + np.float32(mid)
  bucketed = np.where(abs_pos <= mid, relative.astype(np.float32), log_pos * sign)
  return bucketed.astype(np.int64)


def relative_rows(length: int, cfg: DebertaConfig) -> np.ndarray:
  """int32 [length, length]: the relative table's row for query i, key j (d(i, j) above)."""
  idx = np.arange(length)
  relative = idx[:, None] - idx[None, :]
  if cfg.position_buckets > 0:
    relative = log_bucket_position(relative, cfg.position_buckets, cfg.relative_range)
  span = cfg.attention_span
  return np.clip(relative + span, 0, 2 * span - 1).astype(np.int32)


def attention_mask(tokens: Array, segment_ids: Array | None, mask: Array | None,
                   pad_token_id: int) -> tuple[Array, Array]:
  """(bool mask broadcastable to [batch, heads, q, k], float [batch, length] real tokens)."""
  if mask is not None:
    valid = mask > 0
  elif segment_ids is not None:
    valid = segment_ids > 0
  else:
    valid = tokens != pad_token_id
  if segment_ids is not None:
    segment_ids = segment_ids * valid
    return layers.segment_mask(segment_ids, segment_ids), valid
  # Key-only: padding queries still see real keys (their outputs are never scored).
  return valid[:, None, None, :], valid


# ------------------------------------------------------------------ encoder


def _norm(cfg: DebertaConfig, name: str) -> layers.LayerNorm:
  return layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name=name)


class DisentangledAttention(nn.Module):
  """Self-attention with c2p / p2c relative terms; [embed, heads, kv] projections."""
  config: DebertaConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, rel_table: Array | None,
               deterministic: bool, query_states: Array | None = None) -> Array:
    """x [batch, length, embed], rel_table [2 span, embed] -> [batch, length, embed].

    query_states [batch, length, embed] (the EMD's): the queries are projected
    from them instead of from x; keys and values always come from x.
    """
    cfg = self.config
    qkv_axes = ("act_batch", "act_length", "act_heads", "act_kv")
    proj = lambda name: layers.DenseGeneral(  # noqa: E731
        (cfg.num_heads, cfg.head_dim), kernel_axes=("embed", "heads", "kv"), dtype=cfg.dtype,
        name=name)
    query_proj, key_proj = proj("query"), proj("key")
    # [batch, length, heads, kv]
    query = query_proj(x if query_states is None else query_states)
    key, value = key_proj(x), proj("value")(x)
    query, key, value = (nn.with_logical_constraint(t, qkv_axes) for t in (query, key, value))
    scale = float(cfg.head_dim * cfg.scale_factor) ** -0.5
    bias = None
    if cfg.relative_attention and cfg.pos_att_type:
      rel = layers.Dropout(cfg.hidden_dropout)(rel_table, deterministic=deterministic)
      rows = relative_rows(x.shape[1], cfg)  # [q, k] numpy: a constant of the length
      q_idx = np.arange(x.shape[1])[:, None]
      score = 0.0
      if "c2p" in cfg.pos_att_type:
        pos_key = (key_proj if cfg.share_att_key else proj("pos_key"))(rel)  # [2 span, heads, kv]
        c2p = jnp.einsum("bqhd,rhd->bhqr", query, pos_key)  # [batch, heads, q, 2 span]
        score = score + c2p[:, :, q_idx, rows].astype(jnp.float32)  # [batch, heads, q, k]
      if "p2c" in cfg.pos_att_type:
        pos_query = (query_proj if cfg.share_att_key else proj("pos_query"))(rel)
        p2c = jnp.einsum("bkhd,rhd->bhkr", key, pos_query)  # [batch, heads, k, 2 span]
        # Entry [k, q] is row d(q, k) of key k; swapped to [q, k].
        score = score + jnp.swapaxes(p2c[:, :, q_idx, rows.T], -1, -2).astype(jnp.float32)
      bias = score * scale
    use_dropout = cfg.attention_dropout > 0.0 and not deterministic
    h = layers.dot_product_attention(
        query, key, value, mask=mask, bias=bias, scale=scale,
        dropout_rate=cfg.attention_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=deterministic, dtype=cfg.dtype)
    h = layers.DenseGeneral(cfg.hidden_size, kernel_axes=("heads", "kv", "embed"), axis=(-2, -1),
                            dtype=cfg.dtype, name="out")(h)
    h = layers.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(h, _ACT)


class DebertaLayer(nn.Module):
  """Post-norm block, as BERT: x = norm(x + attn(x)); x = norm(x + mlp(x)).

  With query_states q (the EMD): x = norm(q + attn(q over x)); then the MLP.
  """
  config: DebertaConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, rel_table: Array | None,
               deterministic: bool, query_states: Array | None = None) -> Array:
    cfg = self.config
    h = DisentangledAttention(cfg, name="attention")(x, mask, rel_table, deterministic,
                                                     query_states)
    x = _norm(cfg, "attention_norm")((x if query_states is None else query_states) + h)
    h = layers.Mlp(mlp_dim=cfg.intermediate_size, activations=(cfg.hidden_act,),
                   dtype=cfg.dtype, name="mlp")(x, deterministic=deterministic)
    h = layers.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    # [batch, length, embed]
    return nn.with_logical_constraint(_norm(cfg, "mlp_norm")(x + h), _ACT)


class ConvLayer(nn.Module):
  """DeBERTa-v2's convolution after the first layer (Hugging Face's ConvLayer):

      out = norm(layer0_out + act(dropout(mask * conv(embeddings)))) * mask

  conv: over the length, zero-padded (k - 1) // 2 each side, channel groups;
  kernel [k, hidden / groups, hidden] as flax nn.Conv's. A tap reads only its
  token's segment: a packed row equals its sequences run alone (zero-padded).
  """
  config: DebertaConfig

  @nn.compact
  def __call__(self, embeddings: Array, residual: Array, segments: Array,
               deterministic: bool) -> Array:
    """embeddings, residual [batch, length, embed]; segments int32 [batch, length]
    (> 0 real tokens, equal within a sequence) -> [batch, length, embed]."""
    cfg = self.config
    k, groups, width = cfg.conv_kernel_size, cfg.conv_groups, cfg.hidden_size
    kernel = self.param("kernel", nn.with_logical_partitioning(layers.bert_init, (
        "conv_width", "embed", "mlp")), (k, width // groups, width), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                      (width,), jnp.float32)
    pad = (k - 1) // 2
    length = embeddings.shape[1]
    x = jnp.pad(embeddings.astype(cfg.dtype), ((0, 0), (pad, pad), (0, 0)))
    seg = jnp.pad(segments, ((0, 0), (pad, pad)))  # outside the row: segment 0, never read
    x = x.reshape(*x.shape[:2], groups, width // groups)  # [batch, length + 2 pad, groups, in]
    kernel = kernel.astype(cfg.dtype).reshape(k, width // groups, groups, width // groups)
    out = 0.0
    for j in range(k):  # tap j reads token t + j - pad: torch's cross-correlation
      near = seg[:, j:j + length]
      keep = ((near == segments) & (near > 0)).astype(cfg.dtype)[..., None, None]
      out = out + jnp.einsum("blgi,igo->blgo", x[:, j:j + length] * keep, kernel[j])
    out = out.reshape(*out.shape[:2], width) + bias.astype(cfg.dtype)  # [batch, length, embed]
    valid = (segments > 0).astype(cfg.dtype)[..., None]
    out = layers.Dropout(cfg.hidden_dropout)(out * valid, deterministic=deterministic)
    out = jnp.tanh(out) if cfg.conv_act == "tanh" else layers.get_activation(cfg.conv_act)(out)
    out = _norm(cfg, "norm")(residual + out) * valid
    return nn.with_logical_constraint(out, _ACT)


class DebertaEncoder(nn.Module):
  """Embeddings (+ norm), the relative table (+ norm), num_layers blocks.

  Attributes:
    config: the hyperparameters.
    sharing: where the word (and absolute position) tables come from.
      'none': its own ('word_embeddings', 'position_embeddings'); the others
      serve the 'electra' task and take the generator's tables as the
      `tables` argument of __call__ ({'word', 'position'}, see `tables()`):
      'gdes': stop_gradient(tables) + its own zero-initialised deltas
      ('word_embeddings_delta', 'position_embeddings_delta'), so no gradient
      reaches the given tables through this encoder (DeBERTa-v3's GDES);
      'tied': the given tables as they are (it owns none).
  """
  config: DebertaConfig
  sharing: str = "none"

  def setup(self):
    cfg = self.config
    if self.sharing not in ("none", "tied", "gdes"):
      raise ValueError(f"DebertaEncoder.sharing: choose none, tied or gdes, got {self.sharing!r}")
    # GDES deltas start at zero: at init the discriminator sees the generator's tables.
    owned = dict(name_suffix="_delta", embedding_init=nn.initializers.zeros) if (
        self.sharing == "gdes") else dict(name_suffix="", embedding_init=layers.bert_init)
    suffix = owned.pop("name_suffix")
    tables = {}
    if self.sharing != "tied":
      tables["word"] = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                    name=f"word_embeddings{suffix}", **owned)
      if cfg.has_position_table:
        tables["position"] = layers.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, axes=("position", "embed"),
            name=f"position_embeddings{suffix}", **owned)
    self.owned = tables  # {'word', 'position'}: the tables it owns
    if cfg.type_vocab_size:
      self.token_type_embeddings = layers.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                                axes=("type", "embed"))
    self.embeddings_norm = _norm(cfg, "embeddings_norm")
    if cfg.relative_attention:
      self.rel_embeddings = layers.Embed(2 * cfg.attention_span, cfg.hidden_size,
                                         axes=("relpos_buckets", "embed"))
      if cfg.norm_rel_ebd == "layer_norm":
        self.rel_norm = _norm(cfg, "rel_norm")
    # `deterministic` (argument 5, counting self) is a Python value: static under remat.
    block = nn.remat(DebertaLayer, static_argnums=(4,)) if cfg.remat else DebertaLayer
    self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    if cfg.conv_kernel_size:
      self.conv = ConvLayer(cfg)
    self.embeddings_dropout = layers.Dropout(cfg.hidden_dropout)

  def tables(self) -> dict[str, Array]:
    """The tables it owns, {'word': [vocab, embed], 'position': [positions, embed]} (if any):
    what a 'tied' or 'gdes' encoder is given."""
    if self.sharing != "none":
      raise ValueError(f"a DebertaEncoder with sharing={self.sharing!r} owns no whole table")
    return {k: v.embedding for k, v in self.owned.items()}

  def _tables(self, given: dict[str, Array] | None) -> dict[str, Array]:
    """The effective word / position tables under `sharing`."""
    if self.sharing == "none":
      return self.tables()
    if given is None:
      raise ValueError(f"a DebertaEncoder with sharing={self.sharing!r} needs `tables`")
    if self.sharing == "tied":
      return dict(given)
    return {k: jax.lax.stop_gradient(given[k]) + v.embedding for k, v in self.owned.items()}

  def __call__(self, encoder_input_tokens: Array, encoder_type_ids: Array | None = None,
               encoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               encoder_mask: Array | None = None, enable_dropout: bool = False,
               tables: dict[str, Array] | None = None, return_emd: bool = False):
    """The last hidden state [batch, length, hidden]; with return_emd also the EMD's.

    return_emd (config.enhanced_mask_decoder): (hidden, emd) where emd
    [batch, length, hidden] runs the last layer twice more over its own input
    h, queried first by h + the absolute position embeddings, then by its
    own output (the reference's EnhancedMaskDecoder: absolute positions
    reach the MLM head without entering the encoder).
    """
    cfg = self.config
    tokens = encoder_input_tokens
    deterministic = not enable_dropout
    if cfg.has_position_table and tokens.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    if return_emd and not cfg.enhanced_mask_decoder:
      raise ValueError("return_emd needs DebertaConfig.enhanced_mask_decoder=True")
    mask, valid = attention_mask(tokens, encoder_segment_ids, encoder_mask, cfg.pad_token_id)
    table = self._tables(tables)
    positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                 if encoder_positions is None else encoder_positions)
    # Summed in float32: the tables are float32 and the LayerNorm follows.
    x = jnp.take(table["word"], tokens, axis=0)
    if cfg.position_biased_input:
      x = x + jnp.take(table["position"], positions, axis=0)
    if cfg.type_vocab_size:
      types = jnp.zeros_like(tokens) if encoder_type_ids is None else encoder_type_ids
      x = x + jnp.take(self.token_type_embeddings.embedding, types, axis=0)
    # Padding rows are zeroed, as the reference does (they are never attended to either).
    x = self.embeddings_norm(x) * valid[..., None].astype(cfg.dtype)
    x = self.embeddings_dropout(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, _ACT)  # [batch, length, embed]
    rel_table = None
    if cfg.relative_attention:
      rel_table = self.rel_embeddings.embedding  # [2 span, embed]
      if cfg.norm_rel_ebd == "layer_norm":
        rel_table = self.rel_norm(rel_table)
      rel_table = rel_table.astype(cfg.dtype)
    hidden = x
    for i, layer in enumerate(self.layers):
      x = hidden  # ends as the last layer's input, which the EMD reads
      hidden = layer(x, mask, rel_table, deterministic)
      if i == 0 and cfg.conv_kernel_size:
        # Real tokens of one sequence share a segment id; without packing, all of a row's.
        segments = (valid.astype(jnp.int32) if encoder_segment_ids is None
                    else encoder_segment_ids * valid)
        hidden = self.conv(x, hidden, segments, deterministic)
    if not return_emd:
      return hidden
    # EMD: raw absolute positions (no norm), as the reference's z_states.
    query = x + jnp.take(table["position"], positions, axis=0).astype(cfg.dtype)
    for _ in range(2):
      query = self.layers[-1](x, mask, rel_table, deterministic, query)
    return hidden, query

  def attend(self, x: Array) -> Array:
    """x [..., embed] -> logits [..., vocab] against the token table (tied MLM output)."""
    return jnp.einsum("...e,ve->...v", x.astype(self.config.dtype),
                      self.tables()["word"].astype(self.config.dtype))


# -------------------------------------------------------------------- heads


def _dense(cfg: DebertaConfig, name: str) -> layers.DenseGeneral:
  # [embed, embed] kernels name their output 'mlp': one logical name may not repeat.
  return layers.DenseGeneral(cfg.hidden_size, kernel_axes=("embed", "mlp"), dtype=cfg.dtype,
                             name=name)


class MlmHead(nn.Module):
  """dense, activation, LayerNorm, then logits tied to the token table + bias
  (Hugging Face's DebertaV2LMPredictionHead, and the legacy head's same maths)."""
  config: DebertaConfig

  @nn.compact
  def __call__(self, hidden: Array, encoder: DebertaEncoder) -> Array:
    """hidden [batch, n, embed] -> logits [batch, n, vocab]."""
    cfg = self.config
    x = _dense(cfg, "dense")(hidden)
    # Pinned to the batch layout before the nonlinearity (see bert.MlmHead).
    x = nn.with_logical_constraint(x, _ACT)
    x = _norm(cfg, "norm")(layers.get_activation(cfg.hidden_act)(x))
    bias = self.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("vocab",)),
                      (cfg.vocab_size,), jnp.float32)
    logits = layers.add_bias(encoder.attend(x), bias.astype(cfg.dtype))
    return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


def _classifier(num_labels: int, dtype, name: str = "classifier") -> layers.DenseGeneral:
  return layers.DenseGeneral(num_labels, kernel_axes=("embed", "classes"), dtype=dtype,
                             name=name)


class _TaskModel(nn.Module):
  """The calling convention every DeBERTa model shares."""
  config: DebertaConfig

  def _encode(self, tokens, type_ids, segment_ids, positions, mask, enable_dropout):
    encoder = DebertaEncoder(self.config, name="encoder")
    hidden = encoder(tokens, encoder_type_ids=type_ids, encoder_segment_ids=segment_ids,
                     encoder_positions=positions, encoder_mask=mask,
                     enable_dropout=enable_dropout)
    return encoder, hidden


class DebertaModel(_TaskModel):
  """The bare encoder: returns (hidden, None), as BertModel without a pooler.

  Its parameters live under 'encoder', as in every head, so pre-trained
  encoder weights move between tasks as `params['encoder']`.
  """

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> tuple[Array, None]:
    del mlm_positions  # accepted so every model takes the same batch
    _, hidden = self._encode(encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
                             encoder_positions, encoder_mask, enable_dropout)
    return hidden, None


def mlm_states(encoder: DebertaEncoder, tokens: Array, mlm_positions: Array | None,
               **kwargs) -> Array:
  """What the MLM head reads: the last hidden state, or the EMD's with
  config.enhanced_mask_decoder, at `mlm_positions` if given ([batch, n or length, embed])."""
  if encoder.config.enhanced_mask_decoder:
    _, hidden = encoder(tokens, return_emd=True, **kwargs)
  else:
    hidden = encoder(tokens, **kwargs)
  if mlm_positions is not None:  # [batch, max_predictions, embed]
    hidden = jnp.take_along_axis(hidden, mlm_positions[:, :, None].astype(jnp.int32), axis=1)
  return hidden


class DebertaForMaskedLM(_TaskModel):
  """Masked language model; with `mlm_positions` the head runs only at those positions.

  With config.enhanced_mask_decoder the head reads the EMD (mlm_states).
  """

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    encoder = DebertaEncoder(self.config, name="encoder")
    hidden = mlm_states(encoder, encoder_input_tokens, mlm_positions,
                        encoder_type_ids=encoder_type_ids, encoder_segment_ids=encoder_segment_ids,
                        encoder_positions=encoder_positions, encoder_mask=encoder_mask,
                        enable_dropout=enable_dropout)
    return {"mlm_logits": MlmHead(self.config, name="mlm")(hidden, encoder)}


class RtdHead(nn.Module):
  """Replaced-token detection, as the reference's LMMaskPredictionHead:
  LayerNorm(h + h[:, 0]) (each token with the sequence's first), dense,
  activation, then one logit per token."""
  config: DebertaConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """hidden [batch, length, embed] -> logits [batch, length]."""
    cfg = self.config
    x = _norm(cfg, "norm")(hidden + hidden[:, :1])
    x = layers.get_activation(cfg.hidden_act)(_dense(cfg, "dense")(x))
    x = nn.with_logical_constraint(x, _ACT)
    return _classifier(1, cfg.dtype)(x)[..., 0]


class DebertaForReplacedTokenDetection(electra.ReplacedTokenDetection):
  """DeBERTa-v3 pretraining (task 'electra'): a DeBERTa generator (MLM, with
  the EMD if configured; config.generator() deep) and discriminator (RtdHead),
  sharing embeddings by config.embedding_sharing (see electra.py for the run).

  Parameters: 'encoder' (the discriminator; under GDES its tables are
  'word_embeddings_delta' etc., to add to the generator's: `discriminator`
  merges them), 'rtd', 'generator', 'generator_mlm'.
  """
  config: DebertaConfig

  def parts(self):
    cfg = self.config
    gen_cfg = cfg.generator()
    tied = cfg.embedding_sharing == "tied"
    # The discriminator never runs the EMD; it keeps the position table only to share it (tied).
    disc_cfg = cfg if tied else dataclasses.replace(cfg, enhanced_mask_decoder=False)
    if tied:  # the discriminator owns the tables, as ELECTRA's; the generator reads them
      encoder = DebertaEncoder(disc_cfg, name="encoder")
      generator = DebertaEncoder(gen_cfg, sharing="tied", name="generator")
      owner = encoder
    else:  # GDES: the generator owns them, the discriminator learns deltas
      encoder = DebertaEncoder(disc_cfg, sharing="gdes", name="encoder")
      generator = DebertaEncoder(gen_cfg, name="generator")
      owner = generator

    def shared(target: DebertaEncoder) -> dict[str, Array] | None:
      if target.sharing == "none":
        return None
      tables = owner.tables()
      return {k: v for k, v in tables.items() if k == "word" or target.config.has_position_table}

    def generate(tokens, mlm_positions, **kwargs):  # -> [batch, n, vocab]
      hidden = mlm_states(generator, tokens, mlm_positions, tables=shared(generator), **kwargs)
      return MlmHead(gen_cfg, name="generator_mlm")(hidden, owner)

    def discriminate(tokens, **kwargs):  # -> [batch, length]
      return RtdHead(cfg, name="rtd")(encoder(tokens, tables=shared(encoder), **kwargs))

    return generate, discriminate


def discriminator(model: DebertaForReplacedTokenDetection, params: dict
                  ) -> tuple[DebertaModel, dict]:
  """The discriminator of a task-'electra' model as a plain DebertaModel and its params
  ({'encoder': ...}; GDES deltas added to the generator's tables), e.g. for
  `bert_jax.save_pretrained` (an HF DebertaV2Model) or fine-tuning."""
  cfg = dataclasses.replace(model.config, enhanced_mask_decoder=False)
  enc = dict(params["encoder"])
  gen = params["generator"] if cfg.embedding_sharing == "gdes" else None
  for table in ("word_embeddings", "position_embeddings"):
    delta = enc.pop(f"{table}_delta", None)
    if delta is not None:
      enc[table] = {"embedding": gen[table]["embedding"] + delta["embedding"]}
  if not cfg.has_position_table:  # a tied EMD generator's table, unused by the discriminator
    enc.pop("position_embeddings", None)
  return DebertaModel(cfg), {"encoder": enc}


class DebertaForSequenceClassification(_TaskModel):
  """Token 0 -> dropout -> pooler dense + activation -> dropout -> classifier."""
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    cfg = self.config
    deterministic = not enable_dropout
    _, hidden = self._encode(encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
                             encoder_positions, encoder_mask, enable_dropout)
    x = layers.Dropout(cfg.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
    x = layers.get_activation(cfg.pooler_hidden_act)(_dense(cfg, "pooler")(x))  # [batch, embed]
    x = layers.Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
    return {"logits": _classifier(self.num_labels, cfg.dtype)(x)}


class DebertaForTokenClassification(_TaskModel):
  """Per-token labels (NER): dropout, classifier at every token."""
  num_labels: int = 2

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    cfg = self.config
    _, hidden = self._encode(encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
                             encoder_positions, encoder_mask, enable_dropout)
    x = layers.Dropout(cfg.hidden_dropout)(hidden, deterministic=not enable_dropout)
    return {"logits": _classifier(self.num_labels, cfg.dtype)(x)}


class DebertaForQuestionAnswering(_TaskModel):
  """Extractive QA: start and end logits per token."""

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    _, hidden = self._encode(encoder_input_tokens, encoder_type_ids, encoder_segment_ids,
                             encoder_positions, encoder_mask, enable_dropout)
    logits = _classifier(2, self.config.dtype)(hidden)  # [batch, length, 2]
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


# Task name -> model class, for the converter and the trainers.
TASKS = {
    "encoder": DebertaModel,
    "mlm": DebertaForMaskedLM,
    "sequence_classification": DebertaForSequenceClassification,
    "token_classification": DebertaForTokenClassification,
    "question_answering": DebertaForQuestionAnswering,
    # DeBERTa-v3 pretraining: generator + discriminator (objective 'electra').
    "electra": DebertaForReplacedTokenDetection,
}
TASK_NAMES = tuple(TASKS)


def task_class(task: str) -> type[nn.Module]:
  """The model class of `task` (one of TASK_NAMES)."""
  if task not in TASKS:
    raise ValueError(f"unknown DeBERTa task {task!r}; choose one of {list(TASK_NAMES)}")
  return TASKS[task]


def build(config: DebertaConfig, task: str = "encoder", **kwargs) -> nn.Module:
  """The model for `task` (see TASKS); kwargs go to the head (num_labels)."""
  return task_class(task)(config, **kwargs)


def task_of(model: nn.Module) -> str:
  """Inverse of `build`: the task name of a model instance."""
  for name, cls in TASKS.items():
    if type(model) is cls:
      return name
  raise ValueError(f"{type(model).__name__} is not a DeBERTa model")
