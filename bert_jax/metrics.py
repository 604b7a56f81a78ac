"""Training metrics: JSONL + TensorBoard writers and a progress bar.

`MetricWriter` appends one JSON object per logged step to `WORKDIR/metrics.jsonl`
(read while the run goes on: every line is flushed) and writes the same
scalars as TensorBoard events under `WORKDIR/tensorboard/`. Paths may be
gs://: all file I/O goes through `tf.io.gfile`. Only process 0 should write;
the other processes pass `enabled=False`, which makes every method a no-op.

Throughput and MFU are `bert_jax/throughput.py`, which needs no TensorFlow.

`ProgressBar` is the console view: `step 120/1000 [12%] 3.4 step/s ETA 4m19s
loss 5.123`, redrawn in place on a terminal, one line at a time in logs.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Mapping, TextIO

import numpy as np
from bert_jax.host_tf import tf
from tensorflow.core.framework import summary_pb2

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# ---------------------------------------------------------------------------
# Writers.
# ---------------------------------------------------------------------------
def _scalar(key: str, value: Any) -> tuple[float | int | None, float | None]:
  """(JSON value, TensorBoard value) of one metric.

  JSON gets an int for integer/bool values, else a float, None when
  non-finite; TensorBoard gets a float (NaN/inf kept), None only for None.
  """
  if value is None:
    return None, None
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {key!r} is not a scalar: shape {array.shape}")
  # bfloat16 (ml_dtypes) has kind 'V': convert every non-text kind to a number.
  if array.dtype.kind in "SUOM":
    raise ValueError(f"metric {key!r} is not a number: {value!r} (dtype {array.dtype})")
  if array.dtype.kind in "biu":
    number = int(array.reshape(()))
    return number, float(number)
  number = float(array.reshape(()).astype(np.float64))
  return (number if math.isfinite(number) else None), number


def _scalar_metadata() -> summary_pb2.SummaryMetadata:
  # What TensorBoard's own tf.summary.scalar attaches: the 'scalars' plugin
  # reads float32 rank-0 tensors so tagged. TF 2.21 no longer installs the
  # tensorboard package, so we write the same record through tf.summary.write.
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = "scalars"
  return metadata


def _parse_log(path: str, text: str) -> list[tuple[str, int]]:
  """(line, step) for each record of an existing metrics.jsonl.

  A last line without its newline that does not parse is a write torn by a
  killed run: dropped with a warning. Any other bad line is an error naming
  the file and line, so a log that someone edited is never silently cut.
  """
  lines = text.split("\n")
  torn_tail = not text.endswith("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not a JSON object")
      step = record.get("step")
      if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"'step' is {step!r}, not an integer")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      if torn_tail and number == len(lines):
        logging.warning("%s:%d: dropping a partly written last line (%s)", path, number, e)
        continue
      raise ValueError(f"{path}:{number}: corrupt metrics line ({e}): {line[:200]!r}") from e
    records.append((line, step))
  return records


class MetricWriter:
  """Writes scalars per step to `workdir/metrics.jsonl` and TensorBoard.

  On opening, an existing metrics.jsonl is checked line by line (a corrupt
  line is an error naming file and line; the file is left untouched):
    * `resume_step=N` (a run restored from its checkpoint at step N): keeps
      only the records with step <= N. A killed run may have logged steps
      after its last checkpoint; the resumed run logs them again, and the
      log must hold each step once. The kept lines are written to a
      temporary file which then replaces the log, so a failure part-way
      leaves the old file whole. Pass N = -1 to drop everything (a fresh
      run that must not continue an old log).
    * `resume_step=None` (a fresh run, no checkpoint): keeps every record
      and appends after them; nothing is truncated.
  Either way a torn last line (a killed run's partial write) is dropped, so
  the next record starts on a line of its own.

  TensorBoard event files are not trimmed: a resumed run writes a new event
  file after the old ones, so re-logged steps appear twice unless the
  TensorBoard loader purges the killed run's later points when it sees the
  step go back (the legacy loader does). metrics.jsonl is the exact record.

  Every `write` flushes both outputs: scripts and tests tail the log while
  the run goes on. On gs:// each flush re-uploads the JSONL object (objects
  are immutable), cheap at a logging interval of tens of steps or more.

  Attributes:
    path: the metrics.jsonl path (also set when disabled).
    enabled: False on every process but 0: nothing is read or written.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True):
    """Opens (and, for a resumed run, trims) the log; see the class docstring."""
    self.path = workdir.rstrip("/") + "/" + JSONL_NAME
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    tf.io.gfile.makedirs(workdir)
    self._trim(resume_step)
    self._file = tf.io.gfile.GFile(self.path, "a")
    self._tb = tf.summary.create_file_writer(workdir.rstrip("/") + "/" + TENSORBOARD_DIR)
    self._tb_metadata = _scalar_metadata()

  def _trim(self, resume_step: int | None) -> None:
    """Rewrites the existing log without the records after `resume_step`."""
    if not tf.io.gfile.exists(self.path):
      return
    with tf.io.gfile.GFile(self.path, "r") as f:
      text = f.read()
    records = _parse_log(self.path, text)
    kept = [line for line, step in records if resume_step is None or step <= resume_step]
    new_text = "".join(line + "\n" for line in kept)
    if new_text == text:
      return
    logging.info("%s: keeping %d of %d records (resume_step=%s)", self.path, len(kept),
                 len(records), resume_step)
    tmp = self.path + ".tmp"
    try:
      with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(new_text)
      tf.io.gfile.rename(tmp, self.path, overwrite=True)
    except Exception:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
      raise

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` at `step`: one JSONL line and one TensorBoard scalar each.

    Args:
      step: the training step (an int; it is the first key of the line).
      scalars: name -> Python/NumPy/JAX scalar or None. Integers stay
        integers; floats become Python floats; NaN and inf become null
        (JSON has no NaN) but reach TensorBoard as they are, where they
        show a divergence; None is null in JSON and skipped in TensorBoard.

    Raises:
      ValueError: a key is 'step', a value is not a scalar number, or the
        writer was closed.
    """
    if not self.enabled:
      return
    if self._file is None:
      raise ValueError(f"MetricWriter for {self.path} is closed")
    if "step" in scalars:
      raise ValueError("metric name 'step' is reserved for the step number")
    step = int(step)
    record = {"step": step}
    tensorboard = {}
    for key, value in scalars.items():
      record[key], tensorboard[key] = _scalar(key, value)
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    with self._tb.as_default(step=step):
      for key, value in tensorboard.items():
        if value is None:
          continue
        tf.summary.write(key, tf.constant(value, tf.float32), metadata=self._tb_metadata)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; later calls do nothing."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Console progress.
# ---------------------------------------------------------------------------
_TTY_INTERVAL_S = 0.1  # redrawing faster than this only costs write calls


def format_duration(seconds: float) -> str:
  """'42s', '4m19s', '3h07m', '2d05h'."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes, 60)
  if hours < 24:
    return f"{hours}h{minutes:02d}m"
  days, hours = divmod(hours, 24)
  return f"{days}d{hours:02d}h"


def _format_value(value: Any) -> str:
  if value is None:
    return "-"
  array = np.asarray(value)
  if array.dtype.kind in "biu":
    return str(int(array))
  return f"{float(array.astype(np.float64)):.4g}"


def _isatty(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class ProgressBar:
  """One-line progress: `step 120/1000 [12%] 3.4 step/s ETA 4m19s loss 5.123`.

  The rate is the mean since the first `update` (which follows the compiling
  first step, so compilation does not skew it; evaluation pauses do, which
  keeps the ETA honest). On a terminal the line is redrawn in place with
  '\\r'; elsewhere (CI logs, files) a full line is written at most every
  `min_interval_s` seconds, and always for the first update and the last
  step.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, *, stream: TextIO | None = None,
               enabled: bool = True, min_interval_s: float = 1.0):
    """Creates the bar; nothing is written before the first `update`.

    Args:
      total_steps: the step at which the run ends (100%).
      initial_step: the step the run starts from (a restored checkpoint's);
        must not exceed total_steps.
      stream: where to write; default sys.stderr.
      enabled: False on every process but 0: nothing is written.
      min_interval_s: least time between two lines when not on a terminal.
    """
    if total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= initial_step <= total_steps:
      raise ValueError(f"initial_step {initial_step} is outside [0, total_steps={total_steps}]")
    self.total_steps = total_steps
    self.initial_step = initial_step
    self.enabled = enabled
    self._stream = sys.stderr if stream is None else stream
    self._tty = enabled and _isatty(self._stream)
    self._interval = _TTY_INTERVAL_S if self._tty else min_interval_s
    self._origin = None  # (step, time) of the first update
    self._last_write = None
    self._line = None  # latest line, written or not
    self._written = True
    self._width = 0

  def _text(self, step: int, now: float, postfix: Mapping[str, Any]) -> str:
    total = self.total_steps
    rate = eta = "?"
    first_step, first_time = self._origin
    if step > first_step and now > first_time:
      steps_per_sec = (step - first_step) / (now - first_time)
      rate = f"{steps_per_sec:.3g}" if steps_per_sec < 1000 else f"{steps_per_sec:.0f}"
      eta = format_duration(max(total - step, 0) / steps_per_sec)
    parts = [f"step {step}/{total} [{100 * step // total}%] {rate} step/s ETA {eta}"]
    parts += [f"{key} {_format_value(value)}" for key, value in postfix.items()]
    return " ".join(parts)

  def _emit(self, now: float) -> None:
    if self._tty:
      self._stream.write("\r" + self._line.ljust(self._width))
      self._width = len(self._line)
    else:
      self._stream.write(self._line + "\n")
    self._stream.flush()
    self._last_write, self._written = now, True

  def update(self, step: int, **postfix: Any) -> None:
    """Shows progress at `step` with `postfix` scalars (e.g. loss=...) after it."""
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._origin is None:
      self._origin = (step, now)
    self._line, self._written = self._text(step, now, postfix), False
    due = self._last_write is None or now - self._last_write >= self._interval
    if due or step >= self.total_steps:
      self._emit(now)

  def close(self) -> None:
    """Writes the latest state if it was held back; ends the terminal line."""
    if not self.enabled or self._line is None:
      return
    if not self._written:
      self._emit(time.perf_counter())
    if self._tty:
      self._stream.write("\n")
      self._stream.flush()
    self._line = None
