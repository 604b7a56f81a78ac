"""Tests of bert_jax.data.examples: chunking and the vectorised NSP/SOP pairing.

The pairing is checked against a plain sequential Python version of the
rules in the examples module docstring (original BERT's
create_instances_from_document with paragraphs as segments): exactly, when
both read the same draws, and in distribution, when the reference draws
fresh coins per pair as the original does.
"""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import examples as examples_lib


def _reference_chunks(rows, max_num_tokens, min_tokens):
  chunks, docs = [], []
  for d, row in enumerate(rows):
    for s in range(0, len(row), max_num_tokens):
      if len(row[s:s + max_num_tokens]) >= min_tokens:
        chunks.append(row[s:s + max_num_tokens])
        docs.append(d)
  return chunks, docs


@pytest.mark.parametrize("min_tokens", [1, 2, 3])
def test_document_chunks_match_a_reference(min_tokens):
  rng = np.random.default_rng(min_tokens)
  fn = tf.function(lambda r, m: examples_lib.document_chunks(r, m, min_tokens),
                   reduce_retracing=True)
  for trial in range(12):
    rows = [rng.integers(1, 99, size=int(rng.choice([0, 1, 2, 3, 7, 12, 25]))).tolist()
            for _ in range(int(rng.integers(0, 6)))]
    ragged = tf.RaggedTensor.from_row_lengths(
        tf.constant(sum(rows, []), tf.int32), tf.constant([len(r) for r in rows], tf.int64))
    for m in (1, 2, 5):
      chunks, docs = (fn(ragged, m) if trial % 2
                      else examples_lib.document_chunks(ragged, m, min_tokens))
      want_chunks, want_docs = _reference_chunks(rows, m, min_tokens)
      assert chunks.to_list() == want_chunks, (rows, m)
      assert docs.numpy().tolist() == want_docs and docs.dtype == tf.int64


def test_chain_from_zero_is_the_walk():
  rng = np.random.default_rng(0)
  fn = tf.function(examples_lib._chain_from_zero, reduce_retracing=True)
  for s in [0, 1, 2, 3, 5, 17, 64, 200]:
    for _ in range(5):
      nxt = np.array([rng.integers(i + 1, min(i + 4, s) + 1) for i in range(s)], np.int64)
      want, i = np.zeros(s, bool), 0
      while i < s:
        want[i], i = True, nxt[i]
      np.testing.assert_array_equal(fn(tf.constant(nxt, tf.int64)).numpy(), want)


def _draw(u, lo, hi):
  return lo + min(int(u * (hi - lo + 1)), hi - lo)


def _reference_pairs(splits, seg_doc, draws, m, short_seq_prob, random_next):
  """The pairing rules, one pair at a time; draws(step, start) -> 6 uniforms."""
  s = len(seg_doc)
  num_docs = max(seg_doc) + 1 if s else 0
  doc_start = [seg_doc.index(d) for d in range(num_docs)]
  doc_limit = [s - seg_doc[::-1].index(d) for d in range(num_docs)]

  def first_reaching(start, length):  # segments [start, k) hold >= length ids
    return next((k for k in range(s + 1) if splits[k] >= splits[start] + length), s + 1)

  out, i, step = [], 0, 0
  while i < s:
    u = draws(step, i)
    target = _draw(u[1], 2, m) if u[0] < short_seq_prob else m
    d = seg_doc[i]
    end = min(max(first_reaching(i, target), i + 2), doc_limit[d])
    n, length = end - i, splits[i + 1] - splits[i]
    is_random = random_next and num_docs >= 2 and u[3] < 0.5
    a_end = _draw(u[2], 1, max(n - 1, 1))
    a = (splits[i], splits[i + a_end] if n >= 2 else splits[i + 1] if is_random
         else splits[i] + _draw(u[2], 1, max(length - 1, 1)))
    if is_random:  # whole segments of another document from a random one on
      r = _draw(u[4], 0, num_docs - 2)
      other = r if r < d else r + 1
      start = _draw(u[5], doc_start[other], doc_limit[other] - 1)
      limit = min(max(first_reaching(start, target - (a[1] - a[0])), start + 1),
                  doc_limit[other])
      b = (splits[start], splits[limit])
    else:
      b = (a[1], splits[end])
    if n >= 2 or length >= 2:
      out.append((a[0], a[1], b[0], b[1], int(is_random), target))
    i = i + a_end if is_random and n >= 2 else end
    step += 1
  return out


def _group(rng, num_docs, m):
  """Segment row splits and documents: paragraphs of 1..m ids, some documents of one."""
  lengths, seg_doc = [], []
  for d in range(num_docs):
    for _ in range(int(rng.choice([1, 1, 2, 3, 6, 10]))):
      lengths.append(int(rng.choice([1, rng.integers(2, m + 1), rng.integers(2, 6), m])))
      seg_doc.append(d)
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist(), seg_doc


def _pairs_fn(m, random_next):
  return tf.function(lambda splits, doc, seed, p: examples_lib.pair_segments(
      splits, doc, seed, max_num_tokens=m, short_seq_prob=p, random_next=random_next),
      reduce_retracing=True)


def _as_rows(out):
  keys = ("a_start", "a_limit", "b_start", "b_limit", "nsp_labels", "target")
  return list(zip(*(out[k].numpy().tolist() for k in keys)))


@pytest.mark.parametrize("random_next", [True, False])
def test_pairs_follow_the_sequential_rules(random_next):
  # Same draws (row i of one [6, S] block for a chunk starting at segment i):
  # the vectorised pairs equal the one-at-a-time reference exactly.
  m, rng = 13, np.random.default_rng(1)
  fn = _pairs_fn(m, random_next)
  total, labels = 0, set()
  for trial, num_docs in enumerate([0, 1, 1, 2, 3, 5, 8, 8, 12, 12]):
    splits, seg_doc = _group(rng, num_docs, m)
    seed = tf.constant([trial, 5], tf.int64)
    p = [0.0, 0.3, 1.0][trial % 3]
    got = _as_rows(fn(tf.constant(splits, tf.int64), tf.constant(seg_doc, tf.int64), seed,
                      tf.constant(p, tf.float64)))
    u = tf.random.stateless_uniform([6, len(seg_doc)], seed, dtype=tf.float64).numpy()
    want = _reference_pairs(splits, seg_doc, lambda step, i: u[:, i], m, p, random_next)
    assert got == want, (trial, splits, seg_doc)
    total += len(got)
    labels |= {row[4] for row in got}
  assert total > 60 and labels == ({0, 1} if random_next else {0})


def test_pairs_have_the_distribution_of_fresh_draws_per_pair():
  # The original draws new coins per pair (step); the vectorised version keys
  # them by the chunk's first segment. The walk's starts increase, so both
  # use i.i.d. coins: the number of pairs (which the put-back of a random
  # next changes), labels, targets and lengths agree in distribution.
  m, p, runs = 13, 0.3, 400
  splits, seg_doc = _group(np.random.default_rng(2), 6, m)
  fn = _pairs_fn(m, True)
  ours = [_as_rows(fn(tf.constant(splits, tf.int64), tf.constant(seg_doc, tf.int64),
                      tf.constant([9, r], tf.int64), tf.constant(p, tf.float64)))
          for r in range(runs)]
  rng = np.random.default_rng(3)
  fresh = [_reference_pairs(splits, seg_doc, lambda step, i: rng.random(6), m, p, True)
           for _ in range(runs)]

  def stats(groups):
    rows = np.array([row for g in groups for row in g], np.float64)
    return dict(pairs=np.array([len(g) for g in groups], np.float64), label=rows[:, 4],
                short=(rows[:, 5] < m).astype(np.float64), a=rows[:, 1] - rows[:, 0],
                b=rows[:, 3] - rows[:, 2])

  a, b = stats(ours), stats(fresh)
  for k in a:  # means within 4.5 standard errors of their difference
    se = np.sqrt(a[k].var() / len(a[k]) + b[k].var() / len(b[k]))
    assert abs(a[k].mean() - b[k].mean()) < 4.5 * se + 1e-9, (k, a[k].mean(), b[k].mean())
  assert 0.45 < a["label"].mean() < 0.55 and a["pairs"].var() > 0


@pytest.mark.parametrize("random_next", [True, False])
def test_pair_examples_of_small_groups(random_next):
  # No document with ids, or only one-id documents -> no pair; one document
  # -> never a random next, every id used once. In a graph, as in the pipeline.
  fn = tf.function(lambda r: examples_lib.pair_examples(
      r, 8, tf.constant([1, 2], tf.int64), short_seq_prob=0.1, random_next=random_next))
  ragged = lambda docs: tf.ragged.constant(docs, dtype=tf.int32, ragged_rank=2)
  empty = fn(tf.RaggedTensor.from_nested_row_lengths(
      tf.zeros([0], tf.int32), [tf.constant([2, 0], tf.int64), tf.constant([0, 0], tf.int64)]))
  assert empty["tokens_a"].nrows() == 0 and empty["target"].shape == (0,)
  assert fn(ragged([[[20]], [[21]], [[22]]]))["target"].shape == (0,)
  one = fn(ragged([[[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]]))
  a, b = one["tokens_a"].to_list(), one["tokens_b"].to_list()
  assert a and all(x and y for x, y in zip(a, b))
  assert [i for x, y in zip(a, b) for i in x + y] == list(range(5, 15))
  if random_next:
    assert one["nsp_labels"].numpy().tolist() == [0] * len(a)
