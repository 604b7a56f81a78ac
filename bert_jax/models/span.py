"""Span classification for NER: every span of up to K words gets an entity type or 'O'.

`BertForSpanClassification` (the BERT family's 'span_classification' task)
reads the encoder's hidden states and `word_starts` [batch, length] (1 at the
first sub-word of each word: the positions that carry a label in NER
features). Words are left-aligned (crf.left_align); span (i, k) covers words
i .. i + k (k < max_span_length) and is valid when i + k < the row's number
of words. Its representation is

  [h(first sub-word of word i); h(last sub-word of word i + k); mean of h over
   the span's sub-words]  ->  dense + GELU + LayerNorm  ->  dropout  ->  classes

where class 0 is 'O' (not an entity) and class c > 0 is the c-th entity type.
The first dense is stored as three kernels (start, end, mean) whose sum is the
dense of the concatenation; each is applied per token before the spans are
formed (the mean commutes with it, through a cumulative sum), so no
[spans, 3 x hidden] tensor is built.

Output: {'span_logits' [batch, length, max_span_length, classes]}, indexed
[row, first word, width - 1]; slots of invalid spans hold junk that the loss
(span_labels -100) and the decoding (tasks/ner.py) skip. Each span is scored
on its own, so the head represents nested entities (a span and a span inside
it are two cells); flat CoNLL output is a decoding choice (ner.decode_spans).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import bert
from bert_jax.models import crf
from bert_jax.models import layers

Array = jax.Array


def span_bounds(word_starts: Array, tokens: Array, pad_token_id: int
                ) -> tuple[Array, Array]:
  """Token bounds of the left-aligned words.

  Args:
    word_starts: [batch, length], non-zero at each word's first sub-word.
    tokens: [batch, length] ids; the last real token ([SEP]) closes the last word.
    pad_token_id: the padding id.

  Returns:
    (bounds int32 [batch, length + 1]: bounds[j] is the first token of word
    j for j < n and the [SEP] position for j >= n, so word j spans tokens
    bounds[j] .. bounds[j + 1] - 1; num_words int32 [batch]).
  """
  order, num_words = crf.left_align(word_starts)
  # [batch]; 0 for an all-padding filler row, so every gather stays in range.
  closing = jnp.maximum(jnp.sum(tokens != pad_token_id, axis=1).astype(jnp.int32) - 1, 0)
  slot = jnp.arange(order.shape[1] + 1)[None, :]
  padded = jnp.concatenate([order, order[:, :1]], axis=1)
  return jnp.where(slot < num_words[:, None], padded, closing[:, None]), num_words


def span_mask(num_words: Array, length: int, max_span_length: int) -> Array:
  """bool [batch, length, max_span_length]: span (i, k) lies within the row's words."""
  i = jnp.arange(length)[:, None]
  k = jnp.arange(max_span_length)[None, :]
  return (i + k)[None] < num_words[:, None, None]


def _gather(x: Array, index: Array) -> Array:
  """x [batch, length, d] at index [batch, n, k] -> [batch, n, k, d]."""
  flat = index.reshape(index.shape[0], -1)
  out = jnp.take_along_axis(x, flat[:, :, None], axis=1)
  return out.reshape(index.shape + x.shape[-1:])


class SpanHead(nn.Module):
  """[start; end; mean] -> dense + GELU + LayerNorm -> dropout -> classes, per span."""
  config: bert.BertConfig
  num_labels: int
  max_span_length: int

  @nn.compact
  def __call__(self, hidden: Array, bounds: Array, enable_dropout: bool) -> Array:
    """hidden [batch, length, embed], bounds [batch, length + 1] -> [batch, length, K, classes]."""
    cfg = self.config
    h = cfg.hidden_size
    dense = lambda name, bias: layers.DenseGeneral(h, kernel_axes=("embed", "mlp"),
                                                   use_bias=bias, dtype=cfg.dtype, name=name)
    start_part = dense("start", True)(hidden)  # [batch, length, hidden]
    end_part = dense("end", False)(hidden)
    mean_part = dense("mean", False)(hidden).astype(jnp.float32)
    # cumsum[j] = sum of mean_part over tokens < j: [batch, length + 1, hidden].
    cumsum = jnp.pad(jnp.cumsum(mean_part, axis=1), ((0, 0), (1, 0), (0, 0)))
    length = hidden.shape[1]
    i = jnp.arange(length)[:, None]
    k = jnp.arange(self.max_span_length)[None, :]
    last_word = jnp.minimum(i + k + 1, length)  # [length, K]: the word after the span
    first_token = jnp.broadcast_to(bounds[:, :length, None], (bounds.shape[0], length,
                                                              self.max_span_length))
    after_token = jnp.take_along_axis(bounds, last_word.reshape(1, -1), axis=1).reshape(
        first_token.shape)  # [batch, length, K]
    after_token = jnp.maximum(after_token, first_token + 1)  # invalid spans stay in range
    size = (after_token - first_token).astype(jnp.float32)[..., None]
    mean = (_gather(cumsum, after_token) - _gather(cumsum, first_token)) / size
    x = (_gather(start_part, first_token) + _gather(end_part, after_token - 1)
         + mean.astype(start_part.dtype))  # [batch, length, K, hidden]
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", None, "act_embed"))
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="norm")(
        layers.get_activation("gelu")(x))
    x = layers.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    return layers.DenseGeneral(self.num_labels, kernel_axes=("embed", "classes"),
                               dtype=cfg.dtype, name="classifier")(x)


class BertForSpanClassification(nn.Module):
  """Encoder + SpanHead: {'span_logits' [batch, length, max_span_length, num_labels]}.

  `word_starts` may be None only while initialising (parameter shapes do not
  depend on it); then every token counts as a word.
  """
  config: bert.BertConfig
  num_labels: int = 2
  max_span_length: int = 8

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, word_starts=None,
               mlm_positions=None, enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    if word_starts is None:
      if not self.is_initializing():
        raise ValueError("span classification needs `word_starts` in the batch (1 at the "
                         "first sub-word of each word; tasks/adapters.ConllTask adds it)")
      word_starts = jnp.ones_like(encoder_input_tokens)
    hidden, _ = bert.BertEncoder(self.config, add_pooler=False, name="encoder")(
        encoder_input_tokens, encoder_type_ids=encoder_type_ids,
        encoder_segment_ids=encoder_segment_ids, encoder_positions=encoder_positions,
        encoder_mask=encoder_mask, enable_dropout=enable_dropout)
    # [batch, length, embed]
    x = layers.Dropout(self.config.dropout_rate)(hidden, deterministic=not enable_dropout)
    bounds, _ = span_bounds(word_starts, encoder_input_tokens, self.config.pad_token_id)
    head = SpanHead(self.config, self.num_labels, self.max_span_length, name="span")
    return {"span_logits": head(x, bounds, enable_dropout)}
