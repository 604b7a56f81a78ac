"""Tokenizers: WordPiece parity with Hugging Face, SentencePiece training/sentinels."""
import collections
import gzip

import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import tokenizer as tok_lib

# Accents, CJK, punctuation, control and zero-width characters, ligatures and
# full-width letters (which tf_text's NFKC case folding would change), a
# final capital sigma, NBSP, an over-long word, emoji and a combining mark.
HAND_STRINGS = [
    "Héllo Wörld! Café naïve façade ÅNGSTRÖM",
    "中文字符測試 and 日本語のテキスト 한국어",
    "don't stop--now... (really?) «quoted» “curly” — dash",
    "ﬁne Ｆｕｌｌ ß Straße İstanbul ǅ ™ ½",
    "tab\there\x00null\u200bzero\ufffdrep\x7fdel\u00a0nbsp\u2028ls",
    "ΣΊΣΥΦΟΣ ΟΔΥΣΣΕΥΣ Ωmega",
    "a" * 150 + " " + "é" * 60 + " ok",
    "emoji 😀 ok \u0300start combining",
    "numbers 3.14 1,000 $5 #hash @user under_score",
    "soft\u00adhyphen ideographic\u3000space \ufeffbom",
    "हिन्दी العربية Ελληνικά",
    "",
    "   ",
]


def _hf_bert(vocab_path, lower_case):
  transformers = pytest.importorskip("transformers")
  with open(vocab_path, encoding="utf-8") as f:
    vocab = collections.OrderedDict((w.rstrip("\n"), i) for i, w in enumerate(f))
  return transformers.BertTokenizer(vocab=vocab, do_lower_case=lower_case)


def _sst2_dev(shared_data):
  lines = (shared_data / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
  return [line.split("\t")[0] for line in lines[1:]]


@pytest.fixture(scope="module")
def uncased(minilm_dir):
  return tok_lib.WordPieceTokenizer(str(minilm_dir / "vocab.txt"), lower_case=True)


@pytest.mark.parametrize("lower_case", [True, False])
def test_wordpiece_equals_hf_on_sst2_dev(minilm_dir, shared_data, lower_case):
  vocab = str(minilm_dir / "vocab.txt")
  ours = tok_lib.WordPieceTokenizer(vocab, lower_case=lower_case)
  hf = _hf_bert(vocab, lower_case)
  sentences = _sst2_dev(shared_data)
  assert len(sentences) == 872
  got = ours.tokenize(tf.constant(sentences)).to_list()
  want = [hf(s, add_special_tokens=False)["input_ids"] for s in sentences]
  diff = [(s, g, w) for s, g, w in zip(sentences, got, want) if g != w]
  assert not diff, f"{len(diff)} sentences differ, first: {diff[0]}"
  assert sum(map(len, got)) > 15_000  # real tokenisation, not empty lists


@pytest.mark.parametrize("lower_case", [True, False])
def test_wordpiece_equals_hf_on_hard_strings(minilm_dir, lower_case):
  vocab = str(minilm_dir / "vocab.txt")
  ours = tok_lib.WordPieceTokenizer(vocab, lower_case=lower_case)
  hf = _hf_bert(vocab, lower_case)
  got = ours.tokenize(tf.constant(HAND_STRINGS)).to_list()
  for s, g in zip(HAND_STRINGS, got):
    assert g == hf(s, add_special_tokens=False)["input_ids"], repr(s)


def test_wordpiece_behaviour_by_hand(uncased):
  ids = uncased.tokenize("Héllo, 中文!").numpy().tolist()  # scalar in, 1-D out
  assert [uncased.id_to_piece(i) for i in ids] == ["hello", ",", "中", "文", "!"]
  ids = uncased.tokenize("unflinchingly").numpy()
  assert [uncased.id_to_piece(i) for i in ids] == ["un", "##fl", "##in", "##ching", "##ly"]
  assert uncased.word_start[ids].tolist() == [True, False, False, False, False]
  assert uncased.decode(ids) == "unflinchingly"
  # A literal "[MASK]" in raw text is text, never the mask id.
  ids = uncased.tokenize("[MASK]").numpy().tolist()
  assert uncased.mask_id not in ids and len(ids) == 3


def test_wordpiece_special_ids_and_tables(uncased, minilm_dir):
  assert uncased.vocab_size == 30522
  assert (uncased.pad_id, uncased.unk_id, uncased.cls_id, uncased.sep_id,
          uncased.mask_id) == (0, 100, 101, 102, 103)
  assert uncased.eos_id is None and uncased.num_extra_ids == 0
  assert uncased.require_mask_token() == 103
  special = np.flatnonzero(uncased.special)
  # [PAD], [unused0..993], [UNK], [CLS], [SEP], [MASK]: 999 bracketed slots.
  assert len(special) == 999 and {0, 100, 101, 102, 103} <= set(special.tolist())
  assert not uncased.special[uncased.tokenize("the cat").numpy()].any()
  with pytest.raises(ValueError, match="vocab.txt.*0 extra ids"):
    uncased.sentinel_ids(1)


def test_tokenize_inside_tf_data_map(uncased):
  docs = [["First paragraph here.", "Second one!"], ["Only one."]]
  ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(docs))
  ds = ds.map(uncased.tokenize, num_parallel_calls=2, deterministic=True)
  out = [r.to_list() for r in ds]  # each [paragraphs, (ids)]
  assert out == [uncased.tokenize(tf.constant(d)).to_list() for d in docs]
  assert [len(o) for o in out] == [2, 1] and all(len(p) > 1 for o in out for p in o)


def test_invalid_utf8_is_replaced_and_counted(uncased):
  before = int(uncased.invalid_utf8_bytes.numpy())
  texts = tf.constant([b"caf\xe9 ok", b"fine", b"\xff\xfe bad \xc3"])
  got = uncased.tokenize(texts).to_list()
  assert int(uncased.invalid_utf8_bytes.numpy()) - before == 4
  # The bad byte is replaced (then deleted as U+FFFD by BERT cleaning), so
  # "caf\xe9" reads as "caf".
  assert got == uncased.tokenize(tf.constant(["caf ok", "fine", " bad "])).to_list()
  # Counting also runs inside tf.data.
  ds = tf.data.Dataset.from_tensor_slices(texts).batch(3).map(uncased.tokenize)
  list(ds)
  assert int(uncased.invalid_utf8_bytes.numpy()) - before == 8
  # Valid text, even a literal U+FFFD, counts nothing (and skips the count).
  uncased.tokenize(tf.constant(["ok \ufffd fine", "plain"]))
  assert int(uncased.invalid_utf8_bytes.numpy()) - before == 8


def test_missing_vocab_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    tok_lib.WordPieceTokenizer(str(tmp_path / "nope.txt"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    tok_lib.SentencePieceTokenizer(str(bad))


# ----------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------

def _english_lines():
  """Real English prose that ships with Python (the pydoc topic texts)."""
  from pydoc_data import topics
  text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
  return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "corpus.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(_english_lines()[:6000]) + "\n")
  return path


@pytest.fixture(scope="module")
def t5_style(corpus_file):
  tok = tok_lib.train_sentencepiece(
      [str(corpus_file)], str(corpus_file.parent / "t5"), 600,
      input_sentence_size=6000, num_threads=2)
  assert tok.path == str(corpus_file.parent / "t5.model")
  # Loading the file again with the same extra ids gives the same vocabulary.
  again = tok_lib.load_tokenizer(tok.path, extra_ids=100)
  assert again.pieces == tok.pieces and (again.special == tok.special).all()
  return tok


def test_sentencepiece_t5_layout(t5_style):
  tok = t5_style
  assert tok.vocab_size == 700 and tok.num_extra_ids == 100
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.sentinel_ids(3).tolist() == [699, 698, 697]
  assert tok.id_to_piece(699) == "<extra_id_0>" and tok.id_to_piece(600) == "<extra_id_99>"
  assert tok.special[600:].all() and tok.special[:3].all() and not tok.special[3:600].all()
  assert len(tok.sentinel_ids(100)) == 100
  with pytest.raises(ValueError, match="needs 101 sentinel.*t5.model.*100 extra ids"):
    tok.sentinel_ids(101)
  with pytest.raises(ValueError, match=r"\[MASK\].*t5.model"):
    tok.require_mask_token()


def test_sentencepiece_survives_invalid_utf8(t5_style):
  before = int(t5_style.invalid_utf8_bytes.numpy())
  ids = t5_style.tokenize(tf.constant([b"ok \xff then", b"fine"])).to_list()
  assert int(t5_style.invalid_utf8_bytes.numpy()) - before == 1
  assert ids[1] == t5_style.tokenize("fine").numpy().tolist()
  assert ids[0] == t5_style.tokenize("ok \ufffd then").numpy().tolist()


def test_sentencepiece_tokenize_matches_python_and_decodes(t5_style):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=t5_style.path)
  texts = ["The return statement leaves the current function call.",
           "Strings are immutable sequences of Unicode code points."]
  ids = t5_style.tokenize(tf.constant(texts)).to_list()
  assert ids == sp.encode(texts)
  assert t5_style.decode(ids[0]) == texts[0]
  starts = [t5_style.word_start[i] for i in ids[0]]
  assert sum(starts) == len(texts[0].split())  # one '▁' piece per word
  sentinel = t5_style.sentinel_ids(1)[0]
  assert t5_style.decode(ids[0][:2] + [sentinel]).endswith("<extra_id_0>")
  ds = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(t5_style.tokenize)
  assert next(iter(ds)).to_list() == ids


def test_sentencepiece_bert_special_tokens(corpus_file):
  tok = tok_lib.train_sentencepiece(
      str(corpus_file), str(corpus_file.parent / "bert"), 500, extra_ids=0,
      bert_special_tokens=True, model_type="bpe", input_sentence_size=6000, num_threads=2)
  assert isinstance(tok, tok_lib.SentencePieceTokenizer)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == 500 and tok.eos_id is None
  assert tok.require_mask_token() == 4
  assert tok.special[:5].all()
  ids = tok.tokenize("a [MASK] here").numpy().tolist()
  assert 4 not in ids  # control symbols are never produced from raw text
  with pytest.raises(ValueError, match="bert.model"):
    tok.sentinel_ids(1)


def test_train_rejects_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    tok_lib.train_sentencepiece(str(tmp_path / "nothing-here*.txt"), str(tmp_path / "m"), 100)
  with pytest.raises(ValueError, match="m.model failed.*vocab_size=5000"):
    tok_lib.train_sentencepiece(iter(["a few words", "not enough"]), str(tmp_path / "m"), 5000)


def test_wordpiece_equals_hf_on_wikipedia(minilm_dir, shared_data):
  vocab = str(minilm_dir / "vocab.txt")
  with gzip.open(shared_data / "wiki_en" / "valid.txt.gz", "rt", encoding="utf-8") as f:
    paragraphs = [line.strip() for line in f if line.strip()]
  assert len(paragraphs) > 5000
  got = tok_lib.WordPieceTokenizer(vocab).tokenize(tf.constant(paragraphs)).to_list()
  rust = _hf_bert(vocab, True).backend_tokenizer
  want = [e.ids for e in rust.encode_batch(paragraphs, add_special_tokens=False)]
  diff = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
  assert not diff, f"{len(diff)} paragraphs differ, first: {paragraphs[diff[0]][:200]!r}"
