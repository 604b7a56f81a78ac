"""Sentence-embedding fine-tuning (config.task='sbert', tasks/sentence.py).

A tiny random BERT saved as a Hugging Face folder, and a tiny MRPC-format
TSV written here (header with a UTF-8 BOM), train a siamese bi-encoder with
each loss; the best checkpoint then embeds through `bert-jax embed`'s
loader. The multiple-negatives loss is checked to see the whole global batch
when the batch is split over the 8-device mesh, and to give on 2 processes x
4 devices (gloo) the loss of 1 process x 8.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import run_two_processes

from bert_jax import embed
from bert_jax import finetune
from bert_jax import save_pretrained
from bert_jax import sharding
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import bert
from bert_jax.models import pooling
from bert_jax.tasks import sentence

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ("the cat dog bird fish man woman child sat ran flew swam on in under mat park "
          "tree lake big small red old new quickly slowly a".split())


def _sbert_config(variant):
  spec = importlib.util.spec_from_file_location("sbert_config", ROOT / "configs" / "sbert.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _sentence(rng):
  return " ".join(rng.choice(_WORDS, size=rng.integers(3, 9)))


def _write_mrpc(path, n, seed):
  """An MRPC-format TSV: positives are a sentence and its near copy, negatives two others."""
  rng = np.random.default_rng(seed)
  lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
  for i in range(n):
    a = _sentence(rng)
    label = i % 2
    b = (a + " " + rng.choice(_WORDS)) if label else _sentence(rng)
    lines.append(f"{label}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}")
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny random BERT (hidden 32, 1 layer) as a HF folder, and an MRPC-format data dir."""
  root = tmp_path_factory.mktemp("sbert")
  data = root / "data" / "MRPC"
  data.mkdir(parents=True)
  _write_mrpc(data / "train.tsv", 32, seed=0)
  _write_mrpc(data / "dev.tsv", 16, seed=1)
  hf = root / "hf"
  hf.mkdir()
  (hf / "vocab.txt").write_text("\n".join(_SPECIALS + sorted(set(_WORDS))) + "\n")
  cfg = bert.BertConfig(vocab_size=len(_SPECIALS) + len(set(_WORDS)), hidden_size=32,
                        num_layers=1, num_heads=2, intermediate_size=64,
                        max_position_embeddings=64, dropout_rate=0.0,
                        attention_dropout_rate=0.0)
  encoder = bert.build(cfg, "encoder")
  variables = encoder.init(jax.random.PRNGKey(1), np.ones((1, 8), np.int32))
  params = traverse_util.unflatten_dict({
      k: getattr(v, "value", v) for k, v in traverse_util.flatten_dict(
          variables["params"], is_leaf=lambda _, x: hasattr(x, "value")).items()})
  save_pretrained(encoder, params, hf)
  return hf, root / "data"


def _config(variant, hf, data, **fields):
  config = _sbert_config(variant)
  config.update_from_flattened_dict(dict({
      "init_from": str(hf), "data.data_dir": str(data), "data.max_length": 16,
      "data.pad_multiple": 16, "train.batch_size": 16, "eval.batch_size": 16,
      "train.num_epochs": 1, "optim.learning_rate": 1e-3, "log.every_steps": 1,
      "log.progress": False, "checkpoint.every_epochs": 100}, **fields))
  return config


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(hf_folder, tmp_path_factory):
  """One short run per loss: loss -> (config, workdir, result)."""
  hf, data = hf_folder
  out = {}
  for loss in sentence.LOSSES:
    workdir = tmp_path_factory.mktemp(f"run_{loss}")
    config = _config(f"mrpc_{loss}", hf, data)
    out[loss] = config, workdir, finetune.finetune(config, str(workdir))
  return out


@pytest.mark.parametrize("loss, prefix", [("mnr", "mnrl"), ("cosine", "cos_sim"),
                                          ("softmax", "sbert_cls")])
def test_each_loss_trains_with_finite_loss_and_scores_dev(runs, loss, prefix):
  config, workdir, result = runs[loss]
  train = [r for r in _records(workdir) if "loss" in r]
  # mnr keeps the 16 positive pairs (1 step of 16); the others all 32 (2 steps).
  assert len(train) == (1 if loss == "mnr" else 2)
  assert all(np.isfinite(r["loss"]) and r[f"train/{prefix}/count"] == 16 for r in train)
  if loss == "cosine":  # MSE of a cosine against 0/1 targets: at most 4 per pair
    assert all(0 <= r["loss"] <= 4 for r in train)
  # Dev scored by cosine thresholds picked on train; the best epoch by F1 at them.
  for key in ("accuracy", "f1", "dev_best_f1", "train_f1_threshold"):
    assert np.isfinite(result[f"eval/dev/{key}"]), key
  assert result["best"]["metric"] == "dev/f1"
  assert sorted(os.listdir(workdir / "best")) == [str(result["best"]["step"])]


def test_trained_checkpoint_embeds_as_the_two_tower_model(runs, hf_folder):
  """`bert-jax embed --init_from=WORKDIR` loads best/: its vectors are the trained u."""
  config, workdir, _ = runs["mnr"]
  embedder = embed.load(str(workdir))
  assert embedder.pooling.modes == ("mean",) and embedder.max_length == 16
  sentences = ["the cat sat on the mat", "a big red dog ran in the park", "fish"]
  vectors = embed.embed(embedder, sentences, batch_size=8)
  # The same vectors from the fine-tuning run's own model and best params.
  run = finetune._setup(config)
  params, _, _ = finetune._restore_best(config, run, str(workdir))
  tokens = embed.tokenize(embedder.tokenizer, sentences, 16)
  batch = run.task.pad([{"encoder_input_tokens": t, "pair_input_tokens": t,
                         "classifier_labels": np.int32(0), "pair_scores": np.float32(0)}
                        for t in tokens], len(tokens))
  u = run.model.apply({"params": params}, batch["encoder_input_tokens"], batch["encoder_mask"])["u"]
  np.testing.assert_allclose(vectors, np.asarray(u), rtol=1e-5, atol=1e-6)
  # Trained: not the HF folder's vectors any more.
  before = embed.embed(embed.load(str(hf_folder[0])), sentences, batch_size=8)
  assert not np.allclose(before, vectors, atol=1e-4)


def test_mnr_uses_the_global_batch_when_sharded():
  """Under jit with rows split over 8 devices, anchors meet every positive of the batch."""
  objective = sentence.make_objective("mnr", 20.0)
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(2, 16, 8)).astype(np.float32)
  weights = np.ones(16, np.float32)
  weights[-2:] = 0.0  # filler rows

  def loss(outputs, batch):
    metrics = objective.metrics(outputs, batch)
    return objective.loss(metrics, objective.normalizers(batch))
  mesh = sharding.make_mesh(-1, 1, 1)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x: jax.device_put(x, rows)  # noqa: E731
  sharded = jax.jit(loss, out_shardings=NamedSharding(mesh, P()))(
      {"u": put(u), "v": put(v)}, {"example_weights": put(weights)})
  whole = loss({"u": u, "v": v}, {"example_weights": weights})
  np.testing.assert_allclose(float(sharded), float(whole), rtol=1e-6)
  # Per device (2 rows each), a different, smaller problem: fewer negatives.
  shards = [float(loss({"u": u[i:i + 2], "v": v[i:i + 2]}, {"example_weights": weights[i:i + 2]}))
            for i in range(0, 14, 2)]
  assert abs(float(np.mean(shards)) - float(whole)) > 0.1


# Run once per process: the global batch's rows from this host through the
# trainer's feeding (batching.on_mesh) into the jitted mnr loss on the whole mesh.
_MNR_SCRIPT = """
import argparse, jax, numpy as np
from bert_jax import distributed, sharding
from bert_jax.tasks import batching, sentence
parser = argparse.ArgumentParser()
for flag in ("--coordinator_address", "--num_processes", "--process_id"):
  parser.add_argument(flag, default=None)
args = parser.parse_args()
if args.coordinator_address:
  distributed.initialize(args.coordinator_address, int(args.num_processes), int(args.process_id))
rng = np.random.default_rng(0)
u, v = rng.normal(size=(2, 16, 8)).astype(np.float32)
weights = np.ones(16, np.float32)
weights[-3:] = 0.0  # filler rows
objective = sentence.make_objective("mnr", 20.0)
loss = lambda o, b: objective.loss(objective.metrics(o, b), objective.normalizers(b))
mesh = sharding.make_mesh(-1, 1, 1)
batch = batching.on_mesh({"u": u, "v": v, "example_weights": weights},
                         sharding.batch_sharding(mesh))
assert len(batch["u"].addressable_shards) == jax.local_device_count()
value = jax.jit(loss)({"u": batch["u"], "v": batch["v"]},
                      {"example_weights": batch["example_weights"]})
print(f"MNR {jax.process_count()} {jax.device_count()} {float(value)!r}")
"""


@pytest.mark.slow
def test_mnr_on_two_processes_equals_one_process_of_eight():
  """2 processes x 4 CPU devices (gloo), each feeding its half of the rows, give the 1 x 8 loss."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, "-c", _MNR_SCRIPT]
  one = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(
      env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert one.returncode == 0, one.stderr[-3000:]
  two = run_two_processes(lambda i: list(command), dict(
      env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), ROOT, timeout=120)
  def result(stdout):  # "MNR processes devices loss", among whatever else was printed
    return next(line.split()[1:] for line in stdout.splitlines() if line.startswith("MNR "))
  processes, devices, expected = result(one.stdout)
  assert (processes, devices) == ("1", "8")
  for out, _ in two:
    processes, devices, value = result(out)
    assert (processes, devices) == ("2", "8")
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
  # Each host's 8 rows alone would give another loss: the hosts' rows met.
  objective = sentence.make_objective("mnr", 20.0)
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(2, 16, 8)).astype(np.float32)
  half = {"example_weights": np.ones(8, np.float32)}
  alone = objective.loss(objective.metrics({"u": u[:8], "v": v[:8]}, half),
                         objective.normalizers(half))
  assert abs(float(alone) - float(expected)) > 0.1


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_options_pool_the_tower_states(hf_folder, mode):
  hf, data = hf_folder
  config = _config("mrpc_mnr", hf, data, **{"finetune.pooling": mode})
  cfg = bert.BertConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
  tower = bert.build(cfg, "encoder")
  model = sentence.TwoTowerModel(tower, sentence.pooling_config(config))
  tokens = np.array([[2, 7, 8, 9, 3, 0], [2, 11, 3, 0, 0, 0]], np.int32)
  mask = (tokens > 0).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, mask)["params"]
  assert set(params) == {"encoder"}  # shared scope: the tower's params at the top
  out = model.apply({"params": params}, tokens, mask, tokens[::-1], mask[::-1])
  hidden, _ = tower.apply({"params": params}, tokens, encoder_mask=mask)
  expected = pooling.pool(hidden, mask, pooling.PoolingConfig((mode,)))
  np.testing.assert_allclose(out["u"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["v"], expected[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, match", [
    ("finetune.loss", "triplet", r"config.finetune.loss: unknown loss 'triplet'"),
    ("finetune.pooling", "meen", r"config.finetune.pooling: unknown pooling mode 'meen'"),
    ("finetune.mnr_scale", 0.0, r"config.finetune.mnr_scale: must be > 0"),
    ("glue_task", "sst2", r"config.glue_task: sbert trains on sentence pairs"),
])
def test_bad_options_fail_in_one_line_naming_the_key(hf_folder, tmp_path, field, value, match):
  hf, data = hf_folder
  config = _config("mrpc_mnr", hf, data, **{field: value})
  with pytest.raises(ValueError, match=match) as e:
    finetune.finetune(config, str(tmp_path))
  assert "\n" not in str(e.value)


def test_missing_options_name_the_config_file(hf_folder, tmp_path):
  from bert_jax import defaults
  hf, data = hf_folder
  config = defaults.finetune_config()
  config.update_from_flattened_dict({"task": "sbert", "glue_task": "mrpc", "init_from": str(hf),
                                     "data.data_dir": str(data)})
  with pytest.raises(ValueError, match=r"config.finetune.pooling: missing; start from "
                                       r"configs/sbert.py"):
    finetune.finetune(config, str(tmp_path))


def test_real_mrpc_pairs_and_mnr_positives(shared_data, hf_folder):
  """The shared MRPC files read through the task: mnr trains on the positive pairs alone."""
  hf, _ = hf_folder
  config = _config("mrpc_mnr", hf, shared_data, **{"data.max_train_examples": 200,
                                                   "data.max_eval_examples": 40})
  tokenizer = tokenizer_lib.load_tokenizer(str(hf), lower_case=True)
  task = sentence.SentencePairTask(config, tokenizer)
  train = task.load("train", 200)
  labels = [f["classifier_labels"] for f in task.load("dev", 40).features]
  assert 0 < len(train.features) < 200 and all(f["pair_scores"] == 1.0 for f in train.features)
  dev = task.load("dev", 40)
  assert dev.extra == 40 and len(dev.features) == 240  # dev pairs + the threshold split's
  assert set(int(x) for x in labels) == {0, 1}
  batch = task.pad(dev.features[:5], 8)
  assert batch["encoder_input_tokens"].shape[0] == 8 and batch["example_weights"].sum() == 5
  assert (batch["encoder_mask"].sum(1)[:5] == [len(f["encoder_input_tokens"])
                                              for f in dev.features[:5]]).all()


@pytest.mark.parametrize("loss", ["mnr", "cosine"])
def test_filler_rows_keep_gradients_finite(loss):
  """A short last batch's filler rows pool to zero vectors: their weight-0 terms must
  not turn the gradient into NaN (the norm's gradient at 0 is 0/0)."""
  objective = sentence.make_objective(loss, 20.0)
  u, v = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
  u[-1] = v[-1] = 0.0
  batch = {"example_weights": np.array([1, 1, 1, 0], np.float32),
           "pair_scores": np.array([1, 0, 1, 0], np.float32)}
  grads = jax.grad(lambda u, v: objective.loss(objective.metrics({"u": u, "v": v}, batch),
                                               objective.normalizers(batch)), (0, 1))(u, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
