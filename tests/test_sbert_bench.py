"""bench/sbert_mrpc.py: its options, and a one-step quick run on real MRPC rows from MiniLM."""
import numpy as np
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("sbert_mrpc")


def test_config_is_the_variant_with_quick_options(bench):
  args = type("Args", (), dict(minilm="/m", data="/d", epochs=0, max_train=0, max_eval=0))()
  config = bench.make_config(args, "cosine")
  # The variant as configs/sbert.py sets it: fit() defaults, thresholds from train.
  assert (config.finetune.loss, config.train.batch_size, config.train.num_epochs) == (
      "cosine", 16, 4)
  assert config.optim.learning_rate == 2e-5 and config.train.warmup_fraction == 0.1
  assert config.finetune.threshold_split == "train" and config.seed == 0
  args.epochs, args.max_train, args.max_eval = 2, 40, 8
  config = bench.make_config(args, "mnr")
  assert (config.train.batch_size, config.train.num_epochs) == (64, 2)
  assert (config.data.max_train_examples, config.data.max_eval_examples) == (40, 8)
  assert (config.init_from, config.data.data_dir) == ("/m", "/d")


def test_unknown_loss_is_refused(bench):
  with pytest.raises(ValueError, match="--losses"):
    bench.main(["--minilm=/m", "--losses=mnr,triplet"])


@pytest.mark.slow
def test_quick_run_matches_direct_scoring(bench, shared_data, minilm_dir, capsys):
  from bert_jax import embed
  from bert_jax.tasks import glue
  from bert_jax.tasks import sentence_eval
  n_train, n_dev = 32, 48
  untrained, mnr = bench.main([f"--minilm={minilm_dir}", f"--data={shared_data}",
                               "--losses=mnr", "--epochs=1", f"--max_train={n_train}",
                               f"--max_eval={n_dev}"])
  # The untrained row is what sentence_eval gives on MiniLM's own embeddings (embed.py's
  # path: HF folder pooling + Normalize), thresholds from the same train pairs.
  embedder = embed.load(str(minilm_dir))
  splits = {}
  for split, n in (("train", n_train), ("dev", n_dev)):
    rows = glue.read_tsv(str(shared_data), "mrpc", split)[:n]
    vectors = embed.embed(embedder, [r.text_a for r in rows] + [r.text_b for r in rows], 64)
    splits[split] = (sentence_eval.cosine_scores(vectors[:n], vectors[n:]),
                     np.array([int(r.label) for r in rows]))
  direct = sentence_eval.pair_classification(splits["train"], splits["dev"])
  for key in ("accuracy", "f1", "spearman"):
    assert untrained[key] == pytest.approx(direct[key], abs=1e-4), key
  assert (untrained["epochs"], untrained["steps"]) == (0, 0)
  # mnr trains on the positive pairs alone: all of them fit one batch of 64.
  positives = int(splits["train"][1].sum())
  assert (mnr["run"], mnr["epochs"], mnr["steps"], mnr["train_pairs"]) == ("mnr", 1, 1,
                                                                          positives)
  assert mnr["best"]["epoch"] == 1 and mnr["best"]["metric"] == "dev/f1"
  assert mnr["wall_s"] > mnr["eval_s"] > 0 and mnr["train_examples_per_s"] > 0
  for row in (untrained, mnr):
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["f1"] <= 1.0
    assert -1.0 <= row["spearman"] <= 1.0
  # One step at lr 2e-5 (10% of 1 step rounds to no warmup) barely moves the embeddings.
  assert abs(mnr["f1"] - untrained["f1"]) < 0.1
  out = capsys.readouterr().out
  assert "| MiniLM, untrained | 0 | 0 |" in out and "| MiniLM + mnr | 1 | 1 |" in out
