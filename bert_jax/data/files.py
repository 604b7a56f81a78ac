"""Files, local or remote: paths and URLs (gs://...) read through tf.io.gfile.

Everything that reads corpora, vocabularies or tokenizer models goes through
these, so a path may be local or any filesystem TensorFlow knows (gs:// on a
TPU VM; ram:// in the tests, which exercises the same gfile layer). Text read
from them goes through `fix_utf8` (sources and every tokenizer call it).
"""
import glob
import gzip
import io
import re
from typing import List, Optional

from bert_jax.host_tf import tf



def is_remote(path) -> bool:
  """True for a URL such as gs://bucket/x (any `scheme://`), False for a local path."""
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def glob_paths(pattern: str) -> List[str]:
  """The paths matching `pattern` (unsorted), local or remote.

  Local patterns keep Python's glob rules (hidden files need an explicit dot,
  `dir//x` works, paths come back as written); tf.io.gfile.glob differs on
  those, so only URLs go through it.
  """
  if is_remote(pattern):
    return tf.io.gfile.glob(pattern)
  return glob.glob(pattern)


def isfile(path: str) -> bool:
  """os.path.isfile for local paths and URLs alike."""
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


class _GFileReader(io.RawIOBase):
  """A tf.io.gfile.GFile (binary, read) as a raw stream io can buffer and decode."""

  def __init__(self, path: str):
    super().__init__()
    self._file = tf.io.gfile.GFile(path, "rb")

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._file.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._file.close()
    super().close()


class _OwningGzipFile(gzip.GzipFile):
  """A GzipFile that also closes the file it reads from (GzipFile leaves it open)."""

  def __init__(self, fileobj: io.BufferedIOBase):
    super().__init__(fileobj=fileobj, mode="rb")
    self._source = fileobj

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._source.close()


def open_binary(path: str) -> io.BufferedIOBase:
  """Opens a local or remote file for reading bytes; `.gz` files are decompressed."""
  raw = io.BufferedReader(_GFileReader(path))
  return _OwningGzipFile(raw) if path.endswith(".gz") else raw


def open_text(path: str, *, errors: str = "strict") -> io.TextIOWrapper:
  """Opens a local or remote (optionally `.gz`) UTF-8 text file, as open() would.

  Universal newlines as in open(..., "rt"): '\r\n' and '\r' read as '\n'.
  """
  return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors=errors)


def fix_utf8(texts: tf.Tensor, counter: Optional[tf.Variable] = None) -> tf.Tensor:
  """Replaces invalid UTF-8 with U+FFFD, optionally counting the bad bytes.

  Args:
    texts: tf.string tensor of any shape.
    counter: optional int64 tf.Variable; the number of invalid bytes (bytes that
      belong to no valid UTF-8 sequence) is added to it.

  Returns:
    tf.string tensor of the same shape, valid UTF-8.
  """
  texts = tf.convert_to_tensor(texts, tf.string)
  fixed = tf.strings.unicode_transcode(
      texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
  if counter is None:
    return fixed
  # Dropping the invalid sequences ('ignore') shortens a string by exactly its
  # number of invalid bytes. Valid text comes back from 'replace' byte for
  # byte, so that second pass (~10-20% of an MLM pipeline's CPU) runs only when
  # something was replaced.
  def count_bad():
    kept = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="ignore")
    return tf.reduce_sum(tf.cast(tf.strings.length(texts) - tf.strings.length(kept), tf.int64))
  bad = tf.cond(tf.reduce_all(tf.equal(fixed, texts)), lambda: tf.constant(0, tf.int64),
                count_bad)
  with tf.control_dependencies([counter.assign_add(bad)]):
    return tf.identity(fixed)
