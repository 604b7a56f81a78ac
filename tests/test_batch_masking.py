"""Tests of batched SpanBERT 'span' and ALBERT 'ngram' masking (bert_jax.data.batch_masking).

The tests compare semantics exactly where the randomness is factored out (the
greedy span pass against a plain sequential loop, conftest.sequential_spans)
and distributions elsewhere: span lengths against the length tables, and
against a plain sequential reference of the whole selection (random anchor
order, a drawn length per anchor, the same greedy rules) run with numpy's
generator on the same rows.
"""
import random

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from bert_jax import defaults
from bert_jax.data import batch_masking
from bert_jax.data import masking
from bert_jax.data import pipeline
from conftest import sequential_spans

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SENTINELS = list(range(990, 1000))
CONT = (500, 990)  # ids in this range are '##' continuation pieces
MAX_PRED = 20
SPAN_SCHEMES = ("span", "ngram")


def _vocab():
  ws = np.ones(V, bool)
  ws[CONT[0]:CONT[1]] = False
  return masking.VocabInfo.create(V, pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                                  special_ids=[UNK, *SENTINELS], word_start=ws)


def _examples(n, length=128, seed=0, cont_frac=0.3, min_real=8):
  """[CLS] a [SEP] b [SEP] + padding, random real lengths, some [UNK]/sentinels."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int32)
  for i in range(n):
    real = rng.integers(min_real, length + 1)
    body = rng.integers(5, CONT[0], real)
    cont = rng.random(real) < cont_frac
    body[cont] = rng.integers(*CONT, cont.sum())
    body[rng.random(real) < 0.02] = UNK
    body[rng.random(real) < 0.01] = SENTINELS[0]
    body[0], body[real // 2], body[real - 1] = CLS, SEP, SEP
    out[i, :real] = body
  return out


def _seeds(n, epoch=0, run_seed=7):
  return batch_masking.example_seeds(run_seed, epoch, tf.range(n)).numpy()


def _run_batch(tokens, seeds, scheme, max_predictions=MAX_PRED, **kw):
  out = batch_masking.mask_tokens_batch(tf.constant(tokens), tf.constant(seeds, tf.int64),
                                        _vocab(), max_predictions=max_predictions,
                                        scheme=scheme, **kw)
  return {k: v.numpy() for k, v in out.items()}


def _budget(row, max_pred=MAX_PRED, rate=0.15):
  return min(max_pred, max(1, round(int((row != PAD).sum()) * rate)))


def _candidates(row):
  return (row > MASK) & ~np.isin(row, SENTINELS)


def _word_starts(row):
  """bool [length]: maskable tokens that begin a word ('##' pieces continue one)."""
  cand = _candidates(row)
  prev = np.concatenate([[False], cand[:-1]])
  cont = (row >= CONT[0]) & (row < CONT[1])
  return cand & (~prev | ~cont)


def _words(row):
  start = _word_starts(row)
  word = np.cumsum(start)
  cand = _candidates(row)
  return [np.flatnonzero(cand & (word == k)) for k in range(1, word[-1] + 1)]


def _check_contract(tokens, out, max_pred=MAX_PRED):
  """Batch contract and invariants of every scheme; returns outcome codes per row."""
  special = _vocab().special
  b = len(tokens)
  for k in ("mlm_positions", "mlm_targets", "mlm_weights"):
    assert out[k].shape == (b, max_pred), k
  assert out["encoder_input_tokens"].shape == tokens.shape
  assert out["mlm_weights"].dtype == np.float32
  assert out["mlm_positions"].dtype == out["mlm_targets"].dtype == np.int32
  codes = []
  for row, inp, pos, tgt, w in zip(tokens, out["encoder_input_tokens"], out["mlm_positions"],
                                   out["mlm_targets"], out["mlm_weights"]):
    num = int(w.sum())
    assert num <= _budget(row, max_pred)
    np.testing.assert_array_equal(w, (np.arange(max_pred) < num).astype(np.float32))
    p = pos[:num]
    assert np.all(np.diff(p) > 0), "positions ascending and distinct"
    assert np.all(_candidates(row[p])), "special tokens and padding never selected"
    np.testing.assert_array_equal(tgt[:num], row[p])
    assert np.all(pos[num:] == 0) and np.all(tgt[num:] == 0)
    untouched = np.ones(len(row), bool)
    untouched[p] = False
    np.testing.assert_array_equal(inp[untouched], row[untouched])
    new = inp[p]
    assert not np.any(special[new] & (new != MASK)), "random replacement is special"
    codes.append(np.where(new == MASK, 0, np.where(new == row[p], 2, 1)))
    chosen = set(p.tolist())
    for word in _words(row):
      hit = {i in chosen for i in word.tolist()}
      assert hit != {True, False}, f"partial word {word} in {sorted(chosen)}"
  return codes


def test_greedy_spans_batch_equals_sequential():
  rng = np.random.default_rng(11)
  # window: attempts of the first pass (the rest follow in a second one).
  for truncate, window in ((True, None), (False, None), (True, 3), (False, 7), (True, 60)):
    fn = tf.function(lambda *a, t=truncate, w=window: batch_masking._greedy_spans_batch(
        *a, t, max_len=10, window=w))
    for _ in range(3):
      rows, width = 64, 50
      anchor, span_len = np.zeros((rows, width), np.int32), np.ones((rows, width), np.int32)
      valid, lengths = np.zeros((rows, width), bool), np.zeros((rows, width), np.int32)
      run_end, budget, cases = np.zeros((rows, width), np.int32), [], []
      for r in range(rows):  # rows of different word counts share the batch
        num = int(rng.integers(1, width + 1))
        lens = rng.integers(1, 4, num)
        run = np.cumsum(rng.random(num) < 0.1) + 1
        anc, sl = rng.permutation(num), rng.integers(1, 11, num)
        budget.append(int(rng.integers(1, 30)))
        anchor[r, :num], span_len[r, :num], valid[r, :num], lengths[r, :num] = anc, sl, 1, lens
        run_end[r, :num] = [np.flatnonzero(run == run[w])[-1] + 1 for w in range(num)]
        cases.append((anc, sl, lens, run, budget[-1]))
      got = fn(anchor, span_len, valid, lengths, run_end, np.array(budget, np.int32)).numpy()
      for r, case in enumerate(cases):
        want = sequential_spans(*case, truncate, label_by_anchor=True)
        assert got[r, :len(want)].tolist() == want, (r, truncate, window)
        assert not got[r, len(want):].any()


def test_span_length_draws_match_the_tables():
  bits = batch_masking.random_bits(batch_masking.row_keys(tf.constant([[3, 4]])),
                                   tf.range(100000), 1)
  for probs in (masking.spanbert_length_probs(), masking.ngram_length_probs()):
    draws = batch_masking._draw_lengths(bits, probs).numpy().ravel()
    assert draws.min() >= 1 and draws.max() <= len(probs)
    counts = np.bincount(draws, minlength=len(probs) + 1)[1:]
    assert stats.chisquare(counts, probs * draws.size).pvalue > 1e-3, counts
  np.testing.assert_allclose(masking.spanbert_length_probs()[:4], [.2241, .1792, .1434, .1147],
                             atol=1e-4)
  np.testing.assert_allclose(masking.ngram_length_probs(), [.5455, .2727, .1818], atol=1e-4)
  with pytest.raises(ValueError, match="span_probs"):
    batch_masking._draw_lengths(bits, [0.0, 0.0])


def _batched_span_words(tokens, scheme, max_pred=MAX_PRED):
  """Words per accepted span, from the batched selection (all rows at once)."""
  vocab = _vocab()
  t = tf.constant(tokens)
  keys = batch_masking.row_keys(tf.constant(_seeds(len(tokens)), tf.int64))
  bits = batch_masking.random_bits(keys, tf.range(tokens.shape[1]), 0)
  cand = tf.logical_not(tf.gather(tf.constant(vocab.special), t))
  budget = batch_masking.num_to_predict_batch(t, PAD, max_pred, 0.15)
  probs = masking.spanbert_length_probs() if scheme == "span" else masking.ngram_length_probs()
  start = batch_masking._select_spans(t, keys, bits, cand, budget, vocab, probs,
                                      scheme == "span").numpy()
  out = []
  for row, s in zip(tokens, start):
    ws = _word_starts(row)
    for first in np.unique(s[s >= 0]):
      members = np.flatnonzero(s == first)
      assert members[0] == first and np.all(np.diff(members) == 1), "contiguous span"
      out.append(int(ws[members].sum()))
  return np.array(out)


def _sequential_span_words(tokens, scheme, seed=1):
  """Words per accepted span from a plain sequential SpanBERT / ALBERT selection.

  Per row, in Python: the words in a uniformly random order as anchors, a
  length in words drawn from the scheme's table per anchor, then the greedy
  attempt-by-attempt pass (conftest.sequential_spans: stop at the end of a
  run of maskable tokens, reject overlaps, SpanBERT keeps the fitting words
  of the span that overflows the budget, ALBERT skips it).
  """
  rng = np.random.default_rng(seed)
  probs = masking.spanbert_length_probs() if scheme == "span" else masking.ngram_length_probs()
  out = []
  for row in tokens:
    words = _words(row)
    if not words:
      continue
    cand = _candidates(row)
    run_of_token = np.cumsum(cand & ~np.concatenate([[False], cand[:-1]]))
    run = [int(run_of_token[w[0]]) for w in words]
    anchor = rng.permutation(len(words))
    span_len = rng.choice(np.arange(1, len(probs) + 1), size=len(words), p=probs)
    owner = np.array(sequential_spans(anchor, span_len, [len(w) for w in words], run,
                                      _budget(row), truncate=scheme == "span"))
    out.extend(np.unique(owner[owner > 0], return_counts=True)[1].tolist())
  return np.array(out)


@pytest.mark.parametrize("scheme", SPAN_SCHEMES)
def test_span_lengths_match_a_sequential_reference(scheme):
  tokens = _examples(2000, cont_frac=0.3)
  ours, theirs = _batched_span_words(tokens, scheme), _sequential_span_words(tokens, scheme)
  assert len(ours) > 5000
  probs = masking.spanbert_length_probs() if scheme == "span" else masking.ngram_length_probs()
  top = 8 if scheme == "span" else 3  # lengths >= 8 share a bin (few of them)
  a = np.bincount(np.minimum(ours, top), minlength=top + 1)[1:]
  b = np.bincount(np.minimum(theirs, top), minlength=top + 1)[1:]
  assert stats.chi2_contingency(np.stack([a, b])).pvalue > 1e-3, (a, b)
  assert abs(ours.mean() - theirs.mean()) < 0.1
  assert abs(len(ours) - len(theirs)) < 0.05 * len(theirs)  # spans per row agree too
  # Long rows of single-piece words and a large budget: spans are rarely cut
  # at a [SEP] or at the budget, so the lengths follow the table; overlap
  # rejection and the last cut shorten a few.
  rng = np.random.default_rng(3)
  long_rows = rng.integers(5, CONT[0], (400, 512)).astype(np.int32)
  long_rows[:, 0], long_rows[:, -1] = CLS, SEP
  lengths = _batched_span_words(long_rows, scheme, max_pred=80)
  hist = np.bincount(lengths, minlength=len(probs) + 1)[1:] / len(lengths)
  assert len(lengths) > 5000 and np.abs(hist - probs).max() < 0.05, (hist, probs)
  assert abs(lengths.mean() - (probs * np.arange(1, len(probs) + 1)).sum()) < 0.6


def test_span_masking_statistics_and_boundaries():
  tokens = _examples(2000, cont_frac=0.3)
  out = _run_batch(tokens, _seeds(len(tokens)), "span")
  codes = _check_contract(tokens, out)
  assert abs(out["mlm_weights"].sum() / (tokens != PAD).sum() - 0.15) < 0.01
  span_codes = []
  for row, c, pos, left, right, w in zip(tokens, codes, out["mlm_positions"],
                                         out["sbo_left_positions"],
                                         out["sbo_right_positions"], out["mlm_weights"]):
    num = int(w.sum())
    np.testing.assert_array_equal(left[num:], 0)
    np.testing.assert_array_equal(right[num:], 0)
    spans = {}
    for k in range(num):
      spans.setdefault((left[k], right[k]), []).append((pos[k], c[k]))
    for (lo, hi), members in spans.items():
      assert [p for p, _ in members] == list(range(lo + 1, hi)), "span is contiguous"
      outcomes = {o for _, o in members}
      # One draw per span; a random replacement may equal the original (p ~ 1/1000).
      assert len(outcomes) == 1 or outcomes == {1, 2}, outcomes
      span_codes.append(0 if outcomes == {0} else 2 if outcomes == {2} else 1)
  frac = np.bincount(span_codes, minlength=3) / len(span_codes)
  assert len(span_codes) > 5000
  assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.015, frac
  # Single-piece words: SpanBERT's cut at the end fills the budget exactly.
  single = _examples(300, cont_frac=0.0, min_real=40)
  filled = _run_batch(single, _seeds(300), "span")
  for row, w in zip(single, filled["mlm_weights"]):
    assert int(w.sum()) == _budget(row)


def test_ngram_masking_statistics():
  tokens = _examples(2000, cont_frac=0.3)
  out = _run_batch(tokens, _seeds(len(tokens)), "ngram")
  assert "sbo_left_positions" not in out
  codes = np.concatenate(_check_contract(tokens, out))
  assert abs(out["mlm_weights"].sum() / (tokens != PAD).sum() - 0.15) < 0.01
  frac = np.bincount(codes, minlength=3) / len(codes)
  # Per-token outcomes, as BERT.
  assert abs(frac[0] - 0.8) < 0.012 and abs(frac[1] - 0.1) < 0.01, frac


@pytest.mark.parametrize("scheme", SPAN_SCHEMES)
def test_spans_skip_or_cut_what_does_not_fit(scheme):
  # Budget 2 (round(12 * .15)): a 9-piece word never fits; the 1-piece word
  # at position 10 is taken (an n-gram/span from it ends at [SEP]).
  row = np.array([CLS, 10] + [600] * 8 + [20, SEP], np.int32)[None].repeat(200, 0)
  out = _run_batch(row, _seeds(200), scheme)
  assert set(out["mlm_positions"][out["mlm_weights"] > 0].tolist()) == {10}
  np.testing.assert_array_equal(out["mlm_weights"].sum(1), 1)
  # Spans stop at specials: no span crosses the [SEP] in the middle.
  tokens = _examples(300, cont_frac=0.0)
  probs = [0.0] * 9 + [1.0]  # always ask for 10 words
  out = _run_batch(tokens, _seeds(300), scheme, span_probs=probs)
  _check_contract(tokens, out)
  for row, pos, w in zip(tokens, out["mlm_positions"], out["mlm_weights"]):
    p = pos[:int(w.sum())]
    sep = np.flatnonzero(row == SEP)[0]
    assert not np.any((p[:-1] < sep) & (p[1:] > sep) & (p[1:] - p[:-1] == 1))


@pytest.mark.parametrize("scheme", SPAN_SCHEMES)
def test_rows_depend_only_on_their_own_seed(scheme):
  tokens = _examples(24, length=64)
  seeds = _seeds(24)
  whole = _run_batch(tokens, seeds, scheme)
  np.testing.assert_equal(whole, _run_batch(tokens, seeds, scheme))  # deterministic
  # The same rows among other neighbours, in another order, padded longer.
  other = _examples(24, length=64, seed=5)
  mixed = np.concatenate([other[:7], tokens[[3, 17, 0]], other[7:]])
  mixed_seeds = np.concatenate([_seeds(7, run_seed=9), seeds[[3, 17, 0]], _seeds(17, epoch=2)])
  got = _run_batch(np.pad(mixed, [[0, 0], [0, 30]]), mixed_seeds, scheme)
  for j, i in enumerate((3, 17, 0)):
    for k in whole:
      want = whole[k][i]
      have = got[k][7 + j][:64] if k == "encoder_input_tokens" else got[k][7 + j]
      np.testing.assert_array_equal(have, want, err_msg=f"{k} row {i}")
  again = _run_batch(tokens, _seeds(24, epoch=1), scheme)
  assert (again["mlm_positions"] != whole["mlm_positions"]).any(axis=1).mean() > 0.8


@pytest.mark.parametrize("scheme", SPAN_SCHEMES)
def test_edge_rows_and_graph_mode(scheme):
  # Nothing maskable, shorter than max_predictions, all padding.
  tokens = np.zeros((3, 8), np.int32)
  tokens[0, :3] = [CLS, SEP, SEP]
  tokens[1, :5] = [CLS, 9, 10, 11, SEP]
  out = _run_batch(tokens, _seeds(3), scheme, max_predictions=20)
  assert out["mlm_positions"].shape == (3, 20)
  np.testing.assert_array_equal(out["mlm_weights"].sum(1), [0, 1, 0])
  np.testing.assert_array_equal(out["encoder_input_tokens"][[0, 2]], tokens[[0, 2]])
  # Inside tf.data (graph mode, unknown batch size): static widths.
  ds = tf.data.Dataset.from_tensor_slices((_examples(10), _seeds(10))).batch(4).map(
      lambda t, s: batch_masking.mask_tokens_batch(t, s, _vocab(), max_predictions=MAX_PRED,
                                                   scheme=scheme))
  spec = ds.element_spec
  keys = ["mlm_positions", "mlm_targets"] + (
      ["sbo_left_positions", "sbo_right_positions"] if scheme == "span" else [])
  for k in keys:
    assert spec[k].shape.as_list() == [None, MAX_PRED] and spec[k].dtype == tf.int32, k
  assert spec["mlm_weights"].dtype == tf.float32
  assert sum(int(b["mlm_weights"].sum()) for b in ds.as_numpy_iterator()) > 0


def _write_corpus(path):
  words = ("the of and to in is was for on are with as his they be at one have this from "
           "unbelievably hippopotamus photosynthesis extraordinarily incomprehensible").split()
  rng = random.Random(0)
  docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 25))) + "."
                    for _ in range(rng.randint(1, 4))) for _ in range(40)]
  path.write_text("\n\n".join(docs) + "\n")
  return str(path)


def test_pipeline_masks_spans_after_batching(minilm_dir, tmp_path):
  # One pipeline run (slow to build); 'ngram' takes the same route. Row
  # independence of the batched masks is tested above, on mask_tokens_batch.
  cfg = defaults.data_config()
  cfg.tokenizer = str(minilm_dir / "vocab.txt")
  cfg.source = _write_corpus(tmp_path / "docs.txt")
  cfg.seq_length, cfg.max_predictions, cfg.group_size, cfg.num_shards = 32, 6, 2, 1
  for cfg.masking in SPAN_SCHEMES:
    assert pipeline._batch_masked(cfg)  # runs after batching, not per example
  cfg.masking = "span"
  it = pipeline.make_train_iterator(cfg, seed=2, batch_size=4)
  tok, spans = it.tokenizer, 0
  for _ in range(4):
    batch = next(it)
    w = batch["mlm_weights"]
    assert w.shape == (4, 6) and (w.sum(1) > 0).all()
    assert not tok.special[batch["mlm_targets"][w > 0]].any()
    for k in ("mlm_positions", "mlm_targets", "sbo_left_positions", "sbo_right_positions"):
      assert batch[k].shape == (4, 6) and batch[k].dtype == np.int32, k
      np.testing.assert_array_equal(batch[k][w == 0], 0, err_msg=k)
    for r in range(4):
      n = int(w[r].sum())
      left, right = batch["sbo_left_positions"][r, :n], batch["sbo_right_positions"][r, :n]
      pos = batch["mlm_positions"][r, :n]
      assert np.all((left < pos) & (pos < right))
      spans += len(set(zip(left.tolist(), right.tolist())))
      # A span ends at a word end: the token after it is no '##' piece.
      after = batch["encoder_input_tokens"][r][np.minimum(right, 31)]
      orig = dict(zip(pos.tolist(), batch["mlm_targets"][r, :n].tolist()))
      after = [orig.get(int(p), int(a)) for p, a in zip(np.minimum(right, 31), after)]
      assert not any(tok.id_to_piece(a).startswith("##") for a in after)
  assert spans >= 16
