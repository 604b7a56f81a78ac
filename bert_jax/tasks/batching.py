"""Batching for fine-tuning: dynamic padding and length bucketing (GLUE, NER, SQuAD).

Fine-tuning features are variable-length token sequences (a sentence, a
sentence pair, a CoNLL sentence), and most of them are much shorter than the
task's `max_length`: padding every one to `max_length` spends most of the
compute of each step on padding tokens, which attention pays for
quadratically. Two helpers cut that waste while keeping the batch contract
(fixed-shape arrays named as the models expect, padding id 0, or the
tokenizer's `pad_id` for RoBERTa vocabularies, whose <pad> is 1):

Dynamic padding. `pad_batch` stacks a list of feature dicts into one batch
padded only to the longest feature in it, rounded up to a `multiple` (8 by
default) so that XLA compiles a handful of shapes, not one per length; or to
an exact `length` where static shapes are wanted. Per-token keys are padded
with their `PAD_VALUES` (0 for tokens/types/segments/positions, -100 for
`token_labels`, which the loss ignores); scalar keys (e.g.
`classifier_labels`) are stacked. `batch_size` adds filler rows, so the last,
short evaluation batch still fits a mesh that needs a fixed batch dimension;
`example_weights` (and `classifier_weights`) mark them 0.0 so metrics skip them.

Length bucketing. Dynamic padding only helps when the examples of one batch
have similar lengths. `bucket_batches` groups example indices by length: in
training it sorts within shuffled pools of `pool_batches` batches and then
shuffles the batch order, so batches stay random (no long-then-short
curriculum) yet carry little padding; in evaluation, where order does not
matter, it sorts everything by length.

On the mesh. Fine-tuning data is small, so every host builds the same global
batch; `on_mesh` puts each host's share of its rows on that host's devices.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np


# Fill value of each padded key; any other key must be a scalar per feature.
PAD_VALUES = {"encoder_input_tokens": 0, "encoder_type_ids": 0, "encoder_segment_ids": 0,
              "encoder_positions": 0, "token_labels": -100}


def padded_length(longest: int, multiple: int = 8, max_length: Optional[int] = None) -> int:
  """`longest` rounded up to a multiple of `multiple`, capped at max_length."""
  length = -(-longest // multiple) * multiple
  return min(length, max_length) if max_length else length


def pad_batch(features: Sequence[Mapping[str, np.ndarray]], *, multiple: int = 8,
              length: Optional[int] = None, batch_size: Optional[int] = None,
              pad_id: int = 0) -> Dict[str, np.ndarray]:
  """Stacks features into one batch, padded to the longest rounded up (dynamic padding).

  Args:
    features: dicts of 1-D per-token arrays (keys in PAD_VALUES) and scalars.
    multiple: the padded length is the longest feature rounded up to this
      (8 keeps the number of compiled shapes small).
    length: pad to exactly this length instead (static shapes).
    batch_size: add filler rows up to this many (e.g. the last, short eval
      batch on a mesh that needs a fixed batch); fillers are padding tokens
      with labels -1 / -100.
    pad_id: the token id that pads `encoder_input_tokens` (the tokenizer's
      pad_id: 0 for BERT vocabularies, 1 for RoBERTa's, whose models find
      padding, and count positions, by that id).

  Returns:
    [batch, length] arrays for per-token keys, [batch] for scalar keys, plus
    'example_weights' float32 [batch] (1.0 real, 0.0 filler: the losses need
    not guess fillers from the pad id) and, when the features carry
    'classifier_labels', the same as 'classifier_weights'.
  """
  if not features:
    raise ValueError("pad_batch needs at least one feature")
  n = len(features)
  rows = batch_size or n
  if rows < n:
    raise ValueError(f"batch_size {batch_size} < number of features {n}")
  longest = max(len(f["encoder_input_tokens"]) for f in features)
  if length is None:
    length = padded_length(longest, multiple)
  elif longest > length:
    raise ValueError(f"a feature has {longest} tokens, more than length {length}")
  batch = {}
  for key in features[0]:
    first = np.asarray(features[0][key])
    if key in PAD_VALUES:
      fill = pad_id if key == "encoder_input_tokens" else PAD_VALUES[key]
      out = np.full((rows, length), fill, first.dtype)  # [batch, length]
      for i, f in enumerate(features):
        out[i, :len(f[key])] = f[key]
    else:
      if first.ndim:
        raise ValueError(f"pad_batch: key {key!r} is neither per-token ({sorted(PAD_VALUES)}) "
                         "nor a scalar")
      out = np.full((rows,), -1, first.dtype)  # [batch]
      out[:n] = [f[key] for f in features]
    batch[key] = out
  batch["example_weights"] = (np.arange(rows) < n).astype(np.float32)
  if "classifier_labels" in batch:
    batch["classifier_weights"] = batch["example_weights"]
  return batch


def bucket_batches(lengths: Sequence[int], batch_size: int, *, seed: Optional[int] = None,
                   pool_batches: int = 50, drop_remainder: bool = False) -> List[np.ndarray]:
  """Indices of batches of similar-length examples (length bucketing).

  With a seed (training): the examples are shuffled, cut into pools of
  `pool_batches * batch_size`, each pool sorted by length and cut into
  batches, and the batch order shuffled, so batches are random yet padded
  little. Without a seed (evaluation): all examples sorted by length.

  Args:
    lengths: tokens of each example.
    batch_size: examples per batch.
    seed: shuffling seed (e.g. hash of run seed and epoch); None = no shuffle.
    pool_batches: batches per sorting pool.
    drop_remainder: drop the last, short batch (training with fixed shapes).

  Returns:
    A list of int arrays, each the example indices of one batch; together
    they cover every example once (minus the dropped remainder).
  """
  lengths = np.asarray(lengths)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if seed is None:
    order = np.argsort(lengths, kind="stable")
  else:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    pool = pool_batches * batch_size
    order = np.concatenate([
        chunk[np.argsort(lengths[chunk], kind="stable")]
        for chunk in np.split(order, range(pool, len(order), pool))]) if len(order) else order
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if drop_remainder and batches and len(batches[-1]) < batch_size:
    batches.pop()
  if seed is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def on_mesh(batch: Mapping[str, np.ndarray], batch_sharding) -> Dict[str, jax.Array]:
  """A global batch every host holds in full -> global arrays split over the batch axis.

  Host p of P contributes rows [p * n, (p + 1) * n) (n = rows / P), which is
  where `batch_sharding`'s device order puts them.
  """
  n = len(next(iter(batch.values()))) // jax.process_count()
  start = jax.process_index() * n
  return {k: jax.make_array_from_process_local_data(batch_sharding, v[start:start + n])
          for k, v in batch.items()}

