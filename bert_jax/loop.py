"""The loop mechanics pretraining (train.py) and fine-tuning (finetune.py) share.

Both trainers are one linear function; what they have in common lives here,
so it is written and tested once:

  Preempted    the exception a saved-and-stopped run ends with (exit 143).
  Preemption   the run's one SIGTERM handler (one process) or jax.distributed's
               preemption sync point (several): `requested(step)` at every step.
  StepLog      the metrics of the steps since the last log line: fetched at
               the log interval, checked finite (a non-finite loss stops the
               run naming the step, before anything is saved from it),
               summarised and written to metrics.jsonl, TensorBoard and the
               progress bar.
  closing      closes everything a run opened (checkpointers, writers, the
               SIGTERM handler) in reverse order, also when the run fails, so
               pending asynchronous saves finish and the last good checkpoint
               is never lost.
  every        the cadence test of logging, evaluation and checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from bert_jax import losses

# Step metrics that are values of one step, not sums over the interval.
_PER_STEP = ("loss", "grad_norm", "learning_rate")


class Preempted(Exception):
  """A preemption notice arrived; the state of `step` is saved. Rerun to resume.

  An exception, not a normal return, so that a supervisor (tpu_scripts'
  recover loop, a batch scheduler) never mistakes a stopped run for a
  finished one: the CLI exits with 143, the status of a process ended by
  SIGTERM.
  """

  def __init__(self, step: int):
    super().__init__(f"preempted: saved step {step}; run the same command to resume")
    self.step = step


class Preemption:
  """Whether the run was asked to save and stop; one per run.

  One process: a SIGTERM handler sets a flag (chaining to the previous
  handler). Several processes: a per-host flag would make one host save alone
  while the others wait in a collective, so jax.distributed's preemption sync
  point answers instead, True on the same step on every host.
  """

  def __init__(self):
    self._event = threading.Event()
    self._multi_process = jax.process_count() > 1
    self._previous = None
    self._installed = False
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True

  def _on_sigterm(self, signum, frame) -> None:
    logging.warning("SIGTERM received: the run will checkpoint and stop")
    self._event.set()
    if callable(self._previous):  # chain, unless it was SIG_DFL/SIG_IGN
      self._previous(signum, frame)

  def requested(self, step: int) -> bool:
    """Whether to save at `step` and stop. Call it once per step on every process."""
    if self._multi_process:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service (jax_enable_preemption_service off)
        return False
    return self._event.is_set()

  def close(self) -> None:
    """Puts the previous SIGTERM handler back."""
    if self._installed:
      # None: the previous handler was not installed from Python.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def every(step: int, interval: int) -> bool:
  """Whether `step` is on the grid of `interval` (0 or less: never)."""
  return interval > 0 and step % interval == 0


@contextlib.contextmanager
def closing(*closables: Any) -> Iterator[None]:
  """Closes `closables` in reverse order when the block ends, however it ends."""
  with contextlib.ExitStack() as stack:
    for c in closables:
      stack.callback(c.close)
    yield


class StepLog:
  """The metrics of the steps since the last log line.

  Attributes:
    last_saved: the newest checkpointed step (None: none yet), named in the
      error a non-finite loss raises.
  """

  def __init__(self, writer, bar, last_saved: int | None = None):
    self._writer = writer
    self._bar = bar
    self._interval: list[tuple[int, dict]] = []
    self.last_saved = last_saved

  def add(self, step: int, metrics: dict) -> None:
    """Keeps a step's metrics (device arrays: nothing waits for them here)."""
    self._interval.append((step, metrics))

  def check_finite(self) -> list[dict]:
    """Host copies of the pending steps' metrics; raises at the first non-finite step.

    Raises:
      FloatingPointError: naming the step, the value and the last checkpoint.
    """
    fetched = jax.device_get([m for _, m in self._interval])
    for (step, _), m in zip(self._interval, fetched):
      for key in ("loss", "grad_norm"):
        if not np.isfinite(m[key]):
          raise FloatingPointError(
              f"non-finite {key} ({m[key]}) at step {step}; stopping without saving. The last "
              f"checkpoint is step {self.last_saved} (lower optim.learning_rate or raise "
              "optim.warmup_steps, then resume from it)")
    return fetched

  def summarize(self) -> dict[str, float]:
    """The pending steps as one log line (checked finite first), and a new interval.

    Mean loss over the interval, the last step's learning rate and gradient
    norm, and every objective's metrics summed over the interval, then
    averaged ('train/<prefix>/<name>').
    """
    fetched = self.check_finite()
    self._interval = []
    sums = {k: np.sum([m[k] for m in fetched]) for k in fetched[0] if k not in _PER_STEP}
    out = {"loss": float(np.mean([m["loss"] for m in fetched])),
           "learning_rate": float(fetched[-1]["learning_rate"]),
           "grad_norm": float(fetched[-1]["grad_norm"])}
    out.update({f"train/{k}": v for k, v in losses.summarize(sums).items()})
    return out

  def write(self, step: int, line: dict[str, Any]) -> None:
    """One metrics.jsonl / TensorBoard line, and the progress bar (with its loss, if any)."""
    self._writer.write(step, line)
    if "loss" in line:
      self._bar.update(step, loss=line["loss"])

  def ready_to_save(self) -> None:
    """Checks the steps not yet logged: a checkpoint never holds a non-finite step."""
    if self._interval:
      self.check_finite()
