"""Builds the run's config locally, as the workers will, before launch touches the slice.

The config file, its variant and every override are loaded by the CLI's own
flag parser (bert_jax.main._parse_flags) in a child Python whose import path
is the code being shipped, so a misspelt override or an unknown variant fails
here with the message the job would have printed. Loading a config imports
no JAX or TensorFlow (configs use bert_jax.defaults), so this takes a second.
The child also checks the fields a TPU run needs that the config leaves to
the command line (a tfds source needs data.data_dir: the workers have no
~/tensorflow_datasets).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

OK = "BERT_JAX_CONFIG_OK"

# Run in the child with argv[1] = JSON [command, config, workdir, overrides].
# It prints the CLI's one-line `error: ...` and exits 2 on bad input.
_CHILD = r'''
import json, sys
command, config_ref, workdir, overrides = json.loads(sys.argv[1])
argv = ["bert-jax", command, "--config=" + config_ref, "--workdir=" + workdir, *overrides]
# ml_collections' config flag reads sys.argv when it is defined to register the
# --config.a.b overrides, so argv must be in place before the CLI is imported.
sys.argv = list(argv)
try:
  from bert_jax import main as cli
  parse = cli._parse_flags
except (ImportError, AttributeError):  # an older revision: the plain ml_collections loader
  cli = None
if cli is not None:
  parse(argv)  # exits 2 with `error: ...` on stderr
  config = cli._CONFIG.value
else:
  from absl import flags
  from ml_collections import config_flags
  holder = config_flags.DEFINE_config_file("config", None, lock_config=True)
  flags.DEFINE_string("workdir", None, "")
  try:
    flags.FLAGS(argv)
    config = holder.value
  except Exception as e:  # pylint: disable=broad-except
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)

def field(path):
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return None
    node = node[part]
  return node

problems = []
tfds = [f"{p}={field(p)}" for p in ("data.source", "eval.source")
        if isinstance(field(p), str) and field(p).startswith("tfds:")]
if field("data.glue_source") == "tfds":
  tfds.append("data.glue_source=tfds")
if tfds and field("data.data_dir") == "":
  problems.append(f"config.data.data_dir: empty, but {tfds[0]} is read from the prepared "
                  "tfds folder, and the TPU workers have no ~/tensorflow_datasets; set "
                  "--config.data.data_dir=gs://BUCKET/tensorflow_datasets")
if problems:
  print("error: " + "; ".join(problems), file=sys.stderr)
  sys.exit(2)
print("BERT_JAX_CONFIG_OK")
'''


class ConfigCheckError(ValueError):
  """The run's config does not build; the message is the CLI's own."""


def check(tree: str | os.PathLike, command: str, config_ref: str, workdir: str,
          overrides: Sequence[str], python: str | None = None, timeout: float = 300) -> None:
  """Loads `config_ref` with `overrides` from the code in `tree`, as `bert-jax command` would.

  Args:
    tree: the code that setup ships (a checkout or an export of one revision).
    command: the bert-jax command (train, finetune, ...).
    config_ref: FILE[:variant], relative to `tree` or absolute.
    workdir: the run's workdir (the CLI wants one; nothing is written there).
    overrides: --config.a.b=value arguments.
    python: the interpreter to load it with (default: this one).
    timeout: seconds before the check counts as failed.

  Raises:
    ConfigCheckError: the message the job would print (one line), or what is
      missing to check at all.
  """
  payload = json.dumps([command, config_ref, workdir, list(overrides)])
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  try:
    proc = subprocess.run([python or sys.executable, "-c", _CHILD, payload], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired:
    raise ConfigCheckError(f"loading --config={config_ref} took over {timeout:.0f} s") from None
  if proc.returncode == 0 and OK in proc.stdout:
    return
  lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  if errors:
    raise ConfigCheckError(f"--config={config_ref}: {errors[-1][len('error: '):]}")
  missing = [line for line in lines if "ModuleNotFoundError" in line]
  if missing:
    raise ConfigCheckError(f"cannot load --config={config_ref} locally: {missing[-1]} in "
                           f"{python or sys.executable}; launch checks the config before it "
                           "touches the slice: `pip install -e .` in this Python")
  raise ConfigCheckError(f"--config={config_ref} does not load (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no message'}")
