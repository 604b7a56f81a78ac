"""Multi-task fine-tuning: one shared encoder, a head per task, batches mixed by a rule.

`multitask(config, workdir)` trains several fine-tuning tasks at once, in the
shape of finetune.py: each step draws ONE task (tasks/mixing.py: a pure
function of (seed, step) under the mixing rates), takes that task's next
batch (its own shuffled epochs, a pure function of (seed, task, epoch)) and
updates the shared encoder and that task's head. Every `eval.every_steps`
each task is scored on its own dev split(s) with its own metric (GLUE
accuracy / F1 / ..., CoNLL entity F1, SQuAD EM/F1) and reported per task;
best/ keeps the params of the best mean primary metric over the tasks.

Config (configs/multitask.py): the fine-tuning fields (defaults.finetune_config)
shared by every task, plus
  tasks.<name>   the fields of that task that differ: task, glue_task,
                 data.* (not data.tokenizer / lower_case), finetune.ner_head,
                 finetune.max_span_length, train.batch_size, eval.batch_size.
                 A misspelt field is an error naming tasks.<name>.<field>.
  mixing         rule ('proportional' | 'temperature' | 'uniform'),
                 temperature (T), cap (K; 0 = none): mixing.rates.
  train.num_steps, eval.every_steps, checkpoint.every_steps: the run's
                 length and cadences in steps (train.num_epochs is unused).

The model (`MultiTaskModel`): each task's own model (models.Family.build of
its head) over one parameter tree. The family's `carried_over` subtrees
(BERT: 'encoder') are shared -- the union over the tasks, so the pooler that
only classification reads lives there too -- and every other subtree is the
task's head under params['task_heads'][name]. A task's step applies its own
model to its view of the tree, so the encoder gets gradient from every task
and a head only from its own; the params a task does not read (other heads,
the pooler for NER) and their optimizer state stay exactly as they were, as
PyTorch's Adam skips parameters without a gradient (MT-DNN). One optimizer
(finetune's AdamW, LR schedule over the run's steps, global-norm clipping
over the step's gradient) serves the tree; its step count, which Adam's bias
correction reads, is the run's. With jit each task compiles its own step.
For T5 (and every encoder-decoder) all tasks are Text2TextTask with their
task prefixes and the whole model is shared: the mixer only interleaves batches.

Workdir: checkpoints/ (the state; its data position holds the per-task steps and
examples, recomputed on resume and checked against it, and the best record),
best/ (params), metrics.jsonl: per log line the mean loss, then per task
'train/<task>/loss' (its steps in the interval) and 'tasks/<task>/steps' /
'tasks/<task>/examples' (so far); per eval 'eval/<task>/<split>/<metric>' and
'eval/mean_primary'.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import finetune
from bert_jax import finetune_init
from bert_jax import init_from
from bert_jax import loop
from bert_jax import metrics as metrics_lib
from bert_jax import models
from bert_jax import objectives
from bert_jax import optim
from bert_jax import peft
from bert_jax import sharding
from bert_jax import steps
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError
from bert_jax.tasks import adapters
from bert_jax.tasks import batching
from bert_jax.tasks import mixing

HEADS = "task_heads"  # params[HEADS][task name]: that task's head subtrees
# What a task may set for itself; everything else is one value for the whole run.
TASK_FIELDS = ("task", "glue_task", "finetune.ner_head", "finetune.max_span_length",
               "train.batch_size", "eval.batch_size")
SHARED_DATA_FIELDS = ("data.tokenizer", "data.lower_case")


# ------------------------------------------------------------------- config


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def task_config(config, name: str) -> ml_collections.ConfigDict:
  """The fine-tuning config of task `name`: the shared fields with tasks.<name> over them."""
  base = {k: v for k, v in config.to_dict().items() if k not in ("tasks", "mixing")}
  out = ml_collections.ConfigDict(base)
  out.lock()
  for path, value in _flatten(config.tasks[name].to_dict()).items():
    key = ".".join(path)
    if not (key in TASK_FIELDS or (key.startswith("data.") and key not in SHARED_DATA_FIELDS)):
      raise ConfigError(f"tasks.{name}.{key}", "is not a per-task field; it is shared by every "
                        f"task (set config.{key}); per-task: {list(TASK_FIELDS)} and data.*")
    section = out
    for part in path[:-1]:
      section = section[part] if part in section else None
      if not isinstance(section, ml_collections.ConfigDict):
        break
    if not isinstance(section, ml_collections.ConfigDict) or path[-1] not in section:
      raise ConfigError(f"tasks.{name}.{key}", "unknown field")
    try:
      section[path[-1]] = value
    except TypeError as e:
      raise ConfigError(f"tasks.{name}.{key}", str(e)) from None
  return out


def validate(config) -> tuple[dict[str, ml_collections.ConfigDict], tuple[int, int, int]]:
  """Checks the multi-task fields and every task's config; returns those and the mesh shape."""
  if not config.tasks or not len(config.tasks.keys()):
    raise ConfigError("tasks", "empty; name at least one task (configs/multitask.py)")
  try:
    mixing.rates([1] * len(config.tasks.keys()), config.mixing.rule,
                 config.mixing.temperature, config.mixing.cap)
  except ValueError as e:
    raise ConfigError("mixing", str(e)) from None
  for key in ("train.num_steps", "checkpoint.every_steps", "log.every_steps"):
    section, field = key.split(".")
    if config[section][field] < 1:
      raise ConfigError(key, f"must be >= 1, got {config[section][field]}")
  if config.eval.every_steps < 0:
    raise ConfigError("eval.every_steps", f"must be >= 0 (0: at the end only), got "
                      f"{config.eval.every_steps}")
  if config.finetune.method != "full":
    raise ConfigError("finetune.method", f"{config.finetune.method!r}: multi-task runs "
                      "train the whole model ('full')")
  configs, shape = {}, None
  for name in sorted(config.tasks.keys()):  # the order of the mixing rates
    configs[name] = task_config(config, name)
    try:
      shape = finetune.validate(configs[name])
    except ConfigError as e:
      raise ConfigError(f"tasks.{name}.{e.key}",
                        str(e)[len(f"config.{e.key}: "):]) from None
  return configs, shape


# -------------------------------------------------------------------- model


def _merge(a: Any, b: Any) -> Any:
  """Deep union of two param dicts (a's leaf wins where both have one)."""
  if a is None:
    return b
  if not isinstance(a, dict):
    return a
  return {k: _merge(a.get(k), b.get(k)) if k in a and k in b else a.get(k, b.get(k))
          for k in {**a, **b}}


def _select(tree: Any, like: Any) -> Any:
  """The part of `tree` with the keys of `like`."""
  if not isinstance(like, dict):
    return tree
  return {k: _select(tree[k], v) for k, v in like.items()}


def _paths(tree: Any, prefix: tuple = ()) -> set[tuple]:
  if not isinstance(tree, dict):
    return {prefix}
  return set().union(*(_paths(v, prefix + (k,)) for k, v in tree.items())) if tree else set()


class MultiTaskModel:
  """Each task's model over one param tree: shared subtrees + params[HEADS][task].

  Attributes:
    models: task name -> its flax model (one family, one config).
    shared: the top-level param subtrees every task shares (the family's
      carried_over; None there: all of them).
    structures: task name -> its model's param shapes.
  """

  def __init__(self, task_models: dict[str, nn.Module], shared: tuple[str, ...] | None,
               init_shapes: dict):
    self.models, self.init_shapes = dict(task_models), init_shapes
    self.structures = {n: steps.param_shapes(m, init_shapes) for n, m in self.models.items()}
    self.shared = (set(shared) if shared is not None
                   else set().union(*(set(s) for s in self.structures.values())))
    full = _paths(self.assemble(self.structures))
    # The params (and their optimizer state) a task's step must leave untouched.
    self.unused = {n: frozenset(full - _paths(self.assemble({n: s})))
                   for n, s in self.structures.items()}

  def assemble(self, trees: dict[str, Any]) -> dict:
    """Per-task trees (params, shapes or shardings) -> the one multi-task tree."""
    out: dict = {}
    for name, tree in trees.items():
      for key, sub in tree.items():
        if key in self.shared:
          out[key] = _merge(out.get(key), sub)
        else:
          out.setdefault(HEADS, {}).setdefault(name, {})[key] = sub
    return out

  def view(self, params: dict, name: str) -> dict:
    """Task `name`'s model params, taken from the multi-task tree (no copies)."""
    like = self.structures[name]
    return {k: _select(params[k], v) if k in self.shared else params[HEADS][name][k]
            for k, v in like.items()}

  def init_fn(self, tx: optax.GradientTransformation) -> Callable[[jax.Array], Any]:
    """key -> a fresh TrainState; a task's init key is folded from its name's key."""
    def init(key):
      init_key, state_key = jax.random.split(key)
      trees = {}
      for name, model in self.models.items():
        k = jax.random.fold_in(init_key, mixing.task_key(name) & 0x7FFFFFFF)
        inputs = steps.model_inputs(model, steps.dummy_batch(self.init_shapes))
        p = model.init({"params": k, "dropout": k}, **inputs)["params"]
        trees[name] = jax.tree.map(
            lambda x: jnp.asarray(peft.unbox(x), jnp.float32)
            if jnp.issubdtype(peft.unbox(x).dtype, jnp.floating) else peft.unbox(x),
            p, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
      params = self.assemble(trees)
      return steps.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                              opt_state=tx.init(params), rng=state_key)
    return init

  def state_shardings(self, tx, mesh, rules) -> tuple[Any, Any]:
    """(abstract TrainState carrying shardings, TrainState of NamedShardings)."""
    params = self.assemble({
        n: steps.abstract_sharded_state(m, optax.identity(), self.init_shapes, mesh,
                                        rules)[1].params for n, m in self.models.items()})
    with nn.logical_axis_rules(()):
      abstract = jax.eval_shape(self.init_fn(tx), jax.random.PRNGKey(0))
    replicated = NamedSharding(mesh, P())
    shardings = steps.TrainState(
        step=replicated, params=params, rng=replicated,
        opt_state=steps.opt_state_shardings(abstract.opt_state, abstract.params, params, mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def _dict_keys(path) -> tuple:
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def keep_unused(new: Any, old: Any, unused: frozenset) -> Any:
  """`new` with the leaves of (or mirroring, e.g. Adam's mu / nu) an unused param from `old`."""
  def pick(path, n, o):
    keys = _dict_keys(path)
    return o if any(keys[s:] in unused for s in range(len(keys))) else n
  return jax.tree_util.tree_map_with_path(pick, new, old)


# --------------------------------------------------------------------- step


def task_train_step(state, batch, *, mt: MultiTaskModel, name: str, tx, objective,
                    schedule=None, prng_impl: str = "threefry2x32"):
  """One update of the shared params and task `name`'s head on a batch of that task.

  Returns (new state, metrics) as steps.train_step: the objective's sums,
  'loss', 'grad_norm' and, with a schedule, 'learning_rate'.
  """
  model = mt.models[name]
  normalizers = objective.normalizers(batch)
  dropout = steps.dropout_key(jax.random.fold_in(state.rng, state.step),
                              jnp.zeros([], jnp.int32), prng_impl)
  rngs = {"dropout": dropout, "sample": jax.random.fold_in(dropout, 1)}

  def loss_fn(params):
    outputs = model.apply({"params": mt.view(params, name)}, **steps.model_inputs(model, batch),
                          enable_dropout=True, rngs=rngs)
    metrics = objective.metrics(outputs, batch, z_loss=0.0)
    return objective.loss(metrics, normalizers), metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  unused = mt.unused[name]
  params = keep_unused(params, state.params, unused)
  opt_state = keep_unused(opt_state, state.opt_state, unused)
  try:
    norm = optim.grad_norm(opt_state)
  except ValueError:
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  metrics = dict(metrics, loss=loss, grad_norm=norm.astype(jnp.float32))
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# -------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
  """What the loop needs: per-task configs and tasks, the model, the mesh."""
  configs: dict
  tasks: dict
  mt: MultiTaskModel
  pretrained: dict | None
  model_config: Any
  mesh: Any
  rules: Any
  batch_sharding: Any


def setup(config) -> Run:
  """Checks the config, loads the tokenizer, tasks and pretrained weights, builds the model."""
  configs, shape = validate(config)
  mesh = sharding.make_mesh(*shape)
  rules = sharding.get_rules(config.mesh.rules)
  if not config.data.tokenizer and init_from.is_pretraining_workdir(config.init_from):
    config.data.tokenizer, config.data.lower_case = init_from.pretraining_tokenizer(
        config.init_from)
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer or config.init_from,
                                           lower_case=config.data.lower_case)
  for c in configs.values():
    c.data.tokenizer, c.data.lower_case = config.data.tokenizer, config.data.lower_case
  tasks = {n: adapters.make_task(c, tokenizer) for n, c in configs.items()}
  model_cfg, pretrained = finetune_init.model_config(config, mesh, rules)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError("data.tokenizer", f"{tokenizer.path} has {tokenizer.vocab_size} ids, "
                      f"more than the model's vocab_size {model_cfg.vocab_size}")
  family = models.get(config.family)
  positions = family.positions(model_cfg)
  for n, c in configs.items():
    if positions is not None and c.data.max_length > positions:
      raise ConfigError(f"tasks.{n}.data.max_length", f"{c.data.max_length} > the model's "
                        f"{positions} positions")
  task_models = {n: family.build(model_cfg, t.model_task, **t.model_kwargs)
                 for n, t in tasks.items()}
  mt = MultiTaskModel(task_models, family.carried_over, steps.init_shapes(family.init_features))
  return Run(configs, tasks, mt, pretrained, model_cfg, mesh, rules,
             sharding.batch_sharding(mesh))


def _predictor(run: Run, name: str, param_shardings) -> Callable:
  """predictor(params, split) -> one output per feature (decoded texts for text-to-text)."""
  task, model, c = run.tasks[name], run.mt.models[name], run.configs[name]
  if task.decodes:
    return lambda params, split: task.decode(model, run.mt.view(params, name), split,
                                             c.eval.batch_size, run.batch_sharding)

  def apply(params, batch):
    outputs = model.apply({"params": run.mt.view(params, name)},
                          **steps.model_inputs(model, batch))
    return task.predict_outputs(outputs, batch)
  predict_step = jax.jit(steps.in_context(apply, run.mesh, run.rules),
                         in_shardings=(param_shardings, run.batch_sharding),
                         out_shardings=NamedSharding(run.mesh, P()))

  def predictor(params, split):
    lengths = [len(f["encoder_input_tokens"]) for f in split.features]
    outputs = [None] * len(split.features)
    for indices in batching.bucket_batches(lengths, c.eval.batch_size):
      batch = task.pad([split.features[i] for i in indices], c.eval.batch_size)
      out = jax.device_get(predict_step(params, batching.on_mesh(batch, run.batch_sharding)))
      for row, i in enumerate(indices):
        outputs[i] = {k: np.asarray(v[row]) for k, v in out.items()}
    return outputs
  return predictor


def _split_names(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def _interval_line(logs: dict, pending: dict, last_task: str) -> dict:
  """One log line over the tasks' pending steps: the mean loss and per-task summaries."""
  line, total, weighted = {}, 0, 0.0
  for name, log in logs.items():
    if not pending[name]:
      continue
    s = log.summarize()
    total, weighted = total + pending[name], weighted + s["loss"] * pending[name]
    line[f"train/{name}/loss"] = s["loss"]
    line.update({f"train/{name}/{k[len('train/'):]}": v for k, v in s.items()
                 if k.startswith("train/")})
    if name == last_task:
      line.update(learning_rate=s["learning_rate"], grad_norm=s["grad_norm"])
    pending[name] = 0
  return dict(line, loss=weighted / total)


# ------------------------------------------------------------------ the loop


def multitask(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes every task of `config.tasks` together in `workdir`, resuming its checkpoint.

  Returns:
    The last eval's metrics ('eval/<task>/<split>/<metric>', 'eval/mean_primary'),
    'best' ({'step', 'value'} of the best mean primary metric), 'task_steps' and
    'task_examples' (per task, over the whole run).

  Raises:
    ValueError / FileNotFoundError: a bad config or missing data, before any compile.
    FloatingPointError: a non-finite loss. loop.Preempted: saved after a SIGTERM.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = setup(config)
  names, is_main = list(run.tasks), jax.process_index() == 0

  # ---- data: every task's splits, its batch order and the mixing rates.
  train = {n: run.tasks[n].load(c.data.train_split, c.data.max_train_examples)
           for n, c in run.configs.items()}
  evals = {n: [run.tasks[n].load(s, c.data.max_eval_examples)
               for s in _split_names(c.data.eval_splits)] for n, c in run.configs.items()}
  sizes = [len(train[n].features) for n in names]
  rates = mixing.rates(sizes, config.mixing.rule, config.mixing.temperature, config.mixing.cap)
  orders = {n: mixing.TaskBatches(n, [len(f["encoder_input_tokens"]) for f in train[n].features],
                                  run.configs[n].train.batch_size, config.seed,
                                  bucket=run.configs[n].data.padding == "bucket")
            for n in names}
  num_steps = config.train.num_steps
  plan = mixing.schedule(config.seed, 1, num_steps + 1, rates)  # plan[s - 1]: task of step s
  if is_main:
    logging.info("multitask: %s", {n: {"examples": s, "rate": round(float(r), 4)}
                                   for n, s, r in zip(names, sizes, rates)})

  # ---- optimizer, state shapes, restore or init.
  family = models.get(config.family)
  overrides = finetune_init.optimizer_rules(config, family, run.model_config)
  if config.train.warmup_fraction > 0:
    overrides["warmup_steps"] = int(round(config.train.warmup_fraction * num_steps))
  shapes = run.mt.assemble(run.mt.structures)
  try:
    tx, schedule = optim.make_optimizer(config.optim, shapes, num_steps=num_steps, **overrides)
  except ValueError as e:
    raise ValueError(f"config.optim / config.finetune: {e}") from None
  abstract, state_shardings = run.mt.state_shardings(tx, run.mesh, run.rules)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     every_steps=config.checkpoint.every_steps, keep=1,
                                     async_save=False)
  best_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), every_steps=1,
                                          keep=1, async_save=False)
  restored = ckpt.restore(abstract)
  if restored is None:
    with nn.logical_axis_rules(()):
      state = jax.jit(run.mt.init_fn(tx), out_shardings=state_shardings)(
          jax.random.PRNGKey(config.seed))
    if run.pretrained is not None:
      state = state.replace(params=init_from.load_pretrained(
          state.params, run.pretrained, state_shardings.params, family,
          family.num_layers(run.model_config), config.finetune.reinit_layers))
    start, best = 0, None
  else:
    state, start = restored.state, restored.step
    best = (restored.data_position or {}).get("best")

  # The per-task position is recomputed from the pure schedule, and checked.
  task_steps = {n: int(c) for n, c in zip(names, np.bincount(plan[:start],
                                                             minlength=len(names)))}
  task_examples = {n: orders[n].examples_in(task_steps[n]) for n in names}
  if restored is not None:
    saved = (restored.data_position or {}).get("task_steps")
    if saved is not None and saved != task_steps:
      raise ValueError(f"{ckpt.directory}: the checkpoint's per-task steps {saved} differ from "
                       f"this config's schedule {task_steps} (config.tasks, config.mixing or "
                       "config.seed changed); use a new workdir")
    logging.info("resumed from step %d of %s: %s", start, ckpt.directory, task_steps)

  # ---- steps and predictors, one per task (compiled on first use).
  prng = steps.resolve_prng_impl(config.train.prng_impl, jax.default_backend())
  train_steps = {n: jax.jit(
      steps.in_context(functools.partial(
          task_train_step, mt=run.mt, name=n, tx=tx, schedule=schedule, prng_impl=prng,
          objective=objectives.get(run.tasks[n].objective)), run.mesh, run.rules),
      in_shardings=(state_shardings, run.batch_sharding),
      out_shardings=(state_shardings, NamedSharding(run.mesh, P())), donate_argnums=(0,))
      for n in names}
  predictors = {n: _predictor(run, n, state_shardings.params) for n in names}
  primaries = {n: f"{evals[n][0].name}/{run.tasks[n].metric}" for n in names if evals[n]}

  writer = metrics_lib.MetricWriter(workdir, resume_step=start if restored else -1,
                                    enabled=is_main)
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=is_main and config.log.progress)
  logs = {n: loop.StepLog(writer, bar) for n in names}
  pending = {n: 0 for n in names}
  preemption = loop.Preemption()
  last, step, preempted = {}, start, False

  def save(step: int) -> None:
    for log in logs.values():
      log.ready_to_save()
    ckpt.save(step, state, force=True, config=config, data_position={
        "best": best, "task_steps": task_steps, "task_examples": task_examples})

  with loop.closing(best_ckpt, ckpt, writer, bar, preemption):
    for step in range(start + 1, num_steps + 1):
      # ---- one step of the task the schedule names.
      name = names[plan[step - 1]]
      indices = orders[name][task_steps[name]]
      batch = run.tasks[name].pad([train[name].features[i] for i in indices],
                                  run.configs[name].train.batch_size)
      state, step_metrics = train_steps[name](state, batching.on_mesh(batch,
                                                                      run.batch_sharding))
      logs[name].add(step, step_metrics)
      pending[name] += 1
      task_steps[name] += 1
      task_examples[name] += len(indices)
      final = step == num_steps
      preempted = not final and preemption.requested(step)
      if loop.every(step, config.log.every_steps) or final or preempted:
        line = _interval_line(logs, pending, name)
        for n in names:
          line[f"tasks/{n}/steps"], line[f"tasks/{n}/examples"] = task_steps[n], task_examples[n]
        writer.write(step, line)
        bar.update(step, loss=line["loss"])
        last = line

      # ---- every task on its own dev split(s), with its own metric.
      if loop.every(step, config.eval.every_steps) or final:
        scores = {f"eval/{n}/{s.name}/{k}": v for n in names for s in evals[n]
                  for k, v in run.tasks[n].score(s, predictors[n](state.params, s)).items()}
        value = (float(np.mean([scores[f"eval/{n}/{p}"] for n, p in primaries.items()]))
                 if primaries else float(step))
        scores["eval/mean_primary"] = value
        if best is None or value > best["value"]:
          best = {"step": step, "value": value}
          best_ckpt.save(step, {"params": state.params}, data_position=best, config=config,
                         force=True)
        writer.write(step, dict(scores, **{"best/value": best["value"],
                                           "best/step": best["step"]}))
        if is_main:
          logging.info("step %d: %s (best: step %d, %.4f)", step, scores, best["step"],
                       best["value"])
        last = scores
      if loop.every(step, config.checkpoint.every_steps) or final or preempted:
        save(step)
      if preempted:
        break
  if preempted:
    raise loop.Preempted(step)
  return dict(last, best=best, task_steps=dict(task_steps), task_examples=dict(task_examples))
