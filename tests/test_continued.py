"""Continued pretraining (DAPT/TAPT): `bert-jax train --config.init_from=...`.

From the real all-MiniLM-L6-v2 folder (an encoder without an MLM head) and
from a bert_jax pretraining workdir: the run starts from the checkpoint's
weights, architecture and tokenizer with a fresh optimizer; a resumed run
restores its own checkpoint; a config that disagrees with the checkpoint is
an error naming the field.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import from_pretrained
from bert_jax import init_from
from bert_jax import train

MINILM = dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)


def _config(tmp_path, **model):
  config = defaults.train_config()
  config.data.source = str(tmp_path / "corpus.txt")
  config.data.seq_length = 32
  config.data.max_predictions = 5
  config.model = defaults.model_config("bert", "tiny", vocab_size=0, **model)
  config.train.num_steps = 2
  config.train.batch_size = 8
  config.optim.warmup_steps = 1
  config.log.every_steps = 1
  config.log.progress = False
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  return config


def _corpus(tmp_path):
  words = "the ship sailed north while the whale dived under the grey water".split()
  rng = np.random.default_rng(0)
  text = "\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(60))
  (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _params(workdir, step) -> dict:
  """{path: numpy array} of the params saved at `step`."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(path).item_metadata.tree
  restored = reader.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return _flat(restored["params"])


@pytest.mark.slow
def test_continued_from_minilm_keeps_its_encoder_at_lr_0(minilm_dir, tmp_path):
  _corpus(tmp_path)
  config = _config(tmp_path, **MINILM)
  config.init_from = str(minilm_dir)
  config.optim.learning_rate = 0.0  # weights stay as loaded: decay is scaled by the lr
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(last["loss"])
  _, reference = from_pretrained(str(minilm_dir))
  reference = _flat(reference)
  saved = _params(tmp_path / "run", 2)
  encoder = [k for k in saved if k.startswith("encoder/")]
  assert len(encoder) > 90
  for name in encoder:  # every encoder tensor is MiniLM's
    np.testing.assert_array_equal(saved[name], reference[name], err_msg=name)
  # MiniLM ships no MLM head: it starts fresh (its decoder is the tied embedding).
  head = [k for k in saved if not k.startswith("encoder/")]
  assert head and not any(k in reference for k in head)


def test_init_from_a_config_that_disagrees_names_the_fields(minilm_dir, tmp_path):
  _corpus(tmp_path)
  config = _config(tmp_path, hidden_size=384, num_heads=12)
  config.init_from = str(minilm_dir)
  with pytest.raises(ValueError, match=r"config.model.num_layers: differs from init_from .*"
                                       r"num_layers=2 here, 6 there; intermediate_size=512 here, "
                                       r"1536 there \(set --config.model.num_layers=6 "
                                       r"--config.model.intermediate_size=1536\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_continued_from_a_workdir_then_resume_restores_its_own_checkpoint(tmp_path):
  _corpus(tmp_path)
  base = _config(tmp_path)
  base.data.source = "builtin:pydoc_topics"
  base.data.vocab_size = 500
  train.train_and_evaluate(base, str(tmp_path / "pre"))
  pre = _params(tmp_path / "pre", 2)

  config = _config(tmp_path)
  config.init_from = str(tmp_path / "pre")
  config.optim.learning_rate = 0.0
  train.train_and_evaluate(config, str(tmp_path / "run"))
  for name, value in _params(tmp_path / "run", 2).items():
    # Every tensor, the MLM head included, is the pretraining run's.
    np.testing.assert_array_equal(value, pre[name], err_msg=name)
  # Its tokenizer is the pretraining run's own trained SentencePiece model.
  assert init_from.pretraining_tokenizer(str(tmp_path / "pre"))[0].startswith(
      str(tmp_path / "pre"))

  # Resuming with a learning rate: the run continues from its own step 2
  # (restored, not loaded again from init_from) and changes the weights.
  config.optim.learning_rate = 1e-3
  config.train.num_steps = 4
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(last["loss"])
  later = _params(tmp_path / "run", 4)
  assert any(not np.array_equal(later[k], pre[k]) for k in later)
