"""The gcloud calls: argv builders (pure) and a runner with a dry-run mode.

Every cloud action of the TPU scripts goes through `Gcloud.run`, so a dry run
prints exactly the commands a real run would execute, and tests can put a fake
`gcloud` first on PATH and read back what was called.
"""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from tpu_scripts.settings import Settings

TPUS = ("compute", "tpus")
QR_STATE = "value(state.state)"
NODE_STATE = "value(state)"


class CloudError(RuntimeError):
  """A gcloud call failed, or the cloud reached a state we cannot continue from."""


@dataclasses.dataclass
class Result:
  """What a gcloud call returned; `stdout`/`stderr` are '' unless captured."""
  returncode: int
  stdout: str = ""
  stderr: str = ""
  dry: bool = False


class Gcloud:
  """Runs (or, in a dry run, prints) gcloud commands.

  Args:
    dry_run: print `+ gcloud ...` instead of running anything.
    out: where dry-run lines and echoed output go.
  """

  def __init__(self, dry_run: bool = False, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.exe = "gcloud"
    if not dry_run:
      found = shutil.which("gcloud")
      if found is None:
        raise CloudError("gcloud was not found on PATH: install the Google Cloud CLI "
                         "(https://cloud.google.com/sdk/docs/install), run `gcloud auth "
                         "login`, and make sure `gcloud` runs in this shell")
      self.exe = found

  def run(self, args: Sequence[str], capture: bool = False, check: bool = True) -> Result:
    """Runs `gcloud ARGS`.

    Args:
      args: arguments after `gcloud`.
      capture: capture stdout/stderr (else they go straight to the terminal).
      check: raise CloudError on a non-zero exit.

    Returns:
      The Result; in a dry run returncode 0 and dry=True.
    """
    if self.dry_run:
      print("+ " + shell_line(["gcloud", *args]), file=self.out, flush=True)
      return Result(0, dry=True)
    sys.stdout.flush()
    proc = subprocess.run([self.exe, *args], capture_output=capture, text=True,
                          stdin=subprocess.DEVNULL)
    result = Result(proc.returncode, proc.stdout or "", proc.stderr or "")
    if check and result.returncode != 0:
      detail = result.stderr.strip().splitlines()[-3:] if capture else []
      raise CloudError(f"`gcloud {' '.join(args[:4])}` failed with exit code "
                       f"{result.returncode}" + (": " + " | ".join(detail) if detail else ""))
    return result


def shell_line(argv: Sequence[str]) -> str:
  """A bash command line for `argv`; multi-line scripts become readable heredocs."""
  words = []
  for arg in argv:
    if "\n" not in arg:
      words.append(shlex.quote(arg))
      continue
    flag, eq, script = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    words.append(f"{flag}{eq}\"$(cat <<'EOF'\n{script}\nEOF\n)\"")
  return " ".join(words)


# ---------------------------------------------------------------------------
# argv builders: one function per gcloud command, nothing run here.
# ---------------------------------------------------------------------------

def _where(s: Settings) -> list[str]:
  return [f"--project={s.project}", f"--zone={s.zone}"]


def _provisioning(s: Settings) -> list[str]:
  return {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}[s.provisioning]


def create(s: Settings, runtime_version: str) -> list[str]:
  """Creates the node, through a queued resource when QUEUED is true."""
  if s.queued:
    head = [*TPUS, "queued-resources", "create", s.name, f"--node-id={s.name}",
            f"--accelerator-type={s.accelerator_type}", f"--runtime-version={runtime_version}"]
  else:
    head = [*TPUS, "tpu-vm", "create", s.name, f"--accelerator-type={s.accelerator_type}",
            f"--version={runtime_version}"]
  return head + _provisioning(s) + s.split("CREATE_FLAGS") + _where(s)


def describe_queued(s: Settings) -> list[str]:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED...)."""
  return [*TPUS, "queued-resources", "describe", s.name, f"--format={QR_STATE}", *_where(s)]


def describe_node(s: Settings) -> list[str]:
  """Prints the node's state (CREATING, READY, PREEMPTED...)."""
  return [*TPUS, "tpu-vm", "describe", s.name, f"--format={NODE_STATE}", *_where(s)]


def delete(s: Settings) -> list[str]:
  """Deletes the node; for a queued resource `--force` deletes its node too."""
  if s.queued:
    return [*TPUS, "queued-resources", "delete", s.name, "--force", "--quiet", *_where(s)]
  return [*TPUS, "tpu-vm", "delete", s.name, "--quiet", *_where(s)]


IAP_FLAG = "--tunnel-through-iap"


def _ssh_track(s: Settings) -> tuple[list[str], list[str]]:
  """(gcloud release track, IAP flag) for tpu-vm ssh/scp.

  The GA `compute tpus tpu-vm ssh/scp` have no --tunnel-through-iap; the alpha
  track's do, so IAP=true moves only these two commands there.
  """
  return (["alpha"], [IAP_FLAG]) if s.iap else ([], [])


def ssh(s: Settings, command: str, worker: str = "all") -> list[str]:
  """Runs a shell command on one worker or on all of them at once.

  `--quiet` answers gcloud's prompts with their defaults (e.g. it makes the
  SSH key on first use without asking), so unattended recover never blocks.
  """
  track, iap = _ssh_track(s)
  return [*track, *TPUS, "tpu-vm", "ssh", s.name, f"--worker={worker}", f"--command={command}",
          "--quiet", *iap, *s.split("SSH_FLAGS"), *_where(s)]


def scp(s: Settings, local: str, remote: str) -> list[str]:
  """Copies a local file to every worker."""
  track, iap = _ssh_track(s)
  return [*track, *TPUS, "tpu-vm", "scp", local, f"{s.name}:{remote}", "--worker=all",
          "--quiet", *iap, *s.split("SSH_FLAGS"), *_where(s)]


def storage_tail(url: str, num_bytes: int = 16384) -> list[str]:
  """Prints the last bytes of a gs:// object."""
  return ["storage", "cat", f"--range=-{num_bytes}", url]


def storage_cat(url: str) -> list[str]:
  """Prints a gs:// object."""
  return ["storage", "cat", url]


def storage_cp(source: str, destination: str) -> list[str]:
  """Copies a local file to gs:// (or back)."""
  return ["storage", "cp", source, destination]
