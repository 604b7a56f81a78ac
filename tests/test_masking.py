"""Tests of bert_jax.data.masking: MLM schemes, NSP/SOP pairing, seeding."""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import batch_masking
from bert_jax.data import masking
from conftest import sequential_spans

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SENTINELS = list(range(990, 1000))
CONT = (500, 990)  # ids in this range are '##' continuation pieces
MAX_PRED = 20


def _vocab(word_start=True):
  ws = np.ones(V, bool)
  ws[CONT[0]:CONT[1]] = False
  return masking.VocabInfo.create(V, pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                                  special_ids=[UNK, *SENTINELS],
                                  word_start=ws if word_start else None)


def _examples(n, length=128, seed=0, cont_frac=0.3):
  """[CLS] a [SEP] b [SEP] + padding, random real lengths, some [UNK]/sentinels."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int32)
  for i in range(n):
    real = rng.integers(8, length + 1)
    body = rng.integers(5, CONT[0], real)
    cont = rng.random(real) < cont_frac
    body[cont] = rng.integers(*CONT, cont.sum())
    body[rng.random(real) < 0.02] = UNK
    body[rng.random(real) < 0.01] = SENTINELS[0]
    body[0], body[real // 2], body[real - 1] = CLS, SEP, SEP
    out[i, :real] = body
  return out


def _run(tokens, scheme, epoch=0, run_seed=7, max_predictions=MAX_PRED, **kw):
  """Masks every row of `tokens` inside tf.data; returns numpy arrays."""
  vocab = _vocab()
  ds = tf.data.Dataset.from_tensor_slices(tokens).enumerate().map(
      lambda i, t: masking.mask_tokens(t, masking.example_seed(run_seed, epoch, i), vocab,
                                       max_predictions=max_predictions, scheme=scheme, **kw),
      num_parallel_calls=2, deterministic=True)
  return next(ds.batch(len(tokens)).as_numpy_iterator())


def _expected_budget(row, max_pred=MAX_PRED, rate=0.15):
  n = int((row != PAD).sum())
  return min(max_pred, max(1, round(n * rate)))


def _candidates(row):
  return (row > MASK) & ~np.isin(row, SENTINELS)


def _words(row):
  """List of token-index arrays: maskable tokens grouped like WordPiece '##'."""
  cand = _candidates(row)
  prev = np.concatenate([[False], cand[:-1]])
  cont = (row >= CONT[0]) & (row < CONT[1])
  start = cand & (~prev | ~cont)
  word = np.cumsum(start)
  return [np.flatnonzero(cand & (word == k)) for k in range(1, word[-1] + 1)]


def _check_common(tokens, out, max_pred=MAX_PRED):
  """Invariants shared by every scheme; returns (outcome codes, budgets)."""
  special = _vocab().special
  codes = []
  for row, inp, pos, tgt, w in zip(tokens, out["encoder_input_tokens"],
                                   out["mlm_positions"], out["mlm_targets"],
                                   out["mlm_weights"]):
    num = int(w.sum())
    assert num <= _expected_budget(row, max_pred) <= max_pred
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
  return codes


def test_num_to_predict_matches_python_round():
  for n in [1, 3, 7, 10, 30, 50, 70, 128, 500]:
    row = tf.concat([tf.fill([n], 7), tf.zeros([5], tf.int32)], 0)
    got = int(masking.num_to_predict(row, PAD, 76, 0.15))
    assert got == min(76, max(1, round(n * 0.15))), n
  assert int(masking.num_to_predict(tf.fill([30], 7), PAD, 76)) == 4  # 4.5 -> 4 (float64)


def test_token_masking_statistics():
  tokens = _examples(2000)
  out = _run(tokens, "token")
  codes = np.concatenate(_check_common(tokens, out))
  for row, w in zip(tokens, out["mlm_weights"]):
    # Exact budget: min(num_to_predict, number of maskable tokens).
    assert int(w.sum()) == min(_expected_budget(row), int(_candidates(row).sum()))
  real = (tokens != PAD).sum()
  assert abs(out["mlm_weights"].sum() / real - 0.15) < 0.01
  frac = np.bincount(codes, minlength=3) / len(codes)
  # ~25k predictions: 3 sigma of a 10% share is ~0.006.
  assert abs(frac[0] - 0.8) < 0.015 and abs(frac[1] - 0.1) < 0.01 and abs(frac[2] - 0.1) < 0.01


def test_configurable_outcome_probabilities():
  tokens = _examples(500)
  out = _run(tokens, "token", mask_prob=0.5, random_prob=0.3)
  codes = np.concatenate(_check_common(tokens, out))
  frac = np.bincount(codes, minlength=3) / len(codes)
  assert abs(frac[0] - 0.5) < 0.03 and abs(frac[1] - 0.3) < 0.03 and abs(frac[2] - 0.2) < 0.03


def test_whole_word_masking_selects_whole_words():
  tokens = _examples(1500, cont_frac=0.4)
  out = _run(tokens, "whole_word")
  codes = _check_common(tokens, out)
  mixed = multi = 0
  for row, pos, w, c in zip(tokens, out["mlm_positions"], out["mlm_weights"], codes):
    chosen = dict(zip(pos[:int(w.sum())].tolist(), c.tolist()))
    for word in _words(row):
      hit = [i in chosen for i in word.tolist()]
      assert all(hit) or not any(hit), f"partial word {word} in {sorted(chosen)}"
      if all(hit) and len(word) > 1:
        multi += 1
        mixed += len({chosen[i] for i in word.tolist()}) > 1
  # Each sub-token draws its own outcome: P(mixed) = 1 - .8^2 - .1^2 - .1^2 = .34 for
  # two pieces, more for longer words; one draw per word would give 0.
  assert multi > 500 and mixed / multi > 0.25


def test_whole_word_skips_words_that_do_not_fit():
  # Budget 2 (round(12 * .15)); one 9-piece word and one single-piece word.
  row = np.array([CLS, 10] + [600] * 8 + [20, SEP], np.int32)[None].repeat(200, 0)
  out = _run(row, "whole_word")
  pos = out["mlm_positions"][out["mlm_weights"] > 0]
  assert set(pos.tolist()) == {10}, "only the short word fits; the long one is skipped"
  assert np.all(out["mlm_weights"].sum(1) == 1)


def test_span_masking_spans_and_lengths():
  # Long runs of single-piece words, so spans are rarely clipped at a run end.
  rng = np.random.default_rng(3)
  tokens = rng.integers(5, CONT[0], (400, 512)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = CLS, SEP
  out = _run(tokens, "span", max_predictions=80)
  codes = _check_common(tokens, out, max_pred=80)
  lengths = []
  for row, c, pos, left, right, w in zip(tokens, codes, out["mlm_positions"],
                                         out["sbo_left_positions"], out["sbo_right_positions"],
                                         out["mlm_weights"]):
    num = int(w.sum())
    spans = {}
    for k in range(num):
      spans.setdefault((left[k], right[k]), []).append((pos[k], c[k]))
    for (lo, hi), members in spans.items():
      assert [p for p, _ in members] == list(range(lo + 1, hi)), "span is contiguous"
      outcomes = {o for _, o in members}
      # One draw per span; a random replacement may equal the original (p ~ 1/1000).
      assert len(outcomes) == 1 or outcomes == {1, 2}
      lengths.append(hi - lo - 1)
    assert abs(num - _expected_budget(row, 80)) <= 0, "SpanBERT fills the budget"
  hist = np.bincount(lengths, minlength=11)[1:11] / len(lengths)
  probs = masking.spanbert_length_probs()
  np.testing.assert_allclose(probs[:4], [.2241, .1792, .1434, .1147], atol=1e-4)
  assert abs((probs * np.arange(1, 11)).sum() - 3.797) < 1e-3
  # Overlap rejection and the budget cut at the end shorten a few spans.
  assert np.abs(hist - probs).max() < 0.05, hist
  assert 3.2 < np.mean(lengths) < 3.9


def test_span_sampler_matches_geometric_table():
  probs = masking.spanbert_length_probs()
  draws = masking.sample_span_lengths(50000, probs, tf.constant([1, 2], tf.int64)).numpy()
  hist = np.bincount(draws, minlength=11)[1:] / draws.size
  assert draws.min() >= 1 and draws.max() <= 10
  # 3 sigma of a 22% share over 50k draws is ~0.006.
  np.testing.assert_allclose(hist, probs, atol=0.006)
  assert abs(draws.mean() - 3.797) < 0.05


def test_vectorised_span_selection_equals_sequential():
  rng = np.random.default_rng(11)
  vec = tf.TensorSpec([None], tf.int32)
  greedy = {t: tf.function(lambda a, s, l, r, b, t=t: masking._greedy_spans(a, s, l, r, b, t),
                           input_signature=[vec] * 4 + [tf.TensorSpec([], tf.int32)])
            for t in (True, False)}
  for case in range(300):
    num = int(rng.integers(1, 50))
    lengths = rng.integers(1, 4, num).astype(np.int32)
    run = np.cumsum(rng.random(num) < 0.1).astype(np.int32) + 1
    anchor = rng.permutation(num).astype(np.int32)
    span_len = rng.integers(1, 11, num).astype(np.int32)
    budget = int(rng.integers(1, 30))
    for truncate in (True, False):
      got = greedy[truncate](anchor, span_len, lengths, run, budget).numpy()
      want = sequential_spans(anchor, span_len, lengths, run, budget, truncate)
      assert got.tolist() == want, (case, truncate)


def test_whole_word_spans_respect_word_boundaries():
  tokens = _examples(200, length=256, cont_frac=0.4)
  for scheme in ("span", "ngram"):
    out = _run(tokens, scheme, max_predictions=40)
    _check_common(tokens, out, max_pred=40)
    for row, pos, w in zip(tokens, out["mlm_positions"], out["mlm_weights"]):
      chosen = set(pos[:int(w.sum())].tolist())
      for word in _words(row):
        hit = np.isin(word, list(chosen))
        assert all(hit) or not any(hit), (scheme, word)


def test_ngram_lengths_at_most_three_words():
  tokens = _examples(500, length=256, cont_frac=0.0)
  out = _run(tokens, "ngram", max_predictions=40)
  codes = _check_common(tokens, out, max_pred=40)
  np.testing.assert_allclose(masking.ngram_length_probs(), [.5455, .2727, .1818], atol=1e-4)
  frac = np.bincount(np.concatenate(codes), minlength=3) / sum(map(len, codes))
  assert abs(frac[0] - 0.8) < 0.02  # per-token outcomes


def test_determinism_and_epoch_dependence():
  tokens = _examples(20)
  for scheme in masking.MASKING_SCHEMES:
    a, b = _run(tokens, scheme), _run(tokens, scheme)
    c = _run(tokens, scheme, epoch=1)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["mlm_positions"], c["mlm_positions"]), scheme
  s = [masking.example_seed(1, e, i).numpy().tolist() for e in range(3) for i in range(3)]
  assert len({tuple(x) for x in s}) == 9


def test_shapes_and_dtypes_in_graph_mode():
  tokens = _examples(4)
  vocab = _vocab()
  ds = tf.data.Dataset.from_tensor_slices(tokens).map(
      lambda t: masking.mask_tokens(t, tf.constant([1, 2], tf.int64), vocab,
                                    max_predictions=MAX_PRED, scheme="span"))
  spec = ds.element_spec
  assert spec["encoder_input_tokens"].shape.as_list() == [128]
  for k in ("mlm_positions", "mlm_targets", "sbo_left_positions", "sbo_right_positions"):
    assert spec[k].shape.as_list() == [MAX_PRED] and spec[k].dtype == tf.int32
  assert spec["mlm_weights"].shape.as_list() == [MAX_PRED]
  assert spec["mlm_weights"].dtype == tf.float32


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="unknown masking scheme"):
    masking.mask_tokens(tf.constant([2, 9, 3]), tf.constant([1, 2]), _vocab(),
                        max_predictions=2, scheme="words")
  with pytest.raises(ValueError, match="word_start"):
    masking.mask_tokens(tf.constant([2, 9, 3]), tf.constant([1, 2]), _vocab(False),
                        max_predictions=2, scheme="whole_word")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    masking.VocabInfo.create(10, pad_id=0, cls_id=1, sep_id=2, mask_id=10)


def _reference_truncate_lengths(la, lb, max_num):
  """Lengths left by the original one-token-at-a-time loop."""
  while la + lb > max_num:
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return la, lb


def test_truncate_pair_matches_original_lengths():
  fronts = set()
  for la in range(0, 12):
    for lb in range(0, 12):
      for m in (5, 9, 30):
        seed = tf.constant([la, lb * 100 + m], tf.int64)
        a, b = masking.truncate_pair(tf.range(la), tf.range(100, 100 + lb), m, seed)
        assert (a.shape[0], b.shape[0]) == _reference_truncate_lengths(la, lb, m)
        a = a.numpy()
        if a.size:
          assert np.all(np.diff(a) == 1), "a contiguous piece is kept"
          fronts.add(int(a[0]) > 0)
  assert fronts == {True, False}, "tokens are removed from the front and from the back"


def test_nsp_and_sop_pairs():
  vocab = _vocab()
  a, b, r = tf.range(10, 30), tf.range(30, 50), tf.range(700, 760)
  labels = []
  for i in range(200):
    out = masking.nsp_pair(a, b, r, masking.example_seed(0, 0, i), vocab, max_seq_length=40)
    tok, typ = out["encoder_input_tokens"].numpy(), out["encoder_type_ids"].numpy()
    assert len(tok) <= 40 and tok[0] == CLS and tok[-1] == SEP and (tok == SEP).sum() == 2
    first_sep = int(np.argmax(tok == SEP))
    np.testing.assert_array_equal(typ, (np.arange(len(tok)) > first_sep).astype(np.int32))
    second = tok[first_sep + 1:-1]
    label = int(out["nsp_labels"])
    assert np.all((second >= 700) if label else (second < 50) & (second >= 30))
    labels.append(label)
  assert 0.38 < np.mean(labels) < 0.62
  swaps = []
  for i in range(120):
    out = masking.sop_pair(a, b, masking.example_seed(0, 0, i), vocab, max_seq_length=64)
    tok = out["encoder_input_tokens"].numpy()
    swapped = int(out["nsp_labels"])
    expect = np.concatenate([[CLS], b, [SEP], a, [SEP]] if swapped else
                            [[CLS], a, [SEP], b, [SEP]])
    np.testing.assert_array_equal(tok, expect)
    swaps.append(swapped)
  assert 0.35 < np.mean(swaps) < 0.65


def test_whole_word_masking_with_real_wordpiece_vocab(minilm_dir):
  from bert_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(str(minilm_dir))
  vocab = masking.VocabInfo.from_tokenizer(tok)
  text = ("Unbelievably, the hippopotamuses were photosynthesizing "
          "extraordinarily incomprehensible antidisestablishmentarianism.")
  ids = tf.cast(tok.tokenize(text), tf.int64)  # int64 input is accepted too
  a = tf.concat([[tok.cls_id], ids[:12]], 0)
  tokens = tf.concat([a, [tok.sep_id], ids[12:], [tok.sep_id]], 0)
  pieces = [tok.id_to_piece(i) for i in tokens.numpy()]
  assert sum(p.startswith("##") for p in pieces) >= 5, pieces
  starts = [i for i, p in enumerate(pieces) if not p.startswith("##")]
  words = [list(range(s, e)) for s, e in zip(starts, starts[1:] + [len(pieces)])]
  ds = tf.data.Dataset.range(200).map(
      lambda i: masking.mask_tokens(tokens, masking.example_seed(0, 0, i), vocab,
                                    max_predictions=6, scheme="whole_word",
                                    mask_prob=0.0, random_prob=1.0))
  for out in ds.as_numpy_iterator():
    chosen = set(out["mlm_positions"][out["mlm_weights"] > 0].tolist())
    assert chosen and not chosen & {0, 13, len(pieces) - 1}, "[CLS]/[SEP] never masked"
    for w in words:
      assert {i in chosen for i in w} != {True, False}, ([pieces[i] for i in w], chosen)
    replaced = out["encoder_input_tokens"][sorted(chosen)]
    assert not any(tok.special[replaced]), "random replacement is a special id"


# --- batched 'token' / 'whole_word' masking (bert_jax.data.batch_masking);
# 'span' / 'ngram': tests/test_batch_masking.py ---

def _run_batch(tokens, seeds, max_predictions=MAX_PRED, **kw):
  out = batch_masking.mask_tokens_batch(tf.constant(tokens), tf.constant(seeds, tf.int64),
                                        _vocab(), max_predictions=max_predictions, **kw)
  return {k: v.numpy() for k, v in out.items()}


def _seeds(n, epoch=0, run_seed=7):
  return batch_masking.example_seeds(run_seed, epoch, tf.range(n)).numpy()


def test_example_seeds_equal_example_seed():
  got = batch_masking.example_seeds(11, 3, tf.constant([0, 5, 1 << 30], tf.int64)).numpy()
  for row, i in zip(got, [0, 5, 1 << 30]):
    np.testing.assert_array_equal(row, masking.example_seed(11, 3, i).numpy())


def test_batch_token_masking_statistics():
  tokens = _examples(3000)
  out = _run_batch(tokens, _seeds(len(tokens)))
  assert out["mlm_weights"].dtype == np.float32 and out["mlm_positions"].dtype == np.int32
  codes = np.concatenate(_check_common(tokens, out))
  for row, w in zip(tokens, out["mlm_weights"]):
    assert int(w.sum()) == min(_expected_budget(row), int(_candidates(row).sum()))
  real = (tokens != PAD).sum()
  assert abs(out["mlm_weights"].sum() / real - 0.15) < 0.01
  frac = np.bincount(codes, minlength=3) / len(codes)
  assert abs(frac[0] - 0.8) < 0.012 and abs(frac[1] - 0.1) < 0.008 and abs(frac[2] - 0.1) < 0.008
  # Random replacements spread over the ordinary ids (not a few favourites).
  pos, num = out["mlm_positions"], out["mlm_weights"].sum(1).astype(int)
  new = np.concatenate([inp[p[:n]] for inp, p, n in zip(out["encoder_input_tokens"], pos, num)])
  old = np.concatenate([row[p[:n]] for row, p, n in zip(tokens, pos, num)])
  rand = new[(new != MASK) & (new != old)]
  ordinary = len(_vocab().ordinary_ids)
  assert len(rand) > 3 * ordinary and len(np.unique(rand)) > 0.9 * ordinary
  # Every maskable position is chosen about equally often (no position bias).
  hits = np.zeros(128)
  for p, n in zip(pos, num):
    hits[p[:n]] += 1
  cand = np.array([_candidates(r) for r in tokens]).sum(0)
  rate = hits[1:60] / cand[1:60]
  assert rate.std() / rate.mean() < 0.1


def test_batch_masking_small_budget_and_outcome_probabilities():
  tokens = _examples(800, length=32)
  out = _run_batch(tokens, _seeds(len(tokens)), max_predictions=3, mask_prob=0.5,
                   random_prob=0.3)
  codes = np.concatenate(_check_common(tokens, out, max_pred=3))
  for row, w in zip(tokens, out["mlm_weights"]):
    assert int(w.sum()) == min(_expected_budget(row, 3), int(_candidates(row).sum()))
  frac = np.bincount(codes, minlength=3) / len(codes)
  assert abs(frac[0] - 0.5) < 0.04 and abs(frac[1] - 0.3) < 0.04 and abs(frac[2] - 0.2) < 0.04


def test_batch_masking_rows_are_independent_and_deterministic():
  tokens = _examples(16, length=64)
  seeds = _seeds(16)
  whole = _run_batch(tokens, seeds)
  np.testing.assert_equal(whole, _run_batch(tokens, seeds))  # deterministic
  for i in (0, 5, 15):  # alone, and padded to another length
    alone = _run_batch(tokens[i:i + 1], seeds[i:i + 1])
    longer = _run_batch(np.pad(tokens[i:i + 1], [[0, 0], [0, 40]]), seeds[i:i + 1])
    for k in whole:
      np.testing.assert_array_equal(alone[k][0], whole[k][i])
      np.testing.assert_array_equal(longer[k][0][:64] if k == "encoder_input_tokens"
                                    else longer[k][0], whole[k][i])
  other = _run_batch(tokens, _seeds(16, epoch=1))
  assert (other["mlm_positions"] != whole["mlm_positions"]).any(axis=1).mean() > 0.9


def test_batch_masking_edge_rows():
  # A row with nothing maskable, a row shorter than max_predictions, all padding.
  tokens = np.zeros((3, 8), np.int32)
  tokens[0, :3] = [CLS, SEP, SEP]
  tokens[1, :5] = [CLS, 9, 10, 11, SEP]
  out = _run_batch(tokens, _seeds(3), max_predictions=20)
  assert out["mlm_positions"].shape == (3, 20)
  np.testing.assert_array_equal(out["mlm_weights"].sum(1), [0, 1, 0])
  np.testing.assert_array_equal(out["encoder_input_tokens"][[0, 2]], tokens[[0, 2]])
  with pytest.raises(ValueError, match="mask_prob"):
    _run_batch(tokens, _seeds(3), mask_prob=0.9, random_prob=0.2)


def test_batch_whole_word_masking():
  tokens = _examples(1500, cont_frac=0.4)
  seeds = _seeds(len(tokens))
  out = _run_batch(tokens, seeds, scheme="whole_word")
  codes = _check_common(tokens, out)
  mixed = multi = 0
  for row, pos, w, c in zip(tokens, out["mlm_positions"], out["mlm_weights"], codes):
    chosen = dict(zip(pos[:int(w.sum())].tolist(), c.tolist()))
    left = _expected_budget(row) - len(chosen)
    for word in _words(row):
      hit = [i in chosen for i in word.tolist()]
      assert all(hit) or not any(hit), f"partial word {word} in {sorted(chosen)}"
      # Greedy take-if-it-fits: no skipped word fits what is left at the end.
      assert any(hit) or len(word) > left, (word, left)
      if all(hit) and len(word) > 1:
        multi += 1
        mixed += len({chosen[i] for i in word.tolist()}) > 1
  assert multi > 500 and mixed / multi > 0.25  # one outcome draw per sub-token
  frac = np.bincount(np.concatenate(codes), minlength=3) / len(np.concatenate(codes))
  assert abs(frac[0] - 0.8) < 0.015 and abs(frac[1] - 0.1) < 0.01
  # Row independence and determinism hold for this scheme too.
  for i in (3, 700):
    alone = _run_batch(tokens[i:i + 1], seeds[i:i + 1], scheme="whole_word")
    for k in out:
      np.testing.assert_array_equal(alone[k][0], out[k][i])
  # The skipping rule: budget 2, a 9-piece word and a 1-piece word.
  row = np.array([CLS, 10] + [600] * 8 + [20, SEP], np.int32)[None].repeat(200, 0)
  skip = _run_batch(row, _seeds(200), scheme="whole_word")
  assert set(skip["mlm_positions"][skip["mlm_weights"] > 0].tolist()) == {10}
  np.testing.assert_array_equal(skip["mlm_weights"].sum(1), 1)
  with pytest.raises(ValueError, match="no batched masking"):
    _run_batch(row, _seeds(200), scheme="words")
