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
from bert_jax import metrics as metrics_lib
from bert_jax import objectives
from bert_jax import optim
from bert_jax import sharding
from bert_jax import steps
from bert_jax.data import pipeline
from bert_jax.data import position as position_lib
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import bert
from bert_jax.models import t5

FAMILIES = ("bert", "t5")
# Data objective -> train-step objective (SOP is NSP's loss on other pairs).
_STEP_OBJECTIVE = {"mlm": "mlm", "mlm_nsp": "mlm_nsp", "mlm_sop": "mlm_nsp",
                   "span_corruption": "span_corruption"}
# Model vocabularies are padded to a multiple of this (TPU-friendly shapes).
_VOCAB_MULTIPLE = 128


class Preempted(Exception):
  """A preemption notice arrived; the state of `step` is saved. Rerun to resume.

  An exception, not a normal return, so that a supervisor (tpu_scripts'
  recover loop, a batch scheduler) never mistakes a stopped run for a
  finished one: the CLI exits with 143, the status of a process ended by
  SIGTERM.
  """

  def __init__(self, step: int):
    super().__init__(f"preempted: saved step {step}; run the same command to resume")
    self.step = step


def default_config() -> ml_collections.ConfigDict:
  """The trainer's fields with their defaults; config files set model, data, optim.

  Every key the loop reads is here, so a locked config rejects typos.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "bert"  # 'bert' (BERT-family encoder) or 't5'
  c.model = model_config("bert", "tiny")
  c.data = pipeline.default_data_config()
  c.optim = optim.default_config("adamw")

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000_000  # with the adamw preset: BERT's 1M steps, 10k warmup
  c.train.batch_size = 32  # global, over all hosts
  c.train.num_microbatches = 1  # gradient accumulation (same update as the full batch)
  c.train.z_loss = 0.0  # T5: 1e-4

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "data_parallel"  # 'data_parallel' | 'fsdp' | 'fsdp_tensor'

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.progress = True  # console progress bar (process 0)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500  # 0: never (the final step is always evaluated if a source is set)
  c.eval.source = ""  # held-out source spec ('' = no eval); same tokenizer/objective as data
  c.eval.split = "validation"  # tfds split of a tfds eval source
  c.eval.batch_size = 32
  c.eval.num_batches = 8
  return c


def model_config(family: str, preset: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` sub-config: every field of the family's preset, overridable.

  `vocab_size=0` means "the tokenizer's size, rounded up to a multiple of
  128" (filled in at start-up).
  """
  if family == "bert":
    cfg = bert.BertConfig.preset(preset)
  elif family == "t5":
    cfg = t5.T5Config.preset(preset)
  else:
    raise ValueError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")
  fields = dataclasses.asdict(cfg)
  fields["dtype"] = jnp.dtype(fields["dtype"]).name
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def build_model(config: ml_collections.ConfigDict):
  """The flax model of `config.family` for the data objective (config.model fields)."""
  fields = config.model.to_dict()
  if config.family == "t5":
    fields["activations"] = tuple(fields["activations"])
    return t5.T5Model(t5.T5Config.from_dict(fields))
  task = "mlm" if config.data.objective == "mlm" else "pretraining"
  return bert.build(bert.BertConfig.from_dict(fields), task)


# ------------------------------------------------------------------ checks


def _fail(key: str, message: str):
  raise ValueError(f"config.{key}: {message}")


def validate_mesh(mesh_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of `config.mesh` on this run's devices.

  Raises:
    ValueError naming config.mesh.rules or the sizes that do not fit.
  """
  if mesh_config.rules not in sharding.RULES:
    _fail("mesh.rules", f"unknown preset {mesh_config.rules!r}; choose one of "
          f"{sorted(sharding.RULES)}")
  try:
    return sharding.mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor,
                               jax.device_count())
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None


def validate(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Checks everything that can be checked before a compile; returns the mesh shape.

  Raises:
    ValueError naming the config key and the offending values.
  """
  if config.family not in FAMILIES:
    _fail("family", f"unknown family {config.family!r}; choose one of {list(FAMILIES)}")
  if config.data.objective not in _STEP_OBJECTIVE:
    _fail("data.objective", f"unknown objective {config.data.objective!r}")
  if (config.family == "t5") != (config.data.objective == "span_corruption"):
    _fail("data.objective", f"{config.data.objective!r} does not train a "
          f"{config.family!r} model (t5 <-> span_corruption, bert <-> mlm/mlm_nsp/mlm_sop)")
  for key in ("train.num_steps", "train.batch_size", "train.num_microbatches",
              "log.every_steps"):
    section, name = key.split(".")
    if config[section][name] < 1:
      _fail(key, f"must be >= 1, got {config[section][name]}")
  shape = validate_mesh(config.mesh)
  data_parallel = shape[0] * shape[1]
  batch, micro = config.train.batch_size, config.train.num_microbatches
  if batch % micro or (batch // micro) % data_parallel:
    _fail("train.batch_size", f"{batch} / num_microbatches {micro} must be divisible by "
          f"the data-parallel size mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} = "
          f"{data_parallel} ({jax.device_count()} devices)")
  if batch % jax.process_count():
    _fail("train.batch_size", f"{batch} is not divisible by the {jax.process_count()} hosts")
  if config.eval.source and config.eval.batch_size % data_parallel:
    _fail("eval.batch_size", f"{config.eval.batch_size} is not divisible by the "
          f"data-parallel size {data_parallel}")
  try:
    build_model(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None
  try:
    optim.make_schedule(config.optim.schedule, config.optim.learning_rate,
                        config.train.num_steps, config.optim.warmup_steps,
                        end_factor=config.optim.end_factor)
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


def _tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`data.tokenizer`, or a SentencePiece model trained (once, by host 0) into workdir."""
  if config.data.tokenizer:
    return config.data.tokenizer
  if jax.process_index() == 0:
    tokenizer_lib.train_for_source(config.data, workdir)
  multihost_utils.sync_global_devices("bert_jax: tokenizer trained")
  return tokenizer_lib.train_for_source(config.data, workdir)  # exists now: just its path


def _eval_batches(config, batch_sharding) -> list[dict[str, jax.Array]]:
  """The fixed held-out batches, on devices once for the whole run."""
  if not config.eval.source:
    return []
  eval_data = ml_collections.ConfigDict(config.data.to_dict())
  eval_data.source, eval_data.split = config.eval.source, config.eval.split
  batches = pipeline.make_eval_iterator(
      eval_data, seed=config.seed, batch_size=config.eval.batch_size,
      num_batches=config.eval.num_batches, process_index=jax.process_index(),
      process_count=jax.process_count())
  return [_global_batch(b, batch_sharding) for b in batches]


def _evaluate(eval_step, params, batches: Iterable[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Held-out metrics: sums over all batches, then averages, prefixed 'eval/'."""
  total = None
  for batch in batches:
    m = eval_step(params, batch)
    total = m if total is None else jax.tree.map(jnp.add, total, m)
  return {f"eval/{k}": v for k, v in objectives.summarize(jax.device_get(total)).items()}


# ------------------------------------------------------------ step metrics


_PER_STEP = ("loss", "grad_norm", "learning_rate")


def _check_finite(interval: list[tuple[int, dict]], last_saved: int | None) -> list[dict]:
  """Host copies of the interval's metrics; raises at the first non-finite step."""
  fetched = jax.device_get([m for _, m in interval])
  for (step, _), m in zip(interval, fetched):
    for key in ("loss", "grad_norm"):
      if not np.isfinite(m[key]):
        raise FloatingPointError(
            f"non-finite {key} ({m[key]}) at step {step}; stopping without saving. The last "
            f"checkpoint is step {last_saved} (lower optim.learning_rate or raise "
            "optim.warmup_steps, then resume from it)")
  return fetched


def _summarize_interval(fetched: list[dict]) -> dict[str, float]:
  """Mean loss over the interval, last lr / grad norm, objective averages."""
  sums = {k: np.sum([m[k] for m in fetched]) for k in fetched[0] if k not in _PER_STEP}
  out = {"loss": float(np.mean([m["loss"] for m in fetched])),
         "learning_rate": float(fetched[-1]["learning_rate"]),
         "grad_norm": float(fetched[-1]["grad_norm"])}
  out.update({f"train/{k}": v for k, v in objectives.summarize(sums).items()})
  return out


def _flops_per_example(config, batch: Mapping[str, np.ndarray]) -> float:
  """Training FLOPs of one example (metrics.py formulas), for MFU."""
  model = build_model(config)
  if config.family == "t5":
    return metrics_lib.t5_train_flops(model.config, batch["encoder_input_tokens"].shape[1],
                                      batch["decoder_target_tokens"].shape[1])
  return metrics_lib.bert_train_flops(model.config, batch["encoder_input_tokens"].shape[1],
                                      batch["mlm_positions"].shape[1],
                                      nsp=config.data.objective != "mlm")


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
    config: a full training config (`default_config()` + a config file).
    workdir: checkpoints, metrics and the trained tokenizer go here.

  Returns:
    The last logged metrics (train and, when evaluated, 'eval/...').

  Raises:
    Preempted: after saving, when a preemption notice (SIGTERM) arrived.
    FloatingPointError: a non-finite loss or gradient norm (nothing saved
      from that step on).
    ValueError: a bad config, before anything is compiled.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # ours to fill in, unlocked
  mesh_shape = validate(config)
  is_main = jax.process_index() == 0

  # ---- workdir: fails here, before any compile, when it cannot be written.
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)

  # ---- tokenizer and model: the model's vocabulary covers the tokenizer's.
  config.data.tokenizer = _tokenizer_path(config, workdir)
  vocab = tokenizer_lib.load_tokenizer(config.data.tokenizer,
                                       lower_case=config.data.lower_case).vocab_size
  if config.model.vocab_size == 0:
    config.model.vocab_size = -(-vocab // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
  elif config.model.vocab_size < vocab:
    _fail("model.vocab_size", f"{config.model.vocab_size} < the tokenizer's {vocab} ids "
          f"({config.data.tokenizer})")
  model = build_model(config)
  objective = _STEP_OBJECTIVE[config.data.objective]

  # ---- mesh, optimizer, state shapes and shardings (nothing computed yet).
  mesh = sharding.make_mesh(*mesh_shape)
  rules = sharding.get_rules(config.mesh.rules)
  batch_sharding = sharding.batch_sharding(mesh)
  # Parameter shapes do not depend on sequence lengths: one token is enough.
  init_shapes = {"encoder_input_tokens": jax.ShapeDtypeStruct((1, 1), jnp.int32)}
  if config.family == "t5":
    init_shapes["decoder_input_tokens"] = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  num_steps = config.train.num_steps
  tx, schedule = optim.make_optimizer(config.optim, steps.param_shapes(model, init_shapes),
                                      num_steps=num_steps)
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
  # Lines a killed run logged after its last checkpoint (all of them, when it
  # saved none) are dropped: the resumed run logs those steps again.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if restored else -1,
                                    enabled=is_main)

  # ---- data: continues exactly after the restored step.
  data = pipeline.make_train_iterator(
      config.data, seed=config.seed, batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      position=position)
  eval_batches = _eval_batches(config, batch_sharding)

  # ---- the jitted steps (compiled on first use).
  train_step = steps.make_train_step(
      model, tx, objective, state_shardings, batch_sharding, rules=rules,
      num_microbatches=config.train.num_microbatches, z_loss=config.train.z_loss,
      schedule=schedule)
  eval_step = steps.make_eval_step(model, objective, state_shardings.params, batch_sharding,
                                   rules=rules, z_loss=config.train.z_loss)

  last = {}
  if eval_batches and start == 0:  # the starting point of the held-out curve
    last = _evaluate(eval_step, state.params, eval_batches)
    writer.write(0, last)
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=is_main and config.log.progress)
  throughput = None
  interval: list[tuple[int, dict]] = []
  last_saved = start if restored is not None else None
  preempted = False

  # The finally clause lets pending asynchronous saves finish even when the
  # run stops on an error: the last good checkpoint is never lost.
  try:
    for step in range(start + 1, num_steps + 1):
      local = next(data)
      if throughput is None:
        flops = _flops_per_example(config, local) * config.train.batch_size
        tokens = sum(local[k].size for k in ("encoder_input_tokens", "decoder_input_tokens")
                     if k in local) * jax.process_count()
        devices = jax.devices()
        peak = metrics_lib.peak_flops_per_device(devices[0].device_kind)
        throughput = metrics_lib.Throughput(
            tokens_per_step=tokens, flops_per_step=flops,
            peak_flops=peak * len(devices) if peak else None)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, _global_batch(local, batch_sharding))
      interval.append((step, step_metrics))
      if step == start + 1:  # exclude the compile from the measured rate
        jax.block_until_ready(step_metrics)
        throughput.start(step)

      # ---- log (and check the loss) every log.every_steps, and the steps
      # since the last log when a preemption stops the run here (they would
      # be missing from metrics.jsonl otherwise: the resumed run starts after).
      preempted = ckpt.preemption_requested(step)
      if step % config.log.every_steps == 0 or step == num_steps or preempted:
        fetched = _check_finite(interval, last_saved)
        last = _summarize_interval(fetched)
        if step > start + 1:  # the first step's time is mostly compilation
          last.update(throughput.measure(step))
        interval = []
        if eval_batches and ((config.eval.every_steps and step % config.eval.every_steps == 0)
                             or step == num_steps):
          last.update(_evaluate(eval_step, state.params, eval_batches))
        writer.write(step, last)
        bar.update(step, loss=last["loss"])

      # ---- checkpoint: never from a step whose loss was not finite.
      if step % config.checkpoint.every_steps == 0 or step == num_steps or preempted:
        if interval:
          _check_finite(interval, last_saved)
        if ckpt.save(step, state, data_position=_global_position(data.position), config=config,
                     force=step == num_steps or preempted):
          last_saved = step
      if preempted:
        break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  if preempted:
    raise Preempted(step)
  if is_main:
    logging.info("done: step %d; checkpoints in %s, metrics in %s", num_steps,
                 ckpt.directory, os.path.join(workdir, "metrics.jsonl"))
  return last
