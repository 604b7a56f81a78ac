"""Fine-tuning end to end: GLUE (through the CLI), CoNLL NER and SQuAD on a few real rows.

Models are tiny and random (or a tiny random "pretrained" Hugging Face folder
written with save_pretrained), with a WordPiece vocabulary cut from the very
rows used, so each run takes seconds; what is checked is the loop: the loss
falls, metrics and the best checkpoint are written, predictions files parse,
and bad input fails naming its cause.
"""
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import finetune
from bert_jax import save_pretrained
from bert_jax.models import bert
from bert_jax.tasks import glue, ner, squad
from conftest import prepare_tfds

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab(path: pathlib.Path, texts) -> pathlib.Path:
  """A WordPiece vocab.txt of every lower-cased word and punctuation mark in texts."""
  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
  path.write_text("\n".join(_SPECIALS + words) + "\n", encoding="utf-8")
  return path


@functools.lru_cache(maxsize=None)
def _conll(path: str):
  return ner.read_conll(path)


def _records(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _epoch_losses(records, steps_per_epoch) -> list:
  """Mean training loss of each epoch (log.every_steps=1)."""
  train = [r for r in records if "loss" in r]
  by_epoch = {}
  for r in train:
    by_epoch.setdefault((r["step"] - 1) // steps_per_epoch, []).append(r["loss"])
  return [float(np.mean(v)) for _, v in sorted(by_epoch.items())]


def _tiny_model_fields(vocab_size):
  return dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=2,
              intermediate_size=128, dropout_rate=0.0, attention_dropout_rate=0.0)


def _random_init_config(task, data_dir, vocab, **fields):
  """A fine-tuning config of a tiny random BERT; `fields` as 'a.b' -> value."""
  config = defaults.finetune_config()
  config.task = task
  config.data.data_dir = str(data_dir)
  config.data.tokenizer = str(vocab)
  config.model.update(_tiny_model_fields(len(vocab.read_text().split())))
  config.log.every_steps = 1
  config.log.progress = False
  config.checkpoint.every_epochs = 100  # only after the last epoch: saves are slow here
  config.update_from_flattened_dict(fields)
  return config


# ---------------------------------------------------------------------- GLUE


@pytest.mark.slow
def test_sst2_cli_finetune_then_evaluate_and_predict(shared_data, tmp_path):
  """`bert-jax finetune` from a HF folder with its lowest layer frozen; best epoch kept."""
  rows = glue.read_tsv(str(shared_data), "sst2", "train")[:32]
  dev = glue.read_tsv(str(shared_data), "sst2", "dev")[:32]
  hf = tmp_path / "hf"
  hf.mkdir()
  vocab = _vocab(hf / "vocab.txt", [e.text_a for e in rows + dev])
  size = len(vocab.read_text().split())
  encoder = bert.build(bert.BertConfig(**_tiny_model_fields(size)), "encoder")
  variables = encoder.init(jax.random.PRNGKey(1), np.ones((1, 8), np.int32))
  params = jax.tree.map(lambda x: getattr(x, "value", x), variables["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  # At BERT's init scale (0.02) attention adds ~1% to the residual, so the
  # [CLS] vector hardly depends on the sentence and a random model needs
  # hundreds of steps to fit a few rows; attention kernels 8x larger stand in
  # for a pretrained encoder whose [CLS] does see its input.
  params = traverse_util.unflatten_dict({
      k: v * 8 if k[-1] == "kernel" and k[-2] in ("query", "key", "value", "out") else v
      for k, v in traverse_util.flatten_dict(params).items()})
  save_pretrained(encoder, params, hf)
  params = params["encoder"]

  workdir = tmp_path / "run"
  # Unoptimised XLA code: compiling dominates a run this small.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "finetune", "--config=configs/glue.py:sst2",
       f"--workdir={workdir}", f"--config.init_from={hf}",
       f"--config.data.data_dir={shared_data}", "--config.data.max_train_examples=32",
       "--config.data.max_eval_examples=32", "--config.data.max_length=32",
       "--config.data.pad_multiple=16", "--config.train.batch_size=16",
       "--config.eval.batch_size=16", "--config.train.num_epochs=8",
       "--config.optim.learning_rate=3e-3", "--config.finetune.freeze_layers=1",
       "--config.checkpoint.every_epochs=100",
       "--config.log.every_steps=1", "--config.log.progress=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  records = _records(workdir)
  losses = _epoch_losses(records, steps_per_epoch=2)
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.02, losses
  evals = [r for r in records if "eval/dev/accuracy" in r]
  assert [r["epoch"] for r in evals] == list(range(1, 9))
  # The best epoch is the first with the highest dev accuracy, and best/ holds it.
  accuracies = [r["eval/dev/accuracy"] for r in evals]
  best = evals[int(np.argmax(accuracies))]
  assert evals[-1]["best/epoch"] == best["epoch"]
  assert sorted(os.listdir(workdir / "best")) == [str(best["step"])]

  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "glue_task": "sst2", "init_from": str(hf), "data.data_dir": str(shared_data),
      "data.max_eval_examples": 32, "data.max_length": 32, "data.pad_multiple": 16,
      "eval.batch_size": 16, "data.predict_split": "dev"})
  scores = finetune.evaluate(config, str(workdir))
  assert scores["dev/accuracy"] == pytest.approx(best["eval/dev/accuracy"])

  # The frozen embeddings and layer_0 are the folder's; layer_1 has trained.
  restored, _, record = finetune._restore_best(config, finetune._setup(config), str(workdir))
  assert record["epoch"] == best["epoch"]
  np.testing.assert_array_equal(restored["encoder"]["layer_0"]["mlp"]["wi"]["kernel"],
                                params["layer_0"]["mlp"]["wi"]["kernel"])
  np.testing.assert_array_equal(restored["encoder"]["embeddings"]["word_embeddings"]["embedding"],
                                params["embeddings"]["word_embeddings"]["embedding"])
  assert not np.allclose(restored["encoder"]["layer_1"]["mlp"]["wi"]["kernel"],
                         params["layer_1"]["mlp"]["wi"]["kernel"])

  path = finetune.predict(config, str(workdir))  # the first 32 dev rows
  lines = pathlib.Path(path).read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 33
  assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


# ----------------------------------------------------------------------- NER


@pytest.mark.slow
def test_conll_finetune_and_predict_columns(shared_data, tmp_path):
  """Token classification on 32 real CoNLL sentences (train = eval): loss falls, F1 written."""
  data_dir = shared_data / "conll2003"
  sentences = _conll(str(data_dir / "train.txt.gz")).sentences[:32]
  vocab = _vocab(tmp_path / "vocab.txt", [" ".join(s.words) for s in sentences])
  config = _random_init_config(
      "conll", data_dir, vocab, **{
          "data.train_split": "train.txt", "data.eval_splits": "train.txt",
          "data.predict_split": "train.txt", "data.max_train_examples": 32,
          "data.max_eval_examples": 32, "data.max_length": 64, "data.padding": "dynamic",
          "data.pad_multiple": 64, "train.batch_size": 16, "eval.batch_size": 32,
          "train.num_epochs": 5, "optim.learning_rate": 3e-3,
          "finetune.layerwise_lr_decay": 0.9})
  workdir = tmp_path / "run"
  result = finetune.finetune(config, str(workdir))
  records = _records(workdir)
  losses = _epoch_losses(records, steps_per_epoch=2)
  assert losses[-1] < 0.7 * losses[0], losses
  evals = [r for r in records if "eval/train.txt/f1" in r]
  assert len(evals) == 5 and 0.0 <= evals[-1]["eval/train.txt/f1"] <= 1.0
  assert result["best"]["metric"] == "train.txt/f1"

  path = finetune.predict(config, str(workdir), out=str(tmp_path / "preds"))
  # conlleval's layout: `word gold predicted`, a blank line after each sentence.
  blocks = pathlib.Path(path).read_text(encoding="utf-8").strip("\n").split("\n\n")
  assert len(blocks) == len(sentences)
  labels = set(ner.label_names_of(_conll(str(data_dir / "train.txt.gz")).sentences))
  for block, sentence in zip(blocks, sentences):
    rows = [line.split(" ") for line in block.split("\n")]
    assert [r[0] for r in rows] == list(sentence.words)
    assert [r[1] for r in rows] == list(sentence.tags)
    assert all(len(r) == 3 and r[2] in labels for r in rows)


@pytest.mark.slow
def test_glue_from_tfds_trains_exactly_as_from_tsv(shared_data, tmp_path):
  """data.glue_source='tfds' reads a prepared glue/sst2: the same rows give the same run."""
  train = glue.read_tsv(str(shared_data), "sst2", "train")[:16]
  dev = glue.read_tsv(str(shared_data), "sst2", "dev")[:16]
  tfds = pytest.importorskip("tensorflow_datasets")
  prepare_tfds(tmp_path / "tfds", "glue", {
      "sentence": tfds.features.Text(), "idx": np.int32,
      "label": tfds.features.ClassLabel(names=["negative", "positive"])}, {
          split: {"sentence": [e.text_a for e in rows], "label": [int(e.label) for e in rows],
                  "idx": list(range(len(rows)))}
          for split, rows in (("train", train), ("validation", dev))},
      config="sst2", version="2.0.0")
  vocab = _vocab(tmp_path / "vocab.txt", [e.text_a for e in train + dev])
  fields = {"data.max_train_examples": 16, "data.max_eval_examples": 16,
            "data.max_length": 32, "train.batch_size": 8, "eval.batch_size": 16,
            "train.num_epochs": 2, "optim.learning_rate": 3e-3}
  runs = {}
  for source, data_dir in (("tsv", shared_data), ("tfds", tmp_path / "tfds")):
    config = _random_init_config("glue", data_dir, vocab, **fields)
    config.data.glue_source = source
    result = finetune.finetune(config, str(tmp_path / source))
    runs[source] = ([r["loss"] for r in _records(tmp_path / source) if "loss" in r],
                    result["eval/dev/accuracy"])
  assert len(runs["tfds"][0]) == 4
  assert runs["tfds"] == runs["tsv"]
  config.data.glue_source = "csv"
  with pytest.raises(ValueError, match="data.glue_source"):
    finetune.finetune(config, str(tmp_path / "bad"))


# --------------------------------------------------------------------- SQuAD


@pytest.mark.slow
def test_squad_finetune_and_predictions_json(shared_data, tmp_path):
  """Span prediction on 12 real SQuAD questions (train = eval): loss falls, JSON written."""
  data_dir = shared_data / "squad"
  examples = squad.read_squad(str(data_dir / "dev-v1.1.json.gz")).examples[:12]
  vocab = _vocab(tmp_path / "vocab.txt",
                 [e.question for e in examples] + [" ".join(e.paragraph.words)
                                                         for e in examples])
  config = _random_init_config(
      "squad", data_dir, vocab, **{
          "data.train_split": "dev-v1.1.json", "data.eval_splits": "dev-v1.1.json",
          "data.predict_split": "dev-v1.1.json", "data.max_train_examples": 12,
          "data.max_eval_examples": 12, "data.max_length": 128, "data.doc_stride": 64,
          "data.max_query_length": 32, "data.padding": "max", "train.batch_size": 8,
          "eval.batch_size": 16, "train.num_epochs": 4, "optim.learning_rate": 3e-3})
  workdir = tmp_path / "run"
  result = finetune.finetune(config, str(workdir))
  records = _records(workdir)
  train_records = [r for r in records if "loss" in r]
  per_epoch = len(train_records) // 4
  losses = _epoch_losses(records, steps_per_epoch=per_epoch)
  assert losses[-1] < 0.8 * losses[0], losses
  evals = [r for r in records if "eval/dev-v1.1.json/f1" in r]
  assert len(evals) == 4 and 0.0 <= evals[-1]["eval/dev-v1.1.json/exact"] <= 100.0
  assert result["best"]["value"] == max(r["eval/dev-v1.1.json/f1"] for r in evals)

  path = finetune.predict(config, str(workdir), out=str(tmp_path / "preds"))
  with open(path, encoding="utf-8") as f:
    predictions = json.load(f)
  assert sorted(predictions) == sorted(e.qas_id for e in examples)
  assert all(isinstance(v, str) for v in predictions.values())


# ----------------------------------------------------------------- bad input


def test_bad_input_names_the_cause(shared_data, tmp_path):
  vocab = _vocab(tmp_path / "vocab.txt", ["a b c"])
  config = _random_init_config("glue", shared_data, vocab)
  config.task = "sentiment"
  with pytest.raises(ValueError, match=r"config.task.*'sentiment'"):
    finetune.finetune(config, str(tmp_path / "a"))
  config.task = "glue"
  config.glue_task = "sst3"
  with pytest.raises(ValueError, match=r"config.glue_task.*'sst3'"):
    finetune.finetune(config, str(tmp_path / "b"))
  config.glue_task = "rte"  # not in the shared data
  with pytest.raises(FileNotFoundError, match=r"RTE/train.tsv"):
    finetune.finetune(config, str(tmp_path / "c"))
  conll = _random_init_config("conll", shared_data / "conll2003", vocab,
                              **{"data.train_split": "training.txt"})
  with pytest.raises(FileNotFoundError, match=r"training.txt"):
    finetune.finetune(conll, str(tmp_path / "d"))
  config.glue_task = "sst2"
  config.data.padding = "longest"
  with pytest.raises(ValueError, match=r"config.data.padding"):
    finetune.finetune(config, str(tmp_path / "e"))
  config.data.padding = "bucket"
  config.train.prng_impl = "philox"
  with pytest.raises(ValueError, match=r"config.train.prng_impl: unknown PRNG .*'philox'"):
    finetune.finetune(config, str(tmp_path / "g"))
  config.train.prng_impl = "auto"
  config.train.label_smoothing = 0.1
  with pytest.raises(ValueError, match=r"config.train.label_smoothing: 0.1: only text-to-text "):
    finetune.finetune(config, str(tmp_path / "h"))
  config.train.label_smoothing = 0.0
  config.decode.no_repeat_ngram = -1
  with pytest.raises(ValueError, match=r"config.decode.no_repeat_ngram: must be >= 0"):
    finetune.finetune(config, str(tmp_path / "i"))
  with pytest.raises(FileNotFoundError, match=r"finetune"):
    finetune.evaluate(_random_init_config("glue", shared_data, vocab), str(tmp_path / "f"))


def test_init_from_a_pretraining_workdir(shared_data, tmp_path):
  """A `bert-jax train` checkpoint (state + config) gives the encoder and the tokenizer."""
  from bert_jax import checkpoint, optim, recipe, sharding, steps
  vocab = _vocab(tmp_path / "vocab.txt", ["hide new secretions from the parental units"])
  pretrain = defaults.train_config()
  pretrain.data.objective = "mlm_nsp"
  pretrain.data.tokenizer = str(vocab)
  pretrain.model.update(_tiny_model_fields(len(vocab.read_text().split())))
  model = recipe.build_model(pretrain)
  shapes = {"encoder_input_tokens": jax.ShapeDtypeStruct((1, 1), np.int32)}
  tx, _ = optim.make_optimizer(pretrain.optim, steps.param_shapes(model, shapes),
                               num_steps=pretrain.train.num_steps)
  mesh = sharding.make_mesh()
  state, _ = steps.create_sharded_state(model, tx, shapes, mesh, sharding.get_rules(
      "data_parallel"), 3)
  saver = checkpoint.Checkpointer(tmp_path / "pre" / "checkpoints", every_steps=1, keep=1,
                                  async_save=False)
  saver.save(7, state, data_position=None, config=pretrain, force=True)
  saver.close()

  config = defaults.finetune_config()
  config.update_from_flattened_dict({"init_from": str(tmp_path / "pre"),
                                     "data.data_dir": str(shared_data)})
  run = finetune._setup(config)
  assert run.tokenizer.path == str(vocab)
  assert run.model.config.hidden_size == 64 and run.task.num_labels == 2
  np.testing.assert_array_equal(
      run.pretrained["encoder"]["layer_1"]["attention"]["query"]["kernel"],
      state.params["encoder"]["layer_1"]["attention"]["query"]["kernel"])


def _config_module(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_files_cover_every_task():
  glue_config = _config_module("glue")
  for name, task in glue.TASKS.items():
    if task.labelled is None:
      continue  # ax: test only, predicted by an MNLI model
    config = glue_config.get_config(name)
    assert config.task == "glue" and config.glue_task == name
    assert set(finetune._split_names(config.data.eval_splits)) <= set(task.dev_splits)
    assert config.data.predict_split in task.test_splits
  assert finetune._split_names(glue_config.get_config("mnli").data.eval_splits) == [
      "dev_matched", "dev_mismatched"]
  with pytest.raises(ValueError, match="unknown GLUE task 'sst5'"):
    glue_config.get_config("sst5")
  assert _config_module("conll").get_config().task == "conll"
  squad_config = _config_module("squad")
  assert squad_config.get_config("v2").data.train_split == "train-v2.0.json"
  for module in (glue_config, _config_module("conll"), squad_config):
    assert "bert-jax finetune --config=configs/" in module.__doc__  # the launch command
