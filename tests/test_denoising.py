"""BART noising (bert_jax.data.denoising): the rules of each noise, and the pipeline rows."""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import denoising
from bert_jax.data import masking

MASK, BOS, EOS, STOP = 3, 0, 2, 4  # ids of the synthetic vocabulary below
VOCAB = 400
WORD_START = np.ones(VOCAB, bool)  # every piece begins a word ...
WORD_START[100:] = False  # ... except ids >= 100, continuation pieces
FULL_STOP = np.arange(VOCAB) == STOP
ORDINARY = np.arange(10, VOCAB, dtype=np.int32)


def _seed(i):
  return masking.example_seed(11, 0, i)


def _np(x):
  return np.asarray(x).tolist()


def _infill(tokens, i, *, ratio=0.3, lam=3.0, random=0.0):
  tokens = tf.constant(tokens, tf.int32)
  return _np(denoising.text_infilling(
      tokens, tf.gather(tf.constant(WORD_START), tokens), _seed(i), mask_id=MASK,
      ordinary_ids=tf.constant(ORDINARY), mask_ratio=ratio, poisson_lambda=lam,
      mask_random=random))


def _collapse(original, noised):
  """Aligns a noised chunk to its original: (masks, tokens they replaced) per run of masks.

  Without random replacements, the noised chunk is the original with runs of
  tokens each replaced by one MASK, plus inserted masks; original tokens are
  distinct here, so the alignment of the kept tokens is unique.
  """
  runs, j, k = [], 0, 0
  while k < len(noised):
    if noised[k] == MASK:
      start = k
      while k < len(noised) and noised[k] == MASK:
        k += 1
      end = original.index(noised[k], j) if k < len(noised) else len(original)
      runs.append((k - start, end - j))
      j = end
    else:
      assert original[j] == noised[k], (original, noised)
      j, k = j + 1, k + 1
  assert j == len(original)
  return runs


def test_span_lengths_sum_to_the_budget_and_follow_poisson():
  draws = []
  for i in range(300):
    budget = 1 + i % 40
    lengths = _np(denoising._span_lengths(tf.constant(budget), 3.0, _seed(i)))
    assert sum(lengths) == budget and min(lengths) >= 0
    draws += lengths[:-1]  # the last one is trimmed to the budget
  draws = np.array(draws)
  assert abs(draws.mean() - 3.0) < 0.25, draws.mean()
  assert abs((draws == 0).mean() - np.exp(-3.0)) < 0.03
  assert _np(denoising._span_lengths(tf.constant(0), 3.0, _seed(0))) == []
  probs = denoising.poisson_probs(3.0)
  assert abs(probs.sum() - 1) < 1e-6 and probs[-1] < 1e-7


def test_text_infilling_collapses_word_spans_to_one_mask():
  original = list(range(10, 90))  # 80 distinct one-piece words
  counts, masks = [], []
  for i in range(60):
    noised = _infill(original, i)
    assert noised != original
    runs = _collapse(original, noised)
    counts.append(sum(c for _, c in runs))
    masks.append(sum(m for m, _ in runs))
  # 30% of 80 words = 24, less what overlapping spans share and what
  # 0-length spans (inserts) take of the budget.
  assert 16 <= np.mean(counts) <= 24, np.mean(counts)
  assert max(counts) <= 24
  # Poisson(3) spans: about 24 / 3 = 8 masks a chunk.
  assert 6 <= np.mean(masks) <= 10, np.mean(masks)
  assert _infill(original, 0) == _infill(original, 0)  # a pure function of the seed
  assert _infill(original, 0) != _infill(original, 1)


def test_spans_cover_whole_words():
  # Words of 1-3 pieces: a word start (< 100) then continuation pieces (>= 100).
  rng = np.random.default_rng(0)
  original = []
  for w in range(60):
    original += [10 + w] + [100 + len(original) + j for j in range(rng.integers(0, 3))]
  starts = {t for t in original if t < 100}
  for i in range(30):
    noised = _infill(original, i, lam=8.0)  # P(0) = 3e-4: no inserts, which go anywhere
    # A span begins at a word start and ends before one: the token after a
    # run of masks is a word start. A run of masks covers whole words.
    j = 0
    for k, tok in enumerate(noised):
      if tok == MASK:
        if k + 1 < len(noised) and noised[k + 1] == MASK:
          continue
        nxt = noised[k + 1] if k + 1 < len(noised) else None
        j = original.index(nxt, j) if nxt is not None else len(original)
        assert j == len(original) or original[j] in starts
      else:
        if k > 0 and noised[k - 1] == MASK:
          assert tok in starts  # the first token after a span begins a word
        j = original.index(tok, j) + 1


def test_zero_length_spans_insert_masks_and_random_replacements():
  # At lambda 0.5 most spans have length 0: they insert masks between tokens.
  original = list(range(10, 90))
  grew = 0
  for i in range(20):
    noised = _infill(original, i, lam=0.5)
    kept = [t for t in noised if t != MASK]
    assert all(a < b for a, b in zip(kept, kept[1:]))  # order kept, nothing invented
    grew += len(noised) > len(original) - noised.count(MASK)
  assert grew > 0
  # mask_random = 1: no mask token at all, the spans become ordinary ids.
  noised = _infill(original, 3, random=1.0)
  assert MASK not in noised and len(noised) < len(original)


def test_permute_sentences_keeps_the_sentences():
  sentences = [[10 + s * 5 + j for j in range(3)] + [STOP] for s in range(8)]
  sentences[-1] = sentences[-1][:-1]  # the chunk's end closes the last one
  tokens = sum(sentences, [])
  stop = tf.constant(FULL_STOP)
  out = _np(denoising.permute_sentences(tf.constant(tokens), tf.gather(stop, tokens), _seed(1)))
  assert out != tokens and sorted(out) == sorted(tokens)
  pieces, cur = [], []
  for t in out:
    cur.append(t)
    if t == STOP:
      pieces.append(cur)
      cur = []
  pieces += [cur] if cur else []
  assert sorted(map(tuple, pieces)) == sorted(map(tuple, sentences))
  # ratio 0: nothing moves.
  same = denoising.permute_sentences(tf.constant(tokens), tf.gather(stop, tokens), _seed(1), 0.0)
  assert _np(same) == tokens


def test_deletion_and_rotation():
  tokens = list(range(10, 50))
  out = _np(denoising.delete_tokens(tf.constant(tokens), _seed(2), 0.25))
  assert len(out) == 30 and all(a < b for a, b in zip(out, out[1:]))
  rotated = _np(denoising.rotate(tf.constant(tokens), _seed(3), 1.0))
  at = tokens.index(rotated[0])
  assert at > 0 and rotated == tokens[at:] + tokens[:at]
  assert _np(denoising.rotate(tf.constant(tokens), _seed(3), 0.0)) == tokens


def test_bart_denoising_wraps_in_bos_eos_and_targets_the_chunk():
  tokens = list(range(10, 70))
  opts = denoising.NoiseOptions(permute_sentences=1.0, mask_random=0.0)
  ex = denoising.bart_denoising(tf.constant(tokens), _seed(4), options=opts, mask_id=MASK,
                                bos_id=BOS, eos_id=EOS, word_start=WORD_START,
                                full_stop=FULL_STOP, ordinary_ids=ORDINARY)
  inputs, targets = _np(ex["inputs"]), _np(ex["targets"])
  assert targets == [BOS] + tokens + [EOS]
  assert inputs[0] == BOS and inputs[-1] == EOS and MASK in inputs
  with pytest.raises(ValueError, match="data.mask_ratio"):
    denoising.NoiseOptions(mask_ratio=1.5)


def test_full_stop_table():
  table = denoising.full_stop_table([".", "\u0120.", "\u2581?", "!", "a.", "Ġa", "<s>"])
  assert table.tolist() == [True, True, True, True, False, False, False]
