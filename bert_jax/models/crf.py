"""A linear-chain CRF over BERT emissions: likelihood, Viterbi, BIO constraints, the head.

The pure functions come first; `BertForCrfTokenClassification` (the BERT
family's 'crf_token_classification' task) puts them behind an encoder.

Model. For tags y_1..y_n of one sentence and emissions e_t (the per-position
label scores of a linear layer over the encoder),

  score(y) = start[y_1] + sum_t e_t[y_t] + sum_{t>1} trans[y_{t-1}, y_t] + end[y_n]
  log p(y | x) = score(y) - log sum_{y'} exp(score(y'))

and the normaliser is the forward algorithm (`lax.scan` of a logsumexp over
[batch, labels, labels]); the best path is Viterbi (the same scan with max,
then backpointers). Arithmetic is float32 whatever the emissions' dtype.

Which positions form the chain. NER features label the first sub-word of
each word and give -100 elsewhere ([CLS], continuations, [SEP], padding), so
the labelled positions are not a prefix of the row. Every function here takes
a `mask` [batch, length] of the positions that belong to the chain and first
moves them to a left-aligned prefix (`left_align`, a stable sort: their order
is kept), so the chain runs over words and never sees a sub-word, and a
transition links consecutive words. Decoded tags are put back at the original
positions. With `data.label_all_subwords=True` every sub-word is labelled and
the chain runs over sub-words instead (continuations of B-X carry I-X, which
the BIO constraints allow). A row without labelled positions (a filler row)
has log-likelihood 0 and decodes to all 0.

Constraints. `allowed_transitions` gives the IOB2 rules (I-X only after B-X or
I-X, never first); `constrain` replaces the scores of forbidden moves with
DISALLOWED at use, so the parameters stay free and no decoded path breaks the
scheme (the constrained head's likelihood puts ~0 mass on such paths too).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import bert
from bert_jax.models import layers

Array = jax.Array

# The score of a forbidden move: exp(-1e4) is 0 in float32, yet a sum of one
# per position over a 512-token chain stays far inside float32's (and
# bfloat16's) range, so no -inf or NaN can appear in the scan or its gradient.
DISALLOWED = -1e4
SCHEMES = ("BIO", "none")


# ------------------------------------------------------------ constraints


def allowed_transitions(label_names: Sequence[str], scheme: str = "BIO"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Which tag moves a scheme allows.

  Args:
    label_names: the label-id order, e.g. ('O', 'B-LOC', 'I-LOC', ...).
    scheme: 'BIO' (IOB2, as tasks/ner.py produces: I-X may follow only B-X or
      I-X and may not start a sentence) or 'none' (everything allowed).

  Returns:
    (allowed bool [L, L] indexed [previous, next], start bool [L], end bool
    [L]); under BIO every tag may end a sentence.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"unknown tagging scheme {scheme!r}; choose one of {list(SCHEMES)}")
  num = len(label_names)
  allowed = np.ones((num, num), bool)
  start, end = np.ones(num, bool), np.ones(num, bool)
  if scheme == "BIO":
    for j, name in enumerate(label_names):
      if name.startswith("I-"):
        start[j] = False
        allowed[:, j] = [p in ("B-" + name[2:], name) for p in label_names]
  return allowed, start, end


def constrain(transitions: Array, start: Array, end: Array, allowed: np.ndarray,
              allowed_start: np.ndarray, allowed_end: np.ndarray) -> tuple[Array, Array, Array]:
  """The CRF scores with every forbidden move set to DISALLOWED (float32)."""
  mask = lambda x, ok: jnp.where(jnp.asarray(ok), x.astype(jnp.float32), DISALLOWED)
  return mask(transitions, allowed), mask(start, allowed_start), mask(end, allowed_end)


# ---------------------------------------------------------------- alignment


def left_align(mask: Array) -> tuple[Array, Array]:
  """The chain's positions moved to the front, in order.

  Args:
    mask: [batch, length], non-zero where a position belongs to the chain.

  Returns:
    (order int32 [batch, length]: the source position of each aligned slot,
    the chain's positions first; lengths int32 [batch]: chain length per row).
    `jnp.take_along_axis(x, order, 1)` aligns x; slots >= length are junk.
  """
  inside = mask > 0
  order = jnp.argsort(jnp.where(inside, 0, 1), axis=1, stable=True).astype(jnp.int32)
  return order, jnp.sum(inside, axis=1).astype(jnp.int32)


def _align(x: Array, order: Array) -> Array:
  """x [batch, length, ...] gathered at order [batch, length]."""
  index = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _prepared(emissions, mask):
  """Left-aligned float32 emissions, the prefix mask, the order and the lengths."""
  order, lengths = left_align(mask)
  e = _align(emissions.astype(jnp.float32), order)  # [batch, length, labels]
  prefix = jnp.arange(e.shape[1])[None, :] < lengths[:, None]  # [batch, length]
  return e, prefix, order, lengths


# ------------------------------------------------------------ likelihood


def _log_partition(e: Array, prefix: Array, transitions: Array, start: Array,
                   end: Array) -> Array:
  """log Z [batch] of left-aligned emissions e [batch, length, labels] (forward algorithm)."""
  def step(alpha, xs):
    e_t, m_t = xs  # [batch, labels], [batch]
    # [batch, previous, next] -> logsumexp over the previous tag.
    nxt = jax.nn.logsumexp(alpha[:, :, None] + transitions[None], axis=1) + e_t
    return jnp.where(m_t[:, None], nxt, alpha), None
  alpha0 = start[None, :] + e[:, 0]  # [batch, labels]
  xs = (jnp.swapaxes(e[:, 1:], 0, 1), jnp.swapaxes(prefix[:, 1:], 0, 1))  # time-major
  alpha, _ = jax.lax.scan(step, alpha0, xs)
  return jax.nn.logsumexp(alpha + end[None, :], axis=-1)


def _path_score(e: Array, tags: Array, prefix: Array, transitions: Array, start: Array,
                end: Array, lengths: Array) -> Array:
  """score(tags) [batch] of left-aligned emissions and tags."""
  w = prefix.astype(jnp.float32)
  emit = jnp.take_along_axis(e, tags[..., None], axis=-1)[..., 0]  # [batch, length]
  moves = transitions[tags[:, :-1], tags[:, 1:]]  # [batch, length - 1]
  last = jnp.take_along_axis(tags, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
  return (start[tags[:, 0]] + jnp.sum(w * emit, axis=1) + jnp.sum(w[:, 1:] * moves, axis=1)
          + end[last])


def crf_log_likelihood(emissions: Array, tags: Array, mask: Array, transitions: Array,
                       start: Array, end: Array) -> Array:
  """log p(tags | emissions) of each row, over the positions in `mask`.

  Args:
    emissions: [batch, length, labels] any float dtype.
    tags: [batch, length] int label ids; values outside `mask` are ignored
      (e.g. -100).
    mask: [batch, length], non-zero at the chain's positions (any subset:
      they are left-aligned first, see the module docstring).
    transitions: [labels, labels] scores indexed [previous, next].
    start, end: [labels] scores of the first and last tag.

  Returns:
    float32 [batch], <= 0; 0 for rows with an empty mask.
  """
  e, prefix, order, lengths = _prepared(emissions, mask)
  t = jnp.where(prefix, jnp.take_along_axis(tags.astype(jnp.int32), order, axis=1), 0)
  params = [x.astype(jnp.float32) for x in (transitions, start, end)]
  ll = _path_score(e, t, prefix, *params, lengths) - _log_partition(e, prefix, *params)
  return jnp.where(lengths > 0, ll, 0.0)


# ---------------------------------------------------------------- Viterbi


def viterbi_decode(emissions: Array, mask: Array, transitions: Array, start: Array,
                   end: Array) -> tuple[Array, Array]:
  """The highest-scoring tag path of each row over the positions in `mask`.

  Args: as `crf_log_likelihood` (without tags); give constrained scores
    (`constrain`) to rule moves out.

  Returns:
    (tags int32 [batch, length] at the original positions, 0 outside `mask`;
    score float32 [batch], the best path's score, 0 for empty rows).
  """
  e, prefix, order, lengths = _prepared(emissions, mask)
  transitions, start, end = (x.astype(jnp.float32) for x in (transitions, start, end))
  num = e.shape[-1]

  def forward(delta, xs):
    e_t, m_t = xs
    cand = delta[:, :, None] + transitions[None]  # [batch, previous, next]
    best = jnp.argmax(cand, axis=1).astype(jnp.int32)  # [batch, next]
    # Past the chain's end the path stands still: identity backpointers.
    keep = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), best.shape)
    return (jnp.where(m_t[:, None], jnp.max(cand, axis=1) + e_t, delta),
            jnp.where(m_t[:, None], best, keep))
  delta0 = start[None, :] + e[:, 0]
  xs = (jnp.swapaxes(e[:, 1:], 0, 1), jnp.swapaxes(prefix[:, 1:], 0, 1))
  delta, pointers = jax.lax.scan(forward, delta0, xs)  # pointers [length - 1, batch, labels]
  final = delta + end[None, :]
  last = jnp.argmax(final, axis=-1).astype(jnp.int32)  # [batch]

  def backward(tag, bp):
    previous = jnp.take_along_axis(bp, tag[:, None], axis=1)[:, 0]
    return previous, tag
  first, rest = jax.lax.scan(backward, last, pointers, reverse=True)
  path = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)  # aligned
  path = jnp.where(prefix, path, 0)
  # Back to the original positions: slot j of row b came from order[b, j].
  inverse = jnp.argsort(order, axis=1)
  tags = jnp.where(mask > 0, jnp.take_along_axis(path, inverse, axis=1), 0)
  return tags.astype(jnp.int32), jnp.where(lengths > 0, jnp.max(final, axis=-1), 0.0)


# ------------------------------------------------------------------ the head


class Crf(nn.Module):
  """The CRF's scores: transitions [L, L], start [L], end [L], constrained at use.

  Attributes:
    num_labels: L.
    label_names: the label-id order; when given, the BIO constraints apply
      (None: every move allowed).
  """
  num_labels: int
  label_names: tuple[str, ...] | None = None

  @nn.compact
  def __call__(self) -> tuple[Array, Array, Array]:
    num = self.num_labels
    if self.label_names is not None and len(self.label_names) != num:
      raise ValueError(f"{len(self.label_names)} label names for {num} labels")
    # Replicated: 'classes' and 'next_classes' have no sharding rule (one
    # logical name may appear once per array).
    param = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.float32)
    transitions = param("transitions", (num, num), ("classes", "next_classes"))
    start = param("start", (num,), ("classes",))
    end = param("end", (num,), ("classes",))
    scheme = "none" if self.label_names is None else "BIO"
    rules = allowed_transitions(self.label_names or ("O",) * num, scheme)
    return constrain(transitions, start, end, *rules)


class BertForCrfTokenClassification(nn.Module):
  """Per-token emissions (as BertForTokenClassification) plus a linear-chain CRF.

  Returns {'logits': emissions [batch, length, num_labels], 'transitions'
  [num_labels, num_labels], 'start_transitions' and 'end_transitions'
  [num_labels]}; the CRF scores are constrained (DISALLOWED where the scheme
  forbids a move), so the loss (losses.crf_loss) and Viterbi decoding read
  them as they are. Parameters: 'encoder' (carried over from pretraining),
  'classifier' (the emissions) and 'crf'.
  """
  config: bert.BertConfig
  num_labels: int = 2
  label_names: tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    del mlm_positions
    hidden, _ = bert.BertEncoder(self.config, add_pooler=False, name="encoder")(
        encoder_input_tokens, encoder_type_ids=encoder_type_ids,
        encoder_segment_ids=encoder_segment_ids, encoder_positions=encoder_positions,
        encoder_mask=encoder_mask, enable_dropout=enable_dropout)
    # [batch, length, embed]
    x = layers.Dropout(self.config.dropout_rate)(hidden, deterministic=not enable_dropout)
    emissions = layers.DenseGeneral(self.num_labels, kernel_axes=("embed", "classes"),
                                    dtype=self.config.dtype, name="classifier")(x)
    transitions, start, end = Crf(self.num_labels, self.label_names, name="crf")()
    return {"logits": emissions, "transitions": transitions, "start_transitions": start,
            "end_transitions": end}


def decode(outputs: dict, mask: Array) -> Array:
  """Viterbi tags [batch, length] of the head's outputs over the positions in `mask`."""
  tags, _ = viterbi_decode(outputs["logits"], mask, outputs["transitions"],
                           outputs["start_transitions"], outputs["end_transitions"])
  return tags
