"""The losses and metrics the objectives (objectives.py) are built from.

Every loss returns `(loss, metrics)`. `loss` is the scalar to differentiate;
`metrics` holds *sums* only (a loss sum, a count, a number of correct
predictions), never ratios. Sums add up across microbatches, devices and
hosts; `summarize` divides them once at the end. Averaging per-step ratios
instead would weight a batch with 3 masked tokens like one with 3000.

Metric keys are `"<prefix>/<name>"` with names:
  loss_sum  sum over scored items of weight * loss (z-loss included for
            seq2seq, which also reports z_loss_sum on its own),
  count     sum of weights (tokens for MLM/seq2seq, examples otherwise),
  correct   sum of weights where the target's logit is the row's maximum
            (span: start_correct and end_correct).

All arithmetic is float32 whatever the logits dtype: bfloat16 has 8 bits of
mantissa, too few for a log-sum-exp over a 32k vocabulary.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bert_jax.models import crf

Array = jax.Array
Metrics = dict[str, Array]

# Original BERT (run_pretraining.py) adds this to the MLM denominator so a
# batch with no masked token gives 0, not NaN.
MLM_DENOMINATOR_EPS = 1e-5


def safe_div(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, 0 where the denominator is 0 (NaN-free grads)."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def _weights_like(targets: Array, weights: Array | None) -> Array:
  """float32 weights shaped like targets (all ones when None)."""
  if weights is None:
    return jnp.ones(targets.shape, jnp.float32)
  if weights.shape != targets.shape:
    raise ValueError(f"weights shape {weights.shape} != targets shape {targets.shape}")
  return weights.astype(jnp.float32)


def _check_logits(logits: Array, targets: Array, name: str) -> None:
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f"{name}: logits shape {logits.shape} does not fit targets shape "
        f"{targets.shape} (expected targets.shape + (num_classes,))")


def cross_entropy(logits: Array, targets: Array, *, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-item softmax cross entropy with integer targets, in float32.

  Label smoothing follows t5x: the target gets probability 1 - s and every
  other class s / (num_classes - 1); the entropy of that smoothed target is
  subtracted, so the loss is the KL divergence (0 for a perfect prediction)
  and its gradient is that of plain smoothed cross entropy.

  The z-loss (PaLM / t5x) adds z_loss * logsumexp(logits)**2 per item, which
  keeps the softmax normaliser near 1 and bf16 logits in range.

  Args:
    logits: [..., num_classes] any float dtype.
    targets: [...] integer class ids in [0, num_classes).
    label_smoothing: s in [0, 1).
    z_loss: coefficient of the squared log normaliser.

  Returns:
    (loss, z_term), both float32 [...]; loss includes z_term.
  """
  _check_logits(logits, targets, "cross_entropy")
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
  if label_smoothing:
    if num_classes < 2:
      raise ValueError("label_smoothing needs at least 2 classes")
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (num_classes - 1)
    # sum_c q_c * logit_c without materialising the one-hot q: [...]
    expected_logit = low * jnp.sum(logits, axis=-1) + (confidence - low) * target_logit
    target_entropy = -(confidence * jnp.log(confidence)
                       + (num_classes - 1) * low * jnp.log(low + 1e-20))
    loss = log_z - expected_logit - target_entropy
  else:
    loss = log_z - target_logit
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def _correct(logits: Array, targets: Array) -> Array:
  """1.0 where the target's logit is the largest of its row (a tie counts as correct).

  Not argmax == target: XLA:CPU's argmax, a variadic (value, index) reduce,
  took 0.28 s of a 6 s BERT step over [4096, 30522] MLM logits, 15x a plain
  max. The two differ only where logits tie exactly for the maximum. A target
  out of range reads NaN (take_along_axis fills) and is never correct.
  """
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  return (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)


def categorical(logits: Array, targets: Array, weights: Array | None,
                 prefix: str) -> tuple[Array, Metrics]:
  """Weighted mean cross entropy + sums, the shared body of several losses."""
  _check_logits(logits, targets, prefix)
  w = _weights_like(targets, weights)
  per_item, _ = cross_entropy(logits, targets)
  loss_sum = jnp.sum(w * per_item)
  count = jnp.sum(w)
  metrics = {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
             f"{prefix}/correct": jnp.sum(w * _correct(logits, targets))}
  return safe_div(loss_sum, count), metrics


def mlm_loss(mlm_logits: Array, batch: Mapping[str, Array], *,
             targets_key: str = "mlm_targets", weights_key: str = "mlm_weights",
             prefix: str = "mlm") -> tuple[Array, Metrics]:
  """Masked-LM loss of original BERT: sum(w * CE) / (sum(w) + 1e-5).

  Works on the gathered form ([batch, max_predictions, vocab] logits with
  `mlm_targets`/`mlm_weights`) and equally on logits at every position
  ([batch, length, vocab]) with per-position targets/weights under other keys.

  Args:
    mlm_logits: [batch, n, vocab].
    batch: holds targets [batch, n] int and weights [batch, n] float
      (0.0 for padding slots, which are then ignored entirely).
    targets_key: batch key of the targets.
    weights_key: batch key of the weights.
    prefix: metric key prefix.

  Returns:
    (loss, metrics) with `<prefix>/loss_sum`, `/count` (masked tokens) and
    `/correct`; sum metrics over microbatches/hosts, then `summarize`.
  """
  targets, weights = batch[targets_key], batch[weights_key]
  _, metrics = categorical(mlm_logits, targets, weights, prefix)
  loss_sum, count = metrics[f"{prefix}/loss_sum"], metrics[f"{prefix}/count"]
  return loss_sum / (count + MLM_DENOMINATOR_EPS), metrics


def nsp_loss(nsp_logits: Array, nsp_labels: Array, weights: Array | None = None, *,
             prefix: str = "nsp") -> tuple[Array, Metrics]:
  """Next-sentence (or sentence-order) prediction: mean cross entropy.

  Args:
    nsp_logits: [batch, 2].
    nsp_labels: [batch] int (BERT: 0 = B follows A, 1 = random B;
      ALBERT SOP: 1 = swapped order).
    weights: optional [batch], 0.0 for padding examples.
    prefix: metric key prefix ("sop" for ALBERT).

  Returns:
    (weighted mean loss, metrics with loss_sum/count/correct).
  """
  return categorical(nsp_logits, nsp_labels, weights, prefix)


def rtd_loss(rtd_logits: Array, rtd_labels: Array, weights: Array, *,
             prefix: str = "rtd") -> tuple[Array, Metrics]:
  """ELECTRA's replaced-token detection: per-token sigmoid cross entropy.

  Args:
    rtd_logits: [batch, length], > 0 predicts 'replaced'.
    rtd_labels: [batch, length] int, 1 where the token was replaced by a
      generator sample that differs from the original.
    weights: [batch, length], 1.0 for the real tokens (the reference's
      input_mask), 0.0 for padding.
    prefix: metric key prefix.

  Returns:
    (weighted mean loss, metrics): loss_sum, count, correct, and the sums
    behind precision and recall on the replaced tokens: true_positives,
    predicted_positives (flagged 'replaced'), positives (really replaced).
  """
  _check_logits(rtd_logits[..., None], rtd_labels, prefix)
  w = _weights_like(rtd_labels, weights)
  x = rtd_logits.astype(jnp.float32)
  y = rtd_labels.astype(jnp.float32)
  # log(1 + e^-|x|) + max(x, 0) - x y: sigmoid CE without overflow.
  per_token = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  predicted = (x > 0).astype(jnp.float32)
  loss_sum = jnp.sum(w * per_token)
  count = jnp.sum(w)
  metrics = {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
             f"{prefix}/correct": jnp.sum(w * (predicted == y)),
             f"{prefix}/true_positives": jnp.sum(w * predicted * y),
             f"{prefix}/predicted_positives": jnp.sum(w * predicted),
             f"{prefix}/positives": jnp.sum(w * y)}
  return safe_div(loss_sum, count), metrics


def distillation_kl(student_logits: Array, teacher_logits: Array, weights: Array, *,
                    temperature: float, prefix: str = "kd") -> tuple[Array, Metrics]:
  """Knowledge distillation: T^2 * KL(teacher || student) of the softened distributions.

  Hinton et al. 2015 / DistilBERT: both logits are divided by T; the KL of
  softmax(teacher / T) to softmax(student / T) is scaled by T^2 so its
  gradient keeps the size of a T=1 loss. Per item, then a weighted mean.

  Args:
    student_logits, teacher_logits: [..., vocab], e.g. at the masked slots.
    weights: [...], 1.0 for scored items (mlm_weights).
    temperature: T.
    prefix: metric key prefix.

  Returns:
    (weighted mean loss, metrics): loss_sum, count, and `correct`: items
    where the student's argmax equals the teacher's.
  """
  _check_logits(student_logits, teacher_logits[..., 0], prefix)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"{prefix}: student logits {student_logits.shape} != teacher logits "
                     f"{teacher_logits.shape} (student and teacher need one vocabulary)")
  w = _weights_like(student_logits[..., 0], weights)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  per_item = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
  loss_sum = jnp.sum(w * per_item)
  count = jnp.sum(w)
  agree = (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
  return safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
                                     f"{prefix}/correct": jnp.sum(w * agree)}


def cosine_loss(student: Array, teacher: Array, weights: Array, *,
                prefix: str = "cos") -> tuple[Array, Metrics]:
  """Mean of 1 - cos(student_i, teacher_i): DistilBERT's hidden-state alignment.

  Args:
    student, teacher: [..., hidden] final hidden states (same width).
    weights: [...], 1.0 for the real tokens.
    prefix: metric key prefix.
  """
  if student.shape != teacher.shape:
    raise ValueError(f"{prefix}: student hidden states {student.shape} != teacher's "
                     f"{teacher.shape} (the cosine loss needs one hidden size)")
  w = _weights_like(student[..., 0], weights)
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  # torch.nn.CosineEmbeddingLoss's epsilon keeps an all-zero vector finite.
  norms = jnp.sqrt(jnp.sum(s * s, -1) * jnp.sum(t * t, -1) + 1e-12)
  per_item = 1.0 - jnp.sum(s * t, -1) / norms
  loss_sum = jnp.sum(w * per_item)
  count = jnp.sum(w)
  return safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count}


def classification_loss(logits: Array, labels: Array, weights: Array | None = None, *,
                        prefix: str = "cls") -> tuple[Array, Metrics]:
  """Sequence classification: softmax CE, or MSE regression if num_labels == 1.

  Regression (STS-B) reads `labels` as floats and reports no `correct`.

  Args:
    logits: [batch, num_labels].
    labels: [batch] int class ids, or float targets when num_labels == 1.
    weights: optional [batch], 0.0 for padding examples.
    prefix: metric key prefix.

  Returns:
    (weighted mean loss, metrics with loss_sum/count[/correct]).
  """
  if logits.shape[-1] != 1:
    return categorical(logits, labels, weights, prefix)
  _check_logits(logits, labels, "classification_loss")
  w = _weights_like(labels, weights)
  err = logits[..., 0].astype(jnp.float32) - labels.astype(jnp.float32)
  loss_sum = jnp.sum(w * jnp.square(err))
  count = jnp.sum(w)
  return safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum,
                                      f"{prefix}/count": count}


def token_classification_loss(logits: Array, labels: Array, weights: Array | None = None,
                              *, ignore_label: int = -100,
                              prefix: str = "token") -> tuple[Array, Metrics]:
  """Per-token classification (NER): mean CE over labelled tokens.

  A token is scored when its label is not `ignore_label` (continuation
  sub-words, special tokens, padding) and, if given, its weight is non-zero.

  Args:
    logits: [batch, length, num_labels].
    labels: [batch, length] int, `ignore_label` where unscored.
    weights: optional [batch, length] extra weights.
    ignore_label: label value meaning "not scored".
    prefix: metric key prefix.

  Returns:
    (mean loss over scored tokens, metrics with loss_sum/count/correct).
  """
  _check_logits(logits, labels, "token_classification_loss")
  scored = (labels != ignore_label).astype(jnp.float32)
  w = _weights_like(labels, weights) * scored
  # The gather needs a valid index; the weight already drops these tokens.
  safe_labels = jnp.where(labels == ignore_label, 0, labels)
  return categorical(logits, safe_labels, w, prefix)


def crf_loss(emissions: Array, labels: Array, transitions: Array, start: Array, end: Array,
             weights: Array | None = None, *, ignore_label: int = -100,
             prefix: str = "crf") -> tuple[Array, Metrics]:
  """Negative log-likelihood of a linear-chain CRF (models/crf.py), per scored token.

  Each row's chain runs over its labelled positions (label != ignore_label,
  left-aligned: the words, not the sub-words); its loss is -log p(labels).
  The sum over rows is divided by the number of scored tokens, so the loss
  has the scale of token_classification_loss and the same learning rates
  suit both.

  Args:
    emissions: [batch, length, num_labels].
    labels: [batch, length] int, `ignore_label` where unscored.
    transitions, start, end: the CRF's (constrained) scores, [L, L], [L], [L].
    weights: optional [batch] row weights (0.0 for filler rows).
    ignore_label: label value meaning "not in the chain".
    prefix: metric key prefix.

  Returns:
    (loss sum / scored tokens, metrics with loss_sum and count (scored tokens)).
  """
  _check_logits(emissions, labels, "crf_loss")
  scored = labels != ignore_label  # [batch, length]
  w = _weights_like(labels[:, 0], weights)  # [batch]
  nll = -crf.crf_log_likelihood(emissions, labels, scored, transitions, start, end)
  loss_sum = jnp.sum(w * nll)
  count = jnp.sum(w[:, None] * scored.astype(jnp.float32))
  return safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count}


def span_loss(start_logits: Array, end_logits: Array, start_positions: Array,
              end_positions: Array, weights: Array | None = None, *,
              prefix: str = "span") -> tuple[Array, Metrics]:
  """Extractive QA loss of BERT run_squad: (CE(start) + CE(end)) / 2.

  Args:
    start_logits: [batch, length].
    end_logits: [batch, length].
    start_positions: [batch] int in [0, length) (0 = [CLS] for no answer).
    end_positions: [batch] int in [0, length).
    weights: optional [batch], 0.0 for padding examples.
    prefix: metric key prefix.

  Returns:
    (weighted mean loss, metrics with loss_sum/count/start_correct/end_correct).
  """
  _check_logits(start_logits, start_positions, "span_loss start")
  _check_logits(end_logits, end_positions, "span_loss end")
  w = _weights_like(start_positions, weights)
  start_ce, _ = cross_entropy(start_logits, start_positions)
  end_ce, _ = cross_entropy(end_logits, end_positions)
  loss_sum = jnp.sum(w * 0.5 * (start_ce + end_ce))
  count = jnp.sum(w)
  metrics = {
      f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
      f"{prefix}/start_correct": jnp.sum(w * _correct(start_logits, start_positions)),
      f"{prefix}/end_correct": jnp.sum(w * _correct(end_logits, end_positions)),
  }
  return safe_div(loss_sum, count), metrics


def seq2seq_loss(logits: Array, decoder_target_tokens: Array, decoder_loss_weights: Array,
                 z_loss: float = 0.0, label_smoothing: float = 0.0, *,
                 loss_normalizing_factor: float | None = None,
                 prefix: str = "seq2seq") -> tuple[Array, Metrics]:
  """T5 decoder loss: cross entropy with optional z-loss and label smoothing.

  Normalisation: by default the returned loss is sum(w * (CE + z-loss)) /
  sum(w), the mean per scored target token of this batch (0 if no token is
  scored). With `loss_normalizing_factor` it is the sum divided by that
  constant instead (t5x's option), which weights each batch by its token
  count; with packed batches of nearly constant token count the two differ
  by a near-constant factor. The metrics are sums either way.

  Args:
    logits: [batch, length, vocab], any float dtype.
    decoder_target_tokens: [batch, length] int.
    decoder_loss_weights: [batch, length], 0.0 on padding (t5x/seqio name).
    z_loss: coefficient of logsumexp(logits)**2 (t5x pretraining: 1e-4).
    label_smoothing: t5x-style smoothing (see `cross_entropy`).
    loss_normalizing_factor: optional constant divisor of the loss sum.
    prefix: metric key prefix.

  Returns:
    (loss, metrics with loss_sum (z-loss included), z_loss_sum, count,
    correct); sum metrics over microbatches/hosts, then `summarize`.
  """
  _check_logits(logits, decoder_target_tokens, "seq2seq_loss")
  w = _weights_like(decoder_target_tokens, decoder_loss_weights)
  per_token, z_term = cross_entropy(logits, decoder_target_tokens,
                                    label_smoothing=label_smoothing, z_loss=z_loss)
  loss_sum = jnp.sum(w * per_token)
  count = jnp.sum(w)
  metrics = {
      f"{prefix}/loss_sum": loss_sum, f"{prefix}/z_loss_sum": jnp.sum(w * z_term),
      f"{prefix}/count": count,
      f"{prefix}/correct": jnp.sum(w * _correct(logits, decoder_target_tokens)),
  }
  if loss_normalizing_factor is not None:
    if loss_normalizing_factor <= 0:
      raise ValueError(f"loss_normalizing_factor must be > 0, got {loss_normalizing_factor}")
    return loss_sum / loss_normalizing_factor, metrics
  return safe_div(loss_sum, count), metrics


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Turns summed metrics into averages: the one place sums become ratios.

  For every prefix with a `count`: `<p>/loss` = loss_sum / count,
  `<p>/accuracy` = correct / count (`start_accuracy`/`end_accuracy` for spans,
  `z_loss` for z_loss_sum), plus `<p>/count` itself. Binary detection sums
  (true_positives, predicted_positives, positives) become `<p>/precision`,
  `<p>/recall` and `<p>/positive_rate` (positives / count). Keys without a
  count (e.g. a learning rate) pass through unchanged.

  Args:
    metrics: name -> scalar (array or number), already summed over steps.

  Returns:
    name -> python float.
  """
  out: dict[str, float] = {}
  prefixes = {k.rsplit("/", 1)[0] for k in metrics if k.endswith("/count")}
  for key, value in metrics.items():
    head, _, name = key.rpartition("/")
    if head not in prefixes:
      out[key] = float(value)
  for p in sorted(prefixes):
    count = float(metrics[f"{p}/count"])
    out[f"{p}/count"] = count
    for name, value in metrics.items():
      head, _, stat = name.rpartition("/")
      if head != p or stat == "count":
        continue
      if stat in _DETECTION_SUMS:
        continue
      mean_name = {"loss_sum": "loss", "z_loss_sum": "z_loss"}.get(
          stat, stat.replace("correct", "accuracy"))
      out[f"{p}/{mean_name}"] = float(value) / count if count > 0 else 0.0
    if f"{p}/true_positives" in metrics:
      tp, flagged, real = (float(metrics[f"{p}/{k}"]) for k in _DETECTION_SUMS)
      out[f"{p}/precision"] = tp / flagged if flagged > 0 else 0.0
      out[f"{p}/recall"] = tp / real if real > 0 else 0.0
      out[f"{p}/positive_rate"] = real / count if count > 0 else 0.0
  return out


# Sums of a binary detection term (rtd_loss) that summarize turns into
# precision and recall rather than dividing by the count.
_DETECTION_SUMS = ("true_positives", "predicted_positives", "positives")


# ---------------------------------------------------------------------------
# Sentence-BERT bi-encoder losses (Reimers & Gurevych 2019): both sentences of
# a pair go through the same encoder + pooling (models/pooling.py) into
# u, v [batch, hidden]; these score them. They follow the conventions above
# (sums in metrics, weights 0.0 for filler rows).
# ---------------------------------------------------------------------------

# What a norm is at least, so an all-zero (filler) vector stays finite.
_UNIT_EPS = 1e-12


def _unit(x: Array) -> Array:
  """Rows of x scaled to unit L2 norm, in float32."""
  x = x.astype(jnp.float32)
  # rsqrt of the clamped squared norm, not norm(x): the norm's gradient at an
  # all-zero (filler) row is 0/0 = NaN, and NaN * weight 0 is still NaN.
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, _UNIT_EPS * _UNIT_EPS))


def sbert_pair_features(u: Array, v: Array) -> Array:
  """SBERT's classification input (u, v, |u - v|): [batch, hidden] x 2 -> [batch, 3 * hidden]."""
  if u.shape != v.shape:
    raise ValueError(f"sbert_pair_features: u {u.shape} and v {v.shape} differ")
  return jnp.concatenate([u, v, jnp.abs(u - v)], axis=-1)


def sbert_softmax_loss(u: Array, v: Array, kernel: Array, bias: Array, labels: Array,
                       weights: Array | None = None, *,
                       prefix: str = "sbert_cls") -> tuple[Array, Metrics]:
  """SBERT's NLI objective: softmax cross entropy of W (u, v, |u - v|) + b.

  Args:
    u, v: [batch, hidden] the two sentences' embeddings.
    kernel: [3 * hidden, num_labels], bias: [num_labels], the classifier
      (trained with the encoder, dropped after training).
    labels: [batch] int class ids (entailment / neutral / contradiction).
    weights: optional [batch], 0.0 for filler rows.
    prefix: metric key prefix.
  """
  features = sbert_pair_features(u.astype(jnp.float32), v.astype(jnp.float32))
  logits = features @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)  # [batch, labels]
  return categorical(logits, labels, weights, prefix)


def cosine_similarity_loss(u: Array, v: Array, scores: Array, weights: Array | None = None,
                           *, prefix: str = "cos_sim") -> tuple[Array, Metrics]:
  """Mean squared error of cos(u_i, v_i) against gold similarities (STS, scaled to [0, 1]).

  Args:
    u, v: [batch, hidden] the two sentences' embeddings.
    scores: [batch] float gold similarities.
    weights: optional [batch], 0.0 for filler rows.
    prefix: metric key prefix.
  """
  if u.shape != v.shape or u.shape[:1] != scores.shape:
    raise ValueError(f"{prefix}: u {u.shape}, v {v.shape} and scores {scores.shape} do not fit")
  w = _weights_like(scores, weights)
  cosine = jnp.sum(_unit(u) * _unit(v), axis=-1)  # [batch]
  loss_sum = jnp.sum(w * jnp.square(cosine - scores.astype(jnp.float32)))
  count = jnp.sum(w)
  return safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count}


def multiple_negatives_ranking_loss(anchors: Array, positives: Array,
                                    weights: Array | None = None, *,
                                    negatives: Array | None = None, scale: float = 20.0,
                                    prefix: str = "mnrl") -> tuple[Array, Metrics]:
  """In-batch softmax over cosines (Henderson et al. 2017; sentence-transformers' MNRL).

  Anchor i must pick its positive i among every positive (and hard negative)
  of the batch: cross entropy of scale * cos(a_i, c_j) with target j = i.
  Under jit with the batch split over devices, `anchors` and `positives`
  are the GLOBAL [batch, hidden] arrays, so the [batch, candidates]
  similarity matrix spans every device and host: each anchor meets the whole
  global batch as negatives, not only its device's share (XLA gathers the
  candidates).

  Args:
    anchors, positives: [batch, hidden].
    weights: optional [batch], 0.0 for filler rows: such a row is neither
      scored nor a candidate (its vector is padding, not a negative).
    negatives: optional [batch, hidden] hard negatives (row i belongs to
      anchor i but is a candidate for every anchor), weighted like row i.
    scale: the inverse temperature (20, sentence-transformers' default).
    prefix: metric key prefix.
  """
  if anchors.shape != positives.shape or (negatives is not None
                                          and negatives.shape != anchors.shape):
    raise ValueError(f"{prefix}: anchors {anchors.shape}, positives {positives.shape} and "
                     f"negatives {None if negatives is None else negatives.shape} must match")
  batch = anchors.shape[0]
  w = _weights_like(anchors[:, 0], weights)
  candidates = positives if negatives is None else jnp.concatenate([positives, negatives], 0)
  real = jnp.tile(w, 1 if negatives is None else 2) > 0  # [candidates]
  logits = scale * (_unit(anchors) @ _unit(candidates).T)  # [batch, candidates]
  # A large finite value, not -inf: a filler row's own target is masked too,
  # and inf * weight 0 would be NaN.
  logits = jnp.where(real[None, :], logits, -1e9)
  targets = jnp.arange(batch)
  per_item, _ = cross_entropy(logits, targets)
  loss_sum = jnp.sum(w * per_item)
  count = jnp.sum(w)
  return safe_div(loss_sum, count), {
      f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
      f"{prefix}/correct": jnp.sum(w * _correct(logits, targets))}
