"""Remote paths (gs:// on Cloud TPU VMs) for text sources and tokenizers.

No cloud here: TensorFlow's in-memory filesystem `ram://` is served by the same
tf.io.gfile code path as gs:// (a URL scheme, a registered filesystem), so each
test writes the same files to a local folder and to ram:// and checks that
both give the same documents, vocabularies and errors.
"""
import gzip
import os
import tempfile
import uuid

import pytest
import tensorflow as tf

from bert_jax import defaults
from bert_jax.data import files as files_lib
from bert_jax.data import sources
from bert_jax.data import tokenizer as tok_lib


@pytest.fixture
def ram_dir():
  """A fresh folder on TensorFlow's in-memory filesystem, removed afterwards."""
  path = f"ram://bert_jax_test_{uuid.uuid4().hex}"
  tf.io.gfile.makedirs(path)
  yield path
  tf.io.gfile.rmtree(path)


def _write(folder: str, name: str, data: bytes) -> str:
  """Writes `data` to folder/name, local or remote; returns the path."""
  path = os.path.join(folder, name)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)
  return path


def _docs(source):
  return [[p.decode() for p in d] for d in source.documents().as_numpy_iterator()]


def _english_lines(n: int):
  """Real English prose that ships with Python (the pydoc topic texts)."""
  from pydoc_data import topics
  text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
  return [line.strip() for line in text.splitlines() if line.strip()][:n]


def test_ram_filesystem_is_a_remote_gfile_path(ram_dir):
  # The premise of every other test: ram:// goes through tf.io.gfile like gs://.
  assert files_lib.is_remote(ram_dir) and files_lib.is_remote("gs://bucket/x")
  assert not files_lib.is_remote("/tmp/x") and not files_lib.is_remote("data/gs:/x")
  _write(ram_dir, "sub/a.txt", b"hello")
  assert tf.io.gfile.isdir(ram_dir + "/sub") and files_lib.isfile(ram_dir + "/sub/a.txt")
  assert not files_lib.isfile(ram_dir + "/sub") and not files_lib.isfile(ram_dir + "/nope")
  assert files_lib.glob_paths(ram_dir + "/*/*.txt") == [ram_dir + "/sub/a.txt"]
  assert not os.path.exists(ram_dir)  # nothing on local disk


# Runs of blank lines, CRLF endings, a document longer than one 1024-line chunk,
# invalid UTF-8 and a missing final newline.
_FILES = {
    "a.txt": b"\n\n first doc\r\nline two\r\n\r\n\r\nsecond\n\n",
    "b.txt.gz": gzip.compress(
        "\n".join(f"long paragraph {i}" for i in range(1500)).encode() + b"\n\nlast"),
    "c.txt": b"caf\xe9 bytes\n  \t\nend without newline",
}


def test_text_source_on_ram_equals_local_disk(tmp_path, ram_dir):
  for name, data in _FILES.items():
    _write(str(tmp_path), name, data)
    _write(ram_dir, name, data)
  # A folder whose name matches the glob is no file: skipped on both.
  _write(str(tmp_path), "d.txt/inner", b"x\n")
  _write(ram_dir, "d.txt/inner", b"x\n")
  local = sources.open_source(str(tmp_path / "*.txt*"))
  remote = sources.open_source(ram_dir + "/*.txt*")
  assert remote.files == [f"{ram_dir}/{n}" for n in sorted(_FILES)]
  assert sources.list_files(ram_dir + "/*.txt*") == remote.files
  want = _docs(local)
  assert [len(d) for d in want] == [2, 1, 1500, 1, 1, 1]
  assert _docs(remote) == want
  assert int(remote.invalid_utf8_bytes.numpy()) == int(local.invalid_utf8_bytes.numpy()) == 1
  # One named file (no glob), and a host's subset of the files.
  single = sources.open_source(f"{ram_dir}/b.txt.gz")
  assert single.files == [f"{ram_dir}/b.txt.gz"] and _docs(single) == want[2:4]
  subset = sources.open_source(ram_dir + "/*.txt*", files=[f"{ram_dir}/c.txt"])
  assert _docs(subset) == want[4:]


def test_glob_under_ram(ram_dir):
  for name in ("x/2.txt", "x/1.txt", "x/.hidden.txt", "y/3.txt", "x/notes.md"):
    _write(ram_dir, name, f"{name} text\n".encode())
  # '?' and '[...]' work; a glob spans folders; results are sorted.
  assert sources.list_files(ram_dir + "/x/[0-9].txt") == [f"{ram_dir}/x/1.txt",
                                                          f"{ram_dir}/x/2.txt"]
  assert sources.list_files(ram_dir + "/?/*.txt")[-1] == f"{ram_dir}/y/3.txt"
  docs = list(sources.iter_paragraphs(ram_dir + "/x/?.txt"))
  assert docs == ["x/1.txt text", "x/2.txt text"]


def _error(spec: str) -> str:
  with pytest.raises((FileNotFoundError, ValueError)) as info:
    sources.open_source(spec)
  return f"{info.type.__name__}: {info.value}"


@pytest.mark.parametrize("name, data, spec", [
    (None, None, "missing.txt"),
    (None, None, "none-*.txt"),
    ("sub/x.txt", b"x\n", "sub"),
    ("empty.txt", b"", "empty.txt"),
    ("blank.txt", b"\n \r\n\t\n", "blank.txt"),
    ("empty.txt.gz", gzip.compress(b"", mtime=0), "empty.txt.gz"),
    ("broken.txt.gz", b"\x1f\x8b\x08garbage", "broken.txt.gz"),
    ("cut.txt.gz", gzip.compress(b"some text\n", mtime=0)[:5], "cut.txt.gz"),
], ids=["missing", "no-match", "folder", "empty", "blank", "empty-gz", "broken-gz", "cut-gz"])
def test_missing_or_empty_ram_files_give_the_local_errors(tmp_path, ram_dir, name, data, spec):
  local_dir = str(tmp_path)
  if name:
    _write(local_dir, name, data)
    _write(ram_dir, name, data)
  local = _error(os.path.join(local_dir, spec))
  remote = _error(os.path.join(ram_dir, spec))
  # The same message, naming the remote path where the local one named its own.
  assert remote == local.replace(local_dir, ram_dir)
  assert ram_dir in remote
  assert any(word in remote for word in ("does not exist", "matches no file", "is a folder",
                                         "is empty", "cannot read"))


def test_tfds_version_lookup_under_ram(ram_dir):
  # tfds itself opens gs:// folders (etils.epath); the folder lookup before it
  # is ours. (epath knows gs:// but not ram://, so only the lookup is run here.)
  for version in ("1.0.0", "1.10.0", "1.2.0"):
    _write(ram_dir, f"tiny/en/{version}/dataset_info.json", b"{}")
  _write(ram_dir, "tiny/en/2.0.0/unfinished.tmp", b"")  # no dataset_info.json
  assert sources.tfds_folder("tiny/en", ram_dir) == f"{ram_dir}/tiny/en/1.10.0"
  assert sources.tfds_folder("tiny/en:1.2.0", ram_dir) == f"{ram_dir}/tiny/en/1.2.0"
  with pytest.raises(FileNotFoundError, match="tiny/en:2.0.0 is not prepared in data_dir ram://"):
    sources.tfds_folder("tiny/en:2.0.0", ram_dir)


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

def test_wordpiece_vocab_from_ram(tmp_path, ram_dir):
  # CRLF endings, as open() reads them (universal newlines), and non-ASCII pieces.
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "caf", "##é", "é", "!"]
  data = "\r\n".join(pieces).encode("utf-8") + b"\r\n"
  local = tok_lib.WordPieceTokenizer(_write(str(tmp_path), "vocab.txt", data), lower_case=False)
  remote = tok_lib.load_tokenizer(_write(ram_dir, "vocab.txt", data), lower_case=False)
  assert isinstance(remote, tok_lib.WordPieceTokenizer)
  assert remote.pieces == local.pieces == tuple(pieces)
  assert remote.path == f"{ram_dir}/vocab.txt"
  texts = tf.constant(["the café!", "the cafe"])
  assert remote.tokenize(texts).to_list() == local.tokenize(texts).to_list() == [
      [5, 6, 7, 9], [5, 1]]
  # A folder is searched for vocab.txt.
  assert tok_lib.load_tokenizer(ram_dir, lower_case=False).pieces == remote.pieces
  with pytest.raises(FileNotFoundError, match=f"vocabulary {ram_dir}/nope.txt does not exist"):
    tok_lib.WordPieceTokenizer(ram_dir + "/nope.txt")
  with pytest.raises(FileNotFoundError, match=f"no vocab.txt or spiece.model in folder "
                                              f"{ram_dir}/empty"):
    tf.io.gfile.makedirs(ram_dir + "/empty")
    tok_lib.load_tokenizer(ram_dir + "/empty")


def test_real_bert_vocab_from_ram(minilm_dir, ram_dir):
  local = tok_lib.load_tokenizer(str(minilm_dir))
  tf.io.gfile.copy(str(minilm_dir / "vocab.txt"), ram_dir + "/vocab.txt")
  remote = tok_lib.load_tokenizer(ram_dir)
  assert remote.vocab_size == 30522 and remote.pieces == local.pieces
  assert remote.mask_id == local.mask_id == 103
  texts = tf.constant(["Héllo, 中文! unflinchingly", "The cat sat."])
  assert remote.tokenize(texts).to_list() == local.tokenize(texts).to_list()


def test_sentencepiece_trained_into_and_loaded_from_ram(tmp_path, ram_dir, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.makedirs(tmp_path / "tmp")
  lines = _english_lines(3000)
  _write(ram_dir, "corpus/a.txt", "\n".join(lines[:1500]).encode())
  _write(ram_dir, "corpus/b.txt.gz", gzip.compress("\n".join(lines[1500:]).encode()))
  # Input glob and model_prefix both remote; SentencePiece itself writes locally.
  tok = tok_lib.train_sentencepiece(ram_dir + "/corpus/*", ram_dir + "/model/sp", 300,
                                    num_threads=2)
  assert tok.path == f"{ram_dir}/model/sp.model"
  assert sorted(tf.io.gfile.listdir(ram_dir + "/model")) == ["sp.model", "sp.vocab"]
  assert os.listdir(tmp_path / "tmp") == []  # the local temporary folder is gone
  # The same pieces and scores as a model trained on local disk from the same
  # text (the .model bytes differ: they record the model_prefix).
  local_corpus = tmp_path / "corpus.txt"
  local_corpus.write_text("\n".join(lines), encoding="utf-8")
  local = tok_lib.train_sentencepiece(str(local_corpus), str(tmp_path / "sp"), 300,
                                      num_threads=2)
  with tf.io.gfile.GFile(ram_dir + "/model/sp.vocab", "rb") as f:
    assert f.read() == (tmp_path / "sp.vocab").read_bytes()
  tf.io.gfile.copy(tok.path, ram_dir + "/model/spiece.model")
  for path in (tok.path, ram_dir + "/model"):  # a .model file, or a folder with spiece.model
    again = tok_lib.load_tokenizer(path, extra_ids=100)
    assert isinstance(again, tok_lib.SentencePieceTokenizer)
    assert again.pieces == local.pieces and again.vocab_size == 400
  texts = tf.constant(["The import statement", "Strings are immutable."])
  assert tok.tokenize(texts).to_list() == local.tokenize(texts).to_list()
  with pytest.raises(ValueError, match=f"{ram_dir}/corpus/a.txt is not a SentencePiece model"):
    tok_lib.SentencePieceTokenizer(ram_dir + "/corpus/a.txt")


def test_train_for_source_into_ram_workdir_then_reuses_it(ram_dir, monkeypatch):
  _write(ram_dir, "data/wiki.txt", "\n\n".join(_english_lines(2000)).encode())
  config = defaults.data_config()
  with config.unlocked():
    config.source = ram_dir + "/data/*.txt"
    config.vocab_size = 250
  workdir = ram_dir + "/workdir"
  path = tok_lib.train_for_source(config, workdir)
  assert path == f"{workdir}/spm_mlm_250.model"
  assert files_lib.isfile(path) and files_lib.isfile(f"{workdir}/spm_mlm_250.vocab")
  tok = tok_lib.load_tokenizer(path, extra_ids=0)
  assert tok.vocab_size == 250 and tok.mask_id == 4  # BERT-style for objective 'mlm'
  with tf.io.gfile.GFile(path, "rb") as f:
    first = f.read()

  def no_training(*args, **kwargs):
    raise AssertionError("train_for_source retrained although the model exists")

  # A restarted run finds the model in its workdir and never trains again.
  monkeypatch.setattr(tok_lib, "train_sentencepiece", no_training)
  assert tok_lib.train_for_source(config, workdir) == path
  with tf.io.gfile.GFile(path, "rb") as f:
    assert f.read() == first
  # Without the model it would train (the patched trainer proves the check is live).
  tf.io.gfile.remove(path)
  with pytest.raises(AssertionError, match="retrained"):
    tok_lib.train_for_source(config, workdir)
