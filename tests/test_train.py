"""The training loop end to end, through the real CLI in subprocesses.

Each run is a separate `python -m bert_jax.main train` process, as a user
launches it: exact resume after SIGKILL, resume after SIGTERM, two processes
(gloo collectives) equal to one, a non-finite loss, and the errors a bad
config or workdir gives before anything is compiled.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bert_jax import defaults
from bert_jax import train
from bert_jax.data import sources
from bert_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BERT-small-ish steps (~0.2 s on 2 cores): slow enough that a watcher can kill
# a run between two checkpoints, fast enough for CI.
BASE_OVERRIDES = (
    "--config.data.seq_length=64", "--config.data.max_predictions=10",
    "--config.train.batch_size=16", "--config.train.num_steps=30",
    "--config.checkpoint.every_steps=10", "--config.log.every_steps=1",
    "--config.log.progress=False", "--config.eval.source=",
    # constant lr: a 5-step run follows the first 5 steps of a 30-step one.
    "--config.optim.schedule=constant", "--config.optim.warmup_steps=5",
    "--config.model.hidden_size=256", "--config.model.num_heads=4",
    "--config.model.intermediate_size=1024", "--config.model.max_position_embeddings=64",
)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  """A small BERT-style SentencePiece model trained once for every run here."""
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  tok = tokenizer_lib.train_sentencepiece(sources.iter_paragraphs("builtin:pydoc_topics"),
                                          prefix, 1000, extra_ids=0, bert_special_tokens=True)
  return tok.path


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = ROOT
  env.pop("JAX_PLATFORMS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _command(workdir, spm, *extra) -> list:
  return [sys.executable, "-m", "bert_jax.main", "train", "--config=configs/quickstart.py",
          f"--workdir={workdir}", f"--config.data.tokenizer={spm}", *BASE_OVERRIDES, *extra]


def _run(workdir, spm, *extra, devices=8, timeout=600):
  proc = subprocess.run(_command(workdir, spm, *extra), cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)
  return proc


def _losses(workdir) -> dict:
  """step -> logged loss (the last line of a step wins, as a reader would take it)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        out[record["step"]] = record["loss"]
  return out


def _check(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def _signal_at(workdir, spm, step, sig, *extra, timeout=600) -> tuple[int, str]:
  """Runs a training process, sends `sig` once metrics.jsonl logs `step`; (status, stderr)."""
  err_path = os.path.join(os.path.dirname(workdir), "stderr.txt")
  with open(err_path, "w") as err:  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(_command(workdir, spm, *extra), cwd=ROOT, env=_env(8), stderr=err)
    try:
      deadline = time.time() + timeout
      while proc.poll() is None and time.time() < deadline:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and step in _losses(workdir):
          proc.send_signal(sig)
          break
        time.sleep(0.01)
      proc.wait(timeout=timeout)
    finally:
      proc.kill()
  with open(err_path) as f:
    return proc.returncode, f.read()


@pytest.fixture(scope="module")
def uninterrupted(spm, tmp_path_factory):
  """Losses of a 30-step run that nothing interrupts."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _check(_run(workdir, spm))
  return _losses(workdir)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(spm, uninterrupted, tmp_path):
  assert sorted(uninterrupted) == list(range(1, 31))
  assert uninterrupted[30] < uninterrupted[1]  # it trains
  workdir = str(tmp_path / "run")
  status, err = _signal_at(workdir, spm, 25, signal.SIGKILL)
  assert status == -signal.SIGKILL, err[-3000:]
  killed_at = max(_losses(workdir))
  assert 25 <= killed_at < 30, killed_at
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1:] != ["30"]

  _check(_run(workdir, spm))
  resumed = _losses(workdir)
  # Steps logged after checkpoint 20 by the killed run were dropped and redone.
  assert sorted(resumed) == list(range(1, 31))
  for step in range(21, 31):
    assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(spm, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  # Logged every 4 steps: the stop must still log the steps since the last line.
  status, err = _signal_at(workdir, spm, 12, signal.SIGTERM, "--config.log.every_steps=4")
  assert status == 143, err[-3000:]  # stopped, not finished
  assert "preempted: saved step" in err
  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                       if s.isdigit())
  stopped = steps_saved[-1]
  assert steps_saved == [10, stopped] and 12 < stopped < 20  # off the every-10 grid
  assert max(_losses(workdir)) == stopped

  _check(_run(workdir, spm))
  resumed = _losses(workdir)
  for step in range(stopped + 1, 31):
    assert resumed[step] == uninterrupted[step], step


@pytest.mark.slow
def test_two_processes_equal_one(spm, uninterrupted, tmp_path):
  """2 processes x 4 CPU devices (gloo) follow the 1 x 8 run's first 5 losses."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path)
  procs = [subprocess.Popen(
      _command(workdir, spm, "--config.train.num_steps=5",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5]
  for step in range(1, 6):
    assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
  # The checkpoint holds both hosts' data shards (merged position).
  assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_non_finite_loss_stops_without_checkpoint(spm, tmp_path):
  workdir = str(tmp_path)
  # An absurd learning rate overflows the parameters after the first update.
  proc = _run(workdir, spm, "--config.optim.learning_rate=1e38",
              "--config.checkpoint.every_steps=1", "--config.optim.warmup_steps=0",
              "--config.optim.clip_norm=0")
  assert proc.returncode != 0
  assert "non-finite" in proc.stderr and "at step 2" in proc.stderr, proc.stderr[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert saved == [1]


def test_misspelt_config_key_fails_naming_it(spm, tmp_path):
  proc = _run(str(tmp_path), spm, "--config.trian.num_steps=3", timeout=120)
  assert proc.returncode != 0
  assert "trian" in proc.stderr


@pytest.mark.parametrize("override, message", [
    (dict(batch_size=12), "train.batch_size"),
    (dict(num_microbatches=3), "train.batch_size"),
    (dict(rules="tensor_only"), "mesh.rules"),
    (dict(family="gpt"), "family"),
    (dict(objective="span_corruption"), "data.objective"),
    (dict(hidden_size=129), "config.model"),
    (dict(prng_impl="philox"), "config.train.prng_impl: unknown PRNG implementation 'philox'"),
    (dict(label_smoothing=0.1), "config.train.label_smoothing: 0.1: the 'mlm' objective has no "
                                "seq2seq term"),
    (dict(label_smoothing=1.0), "config.train.label_smoothing: must be in [0, 1)"),
    (dict(schedule="wsd"), "config.optim (with train.num_steps=1000000): schedule 'wsd' needs "
                           "0 < decay_steps"),
])
def test_bad_config_fails_before_compiling(override, message):
  config = defaults.train_config()
  for key, value in override.items():
    section = {"batch_size": config.train, "num_microbatches": config.train,
               "prng_impl": config.train, "label_smoothing": config.train, "rules": config.mesh, "family": config,
               "objective": config.data, "hidden_size": config.model,
               "schedule": config.optim}[key]
    section[key] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    train.validate(config)


def test_unwritable_workdir_fails_before_compiling(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  compiled = []
  monkeypatch.setattr(train.steps, "make_train_step", lambda *a, **k: compiled.append(1))
  monkeypatch.setattr(train.steps, "create_sharded_state", lambda *a, **k: compiled.append(1))
  with pytest.raises(Exception, match="file/run"):
    train.train_and_evaluate(defaults.train_config(), str(blocker / "run"))
  assert not compiled


@pytest.mark.slow
def test_quickstart_held_out_loss_falls(tmp_path):
  """The README's main job, shortened to 100 steps: held-out MLM loss drops clearly."""
  workdir = str(tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "train", "--config=configs/quickstart.py",
       f"--workdir={workdir}", "--config.train.num_steps=100"],
      cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=900)
  _check(proc)
  evals = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "eval/mlm/loss" in record:
        evals[record["step"]] = record["eval/mlm/loss"]
  assert sorted(evals) == [0, 100]
  assert evals[100] < evals[0] - 1.0, evals  # measured: 8.38 -> 7.01
  assert "done: step 100" in proc.stderr
  assert os.path.isfile(os.path.join(workdir, "spm_mlm_4000.model"))
