"""Fine-tuning and evaluation: config -> mesh, data, state, loop, per-epoch eval.

`finetune(config, workdir)` is one linear function in the style of
train.py: it reads the task's splits, builds the task model (BERT-family
encoder + a head), starts it from a Hugging Face folder (`init_from`, via
`from_pretrained`) or from random weights, trains for `train.num_epochs`
with AdamW, warmup and linear decay, evaluates every epoch on the dev
split(s) with the task's own metric and keeps the best epoch's params.
`evaluate` and `predict` reload the best params and score a split / write
the task's predictions file.

Tasks (`config.task`):
  glue   any of glue.TASKS (`config.glue_task`): classification, or MSE
         regression for STS-B; MNLI evaluates dev_matched and dev_mismatched.
  conll  CoNLL-2003 NER: token classification, conlleval entity F1.
  squad  SQuAD v1.1/v2.0: span start/end, n-best post-processing, official EM/F1.
Splits are GLUE split names ('train', 'dev', 'dev_matched', ...) or, for
conll/squad, file names in `data.data_dir` ('.gz' tried when absent).

Fine-tuning controls: new heads are initialised as BERT does (truncated
normal 0.02, zero bias: the layers' defaults); `finetune.freeze_encoder` /
`finetune.freeze_layers` freeze the encoder or its embeddings + lower N
layers (optim freeze regexes); `finetune.reinit_layers` keeps the top K
layers (and the pooler) at their fresh init instead of the pretrained
weights; `finetune.layerwise_lr_decay` scales layer i's LR by
decay ** (L - i). `data.padding`: 'max' (every batch max_length), 'dynamic'
(each batch padded to its longest, rounded up to `data.pad_multiple`) or
'bucket' (the same, over batches of similar lengths). Each padded length
compiles its own step, so the multiple bounds the number of compiles.

Workdir: checkpoints/ (the last state, for resuming: a killed run restarts
at the step it saved, with the same batches), best/ (params of the best
epoch by the primary metric, with that metric in its data position),
metrics.jsonl, and predict's files under predictions/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import metrics as metrics_lib
from bert_jax import optim
from bert_jax import sharding
from bert_jax import steps
from bert_jax import train
from bert_jax.convert import from_pretrained
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import bert
from bert_jax.tasks import adapters
from bert_jax.tasks import batching

TASK_KINDS = tuple(adapters.TASKS)  # glue, conll, squad
PADDINGS = ("max", "dynamic", "bucket")


def default_config() -> ml_collections.ConfigDict:
  """Every field the fine-tuning loop reads, with defaults; config files set the task."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "glue"  # one of TASK_KINDS
  c.glue_task = "sst2"  # glue only: a key of glue.TASKS
  c.init_from = ""  # HF folder or bert_jax pretraining workdir; '' = random init of `model`
  c.dtype = "float32"  # computation dtype (params stay float32)
  c.model = train.model_config("bert", "tiny")  # used only when init_from is ''

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""
  c.data.tokenizer = ""  # vocab.txt or folder; '' = init_from's (folder or pretraining run's)
  c.data.lower_case = True
  c.data.train_split = "train"
  c.data.eval_splits = "dev"  # comma-separated
  c.data.predict_split = "test"
  c.data.max_length = 128
  c.data.max_train_examples = 0  # 0 = all: the first N examples otherwise
  c.data.max_eval_examples = 0
  c.data.padding = "bucket"  # one of PADDINGS
  c.data.pad_multiple = 32
  c.data.label_all_subwords = False  # conll
  c.data.doc_stride = 128  # squad
  c.data.max_query_length = 64  # squad
  c.data.n_best_size = 20  # squad
  c.data.max_answer_length = 30  # squad

  c.finetune = ml_collections.ConfigDict()
  c.finetune.freeze_encoder = False
  c.finetune.freeze_layers = 0  # freeze the embeddings and the lowest N layers
  c.finetune.reinit_layers = 0  # top K layers (and pooler) start fresh
  c.finetune.layerwise_lr_decay = 1.0  # 1.0 = off

  c.optim = optim.default_config("adamw")
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 0  # replaced by train.warmup_fraction when that is > 0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 3
  c.train.batch_size = 32
  c.train.warmup_fraction = 0.1

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1  # the last state, for resuming (always after the last epoch)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "data_parallel"

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.progress = True
  return c


# ------------------------------------------------------------------- checks


def _fail(key: str, message: str):
  raise ValueError(f"config.{key}: {message}")


def validate(config) -> tuple[int, int, int]:
  """Checks the fine-tuning fields before anything is read or compiled; returns the mesh shape."""
  if config.task not in TASK_KINDS:
    _fail("task", f"unknown task {config.task!r}; choose one of {list(TASK_KINDS)}")
  if config.data.padding not in PADDINGS:
    _fail("data.padding", f"unknown padding {config.data.padding!r}; choose one of "
          f"{list(PADDINGS)}")
  for key in ("train.num_epochs", "train.batch_size", "eval.batch_size", "data.max_length",
              "data.pad_multiple", "log.every_steps", "checkpoint.every_epochs"):
    section, name = key.split(".")
    if config[section][name] < 1:
      _fail(key, f"must be >= 1, got {config[section][name]}")
  if not 0.0 <= config.train.warmup_fraction < 1.0:
    _fail("train.warmup_fraction", f"must be in [0, 1), got {config.train.warmup_fraction}")
  if not 0.0 < config.finetune.layerwise_lr_decay <= 1.0:
    _fail("finetune.layerwise_lr_decay", f"must be in (0, 1], got "
          f"{config.finetune.layerwise_lr_decay}")
  if config.init_from and not (_is_pretraining_workdir(config.init_from) or os.path.isfile(
      os.path.join(config.init_from, "config.json"))):
    _fail("init_from", f"{config.init_from!r} is neither a Hugging Face folder (config.json) "
          "nor a bert_jax pretraining workdir (checkpoints/)")
  if not (config.data.tokenizer or config.init_from):
    _fail("data.tokenizer", "empty, and no init_from folder to take vocab.txt from")
  shape = train.validate_mesh(config.mesh)
  parallel = shape[0] * shape[1]
  for key in ("train.batch_size", "eval.batch_size"):
    section, name = key.split(".")
    if config[section][name] % (parallel * jax.process_count()):
      _fail(key, f"{config[section][name]} is not divisible by the data-parallel size "
            f"{parallel} x {jax.process_count()} hosts")
  return shape


# -------------------------------------------------------------------- model


def _is_pretraining_workdir(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and not os.path.isfile(os.path.join(path, "config.json")))


def _pretraining_config(workdir: str) -> tuple[str, int, ml_collections.ConfigDict]:
  """(checkpoints folder, finished steps, the run's config) of a `bert-jax train` workdir."""
  folder = os.path.join(workdir, "checkpoints")
  finished = sorted(int(n) for n in os.listdir(folder) if n.isdigit() and os.path.isfile(
      os.path.join(folder, n, checkpoint_lib.COMMIT_MARKER)))
  if not finished:
    raise FileNotFoundError(f"config.init_from: no finished checkpoint in {folder}")
  with open(os.path.join(folder, str(finished[-1]), "config", "metadata"), encoding="utf-8") as f:
    fields = json.load(f)["value"]
  if "task" in fields:
    _fail("init_from", f"{workdir} is a fine-tuning workdir; give a pretraining one (bert-jax "
          "train) or a Hugging Face folder")
  saved = train.default_config()
  saved.update(fields)
  if saved.family != "bert":
    _fail("init_from", f"{folder} holds a {saved.family!r} run; fine-tuning needs a BERT encoder")
  return folder, len(finished), saved


def _from_pretraining_workdir(config, mesh, rules) -> tuple[bert.BertConfig, dict]:
  """Encoder config and params of a `bert-jax train` workdir's latest step.

  The run's own config (stored with every checkpoint) rebuilds its model and
  optimizer, so the state restores exactly; only the encoder is kept.
  """
  folder, num_finished, saved = _pretraining_config(config.init_from)
  model = train.build_model(saved)
  tx, _ = optim.make_optimizer(saved.optim, steps.param_shapes(model, _INIT_SHAPES),
                               num_steps=saved.train.num_steps)
  abstract, _ = steps.abstract_sharded_state(model, tx, _INIT_SHAPES, mesh, rules)
  restored = checkpoint_lib.Checkpointer(folder, every_steps=1, keep=num_finished,
                                         async_save=False).restore(abstract)
  logging.info("init_from: step %d of %s", restored.step, folder)
  fields = dict(saved.model.to_dict(), dtype=config.dtype)
  return bert.BertConfig.from_dict(fields), {"encoder": restored.state.params["encoder"]}


def _encoder_config(config, mesh, rules) -> tuple[bert.BertConfig, dict | None]:
  """The encoder's hyperparameters and pretrained params (None: random init)."""
  if config.init_from and _is_pretraining_workdir(config.init_from):
    return _from_pretraining_workdir(config, mesh, rules)
  if config.init_from:
    encoder, params = from_pretrained(config.init_from, task="encoder", dtype=config.dtype)
    return encoder.config, params
  fields = dict(config.model.to_dict(), dtype=config.dtype)
  try:
    return bert.BertConfig.from_dict(fields), None
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def _optimizer_rules(config, num_layers: int) -> dict:
  """optim overrides for freezing and layer-wise LR decay (added to the config's own)."""
  ft = config.finetune
  if ft.freeze_layers > num_layers:
    _fail("finetune.freeze_layers", f"{ft.freeze_layers} > the encoder's {num_layers} layers")
  if not 0 <= ft.reinit_layers <= num_layers:
    _fail("finetune.reinit_layers", f"{ft.reinit_layers} not in [0, {num_layers}]")
  freeze = list(optim._patterns(config.optim.freeze))  # pylint: disable=protected-access
  if ft.freeze_encoder:
    freeze.append(r"^encoder/")
  elif ft.freeze_layers:
    freeze += [r"^encoder/embeddings/"] + [f"^encoder/layer_{i}/"
                                            for i in range(ft.freeze_layers)]
  multipliers = [tuple(r) for r in config.optim.lr_multipliers]
  if ft.layerwise_lr_decay < 1.0:
    multipliers += optim.layerwise_lr_multipliers(num_layers, ft.layerwise_lr_decay)
  return {"freeze": tuple(freeze), "lr_multipliers": tuple(multipliers)}


def _load_pretrained(params: Any, pretrained: dict, shardings: Any, num_layers: int,
                     reinit_layers: int) -> Any:
  """params with the pretrained encoder weights put in, each onto its sharding.

  Heads and, with reinit_layers=K, the top K layers and the pooler keep
  their fresh init (Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning").
  """
  fresh_prefixes = tuple(f"encoder/layer_{i}/" for i in range(num_layers - reinit_layers,
                                                             num_layers))
  if reinit_layers:
    fresh_prefixes += ("encoder/pooler/",)
  source = {"/".join(k): v for k, v in traverse_util.flatten_dict({"encoder":
                                                                 pretrained["encoder"]}).items()}
  flat = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  fresh = []
  for key in flat:
    name = "/".join(key)
    value = source.get(name)
    if value is None or name.startswith(fresh_prefixes):
      fresh.append(name)
      continue
    if tuple(value.shape) != tuple(flat[key].shape):
      raise ValueError(f"init_from: parameter {name} has shape {tuple(value.shape)}, the "
                       f"model expects {tuple(flat[key].shape)}")
    flat[key] = jax.device_put(np.asarray(value, np.float32), flat_shardings[key])
  logging.info("init_from: %d pretrained tensors; fresh init for %d: %s", len(flat) - len(fresh),
               len(fresh), sorted({n.rsplit("/", 1)[0] for n in fresh}))
  return traverse_util.unflatten_dict(flat)


def _make_predict_step(model, param_shardings, batch_sharding, rules) -> Callable:
  """jit of the model's outputs (no dropout), replicated so every host reads them all."""
  def predict(params, batch):
    return model.apply({"params": params}, **steps.model_inputs(model, batch))
  mesh = batch_sharding.mesh
  return jax.jit(steps._in_context(predict, mesh, rules),  # pylint: disable=protected-access
                 in_shardings=(param_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()))


# --------------------------------------------------------------------- data


def _pad(config, features: list, batch_size: int) -> dict:
  """One padded batch (filler rows up to batch_size weigh nothing)."""
  if config.data.padding == "max":
    return batching.pad_batch(features, length=config.data.max_length, batch_size=batch_size)
  return batching.pad_batch(features, multiple=config.data.pad_multiple, batch_size=batch_size)


def _epoch_batches(config, features: list, epoch: int) -> list:
  """The example indices of every training batch of `epoch` (same on every rerun)."""
  seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
  if config.data.padding == "bucket":
    lengths = [len(f["encoder_input_tokens"]) for f in features]
    return batching.bucket_batches(lengths, config.train.batch_size, seed=seed)
  order = np.random.default_rng(seed).permutation(len(features))
  return [order[i:i + config.train.batch_size]
          for i in range(0, len(order), config.train.batch_size)]


def _local_rows(batch: dict) -> dict:
  """This host's share of a global batch (every host builds the same global one)."""
  n = len(next(iter(batch.values()))) // jax.process_count()
  start = jax.process_index() * n
  return {k: v[start:start + n] for k, v in batch.items()}


def predict_outputs(config, predict_step, params, split: adapters.Split, batch_sharding) -> list:
  """The model's outputs for every feature of `split`, in feature order (numpy)."""
  lengths = [len(f["encoder_input_tokens"]) for f in split.features]
  outputs = [None] * len(split.features)
  for indices in batching.bucket_batches(lengths, config.eval.batch_size):
    batch = _pad(config, [split.features[i] for i in indices], config.eval.batch_size)
    out = jax.device_get(predict_step(params, train._global_batch(  # pylint: disable=protected-access
        _local_rows(batch), batch_sharding)))
    for row, i in enumerate(indices):
      outputs[i] = {k: np.asarray(v[row]) for k, v in out.items()}
  return outputs


def _evaluate(config, task, predict_step, params, splits: Sequence[adapters.Split],
              batch_sharding) -> dict:
  """Task metrics of every split, keys '<split>/<metric>'."""
  out = {}
  for split in splits:
    outputs = predict_outputs(config, predict_step, params, split, batch_sharding)
    out.update({f"{split.name}/{k}": v for k, v in task.score(split, outputs).items()})
  return out


# --------------------------------------------------------------------- setup


@dataclasses.dataclass
class _Run:
  """What finetune, evaluate and predict share: task, model, mesh."""
  task: Any
  tokenizer: Any
  model: Any
  pretrained: dict | None
  mesh: Any
  rules: Any
  batch_sharding: Any


def _setup(config) -> _Run:
  """Checks the config, loads the tokenizer and the encoder, builds the task model."""
  mesh_shape = validate(config)
  mesh = sharding.make_mesh(*mesh_shape)
  rules = sharding.get_rules(config.mesh.rules)
  if not config.data.tokenizer and _is_pretraining_workdir(config.init_from):
    saved = _pretraining_config(config.init_from)[2]
    config.data.tokenizer, config.data.lower_case = saved.data.tokenizer, saved.data.lower_case
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer or config.init_from,
                                           lower_case=config.data.lower_case)
  task = adapters.make_task(config, tokenizer)
  encoder_config, pretrained = _encoder_config(config, mesh, rules)
  if tokenizer.vocab_size > encoder_config.vocab_size:
    _fail("data.tokenizer", f"{tokenizer.path} has {tokenizer.vocab_size} ids, more than the "
          f"model's vocab_size {encoder_config.vocab_size}")
  positions = encoder_config.max_position_embeddings - encoder_config.position_offset
  if config.data.max_length > positions:
    _fail("data.max_length", f"{config.data.max_length} > the model's {positions} positions")
  kwargs = {} if task.num_labels is None else {"num_labels": task.num_labels}
  model = bert.build(encoder_config, task.model_task, **kwargs)
  return _Run(task, tokenizer, model, pretrained, mesh, rules, sharding.batch_sharding(mesh))


def _split_names(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


_INIT_SHAPES = {"encoder_input_tokens": jax.ShapeDtypeStruct((1, 1), jnp.int32)}


# ------------------------------------------------------------------ the loop


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes `config`'s task in `workdir`, resuming from its last checkpoint.

  Args:
    config: `default_config()` filled in by a config file (configs/glue.py, ...).
    workdir: checkpoints/, best/ and metrics.jsonl go here.

  Returns:
    The last epoch's eval metrics ('eval/<split>/<metric>') and 'best', the
    best epoch's {'epoch', 'step', 'metric', 'value'}.

  Raises:
    ValueError / FileNotFoundError: a bad config or missing data, before any compile.
    FloatingPointError: a non-finite loss (nothing saved from that step on).
    train.Preempted: after saving, when a preemption notice (SIGTERM) arrived.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = _setup(config)
  task, model = run.task, run.model
  is_main = jax.process_index() == 0

  # ---- data: read and encode once; batches are cut per epoch.
  train_split = task.load(config.data.train_split, config.data.max_train_examples)
  eval_splits = [task.load(s, config.data.max_eval_examples)
                 for s in _split_names(config.data.eval_splits)]
  batch_size = config.train.batch_size
  steps_per_epoch = -(-len(train_split.features) // batch_size)
  num_steps = config.train.num_epochs * steps_per_epoch
  primary = f"{eval_splits[0].name}/{task.metric}" if eval_splits else None
  if is_main:
    logging.info("%s: %d training inputs, %d steps per epoch, %d steps; eval %s",
                 config.task, len(train_split.features), steps_per_epoch, num_steps,
                 {s.name: len(s.features) for s in eval_splits})

  # ---- optimizer and state shapes.
  overrides = _optimizer_rules(config, model.config.num_layers)
  if config.train.warmup_fraction > 0:
    overrides["warmup_steps"] = int(round(config.train.warmup_fraction * num_steps))
  try:
    tx, schedule = optim.make_optimizer(config.optim, steps.param_shapes(model, _INIT_SHAPES),
                                        num_steps=num_steps, **overrides)
  except ValueError as e:
    raise ValueError(f"config.optim / config.finetune: {e}") from None
  abstract, state_shardings = steps.abstract_sharded_state(model, tx, _INIT_SHAPES, run.mesh,
                                                           run.rules)

  # ---- restore or init (best/ first: the last Checkpointer owns SIGTERM).
  best_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), every_steps=1,
                                          keep=1, async_save=False)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     every_steps=steps_per_epoch, keep=1, async_save=False)
  restored = ckpt.restore(abstract)
  if restored is not None:
    state, start = restored.state, restored.step
    best = (restored.data_position or {}).get("best")
    logging.info("resumed from step %d of %s", start, ckpt.directory)
  else:
    state, _ = steps.create_sharded_state(model, tx, _INIT_SHAPES, run.mesh, run.rules,
                                          config.seed)
    if run.pretrained is not None:
      state = state.replace(params=_load_pretrained(
          state.params, run.pretrained, state_shardings.params, model.config.num_layers,
          config.finetune.reinit_layers))
    start, best = 0, None
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if restored else -1,
                                    enabled=is_main)

  train_step = steps.make_train_step(model, tx, task.objective, state_shardings,
                                     run.batch_sharding, rules=run.rules, schedule=schedule)
  predict_step = _make_predict_step(model, state_shardings.params, run.batch_sharding,
                                    run.rules)
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=is_main and config.log.progress)
  interval, last, step = [], {}, start
  last_saved = start if restored is not None else None

  for epoch in range(start // steps_per_epoch, config.train.num_epochs):
    # ---- one epoch; a resumed run skips the batches its checkpoint has seen.
    for b, indices in enumerate(_epoch_batches(config, train_split.features, epoch)):
      step = epoch * steps_per_epoch + b + 1
      if step <= start:
        continue
      batch = _pad(config, [train_split.features[i] for i in indices], batch_size)
      state, step_metrics = train_step(state, train._global_batch(  # pylint: disable=protected-access
          _local_rows(batch), run.batch_sharding))
      interval.append((step, step_metrics))
      if step % config.log.every_steps == 0 or b == steps_per_epoch - 1:
        fetched = train._check_finite(interval, last_saved)  # pylint: disable=protected-access
        last = train._summarize_interval(fetched)  # pylint: disable=protected-access
        last["epoch"] = step / steps_per_epoch
        writer.write(step, last)
        bar.update(step, loss=last["loss"])
        interval = []
      if ckpt.preemption_requested(step):
        train._check_finite(interval, last_saved)  # pylint: disable=protected-access
        ckpt.save(step, state, data_position={"best": best}, config=config, force=True)
        ckpt.close()
        best_ckpt.close()
        writer.close()
        raise train.Preempted(step)

    # ---- evaluate; keep the best epoch's params by the task's primary metric.
    scores = _evaluate(config, task, predict_step, state.params, eval_splits,
                       run.batch_sharding)
    value = scores[primary] if primary else float(epoch)
    if best is None or value > best["value"]:
      best = {"epoch": epoch + 1, "step": step, "metric": primary, "value": value}
      best_ckpt.save(step, {"params": state.params}, data_position=best, config=config,
                     force=True)
    last = {f"eval/{k}": v for k, v in scores.items()}
    writer.write(step, dict(last, epoch=epoch + 1, **{"best/value": best["value"],
                                                      "best/epoch": best["epoch"]}))
    if is_main:
      logging.info("epoch %d: %s (best: epoch %d, %s %.4f)", epoch + 1, scores,
                   best["epoch"], primary, best["value"])
    final = epoch + 1 == config.train.num_epochs
    if ((epoch + 1) % config.checkpoint.every_epochs == 0 or final) and ckpt.save(
        step, state, data_position={"best": best}, config=config, force=True):
      last_saved = step

  bar.close()
  ckpt.close()
  best_ckpt.close()
  writer.close()
  return dict(last, best=best)


# ------------------------------------------------------- evaluate and predict


def _restore_best(config, run: _Run, workdir: str) -> tuple[Any, Callable, dict]:
  """Params of the best epoch (on the mesh), the predict step, and the best record."""
  abstract, shardings = steps.abstract_sharded_state(run.model, optax.identity(),
                                                     _INIT_SHAPES, run.mesh, run.rules)
  folder = os.path.join(workdir, "best")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist: run `bert-jax finetune` with this "
                            "workdir first")
  best_ckpt = checkpoint_lib.Checkpointer(folder, every_steps=1, keep=1, async_save=False)
  restored = best_ckpt.restore({"params": abstract.params})
  best_ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no finished checkpoint in {folder}")
  predict_step = _make_predict_step(run.model, shardings.params, run.batch_sharding, run.rules)
  return restored.state["params"], predict_step, restored.data_position


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             splits: Sequence[str] | None = None) -> dict[str, float]:
  """Scores the best checkpoint of `workdir` on the eval splits (or `splits`).

  Writes the scores to WORKDIR/eval_results.json and returns them.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = _setup(config)
  params, predict_step, best = _restore_best(config, run, workdir)
  names = list(splits) if splits else _split_names(config.data.eval_splits)
  loaded = [run.task.load(s, config.data.max_eval_examples) for s in names]
  scores = _evaluate(config, run.task, predict_step, params, loaded, run.batch_sharding)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_results.json"), "w", encoding="utf-8") as f:
      json.dump({"best": best, "scores": scores}, f, indent=1)
    print(json.dumps(scores, indent=1))
  return scores


def predict(config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
            out: str | None = None) -> str:
  """Writes the best checkpoint's predictions for `split` (default data.predict_split).

  GLUE: a submission TSV ('SST-2.tsv', ...); CoNLL: `word gold predicted`
  columns; SQuAD: the {id: answer} JSON. `data.max_eval_examples` > 0 limits
  the split to its first examples. Files go to `out` (a folder;
  default WORKDIR/predictions). Returns the file's path.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = _setup(config)
  params, predict_step, _ = _restore_best(config, run, workdir)
  loaded = run.task.load(split or config.data.predict_split, config.data.max_eval_examples)
  outputs = predict_outputs(config, predict_step, params, loaded, run.batch_sharding)
  path = run.task.write(loaded, outputs, out or os.path.join(workdir, "predictions"))
  if jax.process_index() == 0:
    print(f"wrote {path}")
  return path


COMMANDS = {"finetune": finetune, "evaluate": evaluate, "predict": predict}
