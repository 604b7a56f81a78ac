"""tpu_scripts against a fake `gcloud`: the calls, their order and their content.

The fake is a script written into a temporary bin/ placed first on PATH. It
appends its argv (one JSON list per line) to calls.jsonl and answers from
rules.json: the first rule whose `match` strings all occur in the joined argv
gives the next of its responses (the last one repeats); anything else succeeds
silently. No network, no cloud; the watch loops poll every few milliseconds.
"""
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpu_scripts import accelerators, remote, settings  # noqa: E402

TOOL = ROOT / "tpu_scripts" / "tpu.py"
WHERE = ["--project=proj", "--zone=us-central2-b"]

FAKE_GCLOUD = """#!{python} -S
import fcntl, json, os, shutil, sys
root = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
# One call at a time: a watcher (`recover`) and a `stop` can call gcloud at
# once, and counts.json is read, bumped and rewritten by each call.
lock = open(os.path.join(root, "gcloud.lock"), "w")
fcntl.flock(lock, fcntl.LOCK_EX)
with open(os.path.join(root, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
for a in args:  # keep what scp uploads, so the test can open it
  if a.endswith(".tar.gz") and os.path.isfile(a):
    shutil.copy(a, os.path.join(root, "uploaded.tar.gz"))
rules_path = os.path.join(root, "rules.json")
rules = json.load(open(rules_path)) if os.path.exists(rules_path) else []
counts_path = os.path.join(root, "counts.json")
counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {{}}
line = " ".join(args)
def bucket(url):  # gs://b/x -> FAKE_GCLOUD_DIR/gcs/b/x
  return os.path.join(root, "gcs", url[len("gs://"):])
for i, rule in enumerate(rules):
  if rule.get("if_exists") and not os.path.exists(bucket(rule["if_exists"])):
    continue
  if all(m in line for m in rule["match"]):
    n = counts.get(str(i), 0)
    counts[str(i)] = n + 1
    with open(counts_path + ".tmp", "w") as f:
      json.dump(counts, f)
    os.replace(counts_path + ".tmp", counts_path)
    r = rule["responses"][min(n, len(rule["responses"]) - 1)]
    sys.stdout.write(r.get("out", ""))
    sys.stderr.write(r.get("err", ""))
    sys.exit(r.get("rc", 0))
if args[:2] == ["storage", "cat"]:  # a bucket on local disk
  path = bucket(args[-1])
  if not os.path.isfile(path):
    sys.exit("ERROR: (gcloud.storage.cat) The following URLs matched no objects or files: "
             + args[-1])
  data = open(path).read()
  if args[2].startswith("--range=-"):
    data = data[-int(args[2][len("--range=-"):]):]
  sys.stdout.write(data)
elif args[:2] == ["storage", "cp"]:
  os.makedirs(os.path.dirname(bucket(args[3])), exist_ok=True)
  shutil.copy(args[2], bucket(args[3]))
"""

NOT_FOUND = {"rc": 1, "err": "ERROR: (gcloud.compute.tpus) NOT_FOUND: Resource not found\n"}


def _out(text):
  return {"out": text + "\n"}


class Fake:
  """A fake gcloud in tmp_path; `run` calls tpu.py with it first on PATH."""

  def __init__(self, tmp_path):
    self.dir = tmp_path / "fake"
    (self.dir / "bin").mkdir(parents=True)
    exe = self.dir / "bin" / "gcloud"
    exe.write_text(FAKE_GCLOUD.format(python=sys.executable))
    exe.chmod(0o755)
    # A git checkout whose package and configs are this repository's (links),
    # so launch builds the real configs; the tests commit to it.
    self.source = tmp_path / "checkout"
    self.source.mkdir()
    (self.source / "setup.py").write_text("# a bert_jax checkout\n")
    (self.source / "bert_jax").symlink_to(ROOT / "bert_jax")
    (self.source / "configs").symlink_to(ROOT / "configs")
    self.git("init", "-q")
    self.commit("first")
    # An empty settings file, so a developer's tpu_scripts/settings.env stays out.
    self.settings = tmp_path / "empty.env"
    self.settings.write_text("")

  def git(self, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=self.source, check=True, capture_output=True, text=True).stdout

  def commit(self, message):
    """Commits everything; returns the commit."""
    self.git("add", "-A")
    self.git("commit", "-q", "--allow-empty", "-m", message)
    return self.git("rev-parse", "HEAD").strip()

  def rules(self, *rules):
    """Rules (match, responses) or (match, responses, gs:// object that must exist)."""
    (self.dir / "counts.json").unlink(missing_ok=True)  # new rules answer from their start
    (self.dir / "rules.json").write_text(json.dumps(
        [{"match": list(r[0]), "responses": list(r[1]), "if_exists": r[2] if len(r) > 2 else ""}
         for r in rules]))

  def gcs(self, url):
    """The local file behind a gs:// URL of the fake."""
    return self.dir / "gcs" / url[len("gs://"):]

  def run(self, *args, path=None, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BERT_JAX_")}
    environ.update(FAKE_GCLOUD_DIR=str(self.dir),
                   PATH=path if path is not None else f"{self.dir / 'bin'}{os.pathsep}"
                   f"{os.environ['PATH']}",
                   BERT_JAX_SETTINGS=str(self.settings),
                   BERT_JAX_SOURCE_DIR=str(self.source), BERT_JAX_POLL_SECONDS="0.01",
                   BERT_JAX_WATCH_SECONDS="0.01", **env)
    return subprocess.run([sys.executable, str(TOOL), *args], env=environ, capture_output=True,
                          text=True, timeout=120)

  @property
  def calls(self):
    path = self.dir / "calls.jsonl"
    if not path.exists():
      return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def kind(call):
  """A short name for a recorded gcloud call."""
  if call[0] == "alpha":
    call = call[1:]
  if call[0] == "storage":
    return f"storage-{call[1]}"
  verb = f"{'qr' if call[2] == 'queued-resources' else 'vm'}-{call[3]}"
  if call[3] != "ssh":
    return verb
  command = next(a for a in call if a.startswith("--command="))
  for marker, name in (("BERT_JAX_SETUP_DONE", "setup"), ("BERT_JAX_CHECK", "check"),
                       ("BERT_JAX_STOPPED", "stop"), ("BERT_JAX_LAUNCHED", "launch"),
                       ("BERT_JAX_JOB", "job"), ("BERT_JAX_STATUS", "status"),
                       ("BERT_JAX_LOGS_COPIED", "copylogs"), ("tail -n", "tail")):
    if marker in command:
      return f"ssh-{name}"
  return "ssh-?"


def flag(call, name):
  return next(a.split("=", 1)[1] for a in call if a.startswith(f"--{name}="))


def check_lines(devices, processes, workers):
  return _out("\n".join(f"BERT_JAX_CHECK process={i} processes={processes} devices={devices} "
                        "local_devices=4 kind='TPU v4'" for i in range(workers)))


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


# ---------------------------------------------------------------------------
# Accelerator table and settings (in process).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("accel, chips, workers, devices, runtime", [
    ("v4-8", 4, 1, 4, "tpu-ubuntu2204-base"),
    ("v4-32", 16, 4, 16, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 8, 1, 8, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, 16, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 4, 1, 4, "v2-alpha-tpuv5"),
    ("v5p-32", 16, 4, 16, "v2-alpha-tpuv5"),
    ("v6e-8", 8, 1, 8, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, 16, "v2-alpha-tpuv6e"),
    ("v3-8", 4, 1, 8, "tpu-ubuntu2204-base"),  # v2/v3: one JAX device per TensorCore
    ("v3-32", 16, 4, 32, "tpu-ubuntu2204-base"),
])
def test_accelerator_counts_and_runtime(accel, chips, workers, devices, runtime):
  t = accelerators.parse(accel)
  assert (t.chips, t.workers, t.devices, t.runtime_version) == (chips, workers, devices, runtime)
  assert accelerators.parse(accel, "my-image").runtime_version == "my-image"


@pytest.mark.parametrize("accel, words", [
    ("v5e-16", ["unknown accelerator type", "v5litepod-16"]),
    ("tpu9-8", ["unknown accelerator type", "v6e"]),
    ("v4-12", ["TensorCores", "multiple of 8"]),
    ("v6e-2", ["1, 4, 8, 16"]),
    ("v4", ["GENERATION-SIZE"]),
])
def test_accelerator_errors_name_the_problem(accel, words):
  with pytest.raises(ValueError) as e:
    accelerators.parse(accel)
  assert all(w in str(e.value) for w in words), str(e.value)


def test_settings_precedence_file_env_flags(tmp_path):
  f = tmp_path / "s.env"
  f.write_text("# comment\nexport PROJECT=from-file\nZONE='z-file'\nNAME=n\nQUEUED=no\n"
               "BUCKET=gs://bkt/\nMAX_ATTEMPTS=7\n")
  s = settings.resolve(f, {"BERT_JAX_ZONE": "z-env", "BERT_JAX_NAME": "n-env"},
                       {"NAME": "n-flag"})
  assert (s.project, s.zone, s.name, s.queued, s.max_attempts) == (
      "from-file", "z-env", "n-flag", False, 7)
  assert s.workdir == "gs://bkt/bert_jax/n-flag"
  assert s.sources["ZONE"] == "environment BERT_JAX_ZONE"
  assert s.sources["PROJECT"] == f"{f}:2"


@pytest.mark.parametrize("text, words", [
    ("PROJCT=x\n", [":1", "unknown setting 'PROJCT'"]),
    ("NAME=a\nQUEUED=maybe\n", [":2", "QUEUED", "true or false"]),
    ("PROVISIONING=cheap\n", ["PROVISIONING", "spot"]),
    ("REMOTE_DIR=/\n", ["REMOTE_DIR", "relative to $HOME"]),
    ("REMOTE_DIR=/tmp\n", ["REMOTE_DIR", "relative to $HOME"]),
    ("VENV=bert_jax/venv\n", ["REMOTE_DIR", "VENV", "overlap"]),
    ("just words\n", [":1", "KEY=VALUE"]),
])
def test_settings_file_errors_name_file_line_and_key(tmp_path, text, words):
  f = tmp_path / "s.env"
  f.write_text(text)
  with pytest.raises(settings.SettingsError) as e:
    settings.resolve(f, {}, {})
  assert all(w in str(e.value) for w in words), str(e.value)


def test_example_settings_file_parses():
  s = settings.resolve(ROOT / "tpu_scripts" / "settings.example.env", {}, {})
  assert s.accelerator_type == "v4-32" and s.provisioning == "spot" and s.queued
  assert s.workdir == "gs://my-bert-bucket/bert_jax/bert-base-v4-32"


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------

def test_create_queued_spot_waits_until_ready(fake):
  fake.rules((["queued-resources describe"],
              [NOT_FOUND, _out("WAITING_FOR_RESOURCES"), _out("PROVISIONING"), _out("ACTIVE")]),
             (["tpu-vm describe"], [_out("CREATING"), _out("READY")]))
  proc = fake.run("create", *WHERE, "--name=my-tpu", "--accelerator_type=v6e-8",
                  "--provisioning=spot")
  assert proc.returncode == 0, proc.stderr
  calls = fake.calls
  assert [kind(c) for c in calls] == ["qr-describe", "qr-create", "qr-describe", "qr-describe",
                                      "qr-describe", "vm-describe", "vm-describe"]
  assert calls[1] == ["compute", "tpus", "queued-resources", "create", "my-tpu",
                      "--node-id=my-tpu", "--accelerator-type=v6e-8",
                      "--runtime-version=v2-alpha-tpuv6e", "--spot", *WHERE]
  assert "--format=value(state.state)" in calls[0]
  for state in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "CREATING", "READY"):
    assert state in proc.stdout


@pytest.mark.parametrize("accel, runtime, provisioning, mode_flags", [
    ("v4-32", "tpu-ubuntu2204-base", "on-demand", []),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", "spot", ["--spot"]),
    ("v5p-8", "v2-alpha-tpuv5", "reserved", ["--reserved"]),
])
def test_create_plain_vm_runtime_follows_generation(fake, accel, runtime, provisioning,
                                                    mode_flags):
  fake.rules((["tpu-vm describe"], [NOT_FOUND, _out("CREATING"), _out("CREATING"),
                                    _out("READY")]))
  proc = fake.run("create", *WHERE, "--name=n1", f"--accelerator_type={accel}",
                  f"--provisioning={provisioning}", "--queued=false")
  assert proc.returncode == 0, proc.stderr
  assert [kind(c) for c in fake.calls] == ["vm-describe", "vm-create"] + ["vm-describe"] * 3
  assert fake.calls[1] == ["compute", "tpus", "tpu-vm", "create", "n1",
                           f"--accelerator-type={accel}", f"--version={runtime}",
                           *mode_flags, *WHERE]


def test_create_is_idempotent_and_refuses_a_preempted_node(fake):
  fake.rules((["tpu-vm describe"], [_out("READY"), _out("READY"), _out("PREEMPTED")]))
  args = ("create", *WHERE, "--name=n1", "--accelerator_type=v4-8", "--queued=false")
  proc = fake.run(*args)
  assert proc.returncode == 0 and "already exists" in proc.stdout
  assert [kind(c) for c in fake.calls] == ["vm-describe", "vm-describe"]  # no create
  proc = fake.run(*args)
  assert proc.returncode == 1 and "PREEMPTED" in proc.stderr and "delete" in proc.stderr
  assert "vm-create" not in [kind(c) for c in fake.calls]


def test_create_fails_when_the_queued_resource_fails(fake):
  fake.rules((["queued-resources describe"],
              [NOT_FOUND, _out("WAITING_FOR_RESOURCES"), _out("FAILED")]))
  proc = fake.run("create", *WHERE, "--name=n1", "--accelerator_type=v4-8")
  assert proc.returncode == 1
  assert "reached FAILED" in proc.stderr


# ---------------------------------------------------------------------------
# setup, launch, status, logs, stop, delete
# ---------------------------------------------------------------------------

def test_setup_uploads_checkout_installs_and_checks_every_worker(fake):
  (fake.source / ".venv" / "lib").mkdir(parents=True)
  (fake.source / ".venv" / "lib" / "junk.py").write_text("x")
  (fake.source / "pkg" / "__pycache__").mkdir(parents=True)
  (fake.source / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_text("x")
  (fake.source / "pkg" / "m.py").write_text("x = 1\n")
  (fake.source / ".gitignore").write_text(".venv/\n__pycache__/\n")
  commit = fake.commit("pkg")
  (fake.source / "pkg" / "m.py").write_text("x = 2  # not committed: not shipped\n")
  fake.rules((["BERT_JAX_CHECK process"], [check_lines(16, 4, 4)]))
  proc = fake.run("setup", *WHERE, "--name=n1", "--accelerator_type=v4-32")
  assert proc.returncode == 0, proc.stderr
  calls = fake.calls
  assert [kind(c) for c in calls] == ["vm-scp", "ssh-setup", "ssh-check"]
  assert all("--worker=all" in c for c in calls)
  assert calls[0][5] == "n1:bert_jax_src.tar.gz"
  setup_cmd, check_cmd = flag(calls[1], "command"), flag(calls[2], "command")
  assert "tar -xzf" in setup_cmd and "pip install -q -e '.[tpu]'" in setup_cmd
  assert "-m venv" in setup_cmd and "python install 3.12" in setup_cmd
  # The device check joins the slice the way the trainer does (bert_jax.distributed).
  assert "(16, 4)" in check_cmd and "distributed.initialize()" in check_cmd
  with tarfile.open(fake.dir / "uploaded.tar.gz") as tar:
    names = set(tar.getnames())
    assert tar.extractfile("pkg/m.py").read() == b"x = 1\n"  # the commit, not the edit
    assert tar.extractfile("BERT_JAX_REVISION").read().decode() == commit + "\n"
  assert {"setup.py", "configs", "bert_jax", "pkg/m.py"} <= names
  assert not any(".venv" in n or "__pycache__" in n for n in names)
  assert "device check passed" in proc.stdout


def test_setup_fails_when_a_worker_sees_the_wrong_device_count(fake):
  bad = check_lines(16, 4, 3)["out"] + "BERT_JAX_CHECK process=3 processes=4 devices=8\n"
  fake.rules((["BERT_JAX_CHECK process"], [{"out": bad, "rc": 1}]))
  proc = fake.run("setup", *WHERE, "--name=n1", "--accelerator_type=v4-32")
  assert proc.returncode == 1
  assert "jax.device_count()=16" in proc.stderr and "process 3: 8 devices" in proc.stderr


def test_setup_refuses_to_replace_the_code_of_a_running_job(fake):
  fake.rules((["BERT_JAX_SETUP_DONE"], [{"out": "BERT_JAX_BUSY t1-w-0\n", "rc": 4}]))
  proc = fake.run("setup", *WHERE, "--name=n1", "--accelerator_type=v4-8")
  assert proc.returncode == 1 and "tpu.py stop" in proc.stderr
  assert [kind(c) for c in fake.calls] == ["vm-scp", "ssh-setup"]  # no device check


DATA = ("--config.data.data_dir=gs://bkt/tfds", "--config.data.tokenizer=gs://bkt/vocab.txt")


def test_launch_clears_leftovers_then_starts_job_on_all_workers(fake):
  fake.rules((["tpu-vm describe"], [_out("READY")]),
             (["queued-resources describe"], [_out("ACTIVE")]))
  proc = fake.run("launch", *WHERE, "--name=n1", "--accelerator_type=v4-32",
                  "--config=configs/bert.py:base", "--workdir=gs://bkt/run1",
                  "--config.train.num_steps=10", "--config.data.source=a b", *DATA,
                  BERT_JAX_OVERRIDES="--config.seed=3", BERT_JAX_ENV="FOO=bar baz=1")
  assert proc.returncode == 0, proc.stderr
  calls = [c for c in fake.calls if c[0] != "storage"]
  assert [kind(c) for c in calls] == ["qr-describe", "vm-describe", "ssh-stop",
                                      "ssh-launch"]  # READY; lock removed first
  assert all("--worker=all" in c and c[4] == "n1" for c in calls[2:])
  stop_cmd, launch_cmd = flag(calls[2], "command"), flag(calls[3], "command")
  assert "rm -f /tmp/libtpu_lockfile" in stop_cmd and "pkill -TERM" in stop_cmd
  job_line = next(line for line in launch_cmd.splitlines() if line.startswith("setsid nohup"))
  assert "run.sh" in job_line and "train.log" in job_line and job_line.endswith("&")
  wrapper = launch_cmd.split("run.sh <<'BERT_JAX_EOF'\n", 1)[1].split("\nBERT_JAX_EOF")[0]
  job = shlex.split(next(line for line in wrapper.splitlines() if "bin/bert-jax" in line))
  assert job[:2] == ["FOO=bar", "baz=1"] and job[-1] == "&"
  assert job[2].endswith("bert_jax_venv/bin/bert-jax")
  assert job[3:-1] == ["train", "--config=configs/bert.py:base", "--workdir=gs://bkt/run1",
                       "--config.seed=3", "--config.train.num_steps=10",
                       "--config.data.source=a b", *DATA]
  assert "exit_code" in wrapper


def test_status_one_line_per_worker_and_metrics(fake):
  metrics = "\n".join(json.dumps({"step": s, "loss": 3.0 - s / 1000, "tokens_per_sec": 123456.0})
                      for s in (1100, 1200))
  fake.rules((["queued-resources describe"], [_out("ACTIVE")]),
             (["tpu-vm describe"], [_out("READY")]),
             (["BERT_JAX_STATUS"], [_out(
                 "BERT_JAX_STATUS worker=1 job=running last=I1123 train.py:88] step 1200 "
                 "loss=1.8000 tokens/s=61000\n"
                 "BERT_JAX_STATUS worker=0 job=running last=step: 1200, loss: 1.8, "
                 "tokens_per_sec: 62000.5")]),
             (["storage cat"], [_out('ep": 1000, "loss": 2.0}\n' + metrics)]))  # cut by the range
  proc = fake.run("status", *WHERE, "--name=n1", "--accelerator_type=v4-16",
                  "--bucket=gs://bkt")
  assert proc.returncode == 0, proc.stderr
  assert [kind(c) for c in fake.calls] == ["qr-describe", "vm-describe", "ssh-status",
                                           "storage-cat"]
  assert fake.calls[3] == ["storage", "cat", "--range=-16384", "gs://bkt/bert_jax/n1/metrics.jsonl"]
  lines = proc.stdout.splitlines()
  assert lines[0] == "n1 (v4-16, 2 worker(s)): node READY"
  assert lines[1] == "worker 0: running    step 1200 loss 1.8000 tokens/s 6.2e+04"
  assert lines[2] == "worker 1: running    step 1200 loss 1.8000 tokens/s 6.1e+04"
  assert lines[3] == ("metrics gs://bkt/bert_jax/n1/metrics.jsonl: step 1200 loss 1.8000 "
                      "tokens/s 1.235e+05")


def test_logs_stop_delete(fake):
  base = (*WHERE, "--name=n1", "--accelerator_type=v4-8")
  assert fake.run("logs", *base, "--worker=2", "--lines=50", "--no_follow").returncode == 0
  assert fake.run("stop", *base).returncode == 0
  assert fake.run("delete", *base).returncode == 0
  assert fake.run("delete", *base, "--queued=false").returncode == 0
  logs, stop, delete_qr, delete_vm = fake.calls
  assert flag(logs, "worker") == "2"
  assert flag(logs, "command") == 'tail -n 50 "$HOME"/bert_jax_logs/train.log'
  assert kind(stop) == "ssh-stop" and "--worker=all" in stop
  assert delete_qr == ["compute", "tpus", "queued-resources", "delete", "n1", "--force",
                       "--quiet", *WHERE]
  assert delete_vm == ["compute", "tpus", "tpu-vm", "delete", "n1", "--quiet", *WHERE]


# ---------------------------------------------------------------------------
# recover
# ---------------------------------------------------------------------------

RECOVER = (*WHERE, "--name=n1", "--accelerator_type=v4-32", "--provisioning=spot",
           "--config=configs/bert.py:base", "--workdir=gs://bkt/run1", *DATA)


def jobs(state, workers=4):
  """What job_script prints on `workers` workers."""
  return _out("\n".join(f"BERT_JAX_JOB w={w} {state}" for w in range(workers)))


def no_storage(calls):
  return [c for c in calls if c[0] != "storage"]


def test_recover_recreates_sets_up_and_relaunches_after_preemption(fake):
  fake.rules((["tpu-vm describe"], [_out("READY"), _out("PREEMPTED"), _out("READY")]),
             (["BERT_JAX_JOB"], [jobs("running"), jobs("exited:0")]),
             (["BERT_JAX_CHECK process"], [check_lines(16, 4, 4)]))
  proc = fake.run("recover", *RECOVER, "--queued=false", "--config.train.num_steps=99",
                  BERT_JAX_HUNG_SECONDS="0")
  assert proc.returncode == 0, proc.stderr
  calls = no_storage(fake.calls)
  assert [kind(c) for c in calls] == [
      "vm-describe", "ssh-job",                      # healthy, running
      "vm-describe",                                 # PREEMPTED
      "vm-delete", "vm-create", "vm-describe",       # recreate, wait for READY
      "vm-scp", "ssh-setup", "ssh-check",            # setup
      "ssh-stop", "ssh-launch",                      # lock clean-up, then launch
      "vm-describe", "ssh-job", "vm-describe", "ssh-job"]  # exited 0, confirmed
  assert "--spot" in calls[4] and "--version=tpu-ubuntu2204-base" in calls[4]
  assert flag(calls[1], "worker") == "all"  # every worker's job
  launch_cmd = flag(calls[10], "command")
  for part in ("--config=configs/bert.py:base", "--workdir=gs://bkt/run1",
               "--config.train.num_steps=99"):
    assert part in launch_cmd
  assert "preemption #1" in proc.stdout and "finished" in proc.stdout


def test_recover_creates_a_missing_slice_and_launches(fake):
  fake.rules((["tpu-vm describe"], [NOT_FOUND, _out("READY")]),
             (["BERT_JAX_JOB"], [jobs("exited:0", 1)]),
             (["BERT_JAX_CHECK process"], [check_lines(4, 1, 1)]))
  proc = fake.run("recover", *WHERE, "--name=n1", "--accelerator_type=v4-8", "--queued=false",
                  "--config=configs/bert.py", "--workdir=gs://bkt/run1", *DATA)
  assert proc.returncode == 0, proc.stderr
  assert [kind(c) for c in no_storage(fake.calls)] == [
      "vm-describe", "vm-delete", "vm-create", "vm-describe", "vm-scp", "ssh-setup",
      "ssh-check", "ssh-stop", "ssh-launch", "vm-describe", "ssh-job", "vm-describe", "ssh-job"]
  assert "does not exist yet" in proc.stdout and "preemption #" not in proc.stdout


def test_recover_gives_up_after_max_attempts(fake):
  fake.rules((["queued-resources describe"], [_out("ACTIVE"), _out("SUSPENDED")]),
             (["tpu-vm describe"], [_out("READY")]),
             (["BERT_JAX_JOB"], [jobs("running")]),
             (["queued-resources create"], [{"rc": 1, "err": "ERROR: no capacity\n"}]))
  proc = fake.run("recover", *RECOVER, BERT_JAX_MAX_ATTEMPTS="3", BERT_JAX_HUNG_SECONDS="0")
  assert proc.returncode == 1
  kinds = [kind(c) for c in no_storage(fake.calls)]
  assert kinds[:3] == ["qr-describe", "vm-describe", "ssh-job"]
  assert kinds[3:] == ["qr-describe", "qr-delete", "qr-create"] * 3
  assert "gave up after 3 failed recovery attempts" in proc.stderr
  assert "no capacity" in proc.stderr


def test_recover_does_not_relaunch_a_crash_on_a_healthy_slice(fake):
  fake.rules((["tpu-vm describe"], [_out("READY")]),
             (["BERT_JAX_JOB"], [_out("BERT_JAX_JOB w=0 running\nBERT_JAX_JOB w=1 exited:1\n"
                                      "BERT_JAX_JOB w=2 running\nBERT_JAX_JOB w=3 running")]))
  proc = fake.run("recover", *RECOVER, "--queued=false")
  assert proc.returncode == 1
  assert [kind(c) for c in no_storage(fake.calls)] == ["vm-describe", "ssh-job"] * 2
  assert "exited with code 1" in proc.stderr and "not a preemption" in proc.stderr


# ---------------------------------------------------------------------------
# dry run and bad input: nothing reaches gcloud
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["create", "setup", "launch", "logs", "status", "stop",
                                     "delete", "recover"])
def test_dry_run_prints_commands_and_calls_nothing(fake, command):
  extra = ["--config=configs/bert.py", "--workdir=gs://b/w", *DATA] if command in (
      "launch", "recover") else []
  proc = fake.run(command, "--dry_run", *WHERE, "--name=n1", "--accelerator_type=v4-32",
                  "--provisioning=spot", *extra)
  assert proc.returncode == 0, proc.stderr
  assert fake.calls == []
  assert "+ gcloud compute tpus " in proc.stdout
  if command in ("create", "recover"):
    assert "--runtime-version=tpu-ubuntu2204-base --spot" in proc.stdout
  if command in ("launch", "recover"):
    assert "--worker=all" in proc.stdout and "libtpu_lockfile" in proc.stdout


@pytest.mark.parametrize("args, env, words, code", [
    (["create", "--name=n1", "--accelerator_type=v5e-16", *WHERE], {},
     ["unknown accelerator type 'v5e-16'", "v5litepod-16"], 2),
    (["create", "--name=n1", "--accelerator_type=v4-8"], {},
     ["missing settings PROJECT, ZONE", "BERT_JAX_PROJECT", "--zone"], 2),
    (["launch", "--name=n1", "--accelerator_type=v4-32", *WHERE, "--config=configs/bert.py",
      "--workdir=/tmp/run"], {}, ["4 workers", "gs://"], 2),
    (["recover", "--name=n1", "--accelerator_type=v4-8", *WHERE, "--config=configs/bert.py",
      "--workdir=/tmp/run"], {}, ["recover", "gs://"], 2),
    (["launch", "--name=n1", "--accelerator_type=v4-8", *WHERE, "--config=configs/nope.py",
      "--workdir=gs://b/w"], {}, ["configs/nope.py is not a file"], 2),
    (["create", "--name=My_TPU", "--accelerator_type=v4-8", *WHERE], {},
     ["not a valid TPU name"], 2),
    (["stop", "--name=n1", "--accelerator_type=v4-8", *WHERE, "--config.x=1"], {},
     ["only go with launch or recover"], 2),
    (["create", "--name=n1", "--accelerator_type=v4-8", *WHERE], {"no_gcloud": "1"},
     ["gcloud was not found on PATH"], 1),
])
def test_bad_input_fails_clearly_before_any_gcloud_call(fake, tmp_path, args, env, words,
                                                        code):
  path = None
  if env.pop("no_gcloud", None):
    path = str(tmp_path / "empty-bin")  # python is run by absolute path; gcloud is absent
  proc = fake.run(*args, path=path, **env)
  assert proc.returncode == code, (proc.stdout, proc.stderr)
  assert all(w in proc.stderr for w in words), proc.stderr
  assert fake.calls == []


def test_unknown_flag_is_rejected(fake):
  proc = fake.run("create", *WHERE, "--name=n1", "--accelerator_type=v4-8", "--zonee=x")
  assert proc.returncode == 2 and "--zonee" in proc.stderr
  assert fake.calls == []


# ---------------------------------------------------------------------------
# The remote shell scripts, run for real in a local bash with a fake $HOME.
# ---------------------------------------------------------------------------

def _bash(script, home, timeout=30):
  """Runs a remote script as ssh would: bash in $HOME."""
  return subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=str(home)),
                        cwd=home, capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, seconds=10.0):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_remote_scripts_launch_detached_report_and_stop(tmp_path, monkeypatch):
  # A venv name unique to this test, so the process pattern can match nothing
  # else on the machine (other tests may run `python -m bert_jax.main`).
  venv = f"venv_{uuid.uuid4().hex[:12]}"
  monkeypatch.setattr(remote, "JOB_PATTERN", f"{venv}/bin/bert-ja[x]")
  monkeypatch.setattr(remote, "LOCKFILE", str(tmp_path / "libtpu_lockfile"))
  home = tmp_path / "home"
  (home / "code").mkdir(parents=True)
  (home / venv / "bin").mkdir(parents=True)
  job = home / venv / "bin" / "bert-jax"
  job.write_text("#!/bin/bash\n"
                 "echo \"args: $*\"\n"
                 "echo \"step 7 loss 1.25 tokens/s 900 in $PWD\"\n"
                 "if [ \"$1\" = fail ]; then exit 3; fi\n"
                 "trap 'echo got TERM; kill $! 2>/dev/null; exit 0' TERM\n"
                 "sleep 60 & wait\n")
  job.chmod(0o755)

  start = time.monotonic()
  out = _bash(remote.launch_script("code", venv, "logs", ["train", "--config=c.py:a b"],
                                   ["MY_VAR=x y"]), home)
  assert out.returncode == 0, out.stderr
  assert "BERT_JAX_LAUNCHED" in out.stdout and time.monotonic() - start < 10  # detached
  log = home / "logs" / "train.log"
  assert _wait_for(lambda: log.exists() and "step 7" in log.read_text())
  text = log.read_text()
  assert "args: train --config=c.py:a b" in text and f"in {home / 'code'}" in text
  assert remote.parse_job(_bash(remote.job_script("logs"), home).stdout) == "running"
  status = _bash(remote.status_script("logs", None), home).stdout
  assert "job=running" in status
  last = status.split("last=", 1)[1]
  assert remote.parse_progress(last) == {"step": 7.0, "loss": 1.25, "tokens_per_sec": 900.0}

  pathlib.Path(remote.LOCKFILE).write_text("")
  out = _bash(remote.stop_script(grace_seconds=5), home)
  assert out.returncode == 0 and "BERT_JAX_STOPPED" in out.stdout, out.stderr
  assert not pathlib.Path(remote.LOCKFILE).exists()
  assert _wait_for(lambda: "got TERM" in log.read_text())  # SIGTERM first: it can checkpoint
  assert remote.parse_job(_bash(remote.job_script("logs"), home).stdout) in ("stopped",
                                                                             "exited:0")

  _bash(remote.launch_script("code", venv, "logs", ["fail"], []), home)
  assert _wait_for(lambda: remote.parse_job(
      _bash(remote.job_script("logs"), home).stdout) == "exited:3")


def test_remote_setup_script_unpacks_installs_and_is_idempotent(tmp_path, monkeypatch):
  from tpu_scripts import checkout
  venv = f"venv_{uuid.uuid4().hex[:12]}"
  monkeypatch.setattr(remote, "JOB_PATTERN", f"{venv}/bin/bert-ja[x]")
  home, source = tmp_path / "home", tmp_path / "src"
  (source / "pkg").mkdir(parents=True)
  (source / "setup.py").write_text("")
  (source / "pkg" / "a.py").write_text("A = 1\n")
  (home / venv / "bin").mkdir(parents=True)
  pip = home / venv / "bin" / "pip"  # a working venv is reused; its pip records the calls
  pip.write_text('#!/bin/bash\necho "pip $* in $PWD" >> "$HOME/pip.log"\n')
  pip.chmod(0o755)
  (home / venv / "bin" / "python").symlink_to(sys.executable)  # 3.11+: supported
  (home / "code").mkdir()
  (home / "code" / "stale.py").write_text("")
  assert checkout.pack(source, home / remote.TARBALL) == 2
  script = remote.setup_script("code", venv, "python3", ["extra-pkg==1.0"])
  for _ in range(2):  # twice: same result
    out = _bash(script, home)
    assert out.returncode == 0 and "BERT_JAX_SETUP_DONE" in out.stdout, out.stderr
    assert "BERT_JAX_VENV reused" in out.stdout
    assert (home / "code" / "pkg" / "a.py").read_text() == "A = 1\n"
    assert not (home / "code" / "stale.py").exists() and not (home / "code.new").exists()
  calls = (home / "pip.log").read_text().splitlines()
  assert calls == [f"pip install -q --upgrade pip in {home}",
                   f"pip install -q -e .[tpu] in {home / 'code'}",
                   f"pip install -q extra-pkg==1.0 in {home / 'code'}"] * 2
  job = home / venv / "bin" / "bert-jax"
  job.write_text("#!/bin/bash\nsleep 30\n")
  job.chmod(0o755)
  running = subprocess.Popen([str(job), "train"], start_new_session=True)
  try:
    assert _wait_for(lambda: remote.parse_job(_bash(remote.job_script("logs"), home).stdout)
                     == "running")
    out = _bash(script, home)
    assert out.returncode == 4 and "BERT_JAX_BUSY" in out.stdout
  finally:
    os.killpg(running.pid, 9)  # the script and its sleep: our own process group
    running.wait()


def test_device_check_code_counts_devices():
  # Both checks in one interpreter (one JAX start-up): 8 fake CPU devices are
  # right for (8 devices, 1 process) and wrong for (16, 1).
  runner = "\n".join([
      "import sys",
      f"for code in {[remote.check_code(8, 1), remote.check_code(16, 1)]!r}:",
      "  try:",
      "    exec(code, {})",
      "  except SystemExit as e:",
      "    print('EXIT', e.code)",
  ])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", runner], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  checks, skipped = remote.parse_checks(proc.stdout)
  assert checks == [{"process": 0, "processes": 1, "devices": 8}] * 2 and skipped == 0
  assert [line for line in proc.stdout.splitlines() if line.startswith("EXIT")] == [
      "EXIT 0", "EXIT 3"]
