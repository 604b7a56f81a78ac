"""BERT/RoBERTa import and export: parity with Hugging Face transformers (PyTorch, CPU).

Every parity check compares against the reference model's own outputs at
max abs diff <= 1e-4: the real all-MiniLM-L6-v2 on SST-2 sentences, randomly
initialised transformers models for every head, an original-format TF BERT
checkpoint, and exports loaded back into transformers.
"""
import json
import logging
import re

import flax
import jax
import numpy as np
import pytest

import bert_jax
from bert_jax.convert import CheckpointError
from bert_jax.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
SMALL = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=40)


def _batch(pad=0, seed=0, batch=3, length=11):
  """Token ids with padding in rows 1 and 2, token types A/B, attention mask."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 99, (batch, length))
  ids[1, 7:] = pad
  ids[2, 4:] = pad
  mask = (ids != pad).astype(np.int64)
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  return ids, types * mask, mask


def _hf(model, ids, types, mask):
  with torch.no_grad():
    kw = {} if types is None else {"token_type_ids": torch.tensor(types)}
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)


def _ours(model, params, ids, types, **kw):
  return model.apply({"params": params}, np.asarray(ids, np.int32),
                     encoder_type_ids=None if types is None else np.asarray(types, np.int32),
                     **kw)


def _close(ours, theirs, where=None):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape
  if where is not None:
    ours, theirs = ours[where], theirs[where]
  diff = np.abs(ours - theirs).max()
  assert diff <= ATOL, diff


def _round_trip(cls, folder, out):
  """Imports `folder`, exports it to `out` and loads that with transformers' `cls`.

  Returns (the exported config.json, the reloaded model in eval mode); the
  reload must find every tensor it expects and no other.
  """
  model, params = bert_jax.from_pretrained(folder)
  out = bert_jax.save_pretrained(model, params, out)
  reloaded, info = cls.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return json.loads((out / "config.json").read_text()), reloaded.eval()


def _random_hf(cls, tmp_path, seed=0, **config):
  cfg_cls = transformers.RobertaConfig if cls.__name__.startswith("Roberta") else \
      transformers.BertConfig
  torch.manual_seed(seed)
  model = cls(cfg_cls(**{**SMALL, **config})).eval()
  folder = tmp_path / cls.__name__
  model.save_pretrained(folder)
  return model, folder


# ---------------------------------------------------------------------------
# (a) The real all-MiniLM-L6-v2 on real SST-2 sentences.
# ---------------------------------------------------------------------------
def test_minilm_matches_transformers_on_sst2_pairs(minilm_dir, shared_data):
  lines = (shared_data / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
  sentences = [line.split("\t")[0] for line in lines[:12]]
  tokenizer = transformers.BertTokenizer(str(minilm_dir / "vocab.txt"), do_lower_case=True)
  enc = tokenizer(sentences[0::2], sentences[1::2], padding=True, return_tensors="np")
  ids, types, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
  assert (mask == 0).any() and (types == 1).any()  # really padded, really pairs

  model, params = bert_jax.from_pretrained(minilm_dir)
  assert isinstance(model, bert.BertModel) and model.config.hidden_size == 384
  hidden, pooled = _ours(model, params, ids, types)
  reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
  out = _hf(reference, ids, types, mask)
  _close(hidden, out.last_hidden_state, where=mask.astype(bool))
  _close(pooled, out.pooler_output)


# ---------------------------------------------------------------------------
# (b) Randomly initialised transformers models, every head.
# ---------------------------------------------------------------------------
def test_masked_lm_all_positions_and_gathered_positions(tmp_path):
  reference, folder = _random_hf(transformers.BertForMaskedLM, tmp_path)
  model, params = bert_jax.from_pretrained(folder)
  assert isinstance(model, bert.BertForMaskedLM)
  ids, types, mask = _batch()
  theirs = _hf(reference, ids, types, mask).logits
  _close(_ours(model, params, ids, types)["mlm_logits"], theirs)  # padding rows too
  positions = np.array([[0, 5, 10], [1, 2, 6], [3, 0, 0]])
  gathered = _ours(model, params, ids, types, mlm_positions=positions)["mlm_logits"]
  rows = torch.stack([theirs[b, torch.tensor(positions[b])] for b in range(3)])
  _close(gathered, rows)


def test_legacy_pytorch_bin_with_gamma_beta_and_tied_copy(tmp_path):
  # Early PyTorch BERT checkpoints: pytorch_model.bin, LayerNorm gamma/beta,
  # the tied decoder stored as a copy, the position_ids buffer saved.
  reference, folder = _random_hf(transformers.BertForMaskedLM, tmp_path)
  state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                  re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v.clone()
           for k, v in reference.state_dict().items()}
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  state["bert.embeddings.position_ids"] = torch.arange(40)[None]
  assert "bert.encoder.layer.0.output.LayerNorm.gamma" in state
  (folder / "model.safetensors").unlink()
  torch.save(state, folder / "pytorch_model.bin")
  model, params = bert_jax.from_pretrained(folder)
  ids, types, mask = _batch()
  _close(_ours(model, params, ids, types)["mlm_logits"], _hf(reference, ids, types, mask).logits)
  # A decoder copy that differs from the embedding cannot be represented: error.
  state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
  torch.save(state, folder / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight' differs"):
    bert_jax.from_pretrained(folder)


@pytest.mark.parametrize("cls_name,config,outputs", [
    ("BertForPreTraining", {}, {"mlm_logits": "prediction_logits",
                                "nsp_logits": "seq_relationship_logits"}),
    ("BertForSequenceClassification", {"num_labels": 3}, {"logits": "logits"}),
    ("BertForSequenceClassification", {"num_labels": 1}, {"logits": "logits"}),
    ("BertForTokenClassification", {"num_labels": 5}, {"logits": "logits"}),
    ("BertForQuestionAnswering", {}, {"start_logits": "start_logits",
                                      "end_logits": "end_logits"}),
])
def test_bert_heads_match_transformers(tmp_path, cls_name, config, outputs):
  reference, folder = _random_hf(getattr(transformers, cls_name), tmp_path, **config)
  model, params = bert_jax.from_pretrained(folder)
  assert type(model).__name__ == cls_name
  ids, types, mask = _batch()
  ours = _ours(model, params, ids, types)
  theirs = _hf(reference, ids, types, mask)
  assert set(ours) == set(outputs)
  for key, attr in outputs.items():
    _close(ours[key], getattr(theirs, attr))


@pytest.mark.parametrize("cls_name,outputs", [
    ("RobertaForMaskedLM", {"mlm_logits": "logits"}),
    ("RobertaForSequenceClassification", {"logits": "logits"}),
])
def test_roberta_matches_transformers(tmp_path, cls_name, outputs):
  # RoBERTa: pad id 1, positions start at pad + 1, a single token type.
  reference, folder = _random_hf(getattr(transformers, cls_name), tmp_path,
                                 max_position_embeddings=42, type_vocab_size=1,
                                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
  model, params = bert_jax.from_pretrained(folder)
  assert model.config.position_offset == 2 and model.config.model_type == "roberta"
  ids, _, mask = _batch(pad=1)
  ours = _ours(model, params, ids, None)
  theirs = _hf(reference, ids, None, mask)
  for key, attr in outputs.items():
    _close(ours[key], getattr(theirs, attr))  # all positions, padding included


def test_other_task_gets_fresh_head_with_warning(tmp_path, caplog):
  _, folder = _random_hf(transformers.BertForMaskedLM, tmp_path)
  mlm_model, mlm_params = bert_jax.from_pretrained(folder)
  with caplog.at_level(logging.WARNING):
    model, params = bert_jax.from_pretrained(folder, task="token_classification")
  assert "newly initialised" in caplog.text and "classifier/kernel" in caplog.text
  # The MLM head is reported as unused, not dropped silently.
  assert "cls.predictions.transform.dense.weight" in caplog.text
  np.testing.assert_array_equal(
      params["encoder"]["layer_1"]["mlp"]["wo"]["kernel"],
      mlm_params["encoder"]["layer_1"]["mlp"]["wo"]["kernel"])
  kernel = np.asarray(params["classifier"]["kernel"])
  assert kernel.shape == (64, 2) and 0.01 < kernel.std() < 0.03  # BERT's init, std 0.02
  assert not np.asarray(params["classifier"]["bias"]).any()


# ---------------------------------------------------------------------------
# (c) Original TF BERT checkpoint (bert_config.json + bert_model.ckpt.*).
# ---------------------------------------------------------------------------
def _tf_name(hf_name: str) -> tuple[str, bool]:
  """Original TF name of a transformers Bert* tensor, and whether to transpose it."""
  # run_pretraining.py / run_classifier.py / run_squad.py heads: [out, in] output_weights.
  special = {"cls.predictions.bias": "cls/predictions/output_bias",
             "cls.seq_relationship.weight": "cls/seq_relationship/output_weights",
             "cls.seq_relationship.bias": "cls/seq_relationship/output_bias",
             "classifier.weight": "output_weights", "classifier.bias": "output_bias",
             "qa_outputs.weight": "cls/squad/output_weights",
             "qa_outputs.bias": "cls/squad/output_bias"}
  if hf_name in special:
    return special[hf_name], False
  *owner, last = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", hf_name).split(".")
  if owner[-1] == "LayerNorm":
    return "/".join(owner + ["gamma" if last == "weight" else "beta"]), False
  if owner[-1].endswith("embeddings"):
    return "/".join(owner), False
  return "/".join(owner + ["kernel" if last == "weight" else "bias"]), last == "weight"


def _write_tf_checkpoint(folder, tensors: dict):
  tf = pytest.importorskip("tensorflow")
  folder.mkdir()
  graph = tf.Graph()
  with graph.as_default():
    variables = [tf.compat.v1.Variable(v, name=k) for k, v in tensors.items()]
    saver = tf.compat.v1.train.Saver(variables)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      saver.save(session, str(folder / "bert_model.ckpt"), write_meta_graph=False)
  assert (folder / "bert_model.ckpt.index").is_file()


def _tf_folder(reference, folder):
  """Writes `reference`'s weights as an original TF BERT folder; returns the tensors."""
  tensors = {}
  for name, value in reference.state_dict().items():
    if "position_ids" in name or "decoder" in name:
      continue  # buffers and the tied decoder are not in TF checkpoints
    tf_name, transpose = _tf_name(name)
    value = value.numpy()
    tensors[tf_name] = np.ascontiguousarray(value.T if transpose else value)
  # Optimiser slots and the step counter sit in real checkpoints; they are skipped.
  tensors["bert/pooler/dense/kernel/adam_m"] = np.zeros((64, 64), np.float32)
  tensors["global_step"] = np.int64(1000)
  _write_tf_checkpoint(folder, tensors)
  (folder / "bert_config.json").write_text(json.dumps({
      "vocab_size": 99, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 128, "max_position_embeddings": 40, "hidden_act": "gelu",
      "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}))
  return tensors


@pytest.mark.parametrize("cls_name,config,outputs", [
    ("BertForPreTraining", {}, {"mlm_logits": "prediction_logits",
                                "nsp_logits": "seq_relationship_logits"}),
    ("BertForSequenceClassification", {"num_labels": 3}, {"logits": "logits"}),
    ("BertForQuestionAnswering", {}, {"start_logits": "start_logits",
                                      "end_logits": "end_logits"}),
])
def test_original_tf_checkpoint_matches_transformers(tmp_path, cls_name, config, outputs):
  # Original BERT's "gelu" is the tanh form: transformers calls it gelu_new.
  reference, _ = _random_hf(getattr(transformers, cls_name), tmp_path, hidden_act="gelu_new",
                            **config)
  tensors = _tf_folder(reference, tmp_path / "tf_bert")
  assert "bert/encoder/layer_1/attention/self/query/kernel" in tensors

  model, params = bert_jax.from_pretrained(tmp_path / "tf_bert")  # head picked from the names
  assert type(model).__name__ == cls_name and model.config.hidden_act == "gelu_tanh"
  ids, types, mask = _batch()
  ours = _ours(model, params, ids, types)
  theirs = _hf(reference, ids, types, mask)
  assert set(ours) == set(outputs)
  for key, attr in outputs.items():
    _close(ours[key], getattr(theirs, attr))


def test_original_tf_checkpoint_missing_tensor(tmp_path):
  reference, _ = _random_hf(transformers.BertForPreTraining, tmp_path)
  tensors = _tf_folder(reference, tmp_path / "tf_bert")
  del tensors["bert/encoder/layer_1/output/dense/bias"]
  broken = tmp_path / "tf_broken"
  _write_tf_checkpoint(broken, tensors)
  (broken / "bert_config.json").write_text((tmp_path / "tf_bert" / "bert_config.json").read_text())
  with pytest.raises(CheckpointError, match=r"bert_model\.ckpt.*layer_1/output/dense/bias"):
    bert_jax.from_pretrained(broken)
  (broken / "bert_config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json"):
    bert_jax.from_pretrained(broken)


# ---------------------------------------------------------------------------
# (d) Export: transformers loads what we write and computes what we compute.
# ---------------------------------------------------------------------------
def test_import_export_round_trip_through_transformers(tmp_path):
  reference, folder = _random_hf(transformers.BertForPreTraining, tmp_path)
  model, params = bert_jax.from_pretrained(folder)
  out = bert_jax.save_pretrained(model, params, tmp_path / "exported")
  reloaded, info = transformers.BertForPreTraining.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, types, mask = _batch()
  a, b = _hf(reference, ids, types, mask), _hf(reloaded.eval(), ids, types, mask)
  _close(a.prediction_logits.numpy(), b.prediction_logits)
  _close(a.seq_relationship_logits.numpy(), b.seq_relationship_logits)


@pytest.mark.parametrize("task,kwargs,roberta", [
    ("encoder", {}, False), ("mlm", {}, False), ("sequence_classification", {"num_labels": 3},
                                                 False),
    ("token_classification", {"num_labels": 4}, False), ("question_answering", {}, False),
    ("mlm", {}, True), ("sequence_classification", {"num_labels": 2}, True),
])
def test_bert_jax_model_exports_to_transformers(tmp_path, task, kwargs, roberta):
  extra = dict(pad_token_id=1, position_offset=2, model_type="roberta", type_vocab_size=1,
               max_position_embeddings=42) if roberta else {}
  cfg = bert.BertConfig(**{**dict(vocab_size=99, hidden_size=64, num_layers=2, num_heads=4,
                                  intermediate_size=128, max_position_embeddings=40), **extra})
  model = bert.build(cfg, task, **kwargs)
  ids, types, mask = _batch(pad=cfg.pad_token_id)
  types = None if roberta else types
  # Random values everywhere (norms and biases too, so a mis-mapped one cannot
  # hide behind 1s and 0s); numpy, because jax's initialisers are slow to compile.
  shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]
  rng = np.random.RandomState(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + 0.05 * rng.standard_normal(s.shape)
                       ).astype(np.float32), shapes)
  out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  config = json.loads((out / "config.json").read_text())
  reloaded, info = getattr(transformers, config["architectures"][0]).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs = _hf(reloaded.eval(), ids, types, mask)
  ours = _ours(model, params, ids, types)
  if task == "encoder":
    _close(ours[0], theirs.last_hidden_state)
    _close(ours[1], theirs.pooler_output)
    return
  names = {"mlm_logits": "logits"}
  for key, value in ours.items():
    _close(value, getattr(theirs, names.get(key, key)))


# ---------------------------------------------------------------------------
# (e) Bad input: each error names its cause.
# ---------------------------------------------------------------------------
def test_folder_without_config_json(tmp_path):
  with pytest.raises(CheckpointError, match=rf"{tmp_path}.*config\.json"):
    bert_jax.from_pretrained(tmp_path)


def test_unknown_model_type_and_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(CheckpointError, match="model_type='gpt2'"):
    bert_jax.from_pretrained(tmp_path)
  _, folder = _random_hf(transformers.BertForMultipleChoice, tmp_path)
  with pytest.raises(CheckpointError, match="'BertForMultipleChoice'"):
    bert_jax.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_missing_or_misshaped_tensor_names_file_and_parameter(tmp_path, damage):
  from safetensors.numpy import load_file, save_file
  _, folder = _random_hf(transformers.BertForSequenceClassification, tmp_path)
  file = folder / "model.safetensors"
  tensors = load_file(str(file))
  name = "bert.encoder.layer.1.attention.self.key.weight"
  if damage == "missing":
    del tensors[name]
  else:
    tensors[name] = np.zeros((64, 32), np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=rf"model\.safetensors.*'{name}'"):
    bert_jax.from_pretrained(folder)


def test_checkpoint_head_missing_is_an_error_and_extras_are_reported(tmp_path, caplog):
  from safetensors.numpy import load_file, save_file
  _, folder = _random_hf(transformers.BertForQuestionAnswering, tmp_path)
  file = folder / "model.safetensors"
  tensors = load_file(str(file))
  tensors["bert.extra.weight"] = np.ones(3, np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with caplog.at_level(logging.WARNING):
    bert_jax.from_pretrained(folder)
  assert "bert.extra.weight" in caplog.text
  del tensors["qa_outputs.bias"]  # the checkpoint's own head must be complete
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="'qa_outputs.bias' is missing"):
    bert_jax.from_pretrained(folder)
