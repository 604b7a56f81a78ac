"""The loop mechanics train.py and finetune.py share (bert_jax/loop.py)."""
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import loop


class _Recorder:
  """Stands in for the metrics writer and the progress bar."""

  def __init__(self, log=None, name=""):
    self.lines, self.bar, self.closed = [], [], False
    self.log, self.name = log, name

  def write(self, step, line):
    self.lines.append((step, line))

  def update(self, step, loss):
    self.bar.append((step, loss))

  def close(self):
    self.closed = True
    if self.log is not None:
      self.log.append(self.name)


def _metrics(loss, count=2.0, lr=0.1):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0),
          "learning_rate": jnp.float32(lr), "mlm/loss_sum": jnp.float32(loss * count),
          "mlm/count": jnp.float32(count), "mlm/correct": jnp.float32(1.0)}


def test_sigterm_requests_preemption_and_chains_to_the_previous_handler():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
  try:
    preemption = loop.Preemption()
    assert not preemption.requested(7)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested(7)
    assert calls == [signal.SIGTERM]  # the earlier handler still heard it
    preemption.close()
    assert signal.getsignal(signal.SIGTERM) is not preemption._on_sigterm
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM] * 2
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_step_log_sums_the_interval_then_averages():
  out = _Recorder()
  log = loop.StepLog(out, out)
  log.add(1, _metrics(2.0, count=2.0, lr=0.1))
  log.add(2, _metrics(4.0, count=6.0, lr=0.2))
  line = log.summarize()
  assert line["loss"] == pytest.approx(3.0)  # mean of the steps' losses
  assert line["learning_rate"] == pytest.approx(0.2)  # the last step's
  # Sums over the interval, divided once: (4 + 24) / 8, not the mean of 2 and 4.
  assert line["train/mlm/loss"] == pytest.approx(28.0 / 8.0)
  assert line["train/mlm/accuracy"] == pytest.approx(2.0 / 8.0)
  log.write(2, line)
  assert out.lines == [(2, line)] and out.bar == [(2, line["loss"])]
  log.add(3, _metrics(1.0))
  assert log.summarize()["loss"] == pytest.approx(1.0)  # a new interval


def test_step_log_names_the_first_non_finite_step_and_the_last_checkpoint():
  out = _Recorder()
  log = loop.StepLog(out, out, last_saved=40)
  log.add(41, _metrics(1.0))
  log.add(42, dict(_metrics(1.0), grad_norm=jnp.float32(np.inf)))
  log.add(43, _metrics(np.nan))
  with pytest.raises(FloatingPointError, match=r"grad_norm \(inf\) at step 42.*step 40"):
    log.ready_to_save()
  with pytest.raises(FloatingPointError, match="at step 42"):
    log.summarize()
  assert out.lines == []


def test_closing_closes_everything_in_reverse_order_even_on_error():
  order = []
  parts = [_Recorder(order, name) for name in ("ckpt", "writer", "bar")]
  with pytest.raises(FloatingPointError):
    with loop.closing(*parts):
      raise FloatingPointError("non-finite loss")
  assert order == ["bar", "writer", "ckpt"]


def test_every():
  assert [s for s in range(1, 11) if loop.every(s, 4)] == [4, 8]
  assert not any(loop.every(s, 0) for s in range(1, 11))  # 0: never
