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
  mlm with data.pack (ModernBERT's unpadding): each document cut into chunks of
    seq_length - 2 ids, each example [CLS] chunk [SEP], and the group's
    examples packed in order into rows of seq_length: an example opens a new
    row when it does not fit. Segment ids (1, 2, ... within a row) keep
    attention inside an example and positions restart at each one, so no
    row crosses a document and only a row's tail is padding.
  span_corruption: the group's documents concatenated without separator (as
    t5's reduce_concat_tokens), cut into chunks of the raw length from
    span_corruption.compute_input_and_target_lengths; the last may be shorter.
  mlm_nsp / mlm_sop: original BERT's create_instances_from_document with a
    paragraph (one input line) as its "sentence" segment; paragraphs longer
    than seq_length - 3 ids are first cut into pieces of that length, each
    piece a segment. Per pair (`pair_segments`): a target length (seq_length
    - 3, or with short_seq_prob a random int in [2, seq_length - 3]); whole
    segments of one document are gathered until they reach the target; A is
    the first a_end of them (random, >= 1), B the rest (label 0) or, for NSP
    with probability 1/2, segments of a random other document of the group
    from a random start until A + B reach the target (label 1; the unused
    segments are put back, as the original does). The pair is later
    truncated to the target (`masking.labelled_pair`). SOP takes B always
    from the rest; the per-example map swaps the order half the time.
    Two deviations, because paragraphs are far longer than sentences: a
    chunk takes at least two segments when its document has them (else a
    chunk of one long paragraph would always be a random next, a length cue
    for the NSP head), and a chunk that is a single segment (the last
    paragraph left in its document) is cut at a random token into A and B
    (>= 2 ids needed; with fewer it makes no example, like a one-token
    document; for a random next A is the whole segment, as the original).
    Truncating to the target rather than to seq_length - 3 makes short
    targets give short examples with paragraph-long segments. The target is
    drawn per pair (the original draws it per document). A group
    with a single document has no random other: its pairs are all label 0.
Documents that tokenize to nothing are dropped; one-token documents simply
join the mlm / span corruption streams.
"""
from typing import Dict

from bert_jax.host_tf import tf

from bert_jax.data import denoising
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


def tokenize_paragraphs(tokenizer, docs: tf.RaggedTensor) -> tf.RaggedTensor:
  """[G, (paragraphs)] strings -> [G, (paragraphs), (ids)] int32 (empty rows kept)."""
  ids = tf.cast(tokenizer.tokenize(docs.flat_values), tf.int32)  # [P, (ids)]
  return docs.with_flat_values(ids)


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


def packed_mlm_rows(doc_ids: tf.RaggedTensor, seq_length: int, cls_id: int,
                    sep_id: int) -> Dict[str, tf.Tensor]:
  """[G, (ids)] -> rows of per-document [CLS] chunk [SEP] examples, packed in order.

  Returns:
    dict of int32 [R, seq_length]: tokens (0-padded), segment_ids (1, 2, ...
    per example of the row, 0 on padding) and positions (from 0 in each
    example).
  """
  chunks, _ = document_chunks(doc_ids, seq_length - 2, min_tokens=1)  # [C, (ids)]
  c = chunks.nrows()
  cls = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([c, 1]), cls_id))
  sep = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([c, 1]), sep_id))
  examples = tf.concat([cls, chunks, sep], axis=1)  # [C, (<= seq_length)]
  lengths = tf.cast(examples.row_lengths(), tf.int32)  # [C]

  def place(state, length):  # state: (row, used, start) of the previous example
    opens = state[1] + length > seq_length
    row = tf.where(opens, state[0] + 1, state[0])
    start = tf.where(opens, 0, state[1])
    return tf.stack([row, start + length, start])

  # Greedy and sequential: the layout depends on the group alone (exact resume).
  placed = tf.scan(place, lengths, initializer=tf.constant([-1, seq_length, 0]))  # [C, 3]
  rows, starts = placed[:, 0], placed[:, 2]
  num_rows = tf.maximum(tf.reduce_max(rows) + 1, 0)
  index = tf.range(tf.size(lengths))
  first_of_row = tf.math.unsorted_segment_min(index, rows, num_rows)  # [R]
  segment = index - tf.gather(first_of_row, rows) + 1  # [C] 1-based within its row
  token_row = tf.repeat(rows, lengths)  # [T]
  position = tf.cast(tf.range(tf.size(token_row)), tf.int64) - tf.repeat(
      examples.row_starts(), lengths)  # [T] within its example
  position = tf.cast(position, tf.int32)
  where = tf.stack([token_row, tf.repeat(starts, lengths) + position], 1)  # [T, 2]
  shape = tf.stack([num_rows, seq_length])
  return dict(tokens=tf.scatter_nd(where, examples.flat_values, shape),
              segment_ids=tf.scatter_nd(where, tf.repeat(segment, lengths), shape),
              positions=tf.scatter_nd(where, position, shape))


def t5_examples(doc_ids: tf.RaggedTensor, tokens_length: int) -> tf.RaggedTensor:
  """t5 concat-and-split: [G, (ids)] -> [C, (<= tokens_length)] raw chunks."""
  return _split_stream(doc_ids.flat_values, tokens_length)


def document_chunks(doc_ids: tf.RaggedTensor, max_num_tokens: int, min_tokens: int = 2):
  """Per-document chunks of <= max_num_tokens ids, never crossing documents.

  Args:
    doc_ids: [G, (ids)] int32 (an empty row makes no chunk).
    max_num_tokens: chunk length.
    min_tokens: shorter chunks are dropped.

  Returns:
    (chunks [C, (ids)], chunk_doc int64 [C] document row of each chunk).
  """
  # O(chunks) index arithmetic, no per-id ops: the chunks of a document
  # start every max_num_tokens ids from its start.
  lengths = doc_ids.row_lengths()  # [G]
  num_chunks = (lengths + max_num_tokens - 1) // max_num_tokens  # [G]
  chunk_doc = tf.repeat(tf.range(tf.size(lengths, out_type=tf.int64)), num_chunks)  # [C]
  k = tf.range(tf.reduce_sum(num_chunks)) - tf.gather(tf.cumsum(num_chunks, exclusive=True),
                                                      chunk_doc)  # [C] chunk within document
  starts = tf.gather(doc_ids.row_starts(), chunk_doc) + k * max_num_tokens  # [C]
  flat = doc_ids.flat_values
  if min_tokens <= 1:  # every id in exactly one chunk, in order: the starts are row splits
    n = tf.size(flat, out_type=tf.int64)
    return tf.RaggedTensor.from_row_splits(flat, tf.concat([starts, n[None]], 0),
                                           validate=False), chunk_doc
  limits = tf.minimum(starts + max_num_tokens, tf.gather(doc_ids.row_limits(), chunk_doc))
  keep = limits - starts >= min_tokens
  mask = lambda x: tf.boolean_mask(x, keep)
  return tf.gather(flat, tf.ragged.range(mask(starts), mask(limits))), mask(chunk_doc)


def paragraph_segments(doc_paragraphs: tf.RaggedTensor, max_num_tokens: int):
  """The segments of NSP/SOP pairs: paragraphs, over-long ones cut into pieces.

  Args:
    doc_paragraphs: [G, (paragraphs), (ids)] int32.
    max_num_tokens: longest segment; a longer paragraph becomes pieces of
      this length (the last may be shorter).

  Returns:
    (segments [S, (ids)] in document order (empty paragraphs dropped),
     segment_doc int64 [S]: 0-based index among the documents that have ids,
     non-decreasing).
  """
  paragraphs = doc_paragraphs.values  # [P, (ids)]
  segments, segment_paragraph = document_chunks(paragraphs, max_num_tokens, min_tokens=1)
  doc = tf.gather(doc_paragraphs.value_rowids(), segment_paragraph)  # [S]
  new_doc = tf.not_equal(doc, tf.pad(doc[:-1], [[1, 0]], constant_values=-1))
  return segments, tf.cumsum(tf.cast(new_doc, tf.int64)) - 1


def _draw(u, lo, hi):
  """An int64 in [lo, hi] (hi >= lo) from u uniform in [0, 1)."""
  span = hi - lo + 1
  return lo + tf.minimum(tf.cast(u * tf.cast(span, tf.float64), tf.int64), span - 1)


def _chain_from_zero(nxt):
  """Which nodes the walk 0 -> nxt[0] -> ... visits before it reaches S.

  nxt [S] int64 with i < nxt[i] <= S. Pointer doubling: after k rounds
  `visited` holds the first 2**k nodes of the walk and `jump` is nxt applied
  2**k times, so a walk of m steps takes ceil(log2(m + 1)) rounds of vector
  ops instead of m rounds of scalar ones.

  Returns:
    bool [S].
  """
  s = tf.size(nxt, out_type=tf.int64)
  jump = tf.concat([nxt, s[None]], 0)  # [S + 1]; S (the end) maps to itself
  visited = tf.equal(tf.range(s + 1), 0)  # [S + 1]

  def double(jump, visited):
    landed = tf.math.unsorted_segment_max(tf.cast(visited, tf.int32), jump, s + 1) > 0
    landed.set_shape(visited.shape)  # a static S stays static through the loop
    return tf.gather(jump, jump), visited | landed

  _, visited = tf.while_loop(lambda jump, visited: jump[0] < s, double, (jump, visited))
  return visited[:-1]


def pair_segments(row_splits, segment_doc, seed, *, max_num_tokens: int,
                  short_seq_prob: float, random_next: bool):
  """Chooses the A/B ranges of every pair of a group (module docstring).

  The original is sequential (a random next puts segments back, so where a
  chunk starts depends on the earlier coins). Here every segment i draws the
  coins of a chunk that would start at i, all at once, which fixes the next
  chunk start nxt[i] > i for every i; the chunks are the walk 0 -> nxt[0] ->
  ... (`_chain_from_zero`). The walk's starts increase, so its chunks use
  distinct rows of i.i.d. draws: the pairs have the original's distribution.

  Args:
    row_splits: int64 [S + 1] segment boundaries in the flat ids.
    segment_doc: int64 [S] document of each segment (0-based, non-decreasing).
    seed: int [2] stateless seed of the group.
    max_num_tokens: seq_length - 3.
    short_seq_prob: probability of a random target in [2, max_num_tokens].
    random_next: NSP (B from another document half the time) or SOP (never).

  Returns:
    dict of [C] tensors: a_start, a_limit, b_start, b_limit int64 (ranges in
    the flat ids), nsp_labels int32 (1 = random next), target int32.
  """
  num_segments = tf.size(segment_doc, out_type=tf.int64)
  num_docs = tf.reduce_max(tf.concat([segment_doc, [-1]], 0)) + 1
  i = tf.range(num_segments)  # [S] chunk starts
  doc_start = tf.math.unsorted_segment_min(i, segment_doc, num_docs)  # [D]
  doc_limit = tf.math.unsorted_segment_max(i, segment_doc, num_docs) + 1  # [D]
  at = tf.gather

  def first_reaching(start, length):
    # First k with row_splits[k] >= row_splits[start] + length: segments
    # [start, k) hold at least `length` ids.
    return tf.searchsorted(row_splits, at(row_splits, start) + length, side="left",
                           out_type=tf.int64)

  u = tf.unstack(tf.random.stateless_uniform([6, num_segments], seed, dtype=tf.float64))
  target = tf.where(u[0] < short_seq_prob, _draw(u[1], 2, max_num_tokens),
                    tf.constant(max_num_tokens, tf.int64))  # [S]
  doc = segment_doc
  # chunk [i, end): >= 2 segments while the document has them
  end = tf.minimum(tf.maximum(first_reaching(i, target), i + 2), at(doc_limit, doc))
  n = end - i
  length = at(row_splits, i + 1) - at(row_splits, i)
  is_random = (u[3] < 0.5) & (num_docs >= 2) & random_next
  a_end = _draw(u[2], 1, tf.maximum(n - 1, 1))  # segments in A
  a_start = at(row_splits, i)
  a_limit = tf.where(n >= 2, at(row_splits, i + a_end),
                     tf.where(is_random, at(row_splits, i + 1),
                              a_start + _draw(u[2], 1, tf.maximum(length - 1, 1))))
  # Random next: another document, a random segment of it, then on until A
  # and B reach the target (at least one segment). With one document `other`
  # is the same (unused: is_random is false).
  r = _draw(u[4], 0, tf.maximum(num_docs - 2, 0))
  other = tf.minimum(tf.where(r < doc, r, r + 1), num_docs - 1)
  start = _draw(u[5], at(doc_start, other), at(doc_limit, other) - 1)
  limit = tf.minimum(tf.maximum(first_reaching(start, target - (a_limit - a_start)), start + 1),
                     at(doc_limit, other))
  # The original puts the unused segments of a random-next chunk back.
  nxt = tf.where(is_random & (n >= 2), i + a_end, end)
  keep = _chain_from_zero(nxt) & ((n >= 2) | (length >= 2))
  out = dict(a_start=a_start, a_limit=a_limit,
             b_start=tf.where(is_random, at(row_splits, start), a_limit),
             b_limit=tf.where(is_random, at(row_splits, limit), at(row_splits, end)),
             nsp_labels=tf.cast(is_random, tf.int32), target=tf.cast(target, tf.int32))
  return {k: tf.boolean_mask(v, keep) for k, v in out.items()}


def pair_examples(doc_paragraphs: tf.RaggedTensor, seq_length: int, seed, *,
                  short_seq_prob: float, random_next: bool) -> Dict[str, tf.Tensor]:
  """Raw mlm_nsp (random_next) / mlm_sop examples of one group.

  Args:
    doc_paragraphs: [G, (paragraphs), (ids)] int32 (tokenize_paragraphs).
    seq_length: encoder length ([CLS] A [SEP] B [SEP]).
    seed: int [2] stateless seed of the group.
    short_seq_prob: probability of a short target length.
    random_next: NSP (True) or SOP (False).

  Returns:
    dict: tokens_a, tokens_b [C, (ids)] int32; target int32 [C] (most ids of
    A and B after truncation); NSP also nsp_labels int32 [C].
  """
  segments, segment_doc = paragraph_segments(doc_paragraphs, seq_length - 3)
  pairs = pair_segments(segments.row_splits, segment_doc, seed, max_num_tokens=seq_length - 3,
                        short_seq_prob=short_seq_prob, random_next=random_next)
  flat = segments.flat_values
  out = dict(tokens_a=tf.gather(flat, tf.ragged.range(pairs["a_start"], pairs["a_limit"])),
             tokens_b=tf.gather(flat, tf.ragged.range(pairs["b_start"], pairs["b_limit"])),
             target=pairs["target"])
  if random_next:
    out["nsp_labels"] = pairs["nsp_labels"]
  return out


def apply_objective(ex, seed, *, objective: str, cfg, vocab, tokenizer):
  """Applies the objective to one raw example; returns unpadded features.

  MLM objectives come out unmasked (no mlm_* keys): the pipeline masks whole
  batches afterwards (batch_masking), every row keyed by its example seed.

  Args:
    ex: dict with `tokens` int32 [n] (mlm, span corruption) or tokens_a,
      tokens_b int32, target int32 scalar (+ nsp_labels for NSP).
    seed: int [2] stateless seed of this example.
    objective: 'mlm', 'mlm_nsp', 'mlm_sop', 'span_corruption' or 'denoising'.
    cfg: the data config (lengths, span corruption rates).
    vocab: masking.VocabInfo (MLM objectives) or None.
    tokenizer: the tokenizer (span corruption: vocab_size, eos_id).

  Returns:
    MLM: encoder_input_tokens [n'] (+ encoder_type_ids, nsp_labels for
    NSP/SOP). Span corruption: inputs [n_in], targets [n_tgt].
  """
  if objective == "denoising":
    return denoising.bart_denoising(
        ex["tokens"], seed, options=denoising.options_from_config(cfg), mask_id=vocab.mask_id,
        bos_id=vocab.cls_id, eos_id=vocab.sep_id, word_start=vocab.word_start,
        full_stop=denoising.full_stop_table(tokenizer.pieces), ordinary_ids=vocab.ordinary_ids)
  if objective == "span_corruption":
    return span_lib.span_corruption(
        ex["tokens"], seed, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
        noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length)
  # The pair's stream is the second of three, as when pairs and masks were
  # both made here, so pairs keep their seeds.
  tokens = ex.get("tokens")
  _, s_pair, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  extra = {}
  if objective == "mlm_nsp":
    extra = masking.labelled_pair(ex["tokens_a"], ex["tokens_b"], ex["nsp_labels"], s_pair,
                                  vocab, max_seq_length=cfg.seq_length,
                                  target_length=ex["target"])
    tokens = extra.pop("encoder_input_tokens")
  elif objective == "mlm_sop":
    extra = masking.sop_pair(ex["tokens_a"], ex["tokens_b"], s_pair, vocab,
                             max_seq_length=cfg.seq_length, target_length=ex["target"])
    tokens = extra.pop("encoder_input_tokens")
  return dict(encoder_input_tokens=tokens, **extra)
