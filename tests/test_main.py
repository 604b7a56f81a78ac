"""The command line: `inspect` and `train-tokenizer` run end to end in a subprocess."""
import os
import pathlib
import subprocess
import sys

import numpy as np

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
