"""PEFT workdirs: delta-only checkpoints, exact resume, the base check, merged export.

One tiny random "pretrained" BERT folder (save_pretrained) is fine-tuned
with LoRA on 16 SST-2 rows, 2 epochs of 2 steps, once for the module; the
tests read that workdir. The resume test reruns the same config preempted
mid-epoch (loop.Preemption patched, as a SIGTERM would) and resumes it.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from bert_jax import finetune
from bert_jax import loop
from bert_jax import save_pretrained
from bert_jax.models import bert
from bert_jax.tasks import glue
from test_finetune import _random_init_config, _tiny_model_fields, _vocab


def _hf_folder(path, vocab_texts, seed: int):
  """A tiny random BERT encoder folder with its vocab.txt (attention kernels x8, as in
  test_finetune, so a few steps move the [CLS] prediction)."""
  path.mkdir()
  vocab = _vocab(path / "vocab.txt", vocab_texts)
  encoder = bert.build(bert.BertConfig(**_tiny_model_fields(len(vocab.read_text().split()))),
                       "encoder")
  variables = encoder.init(jax.random.PRNGKey(seed), np.ones((1, 8), np.int32))
  flat = traverse_util.flatten_dict(jax.tree.map(
      lambda x: getattr(x, "value", x), variables["params"],
      is_leaf=lambda x: hasattr(x, "value")))
  save_pretrained(encoder, traverse_util.unflatten_dict({
      k: v * 8 if k[-1] == "kernel" and k[-2] in ("query", "key", "value", "out") else v
      for k, v in flat.items()}), path)
  return path


def _config(data, hf, **fields):
  config = _random_init_config("glue", data, hf / "vocab.txt", **{
      "init_from": str(hf), "data.max_train_examples": 16, "data.max_eval_examples": 16,
      "data.max_length": 32, "data.pad_multiple": 32, "train.batch_size": 8,
      "eval.batch_size": 16, "train.num_epochs": 2, "optim.learning_rate": 3e-3,
      "checkpoint.every_epochs": 1, "finetune.method": "lora", "finetune.lora_rank": 2,
      "data.predict_split": "dev", **fields})
  return config


@pytest.fixture(scope="module")
def lora_run(shared_data, tmp_path_factory):
  """(config, hf folder, workdir) of one finished LoRA run."""
  root = tmp_path_factory.mktemp("peft_delta")
  rows = glue.read_tsv(str(shared_data), "sst2", "train")[:16]
  dev = glue.read_tsv(str(shared_data), "sst2", "dev")[:16]
  texts = [e.text_a for e in rows + dev]
  hf = _hf_folder(root / "hf", texts, seed=1)
  config = _config(shared_data, hf)
  workdir = root / "run"
  finetune.finetune(config, str(workdir))
  return config, hf, workdir, texts, root


def _state_tree(folder) -> dict:
  """The newest step's saved `state` item as numpy arrays, '/'-joined paths."""
  step = max(int(s) for s in os.listdir(folder) if s.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(folder, str(step), "state"))
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _size(folder) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files)


def test_checkpoints_hold_the_delta_and_the_base_identity(lora_run):
  """checkpoints/ and best/ store the factors and the head (and Adam's state for them),
  no encoder weight; the data position names the base folder and its sha256."""
  _, hf, workdir, _, _ = lora_run
  for folder in ("checkpoints", "best"):
    params = {p.split("params/", 1)[1] for p in _state_tree(workdir / folder)
              if p.startswith("params/")}
    assert params and all(p.startswith(("lora/", "classifier/")) for p in params), params
    assert "classifier/kernel" in params
  step = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  with open(workdir / "checkpoints" / str(step) / "data_position" / "metadata") as f:
    base = json.load(f)["value"]["base"]
  assert base["path"] == str(hf) and len(base["sha256"]) == 64
  # The delta is a small fraction of the base it completes (the head and rank-2 factors).
  assert _size(workdir / "best") < _size(hf) / 5


def test_predict_and_evaluate_fail_when_the_base_changed(lora_run, shared_data):
  """A different model at init_from: one line naming the saved and the current sha256."""
  config, _, workdir, texts, root = lora_run
  other = _hf_folder(root / "hf_other", texts, seed=2)
  with open(workdir / "best" / os.listdir(workdir / "best")[0] / "data_position" /
            "metadata") as f:
    saved = json.load(f)["value"]["base"]["sha256"]
  changed = _config(shared_data, other)
  with pytest.raises(ValueError, match=f"sha256 {saved}.*has sha256 [0-9a-f]{{64}}") as e:
    finetune.evaluate(changed, str(workdir))
  assert "\n" not in str(e.value)


def test_export_merges_lora_and_loads_in_transformers(lora_run):
  """`export` writes a plain HF folder: BertForSequenceClassification gives predict's
  logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, _, workdir, _, _ = lora_run
  out = finetune.export(config, str(workdir))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.txt"]
  hf = transformers.BertForSequenceClassification.from_pretrained(out).eval()

  run = finetune._setup(config)
  params, predictor, _ = finetune._restore_best(config, run, str(workdir))
  split = run.task.load("dev", 8)
  ours = np.stack([o["logits"] for o in predictor(params, split)])
  batch = run.task.pad(split.features, 8)
  tokens = batch["encoder_input_tokens"]
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                token_type_ids=torch.tensor(batch["encoder_type_ids"], dtype=torch.long),
                attention_mask=torch.tensor(tokens != run.tokenizer.pad_id,
                                            dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs[:len(ours)], atol=1e-4)


@pytest.mark.slow
def test_lora_resume_after_preemption_is_exact(lora_run, shared_data, monkeypatch):
  """Preempted at step 3 (mid epoch 2) then resumed: the final delta, Adam's state and the
  logged losses equal the uninterrupted run's bit for bit."""
  config, hf, workdir, _, root = lora_run
  resumed = root / "resumed"
  asked = loop.Preemption.requested
  monkeypatch.setattr(loop.Preemption, "requested",
                      lambda self, step: step == 3 or asked(self, step))
  with pytest.raises(loop.Preempted):
    finetune.finetune(config, str(resumed))
  monkeypatch.setattr(loop.Preemption, "requested", asked)
  finetune.finetune(config, str(resumed))
  want, got = _state_tree(workdir / "checkpoints"), _state_tree(resumed / "checkpoints")
  assert sorted(want) == sorted(got)
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  losses = lambda w: [r["loss"] for r in map(json.loads, open(w / "metrics.jsonl"))
                      if "loss" in r]
  assert losses(resumed) == losses(workdir)

