"""Knowledge distillation (DistilBERT, Sanh et al. 2019): a student and a frozen teacher.

`DistillationModel` (the BERT family's 'distillation' task) runs both
masked LMs on the same masked batch in one apply, so one jitted step
computes the teacher's targets and the student's update:

  params['encoder'], params['mlm']   the student (a BERT-family masked LM;
                                     fine-tuning carries its 'encoder' over)
  params['teacher']                  the teacher's encoder and MLM head, as
                                     its own BertForMaskedLM names them

The teacher runs without dropout and under stop_gradient; the objective
('distillation') freezes it in the optimizer, so it gets neither updates nor
optimizer state, while its parameters are sharded like the student's. Its
config (`teacher`) comes from the checkpoint named by `config.train.teacher`.

Outputs: {'mlm_logits' (student), 'teacher_mlm_logits' ([batch, n, vocab]
at `mlm_positions`, or every position without them), 'hidden',
'teacher_hidden' ([batch, length, hidden], the final hidden states)}.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import bert
from bert_jax.models.configs import BertConfig

Array = jax.Array


def every_other_layer(teacher_layers: int, student_layers: int) -> list[int]:
  """The teacher layers a student starts from, evenly spread and keeping both ends.

  round(i * (L - 1) / (n - 1)) for student layer i of n: for 12 -> 6 that is
  DistilBERT's [0, 2, 4, 7, 9, 11] (the reference extraction script's
  choice); a 1-layer student takes layer 0.
  """
  if not 0 < student_layers <= teacher_layers:
    raise ValueError(f"a student needs 1 to {teacher_layers} layers (the teacher's), got "
                     f"{student_layers}")
  if student_layers == 1:
    return [0]
  step = (teacher_layers - 1) / (student_layers - 1)
  return [int(round(i * step + 1e-9)) for i in range(student_layers)]


def _masked_lm(config: BertConfig, tokens, type_ids, segment_ids, positions, mask,
               mlm_positions, enable_dropout) -> tuple[Array, Array]:
  """(hidden [batch, length, hidden], MLM logits) of an encoder + MLM head named
  'encoder' and 'mlm' in the calling module (called from a compact method)."""
  encoder = bert.BertEncoder(config, add_pooler=False, name="encoder")
  hidden, _ = encoder(tokens, encoder_type_ids=type_ids, encoder_segment_ids=segment_ids,
                      encoder_positions=positions, encoder_mask=mask,
                      enable_dropout=enable_dropout)
  gathered = hidden if mlm_positions is None else jnp.take_along_axis(
      hidden, mlm_positions[:, :, None].astype(jnp.int32), axis=1)  # [batch, n, hidden]
  return hidden, bert.MlmHead(config, name="mlm")(gathered, encoder)


class _Teacher(nn.Module):
  """The teacher's masked LM, its parameters under 'teacher/encoder' and 'teacher/mlm'."""
  config: BertConfig

  @nn.compact
  def __call__(self, *inputs):
    return _masked_lm(self.config, *inputs, enable_dropout=False)


class DistillationModel(nn.Module):
  """Student + frozen teacher (objective 'distillation').

  Attributes:
    config: the student's BertConfig.
    teacher: the teacher's BertConfig (same vocabulary and hidden size).
  """
  config: BertConfig
  teacher: BertConfig | None = None

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               enable_dropout=False) -> dict[str, Array]:
    if self.teacher is None:
      raise ValueError("the distillation model needs its teacher's config "
                       "(config.train.teacher names the checkpoint)")
    inputs = (encoder_input_tokens, encoder_type_ids, encoder_segment_ids, encoder_positions,
              encoder_mask, mlm_positions)
    # The student keeps the task models' parameter names ('encoder', 'mlm').
    hidden, logits = _masked_lm(self.config, *inputs, enable_dropout=enable_dropout)
    # The teacher: evaluation mode (no dropout), and a constant of the loss.
    t_hidden, t_logits = _Teacher(self.teacher, name="teacher")(*inputs)
    return {"mlm_logits": logits, "hidden": hidden,
            "teacher_mlm_logits": jax.lax.stop_gradient(t_logits),
            "teacher_hidden": jax.lax.stop_gradient(t_hidden)}
