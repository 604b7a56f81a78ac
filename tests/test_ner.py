"""NER: CoNLL reader (real CoNLL-2003, IOB1 -> IOB2), sub-word features, conlleval entity F1."""
import gzip

import numpy as np
import pytest

from bert_jax.tasks import batching, ner


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  from bert_jax.data.tokenizer import WordPieceTokenizer
  return WordPieceTokenizer(str(minilm_dir / "vocab.txt"), lower_case=True)


def _sentence(words, tags):
  return ner.NerSentence(tuple(words.split()), tuple(tags.split()), "test:1")


# ----------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------

def test_real_conll2003(shared_data):
  train = ner.read_conll(str(shared_data / "conll2003" / "train.txt.gz"))
  assert len(train.sentences) == 14041  # data README
  assert train.num_documents == 946
  # This copy is IOB2 already: the conversion changes nothing.
  assert train.num_retagged == 0
  first = train.sentences[0]
  assert first.words == ("EU", "rejects", "German", "call", "to", "boycott", "British",
                         "lamb", ".")
  assert first.tags == ("B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O")
  assert first.source.endswith("train.txt.gz:3")  # line 1 -DOCSTART-, line 2 blank
  labels = ner.label_names_of(train.sentences)
  assert labels == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER",
                    "I-PER")
  for split, count in (("valid", 3250), ("test", 3453)):
    data = ner.read_conll(str(shared_data / "conll2003" / f"{split}.txt.gz"), label_names=labels)
    assert len(data.sentences) == count and data.num_retagged == 0


def test_iob1_file_is_converted(tmp_path):
  path = tmp_path / "iob1.txt"
  # IOB1: entities open with I-; B- only separates two adjacent PER entities.
  path.write_text("-DOCSTART- -X- O O\n\n"
                  "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\nMary NNP I-NP B-PER\n"
                  "in IN I-PP O\nBonn NNP I-NP I-LOC\nEU NNP I-NP I-ORG\n\n"
                  "Paris NNP I-NP I-LOC\n", encoding="utf-8")
  data = ner.read_conll(str(path))
  assert [s.tags for s in data.sentences] == [
      ("B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"), ("B-LOC",)]
  assert data.num_retagged == 4 and data.num_documents == 1
  assert data.sentences[1].source == f"{path}:10"
  assert ner.iob1_to_iob2(["I-PER", "I-LOC", "I-LOC", "O", "I-MISC"]) == [
      "B-PER", "B-LOC", "I-LOC", "O", "B-MISC"]


def test_bad_conll_input_names_file_and_line(tmp_path):
  path = tmp_path / "bad.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nBad NN B-NP\n")
  with pytest.raises(ValueError, match=rf"{path}:4: 3 columns, expected 4"):
    ner.read_conll(str(path))
  path = tmp_path / "tag.txt"
  path.write_text("EU NNP B-NP B-ORG\nx NN B-NP S-PER\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"{path}:2: NER tag 'S-PER' is not O, B-TYPE"):
    ner.read_conll(str(path))
  path.write_text("EU NNP B-NP B-ORG\n\nx NN B-NP B-DATE\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"{path}:3: tag 'B-DATE' is not in the label set"):
    ner.read_conll(str(path), label_names=("O", "B-ORG", "I-ORG"))
  path.write_text("-DOCSTART- -X- -X- O\n\n\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"{path}: no sentences \(empty split\)"):
    ner.read_conll(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ner.read_conll(str(tmp_path / "absent.txt"))


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

_LABELS = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")


def test_first_subword_labels_and_decode(tokenizer):
  s = _sentence("Johanson visited Hyperparameterization Land", "B-PER O B-LOC I-LOC")
  enc = ner.encode_sentences([s], tokenizer, _LABELS)
  (f,), (pos,) = enc.features, enc.word_positions
  tokens, labels = f["encoder_input_tokens"], f["token_labels"]
  assert tokenizer.decode(tokens) == "[CLS] johanson visited hyperparameterization land [SEP]"
  assert not f["encoder_type_ids"].any() and tokens.dtype == labels.dtype == np.int32
  pieces = [tokenizer.id_to_piece(i) for i in tokens]
  # Each word starts where a piece without '##' starts; that position carries the label.
  starts = [i for i, p in enumerate(pieces[1:-1], 1) if not p.startswith("##")]
  assert pos.tolist() == starts and len(pieces) > len(s.words) + 3  # some word was split
  assert labels[pos].tolist() == [3, 0, 1, 2]
  others = np.setdiff1d(np.arange(len(tokens)), pos)
  assert (labels[others] == -100).all()  # [CLS], [SEP], continuation pieces
  assert enc.num_truncated_sentences == 0


def test_label_all_subwords(tokenizer):
  s = _sentence("Hyperparameterization Hyperparameterization", "B-LOC I-LOC")
  enc = ner.encode_sentences([s], tokenizer, _LABELS, label_all_subwords=True)
  labels, pos = enc.features[0]["token_labels"], enc.word_positions[0]
  width = pos[1] - pos[0]
  assert width > 1
  # B-LOC on the first piece, I-LOC on its continuations and on the whole second word.
  assert labels.tolist() == [-100, 1] + [2] * (width - 1) + [2] * width + [-100]


def test_truncation_is_counted_and_predicted_o(tokenizer):
  sentences = [_sentence("a b c d e f", "O O B-PER I-PER O B-LOC"), _sentence("x y", "O O")]
  enc = ner.encode_sentences(sentences, tokenizer, _LABELS, max_length=6)
  assert enc.num_truncated_sentences == 1 and enc.num_truncated_words == 2
  assert len(enc.features[0]["encoder_input_tokens"]) == 6
  assert enc.word_positions[0].tolist() == [1, 2, 3, 4, -1, -1]
  tags = ner.word_predictions(enc.features[0]["token_labels"], enc.word_positions[0], _LABELS)
  assert tags == ["O", "O", "B-PER", "I-PER", "O", "O"]
  batch = batching.pad_batch(enc.features, multiple=8)
  assert batch["token_labels"].shape == (2, 8) and batch["token_labels"][1, 4:].tolist() == [
      -100] * 4
  with pytest.raises(ValueError, match="test:1: tag 'B-ORG' of this sentence is not in"):
    ner.encode_sentences([_sentence("a", "B-ORG")], tokenizer, _LABELS)


def test_real_validation_labels_round_trip(shared_data, tokenizer):
  train = ner.read_conll(str(shared_data / "conll2003" / "train.txt.gz"))
  labels = ner.label_names_of(train.sentences)
  valid = ner.read_conll(str(shared_data / "conll2003" / "valid.txt.gz"), label_names=labels)
  # 512: three validation sentences need more than 128 tokens with this vocabulary.
  enc = ner.encode_sentences(valid.sentences, tokenizer, labels, max_length=512)
  # Reading the gold labels back at the first sub-words gives every gold entity.
  predicted = [ner.word_predictions(f["token_labels"], p, labels)
               for f, p in zip(enc.features, enc.word_positions)]
  gold = [s.tags for s in valid.sentences]
  scores = ner.entity_metrics(gold, predicted)
  assert enc.num_truncated_sentences == 0
  assert scores["f1"] == 1.0 and scores["num_gold"] == 5942  # CoNLL-2003 dev entities
  decoded = tokenizer.decode(enc.features[0]["encoder_input_tokens"])
  assert decoded == "[CLS] " + " ".join(valid.sentences[0].words).lower() + " [SEP]"


# ----------------------------------------------------------------------------
# conlleval entity metric
# ----------------------------------------------------------------------------

def test_extract_entities_conlleval_rules():
  assert ner.extract_entities("B-PER I-PER O B-LOC".split()) == [("PER", 0, 1), ("LOC", 3, 3)]
  # I- after O (or at the start) opens an entity.
  assert ner.extract_entities("I-PER I-PER O I-LOC".split()) == [("PER", 0, 1), ("LOC", 3, 3)]
  # I- after another type opens a new one; B- after B- of the same type too.
  assert ner.extract_entities("B-PER I-LOC I-LOC".split()) == [("PER", 0, 0), ("LOC", 1, 2)]
  assert ner.extract_entities("B-PER B-PER I-PER".split()) == [("PER", 0, 0), ("PER", 1, 2)]
  assert ner.extract_entities("O O".split()) == []
  assert ner.extract_entities("S-PER B-LOC E-LOC I-LOC".split()) == [
      ("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]  # IOBES as conlleval reads it


def test_entity_metrics_hand_checked():
  gold = ["B-PER I-PER O B-LOC O".split(), "B-ORG I-ORG I-ORG O B-MISC".split()]
  pred = ["B-PER I-PER O B-ORG O".split(),   # PER right; LOC missed, ORG spurious
          "B-ORG I-ORG O O I-MISC".split()]  # ORG end wrong; MISC opened by I- after O: right
  m = ner.entity_metrics(gold, pred)
  assert (m["num_correct"], m["num_predicted"], m["num_gold"]) == (2, 4, 4)
  assert m["precision"] == m["recall"] == m["f1"] == 0.5
  assert m["accuracy"] == 7 / 10
  per = m["per_type"]
  assert per["PER"]["f1"] == 1.0 and per["MISC"]["f1"] == 1.0
  assert per["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "num_gold": 1,
                        "num_predicted": 0, "num_correct": 0}
  assert (per["ORG"]["num_predicted"], per["ORG"]["num_gold"], per["ORG"]["f1"]) == (2, 1, 0.0)


def test_entity_metrics_boundaries_types_and_sentences():
  # Same tokens, wrong type; one boundary off: no credit.
  m = ner.entity_metrics([["B-PER", "I-PER"]], [["B-ORG", "I-ORG"]])
  assert m["f1"] == 0.0 and m["accuracy"] == 0.0
  m = ner.entity_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "I-PER"]])
  assert (m["num_correct"], m["num_predicted"], m["num_gold"]) == (0, 1, 1)
  # B-PER I-LOC vs gold B-PER I-PER: PER(0,0) is not PER(0,1).
  m = ner.entity_metrics([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]])
  assert (m["num_correct"], m["num_predicted"]) == (0, 2)
  # Sentences are scored apart: an I-PER opening sentence 2 never joins sentence 1's entity.
  m = ner.entity_metrics([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
  assert m["f1"] == 1.0 and m["num_gold"] == 2
  # precision 2/3, recall 2/2 -> F1 0.8.
  m = ner.entity_metrics([["B-LOC", "O", "B-PER"]], [["B-LOC", "B-ORG", "B-PER"]])
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
  assert m["f1"] == pytest.approx(0.8)
  with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
    ner.entity_metrics([["O", "O"]], [["O"]])
  assert ner.entity_metrics([["O"]], [["O"]])["f1"] == 0.0  # no entities at all


# ----------------------------------------------------------------------------
# Predictions file
# ----------------------------------------------------------------------------

def test_write_predictions_conll_columns(tmp_path):
  sentences = [_sentence("John lives", "B-PER O"), _sentence("in Paris", "O B-LOC")]
  predicted = [["B-PER", "O"], ["O", "B-PER"]]
  path = tmp_path / "out" / "pred.txt"
  ner.write_predictions(str(path), sentences, predicted)
  assert path.read_text() == ("John B-PER B-PER\nlives O O\n\nin O O\nParis B-LOC B-PER\n\n")
  # conlleval's layout: the last column reads back as the prediction.
  again = ner.read_conll(str(path), num_columns=3)
  assert [list(s.tags) for s in again.sentences] == predicted
  with pytest.raises(ValueError, match="test:1: 2 words but 1 predicted tags"):
    ner.write_predictions(str(path), sentences[:1], [["O"]])
