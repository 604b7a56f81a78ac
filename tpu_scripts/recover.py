"""recover: keep a run going on spot/preemptible slices.

Every WATCH_SECONDS it asks the cloud for the slice's state and worker 0 for
the job's:
- slice lost (node PREEMPTED/TERMINATED, queued resource SUSPENDED/FAILED, or
  gone): delete, recreate, set up, relaunch with the same config and workdir;
  the trainer resumes from the last checkpoint in the (gs://) workdir;
- job running: all is well;
- job exited 0: the run is finished, recover exits 0;
- job exited non-zero on a READY slice: a failure of the run, not of the
  machine; recover stops and says so rather than relaunch a crash in a loop;
- job gone without an exit code (VM restarted under it): relaunch.
A job state is acted on only when two checks in a row agree, because a
preempted job may exit a little before the cloud reports the preemption.
Recovery attempts that do not get the job running again count up; after
MAX_ATTEMPTS of them in a row recover gives up with a non-zero exit.
"""
from __future__ import annotations

import time
from typing import Sequence

from tpu_scripts import commands, gcloud, remote
from tpu_scripts.commands import NOT_FOUND, Context, log
from tpu_scripts.gcloud import CloudError

HEARTBEAT_SECONDS = 600  # an unchanged state is still logged this often


def job_state(ctx: Context) -> str | None:
  """'running', 'exited:N', 'stopped' on worker 0, or None when ssh failed."""
  result = ctx.gc.run(gcloud.ssh(ctx.s, remote.job_script(ctx.s.log_dir), worker="0"),
                      capture=True, check=False)
  return remote.parse_job(result.stdout)


def rebuild(ctx: Context, overrides: Sequence[str]) -> None:
  """Delete (whatever is left), create, wait, set up and launch."""
  result = ctx.gc.run(gcloud.delete(ctx.s), capture=True, check=False)
  if result.returncode != 0:
    # Usually "not found": the preemption already took it.
    log(f"delete returned {result.returncode} (ignored): {result.stderr.strip()[-200:]}")
  commands.create_resource(ctx)
  commands.wait_ready(ctx)
  commands.setup(ctx)
  commands.launch(ctx, overrides)


def _dry_run(ctx: Context, overrides: Sequence[str]) -> int:
  print(f"# recover: every {ctx.s.watch_seconds:g} s")
  if ctx.s.queued:
    ctx.gc.run(gcloud.describe_queued(ctx.s))
  ctx.gc.run(gcloud.describe_node(ctx.s))
  ctx.gc.run(gcloud.ssh(ctx.s, remote.job_script(ctx.s.log_dir), worker="0"))
  print("# when the slice is preempted or gone:")
  rebuild(ctx, overrides)
  return 0


def recover(ctx: Context, overrides: Sequence[str] = ()) -> int:
  """Watches the slice and the job; recreates and relaunches after preemptions.

  Returns:
    0 when the job finished with exit code 0.

  Raises:
    CloudError: the job failed on a healthy slice, or MAX_ATTEMPTS recoveries
      in a row did not get it running.
  """
  if ctx.dry:
    return _dry_run(ctx, overrides)
  s = ctx.s
  attempts, preemptions, pending, said, said_at = 0, 0, None, None, 0.0
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

  while True:
    kind, detail = commands.slice_health(ctx)
    if kind == "lost" and said is None and NOT_FOUND in detail:
      log(f"{s.name} does not exist yet ({detail}): creating, setting up and launching")
      attempt("create", lambda: rebuild(ctx, overrides))
    elif kind == "lost":
      preemptions += 1
      log(f"slice lost ({detail}): preemption #{preemptions}; recreating it")
      attempt("recreate", lambda: rebuild(ctx, overrides))
      pending = None
    elif kind == "ready":
      job = job_state(ctx)
      if job == "running":
        attempts, pending = 0, None
      elif job is None:
        log("could not read the job state on worker 0; checking again")
      elif job != pending:
        pending = job  # act only when the next check agrees
      elif job == "exited:0":
        log(f"the job finished (exit code 0) after {preemptions} preemption(s)")
        return 0
      elif job.startswith("exited:"):
        raise CloudError(f"the job exited with code {job.split(':')[1]} on worker 0 while the "
                         "slice is READY: a failure of the run, not a preemption, so recover does "
                         "not relaunch it; read `tpu.py logs`")
      else:
        attempt("job not running and no exit code (never launched, or killed with its VM); "
                "launching",
                lambda: commands.launch(ctx, overrides))
        pending = None
      detail = f"{detail}, job {job or 'unknown'}"
    if detail != said or time.monotonic() - said_at > HEARTBEAT_SECONDS:
      log(detail)
      said, said_at = detail, time.monotonic()
    ctx.sleep(s.watch_seconds)
