"""ELECTRA: the joint generator + discriminator, its losses and sampling, and training runs.

The Hugging Face import/export of both models is in test_convert_electra.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import losses
from bert_jax import objectives
from bert_jax import train
from bert_jax.models import bert
from bert_jax.models import configs
from bert_jax.models import electra
from bert_jax.models import flops
from conftest import sgd_step_on_mesh, tiny_pretraining_config

VOCAB = 64
# Discriminator 32 wide with 16-wide tables; generator 8 wide (1/4), projected from 16.
TINY = configs.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, embedding_size=16, model_type="electra",
                          generator_size=0.25, max_position_embeddings=32)


def _batch(seed=0, batch=3, length=12, slots=4):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(5, VOCAB, (batch, length)).astype(np.int32)
  tokens[-1, length - 3:] = 0  # padding in the last row
  positions = np.stack([np.sort(rng.choice(np.arange(1, length - 3), slots, replace=False))
                        for _ in range(batch)]).astype(np.int32)
  weights = np.ones((batch, slots), np.float32)
  weights[0, -1] = 0.0  # a padding slot
  positions[0, -1] = 0
  targets = np.take_along_axis(tokens, positions, 1)
  tokens = tokens.copy()
  np.put_along_axis(tokens, positions, 4, 1)  # [MASK]
  tokens[0, 0] = 2  # [CLS] at the padding slot's position 0 must stay
  return dict(encoder_input_tokens=tokens, mlm_positions=positions, mlm_targets=targets,
              mlm_weights=weights)


@pytest.fixture(scope="module")
def model_and_params():
  model = bert.build(TINY, "electra")
  params = jax.jit(lambda k: model.init({"params": k},
                                        jnp.zeros((1, 4), jnp.int32))["params"])(
                                            jax.random.PRNGKey(0))
  return model, jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                             is_leaf=lambda x: hasattr(x, "value"))


def test_generator_config_follows_the_reference():
  small = configs.generator_config(configs.BertConfig(
      hidden_size=256, num_heads=4, intermediate_size=1024, embedding_size=128))
  assert (small.hidden_size, small.num_heads, small.intermediate_size, small.num_layers,
          small.embedding_size) == (64, 1, 256, 12, 128)
  base = configs.generator_config(configs.BertConfig(generator_size=1 / 3))
  assert (base.hidden_size, base.num_heads, base.intermediate_size, base.embedding_size) == (
      256, 4, 1024, 768)
  # Tables as wide as the generator: no projection.
  same = configs.generator_config(configs.BertConfig(hidden_size=256, num_heads=4,
                                                     embedding_size=64))
  assert same.embedding_size == 0 and same.hidden_size == 64
  with pytest.raises(ValueError, match="generator_size=0.26 makes a generator 200 wide"):
    configs.generator_config(configs.BertConfig(generator_size=0.26, hidden_size=768))
  with pytest.raises(ValueError, match="generator_size must be in"):
    configs.BertConfig(generator_size=0.0)


def test_generator_reads_the_discriminators_tables(model_and_params):
  model, params = model_and_params
  # The generator stores only its projection and layers; one set of tables.
  assert set(params["generator"]) == {"embeddings", "layer_0", "layer_1"}
  assert set(params["generator"]["embeddings"]) == {"projection"}
  assert params["generator"]["embeddings"]["projection"]["kernel"].shape == (16, 8)
  assert params["generator"]["layer_0"]["mlp"]["wi"]["kernel"].shape == (8, 32)
  batch = _batch()
  out = model.apply({"params": params}, **batch)
  # Changing the shared word table changes the generator's logits (input and tied output).
  table = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  changed = jax.tree.map(lambda x: x, params)
  changed["encoder"]["embeddings"]["word_embeddings"]["embedding"] = table * 1.5
  out2 = model.apply({"params": changed}, **batch)
  assert not np.allclose(out["mlm_logits"], out2["mlm_logits"])
  assert out["mlm_logits"].shape == (3, 4, VOCAB)
  assert out["rtd_logits"].shape == out["rtd_labels"].shape == (3, 12)


def test_replace_tokens_labels_a_sample_equal_to_the_original_as_original():
  tokens = np.array([[2, 4, 9, 4, 3, 0]], np.int32)  # [CLS] [MASK] 9 [MASK] [SEP] pad
  positions = np.array([[1, 3, 0]], np.int32)  # last slot is padding (weight 0)
  weights = np.array([[1.0, 1.0, 0.0]], np.float32)
  targets = np.array([[7, 8, 0]], np.int32)
  sampled = np.array([[7, 11, 13]], np.int32)  # slot 0 equals its original
  corrupted, labels = electra.replace_tokens(tokens, positions, weights, targets, sampled)
  np.testing.assert_array_equal(corrupted, [[2, 7, 9, 11, 3, 0]])  # [CLS] untouched
  np.testing.assert_array_equal(labels, [[0, 0, 0, 1, 0, 0]])


def test_gumbel_sample_draws_from_the_softmax():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  draws = jax.vmap(lambda k: electra.gumbel_sample(logits, k))(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / draws.size
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # Temperature -> 0 approaches the argmax; a high one flattens the distribution.
  cold = jax.vmap(lambda k: electra.gumbel_sample(logits, k, temperature=0.05))(keys[:2000])
  assert np.mean(np.asarray(cold) == 0) > 0.99
  hot = jax.vmap(lambda k: electra.gumbel_sample(logits, k, temperature=100.0))(keys)
  assert abs(np.mean(np.asarray(hot) == 3) - 0.25) < 0.02


def test_rtd_loss_against_numpy():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(2, 5)).astype(np.float32) * 3
  labels = rng.randint(0, 2, (2, 5)).astype(np.int32)
  weights = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32)
  loss, metrics = losses.rtd_loss(jnp.asarray(logits), jnp.asarray(labels),
                                      jnp.asarray(weights))
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  assert float(loss) == pytest.approx((weights * ce).sum() / weights.sum(), rel=1e-5)
  pred = logits > 0
  summary = losses.summarize(jax.device_get(metrics))
  w = weights > 0
  assert summary["rtd/accuracy"] == pytest.approx(np.mean(pred[w] == labels[w]))
  tp = np.sum(pred[w] & (labels[w] == 1))
  assert summary["rtd/precision"] == pytest.approx(tp / np.sum(pred[w]))
  assert summary["rtd/recall"] == pytest.approx(tp / np.sum(labels[w] == 1))
  assert summary["rtd/positive_rate"] == pytest.approx(np.mean(labels[w]))
  # Large logits stay finite (no overflow in exp).
  big, _ = losses.rtd_loss(jnp.array([[80.0, -80.0]]), jnp.array([[0, 1]]),
                               jnp.ones((1, 2)))
  assert float(big) == pytest.approx(80.0, rel=1e-5)


def test_electra_objective_is_mlm_plus_50_rtd(model_and_params):
  model, params = model_and_params
  batch = _batch(seed=2)
  objective = objectives.get("electra")
  out = model.apply({"params": params}, **batch, rngs={"sample": jax.random.PRNGKey(5)})
  metrics = objective.metrics(out, batch)
  loss = float(objective.loss(metrics, objective.normalizers(batch)))
  mlm, _ = losses.mlm_loss(out["mlm_logits"], batch)
  real = (batch["encoder_input_tokens"] != 0).astype(np.float32)
  rtd, _ = losses.rtd_loss(out["rtd_logits"], out["rtd_labels"], real)
  assert loss == pytest.approx(float(mlm) + 50 * float(rtd), rel=1e-5)
  assert float(metrics["rtd/count"]) == real.sum() == 33
  # Labels: only the scored masked slots can be 'replaced'.
  labels = np.asarray(out["rtd_labels"])
  scored = np.zeros_like(labels)
  np.put_along_axis(scored, batch["mlm_positions"], batch["mlm_weights"] > 0, 1)
  assert labels[scored == 0].sum() == 0 and labels.sum() > 0


def test_no_gradient_reaches_the_generator_through_the_sample(model_and_params):
  model, params = model_and_params
  batch = _batch(seed=3)

  def term(name):
    def loss(p):
      out = model.apply({"params": p}, **batch, rngs={"sample": jax.random.PRNGKey(7)})
      if name == "rtd":
        real = (batch["encoder_input_tokens"] != 0).astype(jnp.float32)
        return losses.rtd_loss(out["rtd_logits"], out["rtd_labels"], real)[0]
      return losses.mlm_loss(out["mlm_logits"], batch)[0]
    return jax.grad(loss)(params)

  def largest(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))

  rtd = term("rtd")
  # The discriminator's loss moves the discriminator and the shared tables only.
  assert largest(rtd["generator"]) == 0.0 and largest(rtd["generator_mlm"]) == 0.0
  assert largest(rtd["encoder"]["layer_0"]) > 0 and largest(rtd["rtd"]) > 0
  assert largest(rtd["encoder"]["embeddings"]["word_embeddings"]) > 0
  # The generator learns from its own MLM loss, which never reaches the discriminator.
  mlm = term("mlm")
  assert largest(mlm["generator"]) > 0 and largest(mlm["generator_mlm"]) > 0
  assert largest(mlm["encoder"]["layer_0"]) == 0.0 and largest(mlm["rtd"]) == 0.0


def test_eval_is_deterministic_and_training_draws_per_key(model_and_params):
  model, params = model_and_params
  batch = _batch(seed=4)
  a = model.apply({"params": params}, **batch)["rtd_labels"]
  b = model.apply({"params": params}, **batch)["rtd_labels"]
  np.testing.assert_array_equal(a, b)
  draws = {tuple(np.asarray(model.apply({"params": params}, **batch,
                                        rngs={"sample": jax.random.PRNGKey(s)})
                            ["rtd_labels"]).ravel()) for s in range(6)}
  assert len(draws) > 1


def test_flops_count_both_models():
  cfg = configs.BertConfig(num_layers=12, hidden_size=256, num_heads=4, intermediate_size=1024,
                           embedding_size=128, model_type="electra")
  gen = configs.generator_config(cfg)
  s, p, h = 128, 19, 256
  expected = (flops.bert_train_flops(gen, s, p, nsp=False)  # generator + its MLM head
              + flops.bert_train_flops(cfg, s, 0, nsp=False)  # discriminator, no MLM head
              + 3 * (2 * s * h * h + 2 * s * h))  # discriminator head
  assert flops.electra_train_flops(cfg, s, p) == pytest.approx(expected)


def test_electra_needs_the_gathered_mlm_features(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="ELECTRA needs mlm_positions, mlm_targets"):
    model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))


def test_electra_trains_through_the_trainer_and_finetunes_from_the_discriminator(
    shared_data, tmp_path):
  config = tiny_pretraining_config(num_steps=3)
  config.train.objective = "electra"
  config.model.update(model_type="electra", generator_size=0.25)
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == [1, 2, 3]
  for r in lines:
    count = r["train/mlm/count"]
    mlm = r["train/mlm/loss"] * count / (count + losses.MLM_DENOMINATOR_EPS)
    assert r["loss"] == pytest.approx(mlm + 50 * r["train/rtd/loss"], rel=1e-4)
    assert 0 < r["train/rtd/positive_rate"] < 0.2  # only masked tokens (15%) can be replaced
    assert 0 <= r["train/rtd/precision"] <= 1 and 0 <= r["train/rtd/recall"] <= 1

  # Fine-tuning from the workdir takes the discriminator ('encoder') and drops the generator.
  from bert_jax import defaults, finetune
  ft = defaults.finetune_config()
  ft.update_from_flattened_dict({"init_from": str(tmp_path), "data.data_dir": str(shared_data),
                                 "data.max_length": 32})
  run = finetune._setup(ft)  # pylint: disable=protected-access
  assert run.model.config.model_type == "electra" and run.model.config.hidden_size == 128
  assert isinstance(run.model, bert.BertForSequenceClassification)
  assert set(run.pretrained) == {"encoder"}
  assert run.pretrained["encoder"]["layer_0"]["mlp"]["wi"]["kernel"].shape == (128, 512)


def _sharded_step(batch, preset, mesh_shape):
  """Metrics and the SGD(1) parameter change of one ELECTRA step on `mesh_shape`."""
  cfg = configs.BertConfig(vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4,
                           intermediate_size=128, embedding_size=32, model_type="electra",
                           generator_size=0.5, max_position_embeddings=32)
  return sgd_step_on_mesh(bert.build(cfg, "electra"), "electra", batch, preset, mesh_shape)


def test_sharded_electra_step_equals_data_parallel():
  """FSDP + tensor sharding draws the same samples and gives the same update."""
  batch = _batch(seed=5, batch=8, length=16, slots=3)
  plain, plain_delta, _ = _sharded_step(batch, "data_parallel", (8, 1, 1))
  metrics, delta, params = _sharded_step(batch, "fsdp_tensor", (2, 2, 2))
  for key in ("loss", "mlm/loss_sum", "rtd/loss_sum", "rtd/positives", "rtd/count"):
    assert float(metrics[key]) == pytest.approx(float(plain[key]), rel=1e-5), key
  assert float(plain["rtd/positives"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               delta, plain_delta)
  wi = params["generator"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert np.prod(wi.addressable_shards[0].data.shape) < np.prod(wi.shape)
