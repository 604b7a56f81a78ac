"""GLUE metrics in numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

These are the scoring functions alone, apart from bert_jax.tasks.glue (readers,
features, the task table, submission files): they know nothing of tasks or
files and take class ids [n] or logits [n, num_labels] (scores [n] or [n, 1]
for regression) with labels [n]. The task-aware entry points that pick the
metrics GLUE reports for a task, glue.compute_metrics and glue.split_metrics,
stay in glue next to the task table; they look the functions up in METRICS.

F1 is that of the positive class (MRPC, QQP); Matthews correlation is the
multi-class form (CoLA, AX); Spearman uses average ranks for ties, as scipy's
default does (STS-B).
"""
import math
from typing import Callable, Dict

import numpy as np


def class_ids(predictions) -> np.ndarray:
  """Class ids from ids [n] or logits [n, num_labels]."""
  p = np.asarray(predictions)
  return p.argmax(-1) if p.ndim == 2 else p


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"predictions {a.shape} and labels {b.shape} must be equal 1-D shapes")
  if not len(a):
    raise ValueError("metrics of zero examples")


def accuracy(predictions, labels) -> float:
  """Fraction of predictions equal to the labels."""
  p, y = class_ids(predictions), np.asarray(labels)
  _check_same_length(p, y)
  return float(np.mean(p == y))


def f1_score(predictions, labels, positive: int = 1) -> float:
  """F1 of the positive class (GLUE's F1 for MRPC and QQP); 0.0 without true positives."""
  p, y = class_ids(predictions), np.asarray(labels)
  _check_same_length(p, y)
  tp = np.sum((p == positive) & (y == positive))
  fp = np.sum((p == positive) & (y != positive))
  fn = np.sum((p != positive) & (y == positive))
  return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004); 0.0 when undefined.

  For two classes it is the phi coefficient, CoLA's metric.
  """
  p, y = class_ids(predictions), np.asarray(labels)
  _check_same_length(p, y)
  classes, inverse = np.unique(np.concatenate([p, y]), return_inverse=True)
  k, n = len(classes), len(p)
  confusion = np.zeros((k, k), np.float64)  # [true, predicted]
  np.add.at(confusion, (inverse[n:], inverse[:n]), 1)
  t, q = confusion.sum(1), confusion.sum(0)  # per class: true counts, predicted counts
  correct, s = np.trace(confusion), float(n)
  denominator = math.sqrt((s * s - q @ q) * (s * s - t @ t))
  return float((correct * s - t @ q) / denominator) if denominator else 0.0


def regression_scores(predictions) -> np.ndarray:
  """Regression outputs [n] from [n] or [n, 1]."""
  x = np.asarray(predictions, np.float64)
  return x[:, 0] if x.ndim == 2 else x


def pearson(predictions, labels) -> float:
  """Pearson correlation; NaN when either side is constant."""
  x, y = regression_scores(predictions), np.asarray(labels, np.float64)
  _check_same_length(x, y)
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("pearson: non-finite predictions or labels")
  x, y = x - x.mean(), y - y.mean()
  denominator = math.sqrt(float(x @ x) * float(y @ y))
  return float(x @ y / denominator) if denominator else math.nan


def average_ranks(x) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their positions (scipy 'average')."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]  # exclusive
  group = np.repeat(np.arange(len(starts)), ends - starts)
  ranks = np.empty(len(x), np.float64)
  ranks[order] = ((starts + ends - 1) / 2 + 1)[group]
  return ranks


def spearman(predictions, labels) -> float:
  """Spearman correlation: Pearson of average ranks (ties handled as scipy does)."""
  x = regression_scores(predictions)
  return pearson(average_ranks(x), average_ranks(np.asarray(labels, np.float64)))


# The names GlueTask.metrics uses.
METRICS: Dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef, "pearson": pearson,
    "spearman": spearman}
