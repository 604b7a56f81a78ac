"""DeBERTa-v2/v3: parity with Hugging Face transformers (PyTorch, CPU), export, sharding,
fine-tuning from an exported folder.

Randomly initialised transformers DebertaV2* models in four configurations
(v3-style: shared position projections, 8 log buckets over +-32, LayerNorm on
the relative table; v2-style: separate pos_key/pos_query projections, no
buckets and a relative range of 12 shorter than the input, absolute
positions and token types; c2p only; v3 plus v2-xlarge's ConvLayer, kernel
3, gelu, also with 2 channel groups and tanh), weights drawn at std 0.3 so the
relative terms move the outputs, with padding in the batch; outputs compared
at max abs diff <= 1e-4 on real tokens.
"""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import models
from bert_jax.convert import hf as hf_io
from bert_jax.models import deberta
from bert_jax.models.deberta_config import DebertaConfig
from conftest import assert_sharded_equals_unsharded, random_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
LENGTH = 24
CONFIGS = {
    "v3": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=48, relative_attention=True, pos_att_type=["p2c", "c2p"],
               share_att_key=True, position_buckets=8, max_relative_positions=32,
               norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
               max_position_embeddings=64),
    "v2": dict(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=40, relative_attention=True, pos_att_type="c2p|p2c",
               share_att_key=False, position_buckets=-1, max_relative_positions=12,
               position_biased_input=True, type_vocab_size=2, hidden_act="gelu_new",
               pooler_hidden_act="relu", max_position_embeddings=64),
    "c2p": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=32, relative_attention=True, pos_att_type=["c2p"],
                share_att_key=False, position_buckets=16, max_relative_positions=-1,
                norm_rel_ebd="layer_norm", position_biased_input=False,
                max_position_embeddings=40),
}
# v3's sizes, so its ops compiled already serve most of this one's (see _apply).
CONFIGS["conv"] = dict(CONFIGS["v3"], conv_kernel_size=3, conv_act="gelu")
HF_CLASSES = {
    "encoder": "DebertaV2Model", "mlm": "DebertaV2ForMaskedLM",
    "sequence_classification": "DebertaV2ForSequenceClassification",
    "token_classification": "DebertaV2ForTokenClassification",
    "question_answering": "DebertaV2ForQuestionAnswering",
}


def _batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 99, (3, LENGTH))
  ids[1, 17:] = 0
  ids[2, 6:] = 0
  types = (np.arange(LENGTH)[None] >= 10).astype(np.int64).repeat(3, 0)
  return ids, (ids != 0).astype(np.int64), types


def _hf_config(name, **extra):
  fields = {**CONFIGS[name], **extra}
  return transformers.DebertaV2Config(**fields, pad_token_id=0, initializer_range=0.3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """(config name, task, extra fields) -> (HF model in eval mode, its saved folder)."""
  cache = {}

  def get(name, task, **extra):
    key = (name, task, tuple(sorted(extra.items())))
    if key not in cache:
      torch.manual_seed(len(cache))
      cls = getattr(transformers, HF_CLASSES[task])
      model = cls(_hf_config(name, **extra)).eval()
      folder = tmp_path_factory.mktemp(f"{name}_{task}")
      cache[key] = random_hf_folder(model, folder)
    return cache[key]
  return get


def _theirs(model, ids, mask, types):
  with torch.no_grad():
    kwargs = {"token_type_ids": torch.tensor(types)} if model.config.type_vocab_size else {}
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)


def _close(ours, theirs, mask=None):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape
  if mask is not None:
    ours, theirs = ours[mask > 0], theirs[mask > 0]
  diff = float(np.abs(ours - theirs).max())
  print(f"max abs diff {diff:.2e}")  # shown with pytest -s / -rP
  assert diff <= ATOL, diff
  return diff


def _apply(model, params, ids, mask, types=None, **kw):
  """Op by op, not jitted: the ops compiled for one config serve its every head and test,
  where each jit would compile the whole model again (seconds each on a small CPU)."""
  types = np.zeros_like(ids) if types is None else types
  return model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                     encoder_mask=jnp.asarray(mask, jnp.int32),
                     encoder_type_ids=jnp.asarray(types, jnp.int32), **kw)


def _compare(task, out, ref, mask):
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


def test_log_buckets_match_transformers():
  from transformers.models.deberta_v2 import modeling_deberta_v2 as ref
  rel = np.arange(-300, 301)[None] - np.zeros((1, 1), np.int64)
  for buckets, max_pos in ((8, 32), (256, 512), (16, 40)):
    theirs = ref.make_log_bucket_position(torch.tensor(rel), buckets, max_pos).long().numpy()
    np.testing.assert_array_equal(deberta.log_bucket_position(rel, buckets, max_pos), theirs)


@pytest.mark.parametrize("name, task, extra", [
    ("v3", "encoder", {}), ("v3", "mlm", {"legacy": False}), ("v3", "mlm", {"legacy": True}),
    ("v3", "sequence_classification", {}), ("v3", "token_classification", {}),
    ("v3", "question_answering", {}),
    ("v2", "encoder", {}), ("v2", "mlm", {"legacy": False}),
    ("v2", "sequence_classification", {"num_labels": 3}), ("v2", "token_classification", {}),
    ("c2p", "encoder", {}), ("conv", "mlm", {"legacy": False}),
    ("conv", "token_classification", {"conv_groups": 2, "conv_act": "tanh"})])
def test_parity_with_transformers(hf_folders, name, task, extra):
  hf, folder = hf_folders(name, task, **extra)
  ids, mask, types = _batch()
  model, params = bert_jax.from_pretrained(folder)
  assert deberta.task_of(model) == task
  _compare(task, _apply(model, params, ids, mask, types), _theirs(hf, ids, mask, types), mask)


def test_relative_terms_matter(hf_folders):
  """The parity above is not won by tiny position terms: dropping them changes the output."""
  _, folder = hf_folders("v3", "encoder")
  model, params = bert_jax.from_pretrained(folder)
  ids, mask, _ = _batch()
  plain = deberta.build(DebertaConfig.from_dict(
      {**_fields(model.config), "pos_att_type": ()}), "encoder")
  a = np.asarray(_apply(model, params, ids, mask)[0])
  b = np.asarray(_apply(plain, params, ids, mask)[0])
  assert np.abs(a - b)[mask > 0].max() > 0.05


def _fields(cfg):
  return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_gathered_mlm_positions_match_full_logits(hf_folders):
  _, folder = hf_folders("v3", "mlm", legacy=False)
  model, params = bert_jax.from_pretrained(folder)
  ids, mask, _ = _batch()
  positions = np.array([[0, 5, 20], [1, 2, 16], [0, 3, 5]], np.int32)
  full = _apply(model, params, ids, mask)["mlm_logits"]
  gathered = _apply(model, params, ids, mask, mlm_positions=positions)["mlm_logits"]
  expected = np.take_along_axis(np.asarray(full), positions[:, :, None], axis=1)
  np.testing.assert_allclose(gathered, expected, atol=1e-5)


@pytest.mark.parametrize("name, task, extra", [
    ("v3", "mlm", {"legacy": True}), ("v2", "sequence_classification", {"num_labels": 3}),
    ("v2", "token_classification", {}), ("v3", "question_answering", {}),
    ("conv", "token_classification", {"conv_groups": 2, "conv_act": "tanh"})])
def test_export_round_trip_reloads_in_transformers(hf_folders, tmp_path, name, task, extra):
  hf, folder = hf_folders(name, task, **extra)
  model, params = bert_jax.from_pretrained(folder)
  out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  cls = getattr(transformers, HF_CLASSES[task])
  reloaded, info = cls.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  reloaded.eval()
  ids, mask, types = _batch()
  a, b = _theirs(hf, ids, mask, types), _theirs(reloaded, ids, mask, types)
  logits = "start_logits" if task == "question_answering" else "logits"
  _close(np.asarray(getattr(a, logits)), getattr(b, logits),
         None if task == "sequence_classification" else mask)
  saved = json.loads((out / "config.json").read_text())
  assert saved["model_type"] == "deberta-v2" and saved["architectures"] == [HF_CLASSES[task]]
  # And back into bert_jax: the same params.
  _, again = bert_jax.from_pretrained(out)
  for (path, x), (_, y) in zip(flax.traverse_util.flatten_dict(params).items(),
                               flax.traverse_util.flatten_dict(again).items()):
    np.testing.assert_array_equal(x, y, err_msg="/".join(path))


def test_import_of_another_task_initialises_the_head(hf_folders, caplog):
  _, folder = hf_folders("v3", "mlm", legacy=False)
  model, params = bert_jax.from_pretrained(folder, task="sequence_classification")
  assert deberta.task_of(model) == "sequence_classification"
  assert "newly initialised" in caplog.text and "classifier" in params and "pooler" in params


def test_unsupported_options_are_refused_naming_the_field(hf_folders, tmp_path):
  _, folder = hf_folders("v3", "encoder")
  config = json.loads((folder / "config.json").read_text())
  state = hf_io.load_state_dict(folder)
  convert = models.get("deberta").converter()
  for field, value in (("conv_kernel_size", 2), ("embedding_size", 16),
                       ("norm_rel_ebd", "layer_norm|conv")):
    with pytest.raises(hf_io.CheckpointError, match=field):
      convert.load_hf({**config, field: value}, state)
  with pytest.raises(hf_io.CheckpointError, match="conv_act"):
    convert.load_hf({**config, "conv_kernel_size": 3, "conv_act": "sigmoid"}, state)


def test_conv_layer_matters(hf_folders):
  """The ConvLayer's parity is not won by a negligible term: without it the output moves."""
  _, folder = hf_folders("conv", "mlm", legacy=False)
  model, params = bert_jax.from_pretrained(folder)
  ids, mask, _ = _batch()
  plain = deberta.build(DebertaConfig.from_dict(
      {**_fields(model.config), "conv_kernel_size": 0}), "mlm")
  encoder = {k: v for k, v in params["encoder"].items() if k != "conv"}
  a = np.asarray(_apply(model, params, ids, mask)["mlm_logits"])
  b = np.asarray(_apply(plain, {**params, "encoder": encoder}, ids, mask)["mlm_logits"])
  assert np.abs(a - b)[mask > 0].max() > 0.05


@pytest.fixture(scope="module")
def tiny(hf_folders):
  """The "conv" MLM (v3 + ConvLayer) as bert_jax loads it: its ops are compiled already
  (see _apply), and packing and sharding are checked through the convolution too."""
  model, params = bert_jax.from_pretrained(hf_folders("conv", "mlm", legacy=False)[1])
  assert "conv" in params["encoder"]
  return model, params


def test_packed_segments_equal_each_sequence_alone(tiny):
  model, params = tiny
  rng = np.random.RandomState(1)
  a, b = rng.randint(1, 99, 14), rng.randint(1, 99, 10)
  pad = lambda x: np.pad(x, (0, LENGTH - len(x)))  # noqa: E731
  # Row 0 packs a and b; rows 1 and 2 hold each alone, padded.
  tokens = np.stack([np.concatenate([a, b]), pad(a), pad(b)]).astype(np.int32)
  segments = np.stack([[1] * 14 + [2] * 10, pad([1] * 14), pad([1] * 10)]).astype(np.int32)
  positions = np.stack([list(range(14)) + list(range(10)), range(LENGTH), range(LENGTH)])
  out = np.asarray(model.apply({"params": params}, tokens, encoder_segment_ids=segments,
                               encoder_positions=positions.astype(np.int32))["mlm_logits"])
  np.testing.assert_allclose(out[0, :14], out[1, :14], atol=1e-5)
  np.testing.assert_allclose(out[0, 14:], out[2, :10], atol=1e-5)


def test_sharded_run_equals_unsharded_and_every_param_is_named(tiny):
  model, params = tiny
  ids, mask, _ = _batch()
  ids, mask = ids[[0, 1, 2, 0]], mask[[0, 1, 2, 0]]  # batch 4: data x fsdp
  assert_sharded_equals_unsharded(
      model, params, (jnp.asarray(ids, jnp.int32),),
      {"encoder_mask": jnp.asarray(mask, jnp.int32)}, pick=lambda out: out["mlm_logits"])


def test_dropout_and_remat_run_and_dropout_changes_outputs(tiny):
  model, params = tiny
  config = DebertaConfig.from_dict({**_fields(model.config), "remat": True, "num_layers": 1,
                                    "hidden_dropout": 0.1, "attention_dropout": 0.1})
  params = {**params, "encoder": {k: v for k, v in params["encoder"].items() if k != "layer_1"}}
  dropped = deberta.build(config, "mlm")
  ids = jnp.ones((2, 12), jnp.int32)

  def logits(p, dropout):
    return dropped.apply({"params": p}, ids, enable_dropout=dropout,
                         rngs={"dropout": jax.random.key(1)})["mlm_logits"]

  @jax.jit
  def run(p):  # one compile: the gradient through remat + dropout, and both outputs
    grads = jax.grad(lambda q: logits(q, True).sum())(p)
    return grads, logits(p, True), logits(p, False)

  grads, a, b = run(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)


def test_bad_config_is_a_one_line_error_naming_the_field():
  with pytest.raises(ValueError, match=r"^DebertaConfig\.pos_att_type: "):
    DebertaConfig.preset("tiny", pos_att_type=("c2c",))
  with pytest.raises(ValueError, match=r"^DebertaConfig\.position_buckets: "):
    DebertaConfig.preset("tiny", position_buckets=256, max_relative_positions=64)
  with pytest.raises(ValueError, match=r"^DebertaConfig\.norm_rel_ebd: "):
    DebertaConfig.preset("tiny", norm_rel_ebd="rms")
  for field, value in (("conv_kernel_size", 2), ("conv_groups", 3), ("conv_act", "sigmoid")):
    with pytest.raises(ValueError, match=rf"^DebertaConfig\.{field}: "):
      DebertaConfig.preset("tiny", **{"conv_kernel_size": 3, field: value})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\]"):
    models.model_config("deberta", "tiny", hiden_size=3)


def test_family_registry_presets_and_flops():
  family = models.get("deberta")
  assert set(family.tasks) == set(deberta.TASKS)
  base, small = family.preset("base"), family.preset("small")
  assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size,
          base.vocab_size) == (12, 768, 12, 3072, 128100)
  assert (small.num_layers, small.hidden_size) == (6, 768)
  assert (base.position_buckets, base.relative_range, base.scale_factor) == (256, 512, 3)
  assert family.positions(base) == 512
  assert models.family_of(family.build(family.preset("tiny"), "mlm")) is family
  shapes = {"encoder_input_tokens": (1, 512), "mlm_positions": (1, 80)}
  with_rel = family.train_flops(base, shapes, "mlm")
  without = family.train_flops(DebertaConfig.preset("base", relative_attention=False),
                               shapes, "mlm")
  assert with_rel > without > 0
  # DeBERTa-v2's ConvLayer: 3 x (2 k H^2 / groups) per token, for training.
  conv = family.train_flops(DebertaConfig.preset("base", conv_kernel_size=3, conv_groups=2),
                            shapes, "mlm")
  assert conv - with_rel == pytest.approx(3 * 512 * 2 * 3 * 768 * 768 / 2, rel=1e-9)


@pytest.mark.slow
def test_finetune_glue_from_an_exported_folder(tmp_path):
  """SST-2-like rows, a SentencePiece spm.model, a random exported DeBERTa folder: the
  fine-tuning loop builds the family's classifier from it and the loss falls."""
  from bert_jax import defaults, finetune
  from bert_jax.data import tokenizer as tokenizer_lib
  rng = np.random.RandomState(0)
  good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
  rows = [(" ".join(rng.choice(good if y else bad, 3)) + " film", y)
          for y in rng.randint(0, 2, 32)]
  glue_dir = tmp_path / "SST-2"
  glue_dir.mkdir()
  for split in ("train", "dev"):
    (glue_dir / f"{split}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
  hf = tmp_path / "hf"
  hf.mkdir()
  texts = [t for t, _ in rows] * 4 + ["the a movie was very quite not so"] * 4
  tok = tokenizer_lib.train_sentencepiece(iter(texts), str(hf / "spm"), 22, extra_ids=0,
                                          bert_special_tokens=True, model_type="word")
  config_model = DebertaConfig.preset("tiny", vocab_size=tok.vocab_size + 100, num_layers=1,
                                      hidden_size=32,
                                      num_heads=2, intermediate_size=64, position_buckets=8,
                                      max_relative_positions=32, max_position_embeddings=64,
                                      hidden_dropout=0.0, attention_dropout=0.0)
  encoder = deberta.build(config_model, "encoder")
  params = flax.linen.unbox(encoder.init(jax.random.key(1), jnp.ones((1, 8), jnp.int32)))
  bert_jax.save_pretrained(encoder, params["params"], hf)

  config = defaults.finetune_config()
  config.family = "deberta"
  config.model = models.model_config("deberta", "tiny")
  config.update_from_flattened_dict({
      "task": "glue", "glue_task": "sst2", "init_from": str(hf),
      "data.tokenizer": str(hf / "spm.model"), "data.data_dir": str(tmp_path),
      "data.max_length": 16, "data.padding": "max", "train.batch_size": 16,
      "eval.batch_size": 16, "train.num_epochs": 3, "optim.learning_rate": 3e-3,
      "checkpoint.every_epochs": 100, "log.every_steps": 1, "log.progress": False})
  scores = finetune.finetune(config, str(tmp_path / "run"))
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  assert "eval/dev/accuracy" in scores
