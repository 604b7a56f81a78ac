"""Fine-tuning and evaluation: config -> mesh, data, state, loop, per-epoch eval.

`finetune(config, workdir)` is one linear function in the style of
train.py: it reads the task's splits, builds the task model (BERT-family
encoder + a head, or T5), starts it from a Hugging Face folder or a
pretraining workdir (`init_from`, see finetune_init.py) or from random weights, trains for `train.num_epochs`
with AdamW, warmup and linear decay, evaluates every epoch on the dev
split(s) with the task's own metric and keeps the best epoch's params.
`evaluate` and `predict` reload the best params and score a split / write
the task's predictions file.

Tasks (`config.task`):
  glue   any of glue.TASKS (`config.glue_task`): classification, or MSE
         regression for STS-B; MNLI evaluates dev_matched and dev_mismatched.
  conll  CoNLL-2003 NER, conlleval entity F1, with the head `finetune.ner_head`:
         'softmax' (per-token labels), 'crf' (a BIO-constrained linear-chain CRF
         over the words, trained on its negative log-likelihood, decoded by
         Viterbi) or 'span' (every span of up to `finetune.max_span_length`
         words classified, decoded greedily into flat entities); all three
         become word tags scored by the same metric.
  squad  SQuAD v1.1/v2.0: span start/end, n-best post-processing, official EM/F1.
  cloze  a GLUE classification task as PET's fill-in-the-blank (tasks/cloze.py,
         configs/pet.py): a pattern, a verbalizer read by init_from's MLM head,
         k examples per class.
Splits are GLUE split names ('train', 'dev', 'dev_matched', ...) or, for
conll/squad, file names in `data.data_dir` ('.gz' tried when absent).

With `family = 't5'` the same tasks run text-to-text (tasks/text2text.py,
adapters.Text2TextTask): a T5 model from `init_from` (a Hugging Face T5
folder or a span-corruption pretraining workdir) or random `model` weights is
trained teacher-forced on the task cast as text, and eval / predict decode
texts (`decode.beam_size`: 1 = greedy, else beam search with length penalty
`decode.alpha`) and parse them back into labels, entities or answers, scored
by the same metrics.

Fine-tuning controls: new heads are initialised as BERT does (truncated
normal 0.02, zero bias: the layers' defaults); `finetune.freeze_encoder` /
`finetune.freeze_layers` freeze the encoder or its embeddings + lower N
layers (optim freeze regexes); `finetune.reinit_layers` keeps the top K
layers (and the pooler) at their fresh init instead of the pretrained
weights; `finetune.layerwise_lr_decay` scales layer i's LR by
decay ** (L - i). `finetune.method` 'lora' / 'bitfit' trains low-rank
factors of the attention kernels / the biases, plus the head (peft.py); a
LoRA run's params are the model's plus params['lora'], and `peft.merge`
folds them into plain model params. 'prompt' (soft prompts) and 'houlsby' /
'pfeiffer' (bottleneck adapters) add params['prompt'] / params['adapters']
(peft_modules.py). 'scalar_mix' freezes the encoder and feeds the head an ELMo
mix of every layer's hidden states (params['scalar_mix']); `finetune.unfreeze`
/ `unfreeze_schedule` unfreeze parameter groups by step (frozen_features.py).
`data.padding`: 'max' (every batch max_length), 'dynamic' (each batch
padded to its longest, rounded up to `data.pad_multiple`) or 'bucket' (the
same, over batches of similar lengths). Each padded length compiles its own
step, so the multiple bounds the number of compiles.

Workdir: checkpoints/ (the last state, for resuming: a killed run restarts
at the step it saved, with the same batches), best/ (params of the best
epoch by the primary metric, with that metric in its data position),
metrics.jsonl, predict's files under predictions/ and export's Hugging Face
folder under export/ (LoRA folded into the kernels).

Delta checkpoints: with a method other than 'full', checkpoints/ and best/
hold only the trainable params (factors, biases, prompts, adapters, the head,
and Adam's state for them) and, in their data position, the base's identity
{'path': init_from (or 'random init, seed N'), 'sha256': peft.fingerprint of
the frozen params}. Resume, evaluate, predict and export rebuild the frozen
params exactly as a fresh run does (seeded init + init_from's weights), check
the hash, and join the delta in; a changed base fails in one line naming both
hashes. The hash is over parameter values, not files, so it also covers a
random-init base and does not care how the folder stores its weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import finetune_init
from bert_jax import frozen_features
from bert_jax import init_from
from bert_jax import loop
from bert_jax import metrics as metrics_lib
from bert_jax import models
from bert_jax import optim
from bert_jax import peft
from bert_jax import peft_modules
from bert_jax import sharding
from bert_jax import steps
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError
from bert_jax.tasks import adapters
from bert_jax.tasks import batching

PADDINGS = ("max", "dynamic", "bucket")


# ------------------------------------------------------------------- checks


def validate(config) -> tuple[int, int, int]:
  """Checks the fine-tuning fields before anything is read or compiled; returns the mesh shape."""
  if config.task not in adapters.TASKS:
    raise ConfigError("task", f"unknown task {config.task!r}; choose one of "
                      f"{list(adapters.TASKS)}")
  if config.data.glue_source not in ("tsv", "tfds"):
    raise ConfigError("data.glue_source", f"unknown source {config.data.glue_source!r}; "
                      "choose 'tsv' or 'tfds'")
  if config.family not in models.FAMILIES:
    raise ConfigError("family", f"unknown family {config.family!r}; choose one of "
                      f"{sorted(models.FAMILIES)}")
  if config.decode.beam_size < 1 or config.decode.alpha < 0:
    raise ConfigError("decode", f"beam_size must be >= 1 and alpha >= 0, got "
                      f"{config.decode.beam_size}, {config.decode.alpha}")
  for key in ("min_length", "no_repeat_ngram"):
    if config.decode.get(key, 0) < 0:
      raise ConfigError(f"decode.{key}", f"must be >= 0, got {config.decode[key]}")
  if config.data.padding not in PADDINGS:
    raise ConfigError("data.padding", f"unknown padding {config.data.padding!r}; choose one "
                      f"of {list(PADDINGS)}")
  for key in ("train.num_epochs", "train.batch_size", "eval.batch_size", "data.max_length",
              "data.max_target_length", "data.pad_multiple", "log.every_steps",
              "checkpoint.every_epochs"):
    section, name = key.split(".")
    if config[section][name] < 1:
      raise ConfigError(key, f"must be >= 1, got {config[section][name]}")
  if not 0.0 <= config.train.warmup_fraction < 1.0:
    raise ConfigError("train.warmup_fraction", f"must be in [0, 1), got "
                      f"{config.train.warmup_fraction}")
  try:
    steps.resolve_prng_impl(config.train.prng_impl, jax.default_backend())
  except ValueError as e:
    raise ConfigError("train.prng_impl", str(e)) from None
  if config.task == "conll":
    adapters.ner_head(config)
    if config.finetune.ner_head != "softmax" and models.get(config.family).encoder_decoder:
      raise ConfigError("finetune.ner_head", f"{config.finetune.ner_head!r} needs an encoder; "
                        f"the {config.family!r} family runs NER text-to-text ('softmax')")
  peft.validate(config)
  frozen_features.validate(config)
  head = adapters.output_head(config)  # a task/family/head mismatch fails here, in one line
  smoothing = config.train.get("label_smoothing", 0.0)
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {smoothing}")
  if smoothing and head != "text2text":
    raise ConfigError("train.label_smoothing", f"{smoothing}: only text-to-text heads smooth "
                      f"their labels; task {config.task!r} on {config.family!r} does not")
  if not 0.0 < config.finetune.layerwise_lr_decay <= 1.0:
    raise ConfigError("finetune.layerwise_lr_decay", f"must be in (0, 1], got "
                      f"{config.finetune.layerwise_lr_decay}")
  if config.init_from and not (init_from.is_pretraining_workdir(config.init_from)
                               or os.path.isfile(os.path.join(config.init_from, "config.json"))):
    raise ConfigError("init_from", f"{config.init_from!r} is neither a Hugging Face folder "
                      "(config.json) nor a bert_jax pretraining workdir (checkpoints/)")
  if not (config.data.tokenizer or config.init_from):
    raise ConfigError("data.tokenizer", "empty, and no init_from folder to take vocab.txt from")
  shape = sharding.mesh_shape_of(config.mesh)
  parallel = shape[0] * shape[1]  # over every host's devices (jax.device_count())
  for key in ("train.batch_size", "eval.batch_size"):
    section, name = key.split(".")
    if config[section][name] % parallel or config[section][name] % jax.process_count():
      raise ConfigError(key, f"{config[section][name]} is not divisible by the data-parallel "
                        f"size {parallel} (mesh.data x mesh.fsdp) and the "
                        f"{jax.process_count()} hosts")
  return shape


# ------------------------------------------------------------------- outputs


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
  init_shapes: dict


def _make_predictor(config, run: _Run, param_shardings) -> Callable:
  """predictor(params, split) -> one output per feature of split, in feature order.

  BERT heads: a jit of the model's outputs (no dropout) through the task's
  `predict_outputs` (e.g. CRF Viterbi decoding), replicated so every host
  reads them all, as numpy dicts. T5: decoded texts (Text2TextTask.decode).
  """
  if run.task.decodes:  # LoRA folded in once, not at every decoding step
    return lambda params, split: run.task.decode(
        peft.unwrap(run.model), peft.merged(run.model, params), split, config.eval.batch_size,
        run.batch_sharding)

  def apply(params, batch):
    outputs = run.model.apply({"params": params}, **steps.model_inputs(run.model, batch))
    return run.task.predict_outputs(outputs, batch)
  mesh = run.mesh
  predict_step = jax.jit(steps.in_context(apply, mesh, run.rules),
                         in_shardings=(param_shardings, run.batch_sharding),
                         out_shardings=NamedSharding(mesh, P()))

  def predictor(params, split: adapters.Split) -> list:
    lengths = [len(f["encoder_input_tokens"]) for f in split.features]
    outputs = [None] * len(split.features)
    for indices in batching.bucket_batches(lengths, config.eval.batch_size):
      batch = run.task.pad([split.features[i] for i in indices], config.eval.batch_size)
      out = jax.device_get(predict_step(params, batching.on_mesh(batch, run.batch_sharding)))
      for row, i in enumerate(indices):
        outputs[i] = {k: np.asarray(v[row]) for k, v in out.items()}
    return outputs
  return predictor


def _evaluate(task, predictor, params, splits: Sequence[adapters.Split]) -> dict:
  """Task metrics of every split, keys '<split>/<metric>'."""
  out = {}
  for split in splits:
    out.update({f"{split.name}/{k}": v
                for k, v in task.score(split, predictor(params, split)).items()})
  return out


# --------------------------------------------------------------------- data


def _epoch_batches(config, features: list, epoch: int) -> list:
  """The example indices of every training batch of `epoch` (same on every rerun)."""
  seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
  if config.data.padding == "bucket":
    lengths = [len(f["encoder_input_tokens"]) for f in features]
    return batching.bucket_batches(lengths, config.train.batch_size, seed=seed)
  order = np.random.default_rng(seed).permutation(len(features))
  return [order[i:i + config.train.batch_size]
          for i in range(0, len(order), config.train.batch_size)]


# --------------------------------------------------------------------- setup


def _setup(config) -> _Run:
  """Checks the config, loads the tokenizer and the pretrained model, builds the task model."""
  mesh_shape = validate(config)
  mesh = sharding.make_mesh(*mesh_shape)
  rules = sharding.get_rules(config.mesh.rules)
  if not config.data.tokenizer and init_from.is_pretraining_workdir(config.init_from):
    config.data.tokenizer, config.data.lower_case = init_from.pretraining_tokenizer(
        config.init_from)
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer or config.init_from,
                                           lower_case=config.data.lower_case)
  task = adapters.make_task(config, tokenizer)
  # The cloze task (tasks/cloze.py) reads init_from's MLM head too.
  model_cfg, pretrained = finetune_init.model_config(
      config, mesh, rules, mlm_head=getattr(task, "uses_mlm_head", False),
      task=getattr(task, "model_task", None))
  family = models.get(config.family)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError("data.tokenizer", f"{tokenizer.path} has {tokenizer.vocab_size} ids, "
                      f"more than the model's vocab_size {model_cfg.vocab_size}")
  if family.checks_pad_id and tokenizer.pad_id != model_cfg.pad_token_id:
    raise ConfigError("data.tokenizer", f"{tokenizer.path} pads with id {tokenizer.pad_id} but "
                      f"the model's pad_token_id is {model_cfg.pad_token_id} (a RoBERTa "
                      "checkpoint needs its own vocab.json + merges.txt)")
  positions = family.positions(model_cfg)
  if positions is not None and config.data.max_length > positions:
    raise ConfigError("data.max_length", f"{config.data.max_length} > the model's {positions} "
                      "positions")
  model = family.build(model_cfg, task.model_task, **task.model_kwargs)
  if hasattr(task, "wrap_model"):  # a task's own model around the built one (sentence.py)
    model = task.wrap_model(model)
  shapes = steps.init_shapes(family.init_features)
  model = peft.wrap(config, model, shapes)  # LoRA: a LoraModel (params + params['lora'])
  return _Run(task, tokenizer, model, pretrained, mesh, rules, sharding.batch_sharding(mesh),
              shapes)


def _saves_delta(config) -> bool:
  """Whether checkpoints hold the trainable params alone (every method but 'full')."""
  return config.finetune.method != "full"


def _trainable(config, params: Any, freeze: Sequence[str]) -> Any:
  """What a checkpoint holds of `params`: all of them, or the trainable ones (a delta)."""
  return peft.split(params, freeze)[0] if _saves_delta(config) else params


def _initial_state(config, run: _Run, tx, param_shardings) -> Any:
  """A fresh run's state: the seeded init, with the pretrained weights loaded over it."""
  family = models.get(config.family)
  state, _ = steps.create_sharded_state(run.model, tx, run.init_shapes, run.mesh, run.rules,
                                        config.seed)
  if run.pretrained is not None:
    state = state.replace(params=init_from.load_pretrained(
        state.params, run.pretrained, param_shardings, family,
        family.num_layers(run.model.config), config.finetune.reinit_layers))
  # Soft prompts start from the (pretrained) vocabulary embeddings.
  return state.replace(params=peft_modules.reinit(run.model, state.params, config.seed))


def _base_identity(config, params: Any, freeze: Sequence[str]) -> dict:
  """{'path', 'sha256'} of the frozen params a delta checkpoint is completed with."""
  path = config.init_from or f"random init, seed {config.seed}"
  return {"path": path, "sha256": peft.fingerprint(peft.split(params, freeze)[1])}


def _split_names(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


# ------------------------------------------------------------------ the loop


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes `config`'s task in `workdir`, resuming from its last checkpoint.

  Args:
    config: `defaults.finetune_config()` filled in by a config file (configs/glue.py, ...).
    workdir: checkpoints/, best/ and metrics.jsonl go here.

  Returns:
    The last epoch's eval metrics ('eval/<split>/<metric>') and 'best', the
    best epoch's {'epoch', 'step', 'metric', 'value'}.

  Raises:
    ValueError / FileNotFoundError: a bad config or missing data, before any compile.
    FloatingPointError: a non-finite loss (nothing saved from that step on).
    loop.Preempted: after saving, when a preemption notice (SIGTERM) arrived.
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
  family = models.get(config.family)
  overrides = finetune_init.optimizer_rules(config, family, model.config)
  if config.train.warmup_fraction > 0:
    overrides["warmup_steps"] = int(round(config.train.warmup_fraction * num_steps))
  shapes = steps.param_shapes(model, run.init_shapes)
  if is_main:
    peft.log_trainable(shapes, overrides["freeze"])
  stages = frozen_features.unfreeze_stages(config, family, model.config, shapes)
  try:
    tx, schedule = optim.make_optimizer(config.optim, shapes, num_steps=num_steps,
                                        unfreeze=stages, **overrides)
  except ValueError as e:
    raise ValueError(f"config.optim / config.finetune: {e}") from None
  abstract, state_shardings = steps.abstract_sharded_state(model, tx, run.init_shapes, run.mesh,
                                                           run.rules)

  # ---- restore or init.
  best_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), every_steps=1,
                                          keep=1, async_save=False)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     every_steps=steps_per_epoch, keep=1, async_save=False)
  # A PEFT run saves the trainable params alone (the delta) with the base's identity; the
  # frozen rest is rebuilt from init_from + seed and checked against that identity.
  freeze, delta = overrides["freeze"], _saves_delta(config)
  restored = ckpt.restore(abstract.replace(params=_trainable(config, abstract.params, freeze)))
  fresh = base = None
  if restored is None or delta:
    fresh = _initial_state(config, run, tx, state_shardings.params)
    base = _base_identity(config, fresh.params, freeze) if delta else None
  if restored is not None:
    state, start = restored.state, restored.step
    best = (restored.data_position or {}).get("best")
    if delta:
      peft.check_base((restored.data_position or {}).get("base"), base, str(ckpt.directory))
      state = state.replace(params=peft.join(fresh.params, state.params))
    logging.info("resumed from step %d of %s", start, ckpt.directory)
  else:
    state, start, best = fresh, 0, None
  del fresh  # the base lives on in state.params
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if restored else -1,
                                    enabled=is_main)

  train_step = steps.make_train_step(model, tx, task.objective, state_shardings,
                                     run.batch_sharding, rules=run.rules, schedule=schedule,
                                     label_smoothing=config.train.get("label_smoothing", 0.0),
                                     prng_impl=steps.resolve_prng_impl(config.train.prng_impl,
                                                                       jax.default_backend()))
  predictor = _make_predictor(config, run, state_shardings.params)
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=is_main and config.log.progress)
  log = loop.StepLog(writer, bar, last_saved=start if restored is not None else None)
  preemption = loop.Preemption()
  last, step, preempted = {}, start, False

  def save(step: int) -> None:
    """The resumable state; the data position holds the best epoch so far (the
    epoch's batches are recomputed from the seed)."""
    saved = state.replace(params=_trainable(config, state.params, freeze))
    if ckpt.save(step, saved, data_position={"best": best, "base": base}, config=config,
                 force=True):
      log.last_saved = step

  with loop.closing(best_ckpt, ckpt, writer, bar, preemption):
    for epoch in range(start // steps_per_epoch, config.train.num_epochs):
      # ---- one epoch; a resumed run skips the batches its checkpoint has seen.
      for b, indices in enumerate(_epoch_batches(config, train_split.features, epoch)):
        step = epoch * steps_per_epoch + b + 1
        if step <= start:
          continue
        batch = task.pad([train_split.features[i] for i in indices], batch_size)
        state, step_metrics = train_step(state, batching.on_mesh(batch, run.batch_sharding))
        log.add(step, step_metrics)
        # At an epoch's last step the notice is taken after the epoch's eval
        # (below): a run resumed there starts at the next epoch. A preempted
        # step logs the steps since the last log (the resumed run starts after).
        preempted = b < steps_per_epoch - 1 and preemption.requested(step)
        if loop.every(step, config.log.every_steps) or b == steps_per_epoch - 1 or preempted:
          last = log.summarize()
          last["epoch"] = step / steps_per_epoch
          log.write(step, last)
        if preempted:
          save(step)  # off the epoch grid: the same command resumes here
          break
      if preempted:
        break

      # ---- evaluate; keep the best epoch's params by the task's primary metric.
      scores = _evaluate(task, predictor, state.params, eval_splits)
      value = scores[primary] if primary else float(epoch)
      if best is None or value > best["value"]:
        best = {"epoch": epoch + 1, "step": step, "metric": primary, "value": value}
        best_ckpt.save(step, {"params": _trainable(config, state.params, freeze)},
                       data_position=dict(best, base=base), config=config, force=True)
      last = {f"eval/{k}": v for k, v in scores.items()}
      writer.write(step, dict(last, epoch=epoch + 1, **{"best/value": best["value"],
                                                        "best/epoch": best["epoch"]}))
      if is_main:
        logging.info("epoch %d: %s (best: epoch %d, %s %.4f)", epoch + 1, scores,
                     best["epoch"], primary, best["value"])
      final = epoch + 1 == config.train.num_epochs
      if loop.every(epoch + 1, config.checkpoint.every_epochs) or final:
        save(step)
      if not final and preemption.requested(step):
        preempted = True
        if not loop.every(epoch + 1, config.checkpoint.every_epochs):
          save(step)
        break
  if preempted:
    raise loop.Preempted(step)
  return dict(last, best=best)


# ------------------------------------------------------- evaluate and predict


def _restore_best(config, run: _Run, workdir: str) -> tuple[Any, Callable, dict]:
  """Params of the best epoch (on the mesh), the predict step, and the best record."""
  abstract, shardings = steps.abstract_sharded_state(run.model, optax.identity(),
                                                     run.init_shapes, run.mesh, run.rules)
  folder = os.path.join(workdir, "best")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist: run `bert-jax finetune` with this "
                            "workdir first")
  freeze = finetune_init.optimizer_rules(config, models.get(config.family),
                                         run.model.config)["freeze"]
  best_ckpt = checkpoint_lib.Checkpointer(folder, every_steps=1, keep=1, async_save=False)
  restored = best_ckpt.restore({"params": _trainable(config, abstract.params, freeze)})
  best_ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no finished checkpoint in {folder}")
  params, record = restored.state["params"], dict(restored.data_position or {})
  saved_base = record.pop("base", None)
  if _saves_delta(config):  # the delta completed by the rebuilt base
    base = _initial_state(config, run, optax.identity(), shardings.params).params
    peft.check_base(saved_base, _base_identity(config, base, freeze), folder)
    params = peft.join(base, params)
  return params, _make_predictor(config, run, shardings.params), record


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             splits: Sequence[str] | None = None) -> dict[str, float]:
  """Scores the best checkpoint of `workdir` on the eval splits (or `splits`).

  Writes the scores to WORKDIR/eval_results.json and returns them.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = _setup(config)
  params, predictor, best = _restore_best(config, run, workdir)
  names = list(splits) if splits else _split_names(config.data.eval_splits)
  loaded = [run.task.load(s, config.data.max_eval_examples) for s in names]
  scores = _evaluate(run.task, predictor, params, loaded)
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
  default WORKDIR/predictions). Returns the file's path (process 0; '' on the
  others, which write nothing).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  run = _setup(config)
  params, predictor, _ = _restore_best(config, run, workdir)
  loaded = run.task.load(split or config.data.predict_split, config.data.max_eval_examples)
  outputs = predictor(params, loaded)
  if jax.process_index() != 0:
    return ""  # every process has all the outputs; process 0 alone writes the file
  path = run.task.write(loaded, outputs, out or os.path.join(workdir, "predictions"))
  print(f"wrote {path}")
  return path


def export(config: ml_collections.ConfigDict, workdir: str, out: str | None = None) -> str:
  """Writes the best checkpoint of `workdir` as a Hugging Face folder (`out`, default
  WORKDIR/export) that `transformers` loads as the task model.

  A LoRA run is written with its factors folded into the kernels (peft.merged):
  a plain model, no adapter library needed to load it. The tokenizer's files
  (vocab.txt, or vocab.json + merges.txt) are copied next to the weights when
  local, so transformers' AutoTokenizer loads the folder.
  """
  from bert_jax import convert  # pylint: disable=import-outside-toplevel  (torch-free, but big)
  config = ml_collections.ConfigDict(config.to_dict())
  peft.check_exportable(config)
  run = _setup(config)
  params, _, _ = _restore_best(config, run, workdir)
  params = jax.tree.map(np.asarray, jax.device_get(peft.merged(run.model, params)))
  path = os.path.join(out or os.path.join(workdir, "export"))
  if jax.process_index() != 0:
    return ""
  convert.save_pretrained(peft.unwrap(run.model), params, path, overwrite=True)
  # The tokenizer's local files, named as transformers reads them: vocab.txt (WordPiece),
  # vocab.json + merges.txt (byte-level BPE: RoBERTa, BART).
  for source in (getattr(run.tokenizer, "path", ""), getattr(run.tokenizer, "merges_path", "")):
    name = os.path.basename(source or "")
    if name in ("vocab.txt", "vocab.json", "merges.txt") and os.path.isfile(source):
      shutil.copyfile(source, os.path.join(path, name))
  print(f"wrote {path}")
  return path


COMMANDS = {"finetune": finetune, "evaluate": evaluate, "predict": predict, "export": export}
