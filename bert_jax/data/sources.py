"""Text sources: text files, offline tfds datasets, and a built-in English corpus.

A source is named by a spec string:
  * a path or glob of text files, plain or gzip (`.gz`): one paragraph per
    line, a blank line between documents (the layout of BERT's
    create_pretraining_data input and of WikiExtractor dumps). Local, or
    remote such as gs://bucket/wiki/*.txt.gz (read through tf.io.gfile);
  * `tfds:NAME[/CONFIG][:VERSION]:TEXT_KEY`, e.g. `tfds:c4/en:text`: a
    TensorFlow Datasets dataset already prepared under `data_dir` (default
    $TFDS_DATA_DIR or ~/tensorflow_datasets; gs:// works too). It is read from
    its folder with `tfds.builder_from_directory`, so nothing is ever
    downloaded and an unprepared name fails at once. One example is one document; its text is
    split into paragraphs at newlines. A prepared split is stored as N shard
    files (`TextSource.tfds_files`); they are read one after another in
    tfds's file order, each in its stored order;
  * `builtin:NAME`: real English prose that comes with Python itself, so the
    quick start needs no download and the project ships no third-party text
    (see BUILTIN_CORPORA).

Every source becomes the same thing: a tf.data.Dataset whose elements are
documents, each a 1-D tf.string tensor [num_paragraphs] of stripped, non-blank
paragraphs (at least one), in a fixed order (files sorted by name, then line
order; tfds in its stored order). NSP/SOP pairing takes segments from these
paragraphs; splitting over-long paragraphs is the pipeline's job.

Reading a share by whole files: `documents(file_shard=(index, count))` of a
file or tfds source with at least `count` files reads only its files j with
j % count == index, whole and in order (their documents are exactly those
files' documents in the full order); `index` may be a scalar tensor, so one
traced pipeline serves every share. For tfds this is tfds's own per-file
sharding, `tfds.ReadConfig(input_context=tf.distribute.InputContext(count,
index))`, which opens no other shard file. The pipeline assigns data shards
this way (bert_jax.data.pipeline). A single text file or a builtin corpus has
no files to divide: it is read whole.

Invalid UTF-8 bytes are replaced by U+FFFD (see files.fix_utf8) and counted
in `TextSource.invalid_utf8_bytes` as the dataset is read; they never raise.
"""
import dataclasses
import glob
import numbers
import os
import re
from typing import Callable, Iterator, List, Optional, Sequence

from bert_jax import host_tf
from bert_jax.host_tf import tf

from bert_jax.data import files as files_lib

# Lines are grouped into documents this many at a time (one vectorised step
# instead of one tf.data step per line).
_LINES_PER_CHUNK = 1024


@dataclasses.dataclass
class TextSource:
  """An opened, validated source; `documents()` builds its tf.data pipeline.

  Attributes:
    spec: the spec string it was opened from.
    description: what it reads, for logs.
    invalid_utf8_bytes: int64 tf.Variable, invalid bytes replaced so far
      (grows as the dataset is iterated; every pass counts again).
    files: the sorted paths of a file source (None for tfds / builtin).
    tfds_files: the stored shard files of a tfds split, in tfds's order (None
      for file / builtin sources); `documents(file_shard=...)` divides them.
  """
  spec: str
  description: str
  _make: Callable[..., tf.data.Dataset] = dataclasses.field(repr=False)
  invalid_utf8_bytes: Optional[tf.Variable] = dataclasses.field(repr=False, default=None)
  files: Optional[List[str]] = None
  tfds_files: Optional[List[str]] = None

  @property
  def num_files(self) -> int:
    """Files `file_shard` can divide: text files or tfds shard files (0 for builtin)."""
    return len(self.files if self.files is not None else self.tfds_files or [])

  def documents(self, files=None, file_shard=None) -> tf.data.Dataset:
    """Dataset of documents: each a tf.string [num_paragraphs], fixed order.

    Args:
      files: file sources only: read just these paths (a list or a 1-D
        tf.string tensor, e.g. a subset of `files`), in the given order.
      file_shard: (index, count), file and tfds sources with >= count files:
        read only files j with j % count == index (of `files` / `tfds_files`),
        whole and in order, opening no other file. `index` may be a scalar
        int tensor; a Python int must be in [0, count).

    Raises:
      ValueError: `files` on a non-file source, `file_shard` on a builtin
        source or with count above the number of files, or both given.
    """
    if files is not None and self.files is None:
      raise ValueError(f"source {self.spec!r} is not a file source; it has no files to pick")
    if file_shard is not None:
      self._check_file_shard(files, *file_shard)
      file_shard = (file_shard[0], int(file_shard[1]))
    ds = self._make(self.invalid_utf8_bytes, files, file_shard)
    # Rows of a ragged batch come out with a (rank-0) RaggedTensorSpec; passing
    # them through a map makes every source's element spec a plain TensorSpec.
    return ds.map(lambda doc: tf.ensure_shape(doc, [None]))

  def _check_file_shard(self, files, index, count):
    if files is not None:
      raise ValueError(f"source {self.spec!r}: give `files` or `file_shard`, not both")
    if self.files is None and self.tfds_files is None:
      raise ValueError(f"source {self.spec!r} has no files to shard by (builtin corpus); "
                       "read it whole and shard its documents")
    if not isinstance(count, numbers.Integral) or not 1 <= count <= self.num_files:
      raise ValueError(f"source {self.spec!r} has {self.num_files} file(s): file_shard "
                       f"count={count} must be in [1, {self.num_files}] (else a share "
                       "would have no file)")
    if isinstance(index, numbers.Integral) and not 0 <= index < count:
      raise ValueError(f"file_shard index={index} must be in [0, count={count})")

  def iter_documents(self) -> Iterator[List[str]]:
    """The same documents in Python, as lists of paragraph strings."""
    for doc in self.documents().as_numpy_iterator():
      yield [p.decode("utf-8") for p in doc]


def list_files(spec: str) -> Optional[List[str]]:
  """The sorted paths a file spec names (None for `tfds:` / `builtin:` specs)."""
  if spec.startswith(("tfds:", "builtin:")):
    return None
  return _expand_files(spec)


def open_source(spec: str, *, data_dir: Optional[str] = None, split: str = "train",
                files: Optional[Sequence[str]] = None) -> TextSource:
  """Validates `spec` now (missing/empty files, unprepared tfds) and opens it.

  Args:
    spec: a file path or glob, `tfds:...` or `builtin:...` (module docstring).
    data_dir: tfds data folder (tfds specs only).
    split: tfds split, e.g. 'train' or 'validation' (tfds specs only).
    files: file specs only: open (and check) just these paths, e.g. the
      share of list_files(spec) one host reads; None = all of them.

  Returns:
    A TextSource.

  Raises:
    FileNotFoundError / ValueError naming the path, dataset, split or key.
  """
  paths = tfds_files = None
  if files is not None and spec.startswith(("tfds:", "builtin:")):
    raise ValueError(f"source {spec!r} is not a file source; `files` cannot pick from it")
  if spec.startswith("tfds:"):
    description, make, tfds_files = _open_tfds(spec, data_dir, split)
  elif spec.startswith("builtin:"):
    description, make = _open_builtin(spec)
  else:
    paths = _expand_files(spec) if files is None else list(files)
    if not paths:
      raise ValueError(f"text source {spec}: `files` is empty")
    description, make = _open_files(spec, paths)
  counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="invalid_utf8_bytes")
  return TextSource(spec, description, make, counter, paths, tfds_files)


def iter_paragraphs(spec: str, **kwargs) -> Iterator[str]:
  """Every paragraph of a source in order (e.g. to train a tokenizer on it)."""
  for doc in open_source(spec, **kwargs).iter_documents():
    yield from doc


def shard(ds: tf.data.Dataset, process_index: int, process_count: int) -> tf.data.Dataset:
  """Host `process_index`'s share: elements i with i % process_count == index.

  The shares of all hosts are disjoint and together are the whole dataset.
  Shard before shuffling or repeating so every host agrees on the order.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count "
                     f"{process_count})")
  return ds.shard(process_count, process_index)


# ----------------------------------------------------------------------------
# Local text files
# ----------------------------------------------------------------------------

def _expand_files(spec: str) -> List[str]:
  if glob.has_magic(spec):
    paths = sorted(p for p in files_lib.glob_paths(spec) if files_lib.isfile(p))
    if not paths:
      raise FileNotFoundError(f"text source glob {spec} matches no file")
    return paths
  if tf.io.gfile.isdir(spec):
    raise ValueError(f"text source {spec} is a folder; name its files with a glob, "
                     f"e.g. {os.path.join(spec, '*.txt')}")
  if not files_lib.isfile(spec):
    raise FileNotFoundError(f"text source file {spec} does not exist")
  return [spec]


def _check_not_empty(path: str) -> None:
  """Raises unless the file holds a non-blank line (reads up to the first one)."""
  try:
    with files_lib.open_binary(path) as f:
      for line in f:
        if line.strip():
          return
  # A corrupt or truncated .gz (OSError, EOFError), or a file tf.io.gfile
  # cannot read (OpError, e.g. permission denied on a bucket).
  except (OSError, EOFError, tf.errors.OpError) as e:
    raise ValueError(f"cannot read text file {path}: {e}") from e
  raise ValueError(f"text file {path} is empty (no non-blank line)")


def _group_lines(carry: tf.Tensor, lines: tf.Tensor):
  """scan step: appends a chunk of lines to the open document, emits finished ones.

  Args:
    carry: [m] paragraphs of the document still open from earlier chunks.
    lines: [n] next lines; a blank line ends a document.

  Returns:
    (new carry [k], finished documents RaggedTensor [docs, (paragraphs)]).
  """
  lines = tf.concat([carry, lines], axis=0)  # [m + n]
  blank = tf.equal(lines, "")
  index = tf.range(tf.size(lines))
  last_blank = tf.reduce_max(tf.where(blank, index, -1))
  done, blank_done = lines[:last_blank + 1], blank[:last_blank + 1]
  doc_of_line = tf.cumsum(tf.cast(blank_done, tf.int64), exclusive=True)
  docs = tf.RaggedTensor.from_value_rowids(
      tf.boolean_mask(done, ~blank_done), tf.boolean_mask(doc_of_line, ~blank_done),
      nrows=tf.reduce_sum(tf.cast(blank_done, tf.int64)))
  # Consecutive blank lines make empty documents: drop them.
  docs = tf.ragged.boolean_mask(docs, docs.row_lengths() > 0)
  return lines[last_blank + 1:], docs


def _open_files(spec: str, paths: List[str]):
  for path in paths:
    _check_not_empty(path)

  def file_documents(path, counter):
    compression = tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")
    lines = tf.data.TextLineDataset(path, compression_type=compression)
    # A blank line at the end closes the file's last document.
    lines = lines.concatenate(tf.data.Dataset.from_tensors(tf.constant("")))
    lines = lines.batch(_LINES_PER_CHUNK).map(
        lambda chunk: tf.strings.strip(files_lib.fix_utf8(chunk, counter)))
    docs = lines.scan(tf.zeros([0], tf.string), _group_lines)
    return docs.unbatch()

  def make(counter, subset=None, file_shard=None):
    files = tf.data.Dataset.from_tensor_slices(paths if subset is None else subset)
    if file_shard is not None:
      files = files.shard(file_shard[1], file_shard[0])
    return files.flat_map(lambda path: file_documents(path, counter))

  return f"{len(paths)} text file(s) matching {spec}", make


# ----------------------------------------------------------------------------
# TensorFlow Datasets (offline only)
# ----------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def tfds_folder(name: str, data_dir: str) -> str:
  """data_dir/NAME[/CONFIG]/VERSION of a prepared dataset (newest version if none given)."""
  name, _, version = name.partition(":")
  base = os.path.join(data_dir, *name.split("/"))

  def prepared(v):
    return files_lib.isfile(os.path.join(base, v, "dataset_info.json"))

  if version:
    candidates = [version] if prepared(version) else []
  else:
    # On GCS, listdir names sub-folders with a trailing '/'.
    listed = tf.io.gfile.listdir(base) if tf.io.gfile.isdir(base) else []
    candidates = sorted((v for v in (e.rstrip("/") for e in listed)
                         if _VERSION_RE.match(v) and prepared(v)),
                        key=lambda v: tuple(map(int, v.split("."))))
  if candidates:
    return os.path.join(base, candidates[-1])
  tfds = host_tf.datasets()
  known = name.split("/")[0] in tfds.list_builders(with_community_datasets=False)
  raise FileNotFoundError(
      f"tfds dataset {name}{':' + version if version else ''} is not prepared in data_dir "
      f"{data_dir} (no {os.path.join(base, version or '<version>', 'dataset_info.json')}); "
      + ("it is a tfds dataset name, but bert_jax never downloads: prepare it first, e.g. "
         f"`tfds build {_tfds_build_args(name)} --data_dir={data_dir}`" if known else
         f"and {name.split('/')[0]!r} is not a known tfds dataset name"))


def _tfds_build_args(name: str) -> str:
  dataset, _, config = name.partition("/")
  return f"{dataset} --config={config}" if config else dataset


def _open_tfds(spec: str, data_dir: Optional[str], split: str):
  body = spec[len("tfds:"):]
  name, sep, key = body.rpartition(":")
  if not sep or not name or not key or _VERSION_RE.match(key):
    raise ValueError(f"tfds source {spec!r} must be tfds:NAME[/CONFIG][:VERSION]:TEXT_KEY, "
                     "e.g. tfds:c4/en:text")
  data_dir = os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  folder = tfds_folder(name, data_dir)
  tfds = host_tf.datasets()
  builder = tfds.builder_from_directory(folder)
  if split not in builder.info.splits:
    raise ValueError(f"tfds dataset {name} in {folder} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  if key not in builder.info.features:
    raise ValueError(f"tfds dataset {name} has no feature {key!r}; it has "
                     f"{sorted(builder.info.features)}")
  if builder.info.splits[split].num_examples == 0:
    raise ValueError(f"tfds dataset {name} split {split} in {folder} is empty")
  # What ReadConfig.input_context divides: the split's file instructions
  # (one per stored shard file), sharded in this order.
  tfds_files = [os.fspath(f.filename) for f in builder.info.splits[split].file_instructions]

  # AutoGraph would try (and fail, with a warning) to convert tfds's wrapt-
  # decorated as_dataset when this runs inside a traced tf.data function.
  @tf.autograph.experimental.do_not_convert
  def make(counter, subset=None, file_shard=None):
    del subset  # not a file source (TextSource.documents checks)
    context = None
    if file_shard is not None:
      # tfds shards the split's file list (file j -> pipeline j % count)
      # before opening any file; the index goes into Dataset.shard, so it
      # may be a tensor.
      context = tf.distribute.InputContext(num_input_pipelines=file_shard[1],
                                           input_pipeline_id=file_shard[0])
    # Files one after another (cycle length 1), each in stored order: the
    # documents of a file share are a subsequence of the whole split's. No
    # autocache: the pipeline re-reads the split every epoch, and an
    # in-memory cache per iterator would only hold memory.
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False,
                                  input_context=context)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)

    def paragraphs(example):
      text = files_lib.fix_utf8(example[key], counter)
      paras = tf.strings.strip(tf.strings.split(text, "\n"))
      return tf.boolean_mask(paras, tf.not_equal(paras, ""))  # [num_paragraphs]

    return ds.map(paragraphs).filter(lambda doc: tf.size(doc) > 0)

  description = f"tfds {name} split {split} ({len(tfds_files)} file(s)) from {folder}"
  return description, make, tfds_files


# ----------------------------------------------------------------------------
# Built-in corpora (text that ships with Python)
# ----------------------------------------------------------------------------

def _prose_paragraphs(text: str) -> List[str]:
  """Blank-line separated blocks, each joined into one line; rules dropped."""
  out = []
  for block in re.split(r"\n\s*\n", text):
    lines = [l.strip() for l in block.splitlines()
             if l.strip() and not re.fullmatch(r"[\W_]+", l.strip())]
    if lines:
      out.append(" ".join(lines))
  return out


def _pydoc_topics() -> List[List[str]]:
  from pydoc_data import topics  # the text of help('topic'), shipped with CPython
  docs = (_prose_paragraphs(topics.topics[k]) for k in sorted(topics.topics))
  return [d for d in docs if d]


def _stdlib_docstrings(min_words: int = 8) -> List[List[str]]:
  import ast
  import sysconfig
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, root).split(os.sep)
    if rel[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in rel:
      continue
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        text = ast.get_docstring(node)
        if text and len(text.split()) >= min_words:
          docs.append(_prose_paragraphs(text))
  return [d for d in docs if d]


# name -> (loader, description). Word counts are for CPython 3.11.
BUILTIN_CORPORA = {
    "pydoc_topics": (_pydoc_topics,
                     "CPython's pydoc_data topics: the Python Language Reference sections "
                     "shown by help(), 79 documents, about 65k words (PSF licence, part of "
                     "every Python install)"),
    "stdlib_docstrings": (_stdlib_docstrings,
                          "docstrings (>= 8 words) of the Python standard library sources, "
                          "one document each, about 6k documents and 250k words; takes "
                          "~10 s to parse"),
}


def _open_builtin(spec: str):
  name = spec[len("builtin:"):]
  if name not in BUILTIN_CORPORA:
    raise ValueError(f"unknown builtin corpus {name!r} in {spec!r}; choose one of "
                     f"{sorted(BUILTIN_CORPORA)}")
  loader, description = BUILTIN_CORPORA[name]
  docs = loader()
  if not docs:
    raise ValueError(f"builtin corpus {name} is empty in this Python installation")
  ragged = tf.ragged.constant(docs, dtype=tf.string)  # [docs, (paragraphs)]

  def make(counter, subset=None, file_shard=None):
    # The text is valid UTF-8 by construction; the counter stays untouched.
    del counter, subset, file_shard  # not a file source (TextSource.documents checks)
    return tf.data.Dataset.from_tensor_slices(ragged)

  return description, make
