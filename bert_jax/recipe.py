"""What a pretraining config builds: its objective, its model and its optimizer.

train.py starts a run from these; init_from.py rebuilds a finished run's
state from the config saved with its checkpoint through the same functions,
so the two cannot disagree on, say, which parameters are frozen.
"""
import ml_collections
import optax

from bert_jax import models
from bert_jax import objectives
from bert_jax import optim
from bert_jax import steps


def objective_of(config: ml_collections.ConfigDict) -> objectives.Objective:
  """The run's objective: `train.objective`, or the one named like `data.objective`."""
  return objectives.get(config.train.objective or config.data.objective)


def build_model(config: ml_collections.ConfigDict):
  """The flax model `config.family` builds for the objective's task (`config.model` fields).

  A distillation model also gets its teacher's architecture
  (`train.teacher_model`, filled in from the teacher checkpoint at start).
  """
  family = models.get(config.family)
  kwargs = {}
  if config.train.teacher_model:
    kwargs["teacher"] = family.config_from_dict(config.train.teacher_model.to_dict())
  return family.build(family.config_from_dict(config.model.to_dict()),
                      objective_of(config).model_task, **kwargs)


def make_optimizer(config: ml_collections.ConfigDict, model, init_shapes
                   ) -> tuple[optax.GradientTransformation, optim.Schedule]:
  """The run's optimizer and schedule; an objective's teacher is frozen (no state)."""
  freeze = tuple(config.optim.freeze)
  if objective_of(config).teacher:
    freeze += ("^teacher/",)
  return optim.make_optimizer(config.optim, steps.param_shapes(model, init_shapes),
                              num_steps=config.train.num_steps, freeze=freeze)
