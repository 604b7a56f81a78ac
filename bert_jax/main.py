"""bert-jax command line: flags -> config -> one command.

  bert-jax train --config=configs/FILE.py[:variant] --workdir=DIR [--config.a.b=value]
  bert-jax {finetune|evaluate|predict|export} --config=configs/glue.py:sst2 --workdir=DIR
      [--out=DIR]   (export: the best checkpoint as a Hugging Face folder, LoRA merged)
  bert-jax inspect --config=configs/FILE.py[:variant] [--num_batches=2] [--out=x.npz]
  bert-jax train-tokenizer --input=GLOB_OR_SPEC --model_prefix=PATH --vocab_size=N
  bert-jax embed --init_from=FOLDER_OR_WORKDIR --input=FILE --out=emb.npy [--pooling=mean]
      [--batch_size=64] [--max_length=0] [--text_field=NAME]   (sentence embeddings)
  python -m bert_jax.main COMMAND ...   (the same)

Config fields are overridden with --config.a.b=value; the config is locked,
so a misspelt field is an error that names it.

Exit status and errors (the message on stderr is one line, `error: ...`;
--verbose prints the traceback above it):
  0    done.
  2    bad input: a misspelt or mistyped --config override, a config file or
       variant that does not exist, a missing flag (--workdir), a missing or
       unreadable file, an empty corpus, a bad config value.
  1    the input was fine but the run failed: a non-finite loss
       (FloatingPointError). Any other error is a bug and shows its traceback.
  143  preempted (SIGTERM) after saving a checkpoint: rerun to resume.
"""
import difflib
import os
import re
import sys
import tempfile
import traceback
from typing import NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_integer("num_batches", 2, "inspect: batches to read.")
flags.DEFINE_integer("num_examples", 3, "inspect: examples to print per batch.")
flags.DEFINE_string("out", None, "inspect: write the batches to this .npz file; predict: "
                    "the predictions folder (default WORKDIR/predictions); export: the "
                    "Hugging Face folder (default WORKDIR/export).")
flags.DEFINE_multi_string("input", None, "train-tokenizer: text files, globs or source specs.")
flags.DEFINE_string("model_prefix", None, "train-tokenizer: writes PREFIX.model/.vocab.")
flags.DEFINE_integer("vocab_size", 32000, "train-tokenizer: pieces in the model.")
flags.DEFINE_string("model_type", "unigram", "train-tokenizer: unigram or bpe.")
flags.DEFINE_integer("extra_ids", 100, "train-tokenizer: T5 sentinels appended.")
flags.DEFINE_bool("bert_special_tokens", False, "train-tokenizer: add [CLS] [SEP] [MASK].")
flags.DEFINE_string("init_from", None, "embed: a Hugging Face / sentence-transformers folder "
                    "or a bert-jax train workdir.")
flags.DEFINE_string("pooling", None, "embed: mean, cls, max, mean_sqrt_len_tokens, "
                    "weightedmean or lasttoken (several: a,b); default the folder's, else mean.")
flags.DEFINE_integer("batch_size", 64, "embed: sentences per batch (a multiple of the devices).")
flags.DEFINE_integer("max_length", 0, "embed: tokens per sentence at most (0: the folder's "
                     "max_seq_length, else the model's positions).")
flags.DEFINE_string("text_field", None, "embed: the .tsv column / .jsonl field of the sentence.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                    "(not needed on TPU VMs, where jax finds its peers itself).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback above the one-line "
                  "message.")
FLAGS = flags.FLAGS


def _init_distributed() -> None:
  """jax.distributed.initialize() for a multi-host run, before JAX touches devices.

  Explicit flags (CPU tests, GPU clusters), or a multi-process cluster found
  the way JAX finds one (TPU VM slice via the metadata server, GKE, Slurm,
  Open MPI); single hosts skip it. The decision is bert_jax.distributed's.
  """
  from bert_jax import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def _train(config) -> None:
  if not FLAGS.workdir:  # before the imports below (JAX, TensorFlow: seconds)
    raise app.UsageError("train needs --workdir (local folder or gs://bucket/path)")
  from bert_jax import loop, train
  _init_distributed()
  # Orbax logs every save step at INFO through absl's logger; the trainer's
  # own progress lines (root logger) are enough.
  logging.get_absl_logger().setLevel("WARNING")
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # what a process ended by SIGTERM reports: not finished


def _finetune(config, command: str) -> None:
  if not FLAGS.workdir:
    raise app.UsageError(f"{command} needs --workdir")
  from bert_jax import finetune, loop
  _init_distributed()
  logging.get_absl_logger().setLevel("WARNING")
  kwargs = {"out": FLAGS.out} if command in ("predict", "export") else {}
  try:
    finetune.COMMANDS[command](config, FLAGS.workdir, **kwargs)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)


def _multitask(config) -> None:
  """bert-jax multitask: several fine-tuning tasks on one encoder (bert_jax/multitask.py)."""
  if not FLAGS.workdir:
    raise app.UsageError("multitask needs --workdir")
  from bert_jax import loop, multitask
  _init_distributed()
  logging.get_absl_logger().setLevel("WARNING")
  try:
    multitask.multitask(config, FLAGS.workdir)
  except loop.Preempted as e:
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


def _embed() -> None:
  if FLAGS.input and len(FLAGS.input) != 1:
    raise app.UsageError(f"embed takes one --input file, got {len(FLAGS.input)}")
  from bert_jax import embed
  _init_distributed()
  embed.run(FLAGS.init_from, FLAGS.input[0] if FLAGS.input else None, FLAGS.out,
            pooling=FLAGS.pooling, batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
            text_field=FLAGS.text_field)


# ---------------------------------------------------------------------- errors

# Exit statuses (the module docstring). 2 is what absl and argparse use for a
# usage error; 1 is what Python exits with on an uncaught exception.
_BAD_INPUT, _RUN_FAILED = 2, 1

# The errors that mean "the input is wrong", whose message says what to fix:
# the package raises ValueError naming the config key ("config.train.batch_size:
# ...", defaults.ConfigError) or the data ("text file x.txt is empty"), and these
# OSErrors name the path. Any other type (a TypeError in JAX, a RuntimeError)
# is a bug somewhere, and its traceback is what a report needs. A plain OSError
# (disk full, network) is not listed: it is the machine's problem, not the input's.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, FileExistsError, flags.Error, app.UsageError)

# absl wraps a config file's ValueError/TypeError as `flag --config=X: <this>
# <traceback>` (ml_collections config_flags puts the traceback in the message).
_CONFIG_FILE_ERROR = "Error whilst parsing config file:"


def _fail(error: BaseException, status: int, verbose: bool,
          message: str | None = None) -> NoReturn:
  """Prints `error: MESSAGE` as the last line of stderr and exits with `status`.

  Args:
    error: the exception; its traceback is printed first when `verbose`.
    status: the exit status.
    verbose: --verbose (parsed or, before flags parsing ends, read from argv).
    message: the text after `error: ` (default: str(error)); joined into one line.
  """
  if verbose:
    traceback.print_exception(error)
  text = message if message is not None else (str(error) or type(error).__name__)
  # One line whatever the message: an error listing several items keeps them all.
  line = " ".join(part.strip() for part in text.splitlines() if part.strip())
  sys.stderr.write(f"error: {line}\n")
  sys.stderr.flush()
  sys.exit(status)


def _verbose_requested(argv: list[str]) -> bool:
  """--verbose read from argv directly: FLAGS.verbose is unset while flags fail to parse."""
  verbose = False
  for arg in argv[1:]:
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=") if arg.startswith("-") else ("", "", "")
    if name == "verbose":
      verbose = value.lower() not in ("false", "0")
    elif name == "noverbose":
      verbose = False
  return verbose


def _config_argument(argv: list[str]) -> str | None:
  """The value of the last --config=FILE[:variant] (or `--config FILE`) in argv."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.fullmatch(r"--?config(=(.*))?", arg, re.DOTALL)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _check_config_file(argv: list[str]) -> None:
  """Raises FileNotFoundError (IsADirectoryError) when --config names no file (a folder).

  ml_collections defers that error to the config's first use, where it is an
  OSError quoting its internal module name; this one names the flag and file.
  """
  value = _config_argument(argv)
  if value is None:
    return
  path = value.split(":", 1)[0]
  if os.path.isdir(path):
    raise IsADirectoryError(f"--config={value}: config file {path!r} is a folder")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={value}: config file {path!r} does not exist")


def _flags_error_message(error: flags.Error) -> str:
  """absl's message, with a config file's error in place of the traceback absl quotes."""
  message = str(error)
  if _CONFIG_FILE_ERROR not in message:
    return message
  prefix = message.split(_CONFIG_FILE_ERROR, 1)[0].rstrip(": ")
  # The chain: absl's error <- ml_collections' re-raise (the traceback text)
  # <- what get_config raised (e.g. "configs/bert.py: unknown variant 'huge'").
  cause = error
  while cause is not None and not str(cause).startswith(_CONFIG_FILE_ERROR):
    cause = cause.__cause__ or cause.__context__
  cause = cause.__context__ if cause is not None else None
  if cause is None:
    return prefix
  kind = "" if isinstance(cause, ValueError) else f"{type(cause).__name__}: "
  return f"{prefix}: {kind}{cause}"


def _missing_field(config, path: str) -> str | None:
  """What is wrong with override `path` (a.b.c) of `config`, or None if it names a field."""
  node, where = config, "config"
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{where} is a {type(node).__name__}, not a group of fields"
    if part not in node:
      fields = sorted(str(k) for k in node.keys())
      close = difflib.get_close_matches(part, fields, n=1, cutoff=0.75)
      hint = f'; did you mean "{close[0]}"?' if close else f" (it has: {', '.join(fields)})"
      return f'{where} has no field "{part}"{hint}'
    node, where = node[part], f"{where}.{part}"
  return None


def _bad_override(argv: list[str]) -> str | None:
  """`--config.a.b: config.a has no field "b" ...` for the first override naming no field.

  A misspelt override fails inside ml_collections with a KeyError or
  AttributeError (TypeError below a non-group field) that names neither the
  flag nor the config. The config is loaded again (config files are plain
  data) and each override's path walked through it. None when the config
  itself does not load or every override names a field: then the error is
  not the override's, and keeps its traceback.
  """
  value = _config_argument(argv)
  if value is None:
    return None
  try:
    config = FLAGS["config"].parser.parse(value)  # the parser that loaded it
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for arg in argv[1:]:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    problem = match and _missing_field(config, match.group(1))
    if problem:
      return f"--config.{match.group(1)}: {problem}"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv) for app.run, with a bad command line reported in one line (exit 2).

  absl prints a flags error as "FATAL Flags parsing error" with a config
  file's whole traceback inside, and exits 1; a misspelt --config override
  escapes it as a traceback of ml_collections internals.
  """
  verbose = _verbose_requested(argv)
  try:
    _check_config_file(argv)
    return FLAGS(argv)
  except flags.Error as e:
    _fail(e, _BAD_INPUT, verbose, _flags_error_message(e))
  except _USER_ERRORS as e:
    _fail(e, _BAD_INPUT, verbose)
  except (KeyError, AttributeError, TypeError) as e:
    message = _bad_override(argv)
    if message is None:
      raise
    _fail(e, _BAD_INPUT, verbose, message)


# ------------------------------------------------------------------------ main


def _run_command(argv) -> None:
  commands = ("train", "inspect", "train-tokenizer", "finetune", "evaluate", "predict",
              "export", "embed", "multitask")
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: bert-jax {{{'|'.join(commands)}}} [--flags]; got {argv[1:]}")
  if argv[1] == "train-tokenizer":
    return _train_tokenizer()
  if argv[1] == "embed":
    return _embed()
  if _CONFIG.value is None:
    raise app.UsageError(f"{argv[1]} needs --config=configs/FILE.py[:variant]")
  logging.info("config:\n%s", _CONFIG.value)
  if argv[1] in ("finetune", "evaluate", "predict", "export"):
    return _finetune(_CONFIG.value, argv[1])
  if argv[1] == "multitask":
    return _multitask(_CONFIG.value)
  return (_train if argv[1] == "train" else _inspect)(_CONFIG.value)


def main(argv) -> None:
  """Runs the command in argv[1]; bad input and a diverged run end in one line.

  A preempted run exits 143 from _train/_finetune; what is not caught here
  (a bug) reaches app.run with its traceback.
  """
  try:
    _run_command(argv)
  except FloatingPointError as e:  # a non-finite loss: good input, failed run
    _fail(e, _RUN_FAILED, FLAGS.verbose)
  except _USER_ERRORS as e:
    _fail(e, _BAD_INPUT, FLAGS.verbose)


def run() -> None:
  """Console-script entry point (`bert-jax`)."""
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
