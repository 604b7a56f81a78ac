"""ELECTRA import and export: parity with Hugging Face transformers' Electra* (PyTorch, CPU).

Every head against randomly initialised transformers models at max abs diff
<= 1e-4, in two shapes (tables as wide as hidden, 2 layers; narrower tables
with `embeddings_project`, 3 layers), inputs with padding; bert_jax models
exported and loaded back by transformers; and the joint generator +
discriminator split into ElectraForMaskedLM + ElectraForPreTraining, each
checked against the joint model's own outputs, and joined back.
"""
import json
import logging

import flax
import jax
import numpy as np
import pytest

import bert_jax
from bert_jax.convert import CheckpointError
from bert_jax.convert import electra
from bert_jax.models import bert
from bert_jax.models import configs
from bert_jax.models import electra as electra_model

from conftest import random_hf_folder, random_params
from test_convert_bert import _batch, _close, _hf, _ours, _round_trip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {
    "e64_h64_l2": dict(vocab_size=99, embedding_size=64, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128,
                       max_position_embeddings=40),
    "e32_h48_l3": dict(vocab_size=99, embedding_size=32, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=96, max_position_embeddings=40),
}
OUTPUTS = {
    "ElectraForPreTraining": {"rtd_logits": "logits"},
    "ElectraForMaskedLM": {"mlm_logits": "logits"},
    "ElectraForSequenceClassification": {"logits": "logits"},
    "ElectraForTokenClassification": {"logits": "logits"},
    "ElectraForQuestionAnswering": {"start_logits": "start_logits", "end_logits": "end_logits"},
}
LABELS = {"ElectraForSequenceClassification": 3, "ElectraForTokenClassification": 5}
# Our configs of the two shapes (embedding_size=0: tables as wide as hidden).
CONFIGS = {
    "e64_h64_l2": bert.BertConfig(vocab_size=99, hidden_size=64, num_layers=2, num_heads=4,
                                  intermediate_size=128, max_position_embeddings=40,
                                  model_type="electra"),
    "e32_h48_l3": bert.BertConfig(vocab_size=99, hidden_size=48, num_layers=3, num_heads=3,
                                  intermediate_size=96, max_position_embeddings=40,
                                  embedding_size=32, model_type="electra"),
}
# Joint models: the discriminator projects its 16-wide tables and the 16-wide
# generator reads them as they are; or the discriminator's tables are 64 wide
# (no projection) and the generator projects them down to its 16.
JOINT = {
    "disc_projects": bert.BertConfig(vocab_size=99, hidden_size=64, num_layers=2, num_heads=4,
                                     intermediate_size=128, max_position_embeddings=40,
                                     embedding_size=16, model_type="electra"),
    "gen_projects": bert.BertConfig(vocab_size=99, hidden_size=64, num_layers=3, num_heads=4,
                                    intermediate_size=128, max_position_embeddings=40,
                                    model_type="electra"),
}


def _random_hf(cls_name, tmp_path, shape, seed=0, **config):
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(
      transformers.ElectraConfig(**{**SHAPES[shape], **config})).eval()
  return random_hf_folder(model, tmp_path / f"{cls_name}_{shape}")


def _assert_same_tree(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(flax.linen.unbox(t)) for t in (a, b))
  assert set(flat_a) == set(flat_b)
  for path, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), "/".join(path))


# ---------------------------------------------------------------------------
# Import: transformers' outputs from our parameters.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_electra_model_hidden_states_match_transformers(tmp_path, shape):
  reference, folder = _random_hf("ElectraModel", tmp_path, shape)
  model, params = bert_jax.from_pretrained(folder)
  assert isinstance(model, bert.BertModel) and not model.add_pooler
  cfg = model.config
  assert cfg.model_type == "electra" and cfg.hidden_act == "gelu"
  # Tables as wide as hidden are no factorisation; narrower ones are projected.
  assert cfg.embedding_size == (0 if shape == "e64_h64_l2" else 32)
  assert ("projection" in params["encoder"]["embeddings"]) == (shape == "e32_h48_l3")
  ids, types, mask = _batch()
  hidden, pooled = _ours(model, params, ids, types)
  assert pooled is None
  _close(hidden, _hf(reference, ids, types, mask).last_hidden_state)  # padding rows too


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("cls_name", sorted(OUTPUTS))
def test_electra_heads_match_transformers(tmp_path, shape, cls_name):
  labels = {"num_labels": LABELS[cls_name]} if cls_name in LABELS else {}
  reference, folder = _random_hf(cls_name, tmp_path, shape, **labels)
  model, params = bert_jax.from_pretrained(folder)
  assert bert.task_of(model) == electra.ARCHITECTURES[cls_name][1]
  ids, types, mask = _batch()
  ours, theirs = _ours(model, params, ids, types), _hf(reference, ids, types, mask)
  assert set(ours) == set(OUTPUTS[cls_name])
  for key, attr in OUTPUTS[cls_name].items():
    _close(ours[key], getattr(theirs, attr))  # every position, padding included


def test_mlm_positions_gather_the_generator_head(tmp_path):
  reference, folder = _random_hf("ElectraForMaskedLM", tmp_path, "e32_h48_l3")
  model, params = bert_jax.from_pretrained(folder)
  ids, types, mask = _batch()
  theirs = _hf(reference, ids, types, mask).logits
  positions = np.array([[0, 5, 10], [1, 2, 6], [3, 0, 0]])
  gathered = _ours(model, params, ids, types, mlm_positions=positions)["mlm_logits"]
  _close(gathered, torch.stack([theirs[b, torch.tensor(positions[b])] for b in range(3)]))


def test_fine_tuning_from_the_discriminator_gets_a_fresh_classifier(tmp_path, caplog):
  _, folder = _random_hf("ElectraForPreTraining", tmp_path, "e32_h48_l3")
  _, rtd_params = bert_jax.from_pretrained(folder)
  with caplog.at_level(logging.WARNING):
    model, params = bert_jax.from_pretrained(folder, task="sequence_classification")
  assert "newly initialised" in caplog.text and "classifier_dense/kernel" in caplog.text
  assert "discriminator_predictions.dense.weight" in caplog.text  # reported unused
  _assert_same_tree(params["encoder"], rtd_params["encoder"])
  assert "pooler" not in params["encoder"]  # ELECTRA classifies with its own dense + GELU
  ids, types, _ = _batch()
  assert _ours(model, params, ids, types)["logits"].shape == (3, 2)


def test_untied_generator_output_and_missing_embedding_size_are_errors(tmp_path):
  from safetensors.numpy import load_file, save_file
  _, folder = _random_hf("ElectraForMaskedLM", tmp_path, "e32_h48_l3")
  file = folder / "model.safetensors"
  tensors = load_file(str(file))
  word = tensors["electra.embeddings.word_embeddings.weight"]
  tensors["generator_lm_head.weight"] = word.copy()  # a stored copy of the tied weight: fine
  save_file(tensors, str(file), metadata={"format": "pt"})
  bert_jax.from_pretrained(folder)
  tensors["generator_lm_head.weight"] = word + 1.0
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="'generator_lm_head.weight' differs"):
    bert_jax.from_pretrained(folder)
  config = json.loads((folder / "config.json").read_text())
  del config["embedding_size"]
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"config\.json lacks 'embedding_size'"):
    bert_jax.from_pretrained(folder)


# ---------------------------------------------------------------------------
# Export: transformers loads what we write and computes what we compute.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name,shape", [("ElectraForPreTraining", "e64_h64_l2"),
                                            ("ElectraForMaskedLM", "e32_h48_l3")])
def test_import_export_round_trip_through_transformers(tmp_path, cls_name, shape):
  reference, folder = _random_hf(cls_name, tmp_path, shape)
  config, reloaded = _round_trip(getattr(transformers, cls_name), folder, tmp_path / "exported")
  assert config["embedding_size"] == SHAPES[shape]["embedding_size"]
  ids, types, mask = _batch()
  _close(_hf(reference, ids, types, mask).logits.numpy(),
         _hf(reloaded.eval(), ids, types, mask).logits)


@pytest.mark.parametrize("task,shape", [
    ("encoder", "e32_h48_l3"), ("rtd", "e64_h64_l2"), ("rtd", "e32_h48_l3"),
    ("mlm", "e64_h64_l2"), ("mlm", "e32_h48_l3"), ("sequence_classification", "e32_h48_l3"),
    ("token_classification", "e64_h64_l2"), ("question_answering", "e32_h48_l3"),
])
def test_bert_jax_electra_exports_to_transformers(tmp_path, task, shape, caplog):
  cfg = CONFIGS[shape]
  # The encoder keeps BertModel's default pooler: ElectraModel has none, so it is dropped.
  kwargs = {"num_labels": 4} if task.endswith("classification") else {}
  model = bert.build(cfg, task, **kwargs)
  ids, types, mask = _batch()
  params = random_params(model, ids)
  with caplog.at_level(logging.WARNING):
    out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "electra" and config["embedding_size"] == cfg.embed_dim
  reloaded, info = getattr(transformers, config["architectures"][0]).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs, ours = _hf(reloaded.eval(), ids, types, mask), _ours(model, params, ids, types)
  if task == "encoder":
    assert "encoder/pooler is not exported" in caplog.text
    _close(ours[0], theirs.last_hidden_state)
    return
  for key, value in ours.items():
    _close(value, getattr(theirs, {"mlm_logits": "logits", "rtd_logits": "logits"}.get(key, key)))


@pytest.mark.parametrize("fields,task,match", [
    (dict(share_layers="all"), "rtd", "share_layers='all'"),
    (dict(), "pretraining", "no Hugging Face Electra architecture for task 'pretraining'"),
])
def test_unexportable_electra_models_are_an_error_naming_the_cause(tmp_path, fields, task, match):
  model = bert.build(bert.BertConfig(**{**CONFIGS["e32_h48_l3"].__dict__, **fields}), task)
  params = random_params(model, np.ones((1, 4), np.int32))
  with pytest.raises(CheckpointError, match=match):
    bert_jax.save_pretrained(model, params, tmp_path / "out")


# ---------------------------------------------------------------------------
# The joint generator + discriminator <-> two Hugging Face models.
# ---------------------------------------------------------------------------
def _joint_batch(seed=0, batch=3, length=12, slots=4):
  """Masked input (id 4 = [MASK]) with padding in the last row and one padding slot."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(5, 99, (batch, length)).astype(np.int32)
  tokens[-1, length - 3:] = 0
  mask = (tokens != 0).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, length - 3), slots, replace=False))
                        for _ in range(batch)]).astype(np.int32)
  weights = np.ones((batch, slots), np.float32)
  weights[0, -1] = 0.0
  targets = np.take_along_axis(tokens, positions, 1)
  np.put_along_axis(tokens, positions, 4, 1)
  return tokens, mask, positions, weights, targets


@pytest.fixture(scope="module", params=sorted(JOINT))
def joint(request, tmp_path_factory):
  """A random joint model, saved as a Hugging Face pair and loaded by transformers."""
  model = bert.build(JOINT[request.param], "electra")
  params = random_params(model, np.ones((1, 4), np.int32), seed=2)
  path = tmp_path_factory.mktemp(request.param) / "joint"
  out = bert_jax.save_pretrained(model, params, path)
  assert out == path and sorted(p.name for p in path.iterdir()) == ["discriminator", "generator"]
  hf = {}
  for name, cls in (("discriminator", transformers.ElectraForPreTraining),
                    ("generator", transformers.ElectraForMaskedLM)):
    hf[name], info = cls.from_pretrained(path / name, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    hf[name].eval()
  return model, params, path, hf


def test_joint_model_equals_the_two_transformers_models(joint):
  model, params, _, hf = joint
  gen_cfg = hf["generator"].config
  assert gen_cfg.hidden_size == 16 and gen_cfg.num_attention_heads == 1
  assert gen_cfg.intermediate_size == 64 and gen_cfg.embedding_size == model.config.embed_dim
  tokens, mask, positions, weights, targets = _joint_batch()
  ours = model.apply({"params": params}, tokens, encoder_mask=mask, mlm_positions=positions,
                     mlm_targets=targets, mlm_weights=weights)
  # (a) The generator: ElectraForMaskedLM's logits at the masked positions.
  with torch.no_grad():
    logits = hf["generator"](input_ids=torch.tensor(tokens),
                             attention_mask=torch.tensor(mask)).logits
  _close(ours["mlm_logits"], torch.stack([logits[b, torch.tensor(positions[b])]
                                          for b in range(len(tokens))]))
  # (b) The discriminator on the joint model's corrupted input, rebuilt from
  # the same sample (no 'sample' rng: the model draws with PRNGKey(0)).
  sampled = electra_model.gumbel_sample(ours["mlm_logits"], jax.random.PRNGKey(0))
  corrupted, labels = electra_model.replace_tokens(tokens, positions, weights, targets, sampled)
  np.testing.assert_array_equal(labels, ours["rtd_labels"])
  assert (np.asarray(corrupted) != tokens).any()  # the generator really replaced tokens
  with torch.no_grad():
    rtd = hf["discriminator"](input_ids=torch.tensor(np.asarray(corrupted)),
                              attention_mask=torch.tensor(mask)).logits
  _close(ours["rtd_logits"], rtd)


def test_join_of_the_two_imports_reproduces_the_joint_params(joint):
  model, params, path, _ = joint
  disc = bert_jax.from_pretrained(path / "discriminator")
  gen = bert_jax.from_pretrained(path / "generator")
  assert bert.task_of(disc[0]) == "rtd" and bert.task_of(gen[0]) == "mlm"
  joined, joined_params = electra.join(*disc, *gen)
  assert isinstance(joined, electra_model.ElectraForPreTraining)
  assert joined.config == model.config
  _assert_same_tree(joined_params, params)
  # The pair's folder loads as the joint model, or as the discriminator for fine-tuning.
  loaded, loaded_params = bert_jax.from_pretrained(path)
  assert loaded.config == model.config
  _assert_same_tree(loaded_params, params)
  encoder, encoder_params = bert_jax.from_pretrained(path, task="encoder")
  assert isinstance(encoder, bert.BertModel)
  _assert_same_tree(encoder_params["encoder"], params["encoder"])


def test_split_parts_are_the_task_models(joint):
  model, params, _, _ = joint
  disc, disc_params = electra.discriminator(model, params)
  gen, gen_params = electra.generator(model, params)
  assert isinstance(disc, bert.BertForReplacedTokenDetection)
  assert isinstance(gen, bert.BertForMaskedLM) and gen.config.hidden_size == 16
  # The generator carries the discriminator's tables (the same arrays).
  tables = params["encoder"]["embeddings"]
  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    assert (gen_params["encoder"]["embeddings"][table]["embedding"]
            is tables[table]["embedding"]), table
  _assert_same_tree(disc_params, {"encoder": params["encoder"], "rtd": params["rtd"]})


def test_save_refuses_to_overwrite_either_folder(joint, tmp_path):
  model, params, path, _ = joint
  with pytest.raises(CheckpointError, match="already holds a checkpoint"):
    bert_jax.save_pretrained(model, params, path)
  # A generator/ alone already there: nothing is written, not even discriminator/.
  (tmp_path / "pair" / "generator").mkdir(parents=True)
  (tmp_path / "pair" / "generator" / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match=r"pair/generator: already holds"):
    bert_jax.save_pretrained(model, params, tmp_path / "pair")
  assert not (tmp_path / "pair" / "discriminator").exists()
  bert_jax.save_pretrained(model, params, tmp_path / "pair", overwrite=True)
  assert (tmp_path / "pair" / "generator" / "model.safetensors").is_file()


def _task_pair(disc_cfg, **gen_fields):
  """Random (model, params) of a discriminator and of a generator with fields overridden."""
  ids = np.ones((1, 4), np.int32)
  gen_cfg = bert.BertConfig(**{**configs.generator_config(disc_cfg).__dict__, **gen_fields})
  disc, gen = bert.build(disc_cfg, "rtd"), bert.build(gen_cfg, "mlm")
  return disc, random_params(disc, ids), gen, random_params(gen, ids)


@pytest.mark.parametrize("gen_fields,match", [
    (dict(num_heads=2), "generator num_heads=2 does not fit"),
    (dict(intermediate_size=48), "generator intermediate_size=48 does not fit"),
    (dict(num_layers=1), "generator num_layers=1 does not fit"),
    (dict(vocab_size=98), "generator vocab_size=98 does not fit"),
    (dict(hidden_size=128, num_heads=2, intermediate_size=512),
     "generator hidden_size=128 does not fit"),
])
def test_mismatched_generator_is_an_error_naming_the_field(gen_fields, match):
  with pytest.raises(CheckpointError, match=match):
    electra.join(*_task_pair(JOINT["gen_projects"], **gen_fields))


def test_mismatched_generator_from_transformers_config(joint, tmp_path):
  # The Hugging Face path: a generator folder whose config.json has 2 heads (16 / 2 fits).
  _, _, path, _ = joint
  folder = tmp_path / "generator"
  folder.mkdir()
  weights = (path / "generator" / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(weights)
  config = json.loads((path / "generator" / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2}))
  with pytest.raises(CheckpointError, match="generator num_heads=2 does not fit"):
    electra.join(*bert_jax.from_pretrained(path / "discriminator"),
                 *bert_jax.from_pretrained(folder))


def test_different_generator_tables_warn_and_keep_the_discriminators(caplog):
  disc, disc_params, gen, gen_params = _task_pair(JOINT["disc_projects"])
  with caplog.at_level(logging.WARNING):
    _, params = electra.join(disc, disc_params, gen, gen_params)
  # _random_params drew the two models' tables independently.
  assert "generator's embeddings differ" in caplog.text and "word_embeddings" in caplog.text
  _assert_same_tree(params["encoder"], disc_params["encoder"])
  assert "embeddings" not in params["generator"]  # tables as wide as the generator: no projection
