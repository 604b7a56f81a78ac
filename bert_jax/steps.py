"""Training state and the pure train / eval steps.

`TrainState` is a plain pytree (step, params, opt_state, rng) with no
functions inside, so it can be sharded, donated and checkpointed as is; the
model and the optimizer travel as static arguments of the steps (flax lm1b
style). The steps are module-level functions; `make_train_step` and
`make_eval_step` jit them with explicit shardings, the modern form of pjit.

The objective is a record of `objectives.OBJECTIVES` (or its name): the step
asks it for the whole batch's normalisers, each microbatch's summable
metrics and the weighted loss, and knows nothing else about it. Rows
weighted 0 (`example_weights` / `classifier_weights`, or all-padding filler
rows) count for nothing, so a short last batch may be padded.

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

# Model arguments that are flags, never batch features.
_NON_FEATURE_ARGS = ("self", "enable_dropout", "decode")


@flax.struct.dataclass
class TrainState:
  """Everything a training run updates, as one pytree.

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params: the model's 'params' collection (unboxed, float32).
    opt_state: the optax state of `tx.init(params)`.
    rng: raw uint32 threefry PRNG key; the dropout key of step s derives
      from fold_in(rng, s) (`dropout_key`), so a run resumed at step s draws
      the same masks as an uninterrupted one, whatever the masks' PRNG.
  """
  step: Array
  params: Any
  opt_state: Any
  rng: Array


# ------------------------------------------------------------------ model I/O


def model_input_names(model: nn.Module) -> tuple[str, ...]:
  """The batch features `model.__call__` takes, by argument name."""
  names = inspect.signature(type(model).__call__).parameters
  return tuple(k for k in names if k not in _NON_FEATURE_ARGS)


def model_inputs(model: nn.Module, batch: Batch) -> dict[str, Array]:
  """The batch features that `model.__call__` takes, by argument name.

  The batch contract uses the models' argument names (encoder_input_tokens,
  mlm_positions, decoder_input_tokens, ...), so any BERT or T5 model is fed
  from the same dict; labels and weights are left for the loss.
  """
  return {k: batch[k] for k in model_input_names(model) if k in batch}


def init_shapes(features: tuple[str, ...]) -> dict[str, jax.ShapeDtypeStruct]:
  """int32 [1, 1] shapes of the features a model's parameters are traced with.

  No parameter shape depends on a sequence length, so one token is enough
  (`models.Family.init_features` names the features).
  """
  return {name: jax.ShapeDtypeStruct((1, 1), jnp.int32) for name in features}


def _raw_key(rng: Any) -> Array:
  """A raw uint32 key from an int seed, a raw key or a typed key."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def dummy_batch(example_batch_shapes: Mapping[str, Any]) -> dict[str, Array]:
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
    inputs = model_inputs(model, dummy_batch(example_batch_shapes))
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
    inputs = model_inputs(model, dummy_batch(example_batch_shapes))
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


def _resolve(objective: str | objectives.Objective) -> objectives.Objective:
  """A registry name or an Objective record -> the record."""
  if isinstance(objective, objectives.Objective):
    return objective
  return objectives.get(objective)


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


# ------------------------------------------------------------- dropout PRNG

# The generators dropout masks may be drawn with. threefry2x32 (JAX's
# default) is a counter-based hash: bit-identical on every backend and mesh,
# but many integer ops per random word. rbg / unsafe_rbg use the
# accelerator's hardware generator (XLA RngBitGenerator), far cheaper on TPU
# where t5x makes it the default. unsafe_rbg also derives split / fold_in
# keys cheaply, without threefry's statistical guarantees between them.
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def resolve_prng_impl(name: str, platform: str) -> str:
  """The PRNG of config value `name` on `platform`: 'auto' is rbg on TPU, else threefry2x32."""
  if name == "auto":
    return "rbg" if platform == "tpu" else "threefry2x32"
  if name not in PRNG_IMPLS:
    raise ValueError(f"unknown PRNG implementation {name!r}; choose 'auto' or one of "
                     f"{list(PRNG_IMPLS)}")
  return name


def dropout_key(step_rng: Array, index: Array, impl: str = "threefry2x32") -> Array:
  """The key of microbatch `index` of a step, in the PRNG `impl`.

  The state keeps a threefry key whatever `impl` is, so checkpoints do not
  depend on it; the key of another impl is seeded from threefry bits of
  fold_in(step_rng, index). The masks are thus a pure function of (state.rng,
  step, index) -- resume stays exact -- and cost the hardware generator's
  price, since seeding takes one small threefry draw per step.
  """
  key = jax.random.fold_in(step_rng, index)
  if impl == "threefry2x32":
    return key  # the raw key, unchanged: the masks of runs before this option
  width = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return jax.random.wrap_key_data(jax.random.bits(key, width, jnp.uint32), impl=impl)


# ----------------------------------------------------------------- the steps


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, objective: str | objectives.Objective,
               num_microbatches: int = 1,
               z_loss: float = 0.0, label_smoothing: float = 0.0,
               schedule: Callable[[Array], Array] | None = None,
               prng_impl: str = "threefry2x32") -> tuple[TrainState, Metrics]:
  """One optimizer update on `batch`, optionally accumulated over microbatches.

  Args:
    state: the current TrainState.
    batch: features and targets of the objective (the batch contract).
    model: the flax model (static).
    tx: the optimizer (static).
    objective: an `objectives.Objective` or its registry name.
    num_microbatches: split the batch into this many microbatches, scanned in
      sequence with gradients summed; the update equals the full-batch one.
    z_loss: z-loss coefficient (the seq2seq term's option).
    label_smoothing: the seq2seq term's label smoothing (training only: the
      eval step reports the plain cross entropy, as fairseq's nll_loss).
    schedule: the learning-rate schedule, to report `learning_rate`.
    prng_impl: the PRNG of the dropout masks and samples (one of PRNG_IMPLS;
      `dropout_key`).

  Returns:
    (new state, metrics): the objectives' sums ('<p>/loss_sum', '<p>/count',
    '<p>/correct', ...), plus per-step values 'loss' (the optimised scalar;
    the caller must check it is finite), 'grad_norm' (global norm before
    clipping) and, with a schedule, 'learning_rate' of this update.
  """
  objective = _resolve(objective)
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  normalizers = objective.normalizers(batch)
  step_rng = jax.random.fold_in(state.rng, state.step)

  def grads_of(micro: Batch, index: Array):
    dropout_rng = dropout_key(step_rng, index, prng_impl)
    # 'sample': models that draw (ELECTRA's generator samples) get their own stream.
    rngs = {"dropout": dropout_rng, "sample": jax.random.fold_in(dropout_rng, 1)}

    def loss_fn(params):
      outputs = model.apply({"params": params}, **model_inputs(model, micro),
                            enable_dropout=True, rngs=rngs)
      metrics = objective.metrics(outputs, micro, z_loss=z_loss,
                                  label_smoothing=label_smoothing)
      return objective.loss(metrics, normalizers), metrics

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


def eval_step(params: Any, batch: Batch, *, model: nn.Module,
              objective: str | objectives.Objective, z_loss: float = 0.0) -> Metrics:
  """Summable metrics of `batch` without dropout (sum them, then `losses.summarize`).

  Args:
    params: the model's params (TrainState.params).
    batch: features and targets (the batch contract); all-padding rows
      count for nothing, so a short last batch may be padded.
    model: the flax model (static).
    objective: an `objectives.Objective` or its registry name.
    z_loss: z-loss coefficient included in the seq2seq loss sum.

  Returns:
    The objectives' sums: '<p>/loss_sum', '<p>/count', '<p>/correct', ...
  """
  objective = _resolve(objective)
  outputs = model.apply({"params": params}, **model_inputs(model, batch))
  return objective.metrics(outputs, batch, z_loss=z_loss)


# --------------------------------------------------------------- jit wrappers


def in_context(fn: Callable, mesh: Mesh, rules) -> Callable:
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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    objective: str | objectives.Objective,
                    state_shardings: TrainState, batch_sharding: NamedSharding, *,
                    rules, num_microbatches: int = 1, z_loss: float = 0.0,
                    label_smoothing: float = 0.0,
                    schedule: Callable[[Array], Array] | None = None,
                    prng_impl: str = "threefry2x32",
                    compiler_options: dict[str, Any] | None = None) -> Callable:
  """`train_step` jitted with explicit shardings and the state donated.

  Args:
    model, tx, objective, num_microbatches, z_loss, label_smoothing, schedule,
      prng_impl: see `train_step`.
    state_shardings: from `create_sharded_state`.
    batch_sharding: sharding of every batch feature (`sharding.batch_sharding`).
    rules: the logical-axis rules the state was created with.
    compiler_options: XLA options of this jit (e.g. TPU scheduler flags; the
      tests lower CPU optimisation to compile faster).

  Returns:
    A jitted `(state, batch) -> (state, metrics)`; the input state's buffers
    are donated (reused for the output), so the caller must drop it.
  """
  mesh = batch_sharding.mesh
  step = functools.partial(train_step, model=model, tx=tx, objective=_resolve(objective),
                           num_microbatches=num_microbatches, z_loss=z_loss,
                           label_smoothing=label_smoothing, schedule=schedule,
                           prng_impl=prng_impl)
  return jax.jit(in_context(step, mesh, rules),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,), compiler_options=compiler_options)


def make_eval_step(model: nn.Module, objective: str | objectives.Objective, param_shardings: Any,
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
  mesh = batch_sharding.mesh
  step = functools.partial(eval_step, model=model, objective=_resolve(objective),
                           z_loss=z_loss)
  return jax.jit(in_context(step, mesh, rules),
                 in_shardings=(param_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()), compiler_options=compiler_options)
