"""bench/pretrain_restep.py: bert_jax's mid-run state moved into HF PyTorch is the same state.

Without dropout, one step from the moved state must give HF the same
parameters bert_jax gets: that holds only if the parameters, both AdamW
moments, the step count (bias correction) and the learning rate all came over.
"""
import argparse
import pathlib
import tempfile

import numpy as np
import pytest

import bert_jax
from conftest import load_bench

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, BATCH, PREDICTIONS = 99, 16, 4, 3
DIMS = dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64)


def _batch(rng) -> dict:
  tokens = rng.integers(5, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  positions = np.sort(rng.permuted(np.tile(np.arange(1, LENGTH), (BATCH, 1)), axis=1)
                      [:, :PREDICTIONS], axis=1).astype(np.int32)
  return {"encoder_input_tokens": tokens, "encoder_type_ids": np.zeros_like(tokens),
          "mlm_positions": positions, "mlm_targets": rng.integers(5, VOCAB, positions.shape)
          .astype(np.int32), "mlm_weights": np.ones(positions.shape, np.float32)}


def test_one_step_from_the_moved_state_matches_bert_jax():
  restep = load_bench("pretrain_restep")
  pq = restep.pq
  rng = np.random.default_rng(0)
  train, held_out = [_batch(rng) for _ in range(5)], [_batch(rng) for _ in range(2)]
  args = argparse.Namespace(dropout=0.0, lr=1e-2, warmup=2, steps=10, seed=0)
  ours, theirs = pq.make_trainers(args, train[0], vocab_size=VOCAB, dims=DIMS)
  at = 4
  ours.train(train[:at])
  lr = args.lr * pq._torch_schedule(args.warmup, args.steps)(at)
  before, moved, after = restep.restep(ours, theirs, train[at], held_out, at, lr, draws=[0])
  assert moved == pytest.approx(before, rel=1e-5)
  # The step changes the loss by far more than the tolerance, so a wrong
  # moment, count or lr would show.
  assert abs(after["bert_jax"][0] - before) > 1e-3
  assert after["HF PyTorch"][0] == pytest.approx(after["bert_jax"][0], rel=1e-5)
  # And parameter by parameter: restep leaves bert_jax at its state before
  # the step, so take it again and compare with HF's stepped weights.
  ours.train([train[at]])
  with tempfile.TemporaryDirectory() as tmp:
    folder = bert_jax.save_pretrained(ours.model, ours.state.params, pathlib.Path(tmp) / "p")
    ours_hf = dict(transformers.BertForMaskedLM.from_pretrained(folder).named_parameters())
  for name, p in theirs.model.named_parameters():
    np.testing.assert_allclose(p.detach().numpy(), ours_hf[name].detach().numpy(),
                               atol=2e-5, rtol=1e-4, err_msg=name)
