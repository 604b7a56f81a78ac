"""Settings of the TPU scripts: one KEY=VALUE file, environment, flags.

Each setting has a KEY (in the settings file), an environment variable
BERT_JAX_<KEY> and a flag --<key in lower case>. Later sources win:
defaults < settings file < environment < flags. The file is a plain list of
KEY=VALUE lines (`#` comments, optional `export `, optional quotes); it is not
sourced by a shell, so nothing in it runs. An unknown key or a bad value is an
error that names the key and where it came from.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
from typing import Any, Mapping

ENV_PREFIX = "BERT_JAX_"


@dataclasses.dataclass(frozen=True)
class Spec:
  key: str
  default: str
  kind: str  # str | bool | int | float | choice
  help: str
  choices: tuple[str, ...] = ()


SPECS = (
    Spec("PROJECT", "", "str", "Google Cloud project id."),
    Spec("ZONE", "", "str", "Zone with TPU quota, e.g. us-central2-b."),
    Spec("NAME", "", "str", "TPU node name (also the queued-resource id)."),
    Spec("ACCELERATOR_TYPE", "", "str", "e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8."),
    Spec("PROVISIONING", "on-demand", "choice", "How the capacity is paid for.",
         ("on-demand", "spot", "reserved")),
    Spec("QUEUED", "true", "bool",
         "Create through a queued resource (else a plain `tpu-vm create`)."),
    Spec("RUNTIME_VERSION", "", "str",
         "TPU VM image; empty: follows the generation (tpu_scripts/accelerators.py)."),
    Spec("BUCKET", "", "str", "gs://bucket; the default WORKDIR is BUCKET/bert_jax/NAME."),
    Spec("WORKDIR", "", "str", "Run directory (checkpoints, metrics.jsonl); gs:// on pods."),
    Spec("CONFIG", "", "str", "Experiment config, e.g. configs/bert.py:base."),
    Spec("OVERRIDES", "", "str", "Config overrides, e.g. '--config.train.steps=1000'."),
    Spec("COMMAND", "train", "str", "The bert-jax command that launch runs."),
    Spec("ENV", "", "str", "Extra environment of the job, e.g. 'XLA_FLAGS=... FOO=1'."),
    Spec("SOURCE_DIR", "", "str", "Checkout copied to the workers; empty: this repository."),
    Spec("REMOTE_DIR", "bert_jax", "str", "Code folder on each worker (relative to $HOME)."),
    Spec("VENV", "bert_jax_venv", "str", "Virtual environment on each worker."),
    Spec("LOG_DIR", "bert_jax_logs", "str", "Log folder on each worker."),
    Spec("PYTHON", "python3", "str", "Python that creates the venv on the workers if it is "
         "3.11+ (else python3.12/3.11, else one that uv installs)."),
    Spec("PIP_EXTRA", "", "str", "Extra `pip install` arguments run after bert_jax[tpu]."),
    Spec("SSH_FLAGS", "", "str", "Extra gcloud ssh/scp flags, e.g. '--internal-ip'."),
    Spec("IAP", "false", "bool", "ssh/scp through Cloud IAP: `gcloud alpha ... tpu-vm ssh/scp "
         "--tunnel-through-iap` (the GA commands lack the flag)."),
    Spec("CREATE_FLAGS", "", "str", "Extra gcloud create flags, e.g. '--network=x'."),
    Spec("POLL_SECONDS", "15", "float", "Interval between state queries while waiting."),
    Spec("WAIT_TIMEOUT_SECONDS", "7200", "float", "Give up waiting for READY after this."),
    Spec("WATCH_SECONDS", "60", "float", "recover: interval between health checks."),
    Spec("MAX_ATTEMPTS", "5", "int", "recover: consecutive failed recoveries before giving up."),
    Spec("STOP_GRACE_SECONDS", "60", "int", "stop: SIGTERM, then SIGKILL after this many s."),
    Spec("HEARTBEAT_SECONDS", "180", "float", "The job renews WORKDIR/lease.json this often."),
    Spec("LEASE_STALE_SECONDS", "900", "float", "A lease without a heartbeat for this long "
         "is stale: launch --take_over may take it."),
    Spec("HUNG_SECONDS", "1800", "float", "recover: no new metrics.jsonl line for this long "
         "while the job runs means hung (stop, relaunch); 0: never."),
)
SPEC_BY_KEY = {s.key: s for s in SPECS}


class SettingsError(ValueError):
  """A setting is unknown, malformed or missing."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Resolved settings: typed values plus where each came from."""
  values: Mapping[str, Any]
  sources: Mapping[str, str]

  def __getattr__(self, name: str) -> Any:
    key = name.upper()
    if key in self.values:
      return self.values[key]
    raise AttributeError(name)

  def split(self, key: str) -> list[str]:
    """A string setting split like a shell command line (OVERRIDES, ENV, ...)."""
    try:
      return shlex.split(self.values[key])
    except ValueError as e:
      raise SettingsError(f"{key} ({self.sources[key]}): cannot split {self.values[key]!r}: "
                          f"{e}") from None

  def require(self, *keys: str) -> None:
    """Raises SettingsError naming every key in `keys` whose value is empty."""
    missing = [k for k in keys if self.values[k] in ("", None)]
    if missing:
      how = "; ".join(f"{k}=... in the settings file, {ENV_PREFIX}{k} or --{k.lower()}"
                      for k in missing)
      raise SettingsError(f"missing setting{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}: set {how}")


def read_file(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
  """Reads KEY=VALUE lines; returns {KEY: (value, 'file:line')}."""
  out = {}
  path = pathlib.Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise SettingsError(f"cannot read settings file {path}: {e.strerror}") from None
  for number, line in enumerate(lines, 1):
    where = f"{path}:{number}"
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if line.startswith("export "):
      line = line[len("export "):].strip()
    key, sep, value = line.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
      raise SettingsError(f"{where}: expected KEY=VALUE, got {line!r}")
    if key not in SPEC_BY_KEY:
      raise SettingsError(f"{where}: unknown setting {key!r}; known: {', '.join(SPEC_BY_KEY)}")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
      value = value[1:-1]
    out[key] = (value, where)
  return out


def _convert(spec: Spec, raw: str, source: str) -> Any:
  where = f"{spec.key} ({source})"
  if spec.kind == "bool":
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise SettingsError(f"{where}: expected true or false, got {raw!r}")
  if spec.kind in ("int", "float"):
    try:
      value = int(raw) if spec.kind == "int" else float(raw)
    except ValueError:
      raise SettingsError(f"{where}: expected a number, got {raw!r}") from None
    if value < 0:
      raise SettingsError(f"{where}: must not be negative, got {raw!r}")
    return value
  if spec.kind == "choice" and raw not in spec.choices:
    raise SettingsError(f"{where}: expected one of {', '.join(spec.choices)}, got {raw!r}")
  return raw


def resolve(file: str | os.PathLike | None, environ: Mapping[str, str],
            flags: Mapping[str, str | None]) -> Settings:
  """Merges defaults, the settings file, BERT_JAX_* variables and flags.

  Args:
    file: settings file path, or None for none.
    environ: the environment (os.environ).
    flags: {KEY: value or None when the flag was not given}.

  Returns:
    Settings with typed values; WORKDIR defaults to BUCKET/bert_jax/NAME.
  """
  raw = {s.key: (s.default, "default") for s in SPECS}
  if file is not None:
    raw.update(read_file(file))
  for spec in SPECS:
    if ENV_PREFIX + spec.key in environ:
      raw[spec.key] = (environ[ENV_PREFIX + spec.key], f"environment {ENV_PREFIX}{spec.key}")
    if flags.get(spec.key) is not None:
      raw[spec.key] = (flags[spec.key], f"flag --{spec.key.lower()}")
  values = {k: _convert(SPEC_BY_KEY[k], v, src) for k, (v, src) in raw.items()}
  sources = {k: src for k, (_, src) in raw.items()}
  bucket = values["BUCKET"].rstrip("/")
  if bucket and not bucket.startswith("gs://"):
    raise SettingsError(f"BUCKET ({sources['BUCKET']}): expected gs://NAME, got {bucket!r}")
  if not values["WORKDIR"] and bucket and values["NAME"]:
    values["WORKDIR"] = f"{bucket}/bert_jax/{values['NAME']}"
    sources["WORKDIR"] = "BUCKET/bert_jax/NAME"
  _check_worker_folders(values, sources)
  return Settings(values=values, sources=sources)


def _check_worker_folders(values: dict[str, Any], sources: Mapping[str, str]) -> None:
  # setup replaces REMOTE_DIR (and a broken VENV) with `rm -rf`: each must be
  # its own folder under $HOME, never /, $HOME itself, or one inside another.
  keys = ("REMOTE_DIR", "VENV", "LOG_DIR")
  for key in keys:
    path = values[key].strip().removeprefix("~/").rstrip("/")
    parts = path.split("/")
    if path in ("", ".", "~") or path.startswith("/") or ".." in parts or "" in parts:
      raise SettingsError(f"{key} ({sources[key]}): {values[key]!r} is not a folder name "
                          "relative to $HOME such as bert_jax")
    values[key] = path
  for i, a in enumerate(keys):
    for b in keys[i + 1:]:
      x, y = values[a] + "/", values[b] + "/"
      if x.startswith(y) or y.startswith(x):
        raise SettingsError(f"{a} ({values[a]!r}) and {b} ({values[b]!r}) overlap; setup "
                            "replaces REMOTE_DIR as a whole, so they must be separate folders")
