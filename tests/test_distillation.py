"""Distillation (DistilBERT): the losses, the student + frozen teacher model, and runs.

The Hugging Face DistilBERT import/export is in test_convert_distilbert.py.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import defaults
from bert_jax import init_from
from bert_jax import losses
from bert_jax import objectives
from bert_jax import recipe
from bert_jax import train
from bert_jax.models import bert
from bert_jax.models import configs
from bert_jax.models import distillation
from conftest import tiny_pretraining_config

VOCAB = 50
TEACHER = configs.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=2,
                             intermediate_size=64, max_position_embeddings=32)
STUDENT = configs.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, max_position_embeddings=32)


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(5, VOCAB, (2, 10)).astype(np.int32)
  tokens[1, 7:] = 0
  positions = np.array([[1, 4, 0], [2, 3, 5]], np.int32)
  weights = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  return dict(encoder_input_tokens=tokens, mlm_positions=positions,
              mlm_targets=np.take_along_axis(tokens, positions, 1), mlm_weights=weights)


def test_every_other_layer_is_distilberts_choice():
  assert distillation.every_other_layer(12, 6) == [0, 2, 4, 7, 9, 11]  # the reference's
  assert distillation.every_other_layer(4, 2) == [0, 3]
  assert distillation.every_other_layer(2, 1) == [0]
  assert distillation.every_other_layer(3, 3) == [0, 1, 2]
  assert distillation.every_other_layer(4, 3) == [0, 2, 3]  # 1.5 rounds up
  assert distillation.every_other_layer(24, 12) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
  with pytest.raises(ValueError, match="a student needs 1 to 4 layers"):
    distillation.every_other_layer(4, 5)


def test_kl_at_temperature_2_against_numpy():
  rng = np.random.RandomState(0)
  s = rng.normal(size=(3, 7)).astype(np.float32) * 2
  t = rng.normal(size=(3, 7)).astype(np.float32) * 2
  w = np.array([1.0, 1.0, 0.0], np.float32)
  loss, metrics = losses.distillation_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w),
                                         temperature=2.0)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(t.astype(np.float64) / 2), softmax(s.astype(np.float64) / 2)
  kl = (p * (np.log(p) - np.log(q))).sum(-1) * 4.0  # T^2 = 4
  assert float(loss) == pytest.approx((w * kl).sum() / w.sum(), rel=1e-5)
  assert float(metrics["kd/count"]) == 2
  agree = (s.argmax(-1) == t.argmax(-1)).astype(np.float32)
  assert float(metrics["kd/correct"]) == (w * agree).sum()
  # Identical distributions: zero loss.
  same, _ = losses.distillation_kl(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w),
                                   temperature=2.0)
  assert abs(float(same)) < 1e-6


def test_cosine_loss_against_numpy():
  rng = np.random.RandomState(1)
  s, t = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, _ = losses.cosine_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                               jnp.asarray(w))
  cos = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
  assert float(loss) == pytest.approx((w * (1 - cos)).sum() / w.sum(), rel=1e-5)
  with pytest.raises(ValueError, match="one hidden size"):
    losses.cosine_loss(jnp.ones((1, 2, 4)), jnp.ones((1, 2, 8)), jnp.ones((1, 2)))


@pytest.fixture(scope="module")
def model_and_params():
  model = bert.build(STUDENT, "distillation", teacher=TEACHER)
  params = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 4), jnp.int32))["params"])(
      jax.random.PRNGKey(0))
  return model, jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                             is_leaf=lambda x: hasattr(x, "value"))


def test_teacher_is_a_frozen_constant_of_the_loss(model_and_params):
  model, params = model_and_params
  assert set(params) == {"encoder", "mlm", "teacher"}
  assert set(params["teacher"]["encoder"]) == {"embeddings"} | {f"layer_{i}" for i in range(4)}
  assert "layer_2" not in params["encoder"]
  batch = _batch()
  objective = objectives.get("distillation")

  def loss(p, key):
    out = model.apply({"params": p}, **{k: batch[k] for k in ("encoder_input_tokens",
                                                              "mlm_positions")},
                      enable_dropout=True, rngs={"dropout": key})
    return objective.loss(objective.metrics(out, batch), objective.normalizers(batch)), out

  grads = jax.grad(lambda p: loss(p, jax.random.PRNGKey(1))[0])(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["teacher"])) == 0.0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["encoder"])) > 0
  # The teacher runs without dropout: the same targets under any dropout key.
  _, a = loss(params, jax.random.PRNGKey(1))
  _, b = loss(params, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a["teacher_mlm_logits"], b["teacher_mlm_logits"])
  assert not np.allclose(a["mlm_logits"], b["mlm_logits"])


def test_objective_is_5_kd_plus_2_mlm_plus_cos(model_and_params):
  model, params = model_and_params
  batch = _batch(seed=3)
  objective = objectives.get("distillation")
  out = model.apply({"params": params}, batch["encoder_input_tokens"],
                    mlm_positions=batch["mlm_positions"])
  total = float(objective.loss(objective.metrics(out, batch), objective.normalizers(batch)))
  kd, _ = losses.distillation_kl(out["mlm_logits"], out["teacher_mlm_logits"],
                                 batch["mlm_weights"], temperature=2.0)
  mlm, _ = losses.mlm_loss(out["mlm_logits"], batch)
  real = (batch["encoder_input_tokens"] != 0).astype(np.float32)
  cos, _ = losses.cosine_loss(out["hidden"], out["teacher_hidden"], real)
  assert total == pytest.approx(5 * float(kd) + 2 * float(mlm) + float(cos), rel=1e-5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A 2-layer BERT-tiny pretraining workdir (3 steps): the teacher of the runs below."""
  path = tmp_path_factory.mktemp("teacher")
  config = tiny_pretraining_config(num_steps=3)
  config.model.num_layers = 2
  train.train_and_evaluate(config, str(path))
  return path


def _distil_config(teacher, num_steps):
  config = tiny_pretraining_config(num_steps=num_steps)
  config.train.objective = "distillation"
  config.train.teacher = str(teacher)
  # DistilBERT's student: no token types, exported as Hugging Face DistilBert*.
  config.model.update(num_layers=1, model_type="distilbert", type_vocab_size=0)
  config.optim.warmup_steps = 1
  return config


def test_distillation_run_keeps_the_teacher_frozen_and_finetunes_from_the_student(
    shared_data, teacher_dir, tmp_path):
  teacher = init_from.load(str(teacher_dir), "bert", "float32", *_mesh_and_rules(),
                           lower_case=True)
  config = _distil_config(teacher_dir, num_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "student"))
  lines = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl",
                                             encoding="utf-8")]
  assert [r["step"] for r in lines] == [1, 2]
  for r in lines:
    count = r["train/mlm/count"]
    mlm = r["train/mlm/loss"] * count / (count + losses.MLM_DENOMINATOR_EPS)
    assert r["loss"] == pytest.approx(5 * r["train/kd/loss"] + 2 * mlm + r["train/cos/loss"],
                                      rel=1e-4)
    assert r["train/kd/loss"] > 0 and 0 <= r["train/kd/accuracy"] <= 1

  # The saved state: the teacher unchanged and without optimizer state.
  saved = init_from.restore_workdir(str(tmp_path / "student"), "bert", "float32",
                                    *_mesh_and_rules())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.params["teacher"]["encoder"]),
               jax.device_get(teacher.params["encoder"]))
  model = recipe.build_model(init_from.pretraining_config(str(tmp_path / "student"))[2])
  from bert_jax import steps  # pylint: disable=import-outside-toplevel
  tx, _ = recipe.make_optimizer(init_from.pretraining_config(str(tmp_path / "student"))[2],
                                model, steps.init_shapes(("encoder_input_tokens",)))
  opt_shapes = jax.eval_shape(tx.init, steps.param_shapes(model, steps.init_shapes(
      ("encoder_input_tokens",))))
  paths = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(opt_shapes)[0]]
  assert any("encoder" in p for p in paths) and not any("teacher" in p for p in paths)
  assert not np.array_equal(saved.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"],
                            teacher.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"])

  # The student exports as a Hugging Face DistilBertForMaskedLM with the same logits.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  student_cfg = configs.BertConfig.from_dict(
      init_from.pretraining_config(str(tmp_path / "student"))[2].model.to_dict())
  student = bert.build(student_cfg, "mlm")
  student_params = {"encoder": saved.params["encoder"], "mlm": saved.params["mlm"]}
  bert_jax.save_pretrained(student, jax.device_get(student_params), tmp_path / "hf")
  hf = transformers.DistilBertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
  ids = np.array([[2, 17, 40, 9, 3, 0]], np.int64)
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy((ids != 0).astype(np.int64))).logits.numpy()
  ours = student.apply({"params": student_params}, jnp.asarray(ids, jnp.int32))["mlm_logits"]
  np.testing.assert_allclose(np.asarray(ours)[:, :5], theirs[:, :5], atol=1e-4)

  # Fine-tuning from the distillation workdir takes the 1-layer student.
  from bert_jax import finetune  # pylint: disable=import-outside-toplevel
  ft = defaults.finetune_config()
  ft.update_from_flattened_dict({"init_from": str(tmp_path / "student"),
                                 "data.data_dir": str(shared_data), "data.max_length": 32})
  run = finetune._setup(ft)  # pylint: disable=protected-access
  assert run.model.config.num_layers == 1 and set(run.pretrained) == {"encoder"}
  np.testing.assert_array_equal(run.pretrained["encoder"]["layer_0"]["mlp"]["wi"]["kernel"],
                                saved.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"])


def _mesh_and_rules():
  from bert_jax import sharding  # pylint: disable=import-outside-toplevel
  return sharding.make_mesh(), sharding.get_rules("data_parallel")


def test_student_starts_from_every_other_teacher_layer(teacher_dir):
  """The fresh state (before any update): student layer i = teacher layer every_other_layer[i]."""
  teacher = init_from.load(str(teacher_dir), "bert", "float32", *_mesh_and_rules(),
                           lower_case=True)
  from bert_jax import steps  # pylint: disable=import-outside-toplevel
  from bert_jax import models  # pylint: disable=import-outside-toplevel
  student = configs.BertConfig(**dict(teacher.config.__dict__, num_layers=1))
  model = bert.build(student, "distillation", teacher=teacher.config)
  shapes = steps.init_shapes(("encoder_input_tokens",))
  mesh, rules = _mesh_and_rules()
  import optax  # pylint: disable=import-outside-toplevel
  state, shardings = steps.create_sharded_state(model, optax.sgd(0.1), shapes, mesh, rules, 0)
  params = init_from.distillation_params(state.params, teacher, shardings.params,
                                         models.get("bert"), 1)
  t = teacher.params
  jax.tree.map(np.testing.assert_array_equal, params["encoder"]["layer_0"], t["encoder"]["layer_0"])
  jax.tree.map(np.testing.assert_array_equal, params["encoder"]["embeddings"],
               t["encoder"]["embeddings"])
  jax.tree.map(np.testing.assert_array_equal, params["mlm"], t["mlm"])
  jax.tree.map(np.testing.assert_array_equal, params["teacher"]["encoder"], t["encoder"])


def test_config_errors_name_the_field(teacher_dir, tmp_path):
  config = tiny_pretraining_config(num_steps=1)
  config.train.objective = "distillation"
  with pytest.raises(ValueError, match="config.train.teacher: the 'distillation' objective "
                                       "distils a teacher"):
    train.validate(config)
  both = _distil_config("/some/teacher", num_steps=2)
  both.init_from = "/some/checkpoint"
  with pytest.raises(ValueError, match="config.init_from: '/some/checkpoint': a distillation "
                                       "student starts from its teacher's layers"):
    train.validate(both)
  plain = tiny_pretraining_config(num_steps=1)
  plain.train.teacher = "/some/teacher"
  with pytest.raises(ValueError, match="config.train.teacher: '/some/teacher': the 'mlm' "
                                       "objective has no teacher"):
    train.validate(plain)
  wide = _distil_config(teacher_dir, num_steps=2)
  wide.model.hidden_size = 64
  wide.model.num_heads = 1
  with pytest.raises(ValueError, match=r"config.model.hidden_size: the student starts from the "
                                       r"teacher's layers .*hidden_size=64 here, 128 in the "
                                       r"teacher"):
    train.train_and_evaluate(wide, str(tmp_path / "wide"))
  assert not os.path.exists(tmp_path / "wide" / "checkpoints" / "1")


def test_a_hugging_face_teacher_folder(teacher_dir, tmp_path):
  """A transformers BertForMaskedLM folder teaches; a folder without an MLM head is refused."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from conftest import random_hf_folder  # pylint: disable=import-outside-toplevel
  saved = init_from.pretraining_config(str(teacher_dir))[2]
  shape = dict(vocab_size=saved.model.vocab_size, hidden_size=128, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=512, max_position_embeddings=32)
  torch.manual_seed(0)
  _, folder = random_hf_folder(transformers.BertForMaskedLM(transformers.BertConfig(**shape)),
                               tmp_path / "hf_teacher")
  config = _distil_config(folder, num_steps=2)
  config.data.tokenizer = init_from.pretraining_tokenizer(str(teacher_dir))[0]
  train.train_and_evaluate(config, str(tmp_path / "student"))
  student = init_from.restore_workdir(str(tmp_path / "student"), "bert", "float32",
                                      *_mesh_and_rules())
  _, theirs = bert_jax.from_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(student.params["teacher"]["encoder"]["layer_1"]),
               jax.device_get(theirs["encoder"]["layer_1"]))

  _, bare = random_hf_folder(transformers.BertModel(transformers.BertConfig(**shape)),
                             tmp_path / "hf_bare")
  with pytest.raises(ValueError, match=r"config.train.teacher: .*hf_bare has no MLM head"):
    train.train_and_evaluate(_distil_config(bare, num_steps=2), str(tmp_path / "bare"))

