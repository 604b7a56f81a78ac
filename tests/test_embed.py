"""Sentence embeddings: pooling, sentence-transformers parity, `bert-jax embed`, scoring.

The parity test runs the real all-MiniLM-L6-v2 (mean pooling + Normalize, as
its modules.json says) through bert_jax's embed path on the 8-device mesh and
compares with sentence-transformers' own `encode` at 1e-5.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import embed
from bert_jax import losses
from bert_jax import sharding
from bert_jax.models import pooling
from bert_jax.tasks import sentence_eval

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lengths from 2 tokens ([CLS] [SEP] of an empty line) to well past one 8-token bucket.
SENTENCES = [
    "A man is playing a guitar.",
    "",
    "The quick brown fox jumps over the lazy dog, while the farmer watches from the porch "
    "and wonders whether the fence will hold through another winter of storms.",
    "Café prices rose 3% in Zürich.",
    "Short.",
    "Two sentences here. And a second one that is somewhat longer than the first.",
]


# ---------------------------------------------------------------- pooling


def test_pooling_modes_on_hand_made_states():
  # Row 0: 3 real tokens; row 1: 1 real token then padding holding large values.
  hidden = jnp.array([[[1., 2.], [3., -4.], [5., 0.], [9., 9.]],
                      [[2., -1.], [100., 100.], [100., 100.], [100., 100.]]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])

  def pooled(*modes, normalize=False):
    return np.asarray(pooling.pool(hidden, mask, pooling.PoolingConfig(modes, normalize)))
  np.testing.assert_allclose(pooled("mean"), [[3., -2 / 3], [2., -1.]], rtol=1e-6)
  np.testing.assert_allclose(pooled("max"), [[5., 2.], [2., -1.]])
  np.testing.assert_allclose(pooled("cls"), [[1., 2.], [2., -1.]])
  np.testing.assert_allclose(pooled("lasttoken"), [[5., 0.], [2., -1.]])
  np.testing.assert_allclose(pooled("mean_sqrt_len_tokens"),
                             [[9 / np.sqrt(3), -2 / np.sqrt(3)], [2., -1.]], rtol=1e-6)
  # Weights 1, 2, 3 over the real tokens: (1*1 + 2*3 + 3*5) / 6, (1*2 - 2*4 + 0) / 6.
  np.testing.assert_allclose(pooled("weightedmean")[0], [22 / 6, -1.], rtol=1e-6)
  # Several modes concatenate in sentence-transformers' order, whatever order is given.
  np.testing.assert_allclose(pooled("mean", "cls"), [[1., 2., 3., -2 / 3], [2., -1., 2., -1.]],
                             rtol=1e-6)
  unit = pooled("max", normalize=True)
  np.testing.assert_allclose(unit, [[5 / np.sqrt(29), 2 / np.sqrt(29)],
                                    [2 / np.sqrt(5), -1 / np.sqrt(5)]], rtol=1e-6)
  # A filler row with no real token gives zeros, not NaN/-inf.
  empty = pooling.pool(hidden, jnp.zeros_like(mask), pooling.PoolingConfig(("max", "mean"),
                                                                            True))
  assert np.all(np.asarray(empty) == 0)
  with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
    pooling.PoolingConfig(("sum",))


def test_sentence_transformers_folder_configs(tmp_path):
  (tmp_path / "1_Pooling").mkdir()
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"word_embedding_dimension": 8, "pooling_mode_cls_token": True,
       "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}))
  # No modules.json: 1_Pooling alone, no normalisation.
  assert pooling.read_sentence_transformers(str(tmp_path)) == pooling.PoolingConfig(
      ("cls", "max"), False)
  modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
             {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
  (tmp_path / "modules.json").write_text(json.dumps(modules))
  assert pooling.read_sentence_transformers(str(tmp_path)).normalize
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
  assert pooling.read_sentence_transformers(str(tmp_path)).modes == ("lasttoken",)
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
  with pytest.raises(ValueError, match="1_Pooling/config.json: unknown pooling mode 'median'"):
    pooling.read_sentence_transformers(str(tmp_path))
  assert pooling.read_sentence_transformers(str(tmp_path / "1_Pooling")) is None


# ---------------------------------------------------------------- input


def test_read_sentences_text_tsv_jsonl_and_bad_input(tmp_path):
  text = tmp_path / "s.txt"
  text.write_text("first\n\nthird\n", encoding="utf-8")
  assert embed.read_sentences(str(text)) == ["first", "", "third"]  # row i is line i
  tsv = tmp_path / "s.tsv"
  tsv.write_text("\ufeffid\tsentence\n1\tHello there\n2\tBye\n", encoding="utf-8")
  assert embed.read_sentences(str(tsv), "sentence") == ["Hello there", "Bye"]
  jsonl = tmp_path / "s.jsonl"
  jsonl.write_text('{"text": "a b"}\n{"text": "c"}\n', encoding="utf-8")
  assert embed.read_sentences(str(jsonl), "text") == ["a b", "c"]
  (tmp_path / "empty.txt").write_text("")
  for args, match in [((str(tmp_path / "nope.txt"),), "no such file"),
                      ((str(tmp_path / "empty.txt"),), "holds no sentence"),
                      ((str(tsv),), "needs --text_field"),
                      ((str(tsv), "text"), r"no such column .*\['id', 'sentence'\]"),
                      ((str(jsonl), "sentence"), "line 1 .* no such field")]:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      embed.read_sentences(*args)


# ---------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return embed.load(str(minilm_dir))


def test_minilm_matches_sentence_transformers(minilm, minilm_dir):
  st = pytest.importorskip("sentence_transformers")
  assert minilm.pooling == pooling.PoolingConfig(("mean",), normalize=True)
  assert minilm.max_length == 256  # sentence_bert_config.json
  ours = embed.embed(minilm, SENTENCES, batch_size=8)
  reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(
      SENTENCES, convert_to_numpy=True)
  assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
  # Batching over 8 devices, sorted by length, comes back in input order.
  again = embed.embed(minilm, SENTENCES[::-1], batch_size=8)
  np.testing.assert_allclose(again[::-1], ours, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="--batch_size=12 must be a positive multiple of the 8"):
    embed.embed(minilm, SENTENCES, batch_size=12)


def test_truncation_counts_special_tokens(minilm):
  tokens = embed.tokenize(minilm.tokenizer, ["word " * 50, "a"], max_length=16)
  assert [len(t) for t in tokens] == [16, 3]
  assert tokens[0][0] == minilm.tokenizer.cls_id and tokens[0][-1] == minilm.tokenizer.sep_id


# ---------------------------------------------------------------- command line


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "bert_jax.main", "embed", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_npy_in_input_order(minilm, minilm_dir, tmp_path):
  source = tmp_path / "in.txt"
  source.write_text("\n".join(SENTENCES[:4]) + "\n", encoding="utf-8")
  out = tmp_path / "sub" / "emb.npy"
  proc = _cli(f"--init_from={minilm_dir}", f"--input={source}", f"--out={out}",
              "--pooling=mean", "--batch_size=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = np.load(out)
  assert written.shape == (4, 384) and written.dtype == np.float32
  np.testing.assert_allclose(written, embed.embed(minilm, SENTENCES[:4], batch_size=8),
                             atol=1e-6)
  # --pooling replaces the folder's modes but keeps its Normalize module.
  assert embed.resolve_pooling(str(minilm_dir), "cls") == pooling.PoolingConfig(("cls",), True)


def test_cli_bad_input_is_one_line(minilm_dir, tmp_path):
  proc = _cli(f"--init_from={minilm_dir}", f"--input={tmp_path / 'none.txt'}",
              f"--out={tmp_path / 'e.npy'}", "--pooling=median")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: --pooling=median: unknown pooling mode 'median'")


# ---------------------------------------------------------------- scoring


def test_threshold_accuracy_f1_and_spearman_exact():
  scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
  labels = [1, 1, 0, 1, 0, 0]
  acc, threshold = sentence_eval.best_accuracy(scores, labels)
  # Cut between 0.8 and 0.7: 5 of 6 right (only 0.6 missed); ties with the cut at 0.55
  # (5 of 6 too) go to the higher threshold.
  assert acc == pytest.approx(5 / 6) and threshold == pytest.approx(0.75)
  f1 = sentence_eval.best_f1(scores, labels)
  # Cut at 0.55: tp 3 of 4 predicted, all 3 positives: P 3/4, R 1, F1 6/7.
  assert f1["f1"] == pytest.approx(6 / 7) and f1["threshold"] == pytest.approx(0.55)
  assert f1["precision"] == pytest.approx(0.75) and f1["recall"] == 1.0
  fixed = sentence_eval.threshold_metrics(scores, labels, 0.65)
  assert fixed == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3,
                                 "f1": 2 / 3})
  # All negatives: predicting none positive is best, above the top score.
  acc, threshold = sentence_eval.best_accuracy([0.3, 0.2], [0, 0])
  assert acc == 1.0 and threshold > 0.3
  assert sentence_eval.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert sentence_eval.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties share their mean rank: x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4.
  assert sentence_eval.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
      np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
  np.testing.assert_allclose(sentence_eval.cosine_scores([[1, 0], [1, 1]], [[0, 2], [2, 2]]),
                             [0.0, 1.0])
  with pytest.raises(ValueError, match="labels must be 0 or 1"):
    sentence_eval.best_accuracy([0.1], [2])


def test_thresholds_agree_with_sentence_transformers_evaluator():
  pytest.importorskip("sentence_transformers")
  from sentence_transformers.sentence_transformer.evaluation import (
      BinaryClassificationEvaluator as evaluator)
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 2, 200)
  scores = np.round(rng.rand(200) * 0.5 + 0.3 * labels, 2)  # rounded: ties happen
  acc, threshold = sentence_eval.best_accuracy(scores, labels)
  ref_acc, ref_threshold = evaluator.find_best_acc_and_threshold(scores, labels, True)
  assert acc == pytest.approx(ref_acc) and threshold == pytest.approx(ref_threshold)
  f1 = sentence_eval.best_f1(scores, labels)
  ref = evaluator.find_best_f1_and_threshold(scores, labels, True)
  assert (f1["f1"], f1["precision"], f1["recall"], f1["threshold"]) == pytest.approx(ref)


# ---------------------------------------------------------------- SBERT losses


def _np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_cross_entropy(logits, targets):
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(targets)), targets]


def test_softmax_and_cosine_losses_match_numpy():
  rng = np.random.RandomState(0)
  u, v = rng.randn(5, 4).astype(np.float32), rng.randn(5, 4).astype(np.float32)
  kernel, bias = rng.randn(12, 3).astype(np.float32), rng.randn(3).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0])
  weights = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is a filler
  loss, metrics = losses.sbert_softmax_loss(u, v, kernel, bias, labels, weights)
  logits = np.concatenate([u, v, np.abs(u - v)], -1) @ kernel + bias
  np.testing.assert_allclose(loss, _np_cross_entropy(logits, labels)[:4].mean(), rtol=1e-5)
  assert float(metrics["sbert_cls/count"]) == 4
  # cos = 0 against gold 1 (error 1), cos = 1 against gold 1 (0), cos = -1 against 0 (1).
  loss, metrics = losses.cosine_similarity_loss(
      jnp.array([[1., 0.], [2., 2.], [1., 1.]]), jnp.array([[0., 3.], [1., 1.], [-2., -2.]]),
      jnp.array([1., 1., 0.]))
  assert float(loss) == pytest.approx(2 / 3, rel=1e-6)
  assert float(metrics["cos_sim/loss_sum"]) == pytest.approx(2.0, rel=1e-6)


def _np_mnrl(anchors, positives, weights, scale=20.0):
  real = weights > 0
  logits = scale * _np_unit(anchors[real]) @ _np_unit(positives[real]).T
  return _np_cross_entropy(logits, np.arange(real.sum())).mean()


def test_mnrl_uses_the_global_batch_on_the_8_device_mesh():
  mesh = sharding.make_mesh()
  rows = sharding.batch_sharding(mesh)
  assert mesh.devices.size == 8
  rng = np.random.RandomState(1)
  anchors = rng.randn(16, 8).astype(np.float32)
  positives = (anchors + 0.8 * rng.randn(16, 8)).astype(np.float32)
  weights = np.ones(16, np.float32)
  weights[-3:] = 0.0  # filler rows: neither scored nor negatives
  step = jax.jit(lambda a, p, w: losses.multiple_negatives_ranking_loss(a, p, w)[0],
                 in_shardings=(rows, rows, rows))
  put = lambda x: jax.device_put(x, rows)  # noqa: E731
  sharded_anchors = put(anchors)
  assert len(sharded_anchors.addressable_shards) == 8  # 2 rows per device
  loss = float(step(sharded_anchors, put(positives), put(weights)))
  np.testing.assert_allclose(loss, _np_mnrl(anchors, positives, weights), rtol=1e-5)
  # Against each device's 2 rows alone the loss is much smaller: the whole batch was used.
  local = np.mean([_np_mnrl(anchors[i:i + 2], positives[i:i + 2], weights[i:i + 2])
                   for i in range(0, 12, 2)])
  assert local < 0.5 * loss
  # Hard negatives are candidates for every anchor.
  negatives = rng.randn(16, 8).astype(np.float32)
  with_negatives, _ = losses.multiple_negatives_ranking_loss(anchors, positives,
                                                             negatives=negatives)
  logits = 20.0 * _np_unit(anchors) @ _np_unit(np.concatenate([positives, negatives])).T
  np.testing.assert_allclose(with_negatives, _np_cross_entropy(logits, np.arange(16)).mean(),
                             rtol=1e-5)

