"""The objective registry, and the losses and metrics it is built from.

`OBJECTIVES` maps a name to an `Objective`: the model task it trains, and
its weighted `Term`s, each saying which model outputs and batch features it
reads, its whole-batch normaliser and its summable metrics under its own
prefix ('mlm/*', 'nsp/*', 'sop/*', 'seq2seq/*', 'cls/*', ...). The train and
eval steps (steps.py) call only `Objective.normalizers / metrics / loss`;
`register` adds one, `combine` sums several with weights (MLM + SBO,
MLM + 50 x RTD, distillation's three terms).

Every loss returns `(loss, metrics)`. `loss` is the scalar to differentiate;
`metrics` holds *sums* only (a loss sum, a count, a number of correct
predictions), never ratios. Sums add up across microbatches, devices and
hosts; `summarize` divides them once at the end. Averaging per-step ratios
instead would weight a batch with 3 masked tokens like one with 3000.

Metric keys are `"<prefix>/<name>"` with names:
  loss_sum  sum over scored items of weight * loss (z-loss included for
            seq2seq, which also reports z_loss_sum on its own),
  count     sum of weights (tokens for MLM/seq2seq, examples otherwise),
  correct   sum of weights where the argmax equals the target
            (span: start_correct and end_correct).

All arithmetic is float32 whatever the logits dtype: bfloat16 has 8 bits of
mantissa, too few for a log-sum-exp over a 32k vocabulary.
"""
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from bert_jax.models.configs import SBO_MAX_TARGETS

Array = jax.Array
Metrics = dict[str, Array]

# Original BERT (run_pretraining.py) adds this to the MLM denominator so a
# batch with no masked token gives 0, not NaN.
MLM_DENOMINATOR_EPS = 1e-5


def _safe_div(numerator: Array, denominator: Array) -> Array:
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
  return (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def _categorical(logits: Array, targets: Array, weights: Array | None,
                 prefix: str) -> tuple[Array, Metrics]:
  """Weighted mean cross entropy + sums, the shared body of several losses."""
  _check_logits(logits, targets, prefix)
  w = _weights_like(targets, weights)
  per_item, _ = cross_entropy(logits, targets)
  loss_sum = jnp.sum(w * per_item)
  count = jnp.sum(w)
  metrics = {f"{prefix}/loss_sum": loss_sum, f"{prefix}/count": count,
             f"{prefix}/correct": jnp.sum(w * _correct(logits, targets))}
  return _safe_div(loss_sum, count), metrics


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
  _, metrics = _categorical(mlm_logits, targets, weights, prefix)
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
  return _categorical(nsp_logits, nsp_labels, weights, prefix)


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
    return _categorical(logits, labels, weights, prefix)
  _check_logits(logits, labels, "classification_loss")
  w = _weights_like(labels, weights)
  err = logits[..., 0].astype(jnp.float32) - labels.astype(jnp.float32)
  loss_sum = jnp.sum(w * jnp.square(err))
  count = jnp.sum(w)
  return _safe_div(loss_sum, count), {f"{prefix}/loss_sum": loss_sum,
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
  return _categorical(logits, safe_labels, w, prefix)


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
  return _safe_div(loss_sum, count), metrics


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
  return _safe_div(loss_sum, count), metrics


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Turns summed metrics into averages: the one place sums become ratios.

  For every prefix with a `count`: `<p>/loss` = loss_sum / count,
  `<p>/accuracy` = correct / count (`start_accuracy`/`end_accuracy` for spans,
  `z_loss` for z_loss_sum), plus `<p>/count` itself. Keys without a count
  (e.g. a learning rate) pass through unchanged.

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
      mean_name = {"loss_sum": "loss", "z_loss_sum": "z_loss"}.get(
          stat, stat.replace("correct", "accuracy"))
      out[f"{p}/{mean_name}"] = float(value) / count if count > 0 else 0.0
  return out


# ---------------------------------------------------------------------------
# The registry: objectives as records.
# ---------------------------------------------------------------------------
#
# An objective is a weighted sum of terms. Each term reads some model outputs
# and batch features, returns summable metrics under its own prefix (its
# '<prefix>/loss_sum' is the loss numerator) and names its whole-batch
# normaliser. The train step computes every normaliser from the whole batch
# first (so accumulated microbatch gradients equal the large-batch gradient)
# and optimises sum_t weight_t * loss_sum_t / normaliser_t. steps.py knows
# nothing else about objectives: a new one is a `register(Objective(...))`.

# Token label that token classification does not score.
IGNORE_LABEL = -100


def example_weights(batch: Mapping[str, Array]) -> Array:
  """Per-row weights: `example_weights` when the batch has them (fine-tuning
  batches, tasks/batching.pad_batch), else 1.0 for rows with any non-0 token
  (filler rows of pretraining batches are all padding id 0)."""
  if "example_weights" in batch:
    return batch["example_weights"].astype(jnp.float32)
  return jnp.any(batch["encoder_input_tokens"] != 0, axis=-1).astype(jnp.float32)


def classifier_weights(batch: Mapping[str, Array]) -> Array:
  """Per-example weights of the classification objectives (0.0 for filler rows)."""
  if "classifier_weights" in batch:
    return batch["classifier_weights"].astype(jnp.float32)
  return example_weights(batch)


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss of an objective.

  Attributes:
    prefix: metric prefix ('mlm', 'nsp', 'sop', 'seq2seq', 'cls', ...).
    metrics: (outputs, batch, prefix=..., **options) -> summable metrics,
      including '<prefix>/loss_sum'. `outputs` is the model's output dict.
    normalizer: batch -> the whole batch's denominator of this term (a term
      whose denominator is 0 contributes 0, not NaN).
    outputs: the model outputs it reads.
    features: the batch features it reads (beyond the model's inputs);
      optional ones (`example_weights`) count too, so none is dropped.
    options: names of run options it takes (e.g. 'z_loss').
    weight: its factor in the objective's sum.
  """
  prefix: str
  metrics: Callable[..., Metrics]
  normalizer: Callable[[Mapping[str, Array]], Array]
  outputs: tuple[str, ...]
  features: tuple[str, ...]
  options: tuple[str, ...] = ()
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective: what the model must output and how its loss is summed.

  Attributes:
    name: the registry key (`config.train.objective`, or the data objective's
      name when that is empty; a fine-tuning task names its own).
    model_task: the task the family builds for it (models.Family.build).
    terms: its weighted losses.
    data: the pipeline objectives (`config.data.objective`) whose batches
      feed it; empty for fine-tuning objectives (the task adapters feed them).
    masking: the `config.data.masking` schemes it needs (empty: any), e.g.
      'span' for SpanBERT's boundary positions.
  """
  name: str
  model_task: str
  terms: tuple[Term, ...]
  data: tuple[str, ...] = ()
  masking: tuple[str, ...] = ()

  @property
  def features(self) -> tuple[str, ...]:
    """Every batch feature a term reads."""
    return tuple(dict.fromkeys(f for t in self.terms for f in t.features))

  def normalizers(self, batch: Mapping[str, Array]) -> dict[str, Array]:
    """Each term's denominator over the WHOLE batch (they do not depend on the params)."""
    return {t.prefix: t.normalizer(batch) for t in self.terms}

  def metrics(self, outputs: Any, batch: Mapping[str, Array], **options) -> Metrics:
    """Every term's summable metrics of one (micro)batch; outputs: the model's."""
    if not isinstance(outputs, Mapping):  # T5 returns its logits alone
      outputs = {"logits": outputs}
    out: Metrics = {}
    for t in self.terms:
      out.update(t.metrics(outputs, batch, prefix=t.prefix,
                           **{k: options[k] for k in t.options if k in options}))
    return out

  def loss(self, metrics: Mapping[str, Array], normalizers: Mapping[str, Array]) -> Array:
    """sum_t weight_t * loss_sum_t / normaliser_t (a term with normaliser 0 adds 0)."""
    total = jnp.zeros([], jnp.float32)
    for t in self.terms:
      term = _safe_div(metrics[f"{t.prefix}/loss_sum"], normalizers[t.prefix])
      total += term if t.weight == 1.0 else t.weight * term
    return total


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  """Adds `objective` to the registry; a name is registered once, prefixes are unique."""
  if objective.name in OBJECTIVES:
    raise ValueError(f"objective {objective.name!r} is already registered")
  prefixes = [t.prefix for t in objective.terms]
  if len(set(prefixes)) != len(prefixes):
    raise ValueError(f"objective {objective.name!r}: repeated metric prefix in {prefixes}")
  OBJECTIVES[objective.name] = objective
  return objective


def get(name: str) -> Objective:
  """The objective called `name`; an unknown name is an error listing the known ones."""
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def combine(name: str, model_task: str, *parts: tuple[Objective | Term, float],
            data: tuple[str, ...] = ()) -> Objective:
  """An objective summing others' terms with weights, e.g. MLM + 50 x RTD.

  Each part is (objective or term, weight); an objective's terms are all
  scaled by its weight. Every term keeps its prefix, so each logs its own.
  """
  terms = []
  for part, weight in parts:
    for t in (part.terms if isinstance(part, Objective) else (part,)):
      terms.append(dataclasses.replace(t, weight=t.weight * weight))
  return Objective(name=name, model_task=model_task, terms=tuple(terms), data=data)


# ---- the terms


def _mlm_metrics(outputs, batch, *, prefix):
  return mlm_loss(outputs["mlm_logits"], batch, prefix=prefix)[1]


def _nsp_metrics(outputs, batch, *, prefix):
  return nsp_loss(outputs["nsp_logits"], batch["nsp_labels"], example_weights(batch),
                  prefix=prefix)[1]


def _seq2seq_metrics(outputs, batch, *, prefix, z_loss=0.0):
  return seq2seq_loss(outputs["logits"], batch["decoder_target_tokens"],
                      batch["decoder_loss_weights"], z_loss=z_loss, prefix=prefix)[1]


def _classification_metrics(outputs, batch, *, prefix):
  # Filler rows carry label -1: any valid index will do under weight 0.
  labels = jnp.maximum(batch["classifier_labels"], 0)
  return classification_loss(outputs["logits"], labels, classifier_weights(batch),
                             prefix=prefix)[1]


def _regression_metrics(outputs, batch, *, prefix):
  return classification_loss(outputs["logits"],
                             batch["classifier_labels"].astype(jnp.float32),
                             classifier_weights(batch), prefix=prefix)[1]


def _token_metrics(outputs, batch, *, prefix):
  return token_classification_loss(outputs["logits"], batch["token_labels"],
                                   ignore_label=IGNORE_LABEL, prefix=prefix)[1]


def _span_metrics(outputs, batch, *, prefix):
  return span_loss(outputs["start_logits"], outputs["end_logits"],
                   jnp.maximum(batch["start_positions"], 0),
                   jnp.maximum(batch["end_positions"], 0), example_weights(batch),
                   prefix=prefix)[1]


def sbo_weights(batch: Mapping[str, Array]) -> Array:
  """[batch, max_predictions] float32 weights of SpanBERT's boundary objective.

  A slot is scored when MLM scores it and its span boundaries are real
  positions around it: 0 <= s-1 < i < e+1 < length (the 'span' masking only
  emits such spans, so this guards hand-built or other batches) and i is
  among the span's first SBO_MAX_TARGETS tokens (the reference drops the
  rest). Padding slots (all positions 0) fail `s-1 < i`.
  """
  missing = [k for k in ("sbo_left_positions", "sbo_right_positions") if k not in batch]
  if missing:
    raise ValueError(f"the span boundary objective needs {missing} in the batch "
                     "(data.masking='span' emits them)")
  pos = batch["mlm_positions"].astype(jnp.int32)
  left = batch["sbo_left_positions"].astype(jnp.int32)
  right = batch["sbo_right_positions"].astype(jnp.int32)
  length = batch["encoder_input_tokens"].shape[1]
  relative = pos - left - 1  # the token's index within its span
  valid = ((left >= 0) & (left < pos) & (pos < right) & (right < length)
           & (relative < SBO_MAX_TARGETS))
  return batch["mlm_weights"].astype(jnp.float32) * valid.astype(jnp.float32)


def _sbo_metrics(outputs, batch, *, prefix):
  # The targets are the masked tokens themselves (mlm_targets).
  return _categorical(outputs["sbo_logits"], batch["mlm_targets"], sbo_weights(batch),
                      prefix)[1]


def _sbo_count(batch):
  return jnp.sum(sbo_weights(batch))


def _sum_of(key: str, offset: float = 0.0):
  return lambda batch: jnp.sum(batch[key].astype(jnp.float32)) + offset


def _examples(batch):
  return jnp.sum(example_weights(batch))


def _classified(batch):
  return jnp.sum(classifier_weights(batch))


def _scored_tokens(batch):
  return jnp.sum((batch["token_labels"] != IGNORE_LABEL).astype(jnp.float32))


_WEIGHTS = ("example_weights",)
# Original BERT's epsilon: a batch without masked tokens gives 0, not NaN.
MLM = Term("mlm", _mlm_metrics, _sum_of("mlm_weights", MLM_DENOMINATOR_EPS),
           outputs=("mlm_logits",), features=("mlm_targets", "mlm_weights"))
NSP = Term("nsp", _nsp_metrics, _examples, outputs=("nsp_logits",),
           features=("nsp_labels",) + _WEIGHTS)
# ALBERT's sentence-order prediction: NSP's loss on swapped pairs, logged as sop/*.
SOP = dataclasses.replace(NSP, prefix="sop")
SEQ2SEQ = Term("seq2seq", _seq2seq_metrics, _sum_of("decoder_loss_weights"),
               outputs=("logits",), features=("decoder_target_tokens", "decoder_loss_weights"),
               options=("z_loss",))
# SpanBERT's span boundary objective over the 'span' masking's slots; its
# normaliser has no epsilon: a batch without a scorable span adds 0 (_safe_div).
SBO = Term("sbo", _sbo_metrics, _sbo_count, outputs=("sbo_logits",),
           features=("mlm_targets", "mlm_weights", "mlm_positions", "sbo_left_positions",
                     "sbo_right_positions", "encoder_input_tokens"))
_CLASSIFIED = ("classifier_labels", "classifier_weights") + _WEIGHTS

register(Objective("mlm", "mlm", (MLM,), data=("mlm",)))
register(Objective("mlm_nsp", "pretraining", (MLM, NSP), data=("mlm_nsp",)))
register(Objective("mlm_sop", "pretraining", (MLM, SOP), data=("mlm_sop",)))
# SpanBERT: MLM + SBO (weight 1 each, the reference's --pair-loss-weight 1.0)
# on full single segments; needs data.masking='span' for the boundaries.
register(dataclasses.replace(combine("mlm_sbo", "mlm_sbo", (MLM, 1.0), (SBO, 1.0), data=("mlm",)),
                             masking=("span",)))
register(Objective("span_corruption", "seq2seq", (SEQ2SEQ,), data=("span_corruption",)))
# Fine-tuning (tasks/adapters.py names them).
register(Objective("seq2seq", "seq2seq", (SEQ2SEQ,)))
register(Objective("classification", "sequence_classification", (
    Term("cls", _classification_metrics, _classified, ("logits",), _CLASSIFIED),)))
register(Objective("regression", "sequence_classification", (
    Term("cls", _regression_metrics, _classified, ("logits",), _CLASSIFIED),)))
register(Objective("token_classification", "token_classification", (
    Term("token", _token_metrics, _scored_tokens, ("logits",), ("token_labels",)),)))
register(Objective("question_answering", "question_answering", (
    Term("span", _span_metrics, _examples, ("start_logits", "end_logits"),
         ("start_positions", "end_positions") + _WEIGHTS),)))
