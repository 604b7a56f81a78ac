"""Benchmark: PET cloze vs the [CLS] classifier, few-shot SST-2 (k examples per class).

For each k (default 16 and 32) and seed (default 0, 1, 2), both heads are
fine-tuned from the same MLM checkpoint on the same k-per-class subset of the
SST-2 training split (configs/pet.py:sst2; the subset and the init are
functions of the seed): 'mlm' is PET's cloze ('{text_a} It was {mask}.',
0=terrible / 1=great, through the pretrained MLM head), 'cls' the ordinary
[CLS] classifier with a fresh head. Printed per (head, k): the mean and
standard deviation over the seeds of the SST-2 dev accuracy after the last
epoch (no model selection on dev, as a true few-shot run must), the min-max
range, and the mean of the best epoch's accuracy (selected on dev: optimistic).

`--init_from` must have an MLM head: a Hugging Face *ForMaskedLM folder, or a
`bert-jax train` workdir such as the quick start's (its SentencePiece
vocabulary may lack the verbalizer words as single tokens: pass
`--single_token=False` or other `--verbalizer` words). Not a test: run by hand

  python bench/pet_fewshot.py --init_from=/tmp/bert_jax_quickstart \
    [--data=../shared/data] [--ks=16,32] [--seeds=0,1,2] [--epochs=30] [--max_eval=0]

Every run writes into a temporary folder, removed afterwards. --max_eval
scores the first N dev rows only (quick checks; the figures are then not the
benchmark's).
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

import numpy as np  # noqa: E402

from bert_jax import finetune  # noqa: E402
from configs import pet as pet_config  # noqa: E402


def _config(args, head: str, k: int, seed: int):
  config = pet_config.get_config("sst2")
  config.seed = seed
  config.init_from = args.init_from
  config.data.data_dir = args.data
  config.data.tokenizer = args.tokenizer
  config.data.max_length = args.max_length
  config.data.max_eval_examples = args.max_eval
  config.cloze.head = head
  config.cloze.k_per_class = k
  config.cloze.single_token = args.single_token
  if args.verbalizer:
    config.cloze.verbalizer = args.verbalizer
  config.train.num_epochs = args.epochs
  config.train.batch_size = args.batch_size
  config.optim.learning_rate = args.lr
  config.checkpoint.every_epochs = args.epochs  # the last epoch's save only
  config.log.progress = False
  config.log.every_steps = 1000
  return config


def run_one(args, head: str, k: int, seed: int) -> dict:
  """{'last', 'best', 'seconds'} of one fine-tuning run in a temporary workdir."""
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    out = finetune.finetune(_config(args, head, k, seed), workdir)
  return {"last": out["eval/dev/accuracy"], "best": out["best"]["value"],
          "seconds": time.time() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--init_from", required=True, help="an MLM checkpoint (HF or workdir)")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--tokenizer", default="", help="default: the checkpoint's")
  parser.add_argument("--ks", default="16,32")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--heads", default="mlm,cls")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=1e-5)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--max_eval", type=int, default=0, help="0 = all 872 dev rows")
  parser.add_argument("--verbalizer", default="", help="default: configs/pet.py's")
  parser.add_argument("--single_token", default="True", choices=("True", "False"))
  args = parser.parse_args()
  args.single_token = args.single_token == "True"
  ks = [int(k) for k in args.ks.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {}
  for k in ks:
    for head in args.heads.split(","):
      for seed in seeds:
        r = run_one(args, head, k, seed)
        results.setdefault((head, k), []).append(r)
        print(json.dumps({"head": head, "k": k, "seed": seed, **r}), flush=True)
  print(f"\nSST-2 dev accuracy, {len(seeds)} seeds, {args.epochs} epochs, init_from "
        f"{args.init_from}")
  print(f"{'head':5} {'k':>3}  {'last: mean +- std':>18}  {'min-max':>13}  {'best (dev-selected)':>20}")
  for (head, k), rs in results.items():
    last, best = np.array([r["last"] for r in rs]), np.array([r["best"] for r in rs])
    print(f"{head:5} {k:>3}  {last.mean():>9.4f} +- {last.std():.4f}  "
          f"{last.min():.4f}-{last.max():.4f}  {best.mean():>20.4f}")


if __name__ == "__main__":
  main()
