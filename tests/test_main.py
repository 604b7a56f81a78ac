"""The command line: `inspect` and `train-tokenizer` run end to end in a subprocess,
and bad input ends in one `error: ...` line with exit status 2 (main.py's docstring).

The error cases all fail before anything is compiled: a few seconds each, most
of it importing TensorFlow and JAX.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "bert_jax.main", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)


def test_inspect_prints_masks_and_writes_npz(tmp_path):
  out = tmp_path / "batches.npz"
  proc = _cli("inspect", "--config=configs/quickstart.py", "--config.train.batch_size=16",
              f"--workdir={tmp_path}", "--num_batches=2", "--num_examples=1", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Masked slots are shown as [input->target]; at least one is a real [MASK].
  assert "[[MASK]->" in proc.stdout
  assert proc.stdout.count("=== batch") == 2
  # The tokenizer was trained into the workdir, and the batches saved.
  assert list(tmp_path.glob("spm_mlm_*.model"))
  with np.load(out) as z:
    assert z["b0/encoder_input_tokens"].shape == (16, 64)  # the quick start's lengths
    assert z["b1/mlm_positions"].shape == (16, 10)
    assert not np.array_equal(z["b0/encoder_input_tokens"], z["b1/encoder_input_tokens"])


def _python(code: str, *args, cwd=ROOT):
  """Runs `code` (which patches bert_jax.main) and then the CLI on `args`, in a subprocess."""
  script = textwrap.dedent(code) + f"\nsys.argv = ['bert-jax', *{list(args)!r}]\nmain.run()\n"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(proc, status: int = 2) -> str:
  """Asserts the exit status, a last stderr line `error: ...` and no traceback; returns the line."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == status, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[-1]


QUICKSTART = "--config=configs/quickstart.py"
# (command line with {tmp} for the test's folder, what the error line must name)
BAD_INPUT = {
    "misspelt_key": (["inspect", QUICKSTART, "--config.data.sourse=x.txt"],
                     ["--config.data.sourse", 'config.data has no field "sourse"',
                      'did you mean "source"']),
    "misspelt_group": (["inspect", QUICKSTART, "--config.dat.source=x.txt"],
                       ["--config.dat.source", 'did you mean "data"']),
    "override_below_a_value": (["inspect", QUICKSTART, "--config.data.source.x=1"],
                               ["--config.data.source.x", "config.data.source is a str"]),
    "bad_override_type": (["inspect", QUICKSTART, "--config.train.batch_size=abc"],
                          ["--config.train.batch_size=abc", "int"]),
    "missing_config_file": (["inspect", "--config=configs/nope.py", "--config.seed=1"],
                            ["configs/nope.py", "does not exist"]),
    "unknown_variant": (["train", "--config=configs/bert.py:huge", "--workdir={tmp}"],
                        ["configs/bert.py", "unknown variant 'huge'"]),
    "missing_workdir": (["train", QUICKSTART], ["train needs --workdir"]),
    "missing_config": (["inspect"], ["inspect needs --config"]),
    "unknown_flag": (["inspect", QUICKSTART, "--num_batchs=2"], ["num_batchs"]),
    "missing_source_file": (["inspect", QUICKSTART, "--config.data.source={tmp}/none.txt"],
                            ["config.data.source:", "none.txt", "does not exist"]),
    "empty_corpus": (["inspect", QUICKSTART, "--config.data.source={tmp}/empty.txt"],
                     ["config.data.source:", "empty.txt", "is empty"]),
    "empty_eval_source": (["train", QUICKSTART, "--workdir={tmp}/run",
                           "--config.data.vocab_size=500",
                           "--config.eval.source={tmp}/empty.txt"],
                          ["config.eval.source:", "empty.txt", "is empty"]),
    "bad_config_value": (["train", QUICKSTART, "--workdir={tmp}/run",
                          "--config.train.num_steps=0"],
                         ["config.train.num_steps", "must be >= 1, got 0"]),
}


def _args(case: str, tmp_path) -> list:
  (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
  return [a.format(tmp=tmp_path) for a in BAD_INPUT[case][0]]


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
  line = _one_line_error(_cli(*_args(case, tmp_path)))
  for name in BAD_INPUT[case][1]:
    assert name in line, line


@pytest.mark.parametrize("case", ["misspelt_key", "unknown_variant", "missing_source_file"])
def test_verbose_shows_the_traceback_above_the_line(tmp_path, case):
  # One flags error, one config file error, one error of a running command.
  proc = _cli(*_args(case, tmp_path), "--verbose")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback (most recent call last)" in proc.stderr
  assert lines[-1].startswith("error: ") and BAD_INPUT[case][1][0] in lines[-1], lines[-1]


def test_non_finite_loss_is_one_line_and_exit_1(tmp_path):
  proc = _python("""
      import sys
      from bert_jax import main
      def diverge(config):
        raise FloatingPointError("non-finite loss (nan) at step 3; stopping without saving")
      main._train = diverge
      """, "train", QUICKSTART, f"--workdir={tmp_path}")
  assert _one_line_error(proc, status=1) == (
      "error: non-finite loss (nan) at step 3; stopping without saving")


def test_a_bug_keeps_its_traceback(tmp_path):
  proc = _python("""
      import sys
      from bert_jax import main
      def bug(config):
        raise TypeError("unsupported operand deep inside")
      main._inspect = bug
      """, "inspect", QUICKSTART)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == "TypeError: unsupported operand deep inside"
  assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_preempted_run_exits_143_with_its_warning(tmp_path):
  proc = _python("""
      import sys
      from bert_jax import loop, main, train
      def preempted(config, workdir):
        raise loop.Preempted(7)
      train.train_and_evaluate = preempted
      main._init_distributed = lambda: None
      """, "train", QUICKSTART, f"--workdir={tmp_path}")
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert "preempted: saved step 7" in proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr
  assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_inspect_rejects_misspelt_config_key(tmp_path):
  proc = _cli("inspect", "--config=configs/quickstart.py", "--config.data.sequence_length=64",
              f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "sequence_length" in proc.stderr and "seq_length" in proc.stderr


def test_unknown_command_is_a_usage_error():
  proc = _cli("fly")
  assert proc.returncode != 0
  assert "inspect" in proc.stderr and "train-tokenizer" in proc.stderr


def test_train_tokenizer_writes_a_loadable_model(tmp_path):
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  lines = [" ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(12))
           for _ in range(2000)]
  corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
  prefix = tmp_path / "spm"
  proc = _cli("train-tokenizer", f"--input={corpus}", f"--model_prefix={prefix}",
              "--vocab_size=200", "--extra_ids=10")
  assert proc.returncode == 0, proc.stderr[-2000:]
  from bert_jax.data import tokenizer
  tok = tokenizer.load_tokenizer(str(prefix) + ".model", extra_ids=10)
  assert tok.vocab_size == 210
  assert tok.id_to_piece(209) == "<extra_id_0>"
