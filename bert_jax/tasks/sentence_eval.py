"""Scoring sentence embeddings: paraphrase detection by a cosine threshold, and Spearman.

Two ways SBERT papers (Reimers & Gurevych 2019) read an embedding model
without training anything on top of it:

* Paraphrase classification (MRPC, QQP): a pair is called a paraphrase when
  the cosine of its two embeddings reaches a threshold. `best_accuracy` and
  `best_f1` pick the threshold that maximises that metric on labelled pairs,
  as sentence-transformers' BinaryClassificationEvaluator does (each its own
  threshold, midway between two neighbouring scores). Chosen on the data it
  scores, that is an upper bound; `threshold_metrics` scores other pairs at a
  threshold chosen elsewhere (e.g. on train), the honest figure.
* Similarity regression (STS-B, SICK-R): the Spearman rank correlation of the
  cosines with the gold scores (`spearman`, ties at their mean rank).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def cosine_scores(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Row-wise cosine of u and v, both [n, dim] -> [n] (float64)."""
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  norms = np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-12)
  return (u * v).sum(axis=1) / norms


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1 or not len(scores):
    raise ValueError(f"need equally many scores and labels (1-D, non-empty), got "
                     f"{scores.shape} and {labels.shape}")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
  return scores, labels.astype(np.int64)


def _cuts(scores: np.ndarray, labels: np.ndarray):
  """Per distinct score, high to low: (threshold, positives at or above it, predicted there).

  The threshold sits midway to the next lower score (the lowest score itself
  for the last), so `score >= threshold` predicts exactly the pairs so far.
  """
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last = np.r_[s[1:] != s[:-1], True]  # the end of each group of equal scores
  ends = np.flatnonzero(last)
  below = np.r_[s[ends[:-1] + 1], s[ends[-1]]]  # the next lower score (itself at the end)
  thresholds = np.where(np.arange(len(ends)) < len(ends) - 1, (s[ends] + below) / 2, s[ends])
  return thresholds, np.cumsum(y)[ends], ends + 1


def best_accuracy(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
  """(accuracy, threshold) of the threshold with the best accuracy on these pairs.

  Predicting every pair negative (threshold above the top score) counts too;
  ties go to the higher threshold.
  """
  scores, labels = _check(scores, labels)
  thresholds, positives, predicted = _cuts(scores, labels)
  negatives = len(labels) - labels.sum()
  # Correct = positives predicted positive + negatives left below the cut.
  correct = positives + (negatives - (predicted - positives))
  best = int(np.argmax(correct))
  if negatives >= correct[best]:  # nothing predicted positive is at least as good
    return float(negatives / len(labels)), float(np.nextafter(scores.max(), np.inf))
  return float(correct[best] / len(labels)), float(thresholds[best])


def best_f1(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
  """{'f1', 'precision', 'recall', 'threshold'} of the threshold with the best F1."""
  scores, labels = _check(scores, labels)
  thresholds, positives, predicted = _cuts(scores, labels)
  total = labels.sum()
  if total == 0:
    return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": float(scores.max())}
  precision = positives / predicted
  recall = positives / total
  f1 = np.where(positives > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
  best = int(np.argmax(f1))
  return {"f1": float(f1[best]), "precision": float(precision[best]),
          "recall": float(recall[best]), "threshold": float(thresholds[best])}


def threshold_metrics(scores: Sequence[float], labels: Sequence[int],
                      threshold: float) -> dict[str, float]:
  """Accuracy, precision, recall and F1 of predicting `score >= threshold` as a paraphrase."""
  scores, labels = _check(scores, labels)
  predicted = scores >= threshold
  tp = float(np.sum(predicted & (labels == 1)))
  precision = tp / predicted.sum() if predicted.any() else 0.0
  recall = tp / labels.sum() if labels.any() else 0.0
  f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
  return {"accuracy": float(np.mean(predicted == (labels == 1))), "precision": precision,
          "recall": recall, "f1": f1}


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, equal values sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  group = np.cumsum(starts) - 1  # group index of each sorted element
  first = np.flatnonzero(starts)
  last = np.r_[first[1:], len(x)] - 1
  ranks = np.empty(len(x))
  ranks[order] = ((first + last) / 2 + 1)[group]
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation of x and y (Pearson of their tie-averaged ranks)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
    raise ValueError(f"spearman needs two 1-D arrays of equal length >= 2, got {x.shape}, "
                     f"{y.shape}")
  rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
  denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / denominator) if denominator else float("nan")


def pair_classification(train: tuple[np.ndarray, np.ndarray] | None,
                        dev: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
  """Paraphrase metrics of dev (scores, labels); with train pairs, also at train's thresholds.

  Keys: 'dev_best_accuracy', 'dev_best_f1' (+ their thresholds: the
  BinaryClassificationEvaluator figures), 'spearman' (cosine vs the 0/1
  labels) and, with `train`, 'accuracy' and 'f1' at the thresholds that are
  best on train.
  """
  dev_scores, dev_labels = dev
  acc, acc_threshold = best_accuracy(dev_scores, dev_labels)
  f1 = best_f1(dev_scores, dev_labels)
  out = {"dev_best_accuracy": acc, "dev_accuracy_threshold": acc_threshold,
         "dev_best_f1": f1["f1"], "dev_f1_threshold": f1["threshold"],
         "spearman": spearman(dev_scores, dev_labels)}
  if train is not None:
    _, train_acc_threshold = best_accuracy(*train)
    train_f1_threshold = best_f1(*train)["threshold"]
    out["accuracy"] = threshold_metrics(dev_scores, dev_labels, train_acc_threshold)["accuracy"]
    out["f1"] = threshold_metrics(dev_scores, dev_labels, train_f1_threshold)["f1"]
    out["train_accuracy_threshold"] = train_acc_threshold
    out["train_f1_threshold"] = train_f1_threshold
  return out
