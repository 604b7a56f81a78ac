"""ModernBERT: parity with Hugging Face transformers (PyTorch, CPU), export, packing, sharding.

Randomly initialised transformers ModernBert* models (eager attention) in two
configurations, one with a sliding window narrower than the sequence, with
padding in the batch; outputs compared at max abs diff <= 1e-4 on real tokens.
"""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import models
from bert_jax.models import modernbert
from bert_jax.models.configs import ModernBertConfig
from conftest import assert_sharded_equals_unsharded, random_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
LENGTH = 24
# Config A: window 8 (4 each side) over 24 tokens, global every 2nd layer, biases on.
# Config B: the defaults' pattern (global every 3rd), no biases, tanh-GELU, mean pooling.
CONFIGS = {
    "a": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=48, local_attention=8, global_attn_every_n_layers=2,
              global_rope_theta=1000.0, local_rope_theta=100.0, norm_bias=True,
              attention_bias=True, mlp_bias=True, classifier_bias=True, max_position_embeddings=64),
    "b": dict(vocab_size=99, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=40, local_attention=10, global_attn_every_n_layers=3,
              hidden_activation="gelu_pytorch_tanh", classifier_activation="silu",
              classifier_pooling="mean", max_position_embeddings=64),
}
HF_CLASSES = {
    "encoder": "ModernBertModel", "mlm": "ModernBertForMaskedLM",
    "sequence_classification": "ModernBertForSequenceClassification",
    "token_classification": "ModernBertForTokenClassification",
    "question_answering": "ModernBertForQuestionAnswering",
}


def _batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 99, (3, LENGTH))
  ids[1, 17:] = 0
  ids[2, 6:] = 0
  return ids, (ids != 0).astype(np.int64)


def _hf_config(name, **extra):
  fields = {**CONFIGS[name], **extra}
  return transformers.ModernBertConfig(
      **fields, pad_token_id=0, bos_token_id=None, eos_token_id=None, cls_token_id=None,
      sep_token_id=None, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """(config name, task[, pooling]) -> (HF model in eval mode, its saved folder)."""
  cache = {}

  def get(name, task, **extra):
    key = (name, task, tuple(sorted(extra.items())))
    if key not in cache:
      torch.manual_seed(len(cache))
      cls = getattr(transformers, HF_CLASSES[task])
      model = cls(_hf_config(name, **extra)).eval()
      folder = tmp_path_factory.mktemp(f"{name}_{task}")
      cache[key] = random_hf_folder(model, folder, extra_norm_names=("norm",))
    return cache[key]
  return get


def _theirs(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def _close(ours, theirs, mask=None):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape
  if mask is not None:
    ours, theirs = ours[mask > 0], theirs[mask > 0]
  diff = float(np.abs(ours - theirs).max())
  print(f"max abs diff {diff:.2e}")  # shown with pytest -s / -rP
  assert diff <= ATOL, diff
  return diff


def _apply(model, params, ids, mask, **kw):
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i, encoder_mask=m, **kw))(
      params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("task, extra", [
    ("encoder", {}), ("mlm", {}), ("sequence_classification", {"classifier_pooling": "cls"}),
    ("sequence_classification", {"classifier_pooling": "mean"}), ("token_classification", {}),
    ("question_answering", {})])
def test_parity_with_transformers(hf_folders, name, task, extra):
  hf, folder = hf_folders(name, task, **extra)
  ids, mask = _batch()
  model, params = bert_jax.from_pretrained(folder)
  assert modernbert.task_of(model) == task
  out, ref = _apply(model, params, ids, mask), _theirs(hf, ids, mask)
  if task == "encoder":
    _close(out[0], ref.last_hidden_state, mask)
  elif task == "mlm":
    _close(out["mlm_logits"], ref.logits, mask)
  elif task == "sequence_classification":
    _close(out["logits"], ref.logits)
  elif task == "token_classification":
    _close(out["logits"], ref.logits, mask)
  else:
    _close(out["start_logits"], ref.start_logits, mask)
    _close(out["end_logits"], ref.end_logits, mask)


def test_gathered_mlm_positions_match_full_logits(hf_folders):
  _, folder = hf_folders("a", "mlm")
  model, params = bert_jax.from_pretrained(folder)
  ids, mask = _batch()
  positions = np.array([[0, 5, 20], [1, 2, 16], [0, 3, 5]], np.int32)
  full = _apply(model, params, ids, mask)["mlm_logits"]
  gathered = _apply(model, params, ids, mask, mlm_positions=positions)["mlm_logits"]
  expected = np.take_along_axis(np.asarray(full), positions[:, :, None], axis=1)
  np.testing.assert_allclose(gathered, expected, atol=1e-5)


@pytest.mark.parametrize("name, task", [("a", "mlm"), ("b", "sequence_classification"),
                                        ("a", "token_classification")])
def test_round_trip_keeps_every_tensor_and_reloads(hf_folders, tmp_path, name, task):
  hf, folder = hf_folders(name, task)
  model, params = bert_jax.from_pretrained(folder)
  out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  cls = getattr(transformers, HF_CLASSES[task])
  reloaded, info = cls.from_pretrained(out, output_loading_info=True,
                                       attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  original = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  again = {k: v.detach().numpy() for k, v in reloaded.state_dict().items()}
  assert set(original) == set(again)
  for k in original:
    np.testing.assert_array_equal(original[k], again[k], err_msg=k)
  ids, mask = _batch()
  a, b = _theirs(hf, ids, mask), _theirs(reloaded.eval(), ids, mask)
  _close(np.asarray(a.logits), b.logits)
  saved = json.loads((out / "config.json").read_text())
  assert saved["model_type"] == "modernbert" and saved["architectures"] == [HF_CLASSES[task]]
  assert reloaded.config.layer_types == hf.config.layer_types
  assert reloaded.config.sliding_window == hf.config.sliding_window


def test_import_of_another_task_initialises_the_head(hf_folders, caplog):
  _, folder = hf_folders("a", "mlm")
  model, params = bert_jax.from_pretrained(folder, task="token_classification")
  assert modernbert.task_of(model) == "token_classification"
  assert "newly initialised" in caplog.text and "classifier" in params


@pytest.fixture(scope="module")
def tiny():
  """A tiny random MLM (local window 8 over 24 tokens) and its params."""
  config = ModernBertConfig.preset("tiny", vocab_size=64, num_layers=3, local_attention=8,
                                   global_attn_every_n_layers=2, norm_bias=True)
  model = modernbert.build(config, "mlm")
  params = flax.linen.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
  return model, params["params"]


def test_packed_segments_equal_each_sequence_alone(tiny):
  model, params = tiny
  rng = np.random.RandomState(1)
  a, b = rng.randint(1, 64, 14), rng.randint(1, 64, 10)
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 14 + [2] * 10])
  positions = np.array([list(range(14)) + list(range(10))])
  run = jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, encoder_segment_ids=s,
                                               encoder_positions=q)["mlm_logits"])
  both = np.asarray(run(params, packed, segments, positions))
  for tokens, span in ((a, slice(0, 14)), (b, slice(14, 24))):
    alone = model.apply({"params": params}, tokens[None].astype(np.int32))["mlm_logits"]
    np.testing.assert_allclose(both[:, span], alone, atol=1e-5)


def test_sharded_run_equals_unsharded_and_every_param_is_named(tiny):
  model, params = tiny
  ids, mask = _batch()
  ids, mask = ids[[0, 1, 2, 0]] % 64, mask[[0, 1, 2, 0]]  # batch 4: data x fsdp
  assert_sharded_equals_unsharded(
      model, params, (jnp.asarray(ids, jnp.int32),),
      {"encoder_mask": jnp.asarray(mask, jnp.int32)}, pick=lambda out: out["mlm_logits"])


def test_dropout_runs_and_changes_outputs(tiny):
  model, params = tiny
  config = ModernBertConfig.from_dict({**{f: getattr(model.config, f) for f in
                                          model.config.__dataclass_fields__},
                                       "attention_dropout": 0.1, "mlp_dropout": 0.1,
                                       "embedding_dropout": 0.1, "remat": True})
  dropped = modernbert.build(config, "mlm")
  ids = jnp.ones((2, 12), jnp.int32)
  a = dropped.apply({"params": params}, ids, enable_dropout=True,
                    rngs={"dropout": jax.random.key(1)})["mlm_logits"]
  b = dropped.apply({"params": params}, ids)["mlm_logits"]
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)


def test_bad_config_is_a_one_line_error_naming_the_field():
  with pytest.raises(ValueError, match=r"^ModernBertConfig\.local_attention: .*got 0$"):
    ModernBertConfig.preset("tiny", local_attention=0)
  with pytest.raises(ValueError, match=r"ModernBertConfig\.classifier_pooling"):
    ModernBertConfig.preset("tiny", classifier_pooling="max")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\]"):
    models.model_config("modernbert", "tiny", hiden_size=3)


def test_family_registry_and_presets():
  family = models.get("modernbert")
  assert set(family.tasks) == set(modernbert.TASKS)
  base, large = family.preset("base"), family.preset("large")
  assert (base.num_layers, base.hidden_size, base.intermediate_size) == (22, 768, 1152)
  assert (large.num_layers, large.hidden_size, large.intermediate_size) == (28, 1024, 2624)
  assert family.positions(base) == 8192
  assert models.family_of(family.build(family.preset("tiny"), "mlm")) is family
  assert family.train_flops(base, {"encoder_input_tokens": (1, 1024),
                                   "mlm_positions": (1, 307)}, "mlm") > 0


def test_glue_finetuning_starts_from_a_hugging_face_folder(shared_data, tmp_path):
  """A few SST-2 steps from a random transformers ModernBertForMaskedLM folder: the
  encoder carries over, the new head trains, the loss falls and predict writes labels."""
  from bert_jax import defaults, finetune
  from bert_jax.tasks import glue
  import re
  rows = glue.read_tsv(str(shared_data), "sst2", "train")[:32]
  words = sorted({w for e in rows for w in re.findall(r"\w+|[^\w\s]", e.text_a.lower())})
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                          + words) + "\n")
  torch.manual_seed(0)
  model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
      **dict(CONFIGS["a"], vocab_size=5 + len(words), initializer_range=0.2), pad_token_id=0,
      bos_token_id=None, eos_token_id=None, cls_token_id=2, sep_token_id=3,
      attn_implementation="eager"))
  model.save_pretrained(hf)
  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "family": "modernbert", "glue_task": "sst2", "init_from": str(hf),
      "data.data_dir": str(shared_data), "data.max_train_examples": 32,
      "data.max_eval_examples": 16, "data.max_length": 32, "data.pad_multiple": 16,
      "train.batch_size": 16, "eval.batch_size": 16, "train.num_epochs": 4,
      "optim.learning_rate": 3e-3, "optim.warmup_steps": 0,
      "checkpoint.every_epochs": 100, "log.every_steps": 1, "log.progress": False,
      "data.predict_split": "dev"})
  workdir = tmp_path / "run"
  finetune.finetune(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.02, losses
  assert any("eval/dev/accuracy" in r for r in records)
  lines = open(finetune.predict(config, str(workdir))).read().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 17
