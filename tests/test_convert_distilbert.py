"""DistilBERT import and export, and its student initialisation from a teacher.

Every head against randomly initialised transformers DistilBert* models
(PyTorch, CPU) at max abs diff <= 1e-4, in two shapes (64 wide, 2 layers,
GELU; 48 wide, 3 layers, gelu_new), inputs with padding; checkpoints
imported, exported and loaded back by transformers; bert_jax models exported
to transformers; configurations DistilBERT cannot express refused with one
line naming the field; and `student_from_teacher` copying the chosen layers.
"""
import json
import logging

import flax
import numpy as np
import pytest

import bert_jax
from bert_jax.convert import CheckpointError
from bert_jax.convert import distilbert
from bert_jax.models import bert
from bert_jax.models import distillation

from conftest import random_hf_folder, random_params
from test_convert_bert import _batch, _close, _ours, _round_trip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {
    "d64_l2": dict(vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                   max_position_embeddings=40),
    "d48_l3": dict(vocab_size=99, dim=48, n_layers=3, n_heads=3, hidden_dim=96,
                   max_position_embeddings=40, activation="gelu_new"),
}
OUTPUTS = {
    "DistilBertForMaskedLM": {"mlm_logits": "logits"},
    "DistilBertForSequenceClassification": {"logits": "logits"},
    "DistilBertForTokenClassification": {"logits": "logits"},
    "DistilBertForQuestionAnswering": {"start_logits": "start_logits", "end_logits": "end_logits"},
}
LABELS = {"DistilBertForSequenceClassification": 3, "DistilBertForTokenClassification": 5}
# Our configs of the two shapes.
CONFIGS = {
    "d64_l2": bert.BertConfig(vocab_size=99, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_position_embeddings=40,
                              type_vocab_size=0, model_type="distilbert"),
    "d48_l3": bert.BertConfig(vocab_size=99, hidden_size=48, num_layers=3, num_heads=3,
                              intermediate_size=96, max_position_embeddings=40,
                              type_vocab_size=0, hidden_act="gelu_tanh",
                              model_type="distilbert"),
}


def _random_hf(cls_name, tmp_path, shape, seed=0, **config):
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(
      transformers.DistilBertConfig(**{**SHAPES[shape], **config})).eval()
  return random_hf_folder(model, tmp_path / f"{cls_name}_{shape}")


def _hf(model, ids, mask):
  """DistilBERT takes no token_type_ids."""
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.linen.unbox(tree))


# ---------------------------------------------------------------------------
# Import: transformers' outputs from our parameters.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_distilbert_model_hidden_states_match_transformers(tmp_path, shape):
  reference, folder = _random_hf("DistilBertModel", tmp_path, shape)
  model, params = bert_jax.from_pretrained(folder)
  assert isinstance(model, bert.BertModel) and not model.add_pooler
  assert model.config == CONFIGS[shape]  # eps 1e-12, no token types, the activation mapped
  assert "token_type_embeddings" not in params["encoder"]["embeddings"]
  ids, types, mask = _batch()
  hidden, pooled = _ours(model, params, ids, types)  # type ids accepted, and ignored
  assert pooled is None
  _close(hidden, _hf(reference, ids, mask).last_hidden_state)  # padding rows too
  np.testing.assert_array_equal(np.asarray(hidden), np.asarray(_ours(model, params, ids, None)[0]))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("cls_name", sorted(OUTPUTS))
def test_distilbert_heads_match_transformers(tmp_path, shape, cls_name):
  labels = {"num_labels": LABELS[cls_name]} if cls_name in LABELS else {}
  reference, folder = _random_hf(cls_name, tmp_path, shape, **labels)
  model, params = bert_jax.from_pretrained(folder)
  assert bert.task_of(model) == distilbert.ARCHITECTURES[cls_name][1]
  ids, types, mask = _batch()
  ours, theirs = _ours(model, params, ids, types), _hf(reference, ids, mask)
  assert set(ours) == set(OUTPUTS[cls_name])
  for key, attr in OUTPUTS[cls_name].items():
    _close(ours[key], getattr(theirs, attr))  # every position, padding included


def test_import_errors_name_the_field(tmp_path):
  from safetensors.numpy import load_file, save_file
  _, folder = _random_hf("DistilBertForMaskedLM", tmp_path, "d64_l2")
  with pytest.raises(CheckpointError, match="no head for task 'pretraining'"):
    bert_jax.from_pretrained(folder, task="pretraining")
  file = folder / "model.safetensors"
  tensors = load_file(str(file))
  tensors["vocab_projector.weight"] = tensors["distilbert.embeddings.word_embeddings.weight"] + 1
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="'vocab_projector.weight' differs"):
    bert_jax.from_pretrained(folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "sinusoidal_pos_embds": True}))
  with pytest.raises(CheckpointError, match="sinusoidal_pos_embds=True") as error:
    bert_jax.from_pretrained(folder)
  assert "\n" not in str(error.value)
  del config["dim"]
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"config\.json lacks 'dim'"):
    bert_jax.from_pretrained(folder)


# ---------------------------------------------------------------------------
# Export: transformers loads what we write and computes what we compute.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name,shape", [("DistilBertForMaskedLM", "d48_l3"),
                                            ("DistilBertForSequenceClassification", "d64_l2")])
def test_import_export_round_trip_through_transformers(tmp_path, cls_name, shape):
  reference, folder = _random_hf(cls_name, tmp_path, shape)
  config, reloaded = _round_trip(getattr(transformers, cls_name), folder, tmp_path / "exported")
  assert config["model_type"] == "distilbert" and config["dim"] == SHAPES[shape]["dim"]
  assert "hidden_size" not in config and "type_vocab_size" not in config
  ids, _, mask = _batch()
  _close(_hf(reference, ids, mask).logits.numpy(), _hf(reloaded.eval(), ids, mask).logits)


@pytest.mark.parametrize("task,shape", [
    ("encoder", "d48_l3"), ("mlm", "d64_l2"), ("mlm", "d48_l3"),
    ("sequence_classification", "d48_l3"), ("token_classification", "d64_l2"),
    ("question_answering", "d48_l3"),
])
def test_bert_jax_distilbert_exports_to_transformers(tmp_path, task, shape, caplog):
  cfg = CONFIGS[shape]
  # The encoder keeps BertModel's default pooler: DistilBertModel has none, so it is dropped.
  kwargs = {"num_labels": 4} if task.endswith("classification") else {}
  model = bert.build(cfg, task, **kwargs)
  ids, types, mask = _batch()
  params = random_params(model, ids)
  with caplog.at_level(logging.WARNING):
    out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "distilbert" and config["n_layers"] == cfg.num_layers
  reloaded, info = getattr(transformers, config["architectures"][0]).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs, ours = _hf(reloaded.eval(), ids, mask), _ours(model, params, ids, types)
  if task == "encoder":
    assert "DistilBertModel has no pooler: encoder/pooler is not exported" in caplog.text
    _close(ours[0], theirs.last_hidden_state)
    return
  for key, value in ours.items():
    _close(value, getattr(theirs, {"mlm_logits": "logits"}.get(key, key)))


@pytest.mark.parametrize("fields,task,match", [
    (dict(type_vocab_size=2), "mlm", "type_vocab_size=2"),
    (dict(embedding_size=32), "mlm", "embedding_size=32"),
    (dict(share_layers="all"), "encoder", "share_layers='all'"),
    (dict(layer_norm_eps=1e-5), "mlm", "layer_norm_eps=1e-05"),
    (dict(), "pretraining", "no Hugging Face DistilBert architecture for task 'pretraining'"),
])
def test_unexportable_distilbert_models_are_one_line_naming_the_field(tmp_path, fields, task,
                                                                     match):
  model = bert.build(bert.BertConfig(**{**CONFIGS["d64_l2"].__dict__, **fields}), task)
  params = random_params(model, np.ones((1, 4), np.int32))
  with pytest.raises(CheckpointError, match=match) as error:
    bert_jax.save_pretrained(model, params, tmp_path / "out")
  assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------
# student_from_teacher: DistilBERT's initialisation.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_layers,model_type,task", [
    (4, "bert", "mlm"), (2, "roberta", "encoder"), (3, "distilbert", "mlm")])
def test_student_copies_the_chosen_teacher_layers(teacher_layers, model_type, task):
  fields = dict(type_vocab_size=0) if model_type == "distilbert" else {}
  cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=teacher_layers, num_heads=2,
                        intermediate_size=64, max_position_embeddings=40,
                        model_type=model_type, **fields)
  teacher = bert.build(cfg, task)
  ids = np.ones((1, 4), np.int32)
  teacher_params = random_params(teacher, ids)
  student, params = distilbert.student_from_teacher(teacher, teacher_params)
  n = max(1, teacher_layers // 2)
  assert type(student) is type(teacher) and student.config.num_layers == n
  assert student.config == bert.BertConfig(**{**cfg.__dict__, "num_layers": n})
  chosen = distillation.every_other_layer(teacher_layers, n)
  want = {k: v for k, v in _flat(teacher_params).items() if not k[1].startswith("layer_")}
  for j, i in enumerate(chosen):
    want.update({(p[0], f"layer_{j}", *p[2:]): v for p, v in _flat(teacher_params).items()
                 if p[1] == f"layer_{i}"})
  have = _flat(params)
  assert set(have) == set(want) == set(_flat(random_params(student, ids)))
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(have[path]), np.asarray(value), "/".join(path))
  student.apply({"params": params}, ids)  # the student runs on what it was given


def test_student_of_a_shared_layer_teacher_keeps_its_one_layer():
  cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=4, num_heads=2,
                        intermediate_size=64, max_position_embeddings=40, embedding_size=16,
                        share_layers="all", model_type="albert")
  teacher = bert.build(cfg, "mlm")
  teacher_params = random_params(teacher, np.ones((1, 4), np.int32))
  student, params = distilbert.student_from_teacher(teacher, teacher_params, num_layers=3)
  assert student.config.num_layers == 3
  assert set(params["encoder"]) == set(teacher_params["encoder"])
  np.testing.assert_array_equal(
      np.asarray(_flat(params)[("encoder", "layer_0", "mlp", "wi", "kernel")]),
      np.asarray(_flat(teacher_params)[("encoder", "layer_0", "mlp", "wi", "kernel")]))
