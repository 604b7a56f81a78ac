"""Byte-level BPE (bert_jax.data.bpe): Hugging Face RobertaTokenizer parity, id for id.

No RoBERTa vocabulary can be had offline, so each test session trains a small
byte-level BPE with the `tokenizers` package (RoBERTa's special-token layout:
<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last) on text that ships with Python
(the docstrings of standard-library modules) plus the hand-written Unicode
strings below, and compares our ids with transformers.RobertaTokenizer loaded
from the same vocab.json + merges.txt.
"""
import json

import numpy as np
import pytest
import tensorflow as tf

from bert_jax.data import bpe
from bert_jax.data import tokenizer as tok_lib
from conftest import python_docstring_lines, train_roberta_bpe

# Contractions (GPT-2 splits only lower-case 's 't 're 've 'm 'll 'd), runs of
# spaces, leading/trailing spaces, tabs and newlines, digits next to letters,
# accents, CJK, emoji (4-byte UTF-8), combining marks, NBSP, zero-width and
# other format characters, U+001C (a symbol for GPT-2, whitespace to Python),
# and right-to-left scripts.
HAND_STRINGS = [
    "Héllo Wörld! Café naïve façade ÅNGSTRÖM",
    "don't you're we've I'm they'll he'd it's DON'T YOU'RE I'M",
    "  two leading spaces, three   inside,  trailing  ",
    " one leading space",
    "tab\there\nnew line\r\ncrlf\x0bvt\x0cff",
    "numbers 3.14 1,000,000 $5 #hash @user under_score 2nd 10x",
    "中文字符測試 and 日本語のテキスト 한국어",
    "emoji 😀😀 ok 👍🏽 family 👨‍👩‍👧",
    "\u0300start combining e\u0301 and precomposed é",
    "nbsp\u00a0here zero\u200bwidth soft\u00adhyphen bom\ufeffx ideographic\u3000space",
    "info\x1cseparator\x1funit and\u2028line\u2029para",
    "हिन्दी العربية Ελληνικά עברית",
    "«quoted» “curly” — dash… ellipsis ½ ² Ⅻ",
    "x",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
  """A RoBERTa-layout vocab.json + merges.txt trained with `tokenizers`."""
  corpus = python_docstring_lines(
      ("os", "re", "json", "collections", "argparse", "unittest", "logging", "subprocess",
       "threading", "pathlib", "functools", "itertools", "inspect", "email.message",
       "http.client", "urllib.parse", "decimal", "datetime"))
  return train_roberta_bpe(tmp_path_factory.mktemp("bpe"), corpus + HAND_STRINGS * 5, 3000)


@pytest.fixture(scope="module")
def ours(roberta_files):
  return bpe.BpeTokenizer(str(roberta_files))


def _hf_classes():
  transformers = pytest.importorskip("transformers")
  # transformers 5 made RobertaTokenizerFast an alias of RobertaTokenizer
  # (both the Rust `tokenizers` BPE); both names are checked all the same.
  return [transformers.RobertaTokenizer, transformers.RobertaTokenizerFast]


def _hf(folder, cls, **kwargs):
  return cls(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), **kwargs)


def _sst2_dev(shared_data):
  lines = (shared_data / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
  return [line.split("\t")[0] for line in lines[1:]]


def test_special_ids_follow_roberta(ours, roberta_files):
  assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id) == (0, 1, 2, 3)
  assert ours.mask_id == ours.vocab_size - 1 == 3000
  assert ours.eos_id == ours.sep_id
  assert ours.require_mask_token() == ours.mask_id
  assert np.flatnonzero(ours.special).tolist() == [0, 1, 2, 3, ours.mask_id]
  vocab = json.loads((roberta_files / "vocab.json").read_text(encoding="utf-8"))
  assert ours.word_start[vocab["Ġthe"]] and not ours.word_start[vocab["the"]]
  assert ours.id_to_piece(vocab["Ġthe"]) == "Ġthe"


def test_load_tokenizer_picks_bpe(roberta_files, ours):
  for path in (str(roberta_files), str(roberta_files / "vocab.json")):
    tok = tok_lib.load_tokenizer(path)
    assert isinstance(tok, bpe.BpeTokenizer)
    assert tok.encode("Hello world") == ours.encode("Hello world")


def test_hand_strings_match_hugging_face(ours, roberta_files):
  for cls in _hf_classes():
    hf = _hf(roberta_files, cls)
    for s in HAND_STRINGS:
      assert ours.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)
      tokens, types = ours.build_inputs(ours.encode(s))
      assert tokens.tolist() == hf(s)["input_ids"], repr(s)
      assert not types.any()
    # Hugging Face takes an empty second text for no pair at all; ours
    # (like BERT's features) keeps the pair layout, so those are left out.
    for a, b in zip(HAND_STRINGS, HAND_STRINGS[1:] + HAND_STRINGS[:1]):
      if not b:
        continue
      tokens, types = ours.build_inputs(ours.encode(a), ours.encode(b))
      assert tokens.tolist() == hf(a, b)["input_ids"], (a, b)
      assert not types.any()


def test_sst2_dev_matches_hugging_face(ours, roberta_files, shared_data):
  dev = _sst2_dev(shared_data)
  assert len(dev) == 872
  for cls in _hf_classes():
    hf = _hf(roberta_files, cls)
    expected = hf(dev, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(dev) == expected
    assert [ours.build_inputs(ours.encode(s))[0].tolist() for s in dev] == hf(dev)["input_ids"]
    pairs = list(zip(dev[:200], dev[1:201]))
    got = [ours.build_inputs(ours.encode(a), ours.encode(b))[0].tolist() for a, b in pairs]
    assert got == hf([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]
  # The vocabulary is small, so words are really cut into several pieces.
  assert sum(map(len, expected)) > 1.2 * sum(len(s.split()) for s in dev)


def test_add_prefix_space_matches_hugging_face(roberta_files):
  tok = bpe.BpeTokenizer(str(roberta_files), add_prefix_space=True)
  hf = _hf(roberta_files, _hf_classes()[0], add_prefix_space=True)
  for s in HAND_STRINGS:
    assert tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)


def test_words_alone_match_hugging_face_split_words(ours, roberta_files):
  """word_prefix + word, word by word, is HF's is_split_into_words with a prefix space."""
  hf = _hf(roberta_files, _hf_classes()[0], add_prefix_space=True)
  words = "EU rejects German call to boycott British lamb , 1996-08-22 Müller .".split()
  ours_ids = [i for w in words for i in ours.encode(ours.word_prefix + w)]
  assert ours_ids == hf(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]


def test_pretokenizer_classes_match_rust_on_the_bmp():
  """Letter, digit and whitespace classes agree with `tokenizers`' regex on every character.

  Only characters Python's Unicode database assigns are compared: for newer
  ones (category Cn here) the two Unicode versions differ by design.
  """
  import unicodedata
  pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
  rust = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  table = bpe.bytes_to_unicode()
  pattern = bpe.pretokenize_pattern()
  checked = 0
  for cp in range(0x10000):
    c = chr(cp)
    if unicodedata.category(c) in ("Cn", "Cs"):
      continue
    s = f"a{c}{c} 1{c}"
    mine = ["".join(table[b] for b in p.encode("utf-8")) for p in pattern.findall(s)]
    assert mine == [p for p, _ in rust.pre_tokenize_str(s)], hex(cp)
    checked += 1
  assert checked > 50000


def test_decode_round_trips(ours, roberta_files, shared_data):
  hf = _hf(roberta_files, _hf_classes()[0])
  for s in HAND_STRINGS + _sst2_dev(shared_data):
    ids = ours.encode(s)
    assert ours.decode(ids) == s, repr(s)
    assert ours.decode(ids) == hf.decode(ids), repr(s)
  tokens, _ = ours.build_inputs(ours.encode("a b"), ours.encode("c"))
  assert ours.decode(np.concatenate([tokens, [ours.pad_id] * 3])) == "<s>a b</s></s>c</s>"
  # A multi-byte character cut in two decodes to U+FFFD instead of failing.
  rare = ours.encode("\U0001D518")  # not in the training text: four byte pieces
  assert len(rare) == 4 and ours.decode(rare[:-1]) == "\ufffd"


def test_tokenize_ragged_eager_and_in_tf_data(ours):
  texts = HAND_STRINGS[:6]
  ragged = ours.tokenize(texts)
  assert ragged.to_list() == ours.encode_batch(texts)
  assert ours.tokenize(texts[0]).numpy().tolist() == ours.encode(texts[0])
  ds = tf.data.Dataset.from_tensor_slices(texts).batch(3).map(ours.tokenize)
  got = [row for batch in ds for row in batch.to_list()]
  assert got == ours.encode_batch(texts)


def test_bad_files_are_named(tmp_path, roberta_files):
  vocab = (roberta_files / "vocab.json").read_text(encoding="utf-8")
  (tmp_path / "vocab.json").write_text(vocab, encoding="utf-8")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    bpe.BpeTokenizer(str(tmp_path / "vocab.json"))
  (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nbad line here\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"merges.txt:3"):
    bpe.BpeTokenizer(str(tmp_path))
  (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
  (tmp_path / "vocab.json").write_text(json.dumps({"<unk>": 0, "<pad>": 2}), encoding="utf-8")
  with pytest.raises(ValueError, match="without gaps"):
    bpe.BpeTokenizer(str(tmp_path))
  (tmp_path / "vocab.json").write_text(json.dumps({"<unk>": 0, "a": 1}), encoding="utf-8")
  with pytest.raises(ValueError, match="<pad>"):
    bpe.BpeTokenizer(str(tmp_path))
