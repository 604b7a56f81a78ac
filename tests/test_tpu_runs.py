"""tpu_scripts: a run's life against a fake gcloud (validation, record, lease, stop, watcher).

The fake gcloud and its checkout (a git repository) are test_tpu_scripts.py's;
its `storage cat/cp` serve gs:// from a folder, so launch.json, lease.json and
stopped.json can be read back. Clocks are real but intervals are milliseconds.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid

import pytest

from test_tpu_scripts import (DATA, RECOVER, TOOL, WHERE, Fake, _bash, _out, _wait_for,
                              check_lines, flag, jobs, kind, no_storage)
from tpu_scripts import remote

RUN = "gs://bkt/run1"
READY = ((["tpu-vm describe"], [_out("READY")]), (["queued-resources describe"], [_out("ACTIVE")]))
LAUNCH = (*WHERE, "--name=n1", "--accelerator_type=v4-32", "--config=configs/bert.py:base",
          f"--workdir={RUN}", *DATA)


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


def read(fake, name):
  return json.loads(fake.gcs(f"{RUN}/{name}").read_text())


@pytest.mark.parametrize("args, words", [
    (["--config=configs/bert.py:huge"], ["unknown variant 'huge'"]),
    (["--config=configs/bert.py", "--config.train.batchsize=256"],
     ['config.train has no field "batchsize"', 'did you mean "batch_size"']),
    (["--config=configs/bert.py", "--config.train.batch_size=abc"], ["batch_size=abc"]),
    (["--config=configs/bert.py"], ["config.data.data_dir: empty", "tfds"]),
])
def test_launch_refuses_a_bad_config_before_any_gcloud_call(fake, args, words):
  extra = [] if "data_dir" in words[0] else list(DATA)
  proc = fake.run("launch", *WHERE, "--name=n1", "--accelerator_type=v4-8",
                  f"--workdir={RUN}", *args, *extra)
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words)
  assert fake.calls == []


def test_launch_refuses_a_slice_that_is_not_ready(fake):
  fake.rules((["tpu-vm describe"], [_out("CREATING")]))
  proc = fake.run("launch", *LAUNCH, "--queued=false")
  assert proc.returncode == 1 and "n1 is not READY (node CREATING)" in proc.stderr
  assert [kind(c) for c in fake.calls] == ["vm-describe"]


def test_launch_writes_the_run_record_and_lease(fake):
  commit = fake.commit("v1")
  (fake.source / "setup.py").write_text("# edited, not committed\n")
  fake.rules(*READY)
  proc = fake.run("launch", *LAUNCH, "--config.train.batch_size=256",
                  BERT_JAX_OVERRIDES="--config.seed=3")
  assert proc.returncode == 0, proc.stderr
  record, lease = read(fake, "launch.json"), read(fake, "lease.json")
  assert (record["revision"], record["dirty"], record["stamp"]) == (commit, False, commit)
  assert record["config"] == "configs/bert.py:base"
  assert record["overrides"] == ["--config.seed=3", *DATA, "--config.train.batch_size=256"]
  assert record["settings"]["ACCELERATOR_TYPE"] == "v4-32" and record["time"].endswith("Z")
  assert (lease["slice"], lease["run_id"], lease["released"]) == ("n1", record["run_id"], False)
  prepare = flag(next(c for c in fake.calls if kind(c) == "ssh-stop"), "command")
  assert f"!= {commit} ]" in prepare  # the workers must hold exactly that commit
  # --allow_dirty ships and records the edits, with their hash.
  proc = fake.run("launch", *LAUNCH, "--allow_dirty")
  record = read(fake, "launch.json")
  assert record["dirty"] and len(record["diff_hash"]) == 64
  assert record["stamp"] == f"{commit}+dirty.{record['diff_hash'][:12]}"


def test_launch_refuses_when_the_workers_hold_other_code(fake):
  fake.rules(*READY, (["BERT_JAX_STOPPED"], [{"out": "BERT_JAX_WRONG_CODE w0 has abc\n",
                                               "rc": 6}]))
  proc = fake.run("launch", *LAUNCH)
  assert proc.returncode == 1 and "holds code abc" in proc.stderr and "setup" in proc.stderr
  assert "ssh-launch" not in [kind(c) for c in fake.calls]


def test_a_second_launch_into_a_leased_workdir_is_refused(fake):
  fake.rules(*READY)
  assert fake.run("launch", *LAUNCH).returncode == 0
  run_id = read(fake, "lease.json")["run_id"]
  before = len(fake.calls)
  proc = fake.run("launch", *WHERE, "--name=n2", "--accelerator_type=v4-32",
                  "--config=configs/bert.py:base", f"--workdir={RUN}", *DATA)
  assert proc.returncode == 1
  assert f"leased by slice n1 (proj/us-central2-b), run {run_id}" in proc.stderr
  assert [kind(c) for c in fake.calls[before:]] == ["qr-describe", "vm-describe", "storage-cat"]
  # Stale (no heartbeat for an hour): taken over only with --take_over.
  lease = read(fake, "lease.json")
  lease["heartbeat"] = time.time() - 3600
  fake.gcs(f"{RUN}/lease.json").write_text(json.dumps(lease))
  proc = fake.run("launch", *WHERE, "--name=n2", "--accelerator_type=v4-32",
                  "--config=configs/bert.py:base", f"--workdir={RUN}", *DATA)
  assert proc.returncode == 1 and "stale lease" in proc.stderr and "--take_over" in proc.stderr
  proc = fake.run("launch", *WHERE, "--name=n2", "--accelerator_type=v4-32",
                  "--config=configs/bert.py:base", f"--workdir={RUN}", *DATA, "--take_over")
  assert proc.returncode == 0, proc.stderr
  assert read(fake, "lease.json")["slice"] == "n2"


def test_recover_relaunches_the_recorded_run_not_its_flags(fake):
  first = fake.commit("v1")
  fake.rules(*READY)
  assert fake.run("launch", *LAUNCH, "--config.train.batch_size=256").returncode == 0
  (fake.source / "new.py").write_text("x = 1\n")
  assert fake.commit("v2") != first  # HEAD moved on since the launch
  recover = (*WHERE, "--name=n1", "--accelerator_type=v4-32", f"--workdir={RUN}",
             "--config=configs/bert.py:large")
  # Other overrides than the record's: refused before any slice call.
  fake.calls_path = fake.dir / "calls.jsonl"
  fake.calls_path.unlink()
  proc = fake.run("recover", *recover, "--config.train.batch_size=8")
  assert proc.returncode == 2 and "recover relaunches that run as it was" in proc.stderr
  assert [kind(c) for c in fake.calls] == ["storage-cat"]
  fake.calls_path.unlink()
  fake.rules((["queued-resources describe"], [_out("SUSPENDED"), _out("ACTIVE")]),
             (["tpu-vm describe"], [_out("READY")]),
             (["BERT_JAX_JOB"], [jobs("exited:0")]),
             (["BERT_JAX_CHECK process"], [check_lines(16, 4, 4)]))
  proc = fake.run("recover", *recover, BERT_JAX_HUNG_SECONDS="0")
  assert proc.returncode == 0, proc.stderr
  assert "preemption #1" in proc.stdout, proc.stdout
  launch_cmd = flag(next(c for c in fake.calls if kind(c) == "ssh-launch"), "command")
  assert "--config=configs/bert.py:base" in launch_cmd and ":large" not in launch_cmd
  assert "--config.train.batch_size=256" in launch_cmd
  with tarfile.open(fake.dir / "uploaded.tar.gz") as tar:  # setup shipped the recorded commit
    assert tar.extractfile("BERT_JAX_REVISION").read().decode().strip() == first
    assert "new.py" not in tar.getnames()
  assert "CONFIG configs/bert.py:large is not used" in proc.stdout


def test_stop_during_recover_stays_stopped(fake):
  stopped = f"{RUN}/stopped.json"
  fake.rules(*READY, (["BERT_JAX_JOB"], [jobs("stopped")], stopped),
             (["BERT_JAX_JOB"], [jobs("running")]))
  env = {k: v for k, v in os.environ.items() if not k.startswith("BERT_JAX_")}
  env.update(FAKE_GCLOUD_DIR=str(fake.dir), PATH=f"{fake.dir / 'bin'}{os.pathsep}{env['PATH']}",
             BERT_JAX_SETTINGS=str(fake.settings), BERT_JAX_SOURCE_DIR=str(fake.source),
             BERT_JAX_WATCH_SECONDS="0.01", BERT_JAX_HUNG_SECONDS="0")
  watcher = subprocess.Popen([sys.executable, str(TOOL), "recover", *RECOVER], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: [kind(c) for c in fake.calls].count("ssh-job") >= 2, 60)
    proc = fake.run("stop", *WHERE, "--name=n1", "--accelerator_type=v4-32",
                    f"--workdir={RUN}")
    assert proc.returncode == 0, proc.stderr
    out, err = watcher.communicate(timeout=60)
  finally:
    watcher.kill()
  assert watcher.returncode == 0, err
  assert "stopped by `tpu.py stop`" in out and "not relaunching" in out
  kinds = [kind(c) for c in fake.calls]
  assert not {"ssh-launch", "qr-create", "qr-delete", "vm-scp"} & set(kinds)
  stop = flag(next(c for c in fake.calls if kind(c) == "ssh-stop"), "command")
  assert "bert_jax_logs/stopped" in stop  # the workers' marker too


def test_watcher_stops_and_relaunches_a_hung_job(fake):
  fake.rules(*READY)
  assert fake.run("launch", *LAUNCH).returncode == 0
  fake.gcs(f"{RUN}/lease.json").unlink()
  fake.gcs(f"{RUN}/metrics.jsonl").write_text('{"step": 100, "loss": 2.0}\n')
  (fake.dir / "calls.jsonl").unlink()
  # Running until the relaunch writes a lease again; then finished.
  fake.rules(*READY, (["BERT_JAX_JOB"], [jobs("exited:0")], f"{RUN}/lease.json"),
             (["BERT_JAX_JOB"], [jobs("running")]))
  proc = fake.run("recover", *RECOVER, BERT_JAX_HUNG_SECONDS="0.05")
  assert proc.returncode == 0, proc.stderr
  kinds = [kind(c) for c in no_storage(fake.calls)]
  i = kinds.index("ssh-launch")
  assert kinds[i - 2:i + 1] == ["ssh-stop", "ssh-stop", "ssh-launch"]  # stop, prepare, launch
  assert "hung: no new line in gs://bkt/run1/metrics.jsonl" in proc.stdout
  assert all(re.match(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] ", line)
             for line in proc.stdout.splitlines() if line.startswith("["))


def test_iap_goes_only_on_the_commands_that_take_it(fake):
  fake.rules(*READY)
  base = (*WHERE, "--name=n1", "--accelerator_type=v4-8")
  assert fake.run("logs", *base, "--no_follow", "--iap=true").returncode == 0
  assert fake.calls[0][:5] == ["alpha", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--tunnel-through-iap" in fake.calls[0]
  proc = fake.run("status", *base, "--iap=true")
  assert [c[0] for c in fake.calls[1:3]] == ["compute", "compute"]  # describe: GA, no IAP
  (fake.dir / "calls.jsonl").unlink()
  proc = fake.run("logs", *base, BERT_JAX_SSH_FLAGS="--tunnel-through-iap")
  assert proc.returncode == 2 and "IAP=true" in proc.stderr and fake.calls == []


def test_delete_copies_the_worker_logs_first(fake):
  fake.rules(*READY)
  assert fake.run("delete", *WHERE, "--name=n1", "--accelerator_type=v4-32",
                  f"--workdir={RUN}").returncode == 0
  assert [kind(c) for c in fake.calls] == ["qr-describe", "vm-describe", "ssh-copylogs",
                                           "qr-delete"]


def test_wrapper_survives_stop_heartbeats_and_releases_the_lease(tmp_path, monkeypatch):
  venv = f"venv_{uuid.uuid4().hex[:12]}"
  monkeypatch.setattr(remote, "JOB_PATTERN", f"{venv}/bin/bert-ja[x]")
  monkeypatch.setattr(remote, "LOCKFILE", str(tmp_path / "libtpu_lockfile"))
  home, work = tmp_path / "home", tmp_path / "work"
  (home / "code").mkdir(parents=True)
  (home / venv / "bin").mkdir(parents=True)
  (home / venv / "bin" / "python").symlink_to(sys.executable)
  job = home / venv / "bin" / "bert-jax"
  job.write_text("#!/bin/bash\necho step 1\ntrap 'echo got TERM; exit 0' TERM\n"
                 "sleep 60 & wait\n")
  job.chmod(0o755)
  lease = work / "lease.json"
  work.mkdir()
  lease.write_text(json.dumps({"run_id": "r1"}))
  run = {"lease": str(lease), "run_id": "r1", "holder": json.dumps({"slice": "n1"}),
         "every": "0.05", "logs": str(work / "logs" / "n1-t"), "record": '{"run_id": "r1"}',
         "record_path": str(work / "launch.json")}
  out = _bash(remote.launch_script("code", venv, "logs", ["train"], [], run), home)
  assert out.returncode == 0, out.stderr
  assert json.loads((work / "launch.json").read_text()) == {"run_id": "r1"}
  assert _wait_for(lambda: json.loads(lease.read_text()).get("state") == "running")
  beat = json.loads(lease.read_text())["heartbeat"]
  assert _wait_for(lambda: json.loads(lease.read_text())["heartbeat"] > beat)  # renewed
  assert _wait_for(lambda: (work / "logs" / "n1-t" / "worker-0.log").exists())
  out = _bash(remote.stop_script(5, "logs"), home)
  assert "BERT_JAX_STOPPED" in out.stdout
  code = home / "logs" / "exit_code"
  assert _wait_for(lambda: code.exists())  # the wrapper lived on to write it
  assert code.read_text().strip() == "0"
  assert remote.parse_job(_bash(remote.job_script("logs"), home).stdout) == "stopped"
  assert _wait_for(lambda: json.loads(lease.read_text()).get("released") is True)
  assert json.loads(lease.read_text())["state"] == "exited:0"
  assert "got TERM" in (work / "logs" / "n1-t" / "worker-0.log").read_text()
