"""Shell scripts run on the TPU workers, and parsers for what they print.

Each script is one string passed as `gcloud ... ssh --command=...`, run by the
worker's shell in $HOME. Scripts print marker lines (`BERT_JAX_CHECK ...`) so
the local side can read the result of every worker from gcloud's merged output.

Process matching: the job is found with `pgrep -f` on the regex in `JOB_PATTERN`.
It is written with bracket classes (`bert_jax[.]main`) so it never matches the
text of the very shell command that contains it: a plain `pkill -f bert_jax.main`
run through ssh kills its own shell.
"""
from __future__ import annotations

import json
import re
import shlex
from typing import Sequence

JOB_PATTERN = "bert_jax[.]main|bin/bert-ja[x]"
STAMP_FILE = "BERT_JAX_REVISION"  # checkout.STAMP_FILE: the shipped code's revision
LOCKFILE = "/tmp/libtpu_lockfile"
TARBALL = "bert_jax_src.tar.gz"
_METADATA_WORKER = ("http://metadata.google.internal/computeMetadata/v1/instance/"
                    "attributes/agent-worker-number")


def home_path(path: str) -> str:
  """A shell word for `path`: absolute as is, else under "$HOME" (quoted safely)."""
  if path.startswith("/"):
    return shlex.quote(path)
  return '"$HOME"/' + shlex.quote(path.removeprefix("~/"))


def _pgrep() -> str:
  return f"pgrep -f {shlex.quote(JOB_PATTERN)}"


def _rm_lockfile() -> str:
  # A killed JAX process leaves the lock behind and the next start fails with
  # "TPU in use" (jax-ml/jax#10192); /tmp is sticky, so another user's needs sudo.
  return f"rm -f {LOCKFILE} 2>/dev/null || sudo rm -f {LOCKFILE}"


# The Pythons the pinned jax supports (setup.py's python_requires): every jax
# release from 0.7 on needs 3.11+, and TPU images (Ubuntu 22.04) ship 3.10.
PYTHON_MIN, PYTHON_STOP = (3, 11), (3, 14)
UV_PYTHON = "3.12"  # what uv installs where the image has no supported Python
PYTHON_CANDIDATES = ("python3.12", "python3.11")


def _python_ok() -> str:
  """A shell function `py_ok EXE`: true where EXE runs a Python setup.py accepts."""
  check = (f"import sys; sys.exit(not {PYTHON_MIN} <= tuple(sys.version_info[:2]) "
           f"< {PYTHON_STOP})")
  return f"py_ok() {{ \"$1\" -c {shlex.quote(check)} >/dev/null 2>&1; }}"


def _venv_lines(env: str, py: str) -> list[str]:
  """Shell lines that leave a venv with pip on a supported Python at `env`.

  A venv on a supported Python is reused. Else it is rebuilt on the first
  supported Python found (`py`, then python3.12, python3.11), else on a
  CPython that uv installs (uv itself from PyPI via the image's pip).
  """
  apt = "sudo apt-get update -qq && sudo apt-get install -y -qq"
  uv = '"$HOME"/.local/bin/uv'
  return [
      _python_ok(),
      f"if [ -x {env}/bin/pip ] && py_ok {env}/bin/python; then",
      f"  echo \"BERT_JAX_VENV reused $({env}/bin/python --version 2>&1)\"",
      "else",
      f"  rm -rf {env}; base=",
      f"  for c in {py} {' '.join(PYTHON_CANDIDATES)}; do",
      "    if command -v \"$c\" >/dev/null 2>&1 && py_ok \"$c\"; then base=$c; break; fi",
      "  done",
      "  if [ -n \"$base\" ]; then",
      # Ubuntu images may lack ensurepip; a half-made venv has no pip.
      "    v=$(\"$base\" -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])')",
      f"    \"$base\" -m venv {env} || {{ rm -rf {env}; {apt} \"python$v-venv\" && "
      f"\"$base\" -m venv {env}; }}",
      "  else",
      f"    echo \"no Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]}+ on $(hostname) (python3 is "
      f"$(python3 --version 2>&1)); installing {UV_PYTHON} with uv\"",
      f"    uv=$(command -v uv || true); [ -n \"$uv\" ] || uv={uv}",
      "    if [ ! -x \"$uv\" ]; then",
      "      python3 -m pip install --user -q uv || "
      f"{{ {apt} python3-pip && python3 -m pip install --user -q uv; }}",
      "    fi",
      f"    \"$uv\" python install {UV_PYTHON}",
      # --seed: pip in the venv, which the installs below use.
      f"    \"$uv\" venv --python {UV_PYTHON} --seed {env}",
      "  fi",
      f"  py_ok {env}/bin/python || {{ echo \"BERT_JAX_SETUP_FAILED $(hostname): the venv's "
      f"Python is $({env}/bin/python --version 2>&1), not {PYTHON_MIN[0]}.{PYTHON_MIN[1]}+\"; "
      "exit 5; }",
      f"  echo \"BERT_JAX_VENV created $({env}/bin/python --version 2>&1)\"",
      "fi",
  ]


def setup_script(remote_dir: str, venv: str, python: str, pip_extra: Sequence[str]) -> str:
  """Unpacks the uploaded checkout and installs it with the [tpu] extra in a venv.

  The venv runs on a Python the pinned jax supports (3.11+): `python` where it
  is one, else python3.12/python3.11, else a CPython that uv installs (TPU
  images ship 3.10 only). Idempotent: the code folder is replaced as a whole
  (no stale files), a venv with pip on a supported Python is reused (one on an
  older Python is rebuilt), and pip skips what is already installed. Refuses
  (BERT_JAX_BUSY, exit 4) where a job is running.
  """
  code, new, env = home_path(remote_dir), home_path(remote_dir + ".new"), home_path(venv)
  lines = [
      "set -e",
      # Replacing the code under a running job would break its later imports.
      f"if {_pgrep()} >/dev/null; then echo BERT_JAX_BUSY $(hostname); exit 4; fi",
      f"rm -rf {new} && mkdir -p {new} && tar -xzf \"$HOME\"/{TARBALL} -C {new}",
      f"rm -rf {code} && mv {new} {code}",
      *_venv_lines(env, shlex.quote(python)),
      f"{env}/bin/pip install -q --upgrade pip",
      f"cd {code} && {env}/bin/pip install -q -e '.[tpu]'",
  ]
  if pip_extra:
    lines.append(f"{env}/bin/pip install -q {shlex.join(pip_extra)}")
  lines.append("echo BERT_JAX_SETUP_DONE $(hostname)")
  return "\n".join(lines)


def check_code(devices: int, workers: int) -> str:
  """Python that prints a BERT_JAX_CHECK line and exits 3 on unexpected counts."""
  return "\n".join([
      "import sys, jax",
      # On a pod every worker must join before device_count() sees the slice.
      # The trainer's own decision, so a slice it would not join fails here.
      "from bert_jax import distributed",
      "started = distributed.initialize()",
      "n, p = jax.device_count(), jax.process_count()",
      "print(f'BERT_JAX_CHECK process={jax.process_index()} processes={p} devices={n} '",
      "      f'local_devices={jax.local_device_count()} kind={jax.devices()[0].device_kind!r} '",
      "      f'distributed={started}')",
      f"sys.exit(0 if (n, p) == ({devices}, {workers}) else 3)",
  ])


def check_script(venv: str, devices: int, workers: int) -> str:
  """Checks jax.device_count() and jax.process_count() on every worker.

  Skipped (with a marker) where a job already holds the TPU: the check would
  fail with "TPU in use" and must not stop a running job.
  """
  return "\n".join([
      f"if {_pgrep()} >/dev/null; then echo BERT_JAX_CHECK_SKIPPED job running on "
      "$(hostname); exit 0; fi",
      _rm_lockfile(),
      f"timeout 600 {home_path(venv)}/bin/python -c {shlex.quote(check_code(devices, workers))}",
  ])


def stop_script(grace_seconds: int, log_dir: str | None = None) -> str:
  """Stops this project's jobs (SIGTERM, then SIGKILL) and removes the TPU lock.

  Only the trainer matches JOB_PATTERN: its wrapper (LOG_DIR/run.sh) does not,
  so it lives on to write the exit code. With `log_dir` (a user's stop) the
  marker LOG_DIR/stopped is written first, so the job reads as stopped, not
  as exited or crashed.
  """
  pgrep, pattern = _pgrep(), shlex.quote(JOB_PATTERN)
  mark = [f"mkdir -p {home_path(log_dir)} && date -u +%FT%TZ > {home_path(log_dir)}/stopped"
          ] if log_dir else []
  return "\n".join([
      *mark,
      f"if {pgrep} >/dev/null; then",
      f"  echo stopping $({pgrep} | tr '\\n' ' ') on $(hostname)",
      f"  pkill -TERM -f {pattern} || true",
      # SIGTERM lets the trainer save a checkpoint before it exits.
      f"  for i in $(seq {int(grace_seconds)}); do {pgrep} >/dev/null || break; sleep 1; done",
      f"  pkill -KILL -f {pattern} || true",
      "fi",
      _rm_lockfile(),
      "echo BERT_JAX_STOPPED $(hostname)",
  ])


def prepare_script(remote_dir: str, stamp: str, grace_seconds: int) -> str:
  """Before a launch: checks the shipped code is `stamp`, then stops leftovers.

  The check comes first, so a launch that would run other code than it
  records (exit 6, BERT_JAX_WRONG_CODE) leaves a running job alone.
  """
  have = f"{home_path(remote_dir)}/{STAMP_FILE}"
  return "\n".join([
      f"have=$(cat {have} 2>/dev/null || echo none)",
      f"if [ \"$have\" != {shlex.quote(stamp)} ]; then "
      "echo \"BERT_JAX_WRONG_CODE $(hostname) has $have\"; exit 6; fi",
      stop_script(grace_seconds),
  ])


# Renews the lease (worker 0) and copies this worker's log to the workdir while
# the job lives; `final` once after it ended (releases the lease), `copy` copies
# the log only. gs:// goes through tf.io.gfile: the job's own credentials.
HEARTBEAT_PY = r"""
import json, os, shutil, sys, time
lease, run_id, holder, pid, every, log, log_dst, exit_file, mode = sys.argv[1:10]
remote = any("://" in p for p in (lease, log_dst))
if remote:
  import tensorflow as tf
  gfile = tf.io.gfile

def read(path):
  try:
    if remote:
      with gfile.GFile(path) as f:
        return json.loads(f.read())
    with open(path) as f:
      return json.load(f)
  except Exception:
    return None

def write(path, text):
  folder = os.path.dirname(path)
  if remote:
    gfile.makedirs(folder)
    with gfile.GFile(path, "w") as f:
      f.write(text)
    return
  os.makedirs(folder, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)

def alive():
  try:
    os.kill(int(pid), 0)
    return mode == "loop"
  except (OSError, ValueError):
    return False

while True:
  running = alive()
  # The log is copied before the lease is written: whoever sees the lease
  # released must find the final log. A local copy lands whole (tmp + rename),
  # so a reader never sees it truncated mid-copy.
  if log_dst and os.path.exists(log):
    try:
      if remote:
        gfile.copy(log, log_dst, overwrite=True)
      else:
        os.makedirs(os.path.dirname(log_dst), exist_ok=True)
        shutil.copyfile(log, log_dst + ".tmp")
        os.replace(log_dst + ".tmp", log_dst)
    except Exception as e:
      print(f"log copy to {log_dst} failed: {e}", flush=True)
  if lease and mode != "copy":
    held = read(lease)
    if held and held.get("run_id") != run_id:
      print(f"lease {lease} now held by run {held.get('run_id')}: not renewing it", flush=True)
      lease = ""
    else:
      state = "running"
      if not running:
        state = "exited:" + (open(exit_file).read().strip() if os.path.exists(exit_file) else "?")
      now = time.time()
      write(lease, json.dumps(dict(json.loads(holder), run_id=run_id, heartbeat=now,
                                   heartbeat_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime(now)),
                                   state=state, released=not running), indent=1))
  if not running:
    break
  time.sleep(float(every))
"""


def _worker_number() -> str:
  """Shell: w = this worker's number (metadata server), 0 off a TPU VM."""
  return (f"w=$(curl -s -m 2 -H 'Metadata-Flavor: Google' {_METADATA_WORKER} 2>/dev/null "
          "|| true); case $w in ''|*[!0-9]*) w=0;; esac")


def launch_script(remote_dir: str, venv: str, log_dir: str, train_argv: Sequence[str],
                  env: Sequence[str], run: dict[str, str] | None = None) -> str:
  """Starts `bert-jax ...` detached from the ssh session, logging to LOG_DIR/train.log.

  The job runs under a wrapper script, LOG_DIR/run.sh, which JOB_PATTERN does
  not match (stop never kills it): it writes the job's exit status to
  LOG_DIR/exit_code, so status/recover can tell a finished run from a crashed
  or killed one. With `run` (keys: lease, run_id, holder, every, logs, record,
  record_path) it also starts LOG_DIR/heartbeat.py, which renews the lease
  (worker 0), copies the log to `logs`/worker-N.log, and releases the lease
  when the job ends; `record` (JSON) is written to `record_path` (a local
  workdir, on the worker).
  """
  logs = home_path(log_dir)
  assigns = []
  for item in env:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"ENV entry {item!r} is not KEY=VALUE")
    assigns.append(f"{key}={shlex.quote(value)}")
  job = " ".join([*assigns, f"{home_path(venv)}/bin/bert-jax",
                  *(shlex.quote(a) for a in train_argv)])
  python = f"{home_path(venv)}/bin/python"
  wrapper = [f"cd {home_path(remote_dir)}", f"{job} &", "job=$!"]
  tail = []
  if run:
    lease = shlex.quote(run["lease"]) if run.get("lease") else '""'
    args = " ".join([f"{python} {logs}/heartbeat.py \"$lease\"", shlex.quote(run["run_id"]),
                     shlex.quote(run["holder"]), "$job", shlex.quote(str(run["every"])),
                     f"{logs}/train.log", f"\"{run['logs']}/worker-$w.log\"",
                     f"{logs}/exit_code"])
    wrapper += [_worker_number(), f"lease={lease}; [ \"$w\" = 0 ] || lease=",
                f"{args} loop >> {logs}/heartbeat.log 2>&1 &", "hb=$!"]
    tail = ["kill $hb 2>/dev/null; wait $hb 2>/dev/null",
            f"{args} final >> {logs}/heartbeat.log 2>&1"]
    copy = args.replace('"$lease"', '""').replace("$job", "0")
  wrapper += ["wait $job", f"echo $? > {logs}/exit_code", *tail]
  lines = [
      "set -e",
      f"mkdir -p {logs} && rm -f {logs}/exit_code {logs}/stopped",
      f"cd {home_path(remote_dir)}",
      f"cat > {logs}/run.sh <<'BERT_JAX_EOF'\n" + "\n".join(wrapper) + "\nBERT_JAX_EOF",
  ]
  if run:
    lines += [f"cat > {logs}/heartbeat.py <<'BERT_JAX_EOF'\n{HEARTBEAT_PY.strip()}\nBERT_JAX_EOF",
              f"cat > {logs}/copy_logs.sh <<'BERT_JAX_EOF'\n{_worker_number()}\n{copy} copy\n"
              "BERT_JAX_EOF"]
    if run.get("record_path"):
      path = shlex.quote(run["record_path"])
      lines.append(f"mkdir -p \"$(dirname {path})\" && printf '%s\\n' "
                   f"{shlex.quote(run['record'])} > {path}")
  lines += [
      f"echo \"=== launch $(date -u +%FT%TZ)\" >> {logs}/train.log",
      f"printf '%s\\n' {shlex.quote(shlex.join(train_argv))} >> {logs}/train.log",
      # setsid + nohup + closed fds: the job outlives the ssh session.
      f"setsid nohup bash {logs}/run.sh >> {logs}/train.log 2>&1 < /dev/null &",
      "echo BERT_JAX_LAUNCHED pid=$! on $(hostname)",
  ]
  return "\n".join(lines)


def copy_logs_script(log_dir: str) -> str:
  """Copies each worker's log to the workdir (what the last launch set up), e.g. before delete."""
  logs = home_path(log_dir)
  return (f"if [ -f {logs}/copy_logs.sh ]; then bash {logs}/copy_logs.sh && "
          "echo BERT_JAX_LOGS_COPIED $(hostname); fi")


def _job_state(log_dir: str) -> str:
  logs = home_path(log_dir)
  return (f"if {_pgrep()} >/dev/null; then job=running; "
          f"elif [ -f {logs}/stopped ]; then job=stopped; "
          f"elif [ -f {logs}/exit_code ]; then job=exited:$(cat {logs}/exit_code); "
          "else job=gone; fi")


def job_script(log_dir: str) -> str:
  """Prints `BERT_JAX_JOB w=N running|stopped|exited:N|gone` (N: the worker number)."""
  return f"{_worker_number()}\n{_job_state(log_dir)}\necho BERT_JAX_JOB w=$w $job"


def status_script(log_dir: str, local_metrics: str | None) -> str:
  """Prints one BERT_JAX_STATUS line per worker (+ the last metrics line if local)."""
  log = f"{home_path(log_dir)}/train.log"
  lines = [
      f"w=$(curl -s -m 2 -H 'Metadata-Flavor: Google' {_METADATA_WORKER} 2>/dev/null || true)",
      "case $w in ''|*[!0-9]*) w=$(hostname);; esac",
      _job_state(log_dir),
      f"last=$(grep -a step {log} 2>/dev/null | tail -n 1 | tr -d '\\r' | cut -c1-400)",
      f"[ -n \"$last\" ] || last=$(tail -n 1 {log} 2>/dev/null | tr -d '\\r' | cut -c1-400)",
      "echo \"BERT_JAX_STATUS worker=$w job=$job last=$last\"",
  ]
  if local_metrics:
    path = home_path(local_metrics)
    lines.append(f"[ -f {path} ] && echo \"BERT_JAX_METRICS $(tail -n 1 {path})\" || true")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Parsers of the marker lines.
# ---------------------------------------------------------------------------

def parse_checks(output: str) -> tuple[list[dict[str, int]], int]:
  """Reads BERT_JAX_CHECK lines: ([{process, processes, devices}], skipped count)."""
  checks = []
  for m in re.finditer(r"BERT_JAX_CHECK process=(\d+) processes=(\d+) devices=(\d+)", output):
    checks.append({"process": int(m[1]), "processes": int(m[2]), "devices": int(m[3])})
  return checks, output.count("BERT_JAX_CHECK_SKIPPED")


_JOB = r"BERT_JAX_JOB (?:w=(\S+) )?(running|stopped|gone|exited:-?\d+)"


def parse_job(output: str) -> str | None:
  """'running', 'stopped', 'exited:N' or 'gone' from job_script output; None if absent."""
  m = re.search(_JOB, output)
  return m[2] if m else None


def parse_jobs(output: str) -> dict[str, str]:
  """{worker: state} from job_script output of several workers."""
  return {m[1] or "0": m[2] for m in re.finditer(_JOB, output)}


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def parse_progress(text: str) -> dict[str, float]:
  """step / loss / tokens_per_sec from a metrics JSON line or a log line."""
  start = text.find("{")
  if start >= 0:
    try:
      record = json.loads(text[start:])
      if isinstance(record, dict):
        return {k: record[k] for k in ("step", "loss", "tokens_per_sec")
                if isinstance(record.get(k), (int, float))}
    except json.JSONDecodeError:
      pass
  found = {}
  for key, regex in (("step", r"\bstep\b\W{0,3}" + _NUMBER),
                     ("loss", r"\bloss\b\W{0,3}" + _NUMBER),
                     ("tokens_per_sec", r"tokens(?:_per_sec|/s|_per_second)\W{0,3}" + _NUMBER)):
    m = re.search(regex, text)
    if m:
      found[key] = float(m[1])
  return found


def format_progress(progress: dict[str, float]) -> str:
  """'step 1200 loss 2.3412 tokens/s 1.23e+05' from parse_progress output."""
  parts = []
  if "step" in progress:
    parts.append(f"step {int(progress['step'])}")
  if "loss" in progress:
    parts.append(f"loss {progress['loss']:.4f}")
  if "tokens_per_sec" in progress:
    parts.append(f"tokens/s {progress['tokens_per_sec']:.4g}")
  return " ".join(parts)
