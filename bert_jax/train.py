"""The training loop: config -> mesh, data, state, restore, loop, eval.

One linear function, `train_and_evaluate`, read top to bottom (big_vision's
train.py style); the steps themselves are the pure functions of steps.py.

What a run guarantees:
  * Everything that can be wrong with the config or the workdir fails before
    anything is compiled (`validate` and the writers' constructors).
  * Restore-or-init: the latest good checkpoint (train state, data position,
    config) is restored onto the CURRENT mesh, whatever mesh saved it; the
    data pipeline continues with exactly the batch the uninterrupted run
    would have seen next, and dropout keys are fold_in(rng, step), so a
    killed run, restarted, reproduces the uninterrupted losses bit for bit.
  * A non-finite loss or gradient norm stops the run with an error naming
    the first bad step, and no checkpoint is written from that step on.
  * SIGTERM (a preemption notice) saves at the next step and returns.
  * Multi-host: every host feeds its own share of the global batch
    (`jax.make_array_from_process_local_data`); process 0 writes metrics.

Workdir layout: checkpoints/ (orbax), metrics.jsonl, tensorboard/, and the
trained SentencePiece model when `data.tokenizer` is empty.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import init_from
from bert_jax import losses
from bert_jax import loop
from bert_jax import metrics as metrics_lib
from bert_jax import models
from bert_jax import objectives
from bert_jax import optim
from bert_jax import recipe
from bert_jax import sharding
from bert_jax import steps
from bert_jax import throughput as throughput_lib
from bert_jax.data import pipeline
from bert_jax.data import position as position_lib
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError

# Model vocabularies are padded to a multiple of this (TPU-friendly shapes).
_VOCAB_MULTIPLE = 128


# ------------------------------------------------------------------ checks


def validate(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Checks everything that can be checked before a compile; returns the mesh shape.

  Raises:
    ValueError naming the config key and the offending values.
  """
  if config.family not in models.FAMILIES:
    raise ConfigError("family", f"unknown family {config.family!r}; choose one of "
                      f"{sorted(models.FAMILIES)}")
  family = models.get(config.family)
  key = "train.objective" if config.train.objective else "data.objective"
  name = config.train.objective or config.data.objective
  if name not in objectives.OBJECTIVES:
    raise ConfigError(key, f"unknown objective {name!r}; choose one of "
                      f"{sorted(o.name for o in objectives.OBJECTIVES.values() if o.data)}")
  objective = objectives.get(name)
  if config.data.objective not in objective.data:
    raise ConfigError("data.objective", f"{config.data.objective!r} batches do not feed the "
                      f"{name!r} objective (it reads {list(objective.data) or 'task batches'})")
  if objective.masking and config.data.masking not in objective.masking:
    raise ConfigError("data.masking", f"{config.data.masking!r}: the {name!r} objective needs "
                      f"{' or '.join(map(repr, objective.masking))}")
  if objective.model_task not in family.tasks:
    raise ConfigError(key, f"{name!r} trains a {objective.model_task!r} model, which the "
                      f"{config.family!r} family does not build (it builds {list(family.tasks)})")
  if config.train.teacher and config.init_from:
    raise ConfigError("init_from", f"{config.init_from!r}: a distillation student starts from "
                      f"its teacher's layers (train.teacher); leave init_from empty")
  if objective.teacher != bool(config.train.teacher):
    raise ConfigError("train.teacher", f"the {name!r} objective distils a teacher: name its "
                      f"checkpoint" if objective.teacher else f"{config.train.teacher!r}: the "
                      f"{name!r} objective has no teacher (use train.objective='distillation')")
  try:
    steps.resolve_prng_impl(config.train.prng_impl, jax.default_backend())
  except ValueError as e:
    raise ConfigError("train.prng_impl", str(e)) from None
  smoothing = config.train.get("label_smoothing", 0.0)
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {smoothing}")
  if smoothing and not any("label_smoothing" in t.options for t in objective.terms):
    raise ConfigError("train.label_smoothing", f"{smoothing}: the {name!r} objective has no "
                      "seq2seq term to smooth")
  for key in ("train.num_steps", "train.batch_size", "train.num_microbatches",
              "log.every_steps"):
    section, field = key.split(".")
    if config[section][field] < 1:
      raise ConfigError(key, f"must be >= 1, got {config[section][field]}")
  shape = sharding.mesh_shape_of(config.mesh)
  data_parallel = shape[0] * shape[1]
  batch, micro = config.train.batch_size, config.train.num_microbatches
  if batch % micro or (batch // micro) % data_parallel:
    raise ConfigError("train.batch_size", f"{batch} / num_microbatches {micro} must be "
                      f"divisible by the data-parallel size mesh.data x mesh.fsdp = {shape[0]} x "
                      f"{shape[1]} = {data_parallel} ({jax.device_count()} devices)")
  if batch % jax.process_count():
    raise ConfigError("train.batch_size", f"{batch} is not divisible by the "
                      f"{jax.process_count()} hosts")
  if config.eval.source and config.eval.batch_size % data_parallel:
    raise ConfigError("eval.batch_size", f"{config.eval.batch_size} is not divisible by the "
                      f"data-parallel size {data_parallel}")
  try:
    recipe.build_model(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None
  try:
    optim.make_schedule(config.optim.schedule, config.optim.learning_rate,
                        config.train.num_steps, config.optim.warmup_steps,
                        end_factor=config.optim.end_factor,
                        decay_steps=config.optim.decay_steps,
                        decay_shape=config.optim.decay_shape)
  except ValueError as e:
    raise ValueError(f"config.optim (with train.num_steps={config.train.num_steps}): {e}"
                     ) from None
  return shape


# ---------------------------------------------------------- data on devices


def _global_batch(local: Mapping[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """This host's rows -> global arrays whose leading dim spans every host."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in local.items()}


def _global_position(position: dict[str, Any]) -> dict[str, Any]:
  """Every host's data position, merged (a collective: call on all hosts at once).

  Each host knows only its own data shards; the checkpoint stores all of
  them, so a restart may even use another number of hosts.
  """
  if jax.process_count() == 1:
    return position
  rows = np.stack([position["shard"], position["epoch"], position["group"],
                   position["offset"]], axis=1).astype(np.int64)  # [local shards, 4]
  every = np.asarray(multihost_utils.process_allgather(rows))  # [hosts, local shards, 4]
  parts = [dict(position, shard=r[:, 0].tolist(), epoch=r[:, 1].tolist(),
                group=r[:, 2].tolist(), offset=r[:, 3].tolist()) for r in every]
  return position_lib.merge_positions(parts)


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`data.tokenizer`, or a SentencePiece model trained (once, by host 0) into workdir."""
  if config.data.tokenizer:
    return config.data.tokenizer
  if jax.process_index() == 0:
    tokenizer_lib.train_for_source(config.data, workdir)
  multihost_utils.sync_global_devices("bert_jax: tokenizer trained")
  return tokenizer_lib.train_for_source(config.data, workdir)  # exists now: just its path


def _device_features(model, objective: objectives.Objective) -> set[str]:
  """The batch features a step reads: the model's inputs and the objective's.

  The pipeline may emit more (SpanBERT's boundary positions, for `inspect`
  and objectives that read them); the rest never leaves the host.
  """
  return set(steps.model_input_names(model)) | set(objective.features)


def _eval_batches(config, batch_sharding, features: set[str]) -> list[dict[str, jax.Array]]:
  """The fixed held-out batches, on devices once for the whole run."""
  if not config.eval.source:
    return []
  eval_data = ml_collections.ConfigDict(config.data.to_dict())
  eval_data.source, eval_data.split = config.eval.source, config.eval.split
  try:
    batches = pipeline.make_eval_iterator(
        eval_data, seed=config.seed, batch_size=config.eval.batch_size,
        num_batches=config.eval.num_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
  except (ValueError, FileNotFoundError) as e:  # the pipeline names data.*: say which
    raise type(e)(str(e).replace("config.data.source", "config.eval.source", 1)) from e
  return [_global_batch({k: v for k, v in b.items() if k in features}, batch_sharding)
          for b in batches]


def _evaluate(eval_step, params, batches: Iterable[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Held-out metrics: sums over all batches, then averages, prefixed 'eval/'."""
  total = None
  for batch in batches:
    m = eval_step(params, batch)
    total = m if total is None else jax.tree.map(jnp.add, total, m)
  return {f"eval/{k}": v for k, v in losses.summarize(jax.device_get(total)).items()}


def _describe_run(config, mesh, abstract_state, per_device_batch: int) -> str:
  """The start-up summary: devices, hosts, mesh, batch, parameters, memory."""
  def per_device_bytes(tree):
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  devices = jax.devices()
  return (f"{len(devices)} devices ({devices[0].device_kind}), {jax.process_count()} "
          f"process(es); mesh {dict(mesh.shape)} rules {config.mesh.rules}; global batch "
          f"{config.train.batch_size} = {per_device_batch} per data-parallel device; "
          f"{num_params:,} parameters; params {per_device_bytes(abstract_state.params) / 2**20:.1f}"
          f" MiB + optimizer state {per_device_bytes(abstract_state.opt_state) / 2**20:.1f} MiB "
          "per device")


# --------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: a full training config (`defaults.train_config()` + a config file).
    workdir: checkpoints, metrics and the trained tokenizer go here.

  Returns:
    The last logged metrics (train and, when evaluated, 'eval/...').

  Raises:
    loop.Preempted: after saving, when a preemption notice (SIGTERM) arrived.
    FloatingPointError: a non-finite loss or gradient norm (nothing saved
      from that step on).
    ValueError: a bad config, before anything is compiled.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # ours to fill in, unlocked
  mesh_shape = validate(config)
  is_main = jax.process_index() == 0
  family, objective = models.get(config.family), recipe.objective_of(config)

  # ---- workdir: fails here, before any compile, when it cannot be written.
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)

  # ---- continued pretraining: the init_from checkpoint's architecture and
  # tokenizer (its weights go into the fresh state below).
  mesh = sharding.make_mesh(*mesh_shape)
  rules = sharding.get_rules(config.mesh.rules)
  pretrained = None
  if config.init_from:
    # Another objective than 'electra' continues from an ELECTRA/RTD run's
    # discriminator as a plain encoder (its heads fresh), as fine-tuning does.
    pretrained = init_from.load(config.init_from, config.family, config.model.dtype, mesh, rules,
                                lower_case=config.data.lower_case,
                                finetuning=objective.name != "electra")
    config.model = ml_collections.ConfigDict(init_from.merged_model_fields(
        config.model.to_dict(), pretrained, config.init_from))
    if not config.data.tokenizer:
      config.data.tokenizer, config.data.lower_case = pretrained.tokenizer, pretrained.lower_case

  # ---- distillation: the teacher's architecture and tokenizer (its weights,
  # and the student's starting layers, go into the fresh state below).
  teacher = None
  if config.train.teacher:
    teacher = init_from.load_teacher(config.train.teacher, config.family, config.model.dtype,
                                     mesh, rules, lower_case=config.data.lower_case)
    config.model = ml_collections.ConfigDict(init_from.student_model_fields(
        config.model.to_dict(), teacher, config.train.teacher))
    fields = dataclasses.asdict(teacher.config)
    config.train.teacher_model = ml_collections.ConfigDict(
        dict(fields, dtype=config.model.dtype))
    if not config.data.tokenizer:
      config.data.tokenizer, config.data.lower_case = teacher.tokenizer, teacher.lower_case

  # ---- tokenizer and model: the model's vocabulary covers the tokenizer's.
  config.data.tokenizer = tokenizer_path(config, workdir)
  vocab = tokenizer_lib.load_tokenizer(config.data.tokenizer,
                                       lower_case=config.data.lower_case).vocab_size
  if config.model.vocab_size == 0:
    config.model.vocab_size = -(-vocab // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
  elif config.model.vocab_size < vocab:
    raise ConfigError("model.vocab_size", f"{config.model.vocab_size} < the tokenizer's "
                      f"{vocab} ids ({config.data.tokenizer})")
  model = recipe.build_model(config)

  # ---- optimizer, state shapes and shardings (nothing computed yet).
  batch_sharding = sharding.batch_sharding(mesh)
  init_shapes = steps.init_shapes(family.init_features)
  num_steps = config.train.num_steps
  tx, schedule = recipe.make_optimizer(config, model, init_shapes)
  abstract, state_shardings = steps.abstract_sharded_state(model, tx, init_shapes, mesh, rules)
  per_device = config.train.batch_size // (mesh_shape[0] * mesh_shape[1])
  if is_main:
    logging.info("run: %s", _describe_run(config, mesh, abstract, per_device))

  # ---- restore or init.
  # Always asked: it also sets aside unfinished or unreadable newer steps.
  restored = ckpt.restore(abstract)
  if restored is not None:
    state, position, start = restored.state, restored.data_position, restored.step
    logging.info("resumed from step %d of %s", start, ckpt.directory)
  else:
    state, _ = steps.create_sharded_state(model, tx, init_shapes, mesh, rules, config.seed)
    position, start = None, 0
    if pretrained is not None:  # a fresh optimizer and data position, the checkpoint's weights
      state = state.replace(params=init_from.load_pretrained(
          state.params, pretrained.params, state_shardings.params, family,
          family.num_layers(model.config)))
    if teacher is not None:  # the teacher, and the student from every other teacher layer
      state = state.replace(params=init_from.distillation_params(
          state.params, teacher, state_shardings.params, family,
          family.num_layers(model.config)))
  # Lines a killed run logged after its last checkpoint (all of them, when it
  # saved none) are dropped: the resumed run logs those steps again.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if restored else -1,
                                    enabled=is_main)

  # ---- data: continues exactly after the restored step.
  data = pipeline.make_train_iterator(
      config.data, seed=config.seed, batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      position=position)
  features = _device_features(model, objective)
  eval_batches = _eval_batches(config, batch_sharding, features)

  # ---- the jitted steps (compiled on first use).
  train_step = steps.make_train_step(
      model, tx, objective, state_shardings, batch_sharding, rules=rules,
      num_microbatches=config.train.num_microbatches, z_loss=config.train.z_loss,
      label_smoothing=config.train.get("label_smoothing", 0.0), schedule=schedule,
      prng_impl=steps.resolve_prng_impl(config.train.prng_impl, jax.default_backend()))
  eval_step = steps.make_eval_step(model, objective, state_shardings.params, batch_sharding,
                                   rules=rules, z_loss=config.train.z_loss)

  last = {}
  if eval_batches and start == 0:  # the starting point of the held-out curve
    last = _evaluate(eval_step, state.params, eval_batches)
    writer.write(0, last)
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=is_main and config.log.progress)
  log = loop.StepLog(writer, bar, last_saved=start if restored is not None else None)
  preemption = loop.Preemption()
  throughput = None
  preempted = False

  # Closing in reverse order lets pending asynchronous saves finish even when
  # the run stops on an error: the last good checkpoint is never lost.
  with loop.closing(ckpt, writer, bar, preemption):
    for step in range(start + 1, num_steps + 1):
      local = {k: v for k, v in next(data).items() if k in features}
      if throughput is None:
        throughput = throughput_lib.for_train_step(
            family, model.config, objective.model_task, local, config.train.batch_size,
            jax.devices(), jax.process_count())
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, _global_batch(local, batch_sharding))
      log.add(step, step_metrics)
      if step == start + 1:  # exclude the compile from the measured rate
        jax.block_until_ready(step_metrics)
        throughput.start(step)

      # ---- log (and check the loss) every log.every_steps, and the steps
      # since the last log when a preemption stops the run here (they would
      # be missing from metrics.jsonl otherwise: the resumed run starts after).
      preempted = preemption.requested(step)
      if loop.every(step, config.log.every_steps) or step == num_steps or preempted:
        last = log.summarize()
        if step > start + 1:  # the first step's time is mostly compilation
          last.update(throughput.measure(step))
        if eval_batches and (loop.every(step, config.eval.every_steps) or step == num_steps):
          last.update(_evaluate(eval_step, state.params, eval_batches))
        log.write(step, last)

      # ---- checkpoint: never from a step whose loss was not finite.
      if loop.every(step, config.checkpoint.every_steps) or step == num_steps or preempted:
        log.ready_to_save()
        if ckpt.save(step, state, data_position=_global_position(data.position), config=config,
                     force=step == num_steps or preempted):
          log.last_saved = step
      if preempted:
        break
  if preempted:
    raise loop.Preempted(step)
  if is_main:
    logging.info("done: step %d; checkpoints in %s, metrics in %s", num_steps,
                 ckpt.directory, os.path.join(workdir, "metrics.jsonl"))
  return last
