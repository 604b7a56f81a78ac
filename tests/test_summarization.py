"""Summarization data and ROUGE (bert_jax.tasks.summarization) against rouge-score."""
import json
import random

import pytest

from bert_jax.tasks import summarization as summ

_WORDS = ("the cat sat on mat running runs ran quickly quick council said reported "
          "reports government's plans 2024 3.5% U.S. well-known it's re-elected a an of "
          "and ministers meeting meetings generously generous").split()


def _texts(seed, n):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(0, 25))]
    out.append(" ".join(w.capitalize() if rng.random() < 0.2 else w for w in words)
               + rng.choice(["", ".", "!", " -- ok"]))
  return out


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(use_stemmer):
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
  if use_stemmer:
    pytest.importorskip("nltk")
  scorer = rouge_scorer.RougeScorer(list(summ.ROUGE_TYPES), use_stemmer=use_stemmer)
  stemmer = summ.porter_stemmer() if use_stemmer else None
  refs, preds = _texts(0, 80), _texts(1, 80)
  preds[:5] = refs[:5]  # some perfect matches
  preds[5] = ""  # an empty prediction
  # Multi-sentence texts (newline-separated, as rouge-score reads them) for ROUGE-Lsum,
  # with repeated sentences so the union and the clipping of hits both matter.
  refs += ["\n".join(refs[i:i + 3]) for i in range(10, 40, 3)]
  preds += ["\n".join(preds[i:i + 2] + refs[i + 1:i + 3] + [preds[i]]) for i in range(10, 40, 3)]
  for ref, pred in zip(refs, preds):
    want = scorer.score(ref, pred)
    got = summ.rouge(ref, pred, stemmer)
    for name in summ.ROUGE_TYPES:
      for field in ("precision", "recall", "fmeasure"):
        assert got[name][field] == pytest.approx(getattr(want[name], field), abs=1e-12), (
            name, field, ref, pred)
  corpus = summ.corpus_rouge(refs, preds, use_stemmer=use_stemmer)
  for name in summ.ROUGE_TYPES:
    mean = sum(scorer.score(r, p)[name].fmeasure for r, p in zip(refs, preds)) / len(refs)
    assert corpus[name] == pytest.approx(100 * mean)


def test_rouge_lsum_by_hand_and_sentence_splitting():
  # Reference sentences 'a b c' and 'd e'; predicted 'a d' and 'b c e'. Union LCS of
  # 'a b c' is {a} | {b, c} = 3 hits, of 'd e' is {d} | {e} = 2: all 5 of 5 tokens,
  # while the whole-text LCS ('a b c e') has 4.
  got = summ.rouge("a b c\nd e", "a d\nb c e", None)
  assert got["rougeLsum"]["fmeasure"] == pytest.approx(1.0)
  assert got["rougeL"]["recall"] == pytest.approx(4 / 5)
  # A token is a hit at most as often as it occurs in both texts.
  got = summ.rouge("a a\na", "a", None)
  assert got["rougeLsum"]["precision"] == 1.0 and got["rougeLsum"]["recall"] == pytest.approx(1 / 3)
  assert summ.split_sentences('He left. Then 3 men came! "Why?" U.S. troops said no.') == (
      'He left.\nThen 3 men came!\n"Why?"\nU.S. troops said no.')
  assert summ.split_sentences("Kept.\nAs is. Here") == "Kept.\nAs is. Here"
  # summary_metrics splits decoded text into sentences before ROUGE-Lsum.
  pairs = [summ.SummaryPair("doc", "A b c.\nD e.")]
  m = summ.summary_metrics(pairs, ["A d. B c e."], use_stemmer=False)
  assert m["rougeLsum"] == pytest.approx(100.0) and m["rougeL"] == pytest.approx(80.0)


def test_rouge_by_hand():
  got = summ.rouge("the cat sat on the mat", "the cat on the mat sat", None)
  assert got["rouge1"]["fmeasure"] == 1.0
  assert got["rouge2"]["precision"] == pytest.approx(3 / 5)  # the cat, on the, the mat
  assert got["rougeL"]["recall"] == pytest.approx(5 / 6)  # the cat on the mat
  with pytest.raises(ValueError, match="3 predictions for 2 references"):
    summ.corpus_rouge(["a", "b"], ["a", "b", "c"], use_stemmer=False)


def test_read_pairs_tsv_and_jsonl(tmp_path):
  tsv = tmp_path / "train.tsv"
  tsv.write_text("document\tsummary\nA long text.\tShort.\n\nOnly a document\n")
  assert summ.read_pairs(str(tsv)) == [summ.SummaryPair("A long text.", "Short."),
                                       summ.SummaryPair("Only a document", None)]
  jl = tmp_path / "dev.jsonl"
  jl.write_text(json.dumps({"text": "Doc one.", "highlights": "One."}) + "\n"
                + json.dumps({"text": "Doc two."}) + "\n")
  assert summ.read_pairs(str(jl), "text", "highlights") == [
      summ.SummaryPair("Doc one.", "One."), summ.SummaryPair("Doc two.", None)]
  bad = tmp_path / "bad.tsv"
  bad.write_text("a\tb\nx\ty\tz\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: 3 tab-separated columns"):
    summ.read_pairs(str(bad))
  with pytest.raises(ValueError, match=r"dev.jsonl:1: no 'document' key"):
    summ.read_pairs(str(jl))
  (tmp_path / "broken.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match=r"broken.jsonl:1: not JSON"):
    summ.read_pairs(str(tmp_path / "broken.jsonl"))


def test_pairs_to_text_metrics_and_summaries_file(tmp_path):
  pairs = [summ.SummaryPair("A cat sat.", "A cat."), summ.SummaryPair("Dogs ran far.", "Dogs ran.")]
  assert summ.pairs_to_text(pairs, "summarize: ") == (
      ["summarize: A cat sat.", "summarize: Dogs ran far."], ["A cat.", "Dogs ran."])
  m = summ.summary_metrics(pairs, ["a cat", "cats"], use_stemmer=False)
  assert m["rouge1"] == pytest.approx(50.0)  # 1.0 and 0.0 ('cats' is not 'dogs')
  assert m["gen_len"] == pytest.approx(1.5)
  with pytest.raises(ValueError, match="1 predictions for 2 documents"):
    summ.summary_metrics(pairs, ["a cat"])
  with pytest.raises(ValueError, match="no reference summary"):
    summ.summary_metrics([summ.SummaryPair("x", None)], ["x"])
  path = tmp_path / "out" / "dev-summaries.jsonl"
  summ.write_summaries(str(path), pairs + [summ.SummaryPair("x", None)], ["a", "b", "c"])
  rows = [json.loads(line) for line in path.open(encoding="utf-8")]
  assert rows == [{"summary": "a", "reference": "A cat."},
                  {"summary": "b", "reference": "Dogs ran."}, {"summary": "c"}]
