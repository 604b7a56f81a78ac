"""SQuAD: reader, windows, post-processing and the official EM/F1 on the real dev set."""
import gzip
import json
import logging

import numpy as np
import pytest

from bert_jax.data.tokenizer import WordPieceTokenizer
from bert_jax.tasks import squad
from bert_jax.tasks import squad_eval

# The official evaluate-v1.1.py scores of the leaderboard files (shared data README).
OFFICIAL = {
    "bert_ensemble_google": (86.206, 92.196),
    "r-net_plus_ensemble_msra": (82.469, 88.478),
    "match-lstm_ensemble_smu": (67.635, 76.756),
    "logistic_regression_baseline_stanford": (40.142, 50.982),
}


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return WordPieceTokenizer(str(minilm_dir / "vocab.txt"))


@pytest.fixture(scope="module")
def dev(shared_data):
  return squad.read_squad(shared_data / "squad" / "dev-v1.1.json.gz")


@pytest.fixture(scope="module")
def sample(dev):
  """Every 25th dev question plus the five with the longest contexts (many windows)."""
  longest = sorted(dev.examples, key=lambda ex: -len(ex.paragraph.context))[:5]
  return dev.examples[::25] + longest


def _write(path, obj):
  path.write_text(json.dumps(obj), encoding="utf-8")
  return path


# ----------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------

def test_reader_counts_on_real_dev(dev):
  assert (dev.num_articles, dev.num_questions) == (48, 10570)  # the data README
  assert not dev.version_2
  assert dev.offset_mismatches == [] and dev.unlocated == []
  assert len({ex.qas_id for ex in dev.examples}) == dev.num_questions
  ex = next(ex for ex in dev.examples if ex.qas_id == "56be4db0acb8001400a502ec")
  assert "Denver Broncos" in ex.answers
  assert ex.title == "Super_Bowl_50"
  # The training answer is the first one, and its words hold it.
  words = ex.paragraph.words[ex.start_word:ex.end_word + 1]
  assert ex.label_text == ex.answers[0] and ex.answers[0] in " ".join(words)
  for ex in dev.examples[::100]:
    c2w = ex.paragraph.char_to_word
    assert len(c2w) == len(ex.paragraph.context)
    assert ex.answers[0][0] in ex.paragraph.words[c2w[ex.answer_starts[0]]]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_reference_predictions_score_the_official_numbers(dev, shared_data, name):
  preds = squad_eval.read_predictions(shared_data / "squad" / "reference_predictions"
                                 / f"{name}.json.gz")
  scores = squad_eval.evaluate(dev, preds)
  assert (round(scores["exact"], 3), round(scores["f1"], 3)) == OFFICIAL[name]
  assert scores["total"] == 10570


def test_bad_offsets_are_counted_and_repaired(tmp_path, caplog, tokenizer):
  context = "The cat sat on the mat. The dog sat too."
  qas = [
      {"id": "wrong", "question": "Who sat too?", "answers": [{"text": "dog", "answer_start": 0}]},
      {"id": "absent", "question": "Who?", "answers": [{"text": "zebra", "answer_start": 4}]},
      {"id": "fine", "question": "Where?", "answers": [{"text": "the mat", "answer_start": 15}]},
  ]
  path = _write(tmp_path / "bad.json",
                {"version": "1.1", "data": [{"title": "t", "paragraphs": [
                    {"context": context, "qas": qas}]}]})
  with caplog.at_level(logging.WARNING):
    data = squad.read_squad(path, max_mismatch_fraction=1.0)
  assert [(m.qas_id, m.answer_start, m.found_at) for m in data.offset_mismatches] == [
      ("wrong", 0, context.index("dog")), ("absent", 4, -1)]
  assert "2 of 3 answers" in caplog.text and str(path) in caplog.text
  assert data.unlocated == ["absent"]
  wrong = data.examples[0]
  assert data.examples[0].paragraph.words[wrong.start_word] == "dog"
  feats = squad.make_features(data.examples, tokenizer, training=True)
  assert feats.num_dropped == 1 and feats.example_index.tolist() == [0, 2]
  tokens = feats.batch["encoder_input_tokens"]
  starts, ends = feats.batch["start_positions"], feats.batch["end_positions"]
  assert tokenizer.decode(tokens[0, starts[0]:ends[0] + 1]) == "dog"
  assert tokenizer.decode(tokens[1, starts[1]:ends[1] + 1]) == "the mat"
  # Not for training: kept, labelled [CLS].
  feats = squad.make_features(data.examples, tokenizer)
  assert feats.num_dropped == 0 and feats.batch["start_positions"][1] == 0
  # Above the allowed share of broken offsets, reading fails and says why.
  with pytest.raises(squad.SquadFormatError, match=r"bad\.json: 2 of 3 answers"):
    squad.read_squad(path)


def test_malformed_files_name_the_file_and_the_key(tmp_path):
  broken = tmp_path / "broken.json"
  broken.write_text('{"data": [', encoding="utf-8")
  with pytest.raises(squad.SquadFormatError, match="broken.json is not valid JSON"):
    squad.read_squad(broken)
  para = {"context": "abc", "qas": [{"id": "1", "question": "q?", "answers": [
      {"text": "abc", "answer_start": 0}]}, {"id": "2", "answers": []}]}
  path = _write(tmp_path / "noq.json", {"data": [{"paragraphs": [para]}]})
  with pytest.raises(squad.SquadFormatError,
                     match=r"noq\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] has no key 'question'"):
    squad.read_squad(path)
  path = _write(tmp_path / "nodata.json", {"version": "1.1"})
  with pytest.raises(squad.SquadFormatError, match=r"nodata\.json: the top level has no key 'data'"):
    squad.read_squad(path)
  para["qas"][1] = {"id": "2", "question": "q?", "answers": [{"text": "a", "answer_start": "0"}]}
  path = _write(tmp_path / "type.json", {"data": [{"paragraphs": [para]}]})
  with pytest.raises(squad.SquadFormatError, match=r"answers\[0\]\['answer_start'\] should be int"):
    squad.read_squad(path)
  para["qas"][1] = {"id": "2", "question": "q?", "answers": []}
  path = _write(tmp_path / "noans.json", {"data": [{"paragraphs": [para]}]})
  with pytest.raises(squad.SquadFormatError, match=r"noans\.json: .*id 2\) has no answers"):
    squad.read_squad(path)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def test_normalize_answer_hand_checked():
  assert squad_eval.normalize_answer("The  Denver Broncos!") == "denver broncos"
  assert squad_eval.normalize_answer("an apple a day") == "apple day"
  assert squad_eval.normalize_answer("theater, Anna") == "theater anna"  # whole words only
  assert squad_eval.normalize_answer("A.B.C.") == "abc"
  assert squad_eval.normalize_answer("(1895)") == "1895"
  assert squad_eval.normalize_answer("Hello\u2014world") == "hello\u2014world"  # ASCII punct only
  assert squad_eval.normalize_answer(" \u00c9lan\n") == "\u00e9lan"


def test_em_f1_hand_checked():
  assert squad_eval.exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
  assert squad_eval.exact_match("Broncos", "Denver Broncos") == 0.0
  assert squad_eval.f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
  # Counts, not sets: x x y vs x y y share one x and one y.
  assert squad_eval.f1_score("x x y", "x y y") == pytest.approx(2 / 3)
  assert squad_eval.f1_score("the", "Denver") == 0.0
  assert squad_eval.f1_score("", "") == 0.0  # v1.1: no overlap is 0
  assert squad_eval.f1_score("", "", empty_matches_empty=True) == 1.0
  assert squad_eval.f1_score("a", "the", empty_matches_empty=True) == 1.0
  assert squad_eval.f1_score("", "x", empty_matches_empty=True) == 0.0


def _v2_file(tmp_path):
  context = "Denver Broncos won Super Bowl 50 in 2016."
  qas = [
      {"id": "a1", "question": "Who won?", "is_impossible": False,
       "answers": [{"text": "Denver Broncos", "answer_start": 0}]},
      {"id": "a2", "question": "When?", "is_impossible": False,
       "answers": [{"text": "2016", "answer_start": 36}]},
      {"id": "n1", "question": "Who lost?", "is_impossible": True, "answers": [],
       "plausible_answers": [{"text": "Denver Broncos", "answer_start": 0}]},
      {"id": "n2", "question": "Where?", "is_impossible": True, "answers": []},
  ]
  return _write(tmp_path / "v2.json", {"version": "v2.0", "data": [
      {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]})


def test_v2_scores_and_splits(tmp_path, caplog):
  data = squad.read_squad(_v2_file(tmp_path))
  assert data.version_2 and [ex.is_impossible for ex in data.examples] == [0, 0, 1, 1]
  assert data.examples[2].answers == ()  # plausible answers are not gold
  preds = {"a1": "Broncos", "a2": "", "n1": "", "n2": "Denver"}
  s = squad_eval.evaluate(data, preds)
  assert (s["HasAns_total"], s["NoAns_total"], s["total"]) == (2, 2, 4)
  assert s["HasAns_exact"] == 0.0 and s["HasAns_f1"] == pytest.approx(100 / 3)
  assert s["NoAns_exact"] == 50.0 and s["NoAns_f1"] == 50.0
  assert s["exact"] == 25.0 and s["f1"] == pytest.approx((2 / 3 + 1) / 4 * 100)
  del preds["a1"]
  with caplog.at_level(logging.WARNING):
    s = squad_eval.evaluate(data, preds)
  assert s["missing"] == 1 and s["HasAns_f1"] == 0.0 and "1 of 4 questions" in caplog.text


def test_predictions_file_round_trip(tmp_path):
  preds = {"q1": "Denver Broncos", "q2": "", "q3": "caf\u00e9 \u2014 \u4e2d"}
  for name in ("p.json", "p.json.gz"):
    squad_eval.write_predictions(tmp_path / name, preds)
    assert squad_eval.read_predictions(tmp_path / name) == preds
  assert json.loads(gzip.open(tmp_path / "p.json.gz", "rt").read()) == preds
  _write(tmp_path / "list.json", ["a"])
  with pytest.raises(squad.SquadFormatError, match="list.json: a predictions file"):
    squad_eval.read_predictions(tmp_path / "list.json")


# ----------------------------------------------------------------------------
# Windows and answer text
# ----------------------------------------------------------------------------

def test_doc_spans_and_max_context_hand_checked():
  assert squad.doc_spans(10, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4)]
  assert squad.doc_spans(10, 4, 8) == [(0, 4), (4, 4), (8, 2)]  # stride past the window
  assert squad.doc_spans(5, 10, 2) == [(0, 5)]
  assert squad.doc_spans(0, 10, 2) == [(0, 0)]
  best = squad.max_context_window(squad.doc_spans(10, 4, 2), 10)
  assert best.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
  # Token 3 of [(0,5), (2,5)] scores 1.05 in both: the earlier window wins the tie.
  assert squad.max_context_window(squad.doc_spans(7, 5, 2), 7).tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_get_final_text_hand_checked():
  assert squad_eval.get_final_text("steve smith", "Steve Smith's") == "Steve Smith"
  assert squad_eval.get_final_text("1895", "(1895).") == "1895"
  assert squad_eval.get_final_text("cafe", "Caf\u00e9!") == "Caf\u00e9"
  assert squad_eval.get_final_text("york", "New York") == "York"
  # Cannot align: the prediction is not inside, or normalising changed the length
  # (the no-break space becomes a split) -> all of orig_text, as run_squad does.
  assert squad_eval.get_final_text("boston", "New York") == "New York"
  assert squad_eval.get_final_text("york", "New\u00a0York") == "New\u00a0York"
  assert squad_eval.get_final_text("Caf\u00e9", "Caf\u00e9!", lower_case=False) == "Caf\u00e9"
  assert squad_eval.get_final_text("cafe", "Caf\u00e9!", lower_case=False) == "Caf\u00e9!"


def test_basic_tokens_split_as_the_tokenizer(dev, tokenizer):
  texts = [p.context for p in {id(ex.paragraph): ex.paragraph for ex in dev.examples[::200]}
           .values()]
  texts += ["Caf\u00e9 \u00c9LAN\u2014na\u00efve 'quotes' (x) \u4e2d\u6587 a\u00a0b \u200bzero \u03a3\u03a3"]
  words = [squad_eval.basic_tokens(text) for text in texts]
  per_word = tokenizer.tokenize([w for ws in words for w in ws]).to_list()
  whole = tokenizer.tokenize(texts).to_list()
  k = 0
  for text, ws, ids in zip(texts, words, whole):
    assert sum(per_word[k:k + len(ws)], []) == ids, text[:80]
    k += len(ws)


def test_window_layout(sample, tokenizer):
  feats = squad.make_features(sample, tokenizer, max_seq_length=128, doc_stride=32)
  tokens, types = feats.batch["encoder_input_tokens"], feats.batch["encoder_type_ids"]
  assert tokens.shape == types.shape == (len(feats), 128)
  assert all(v.dtype == np.int32 for v in feats.batch.values())
  queries = tokenizer.tokenize([ex.question for ex in sample]).to_list()
  for f in range(len(feats)):
    query = queries[feats.example_index[f]][:64]
    n = int((tokens[f] != 0).sum())
    doc = feats.token_to_orig[f] >= 0
    assert tokens[f, 0] == tokenizer.cls_id and tokens[f, n - 1] == tokenizer.sep_id
    np.testing.assert_array_equal(tokens[f, 1:1 + len(query)], query)
    assert tokens[f, 1 + len(query)] == tokenizer.sep_id
    assert doc.sum() == n - len(query) - 3 and doc[2 + len(query):n - 1].all()
    assert types[f, :2 + len(query)].sum() == 0 and types[f, 2 + len(query):n].all()
    assert not types[f, n:].any() and not tokens[f, n:].any()
  # Each doc sub-token is max-context in exactly one window: read in order, those
  # tokens rebuild the paragraph's tokenization and word map.
  for ex in sample[::20] + sample[-5:]:
    i = sample.index(ex)
    rows = np.flatnonzero(feats.example_index == i)
    got_ids = np.concatenate([tokens[f][feats.token_is_max_context[f]] for f in rows])
    got_words = np.concatenate([feats.token_to_orig[f][feats.token_is_max_context[f]]
                                for f in rows])
    per_word = tokenizer.tokenize(list(ex.paragraph.words)).to_list()
    np.testing.assert_array_equal(got_ids, np.concatenate(per_word))
    np.testing.assert_array_equal(
        got_words, np.repeat(np.arange(len(per_word)), [len(w) for w in per_word]))
  assert max(np.bincount(feats.example_index)) >= 6  # long contexts need many windows


def _on_token_boundaries(ex):
  """Whether the gold answer starts and ends where the tokenizer splits words."""
  c, s, t = ex.paragraph.context, ex.answer_starts[0], ex.answers[0]
  e = s + len(t)
  split = lambda ch: ch.isspace() or squad_eval._is_punctuation(ch)  # noqa: E731
  return ((s == 0 or split(c[s - 1]) or split(t[0]))
          and (e == len(c) or split(c[e]) or split(t[-1])) and "\u200b" not in c[s:e + 1])


def _gold_logits(feats, decoys=0):
  """Logits 10 at every window's start/end label; `decoys` starts of 15 at doc
  tokens that are not max-context in their window (run_squad must ignore them)."""
  n, length = feats.batch["encoder_input_tokens"].shape
  start, end = np.zeros((n, length), np.float32), np.zeros((n, length), np.float32)
  rows = np.arange(n)
  labelled = feats.batch["start_positions"] > 0
  start[rows[labelled], feats.batch["start_positions"][labelled]] = 10
  end[rows[labelled], feats.batch["end_positions"][labelled]] = 10
  for f in rows[labelled]:
    s = feats.batch["start_positions"][f]
    off = np.flatnonzero((feats.token_to_orig[f] >= 0) & ~feats.token_is_max_context[f])
    off = off[off != s]
    start[f, off[np.argsort(np.abs(off - s), kind="stable")[:decoys]]] = 15
  return start, end


@pytest.mark.parametrize("max_seq_length,doc_stride", [(384, 128), (128, 32)])
def test_gold_logits_give_back_the_gold_answers(sample, tokenizer, max_seq_length, doc_stride):
  feats = squad.make_features(sample, tokenizer, max_seq_length=max_seq_length,
                              doc_stride=doc_stride, training=True)
  length = feats.batch["end_positions"] - feats.batch["start_positions"] + 1
  checked = [ex for ex in sample if _on_token_boundaries(ex)]
  long = {sample[i].qas_id for i in feats.example_index[length > 30]}
  checked = [ex for ex in checked if ex.qas_id not in long]  # over max_answer_length
  assert len(checked) >= 0.95 * len(sample)
  start, end = _gold_logits(feats, decoys=3)
  preds = squad_eval.postprocess(sample, feats, start, end, tokenizer)
  wrong = [(ex.answers[0], preds.texts[ex.qas_id]) for ex in checked
           if squad_eval.exact_match(preds.texts[ex.qas_id], ex.answers[0]) < 1]
  assert not wrong
  assert max(np.bincount(feats.example_index)) >= 2
  best = preds.nbest[checked[0].qas_id]
  assert len(best) <= 20 and best[0]["start_logit"] + best[0]["end_logit"] == 20.0
  assert sum(c["probability"] for c in best) == pytest.approx(1.0)
  # Without the max-context rule the decoys win somewhere: the rule is what kept them out.
  if max_seq_length == 128:
    feats.token_is_max_context[:] = True
    loose = squad_eval.postprocess(sample, feats, start, end, tokenizer)
    assert sum(loose.texts[ex.qas_id] != preds.texts[ex.qas_id] for ex in checked) > 10


def test_v2_null_answers(tmp_path, dev, tokenizer):
  # Real dev paragraphs, every other question made impossible, in a v2.0 file.
  paragraphs = []
  for para in json.load(gzip.open(dev.path, "rt"))["data"][0]["paragraphs"][:3]:
    for k, qa in enumerate(para["qas"]):
      if k % 2:
        qa.update(is_impossible=True, plausible_answers=qa["answers"], answers=[])
    paragraphs.append(para)
  data = squad.read_squad(_write(tmp_path / "v2.json",
                                 {"version": "v2.0", "data": [{"paragraphs": paragraphs}]}))
  assert data.version_2 and 0 < sum(ex.is_impossible for ex in data.examples) < len(data.examples)
  feats = squad.make_features(data.examples, tokenizer, max_seq_length=96, doc_stride=32,
                              training=True)
  impossible = np.array([data.examples[i].is_impossible for i in feats.example_index])
  assert not feats.batch["start_positions"][impossible].any()
  assert not feats.batch["end_positions"][impossible].any()
  start, end = _gold_logits(feats)
  # Impossible: a plausible span scores 8 + 8, [CLS] 10 + 10 in the first window and
  # more in later ones (the null score is the minimum over windows).
  for f in np.flatnonzero(impossible):
    first = feats.example_index[f - 1] != feats.example_index[f] if f else True
    start[f, 0] = end[f, 0] = 10 if first else 12
    doc = np.flatnonzero(feats.token_to_orig[f] >= 0)
    start[f, doc[0]] = end[f, doc[0]] = 8
  preds = squad_eval.postprocess(data.examples, feats, start, end, tokenizer, version_2=True)
  for ex in data.examples:
    if ex.is_impossible:
      assert preds.texts[ex.qas_id] == "" and preds.null_score_diff[ex.qas_id] == 4.0
  scores = squad_eval.evaluate(data, preds.texts)
  assert scores["NoAns_exact"] == 100.0 and scores["NoAns_total"] > 0
  assert scores["HasAns_exact"] > 90.0
  # With the threshold above the difference, the best span is answered instead.
  preds = squad_eval.postprocess(data.examples, feats, start, end, tokenizer, version_2=True,
                            null_score_diff_threshold=5.0)
  assert all(preds.texts[ex.qas_id] for ex in data.examples if ex.is_impossible)


def test_bad_arguments(sample, tokenizer):
  with pytest.raises(ValueError, match="max_seq_length=64 leaves no room"):
    squad.make_features(sample[:2], tokenizer, max_seq_length=64, max_query_length=64)
  with pytest.raises(ValueError, match="doc_stride must be positive"):
    squad.make_features(sample[:2], tokenizer, doc_stride=0)
  feats = squad.make_features(sample[:2], tokenizer)
  logits = np.zeros((len(feats), 100), np.float32)
  with pytest.raises(ValueError, match="do not match the features"):
    squad_eval.postprocess(sample[:2], feats, logits, logits, tokenizer)
  # Training features leave out unplaceable answers: they cannot be post-processed.
  feats = squad.make_features(sample[:2], tokenizer)
  feats.example_index[:] = 0
  logits = np.zeros(feats.batch["encoder_input_tokens"].shape, np.float32)
  with pytest.raises(ValueError, match="1 examples have no window"):
    squad_eval.postprocess(sample[:2], feats, logits, logits, tokenizer)
