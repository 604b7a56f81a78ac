"""The objective registry: what each training objective computes and how it is summed.

`OBJECTIVES` maps a name to an `Objective`: the model task it trains, and
its weighted `Term`s, each saying which model outputs and batch features it
reads, its whole-batch normaliser and its summable metrics under its own
prefix ('mlm/*', 'nsp/*', 'sop/*', 'rtd/*', 'seq2seq/*', 'cls/*', ...). The
train and eval steps (steps.py) call only `Objective.normalizers / metrics /
loss`; `register` adds one, `combine` sums several with weights (MLM + SBO,
MLM + 50 x RTD, distillation's three terms). The losses themselves, and
`summarize`, are in losses.py.
"""
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from bert_jax import losses
from bert_jax.losses import MLM_DENOMINATOR_EPS, safe_div
from bert_jax.models.configs import SBO_MAX_TARGETS

Array = jax.Array
Metrics = dict[str, Array]

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
    teacher: its model holds a frozen teacher under params['teacher']
      (distillation): the run loads it from `config.train.teacher` and the
      optimizer keeps it frozen, with no state.
  """
  name: str
  model_task: str
  terms: tuple[Term, ...]
  data: tuple[str, ...] = ()
  masking: tuple[str, ...] = ()
  teacher: bool = False

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
      term = safe_div(metrics[f"{t.prefix}/loss_sum"], normalizers[t.prefix])
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
  return losses.mlm_loss(outputs["mlm_logits"], batch, prefix=prefix)[1]


def _nsp_metrics(outputs, batch, *, prefix):
  return losses.nsp_loss(outputs["nsp_logits"], batch["nsp_labels"], example_weights(batch),
                         prefix=prefix)[1]


def _seq2seq_metrics(outputs, batch, *, prefix, z_loss=0.0, label_smoothing=0.0):
  return losses.seq2seq_loss(outputs["logits"], batch["decoder_target_tokens"],
                             batch["decoder_loss_weights"], z_loss=z_loss,
                             label_smoothing=label_smoothing, prefix=prefix)[1]


def _classification_metrics(outputs, batch, *, prefix):
  # Filler rows carry label -1: any valid index will do under weight 0.
  labels = jnp.maximum(batch["classifier_labels"], 0)
  return losses.classification_loss(outputs["logits"], labels, classifier_weights(batch),
                                    prefix=prefix)[1]


def _regression_metrics(outputs, batch, *, prefix):
  return losses.classification_loss(outputs["logits"],
                                    batch["classifier_labels"].astype(jnp.float32),
                                    classifier_weights(batch), prefix=prefix)[1]


def _token_metrics(outputs, batch, *, prefix):
  return losses.token_classification_loss(outputs["logits"], batch["token_labels"],
                                          ignore_label=IGNORE_LABEL, prefix=prefix)[1]


def _crf_metrics(outputs, batch, *, prefix):
  return losses.crf_loss(outputs["logits"], batch["token_labels"], outputs["transitions"],
                         outputs["start_transitions"], outputs["end_transitions"],
                         example_weights(batch), ignore_label=IGNORE_LABEL, prefix=prefix)[1]


def _ner_span_metrics(outputs, batch, *, prefix):
  # Every valid span (label != -100) is scored: 0 = not an entity, c = type c.
  return losses.token_classification_loss(outputs["span_logits"], batch["span_labels"],
                                          ignore_label=IGNORE_LABEL, prefix=prefix)[1]


def _scored_spans(batch):
  return jnp.sum((batch["span_labels"] != IGNORE_LABEL).astype(jnp.float32))


def _span_metrics(outputs, batch, *, prefix):
  return losses.span_loss(outputs["start_logits"], outputs["end_logits"],
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
  return losses.categorical(outputs["sbo_logits"], batch["mlm_targets"], sbo_weights(batch),
                            prefix)[1]


def _sbo_count(batch):
  return jnp.sum(sbo_weights(batch))


def real_tokens(batch: Mapping[str, Array]) -> Array:
  """[batch, length] float32, 1.0 for real tokens: segment ids > 0 when given, else ids != 0."""
  if "encoder_segment_ids" in batch:
    return (batch["encoder_segment_ids"] > 0).astype(jnp.float32)
  return (batch["encoder_input_tokens"] != 0).astype(jnp.float32)


def _rtd_metrics(outputs, batch, *, prefix):
  return losses.rtd_loss(outputs["rtd_logits"], outputs["rtd_labels"], real_tokens(batch),
                         prefix=prefix)[1]


def _real_token_count(batch):
  return jnp.sum(real_tokens(batch))


# DistilBERT's softmax temperature (Sanh et al. 2019; the reference distiller's default).
DISTILLATION_TEMPERATURE = 2.0


def _kd_metrics(outputs, batch, *, prefix):
  return losses.distillation_kl(outputs["mlm_logits"], outputs["teacher_mlm_logits"],
                                batch["mlm_weights"], temperature=DISTILLATION_TEMPERATURE,
                                prefix=prefix)[1]


def _cos_metrics(outputs, batch, *, prefix):
  return losses.cosine_loss(outputs["hidden"], outputs["teacher_hidden"], real_tokens(batch),
                            prefix=prefix)[1]


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
               options=("z_loss", "label_smoothing"))
# SpanBERT's span boundary objective over the 'span' masking's slots; its
# normaliser has no epsilon: a batch without a scorable span adds 0 (safe_div).
SBO = Term("sbo", _sbo_metrics, _sbo_count, outputs=("sbo_logits",),
           features=("mlm_targets", "mlm_weights", "mlm_positions", "sbo_left_positions",
                     "sbo_right_positions", "encoder_input_tokens"))
_CLASSIFIED = ("classifier_labels", "classifier_weights") + _WEIGHTS
# ELECTRA's discriminator over every real token (the generator makes its labels).
RTD = Term("rtd", _rtd_metrics, _real_token_count, outputs=("rtd_logits", "rtd_labels"),
           features=("encoder_input_tokens", "encoder_segment_ids"))

register(Objective("mlm", "mlm", (MLM,), data=("mlm",)))
register(Objective("mlm_nsp", "pretraining", (MLM, NSP), data=("mlm_nsp",)))
register(Objective("mlm_sop", "pretraining", (MLM, SOP), data=("mlm_sop",)))
# SpanBERT: MLM + SBO (weight 1 each, the reference's --pair-loss-weight 1.0)
# on full single segments; needs data.masking='span' for the boundaries.
register(dataclasses.replace(combine("mlm_sbo", "mlm_sbo", (MLM, 1.0), (SBO, 1.0), data=("mlm",)),
                             masking=("span",)))
# ELECTRA: the generator's MLM (logged as mlm/*) + 50 x replaced-token
# detection (rtd/*), the reference's gen_weight 1.0 and disc_weight 50.0.
register(combine("electra", "electra", (MLM, 1.0), (RTD, 50.0), data=("mlm",)))
# DistilBERT: 5 x T^2 KL(teacher || student) at the masked slots + 2 x the
# student's MLM + 1 x the hidden-state cosine loss over the real tokens (the
# reference's alpha_ce, alpha_mlm, alpha_cos), logged as kd/*, mlm/*, cos/*.
KD = Term("kd", _kd_metrics, _sum_of("mlm_weights"), outputs=("mlm_logits", "teacher_mlm_logits"),
          features=("mlm_weights",))
COS = Term("cos", _cos_metrics, _real_token_count, outputs=("hidden", "teacher_hidden"),
           features=("encoder_input_tokens", "encoder_segment_ids"))
register(dataclasses.replace(
    combine("distillation", "distillation", (KD, 5.0), (MLM, 2.0), (COS, 1.0), data=("mlm",)),
    teacher=True))
register(Objective("span_corruption", "seq2seq", (SEQ2SEQ,), data=("span_corruption",)))
register(Objective("denoising", "seq2seq", (SEQ2SEQ,), data=("denoising",)))  # BART
# Fine-tuning (tasks/adapters.py names them).
register(Objective("seq2seq", "seq2seq", (SEQ2SEQ,)))
register(Objective("classification", "sequence_classification", (
    Term("cls", _classification_metrics, _classified, ("logits",), _CLASSIFIED),)))
register(Objective("regression", "sequence_classification", (
    Term("cls", _regression_metrics, _classified, ("logits",), _CLASSIFIED),)))
register(Objective("token_classification", "token_classification", (
    Term("token", _token_metrics, _scored_tokens, ("logits",), ("token_labels",)),)))
# NER heads (config.finetune.ner_head): a linear-chain CRF's negative
# log-likelihood per scored token (crf/*), and cross entropy over every span
# of up to finetune.max_span_length words (ner_span/*; 'span' is SQuAD's).
register(Objective("crf_token_classification", "crf_token_classification", (
    Term("crf", _crf_metrics, _scored_tokens,
         ("logits", "transitions", "start_transitions", "end_transitions"),
         ("token_labels",) + _WEIGHTS),)))
register(Objective("span_classification", "span_classification", (
    Term("ner_span", _ner_span_metrics, _scored_spans, ("span_logits",), ("span_labels",)),)))
register(Objective("question_answering", "question_answering", (
    Term("span", _span_metrics, _examples, ("start_logits", "end_logits"),
         ("start_positions", "end_positions") + _WEIGHTS),)))
