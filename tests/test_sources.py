"""Text sources: files (plain/gz), offline tfds, built-in corpus, sharding, errors."""
import gzip
import os

import pytest
import tensorflow as tf

from bert_jax.data import sources
from conftest import prepare_tfds


def _reference_documents(text: str):
  """Straightforward Python grouping: blank (after strip) lines end documents."""
  docs, current = [], []
  for line in text.split("\n"):
    if line.strip():
      current.append(line.strip())
    elif current:
      docs.append(current)
      current = []
  if current:
    docs.append(current)
  return docs


def _docs(source):
  return [[p.decode() for p in d] for d in source.documents().as_numpy_iterator()]


def test_files_plain_and_gz_in_sorted_order(tmp_path):
  # One long document spans several 1024-line chunks; runs of blank and
  # whitespace-only lines, CRLF endings and a missing final blank line.
  long_doc = "\n".join(f"paragraph {i} of the long one" for i in range(2500))
  text_a = f"\n\n  \nfirst doc line one\r\nline two\n\n\n\n{long_doc}\n  \t \nlast doc"
  text_b = "b1\nb2\n\nb3\n"
  (tmp_path / "b.txt").write_text(text_b, encoding="utf-8")
  with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
    f.write(text_a)
  source = sources.open_source(str(tmp_path / "*"))
  ds = source.documents()
  assert ds.element_spec == tf.TensorSpec([None], tf.string)
  want = _reference_documents(text_a) + _reference_documents(text_b)
  assert [len(d) for d in want] == [2, 2500, 1, 2, 1]
  assert [[p.decode() for p in d] for d in ds.as_numpy_iterator()] == want
  assert list(source.iter_documents()) == want  # a second pass reads the same
  assert int(source.invalid_utf8_bytes.numpy()) == 0


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"caf\xe9 au lait\n\xff\xfeboom\n\nok \xc3\n")
  source = sources.open_source(str(path))
  assert _docs(source) == [["caf\ufffd au lait", "\ufffd\ufffdboom"], ["ok \ufffd"]]
  assert int(source.invalid_utf8_bytes.numpy()) == 4


@pytest.mark.parametrize("make, match", [
    (lambda d: str(d / "missing.txt"), "missing.txt does not exist"),
    (lambda d: str(d / "none-*.txt"), "none-\\*.txt matches no file"),
    (lambda d: str(d), "is a folder"),
])
def test_missing_inputs_are_clear_errors(tmp_path, make, match):
  with pytest.raises((FileNotFoundError, ValueError), match=match):
    sources.open_source(make(tmp_path))


@pytest.mark.parametrize("name, content", [
    ("empty.txt", b""), ("blank.txt", b"\n \n\t\n"), ("empty.txt.gz", gzip.compress(b"", mtime=0)),
    ("broken.txt.gz", b"\x1f\x8b\x08garbage")], ids=["empty", "blank", "empty-gz", "broken-gz"])
def test_empty_or_unreadable_files_are_clear_errors(tmp_path, name, content):
  (tmp_path / name).write_bytes(content)
  (tmp_path / "good.txt").write_text("fine\n")
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    sources.open_source(str(tmp_path / "*"))


def test_files_subset_opens_only_those_files(tmp_path):
  for name in ("c.txt", "a.txt", "b.txt"):
    (tmp_path / name).write_text(f"{name} one\n\n{name} two\n")
  spec = str(tmp_path / "*.txt")
  assert sources.list_files(spec) == [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")]
  assert sources.list_files("builtin:pydoc_topics") is None
  (tmp_path / "b.txt").write_bytes(b"")  # empty: an error only if b.txt is opened
  with pytest.raises(ValueError, match="b.txt is empty"):
    sources.open_source(spec)
  source = sources.open_source(spec, files=[str(tmp_path / "c.txt"), str(tmp_path / "a.txt")])
  assert source.files == [str(tmp_path / "c.txt"), str(tmp_path / "a.txt")]
  assert _docs(source) == [["c.txt one"], ["c.txt two"], ["a.txt one"], ["a.txt two"]]
  # documents(files=...) reads a subset of those, also from a tensor.
  picked = source.documents(files=tf.constant([str(tmp_path / "a.txt")]))
  assert [[p.decode() for p in d] for d in picked.as_numpy_iterator()] == [
      ["a.txt one"], ["a.txt two"]]
  with pytest.raises(ValueError, match="not a file source"):
    sources.open_source("builtin:pydoc_topics", files=["x.txt"])
  with pytest.raises(ValueError, match="not a file source"):
    sources.open_source("builtin:pydoc_topics").documents(files=["x.txt"])


def test_real_wikipedia_validation_file(shared_data):
  path = shared_data / "wiki_en" / "valid.txt.gz"
  with gzip.open(path, "rt", encoding="utf-8") as f:
    want = _reference_documents(f.read())
  got = _docs(sources.open_source(str(path)))
  assert len(got) == 131  # articles, per the data README
  assert got == want


def test_shard_is_disjoint_and_complete():
  ds = tf.data.Dataset.range(11)
  for count in (1, 2, 3):
    parts = [list(sources.shard(ds, i, count).as_numpy_iterator()) for i in range(count)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == list(range(11)) and len(set(flat)) == 11
  with pytest.raises(ValueError, match="process_index 2"):
    sources.shard(ds, 2, 2)


def test_builtin_pydoc_topics_is_real_english():
  source = sources.open_source("builtin:pydoc_topics")
  docs = _docs(source)
  words = sum(len(p.split()) for d in docs for p in d)
  assert len(docs) > 50 and words > 40_000
  assert all(d and all(p.strip() == p and p for p in d) for d in docs)
  text = " ".join(p for d in docs for p in d)
  assert " the " in text and "statement" in text
  assert _docs(sources.open_source("builtin:pydoc_topics")) == docs
  with pytest.raises(ValueError, match="unknown builtin corpus 'nope'"):
    sources.open_source("builtin:nope")


@pytest.mark.slow
def test_builtin_stdlib_docstrings():
  docs = list(sources.open_source("builtin:stdlib_docstrings").iter_documents())
  assert len(docs) > 1000
  assert sum(len(p.split()) for d in docs for p in d) > 100_000


# ----------------------------------------------------------------------------
# tfds, offline: a tiny dataset prepared into a temporary data_dir.
# ----------------------------------------------------------------------------

TFDS_TEXTS = ["Para one.\nPara two.\n\n", "Only one para", "  \n \n", "x\ny\nz"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  examples = tf.data.Dataset.from_tensor_slices(
      {"text": TFDS_TEXTS, "id": list(range(len(TFDS_TEXTS)))})
  features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": tf.int64})
  builder = tfds.dataset_builders.TfDataBuilder(
      name="tiny_corpus", config="en", version="1.0.0", data_dir=data_dir,
      split_datasets={"train": examples, "validation": examples.take(1)},
      features=features)
  builder.download_and_prepare()
  return data_dir


def test_tfds_source_reads_prepared_dataset(tfds_dir):
  source = sources.open_source("tfds:tiny_corpus/en:text", data_dir=tfds_dir)
  got = sorted(_docs(source))  # tfds stores examples in its own shuffled order
  assert got == sorted([["Para one.", "Para two."], ["Only one para"], ["x", "y", "z"]])
  assert _docs(source) == _docs(source)  # fixed order
  pinned = sources.open_source("tfds:tiny_corpus/en:1.0.0:text", data_dir=tfds_dir,
                               split="validation")
  assert _docs(pinned) == [["Para one.", "Para two."]]


@pytest.mark.parametrize("spec, split, match", [
    ("tfds:tiny_corpus/en:title", "train", "no feature 'title'"),
    ("tfds:tiny_corpus/en:text", "test", "no split 'test'"),
    ("tfds:tiny_corpus/en:2.0.0:text", "train", "tiny_corpus/en:2.0.0 is not prepared"),
    ("tfds:c4/en:text", "train", "c4/en is not prepared.*tfds build c4 --config=en"),
    ("tfds:no_such_dataset_xyz:text", "train", "not a known tfds dataset name"),
    ("tfds:c4/en", "train", "must be tfds:NAME"),
])
def test_tfds_errors_are_clear_and_offline(tfds_dir, spec, split, match):
  with pytest.raises((FileNotFoundError, ValueError), match=match):
    sources.open_source(spec, data_dir=tfds_dir, split=split)


# A split stored in 4 shard files: 4 tfds shard files of 5 examples each.
SHARDED_TEXTS = [f"Doc {i} first.\nDoc {i} second." if i % 7 else f"Doc {i} alone"
                 for i in range(20)]


@pytest.fixture(scope="module")
def sharded_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_sharded")
  tfds = pytest.importorskip("tensorflow_datasets")
  prepare_tfds(data_dir, "sharded_corpus", {"text": tfds.features.Text()},
               {"train": {"text": SHARDED_TEXTS}}, num_files=4)
  return data_dir


def _tfds_file_docs(folder, j):
  """File j's documents, read by tfds itself (split slicing by shard file)."""
  import tensorflow_datasets as tfds
  ds = tfds.builder_from_directory(folder).as_dataset(split=f"train[{j}shard]")
  return [t.decode().split("\n") for t in ds.map(lambda e: e["text"]).as_numpy_iterator()]


def test_tfds_file_shard_reads_only_its_whole_files(sharded_tfds_dir, tmp_path):
  import shutil
  spec = "tfds:sharded_corpus:text"
  source = sources.open_source(spec, data_dir=str(sharded_tfds_dir))
  names = [os.path.basename(f) for f in source.tfds_files]
  assert names == [f"sharded_corpus-train.tfrecord-0000{j}-of-00004" for j in range(4)]
  assert source.num_files == 4 and source.files is None
  folder = os.path.dirname(source.tfds_files[0])
  per_file = [_tfds_file_docs(folder, j) for j in range(4)]
  assert sorted(d for f in per_file for d in f) == sorted(t.split("\n") for t in SHARDED_TEXTS)
  # The whole split: the files one after another, each in stored order.
  assert _docs(source) == [d for f in per_file for d in f]
  for count in (1, 2, 3, 4):
    for index in range(count):
      got = [[p.decode() for p in d] for d in
             source.documents(file_shard=(index, count)).as_numpy_iterator()]
      assert got == [d for j in range(index, 4, count) for d in per_file[j]], (index, count)
  # A tensor index, as in the pipeline (one trace serves every share).
  by_tensor = tf.data.Dataset.range(2).flat_map(
      lambda i: source.documents(file_shard=(i, 2)))
  assert [[p.decode() for p in d] for d in by_tensor.as_numpy_iterator()] == (
      per_file[0] + per_file[2] + per_file[1] + per_file[3])
  # Share 0 of 2 opens only files 0 and 2: with files 1 and 3 gone it still
  # reads, while the whole split fails on a missing file.
  copy = tmp_path / "copy"
  shutil.copytree(sharded_tfds_dir, copy)
  for j in (1, 3):
    (copy / "sharded_corpus" / "1.0.0" / names[j]).unlink()
  partial = sources.open_source(spec, data_dir=str(copy))
  got = [[p.decode() for p in d] for d in
         partial.documents(file_shard=(0, 2)).as_numpy_iterator()]
  assert got == per_file[0] + per_file[2]
  with pytest.raises(tf.errors.NotFoundError):
    _docs(partial)


def test_file_shard_errors_and_text_files(sharded_tfds_dir, tmp_path):
  source = sources.open_source("tfds:sharded_corpus:text", data_dir=str(sharded_tfds_dir))
  with pytest.raises(ValueError, match="has 4 file.*count=5 must be in \\[1, 4\\]"):
    source.documents(file_shard=(0, 5))
  with pytest.raises(ValueError, match="index=2 must be in \\[0, count=2\\)"):
    source.documents(file_shard=(2, 2))
  with pytest.raises(ValueError, match="builtin corpus"):
    sources.open_source("builtin:pydoc_topics").documents(file_shard=(0, 1))
  # Text files: the same rule over the sorted paths.
  for j in range(3):
    (tmp_path / f"t{j}.txt").write_text(f"t{j} a\n\nt{j} b\n")
  text = sources.open_source(str(tmp_path / "t*.txt"))
  assert text.num_files == 3 and text.tfds_files is None
  got = [[p.decode() for p in d] for d in text.documents(file_shard=(0, 2)).as_numpy_iterator()]
  assert got == [["t0 a"], ["t0 b"], ["t2 a"], ["t2 b"]]
  with pytest.raises(ValueError, match="not both"):
    text.documents(files=text.files[:1], file_shard=(0, 2))


def test_sentencepiece_trains_on_builtin_corpus(tmp_path):
  from bert_jax.data import tokenizer as tok_lib
  tok = tok_lib.train_sentencepiece(
      sources.iter_paragraphs("builtin:pydoc_topics"), str(tmp_path / "sp"), 400,
      num_threads=2)
  assert tok.vocab_size == 500
  ids = tok.tokenize("The import statement").numpy()
  assert tok.decode(ids) == "The import statement"
