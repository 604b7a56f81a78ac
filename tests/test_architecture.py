"""The registries and the boundaries of the package (issue "Architecture").

A new objective trains through the registry without touching a package file;
no module branches on a family name outside models/ or reaches into another
module's private names; config files load without JAX or TensorFlow; a
non-finite loss in fine-tuning closes what the run opened.
"""
import ast
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bert_jax import checkpoint
from bert_jax import defaults
from bert_jax import finetune
from bert_jax import losses
from bert_jax import models
from bert_jax import objectives
from bert_jax import train
from conftest import tiny_pretraining_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bert_jax"


# ----------------------------------------------------------------- registries


def _confidence_metrics(outputs, batch, *, prefix):
  """A toy term: the entropy of the MLM prediction at the masked positions
  (a confidence penalty, Pereyra et al. 2017), as summable metrics."""
  logp = jax.nn.log_softmax(outputs["mlm_logits"].astype(jnp.float32))
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [batch, predictions]
  w = batch["mlm_weights"].astype(jnp.float32)
  return {f"{prefix}/loss_sum": -jnp.sum(w * entropy), f"{prefix}/count": jnp.sum(w)}


@pytest.fixture
def toy_objective():
  """MLM + 0.5 x the toy confidence term, registered for one test."""
  term = objectives.Term("conf", _confidence_metrics,
                         lambda batch: jnp.sum(batch["mlm_weights"].astype(jnp.float32)),
                         outputs=("mlm_logits",), features=("mlm_weights",))
  objective = objectives.register(objectives.combine(
      "test_mlm_confidence", "mlm", (objectives.get("mlm"), 1.0), (term, 0.5), data=("mlm",)))
  yield objective
  del objectives.OBJECTIVES[objective.name]


def test_a_new_objective_trains_five_steps_through_the_registry(toy_objective, tmp_path):
  config = tiny_pretraining_config(num_steps=5)
  config.train.objective = toy_objective.name
  last = train.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
  for r in lines:
    # Each term logs under its own prefix; the optimised loss is their weighted sum.
    assert r["train/conf/count"] == r["train/mlm/count"] > 0
    count = r["train/mlm/count"]
    mlm = r["train/mlm/loss"] * count / (count + losses.MLM_DENOMINATOR_EPS)
    expected = mlm + 0.5 * r["train/conf/loss"]
    assert r["loss"] == pytest.approx(expected, rel=1e-4)
    assert r["train/conf/loss"] < 0  # minus an entropy
  assert last["train/conf/loss"] == lines[-1]["train/conf/loss"]


def test_objectives_declare_what_they_read():
  for objective in objectives.OBJECTIVES.values():
    assert objective.terms, objective.name
    for term in objective.terms:
      assert term.outputs and term.features, (objective.name, term.prefix)
  assert [t.prefix for t in objectives.get("mlm_sop").terms] == ["mlm", "sop"]
  assert [t.prefix for t in objectives.get("mlm_nsp").terms] == ["mlm", "nsp"]
  with pytest.raises(ValueError, match="already registered"):
    objectives.register(objectives.get("mlm"))
  with pytest.raises(ValueError, match="unknown objective 'mlm_nsp_typo'; choose one of"):
    objectives.get("mlm_nsp_typo")


def test_combined_weights_scale_each_term():
  batch = {"mlm_targets": jnp.array([[1, 2]]), "mlm_weights": jnp.array([[1.0, 1.0]]),
           "nsp_labels": jnp.array([1]), "encoder_input_tokens": jnp.array([[5, 6]])}
  outputs = {"mlm_logits": jnp.array([[[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]]),
             "nsp_logits": jnp.array([[0.5, -0.5]])}
  plain = objectives.get("mlm_nsp")
  weighted = objectives.combine("w", "pretraining", (objectives.MLM, 2.0), (objectives.NSP, 3.0))
  norms = plain.normalizers(batch)
  m = plain.metrics(outputs, batch)
  mlm = float(m["mlm/loss_sum"] / norms["mlm"])
  nsp = float(m["nsp/loss_sum"] / norms["nsp"])
  assert float(plain.loss(m, norms)) == pytest.approx(mlm + nsp, rel=1e-6)
  assert float(weighted.loss(weighted.metrics(outputs, batch), weighted.normalizers(batch))
               ) == pytest.approx(2 * mlm + 3 * nsp, rel=1e-6)


def test_family_registry_builds_checks_and_counts():
  bert, t5 = models.get("bert"), models.get("t5")
  assert set(models.FAMILIES) >= {"bert", "t5"}
  assert {"mlm", "pretraining", "sequence_classification"} <= set(bert.tasks)
  assert set(t5.tasks) == {"seq2seq", "encoder"}
  model = bert.build(bert.preset("tiny"), "mlm")
  assert models.family_of(model) is bert
  assert models.family_of(t5.build(t5.preset("t5_v1_1_tiny"), "seq2seq")) is t5
  with pytest.raises(ValueError, match="unknown model family 'gpt'; choose one of"):
    models.get("gpt")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\]"):
    models.model_config("bert", "tiny", hiden_size=3)
  config = defaults.train_config()
  config.family, config.data.objective = "t5", "mlm"
  config.model = defaults.model_config("t5", "t5_v1_1_tiny")
  with pytest.raises(ValueError, match="'mlm' trains a 'mlm' model, which the 't5' family"):
    train.validate(config)


def test_glue_names_match_the_tasks():
  from bert_jax.tasks import glue
  assert sorted(defaults.GLUE_TASKS) == sorted(glue.TASKS)


# ----------------------------------------------------------------- boundaries


def _sources(folder=PACKAGE):
  return sorted(folder.rglob("*.py"))


def test_no_family_name_switch_outside_models():
  hits = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
          if p.parent.name != "models"
          for i, line in enumerate(p.read_text().splitlines(), 1)
          if re.search(r"family\s*[!=]=\s*['\"]", line)]
  assert not hits, hits


def test_no_module_uses_another_modules_private_names():
  hits = []
  for path in _sources():
    tree = ast.parse(path.read_text())
    imported = set()  # names bound to bert_jax modules by this file's imports
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bert_jax"):
        for alias in node.names:
          if alias.name.startswith("_"):
            hits.append(f"{path.name}:{node.lineno} imports {alias.name}")
          imported.add(alias.asname or alias.name)
      elif isinstance(node, ast.Import):
        imported.update(a.asname or a.name for a in node.names if a.name.startswith("bert_jax"))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in imported and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        hits.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
  assert not hits, hits


_LOAD_CONFIGS = """
import sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config", None, lock_config=True)
flags.FLAGS(["prog", "--config=" + sys.argv[1]])
assert config.value is not None
heavy = sorted(m for m in ("jax", "tensorflow", "orbax", "flax") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("spec", ["configs/bert.py", "configs/quickstart.py:span_corruption",
                                  "configs/glue.py:mnli", "configs/text2text.py:squad",
                                  "configs/roberta.py", "configs/t5.py:base",
                                  "configs/conll.py", "configs/squad.py:v2"])
def test_loading_a_config_imports_neither_jax_nor_tensorflow(spec):
  proc = subprocess.run([sys.executable, "-c", _LOAD_CONFIGS, spec], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "HEAVY []" in proc.stdout, proc.stdout


# ------------------------------------------------ fine-tuning closes on error


def test_non_finite_finetuning_loss_closes_the_run(shared_data, tmp_path, monkeypatch):
  """A FloatingPointError in fine-tuning closes both checkpoint managers and the
  SIGTERM handler (before, the managers stayed open and the handler stayed in)."""
  closed = []
  original = checkpoint.Checkpointer.close

  def close(self):
    closed.append(os.path.basename(str(self.directory)))
    original(self)
  monkeypatch.setattr(checkpoint.Checkpointer, "close", close)
  from bert_jax.tasks import glue
  rows = glue.read_tsv(str(shared_data), "sst2", "train")[:16]
  words = sorted({w for r in rows for w in re.findall(r"\w+|[^\w\s]", r.text_a.lower())})
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
  config = defaults.finetune_config()
  config.data.data_dir = str(shared_data)
  config.data.tokenizer = str(vocab)
  config.data.max_train_examples = 16
  config.data.max_eval_examples = 16
  config.data.max_length = 32
  config.model.update(vocab_size=len(words) + 5, num_layers=1, max_position_embeddings=32)
  config.train.batch_size = 8
  config.eval.batch_size = 8
  config.train.num_epochs = 1
  config.optim.learning_rate = 1e30  # the first update overflows the weights
  config.log.every_steps = 1
  config.log.progress = False
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(FloatingPointError, match=r"non-finite \w+ \(\w+\) at step \d"):
    finetune.finetune(config, str(tmp_path / "run"))
  assert sorted(closed) == ["best", "checkpoints"]
  assert signal.getsignal(signal.SIGTERM) == handler
  assert not os.listdir(tmp_path / "run" / "checkpoints")  # nothing saved from a bad step


def test_per_layer_controls_need_a_tree_per_layer():
  from bert_jax import finetune_init
  config = defaults.finetune_config()
  config.finetune.freeze_layers = 1
  bert = models.get("bert")
  rules = finetune_init.optimizer_rules(config, bert, bert.preset("tiny"))
  assert r"^encoder/layer_0/" in rules["freeze"]
  with pytest.raises(ValueError, match="config.finetune.freeze_layers: needs a parameter tree "
                                       "per layer; share_layers='all'"):
    finetune_init.optimizer_rules(config, bert, bert.preset("tiny", share_layers="all",
                                                             model_type="albert"))
  config.finetune.freeze_layers = 0
  config.finetune.layerwise_lr_decay = 0.9
  with pytest.raises(ValueError, match="layerwise_lr_decay: needs per-layer names, which the "
                                       "'t5' family lacks"):
    finetune_init.optimizer_rules(config, models.get("t5"), models.get("t5").preset(
        "t5_v1_1_tiny"))
