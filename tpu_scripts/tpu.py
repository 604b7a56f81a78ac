#!/usr/bin/env python3
"""Run bert_jax on Cloud TPU VMs: one command per step, all through gcloud.

  python tpu_scripts/tpu.py create    # queued resource (or VM), wait until READY
  python tpu_scripts/tpu.py setup     # ship HEAD (git archive), pip install .[tpu], check devices
  python tpu_scripts/tpu.py launch --config=configs/bert.py:base [--config.a.b=value ...]
                                      # check the config locally, take the workdir's lease,
                                      # write WORKDIR/launch.json, start on all workers
  python tpu_scripts/tpu.py logs      # follow worker 0's log (--worker=N, --no_follow)
  python tpu_scripts/tpu.py status    # slice state; per worker: job, step, loss, tokens/s
  python tpu_scripts/tpu.py stop      # stop the job on all workers (SIGTERM, then SIGKILL)
  python tpu_scripts/tpu.py delete    # delete the node and its queued resource
  python tpu_scripts/tpu.py recover   # watch; relaunch WORKDIR/launch.json's run after
                                      # preemptions and hangs; honours `stop`

Settings come from a KEY=VALUE file (--settings, $BERT_JAX_SETTINGS, or
tpu_scripts/settings.env), BERT_JAX_<KEY> variables and --<key> flags, in
rising priority; tpu_scripts/settings.example.env lists them all. Every command
takes --dry_run: print the gcloud commands, run nothing. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tpu_scripts import commands, recover, settings  # noqa: E402
from tpu_scripts.gcloud import CloudError, Gcloud  # noqa: E402

DEFAULT_SETTINGS = pathlib.Path(__file__).resolve().parent / "settings.env"
HELP = {
    "create": "create the TPU (queued resource or VM) and wait until it is READY",
    "setup": "copy this checkout to every worker, install bert_jax[tpu], check the devices",
    "launch": "start `bert-jax train` detached on all workers (after clearing leftovers)",
    "logs": "print and follow one worker's log",
    "status": "slice state and one line per worker: job, step, loss, tokens/s",
    "stop": "stop the job on all workers",
    "delete": "delete the node and its queued resource",
    "recover": "watch the run; after a preemption recreate, set up and relaunch",
}


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser: one sub-command per step, every setting as a flag."""
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--settings", help="KEY=VALUE settings file (default: "
                      "$BERT_JAX_SETTINGS, else tpu_scripts/settings.env if present)")
  common.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="print the gcloud commands instead of running them")
  for spec in settings.SPECS:
    choices = f" ({'|'.join(spec.choices)})" if spec.choices else ""
    common.add_argument(f"--{spec.key.lower()}", dest=spec.key, default=None,
                        metavar=spec.kind.upper() if spec.kind != "choice" else "MODE",
                        help=f"{spec.help}{choices} [{spec.key}, default {spec.default!r}]")
  parser = argparse.ArgumentParser(
      prog="tpu.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
      epilog="Config overrides (--config.a.b=value) follow launch and recover.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, text in HELP.items():
    p = sub.add_parser(name, parents=[common], allow_abbrev=False, help=text, description=text)
    if name in ("setup", "launch", "recover"):
      p.add_argument("--allow_dirty", action="store_true",
                     help="ship uncommitted edits too (launch.json records their hash); "
                     "default: the checkout's HEAD commit only")
    if name in ("launch", "recover"):
      p.add_argument("--take_over", action="store_true",
                     help="take over the workdir's lease when it is stale "
                     "(no heartbeat for LEASE_STALE_SECONDS)")
    if name == "logs":
      p.add_argument("--worker", type=int, default=0, help="which worker's log (default 0)")
      p.add_argument("--lines", type=int, default=100, help="lines of history to print")
      p.add_argument("--no_follow", action="store_true", help="print and exit")
  return parser


def _settings_file(flag: str | None) -> str | None:
  if flag:
    return flag
  if os.environ.get("BERT_JAX_SETTINGS"):
    return os.environ["BERT_JAX_SETTINGS"]
  return str(DEFAULT_SETTINGS) if DEFAULT_SETTINGS.is_file() else None


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns the exit status (2: bad input, 1: cloud failure)."""
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  overrides = [a for a in unknown if a.startswith("--config.") and "=" in a]
  rest = [a for a in unknown if a not in overrides]
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)} (config overrides are "
                 "--config.a.b=value)")
  prefix = f"tpu.py {args.command}: error:"
  try:
    flags = {spec.key: getattr(args, spec.key) for spec in settings.SPECS}
    s = settings.resolve(_settings_file(args.settings), os.environ, flags)
    tpu = commands.validate(args.command, s, overrides)
    ctx = commands.Context(s=s, slice=tpu, gc=Gcloud(dry_run=args.dry_run),
                           allow_dirty=getattr(args, "allow_dirty", False),
                           take_over=getattr(args, "take_over", False))
  except (settings.SettingsError, commands.UsageError) as e:
    print(f"{prefix} {e}", file=sys.stderr)
    return 2
  except CloudError as e:  # gcloud missing
    print(f"{prefix} {e}", file=sys.stderr)
    return 1
  try:
    if args.command == "logs":
      return commands.logs(ctx, args.worker, args.lines, follow=not args.no_follow)
    if args.command in ("launch", "recover"):
      run = commands.launch if args.command == "launch" else recover.recover
      return run(ctx, overrides)
    return getattr(commands, args.command)(ctx)
  except (settings.SettingsError, commands.UsageError) as e:
    print(f"{prefix} {e}", file=sys.stderr)
    return 2
  except CloudError as e:
    print(f"{prefix} {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"tpu.py {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
