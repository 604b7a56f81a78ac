"""The TPU commands: validate, create, setup, launch, logs, status, stop, delete.

Each command takes a `Context` (resolved settings, the parsed slice, the gcloud
runner). Input is validated by `validate` before the runner exists, so bad
input never reaches the cloud. `recover.py` composes these into its watch loop.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
import tempfile
import time
from typing import Callable, Sequence

from tpu_scripts import accelerators, checkout, config_check, gcloud, remote, workdir
from tpu_scripts.gcloud import CloudError, Gcloud
from tpu_scripts.settings import Settings

NOT_FOUND, ERROR = "NOT_FOUND", "ERROR"
# States a slice does not come back from: it must be deleted and recreated.
LOST_QUEUED = {"SUSPENDING", "SUSPENDED", "FAILED"}
LOST_NODE = {"PREEMPTED", "TERMINATED"}
NEEDS_CONFIG = ("launch", "recover")
NEEDS_SOURCE = ("setup", "recover")


class UsageError(ValueError):
  """Bad input: a setting, flag or file that makes the command impossible."""


@dataclasses.dataclass
class Context:
  """What every command needs."""
  s: Settings
  slice: accelerators.Slice
  gc: Gcloud
  sleep: Callable[[float], None] = time.sleep
  clock: Callable[[], float] = time.time  # wall clock: leases, markers, hang detection
  allow_dirty: bool = False  # ship (and record) uncommitted edits
  take_over: bool = False  # launch: take over a stale lease

  @property
  def dry(self) -> bool:
    """True in a dry run: commands are printed, nothing is run."""
    return self.gc.dry_run


def log(message: str) -> None:
  """Prints a progress line stamped with the UTC date and time (recover's log is a record)."""
  print(f"[{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}] {message}", flush=True)


def source_dir(s: Settings) -> pathlib.Path:
  """The checkout that setup ships: SOURCE_DIR, else the one holding tpu_scripts/."""
  return pathlib.Path(s.source_dir).expanduser() if s.source_dir else checkout.repo_root()


def validate(command: str, s: Settings, overrides: Sequence[str]) -> accelerators.Slice:
  """Checks every input `command` needs; returns the parsed slice.

  Raises:
    UsageError / SettingsError: naming the setting and what is wrong with it.
  """
  s.require("PROJECT", "ZONE", "NAME", "ACCELERATOR_TYPE")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", s.name):
    raise UsageError(f"NAME ({s.sources['NAME']}): {s.name!r} is not a valid TPU name "
                     "(lower-case letters, digits and '-', starting with a letter)")
  try:
    tpu = accelerators.parse(s.accelerator_type, s.runtime_version)
  except ValueError as e:
    raise UsageError(f"ACCELERATOR_TYPE ({s.sources['ACCELERATOR_TYPE']}): {e}") from None
  for key in ("OVERRIDES", "ENV", "SSH_FLAGS", "CREATE_FLAGS", "PIP_EXTRA"):
    s.split(key)  # a malformed value fails here, not halfway through a run
  if gcloud.IAP_FLAG in s.split("SSH_FLAGS"):
    raise UsageError(f"SSH_FLAGS ({s.sources['SSH_FLAGS']}): {gcloud.IAP_FLAG} is not a flag of "
                     "the GA `gcloud compute tpus tpu-vm ssh/scp`; set IAP=true, which runs "
                     "them as `gcloud alpha ...` with the flag")
  if s.iap and "--internal-ip" in s.split("SSH_FLAGS"):
    raise UsageError(f"IAP ({s.sources['IAP']}) and --internal-ip in SSH_FLAGS exclude each other")
  if overrides and command not in NEEDS_CONFIG:
    raise UsageError(f"config overrides ({' '.join(overrides)}) only go with launch or recover")
  if command in NEEDS_SOURCE:
    try:
      checkout.list_files(source_dir(s))
    except ValueError as e:
      raise UsageError(str(e)) from None
  if command in NEEDS_CONFIG:
    _validate_job(command, s, tpu)
  return tpu


def _validate_job(command: str, s: Settings, tpu: accelerators.Slice) -> None:
  # recover takes the config from WORKDIR/launch.json when there is one.
  s.require(*(("WORKDIR",) if command == "recover" else ("CONFIG", "WORKDIR")))
  config_file = s.config.split(":", 1)[0]
  if config_file and not config_file.startswith("/") and not (
      source_dir(s) / config_file).is_file():
    raise UsageError(f"CONFIG ({s.sources['CONFIG']}): {config_file} is not a file of the "
                     f"checkout {source_dir(s)} that setup copies to the workers")
  for item in s.split("ENV"):
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      raise UsageError(f"ENV ({s.sources['ENV']}): {item!r} is not KEY=VALUE")
  if not s.workdir.startswith("gs://"):
    if tpu.multi_host:
      raise UsageError(
          f"WORKDIR ({s.sources['WORKDIR']}) is {s.workdir!r}, but {tpu.accelerator_type} has "
          f"{tpu.workers} workers: each would write its own local folder and no worker could "
          "restore the others' checkpoint shards; use a gs:// workdir "
          "(e.g. WORKDIR=gs://BUCKET/runs/NAME, or set BUCKET)")
    if command == "recover":
      raise UsageError(f"WORKDIR ({s.sources['WORKDIR']}) is {s.workdir!r}: recover deletes and "
                       "recreates the VM, which loses a local workdir and its checkpoints; use "
                       "a gs:// workdir")


# ---------------------------------------------------------------------------
# State queries.
# ---------------------------------------------------------------------------

def _state(ctx: Context, argv: list[str]) -> str:
  result = ctx.gc.run(argv, capture=True, check=False)
  if result.returncode == 0:
    return result.stdout.strip().upper() or "UNKNOWN"
  if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
    return NOT_FOUND
  log(f"state query failed (exit {result.returncode}): {result.stderr.strip()[-300:]}")
  return ERROR


def queued_state(ctx: Context) -> str:
  """State of the queued resource, NOT_FOUND, or ERROR when gcloud failed otherwise."""
  return _state(ctx, gcloud.describe_queued(ctx.s))


def node_state(ctx: Context) -> str:
  """State of the TPU node, NOT_FOUND, or ERROR when gcloud failed otherwise."""
  return _state(ctx, gcloud.describe_node(ctx.s))


def slice_health(ctx: Context) -> tuple[str, str]:
  """('ready' | 'lost' | 'waiting' | 'unknown', description)."""
  if ctx.s.queued:
    state = queued_state(ctx)
    if state in LOST_QUEUED or state == NOT_FOUND:
      return "lost", f"queued resource {state}"
    if state == ERROR:
      return "unknown", "queued resource state unknown"
    if state != "ACTIVE":
      return "waiting", f"queued resource {state}"
  state = node_state(ctx)
  if state == "READY":
    return "ready", "node READY"
  if state in LOST_NODE or state == NOT_FOUND:
    return "lost", f"node {state}"
  return ("unknown" if state == ERROR else "waiting"), f"node {state}"


def _poll(ctx: Context, what: str, query: Callable[[Context], str], good: str,
          bad: set[str], deadline: float) -> None:
  last = None
  start = time.monotonic()
  while True:
    state = query(ctx)
    if state != last:
      log(f"{what} {ctx.s.name}: {state} ({time.monotonic() - start:.0f} s)")
      last = state
    if state == good:
      return
    if state in bad:
      raise CloudError(f"{what} {ctx.s.name} reached {state} while waiting for {good}")
    if time.monotonic() > deadline:
      raise CloudError(f"{what} {ctx.s.name} not {good} after {ctx.s.wait_timeout_seconds:.0f} s "
                       f"(last state {state}); WAIT_TIMEOUT_SECONDS sets the limit")
    ctx.sleep(ctx.s.poll_seconds)


def wait_ready(ctx: Context) -> None:
  """Polls until the queued resource is ACTIVE (if any) and the node READY."""
  if ctx.dry:
    print(f"# then poll every {ctx.s.poll_seconds:g} s until "
          f"{'the queued resource is ACTIVE and ' if ctx.s.queued else ''}the node is READY")
    return
  deadline = time.monotonic() + ctx.s.wait_timeout_seconds
  if ctx.s.queued:
    _poll(ctx, "queued resource", queued_state, "ACTIVE", LOST_QUEUED, deadline)
  _poll(ctx, "node", node_state, "READY", LOST_NODE, deadline)


# ---------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------

def create_resource(ctx: Context) -> None:
  """Runs the create call (no checks, no waiting)."""
  t = ctx.slice
  log(f"creating {'queued resource' if ctx.s.queued else 'TPU VM'} {ctx.s.name}: "
      f"{t.accelerator_type} = {t.chips} chips on {t.workers} worker(s), runtime "
      f"{t.runtime_version}, {ctx.s.provisioning}")
  ctx.gc.run(gcloud.create(ctx.s, t.runtime_version))


def create(ctx: Context) -> int:
  """Creates the slice unless it exists, then waits until it is READY."""
  if not ctx.dry:
    state = queued_state(ctx) if ctx.s.queued else node_state(ctx)
    if state == ERROR:
      raise CloudError(f"cannot query {ctx.s.name} (see the gcloud message above)")
    if state in LOST_QUEUED | LOST_NODE:
      raise CloudError(f"{ctx.s.name} exists in state {state}: run `tpu.py delete` first, or "
                       "`tpu.py recover`, which recreates it")
    if state != NOT_FOUND:
      log(f"{ctx.s.name} already exists ({state}); not creating it again")
      wait_ready(ctx)
      return 0
  create_resource(ctx)
  wait_ready(ctx)
  log(f"{ctx.s.name} is ready; next: tpu.py setup")
  return 0


def revision(ctx: Context, commit: str = "") -> checkout.Revision:
  """The code setup ships and launch records: HEAD (or `commit`), edits only if allowed."""
  try:
    return checkout.revision(source_dir(ctx.s), ctx.allow_dirty, commit)
  except ValueError as e:
    raise UsageError(str(e)) from None


def setup(ctx: Context, rev: checkout.Revision | None = None) -> int:
  """Copies one revision to every worker, installs it in a venv, checks the devices."""
  s, root = ctx.s, source_dir(ctx.s)
  rev = rev or revision(ctx)
  if not rev.dirty and checkout.revision(root, True, rev.commit).dirty:
    log(f"{root} has uncommitted edits; shipping commit {rev.commit[:12]} without them "
        "(--allow_dirty ships them, and launch.json records it)")
  with tempfile.TemporaryDirectory(prefix="bert_jax_tpu_") as tmp:
    tarball = str(pathlib.Path(tmp) / remote.TARBALL)
    if ctx.dry:
      print(f"# pack {rev.stamp} of {root} into {tarball}")
    else:
      log(f"packed {checkout.pack(root, tarball, rev)} files of {root} at {rev.stamp}")
    ctx.gc.run(gcloud.scp(s, tarball, remote.TARBALL))
  log(f"installing bert_jax[tpu] in ~/{s.venv} on {ctx.slice.workers} worker(s)")
  result = ctx.gc.run(gcloud.ssh(s, remote.setup_script(s.remote_dir, s.venv, s.python,
                                                        s.split("PIP_EXTRA"))),
                      capture=True, check=False)
  if not result.dry:
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr[-4000:])
    if "BERT_JAX_BUSY" in result.stdout:
      raise CloudError("a bert_jax job is running on the slice; setup would replace its code: "
                       "`tpu.py stop` first")
    if result.returncode != 0:
      raise CloudError(f"setup failed on at least one worker (ssh exit {result.returncode}); "
                       "its output is above")
  check_devices(ctx)
  return 0


def check_devices(ctx: Context) -> None:
  """jax.device_count() / process_count() on every worker against the accelerator type."""
  t = ctx.slice
  result = ctx.gc.run(gcloud.ssh(ctx.s, remote.check_script(ctx.s.venv, t.devices, t.workers)),
                      capture=True, check=False)
  if result.dry:
    return
  sys.stdout.write(result.stdout)
  sys.stderr.write(result.stderr[-4000:])
  checks, skipped = remote.parse_checks(result.stdout)
  if skipped and result.returncode == 0:
    log(f"device check skipped on {skipped} worker(s): a bert_jax job holds the TPU "
        "(`tpu.py stop`, then `tpu.py setup` again to check)")
    return
  wrong = [c for c in checks if (c["devices"], c["processes"]) != (t.devices, t.workers)]
  seen = {c["process"] for c in checks}
  if result.returncode != 0 or wrong or len(seen) != t.workers:
    got = "; ".join(f"process {c['process']}: {c['devices']} devices, {c['processes']} processes"
                    for c in checks) or "no report"
    raise CloudError(f"device check failed: {t.accelerator_type} should give "
                     f"jax.device_count()={t.devices} and jax.process_count()={t.workers} on "
                     f"each of its {t.workers} worker(s); got {got} (ssh exit "
                     f"{result.returncode})")
  log(f"device check passed: {t.workers} worker(s) see {t.devices} devices "
      f"and {t.workers} process(es)")


def train_argv(s: Settings, record: dict) -> list[str]:
  """`bert-jax` arguments of the job: command, config, workdir, overrides (from the record)."""
  return [record["command"], f"--config={record['config']}", f"--workdir={s.workdir}",
          *record["overrides"]]


def new_run(ctx: Context, overrides: Sequence[str]) -> dict:
  """The record of a new run, after its config was built locally from the shipped code.

  Raises:
    UsageError: the config does not build (the CLI's own message), or the
      checkout cannot be pinned; nothing has been asked of the cloud.
  """
  s = ctx.s
  s.require("CONFIG")
  rev = revision(ctx)
  all_overrides = [*s.split("OVERRIDES"), *overrides]
  with tempfile.TemporaryDirectory(prefix="bert_jax_config_") as tmp:
    tree = source_dir(s)
    if not rev.dirty:  # check the config of the commit that will run, not the working tree
      checkout.export(tree, rev, tmp)
      tree = pathlib.Path(tmp)
    try:
      config_check.check(tree, s.command, s.config, s.workdir, all_overrides)
    except config_check.ConfigCheckError as e:
      raise UsageError(str(e)) from None
  now = ctx.clock()
  return workdir.make_record(s, rev, all_overrides, workdir.new_run_id(now), now)


def require_ready(ctx: Context) -> None:
  """Raises CloudError naming the slice's state unless it is READY."""
  kind, detail = slice_health(ctx)
  if kind != "ready" and not ctx.dry:
    raise CloudError(f"{ctx.s.name} is not READY ({detail}): launch needs a READY slice "
                     "(`tpu.py create` waits for one; `tpu.py status` shows it)")


def launch(ctx: Context, overrides: Sequence[str] = (), record: dict | None = None,
           check_ready: bool = True) -> int:
  """Checks the run, then starts it detached on all workers under a lease.

  Order: the config (local, no gcloud) -> the slice is READY -> the workdir's
  lease -> the workers hold the recorded code, leftovers stopped -> record,
  lease -> start. A `record` (recover) relaunches that run as it was.
  """
  s = ctx.s
  record = record or new_run(ctx, overrides)
  if check_ready:
    require_ready(ctx)
  if not ctx.dry:
    workdir.check_lease(ctx, ctx.clock(), ctx.take_over)
  log(f"checking the workers hold {record['stamp']}; stopping leftover bert_jax processes and "
      f"removing {remote.LOCKFILE} on all workers")
  result = ctx.gc.run(gcloud.ssh(s, remote.prepare_script(s.remote_dir, record["stamp"],
                                                          s.stop_grace_seconds)),
                      capture=True, check=False)
  if not result.dry:
    sys.stdout.write(result.stdout)
    wrong = re.findall(r"BERT_JAX_WRONG_CODE (\S+) has (\S+)", result.stdout)
    if wrong:
      raise CloudError(f"worker {wrong[0][0]} holds code {wrong[0][1]}, but this run is "
                       f"{record['stamp']}: run `tpu.py setup` first (with --allow_dirty if the "
                       "run ships uncommitted edits)")
    if result.returncode != 0:
      raise CloudError(f"preparing the workers failed (ssh exit {result.returncode}): "
                       f"{result.stderr.strip()[-300:]}")
  now = ctx.clock()
  workdir.write_json(ctx, workdir.RECORD, record)
  workdir.write_json(ctx, workdir.LEASE, workdir.lease_record(s, record["run_id"], now,
                                                              "launching"))
  stamp = workdir.utc(now).replace("-", "").replace(":", "")
  run = {"lease": workdir.url(s, workdir.LEASE), "run_id": record["run_id"],
         "holder": json.dumps(workdir.holder(s)), "every": f"{s.heartbeat_seconds:g}",
         "logs": workdir.url(s, f"logs/{s.name}-{stamp}")}
  if not workdir.is_remote(s):
    run.update(record=json.dumps(record, sort_keys=True),
               record_path=workdir.url(s, workdir.RECORD))
  argv = train_argv(s, record)
  log(f"launching run {record['run_id']} ({record['stamp']}) on {ctx.slice.workers} worker(s): "
      f"bert-jax {' '.join(argv)}")
  ctx.gc.run(gcloud.ssh(s, remote.launch_script(s.remote_dir, s.venv, s.log_dir, argv,
                                                record["env"], run)))
  log(f"running; logs in ~/{s.log_dir}/train.log on each worker and {run['logs']}/: "
      "tpu.py logs / tpu.py status")
  return 0


def logs(ctx: Context, worker: int = 0, lines: int = 100, follow: bool = True) -> int:
  """Prints (and by default follows) one worker's log."""
  path = f"{remote.home_path(ctx.s.log_dir)}/train.log"
  command = f"tail -n {int(lines)} {'-F ' if follow else ''}{path}"
  try:
    ctx.gc.run(gcloud.ssh(ctx.s, command, worker=str(worker)))
  except KeyboardInterrupt:
    pass
  return 0


def _last_metrics(ctx: Context, worker_lines: str) -> tuple[str, dict[str, float]]:
  url = f"{ctx.s.workdir.rstrip('/')}/metrics.jsonl"
  if url.startswith("gs://"):
    result = ctx.gc.run(gcloud.storage_tail(url), capture=True, check=False)
    text = result.stdout if result.returncode == 0 else ""
  else:
    text = "\n".join(line.partition("BERT_JAX_METRICS")[2] for line in worker_lines.splitlines()
                     if "BERT_JAX_METRICS" in line)
  for line in reversed(text.splitlines()):
    progress = remote.parse_progress(line)
    if "step" in progress:
      return url, progress
  return url, {}


def status(ctx: Context) -> int:
  """One line for the slice, one per worker (job state, step, loss, tokens/s), metrics."""
  s = ctx.s
  kind, detail = slice_health(ctx)
  print(f"{s.name} ({ctx.slice.accelerator_type}, {ctx.slice.workers} worker(s)): {detail}")
  if kind != "ready" and not ctx.dry:
    return 0 if kind == "waiting" else 1
  local = None if not s.workdir or s.workdir.startswith("gs://") else f"{s.workdir}/metrics.jsonl"
  result = ctx.gc.run(gcloud.ssh(s, remote.status_script(s.log_dir, local)), capture=True,
                      check=False)
  rows = re.findall(r"BERT_JAX_STATUS worker=(\S+) job=(\S+) last=(.*)", result.stdout)
  for worker, job, last in sorted(rows, key=lambda r: (len(r[0]), r[0])):
    progress = remote.format_progress(remote.parse_progress(last))
    print(f"worker {worker}: {job:<10} {progress or ('last log: ' + last.strip())}")
  if not rows and not result.dry:
    print(f"no worker answered (ssh exit {result.returncode}): {result.stderr.strip()[-300:]}")
  if s.workdir:
    url, progress = _last_metrics(ctx, result.stdout)
    if not result.dry:
      print(f"metrics {url}: {remote.format_progress(progress) or 'none yet'}")
  return 0


def stop(ctx: Context) -> int:
  """Stops the job on all workers (SIGTERM first, so it can checkpoint).

  WORKDIR/stopped.json is written first: a recover watching the run reads it
  and stays stopped instead of relaunching.
  """
  if ctx.s.workdir:
    workdir.write_json(ctx, workdir.STOPPED, workdir.stop_marker(ctx.clock()))
  ctx.gc.run(gcloud.ssh(ctx.s, remote.stop_script(ctx.s.stop_grace_seconds, ctx.s.log_dir)))
  return 0


def copy_logs(ctx: Context) -> None:
  """Copies every worker's log to WORKDIR/logs/ (best effort: a preempted VM cannot answer)."""
  result = ctx.gc.run(gcloud.ssh(ctx.s, remote.copy_logs_script(ctx.s.log_dir)), capture=True,
                      check=False)
  if not result.dry:
    copied = result.stdout.count("BERT_JAX_LOGS_COPIED")
    log(f"copied the logs of {copied} of {ctx.slice.workers} worker(s) to {ctx.s.workdir}/logs/"
        + ("" if result.returncode == 0 else f" (ssh exit {result.returncode})"))


def delete(ctx: Context) -> int:
  """Copies the workers' logs to the workdir, then deletes the node (and queued resource)."""
  if ctx.s.workdir and slice_health(ctx)[0] == "ready":
    copy_logs(ctx)
  log(f"deleting {'queued resource and node' if ctx.s.queued else 'TPU VM'} {ctx.s.name}")
  ctx.gc.run(gcloud.delete(ctx.s))
  return 0
