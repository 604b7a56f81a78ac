"""Tests of bert_jax.data.masking (seeding, VocabInfo, NSP/SOP pairing, padding) and of
batched 'token' / 'whole_word' masking (bert_jax.data.batch_masking); 'span' / 'ngram':
tests/test_batch_masking.py."""
import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import batch_masking
from bert_jax.data import masking

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
    row = tf.concat([tf.fill([1, n], 7), tf.zeros([1, 5], tf.int32)], 1)
    got = int(batch_masking.num_to_predict_batch(row, PAD, 76, 0.15)[0])
    assert got == min(76, max(1, round(n * 0.15))), n
  # 4.5 -> 4 (float64, half to even), as Python's round in create_pretraining_data.py.
  assert int(batch_masking.num_to_predict_batch(tf.fill([1, 30], 7), PAD, 76, 0.15)[0]) == 4


def test_example_seed_is_deterministic_and_new_per_epoch_and_index():
  s = [masking.example_seed(1, e, i).numpy().tolist() for e in range(3) for i in range(3)]
  assert len({tuple(x) for x in s}) == 9
  assert s == [masking.example_seed(1, e, i).numpy().tolist() for e in range(3) for i in range(3)]
  assert masking.example_seed(2, 0, 0).numpy().tolist() != s[0]


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="word_start"):
    batch_masking.mask_tokens_batch(tf.constant([[2, 9, 3]]), tf.constant([[1, 2]]),
                                    _vocab(False), max_predictions=2, scheme="whole_word")
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


def test_labelled_and_sop_pairs():
  vocab = _vocab()
  a, b = tf.range(10, 30), tf.range(30, 50)
  for label, target in ((0, None), (1, 25), (1, 7)):
    out = masking.labelled_pair(a, b, label, tf.constant([label, 3], tf.int64), vocab,
                                max_seq_length=40, target_length=target)
    tok, typ = out["encoder_input_tokens"].numpy(), out["encoder_type_ids"].numpy()
    # Truncated to max_seq_length - 3 = 37, or to the smaller target.
    assert len(tok) - 3 == min(37, target or 37)
    assert tok[0] == CLS and tok[-1] == SEP and (tok == SEP).sum() == 2
    first_sep = int(np.argmax(tok == SEP))
    np.testing.assert_array_equal(typ, (np.arange(len(tok)) > first_sep).astype(np.int32))
    assert np.all((tok[1:first_sep] >= 10) & (tok[1:first_sep] < 30))
    assert np.all((tok[first_sep + 1:-1] >= 30) & (tok[first_sep + 1:-1] < 50))
    assert int(out["nsp_labels"]) == label
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
  rows = np.repeat(tokens.numpy()[None], 200, 0)
  out = batch_masking.mask_tokens_batch(rows, _seeds(200), vocab, max_predictions=6,
                                        scheme="whole_word", mask_prob=0.0, random_prob=1.0)
  out = {k: v.numpy() for k, v in out.items()}
  for inp, pos, w in zip(out["encoder_input_tokens"], out["mlm_positions"], out["mlm_weights"]):
    chosen = set(pos[w > 0].tolist())
    assert chosen and not chosen & {0, 13, len(pieces) - 1}, "[CLS]/[SEP] never masked"
    for word in words:
      assert {i in chosen for i in word} != {True, False}, ([pieces[i] for i in word], chosen)
    replaced = inp[sorted(chosen)]
    assert not any(tok.special[replaced]), "random replacement is a special id"


def test_pad_mlm_example():
  ex = dict(encoder_input_tokens=tf.constant([CLS, 9, 10, 11, SEP, 12, SEP]),
            encoder_type_ids=tf.constant([0, 0, 0, 0, 0, 1, 1]),
            mlm_positions=tf.constant([2, 5, 0]), mlm_targets=tf.constant([10, 12, 0]),
            mlm_weights=tf.constant([1.0, 1.0, 0.0]), nsp_labels=tf.constant(1))
  row = {k: v.numpy() for k, v in masking.pad_mlm_example(ex, 10).items()}
  np.testing.assert_array_equal(row["encoder_input_tokens"], [CLS, 9, 10, 11, SEP, 12, SEP,
                                                              0, 0, 0])
  np.testing.assert_array_equal(row["encoder_type_ids"], [0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["encoder_segment_ids"], [1] * 7 + [0] * 3)
  np.testing.assert_array_equal(row["encoder_positions"], [0, 1, 2, 3, 4, 5, 6, 0, 0, 0])
  np.testing.assert_array_equal(row["mlm_weights"], [1.0, 1.0, 0.0])
  assert int(row["nsp_labels"]) == 1  # other features pass through
  # Cut to the row: a prediction beyond it loses its weight; no type ids -> zeros.
  ex.pop("encoder_type_ids")
  cut = {k: v.numpy() for k, v in masking.pad_mlm_example(ex, 4).items()}
  np.testing.assert_array_equal(cut["encoder_input_tokens"], [CLS, 9, 10, 11])
  np.testing.assert_array_equal(cut["encoder_type_ids"], 0)
  np.testing.assert_array_equal(cut["encoder_segment_ids"], 1)
  np.testing.assert_array_equal(cut["mlm_weights"], [1.0, 0.0, 0.0])
  # Inside tf.data (unknown length): static row shapes, as the pipeline needs.
  ds = tf.data.Dataset.from_tensors(ex).map(lambda e: masking.pad_mlm_example(e, 10))
  assert ds.element_spec["encoder_positions"].shape.as_list() == [10]


# --- batched 'token' / 'whole_word' masking (bert_jax.data.batch_masking) ---

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
