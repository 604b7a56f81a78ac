"""Every experiment config loads, validates and documents its launch command."""
import glob
import os

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)

from bert_jax import defaults
from bert_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# file -> variants (None = the file's default).
CONFIGS = {"quickstart": [None, "mlm_nsp", "mlm_sop", "span_corruption", "albert", "spanbert",
                          "electra", "distil", "modernbert", "bart"],
           "bert": [None, "large"], "roberta": [None], "t5": [None, "base"],
           "albert": [None, "large"], "dapt": [None, "base", "minilm_wiki"],
           "spanbert": [None, "large"],
           "electra": [None, "base"], "distilbert": [None],
           "modernbert": [None, "large"], "deberta_v3": [None, "small"],
           "bart": [None, "large"]}
# Fine-tuning configs (bert-jax finetune; tested in tests/test_finetune.py).
FINETUNE = {"glue", "conll", "squad", "text2text", "sbert", "pet",
            "multitask"}  # bert-jax multitask (tests/test_multitask.py)
FINETUNE |= {"summarization"}  # tested in tests/test_bart_recipes.py
# The keys scripts and users rely on in every training config (issue "Training").
REQUIRED = ("seed", "train.num_steps", "train.batch_size", "checkpoint.every_steps",
            "checkpoint.keep", "log.every_steps", "eval.every_steps", "optim.learning_rate",
            "optim.warmup_steps", "mesh.data", "mesh.fsdp", "mesh.tensor")


def _load(name, variant):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(variant)


def test_every_config_file_is_listed():
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert files == set(CONFIGS) | FINETUNE


@pytest.mark.parametrize("name, variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_config_validates_and_documents_its_launch(name, variant):
  module, config = _load(name, variant)
  for key in REQUIRED:
    section = config
    for part in key.split("."):
      assert part in section, f"configs/{name}.py lacks {key}"
      section = section[part]
  # Model, objective, mesh and batch agree on the 8 test devices.
  config.model.vocab_size = config.model.vocab_size or 1024
  if config.train.objective == "distillation" and not config.train.teacher:
    config.train.teacher = "/path/to/teacher"  # the launch command names it
  train.validate(config)
  assert f"bert-jax train --config=configs/{name}.py" in module.__doc__
  assert "Expected" in module.__doc__
  # Every field the loop reads exists (the defaults' keys), nothing extra.
  assert set(config.keys()) == set(defaults.train_config().keys())
  for section in ("train", "mesh", "checkpoint", "log", "eval", "data", "optim"):
    assert set(config[section].keys()) == set(defaults.train_config()[section].keys())


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    _load("bert", "huge")
