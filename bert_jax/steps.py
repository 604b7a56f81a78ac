"""Training state and the pure train / eval steps.

`TrainState` is a plain pytree (step, params, opt_state, rng) with no
functions inside, so it can be sharded, donated and checkpointed as is; the
model and the optimizer travel as static arguments of the steps (flax lm1b
style). The steps are module-level functions; `make_train_step` and
`make_eval_step` jit them with explicit shardings, the modern form of pjit.

Objectives (the batch contract of DESIGN.md):
  mlm              masked LM on the gathered `mlm_positions` (RoBERTa style),
  mlm_nsp          masked LM + next-sentence prediction on `nsp_labels`
                   (ALBERT's sentence-order prediction is the same loss),
  span_corruption  T5 seq2seq loss on `decoder_target_tokens`, optional z-loss.
Fine-tuning objectives (heads of models/bert.py, losses of objectives.py):
  seq2seq               span_corruption's loss on a task cast as text (T5),
  classification        softmax CE of `logits` on `classifier_labels` (GLUE),
  regression            MSE of the single `logits` column on float
                        `classifier_labels` (STS-B),
  token_classification  per-token CE on `token_labels`, -100 ignored (NER),
  question_answering    (CE(start) + CE(end)) / 2 on `start_positions` /
                        `end_positions` (SQuAD).
  Rows weighted 0 (`classifier_weights`, or all-padding filler rows) count
  for nothing, so a short last batch may be padded to the batch size.

Each loss is a sum divided by a normaliser that depends on the batch only
(masked tokens, scored examples, target tokens). The step computes the
normalisers from the whole batch first, so with gradient accumulation every
microbatch contributes sum_i / total and the accumulated gradient is exactly
the large-batch gradient -- not the mean of per-microbatch means, which
would over-weight microbatches with few masked tokens.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bert_jax import objectives
from bert_jax import optim
from bert_jax import sharding

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, Array]

OBJECTIVES = ("mlm", "mlm_nsp", "span_corruption", "seq2seq", "classification", "regression",
              "token_classification", "question_answering")
_SEQ2SEQ = ("span_corruption", "seq2seq")  # teacher-forced decoder cross-entropy
# The loss metrics' prefix of each fine-tuning objective.
_FINETUNE_PREFIX = {"classification": "cls", "regression": "cls",
                    "token_classification": "token", "question_answering": "span"}
# Token label that token_classification does not score (objectives' default).
_IGNORE_LABEL = -100
# Model arguments that are flags, never batch features.
_NON_FEATURE_ARGS = ("self", "enable_dropout", "decode")


@flax.struct.dataclass
class TrainState:
  """Everything a training run updates, as one pytree.

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params: the model's 'params' collection (unboxed, float32).
    opt_state: the optax state of `tx.init(params)`.
    rng: raw uint32 PRNG key; the dropout key of step s is fold_in(rng, s),
      so a run resumed at step s draws the same masks as an uninterrupted one.
  """
  step: Array
  params: Any
  opt_state: Any
  rng: Array


# ------------------------------------------------------------------ model I/O


def model_inputs(model: nn.Module, batch: Batch) -> dict[str, Array]:
  """The batch features that `model.__call__` takes, by argument name.

  The batch contract uses the models' argument names (encoder_input_tokens,
  mlm_positions, decoder_input_tokens, ...), so any BERT or T5 model is fed
  from the same dict; labels and weights are left for the loss.
  """
  names = inspect.signature(type(model).__call__).parameters
  return {k: batch[k] for k in names if k in batch and k not in _NON_FEATURE_ARGS}


def _raw_key(rng: Any) -> Array:
  """A raw uint32 key from an int seed, a raw key or a typed key."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def _dummy_batch(example_batch_shapes: Mapping[str, Any]) -> dict[str, Array]:
  """Zeros of the given features with batch size 1 (parameter shapes ignore it)."""
  return {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype)
          for k, v in example_batch_shapes.items()}


def _unbox(tree: Any) -> Any:
  """Strips flax partitioning boxes without adding sharding constraints."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _as_float32(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _boxed_params(model: nn.Module, example_batch_shapes: Mapping[str, Any]) -> Any:
  """Abstract params of `model`, still boxed with their logical axis names."""
  def init(rng):
    inputs = model_inputs(model, _dummy_batch(example_batch_shapes))
    return model.init({"params": rng, "dropout": rng}, **inputs)["params"]
  # No rules here: activation constraints on a batch of 1 would not divide.
  with nn.logical_axis_rules(()):
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def param_shapes(model: nn.Module, example_batch_shapes: Mapping[str, Any]) -> Any:
  """Unboxed float32 `jax.ShapeDtypeStruct`s of the params (e.g. for `make_optimizer`).

  Args:
    model: a flax model taking batch features by name.
    example_batch_shapes: feature name -> anything with .shape and .dtype.

  Returns:
    The params tree (without the 'params' key) of ShapeDtypeStructs.
  """
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
      _unbox(_boxed_params(model, example_batch_shapes)))


# ---------------------------------------------------------------- state init


def _dict_path(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a tree path (a parameter's own path)."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(str(k.key))
  return tuple(reversed(keys))


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an optimizer state: leaves shaped like a param follow that param.

  Adam's mu/nu (and any state that mirrors the params tree) end in the
  parameter's dict path; such a leaf with the parameter's shape gets the
  parameter's sharding. Everything else (step counts, the recorded grad
  norm, Adafactor's factored row/column statistics) is small and replicated,
  explicitly: with several processes orbax refuses host-local scalars.

  Args:
    abstract_opt_state: `jax.eval_shape(tx.init, params)`.
    abstract_params: the params tree (arrays or ShapeDtypeStructs).
    param_shardings: NamedShardings shaped like the params.
    mesh: the mesh of the replicated shardings.

  Returns:
    A tree of NamedShardings shaped like the optimizer state.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, leaf), s in zip(flat_params, jax.tree.leaves(param_shardings)):
    by_path[_dict_path(path)] = (tuple(leaf.shape), s)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _dict_path(path)
    for start in range(len(keys)):  # longest suffix first: wrappers add dict levels
      shape, s = by_path.get(keys[start:], (None, None))
      if s is not None:
        return s if shape == tuple(leaf.shape) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             example_batch_shapes: Mapping[str, Any]) -> Callable[[Array], TrainState]:
  """key -> a fresh TrainState (float32 params whatever the compute dtype)."""
  def init_fn(key):
    init_key, state_key = jax.random.split(key)
    inputs = model_inputs(model, _dummy_batch(example_batch_shapes))
    params = model.init({"params": init_key, "dropout": init_key}, **inputs)["params"]
    params = _as_float32(_unbox(params))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_key)
  return init_fn


def abstract_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                           example_batch_shapes: Mapping[str, Any], mesh: Mesh, rules
                           ) -> tuple[TrainState, TrainState]:
  """The TrainState's shapes and shardings, without computing anything.

  Restoring a checkpoint needs exactly this: orbax reads each array straight
  into the shards of the CURRENT mesh (which may differ from the one that
  saved it), so a resumed run never materialises a throw-away init.

  Args:
    model, tx, example_batch_shapes, mesh, rules: see `create_sharded_state`.

  Returns:
    (abstract, shardings): a TrainState of `jax.ShapeDtypeStruct`s that
    carry their sharding, and the same tree of NamedShardings.
  """
  boxed = _boxed_params(model, example_batch_shapes)
  param_shardings = sharding.logical_to_sharding(boxed, mesh, rules)
  with nn.logical_axis_rules(()):
    abstract = jax.eval_shape(_init_fn(model, tx, example_batch_shapes),
                              jax.random.PRNGKey(0))
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(
      step=replicated, params=param_shardings, rng=replicated,
      opt_state=opt_state_shardings(abstract.opt_state, abstract.params, param_shardings,
                                    mesh))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                         example_batch_shapes: Mapping[str, Any], mesh: Mesh, rules,
                         rng: Any, *, compiler_options: dict[str, Any] | None = None
                         ) -> tuple[TrainState, TrainState]:
  """A fresh TrainState created directly in its sharded layout.

  eval_shape of the init gives the logical axis names of every parameter;
  `sharding.logical_to_sharding` maps them onto the mesh; the optimizer
  state follows the params (`opt_state_shardings`); then one jitted init
  with those out_shardings materialises each shard on its own device, so no
  host ever holds the full model.

  Args:
    model: flax model (BERT-family or T5) whose __call__ takes batch features.
    tx: the optimizer, e.g. from `optim.make_optimizer`.
    example_batch_shapes: feature name -> object with .shape/.dtype (a batch
      or its ShapeDtypeStructs); only trailing dimensions matter.
    mesh: the ('data', 'fsdp', 'tensor') mesh.
    rules: logical-axis rules, e.g. `sharding.get_rules('fsdp')`.
    rng: int seed or PRNG key; split into the init key and the state's rng.
    compiler_options: XLA options for this compilation (see `make_train_step`).

  Returns:
    (state, state_shardings): float32 params whatever the model's compute
    dtype, and a TrainState of NamedShardings for jit in/out_shardings.
  """
  _, shardings = abstract_sharded_state(model, tx, example_batch_shapes, mesh, rules)
  with nn.logical_axis_rules(()):
    state = jax.jit(_init_fn(model, tx, example_batch_shapes), out_shardings=shardings,
                    compiler_options=compiler_options)(_raw_key(rng))
  return state, shardings


# ------------------------------------------------------------------ the loss


def _check_objective(objective: str) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")


def _example_weights(batch: Batch) -> Array:
  """`example_weights` when the batch has them (fine-tuning batches, see
  tasks/batching.pad_batch), else 1.0 for rows with any non-0 token: filler
  rows of pretraining batches are all padding id 0."""
  if "example_weights" in batch:
    return batch["example_weights"].astype(jnp.float32)
  return jnp.any(batch["encoder_input_tokens"] != 0, axis=-1).astype(jnp.float32)


def _classifier_weights(batch: Batch) -> Array:
  """Per-example weights of the classification objectives (0.0 for filler rows)."""
  if "classifier_weights" in batch:
    return batch["classifier_weights"].astype(jnp.float32)
  return _example_weights(batch)


def _finetune_metrics(objective: str, outputs: Any, batch: Batch) -> Metrics:
  """Summable metrics of a fine-tuning objective; filler rows weigh 0."""
  prefix = _FINETUNE_PREFIX[objective]
  if objective == "classification":
    # Filler rows carry label -1: any valid index will do under weight 0.
    labels = jnp.maximum(batch["classifier_labels"], 0)
    _, metrics = objectives.classification_loss(outputs["logits"], labels,
                                                _classifier_weights(batch), prefix=prefix)
  elif objective == "regression":
    _, metrics = objectives.classification_loss(
        outputs["logits"], batch["classifier_labels"].astype(jnp.float32),
        _classifier_weights(batch), prefix=prefix)
  elif objective == "token_classification":
    _, metrics = objectives.token_classification_loss(outputs["logits"], batch["token_labels"],
                                                      prefix=prefix)
  else:
    _, metrics = objectives.span_loss(
        outputs["start_logits"], outputs["end_logits"],
        jnp.maximum(batch["start_positions"], 0), jnp.maximum(batch["end_positions"], 0),
        _example_weights(batch), prefix=prefix)
  return metrics


def _finetune_normalizer(objective: str, batch: Batch) -> Array:
  """Scored examples (tokens for NER) of the whole batch."""
  if objective in ("classification", "regression"):
    return jnp.sum(_classifier_weights(batch))
  if objective == "token_classification":
    return jnp.sum((batch["token_labels"] != _IGNORE_LABEL).astype(jnp.float32))
  return jnp.sum(_example_weights(batch))


def _normalizers(objective: str, batch: Batch) -> dict[str, Array]:
  """Loss denominators of the WHOLE batch (they do not depend on the params)."""
  if objective in _FINETUNE_PREFIX:
    return {_FINETUNE_PREFIX[objective]: _finetune_normalizer(objective, batch)}
  if objective in _SEQ2SEQ:
    return {"seq2seq": jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))}
  # Original BERT's epsilon: a batch without masked tokens gives 0, not NaN.
  out = {"mlm": jnp.sum(batch["mlm_weights"].astype(jnp.float32))
                + objectives.MLM_DENOMINATOR_EPS}
  if objective == "mlm_nsp":
    out["nsp"] = jnp.sum(_example_weights(batch))
  return out


def _objective_metrics(objective: str, outputs: Any, batch: Batch, z_loss: float) -> Metrics:
  """Summable metrics (loss_sum, count, correct, ...) of one (micro)batch."""
  if objective in _FINETUNE_PREFIX:
    return _finetune_metrics(objective, outputs, batch)
  if objective in _SEQ2SEQ:
    _, metrics = objectives.seq2seq_loss(outputs, batch["decoder_target_tokens"],
                                         batch["decoder_loss_weights"], z_loss=z_loss)
    return metrics
  _, metrics = objectives.mlm_loss(outputs["mlm_logits"], batch)
  if objective == "mlm_nsp":
    _, nsp = objectives.nsp_loss(outputs["nsp_logits"], batch["nsp_labels"],
                                 _example_weights(batch))
    metrics.update(nsp)
  return metrics


def _scaled_loss(metrics: Metrics, normalizers: Mapping[str, Array]) -> Array:
  """sum over objectives of loss_sum / whole-batch normaliser (0 when it is 0)."""
  total = jnp.zeros([], jnp.float32)
  for prefix, denominator in normalizers.items():
    safe = jnp.where(denominator > 0, denominator, 1.0)
    total += jnp.where(denominator > 0, metrics[f"{prefix}/loss_sum"] / safe, 0.0)
  return total


def _split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, Array]:
  """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...], strided.

  Microbatch i takes rows i, i + m, i + 2m, ...: each device's contiguous
  block of the batch then holds a share of every microbatch, so the split
  needs no communication.
  """
  out = {}
  for name, x in batch.items():
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch size {x.shape[0]} (feature {name!r}) is not divisible by "
                       f"num_microbatches={num_microbatches}")
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    out[name] = nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))
  return out


# ----------------------------------------------------------------- the steps


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, objective: str, num_microbatches: int = 1,
               z_loss: float = 0.0, schedule: Callable[[Array], Array] | None = None
               ) -> tuple[TrainState, Metrics]:
  """One optimizer update on `batch`, optionally accumulated over microbatches.

  Args:
    state: the current TrainState.
    batch: features and targets of the objective (the batch contract).
    model: the flax model (static).
    tx: the optimizer (static).
    objective: one of OBJECTIVES.
    num_microbatches: split the batch into this many microbatches, scanned in
      sequence with gradients summed; the update equals the full-batch one.
    z_loss: z-loss coefficient (span_corruption only).
    schedule: the learning-rate schedule, to report `learning_rate`.

  Returns:
    (new state, metrics): the objectives' sums ('<p>/loss_sum', '<p>/count',
    '<p>/correct', ...), plus per-step values 'loss' (the optimised scalar;
    the caller must check it is finite), 'grad_norm' (global norm before
    clipping) and, with a schedule, 'learning_rate' of this update.
  """
  _check_objective(objective)
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  normalizers = _normalizers(objective, batch)
  step_rng = jax.random.fold_in(state.rng, state.step)

  def grads_of(micro: Batch, index: Array):
    dropout_rng = jax.random.fold_in(step_rng, index)

    def loss_fn(params):
      outputs = model.apply({"params": params}, **model_inputs(model, micro),
                            enable_dropout=True, rngs={"dropout": dropout_rng})
      metrics = _objective_metrics(objective, outputs, micro, z_loss)
      return _scaled_loss(metrics, normalizers), metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, metrics, grads

  if num_microbatches == 1:
    loss, metrics, grads = grads_of(batch, jnp.zeros([], jnp.int32))
  else:
    micro = _split_microbatches(batch, num_microbatches)

    def accumulate(grad_sum, xs):
      loss, metrics, grads = grads_of(*xs)
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, metrics) = jax.lax.scan(
        accumulate, zeros, (micro, jnp.arange(num_microbatches, dtype=jnp.int32)))
    loss = jnp.sum(losses)
    metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  try:  # make_optimizer records the pre-clip norm over trainable params
    norm = optim.grad_norm(opt_state)
  except ValueError:
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree.leaves(grads)))  # optax.global_norm, not deprecated
  metrics = dict(metrics, loss=loss, grad_norm=norm.astype(jnp.float32))
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, objective: str,
              z_loss: float = 0.0) -> Metrics:
  """Summable metrics of `batch` without dropout (sum them, then `objectives.summarize`).

  Args:
    params: the model's params (TrainState.params).
    batch: features and targets (the batch contract); all-padding rows
      count for nothing, so a short last batch may be padded.
    model: the flax model (static).
    objective: one of OBJECTIVES.
    z_loss: z-loss coefficient included in the seq2seq loss sum.

  Returns:
    The objectives' sums: '<p>/loss_sum', '<p>/count', '<p>/correct', ...
  """
  _check_objective(objective)
  outputs = model.apply({"params": params}, **model_inputs(model, batch))
  return _objective_metrics(objective, outputs, batch, z_loss)


# --------------------------------------------------------------- jit wrappers


def _in_context(fn: Callable, mesh: Mesh, rules) -> Callable:
  """fn traced with the mesh and logical-axis rules in context.

  The models' `nn.with_logical_constraint` calls resolve their names through
  the flax rules and need an (abstract) mesh while tracing; entering both
  inside the traced function binds them to this jit, whatever context the
  caller happens to be in.
  """
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules or ()):
      return fn(*args)
  return wrapped


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, objective: str,
                    state_shardings: TrainState, batch_sharding: NamedSharding, *,
                    rules, num_microbatches: int = 1, z_loss: float = 0.0,
                    schedule: Callable[[Array], Array] | None = None,
                    compiler_options: dict[str, Any] | None = None) -> Callable:
  """`train_step` jitted with explicit shardings and the state donated.

  Args:
    model, tx, objective, num_microbatches, z_loss, schedule: see `train_step`.
    state_shardings: from `create_sharded_state`.
    batch_sharding: sharding of every batch feature (`sharding.batch_sharding`).
    rules: the logical-axis rules the state was created with.
    compiler_options: XLA options of this jit (e.g. TPU scheduler flags; the
      tests lower CPU optimisation to compile faster).

  Returns:
    A jitted `(state, batch) -> (state, metrics)`; the input state's buffers
    are donated (reused for the output), so the caller must drop it.
  """
  _check_objective(objective)
  mesh = batch_sharding.mesh
  step = functools.partial(train_step, model=model, tx=tx, objective=objective,
                           num_microbatches=num_microbatches, z_loss=z_loss,
                           schedule=schedule)
  return jax.jit(_in_context(step, mesh, rules),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,), compiler_options=compiler_options)


def make_eval_step(model: nn.Module, objective: str, param_shardings: Any,
                   batch_sharding: NamedSharding, *, rules, z_loss: float = 0.0,
                   compiler_options: dict[str, Any] | None = None) -> Callable:
  """`eval_step` jitted with explicit shardings: `(params, batch) -> metrics`.

  Args:
    model, objective, z_loss: see `eval_step`.
    param_shardings: `state_shardings.params` from `create_sharded_state`.
    batch_sharding: sharding of every batch feature.
    rules: the logical-axis rules the state was created with.
    compiler_options: XLA options of this jit.

  Returns:
    The jitted eval step; its metrics are replicated scalars.
  """
  _check_objective(objective)
  mesh = batch_sharding.mesh
  step = functools.partial(eval_step, model=model, objective=objective, z_loss=z_loss)
  return jax.jit(_in_context(step, mesh, rules),
                 in_shardings=(param_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()), compiler_options=compiler_options)
