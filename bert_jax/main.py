"""bert-jax command line: flags -> config -> one command.

  bert-jax train --config=configs/FILE.py[:variant] --workdir=DIR [--config.a.b=value]
  bert-jax {finetune|evaluate|predict} --config=configs/glue.py:sst2 --workdir=DIR [--out=DIR]
  bert-jax inspect --config=configs/FILE.py[:variant] [--num_batches=2] [--out=x.npz]
  bert-jax train-tokenizer --input=GLOB_OR_SPEC --model_prefix=PATH --vocab_size=N
  python -m bert_jax.main COMMAND ...   (the same)

Config fields are overridden with --config.a.b=value; the config is locked,
so a misspelt field is an error that names it.
"""
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_integer("num_batches", 2, "inspect: batches to read.")
flags.DEFINE_integer("num_examples", 3, "inspect: examples to print per batch.")
flags.DEFINE_string("out", None, "inspect: write the batches to this .npz file; predict: "
                    "the predictions folder (default WORKDIR/predictions).")
flags.DEFINE_multi_string("input", None, "train-tokenizer: text files, globs or source specs.")
flags.DEFINE_string("model_prefix", None, "train-tokenizer: writes PREFIX.model/.vocab.")
flags.DEFINE_integer("vocab_size", 32000, "train-tokenizer: pieces in the model.")
flags.DEFINE_string("model_type", "unigram", "train-tokenizer: unigram or bpe.")
flags.DEFINE_integer("extra_ids", 100, "train-tokenizer: T5 sentinels appended.")
flags.DEFINE_bool("bert_special_tokens", False, "train-tokenizer: add [CLS] [SEP] [MASK].")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                    "(not needed on TPU VMs, where jax finds its peers itself).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
FLAGS = flags.FLAGS


def _init_distributed() -> None:
  """jax.distributed.initialize() for a multi-host run, before JAX touches devices.

  Explicit flags (CPU tests, GPU clusters) or a multi-worker TPU VM slice,
  whose environment lists several worker hostnames; single hosts skip it.
  """
  import jax
  if FLAGS.coordinator_address:
    # CPU processes talk over gloo (the default CPU client has no collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def _train(config) -> None:
  from bert_jax import train
  if not FLAGS.workdir:
    raise app.UsageError("train needs --workdir (local folder or gs://bucket/path)")
  _init_distributed()
  # Orbax logs every save step at INFO through absl's logger; the trainer's
  # own progress lines (root logger) are enough.
  logging.get_absl_logger().setLevel("WARNING")
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # what a process ended by SIGTERM reports: not finished


def _finetune(config, command: str) -> None:
  from bert_jax import finetune, train
  if not FLAGS.workdir:
    raise app.UsageError(f"{command} needs --workdir")
  _init_distributed()
  logging.get_absl_logger().setLevel("WARNING")
  kwargs = {"out": FLAGS.out} if command == "predict" else {}
  try:
    finetune.COMMANDS[command](config, FLAGS.workdir, **kwargs)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)


def _inspect(config) -> None:
  from bert_jax.data import inspect, pipeline, tokenizer
  if not config.data.tokenizer:
    out_dir = FLAGS.workdir or tempfile.mkdtemp(prefix="bert_jax_tokenizer_")
    config.data.tokenizer = tokenizer.train_for_source(config.data, out_dir)
    print(f"trained tokenizer {config.data.tokenizer}")
  data = pipeline.make_train_iterator(config.data, seed=config.seed,
                                      batch_size=config.train.batch_size)
  batches = []
  for i, batch in zip(range(FLAGS.num_batches), data):
    print(f"=== batch {i + 1} (data position after it: {data.position})")
    print(inspect.format_batch(batch, data.tokenizer, FLAGS.num_examples))
    batches.append(batch)
  if FLAGS.out:
    inspect.save_batches(FLAGS.out, batches)
    print(f"wrote {len(batches)} batches to {FLAGS.out}")


def _train_tokenizer() -> None:
  from bert_jax.data import sources, tokenizer
  if not FLAGS.input or not FLAGS.model_prefix:
    raise app.UsageError("train-tokenizer needs --input and --model_prefix")
  # Every input goes through the source readers: plain/gz files, tfds and
  # builtin corpora alike, with the same paragraph splitting and UTF-8 repair.
  texts = (p for spec in FLAGS.input for p in sources.iter_paragraphs(spec))
  tok = tokenizer.train_sentencepiece(
      texts, FLAGS.model_prefix, FLAGS.vocab_size, model_type=FLAGS.model_type,
      extra_ids=FLAGS.extra_ids, bert_special_tokens=FLAGS.bert_special_tokens)
  print(f"wrote {tok.path} ({tok.vocab_size} ids including {FLAGS.extra_ids} extra ids)")


def main(argv) -> None:
  commands = ("train", "inspect", "train-tokenizer", "finetune", "evaluate", "predict")
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: bert-jax {{{'|'.join(commands)}}} [--flags]; got {argv[1:]}")
  if argv[1] == "train-tokenizer":
    return _train_tokenizer()
  if _CONFIG.value is None:
    raise app.UsageError(f"{argv[1]} needs --config=configs/FILE.py[:variant]")
  logging.info("config:\n%s", _CONFIG.value)
  if argv[1] in ("finetune", "evaluate", "predict"):
    return _finetune(_CONFIG.value, argv[1])
  return (_train if argv[1] == "train" else _inspect)(_CONFIG.value)


def run() -> None:
  """Console-script entry point (`bert-jax`)."""
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
