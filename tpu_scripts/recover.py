"""recover: keep a run going on spot/preemptible slices (the watcher).

The run is the one WORKDIR/launch.json records: recover relaunches that
config, those overrides and that revision, never its own flags (with no
record yet, it starts a new run from its flags, and that launch writes one).
Every WATCH_SECONDS it reads WORKDIR/stopped.json, asks the cloud for the
slice's state and every worker for the job's:
- a stop marker newer than recover's start: `tpu.py stop` ran; recover exits 0;
- slice lost (node PREEMPTED/TERMINATED, queued resource SUSPENDED/FAILED, or
  gone): delete, recreate, set up the recorded revision, relaunch; the trainer
  resumes from the last checkpoint in the (gs://) workdir;
- job running on every worker: all is well, unless WORKDIR/metrics.jsonl has
  had no new line for HUNG_SECONDS: then it is hung, and is stopped and
  relaunched (it resumes from the checkpoint);
- job exited 0 everywhere: the run is finished, recover exits 0;
- job exited non-zero (not 143, a preemption signal) on a READY slice: a
  failure of the run, not of the machine; recover stops and says so;
- job gone or exited 143 (VM restarted, maintenance): relaunch.
A job state is acted on only when two checks in a row agree, because a
preempted job may exit a little before the cloud reports the preemption.
Recovery attempts that do not get the job running again count up; after
MAX_ATTEMPTS of them in a row recover gives up with a non-zero exit. Every
decision is logged with its UTC time.
"""
from __future__ import annotations

import time
from typing import Sequence

from tpu_scripts import checkout, commands, gcloud, remote, workdir
from tpu_scripts.commands import NOT_FOUND, Context, UsageError, log
from tpu_scripts.gcloud import CloudError

HEARTBEAT_SECONDS = 600  # an unchanged state is still logged this often


def job_state(ctx: Context) -> str | None:
  """The job on all workers: 'running', 'stopped', 'exited:N', 'gone', or None (no answer).

  A job is one program over all workers: it runs while each worker runs it
  (or has finished with 0); one worker's crash is the run's crash; one
  worker's job gone while others run is a broken run to relaunch.
  """
  result = ctx.gc.run(gcloud.ssh(ctx.s, remote.job_script(ctx.s.log_dir)), capture=True,
                      check=False)
  states = remote.parse_jobs(result.stdout)
  if len(states) < ctx.slice.workers:
    return None
  found = set(states.values())
  if "stopped" in found:
    return "stopped"
  crashed = sorted(v for v in found if v.startswith("exited:") and v not in ("exited:0",
                                                                              "exited:143"))
  if crashed:
    return crashed[0]
  if found <= {"running", "exited:0"}:
    return "running" if "running" in found else "exited:0"
  return "exited:143" if "exited:143" in found and "gone" not in found else "gone"


def recorded_revision(ctx: Context, record: dict) -> checkout.Revision:
  """The recorded code, shipped again; uncommitted edits only if this checkout still has them."""
  if not record.get("dirty"):
    return commands.revision(ctx, record["revision"])
  here = checkout.revision(commands.source_dir(ctx.s), True)
  if here.stamp != record["stamp"]:
    raise CloudError(f"run {record['run_id']} ran uncommitted edits ({record['stamp']}); this "
                     f"checkout is {here.stamp}, so recover cannot ship the same code")
  return here


def rebuild(ctx: Context, record: dict) -> None:
  """Delete (whatever is left), create, wait, set up the recorded revision and relaunch."""
  result = ctx.gc.run(gcloud.delete(ctx.s), capture=True, check=False)
  if result.returncode != 0:
    # Usually "not found": the preemption already took it.
    log(f"delete returned {result.returncode} (ignored): {result.stderr.strip()[-200:]}")
  commands.create_resource(ctx)
  commands.wait_ready(ctx)
  commands.setup(ctx, recorded_revision(ctx, record))
  commands.launch(ctx, record=record, check_ready=False)


def restart(ctx: Context, record: dict) -> None:
  """Stop the job (no stop marker: recover's own stop), then relaunch it on the same slice."""
  ctx.gc.run(gcloud.ssh(ctx.s, remote.stop_script(ctx.s.stop_grace_seconds)))
  commands.launch(ctx, record=record, check_ready=False)


def load_record(ctx: Context, overrides: Sequence[str]) -> dict:
  """WORKDIR/launch.json, checked against recover's flags; else a new run from the flags."""
  s = ctx.s
  record = workdir.read_json(ctx, workdir.RECORD)
  if record is None:
    log(f"no {workdir.RECORD} in {s.workdir}: a new run from the flags")
    return commands.new_run(ctx, overrides)
  given = [*s.split("OVERRIDES"), *overrides]
  if overrides and given != record["overrides"]:
    raise UsageError(f"{workdir.url(s, workdir.RECORD)} records run {record['run_id']} with "
                     f"overrides {' '.join(record['overrides']) or '(none)'}; recover relaunches "
                     "that run as it was: drop the --config.* flags, or launch a new run")
  if s.config and s.config != record["config"]:
    log(f"CONFIG {s.config} is not used: the run was launched with {record['config']}")
  log(f"run {record['run_id']}: {record['config']} {' '.join(record['overrides'])} at "
      f"{record['stamp']} (from {workdir.url(s, workdir.RECORD)})")
  return record


class _Hang:
  """Tells a hung job: no new metrics.jsonl line for HUNG_SECONDS while it runs."""

  def __init__(self, ctx: Context):
    self.ctx, self.last, self.since = ctx, None, ctx.clock()

  def reset(self) -> None:
    self.last, self.since = None, self.ctx.clock()

  def hung_for(self) -> float | None:
    """Seconds without a new metrics line when over the limit, else None."""
    limit = self.ctx.s.hung_seconds
    if not limit:
      return None
    result = self.ctx.gc.run(gcloud.storage_tail(workdir.url(self.ctx.s, "metrics.jsonl"), 4096),
                             capture=True, check=False)
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    last, now = (lines[-1] if lines else None), self.ctx.clock()
    if last != self.last:
      self.last, self.since = last, now
      return None
    return now - self.since if now - self.since > limit else None


def _dry_run(ctx: Context, overrides: Sequence[str]) -> int:
  record = commands.new_run(ctx, overrides)
  print(f"# recover: read {workdir.url(ctx.s, workdir.RECORD)} (its run, not these flags), "
        f"then every {ctx.s.watch_seconds:g} s")
  workdir.read_json(ctx, workdir.STOPPED)
  if ctx.s.queued:
    ctx.gc.run(gcloud.describe_queued(ctx.s))
  ctx.gc.run(gcloud.describe_node(ctx.s))
  ctx.gc.run(gcloud.ssh(ctx.s, remote.job_script(ctx.s.log_dir)))
  ctx.gc.run(gcloud.storage_tail(workdir.url(ctx.s, "metrics.jsonl"), 4096))
  print("# when the slice is preempted or gone:")
  rebuild(ctx, record)
  return 0


def recover(ctx: Context, overrides: Sequence[str] = ()) -> int:
  """Watches the slice and the job; recreates and relaunches after preemptions.

  Returns:
    0 when the job finished with exit code 0, or `tpu.py stop` stopped it.

  Raises:
    CloudError: the job failed on a healthy slice, or MAX_ATTEMPTS recoveries
      in a row did not get it running.
  """
  if ctx.dry:
    return _dry_run(ctx, overrides)
  s = ctx.s
  record = load_record(ctx, overrides)
  seen_stop = (workdir.read_json(ctx, workdir.STOPPED) or {}).get("id")
  attempts, preemptions, pending, said, said_at = 0, 0, None, None, 0.0
  hang = _Hang(ctx)
  log(f"watching {s.name} every {s.watch_seconds:g} s (workdir {s.workdir}); giving up after "
      f"{s.max_attempts} recoveries in a row that do not get the job running")

  def attempt(what: str, action) -> None:
    nonlocal attempts
    if attempts >= s.max_attempts:
      raise CloudError(f"gave up after {attempts} recovery attempts in a row that did not get "
                       f"the job running (MAX_ATTEMPTS={s.max_attempts})")
    attempts += 1
    log(f"{what}: recovery attempt {attempts} of {s.max_attempts}")
    try:
      action()
    except CloudError as e:
      log(f"recovery attempt {attempts} failed: {e}")
      if attempts >= s.max_attempts:
        raise CloudError(f"gave up after {attempts} failed recovery attempts in a row "
                         f"(MAX_ATTEMPTS={s.max_attempts}); last error: {e}") from None
    hang.reset()

  while True:
    marker = workdir.read_json(ctx, workdir.STOPPED)
    if marker and marker.get("id") != seen_stop:
      log(f"stopped by `tpu.py stop` ({marker.get('by')} at {marker.get('time')}): not "
          "relaunching; run recover again to resume")
      return 0
    kind, detail = commands.slice_health(ctx)
    if kind == "lost" and said is None and NOT_FOUND in detail:
      log(f"{s.name} does not exist yet ({detail}): creating, setting up and launching")
      attempt("create", lambda: rebuild(ctx, record))
    elif kind == "lost":
      preemptions += 1
      log(f"slice lost ({detail}): preemption #{preemptions}; recreating it")
      attempt("recreate", lambda: rebuild(ctx, record))
      pending = None
    elif kind == "ready":
      job = job_state(ctx)
      if job == "running":
        attempts, pending = 0, None
        stalled = hang.hung_for()
        if stalled is not None:
          log(f"hung: no new line in {s.workdir}/metrics.jsonl for {stalled:.0f} s (HUNG_SECONDS="
              f"{s.hung_seconds:g}); stopping it and relaunching from the checkpoint")
          attempt("hung job", lambda: restart(ctx, record))
      elif job is None:
        log("could not read the job state on every worker; checking again")
      elif job != pending:
        pending = job  # act only when the next check agrees
      elif job == "exited:0":
        log(f"the job finished (exit code 0) after {preemptions} preemption(s)")
        return 0
      elif job.startswith("exited:") and job != "exited:143":
        raise CloudError(f"the job exited with code {job.split(':')[1]} while the slice is "
                         "READY: a failure of the run, not a preemption, so recover does not "
                         "relaunch it; read `tpu.py logs`")
      else:
        attempt(f"job {job} (never launched, stopped before recover started, or killed with "
                "its VM); launching", lambda: commands.launch(ctx, record=record,
                                                              check_ready=False))
        pending = None
      detail = f"{detail}, job {job or 'unknown'}"
    if detail != said or time.monotonic() - said_at > HEARTBEAT_SECONDS:
      log(detail)
      said, said_at = detail, time.monotonic()
    ctx.sleep(s.watch_seconds)
