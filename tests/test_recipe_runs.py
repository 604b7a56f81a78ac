"""Exact resume and multi-host equality for the two-model recipes, through the real CLI.

ELECTRA keeps a generator and a discriminator in one state; distillation
keeps a frozen teacher (no optimizer state) next to the student; BERT's MLM
run is checked with the hardware dropout PRNG (train.prng_impl='rbg'). For
each, a run SIGKILLed between checkpoints resumes onto the losses of a run nothing
interrupted, and 2 processes x 4 CPU devices (gloo collectives) follow 1 x 8.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_jax.data import sources
from bert_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OVERRIDES = (
    "--config.data.seq_length=32", "--config.data.max_predictions=5",
    "--config.train.batch_size=8", "--config.checkpoint.every_steps=4",
    "--config.log.every_steps=1", "--config.log.progress=False", "--config.eval.source=",
    "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
    "--config.model.max_position_embeddings=32", "--config.checkpoint.async_save=False",
    # 256 wide: steps slow enough (~0.1 s) to kill a run between two checkpoints.
    "--config.model.hidden_size=256", "--config.model.num_heads=4",
    "--config.model.intermediate_size=1024",
)
# case -> (quickstart variant, its extra overrides, its logged losses besides 'loss').
_RECIPES = {
    "electra": ("electra", ("--config.model.num_layers=1",),
                ("train/mlm/loss", "train/rtd/loss")),
    "distil": ("distil", ("--config.model.num_layers=1",),
               ("train/kd/loss", "train/mlm/loss", "train/cos/loss")),
    "mlm_rbg": ("mlm", ("--config.model.num_layers=1", "--config.train.prng_impl=rbg"),
                ("train/mlm/loss",)),
}


def _env(devices):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _command(variant, workdir, tokenizer, steps, *extra):
  return [sys.executable, "-m", "bert_jax.main", "train",
          f"--config=configs/quickstart.py:{variant}", f"--workdir={workdir}",
          f"--config.data.tokenizer={tokenizer}", f"--config.train.num_steps={steps}",
          *_OVERRIDES, *extra]


def _run(command, devices=8):
  proc = subprocess.run(command, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(workdir, keys):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        out[r["step"]] = tuple(r[k] for k in ("loss",) + keys)
  return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  return tokenizer_lib.train_sentencepiece(sources.iter_paragraphs("builtin:pydoc_topics"),
                                           prefix, 600, extra_ids=0,
                                           bert_special_tokens=True).path


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_RECIPES))
def test_sigkill_resume_is_exact_and_two_processes_equal_one(case, tokenizer, tmp_path):
  variant, extra, keys = _RECIPES[case]
  if variant == "distil":  # its teacher: a 2-layer BERT of the same shape, 3 steps
    teacher = str(tmp_path / "teacher")
    _run(_command("mlm", teacher, tokenizer, 3, "--config.model.num_layers=2"))
    extra = extra + (f"--config.train.teacher={teacher}",)

  full = str(tmp_path / "full")
  _run(_command(variant, full, tokenizer, 16, *extra))
  uninterrupted = _losses(full, keys)
  assert sorted(uninterrupted) == list(range(1, 17))

  killed = str(tmp_path / "killed")
  with open(tmp_path / "err.txt", "w", encoding="utf-8") as err:
    proc = subprocess.Popen(_command(variant, killed, tokenizer, 16, *extra), cwd=ROOT,
                            env=_env(8), stderr=err)
    try:
      while proc.poll() is None:
        if os.path.exists(os.path.join(killed, "metrics.jsonl")) and 9 in _losses(killed, keys):
          proc.send_signal(signal.SIGKILL)
          break
        time.sleep(0.01)
      proc.wait(timeout=600)
    finally:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert 9 <= max(_losses(killed, keys)) < 16
  _run(_command(variant, killed, tokenizer, 16, *extra))
  resumed = _losses(killed, keys)
  for step in range(9, 17):  # from checkpoint 8 (or 12) on, to the bit
    assert resumed[step] == uninterrupted[step], step

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = str(tmp_path / "two")
  procs = [subprocess.Popen(
      _command(variant, two, tokenizer, 4, *extra, f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  both = _losses(two, keys)
  for step in range(1, 5):
    np.testing.assert_allclose(both[step], uninterrupted[step], rtol=1e-5, err_msg=str(step))
