"""Raw pretraining examples from groups of documents, and the per-example objectives.

The pipeline (bert_jax.data.pipeline) processes documents in independent
groups of `group_size` consecutive documents. A group map turns the group's
paragraphs into token ids and cuts them into raw examples (ragged
[examples, (ids)]); a later per-example map applies the objective (masking,
NSP/SOP pairing, span corruption). Nothing here carries state between groups,
so a group can be rebuilt from its raw documents alone (exact resume).

Raw example layout per objective:
  mlm: the group's documents concatenated with one [SEP] between documents
    (RoBERTa FULL-SENTENCES, which may cross documents), cut into chunks of
    seq_length - 2 ids; each example is [CLS] chunk [SEP]. A chunk may start
    or end on the separating [SEP].
  span_corruption: the group's documents concatenated without separator (as
    t5's reduce_concat_tokens), cut into chunks of the raw length from
    span_corruption.compute_input_and_target_lengths; the last may be shorter.
  mlm_nsp / mlm_sop: each document's ids cut into chunks of seq_length - 3
    (chunks never cross documents); each chunk of >= 2 ids is one example
    (shorter chunks, e.g. one-token documents, make none). The chunk is later
    split into A and B at a uniformly random TOKEN point (the original splits
    at sentence boundaries; paragraphs are too long to be the unit here).
    For NSP a "random other" chunk from a different document of the same
    group is drawn per chunk; a group with a single document has none, and
    its examples are then always true continuations (label 0).
Documents that tokenize to nothing are dropped; one-token documents simply
join the mlm / span corruption streams.
"""
from typing import Dict

import tensorflow as tf

from bert_jax.data import masking
from bert_jax.data import span_corruption as span_lib


def tokenize_documents(tokenizer, docs: tf.RaggedTensor, return_paragraph_lengths: bool = False):
  """[G, (paragraphs)] strings -> [G', (ids)] int32, a document's paragraphs joined.

  Documents with no ids are dropped (G' <= G). With `return_paragraph_lengths`
  also returns int64 [P] ids per paragraph (for the pipeline's statistics).
  """
  ids = tokenizer.tokenize(docs.flat_values)  # [P, (ids)]
  per_doc = docs.with_flat_values(ids).merge_dims(1, 2)  # [G, (ids)]
  per_doc = tf.cast(per_doc, tf.int32)
  per_doc = tf.ragged.boolean_mask(per_doc, per_doc.row_lengths() > 0)
  if return_paragraph_lengths:
    return per_doc, tf.cast(ids.row_lengths(), tf.int64)
  return per_doc


def _split_stream(flat: tf.Tensor, length: int) -> tf.RaggedTensor:
  """[n] ids -> [ceil(n / length), (<= length)] consecutive chunks."""
  n = tf.size(flat, out_type=tf.int64)
  splits = tf.concat([tf.range(0, n, length, dtype=tf.int64), [n]], 0)
  return tf.RaggedTensor.from_row_splits(flat, splits)


def mlm_examples(doc_ids: tf.RaggedTensor, seq_length: int, cls_id: int,
                 sep_id: int) -> tf.RaggedTensor:
  """RoBERTa full-sentences: [G, (ids)] -> [C, (<= seq_length)] [CLS] chunk [SEP]."""
  num_docs = doc_ids.nrows()
  seps = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([num_docs, 1]), sep_id))
  flat = tf.concat([doc_ids, seps], axis=1).flat_values[:-1]  # no [SEP] after the last
  chunks = _split_stream(flat, seq_length - 2)  # [C, (ids)]
  c = chunks.nrows()
  cls = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([c, 1]), cls_id))
  sep = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([c, 1]), sep_id))
  return tf.concat([cls, chunks, sep], axis=1)


def t5_examples(doc_ids: tf.RaggedTensor, tokens_length: int) -> tf.RaggedTensor:
  """t5 concat-and-split: [G, (ids)] -> [C, (<= tokens_length)] raw chunks."""
  return _split_stream(doc_ids.flat_values, tokens_length)


def document_chunks(doc_ids: tf.RaggedTensor, max_num_tokens: int, min_tokens: int = 2):
  """Per-document chunks of <= max_num_tokens ids, never crossing documents.

  Args:
    doc_ids: [G, (ids)] int32, no empty rows.
    max_num_tokens: chunk length.
    min_tokens: shorter chunks are dropped.

  Returns:
    (chunks [C, (ids)], chunk_doc int64 [C] document row of each chunk).
  """
  lengths = doc_ids.row_lengths()  # [G]
  num_chunks = (lengths + max_num_tokens - 1) // max_num_tokens  # [G]
  first_chunk = tf.cumsum(num_chunks, exclusive=True)  # [G]
  doc_of_id = doc_ids.value_rowids()  # [N]
  pos = tf.range(tf.size(doc_of_id, out_type=tf.int64)) - tf.gather(doc_ids.row_starts(),
                                                                     doc_of_id)
  chunk_of_id = tf.gather(first_chunk, doc_of_id) + pos // max_num_tokens
  total = tf.reduce_sum(num_chunks)
  chunks = tf.RaggedTensor.from_value_rowids(doc_ids.flat_values, chunk_of_id, nrows=total)
  chunk_doc = tf.repeat(tf.range(tf.size(lengths, out_type=tf.int64)), num_chunks)
  keep = chunks.row_lengths() >= min_tokens
  return tf.ragged.boolean_mask(chunks, keep), tf.boolean_mask(chunk_doc, keep)


def random_other_chunk(chunk_doc: tf.Tensor, seed):
  """For each chunk, a uniformly random chunk of ANOTHER document of the group.

  Args:
    chunk_doc: int64 [C] document of each chunk, non-decreasing.
    seed: int [2] stateless seed.

  Returns:
    (index int64 [C] of the chosen chunk (its own index when there is none),
     has_other bool [C]).
  """
  c = tf.size(chunk_doc, out_type=tf.int64)
  idx = tf.range(c)
  # A document's chunks are contiguous: [start, start + count).
  num_docs = tf.reduce_max(tf.concat([chunk_doc, [-1]], 0)) + 1
  start = tf.math.unsorted_segment_min(idx, chunk_doc, num_docs)
  count = tf.math.unsorted_segment_sum(tf.ones_like(idx), chunk_doc, num_docs)
  own_start, own_count = tf.gather(start, chunk_doc), tf.gather(count, chunk_doc)
  others = c - own_count  # [C]
  u = tf.random.stateless_uniform([c], seed, dtype=tf.float64)
  r = tf.minimum(tf.cast(u * tf.cast(others, tf.float64), tf.int64), tf.maximum(others - 1, 0))
  # Number the other chunks 0 .. others-1, skipping the own document's block.
  index = tf.where(r < own_start, r, r + own_count)
  has_other = others > 0
  return tf.where(has_other, index, idx), has_other


def nsp_examples(doc_ids: tf.RaggedTensor, seq_length: int, seed) -> Dict[str, tf.RaggedTensor]:
  """Chunks for mlm_nsp plus, per chunk, a random chunk of another document."""
  chunks, chunk_doc = document_chunks(doc_ids, seq_length - 3)
  index, has_other = random_other_chunk(chunk_doc, seed)
  return dict(tokens=chunks, random_tokens=tf.gather(chunks, index), has_other=has_other)


def sop_examples(doc_ids: tf.RaggedTensor, seq_length: int) -> Dict[str, tf.RaggedTensor]:
  """Chunks for mlm_sop (each split later into two ordered halves)."""
  chunks, _ = document_chunks(doc_ids, seq_length - 3)
  return dict(tokens=chunks)


def _split_point(tokens, seed):
  """A and B of a chunk of n >= 2 ids, cut at a uniform point in [1, n - 1]."""
  n = tf.size(tokens)
  cut = tf.random.stateless_uniform([], seed, 1, tf.maximum(n, 2), tf.int32)
  return tokens[:cut], tokens[cut:]


def apply_objective(ex, seed, *, objective: str, cfg, vocab, tokenizer, mask: bool = True):
  """Applies the objective to one raw example; returns unpadded features.

  Args:
    ex: dict with `tokens` int32 [n] (+ random_tokens, has_other for NSP).
    seed: int [2] stateless seed of this example.
    objective: 'mlm', 'mlm_nsp', 'mlm_sop' or 'span_corruption'.
    cfg: the data config (masking, rates, lengths).
    vocab: masking.VocabInfo (MLM objectives) or None.
    tokenizer: the tokenizer (span corruption: vocab_size, eos_id).
    mask: MLM objectives: apply masking.mask_tokens here. False leaves the
      tokens unmasked (no mlm_* keys) for batch_masking after batching.

  Returns:
    MLM: encoder_input_tokens [n'], mlm_* [max_predictions] (+ encoder_type_ids,
    nsp_labels for NSP/SOP). Span corruption: inputs [n_in], targets [n_tgt].
  """
  tokens = ex["tokens"]
  if objective == "span_corruption":
    return span_lib.span_corruption(
        tokens, seed, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
        noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length)
  s_split, s_pair, s_mask = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  extra = {}
  if objective == "mlm_nsp":
    a, b = _split_point(tokens, s_split)
    prob = tf.where(ex["has_other"], 0.5, 0.0)
    extra = masking.nsp_pair(a, b, ex["random_tokens"], s_pair, vocab,
                             max_seq_length=cfg.seq_length, random_next_prob=prob)
    tokens = extra.pop("encoder_input_tokens")
  elif objective == "mlm_sop":
    a, b = _split_point(tokens, s_split)
    extra = masking.sop_pair(a, b, s_pair, vocab, max_seq_length=cfg.seq_length)
    tokens = extra.pop("encoder_input_tokens")
  if not mask:
    return dict(encoder_input_tokens=tokens, **extra)
  out = masking.mask_tokens(
      tokens, s_mask, vocab, max_predictions=cfg.max_predictions, scheme=cfg.masking,
      rate=cfg.mask_rate, mask_prob=cfg.mask_prob, random_prob=cfg.random_prob)
  out.update(extra)
  return out
