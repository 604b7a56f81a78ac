"""What tpu_scripts keep in the run's workdir: the run record, the lease, the stop marker.

- launch.json: the run record, written by launch: git revision (and whether
  uncommitted edits were shipped, with their hash), config, overrides,
  settings, time. recover relaunches from it, not from its own flags.
- lease.json: who writes to this workdir. launch writes it; the job's wrapper
  on worker 0 renews its `heartbeat` every HEARTBEAT_SECONDS and releases it
  when the job ends. launch refuses a fresh lease held by another slice, and
  takes a stale one (no heartbeat for LEASE_STALE_SECONDS) only with --take_over.
- stopped.json: written by `tpu.py stop` before it stops the job, so a
  recover that is watching sees a stop, not a crash, and does not relaunch.
Objects on gs:// are read and written with `gcloud storage` (the scripts need
no TensorFlow locally). A local workdir lives on the worker's own disk, which
no other slice can write: launch writes its record there from the worker.
"""
from __future__ import annotations

import datetime
import getpass
import json
import os
import socket
import tempfile
import uuid
from typing import Any

from tpu_scripts import gcloud
from tpu_scripts.checkout import Revision
from tpu_scripts.gcloud import CloudError

RECORD, LEASE, STOPPED = "launch.json", "lease.json", "stopped.json"
_MISSING = ("matched no objects", "not found", "no urls matched", "notfound", "404", "does not exist")


class LeaseError(CloudError):
  """Another slice holds the workdir's lease."""


def utc(epoch: float) -> str:
  """2025-01-31T12:00:00Z for an epoch time."""
  return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
      "%Y-%m-%dT%H:%M:%SZ")


def url(s, name: str) -> str:
  """WORKDIR/name."""
  return f"{s.workdir.rstrip('/')}/{name}"


def is_remote(s) -> bool:
  """True for a gs:// workdir, which the local side reads and writes itself."""
  return s.workdir.startswith("gs://")


def read_json(ctx, name: str) -> dict[str, Any] | None:
  """WORKDIR/name as a dict; None when it does not exist (or the workdir is not gs://).

  Raises:
    CloudError: gcloud failed otherwise, or the object is not a JSON object.
  """
  if not is_remote(ctx.s):
    return None
  where = url(ctx.s, name)
  result = ctx.gc.run(gcloud.storage_cat(where), capture=True, check=False)
  if result.dry:
    return None
  if result.returncode != 0:
    if any(word in result.stderr.lower() for word in _MISSING):
      return None
    raise CloudError(f"cannot read {where} (gcloud exit {result.returncode}): "
                     f"{result.stderr.strip()[-300:]}")
  try:
    data = json.loads(result.stdout)
  except json.JSONDecodeError:
    data = None
  if not isinstance(data, dict):
    raise CloudError(f"{where} is not a JSON object; move it away if it is not this tool's")
  return data


def write_json(ctx, name: str, data: dict[str, Any]) -> None:
  """Writes WORKDIR/name (gs:// only; a local workdir is the worker's to write)."""
  if not is_remote(ctx.s):
    return
  with tempfile.TemporaryDirectory(prefix="bert_jax_tpu_") as tmp:
    path = os.path.join(tmp, name)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    ctx.gc.run(gcloud.storage_cp(path, url(ctx.s, name)), capture=True)


def holder(s) -> dict[str, str]:
  """The slice that runs the job: name, project, zone."""
  return {"slice": s.name, "project": s.project, "zone": s.zone}


def new_run_id(now: float) -> str:
  """A run id: UTC time plus a random suffix."""
  return f"{utc(now).replace('-', '').replace(':', '')}-{uuid.uuid4().hex[:6]}"


def make_record(s, rev: Revision, overrides: list[str], run_id: str,
                now: float) -> dict[str, Any]:
  """The run record (launch.json) of a new run."""
  return {
      "run_id": run_id, "time": utc(now), "revision": rev.commit, "dirty": rev.dirty,
      "diff_hash": rev.diff_hash, "stamp": rev.stamp, "command": s.command,
      "config": s.config, "overrides": list(overrides), "env": s.split("ENV"),
      "workdir": s.workdir, **holder(s), "accelerator_type": s.accelerator_type,
      "settings": dict(s.values), "launched_by": f"{getpass.getuser()}@{socket.gethostname()}",
  }


def check_lease(ctx, now: float, take_over: bool) -> None:
  """Refuses to launch into a workdir whose lease another slice holds.

  Same slice: allowed (a relaunch there stops the old job first). Released:
  allowed. Fresh: refused, naming the holder. Stale: only with `take_over`.

  Raises:
    LeaseError: naming the holder, its run and how old its heartbeat is.
  """
  lease = read_json(ctx, LEASE)
  if not lease or lease.get("released"):
    return
  if all(lease.get(k) == v for k, v in holder(ctx.s).items()):
    return
  age = now - float(lease.get("heartbeat", 0))
  who = (f"slice {lease.get('slice')} ({lease.get('project')}/{lease.get('zone')}), run "
         f"{lease.get('run_id')}, last heartbeat {age:.0f} s ago")
  if age < ctx.s.lease_stale_seconds:
    raise LeaseError(f"WORKDIR {ctx.s.workdir} is leased by {who}: a live run writes there; "
                     "stop that run, or use another WORKDIR")
  if not take_over:
    raise LeaseError(f"WORKDIR {ctx.s.workdir} has a stale lease of {who} (over "
                     f"LEASE_STALE_SECONDS={ctx.s.lease_stale_seconds:g}); make sure that run "
                     "is gone, then pass --take_over to take the workdir over")


def lease_record(s, run_id: str, now: float, state: str) -> dict[str, Any]:
  """lease.json as launch writes it (the wrapper renews `heartbeat`)."""
  return {**holder(s), "run_id": run_id, "heartbeat": now, "heartbeat_utc": utc(now),
          "state": state, "released": False}


def stop_marker(now: float) -> dict[str, Any]:
  """stopped.json: who stopped the run and when; `id` tells one stop from another."""
  return {"id": uuid.uuid4().hex, "time": utc(now),
          "by": f"{getpass.getuser()}@{socket.gethostname()}"}
