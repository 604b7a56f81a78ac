"""Multi-task mixing: which task each step trains on, and each task's own batch order.

Pure functions of the run seed, so a multi-task run is as reproducible and
exactly resumable as pretraining (DESIGN.md, "Data"):

  * the task of step s (1-based) is a function of (seed, s) alone: a counter
    hash (splitmix64) of the pair gives a uniform number in [0, 1), which
    picks a task by the cumulative mixing rates (inverse CDF). No generator
    state is carried from step to step, so a run restarted at step s draws
    the same tasks from s + 1 on, and the schedule of any step range is
    computed at once (vectorised) to count each task's batches so far.
  * each task's k-th batch is the (k mod B)-th batch of its epoch k // B
    (B = its batches per epoch), and an epoch's batches are a function of
    (seed, the task's key, epoch): the shuffle, or the length-bucketed
    shuffle, of finetune.py. The key is a hash of the task's name, so adding
    a task to a mixture leaves the other tasks' orders unchanged.

Mixing rates (`rates`), with n_i the training examples of task i and K the
cap (0: none):
  proportional  r_i ∝ min(n_i, K)              T5's examples-proportional mixing
  temperature   r_i ∝ min(n_i, K) ** (1 / T)   T5's temperature-scaled mixing
                (T = 1: proportional; T -> inf: uniform)
  uniform       r_i = 1 / N                   equal mixing
The cap keeps a huge task from drowning the small ones (T5 section 3.5.2,
"examples-proportional mixing" with the artificial dataset size limit K).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from bert_jax.tasks import batching

RULES = ("proportional", "temperature", "uniform")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def rates(sizes: Sequence[int], rule: str, temperature: float = 1.0, cap: int = 0
          ) -> np.ndarray:
  """The probability of each task per step (float64 [num_tasks], sums to 1).

  Args:
    sizes: training examples of each task (> 0 each).
    rule: one of RULES.
    temperature: T of 'temperature' (> 0); unused by the other rules.
    cap: K, each size is counted as min(n_i, K) first; 0 = no cap. Unused by
      'uniform'.

  Raises:
    ValueError: an unknown rule, T <= 0, K < 0 or an empty task.
  """
  sizes = np.asarray(sizes, np.float64)
  if rule not in RULES:
    raise ValueError(f"unknown mixing rule {rule!r}; choose one of {list(RULES)}")
  if not len(sizes) or np.any(sizes <= 0):
    raise ValueError(f"every task needs training examples; sizes {sizes.astype(int).tolist()}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if cap < 0:
    raise ValueError(f"cap must be >= 0 (0: no cap), got {cap}")
  if rule == "uniform":
    return np.full(len(sizes), 1.0 / len(sizes))
  n = np.minimum(sizes, cap) if cap else sizes
  if rule == "temperature":
    n = n ** (1.0 / temperature)
  return n / np.sum(n)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, steps: np.ndarray) -> np.ndarray:
  """A uniform float64 in [0, 1) per step: a pure function of (seed, step)."""
  base = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))
  with np.errstate(over="ignore"):
    h = _splitmix64(base + np.asarray(steps, np.uint64))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits


def schedule(seed: int, start: int, stop: int, task_rates: Sequence[float]) -> np.ndarray:
  """The task index of each step in [start, stop) (int32 [stop - start])."""
  cdf = np.cumsum(np.asarray(task_rates, np.float64))
  u = uniforms(seed, np.arange(start, stop)) * cdf[-1]
  return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int32)


def task_of_step(seed: int, step: int, task_rates: Sequence[float]) -> int:
  """The task index step `step` trains on."""
  return int(schedule(seed, step, step + 1, task_rates)[0])


def task_steps(seed: int, num_steps: int, task_rates: Sequence[float]) -> np.ndarray:
  """Steps each task got among steps 1..num_steps (int64 [num_tasks])."""
  return np.bincount(schedule(seed, 1, num_steps + 1, task_rates), minlength=len(task_rates))


def task_key(name: str) -> int:
  """A stable 32-bit key of a task name (its batch orders depend on it, not on its place)."""
  return zlib.crc32(name.encode("utf-8"))


class TaskBatches:
  """The k-th training batch of one task, for any k: its example indices.

  Epoch e's batches are a function of (seed, task_key(name), e); batch k is
  batch k mod B of epoch k // B. Only the current epoch's list is kept.

  Args:
    name: the task's name (its key).
    lengths: tokens of each training example.
    batch_size: examples per batch.
    seed: the run seed.
    bucket: length-bucketed batches (data.padding 'bucket') rather than a
      plain shuffle.
  """

  def __init__(self, name: str, lengths: Sequence[int], batch_size: int, seed: int,
               bucket: bool):
    if not len(lengths):
      raise ValueError(f"task {name!r} has no training examples")
    self.name, self.lengths, self.batch_size = name, list(lengths), batch_size
    self.seed, self.bucket = seed, bucket
    self.per_epoch = -(-len(self.lengths) // batch_size)
    self._epoch, self._batches = -1, []

  def epoch_batches(self, epoch: int) -> list:
    """Every batch of `epoch`, in order (example index arrays)."""
    seed = int(np.random.SeedSequence([self.seed, task_key(self.name), epoch])
               .generate_state(1)[0])
    if self.bucket:
      return batching.bucket_batches(self.lengths, self.batch_size, seed=seed)
    order = np.random.default_rng(seed).permutation(len(self.lengths))
    return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

  def __getitem__(self, k: int) -> np.ndarray:
    epoch = k // self.per_epoch
    if epoch != self._epoch:
      self._epoch, self._batches = epoch, self.epoch_batches(epoch)
    return self._batches[k % self.per_epoch]

  def examples_in(self, k: int) -> int:
    """Examples in the first k batches (exact: a bucketed epoch's short batch may come
    anywhere in it)."""
    full, rest = divmod(k, self.per_epoch)
    partial = sum(len(b) for b in self.epoch_batches(full)[:rest]) if rest else 0
    return full * len(self.lengths) + partial
