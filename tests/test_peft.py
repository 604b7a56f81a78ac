"""PEFT (peft.py, peft_modules.py): the LoRA merge, a few training steps of each method
(LoRA, BitFit, prompts, adapters), config errors.

A tiny random BERT sequence classifier trains on one fixed batch through the
same pieces finetune.py uses (peft.wrap, finetune_init.optimizer_rules,
optim.make_optimizer, the jitted steps.train_step), a few steps per method.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import finetune
from bert_jax import finetune_init
from bert_jax import models
from bert_jax import optim
from bert_jax import peft
from bert_jax import sharding
from bert_jax import steps
from bert_jax.defaults import ConfigError
from test_finetune_t5 import spm  # noqa: F401  (its module-scoped SentencePiece fixture)

FAST_COMPILE = {"xla_backend_optimization_level": 0}
HIDDEN, HEADS, LAYERS, RANK, ALPHA = 32, 2, 2, 4, 8.0
NUM_STEPS = 6


def _config(method: str, **fields):
  config = defaults.finetune_config()
  config.model.update(vocab_size=64, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                      intermediate_size=64, max_position_embeddings=16, dropout_rate=0.0,
                      attention_dropout_rate=0.0)
  config.finetune.method = method
  config.finetune.lora_rank = RANK
  config.finetune.lora_alpha = ALPHA
  config.optim.learning_rate = 1e-2
  config.update_from_flattened_dict(fields)
  return config


def _model(config):
  """The plain task model and what peft.wrap makes of it."""
  family = models.get(config.family)
  model_cfg, _ = finetune_init.model_config(config, None, None)
  model = family.build(model_cfg, "sequence_classification", num_labels=2)
  shapes = steps.init_shapes(family.init_features)
  return model, peft.wrap(config, model, shapes), shapes


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 64, size=(8, 12)).astype(np.int32)
  return {"encoder_input_tokens": tokens, "encoder_type_ids": np.zeros_like(tokens),
          "classifier_labels": (tokens[:, 1] % 2).astype(np.int32),
          "classifier_weights": np.ones(8, np.float32)}


def _train(method: str) -> dict:
  """NUM_STEPS steps of `method` on one batch: params before/after, opt state, losses."""
  config = _config(method)
  family = models.get(config.family)
  _, model, shapes = _model(config)
  mesh = sharding.make_mesh(*sharding.mesh_shape_of(config.mesh))
  rules = sharding.get_rules(config.mesh.rules)
  overrides = finetune_init.optimizer_rules(config, family, model.config)
  param_shapes = steps.param_shapes(model, shapes)
  tx, _ = optim.make_optimizer(config.optim, param_shapes, num_steps=NUM_STEPS, **overrides)
  state, shardings = steps.create_sharded_state(model, tx, shapes, mesh, rules, 0,
                                                compiler_options=FAST_COMPILE)
  before = jax.device_get(state.params)
  step = steps.make_train_step(model, tx, "classification", shardings,
                               sharding.batch_sharding(mesh), rules=rules,
                               compiler_options=FAST_COMPILE)
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return {"before": before, "after": jax.device_get(state.params), "losses": losses,
          "opt_state": jax.device_get(state.opt_state), "model": model,
          "trainable": peft.count_trainable(param_shapes, overrides["freeze"])}


@pytest.fixture(scope="module")
def runs():
  return {m: _train(m) for m in peft.METHODS}


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _opt_state_size(opt_state) -> int:
  """Elements of the optimizer's per-parameter state (scalars such as count excluded)."""
  return sum(x.size for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


# -------------------------------------------------------------------- merge


def test_merge_equals_hand_edited_3d_kernels():
  """B = 0 merges to the base params exactly; random factors on the 3-D query and out
  kernels give the outputs of a model whose kernels were edited by einsum."""
  config = _config("lora")
  plain, model, shapes = _model(config)
  variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                         **steps.model_inputs(model, steps.dummy_batch(shapes)))
  params = steps._unbox(variables["params"])
  base = {k: v for k, v in params.items() if k != "lora"}
  merged = peft.merge(params, ALPHA)
  for path, value in _flat(base).items():
    np.testing.assert_array_equal(_flat(merged)[path], value, err_msg=path)

  attn = params["lora"]["encoder"]["layer_1"]["attention"]
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
  for name in ("query", "out"):
    factors = attn[name]["kernel"]
    factors["a"] = jax.random.normal(next(keys), factors["a"].shape)
    factors["b"] = jax.random.normal(next(keys), factors["b"].shape)
  edited = jax.tree.map(jnp.array, base)
  kv = HIDDEN // HEADS
  layer = edited["encoder"]["layer_1"]["attention"]
  a, b = attn["query"]["kernel"]["a"], attn["query"]["kernel"]["b"]
  assert layer["query"]["kernel"].shape == (HIDDEN, HEADS, kv)
  layer["query"]["kernel"] = layer["query"]["kernel"] + ALPHA / RANK * jnp.einsum(
      "er,rhk->ehk", a, b.reshape(RANK, HEADS, kv))
  a, b = attn["out"]["kernel"]["a"], attn["out"]["kernel"]["b"]
  assert layer["out"]["kernel"].shape == (HEADS, kv, HIDDEN)
  layer["out"]["kernel"] = layer["out"]["kernel"] + ALPHA / RANK * jnp.einsum(
      "hkr,re->hke", a.reshape(HEADS, kv, RANK), b)

  batch = {k: v for k, v in _batch().items() if k.startswith("encoder")}
  want = plain.apply({"params": edited}, **batch)["logits"]
  got = model.apply({"params": params}, **steps.model_inputs(model, batch))["logits"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, plain.apply({"params": base}, **batch)["logits"], atol=1e-4)
  np.testing.assert_allclose(plain.apply({"params": peft.merged(model, params)}, **batch)[
      "logits"], want, rtol=1e-5, atol=1e-6)


def test_factors_have_logical_names_for_the_mesh():
  """A is named by the kernel's input axis, B by its output axis (a (heads, kv) group: heads)."""
  _, model, shapes = _model(_config("lora"))
  boxed = steps._boxed_params(model, shapes)["lora"]["encoder"]["layer_0"]["attention"]
  assert boxed["query"]["kernel"]["a"].names == ("embed", None)
  assert boxed["query"]["kernel"]["b"].names == (None, "heads")
  assert boxed["out"]["kernel"]["a"].names == ("heads", None)
  assert boxed["out"]["kernel"]["b"].names == (None, "embed")
  assert boxed["out"]["kernel"]["a"].value.shape == (HIDDEN, RANK)


# ---------------------------------------------------------------- training


def test_lora_trains_factors_and_head_only(runs):
  run = runs["lora"]
  before, after = _flat(run["before"]), _flat(run["after"])
  assert np.all(np.diff(run["losses"]) < 0), run["losses"]
  for path, value in before.items():
    if path.startswith("encoder/"):
      np.testing.assert_array_equal(after[path], value, err_msg=path)  # bit-identical
    else:  # factors (A too: it moves once B is non-zero) and the classifier
      assert path.startswith(("lora/", "classifier/")), path
      assert not np.array_equal(after[path], value), path
  lora_paths = [p for p in before if p.startswith("lora/")]
  assert len(lora_paths) == LAYERS * 4 * 2  # query, key, value, out; a and b


def test_optimizer_state_only_for_trainable_params(runs):
  """Adam's mu and nu exist for the trainable parameters alone: LoRA's state is a
  small fraction of a full run's."""
  for method in peft.METHODS:
    trainable, total = runs[method]["trainable"]
    assert _opt_state_size(runs[method]["opt_state"]) == 2 * trainable, method
  full, lora = runs["full"]["trainable"], runs["lora"]["trainable"]
  assert full[0] == full[1] == lora[1] - LAYERS * 4 * RANK * 2 * HIDDEN
  head = HIDDEN * 2 + 2
  assert lora[0] == LAYERS * 4 * RANK * 2 * HIDDEN + head
  assert _opt_state_size(runs["lora"]["opt_state"]) < _opt_state_size(
      runs["full"]["opt_state"]) / 3


def test_bitfit_trains_biases_and_head_only(runs):
  run = runs["bitfit"]
  before, after = _flat(run["before"]), _flat(run["after"])
  assert np.all(np.diff(run["losses"]) < 0), run["losses"]
  changed = {p for p in before if not np.array_equal(after[p], before[p])}
  assert changed, "nothing trained"
  assert all(p.endswith("bias") or p.startswith("classifier/") for p in changed), changed
  assert "classifier/kernel" in changed and "encoder/layer_0/attention/query/bias" in changed
  biases = sum(v.size for p, v in before.items() if p.endswith("bias"))
  assert run["trainable"][0] == biases + HIDDEN * 2  # + the classifier kernel


def test_full_run_changes_the_encoder(runs):
  before, after = _flat(runs["full"]["before"]), _flat(runs["full"]["after"])
  assert not np.array_equal(after["encoder/layer_0/mlp/wi/kernel"],
                            before["encoder/layer_0/mlp/wi/kernel"])


def test_trainable_count_is_logged(caplog):
  _, model, shapes = _model(_config("lora"))
  with caplog.at_level(logging.INFO):
    trainable, total = peft.log_trainable(steps.param_shapes(model, shapes), [r"^(encoder)/"])
  assert f"trainable parameters: {trainable} of {total}" in caplog.text
  assert 0 < trainable < total


# ------------------------------------------------------- prompts, adapters


def test_prompt_trains_the_prompts_and_head_only(runs):
  """Only params['prompt'] [k, hidden] and the classifier move; the loss falls; every
  base weight (pooler included) is bit-identical after training."""
  run = runs["prompt"]
  before, after = _flat(run["before"]), _flat(run["after"])
  assert np.all(np.diff(run["losses"]) < 0), run["losses"]
  assert before["prompt"].shape == (20, HIDDEN)  # finetune.prompt_length's default
  changed = {p for p in before if not np.array_equal(after[p], before[p])}
  assert changed == {"prompt", "classifier/kernel", "classifier/bias"}, changed
  assert run["trainable"][0] == 20 * HIDDEN + HIDDEN * 2 + 2


@pytest.mark.parametrize("method, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapters_train_adapters_norms_and_head_only(runs, method, per_layer):
  run = runs[method]
  before, after = _flat(run["before"]), _flat(run["after"])
  assert np.all(np.diff(run["losses"]) < 0), run["losses"]
  changed = {p for p in before if not np.array_equal(after[p], before[p])}
  assert all(p.startswith(("adapters/", "classifier/")) or "norm/" in p for p in changed), \
      changed
  assert "adapters/encoder/layer_1/mlp_adapter/up/kernel" in changed
  assert "encoder/layer_0/mlp_norm/scale" in changed
  size = 64  # finetune.adapter_size's default
  adapters = [p for p in before if p.startswith("adapters/")]
  assert len(adapters) == LAYERS * per_layer * 4
  norms = sum(v.size for p, v in before.items() if "norm/" in p)
  assert run["trainable"][0] == (LAYERS * per_layer * (2 * HIDDEN * size + size + HIDDEN)
                                 + norms + HIDDEN * 2 + 2)


def test_adapters_start_as_the_base_model_exactly():
  """Zero up-projections: at init the adapted model's outputs equal the plain model's
  on the same base params, bit for bit; a non-zero adapter changes them."""
  config = _config("houlsby")
  plain, model, shapes = _model(config)
  variables = model.init({"params": jax.random.PRNGKey(0)},
                         **steps.model_inputs(model, steps.dummy_batch(shapes)))
  params = steps._unbox(variables["params"])
  base = {k: v for k, v in params.items() if k != "adapters"}
  batch = {k: v for k, v in _batch().items() if k.startswith("encoder")}
  want = plain.apply({"params": base}, **batch)["logits"]
  got = model.apply({"params": params}, **steps.model_inputs(model, batch))["logits"]
  np.testing.assert_array_equal(got, want)
  adapter = params["adapters"]["encoder"]["layer_0"]["attention_adapter"]
  adapter["down"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1),
                                                adapter["down"]["kernel"].shape)
  adapter["up"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2),
                                              adapter["up"]["kernel"].shape)
  moved = model.apply({"params": params}, **steps.model_inputs(model, batch))["logits"]
  assert np.abs(moved - want).max() > 10 * np.abs(want).max() / 100, (moved, want)


def test_prompts_keep_the_sequence_and_ignore_padding():
  """Token classification with prompts: logits [batch, length, labels] (the prompt rows
  are not scored), the prompts matter, and a row's logits do not depend on how much
  padding follows it (the extended mask hides padding, shows the prompts)."""
  config = _config("prompt", **{"finetune.prompt_length": 3})
  family = models.get(config.family)
  model_cfg, _ = finetune_init.model_config(config, None, None)
  plain = family.build(model_cfg, "token_classification", num_labels=5)
  shapes = steps.init_shapes(family.init_features)
  model = peft.wrap(config, plain, shapes)
  variables = model.init({"params": jax.random.PRNGKey(0)},
                         **steps.model_inputs(model, steps.dummy_batch(shapes)))
  params = steps._unbox(variables["params"])
  assert params["prompt"].shape == (3, HIDDEN)
  tokens = _batch()["encoder_input_tokens"][:2, :8]
  padded = np.pad(tokens, ((0, 0), (0, 4)))  # pad id 0
  logits = jax.jit(lambda p, t: model.apply({"params": p}, encoder_input_tokens=t)["logits"])
  short, long = logits(params, tokens), logits(params, padded)
  assert short.shape == (2, 8, 5) and long.shape == (2, 12, 5)
  np.testing.assert_allclose(long[:, :8], short, atol=1e-5)
  moved = logits({**params, "prompt": params["prompt"] + 1.0}, tokens)
  assert not np.allclose(moved, short, atol=1e-4)


def test_layerwise_decay_gives_factors_their_layers_rate():
  """lora/encoder/layer_i/... matches layer i's decay rule: the factors move at the rate
  of the kernel they adapt; the head keeps 1."""
  config = _config("lora", **{"finetune.layerwise_lr_decay": 0.5})
  family = models.get(config.family)
  _, model, shapes = _model(config)
  rules = finetune_init.optimizer_rules(config, family, model.config)["lr_multipliers"]
  factors = _flat(optim.multiplier_tree(steps.param_shapes(model, shapes), rules))
  for i in range(LAYERS):
    assert factors[f"lora/encoder/layer_{i}/attention/query/kernel/a"] == 0.5 ** (LAYERS - i)
  assert factors["classifier/kernel"] == 1.0


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("field, value, key", [
    ("finetune.method", "adapters", "finetune.method"),
    ("finetune.lora_rank", 0, "finetune.lora_rank"),
    ("finetune.lora_alpha", -1.0, "finetune.lora_alpha"),
    ("finetune.lora_targets", "(query", "finetune.lora_targets"),
    ("finetune.reinit_layers", 1, "finetune.reinit_layers"),
    ("finetune.method", "lora ", "finetune.method"),
])
def test_bad_values_name_the_key(field, value, key):
  config = _config("lora", **{field: value})
  with pytest.raises(ConfigError, match=f"^config.{key}: ") as e:
    finetune.validate(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("method, field, value, key", [
    ("prompt", "finetune.prompt_length", 0, "finetune.prompt_length"),
    ("houlsby", "finetune.adapter_size", 0, "finetune.adapter_size"),
    ("pfeiffer", "finetune.adapter_size", -4, "finetune.adapter_size"),
    ("bitfit", "finetune.freeze_encoder", True, "finetune.freeze_encoder"),
    ("houlsby", "finetune.freeze_encoder", True, "finetune.freeze_encoder"),
])
def test_bad_method_values_name_the_key(method, field, value, key):
  config = _config(method, **{field: value})
  with pytest.raises(ConfigError, match=f"^config.{key}: ") as e:
    finetune.validate(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["prompt", "pfeiffer"])
def test_prompts_and_adapters_need_a_bert_encoder(method):
  """T5 has no BertEncoder: one line naming finetune.method; export refuses them too."""
  config = _config(method, family="t5")
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=64)
  family = models.get("t5")
  model = family.build(finetune_init.model_config(config, None, None)[0], family.finetune_task)
  with pytest.raises(ConfigError, match=f"^config.finetune.method: '{method}' needs a "
                     "BERT-family encoder"):
    peft.wrap(config, model, steps.init_shapes(family.init_features))
  with pytest.raises(ConfigError, match="^config.finetune.method: .*export handles"):
    peft.check_exportable(config)


def test_targets_matching_no_kernel_name_the_regex():
  config = _config("lora", **{"finetune.lora_targets": r"attn/q_proj/kernel$"})
  with pytest.raises(ConfigError, match=r"^config.finetune.lora_targets: regex "
                     r"'attn/q_proj/kernel\$' matches no kernel") as e:
    _model(config)
  assert "\n" not in str(e.value)


def test_bitfit_needs_biases():
  """T5 has no biases: BitFit fails naming finetune.method."""
  config = _config("bitfit", family="t5")
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=64)
  family = models.get("t5")
  model = family.build(finetune_init.model_config(config, None, None)[0], family.finetune_task)
  with pytest.raises(ConfigError, match="^config.finetune.method: 'bitfit' trains biases"):
    peft.wrap(config, model, steps.init_shapes(family.init_features))


def test_t5_default_targets_cover_its_attention():
  """The default regex matches the attention projections of T5 too (encoder, self and
  cross attention), and LoRA freezes everything but the factors."""
  config = _config("lora", family="t5")
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=64)
  family = models.get("t5")
  model = family.build(finetune_init.model_config(config, None, None)[0], family.finetune_task)
  wrapped = peft.wrap(config, model, steps.init_shapes(family.init_features))
  assert any("encoder_decoder_attention/query" in p for p in wrapped.paths)
  assert any("self_attention/out" in p for p in wrapped.paths)
  assert any(p.startswith("encoder/") for p in wrapped.paths)
  assert all(p.endswith(("query/kernel", "key/kernel", "value/kernel", "out/kernel"))
             for p in wrapped.paths)
  rules = finetune_init.optimizer_rules(config, family, model.config)
  shapes = steps.param_shapes(wrapped, steps.init_shapes(family.init_features))
  trainable, _ = peft.count_trainable(shapes, rules["freeze"])
  lora = sum(x.size for x in jax.tree.leaves(shapes["lora"]))
  assert trainable == lora


# ------------------------------------------------------------- the loop


def test_lora_finetune_loop_then_evaluate(shared_data, tmp_path, caplog):
  """`finetune` with method='lora' on 16 SST-2 rows: the count is logged, best/ holds the
  factors, the encoder there is its init bit for bit, and `evaluate` reloads it."""
  import optax  # pylint: disable=import-outside-toplevel
  from bert_jax.tasks import glue  # pylint: disable=import-outside-toplevel
  from test_finetune import _random_init_config, _vocab  # pylint: disable=import-outside-toplevel
  train = glue.read_tsv(str(shared_data), "sst2", "train")[:16]
  dev = glue.read_tsv(str(shared_data), "sst2", "dev")[:16]
  vocab = _vocab(tmp_path / "vocab.txt", [e.text_a for e in train + dev])
  config = _random_init_config("glue", shared_data, vocab, **{
      "data.max_train_examples": 16, "data.max_eval_examples": 16, "data.max_length": 32,
      "train.batch_size": 8, "eval.batch_size": 16, "train.num_epochs": 2,
      "optim.learning_rate": 3e-3, "finetune.method": "lora", "finetune.lora_rank": 2})
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    result = finetune.finetune(config, workdir)
  assert "trainable parameters: " in caplog.text
  assert "eval/dev/accuracy" in result

  run = finetune._setup(config)
  init, _ = steps.create_sharded_state(run.model, optax.identity(), run.init_shapes, run.mesh,
                                       run.rules, config.seed)
  best, _, _ = finetune._restore_best(config, run, workdir)
  best, init = _flat(jax.device_get(best)), _flat(jax.device_get(init.params))
  assert any(p.startswith("lora/") for p in best)
  for path, value in init.items():
    if path.startswith("encoder/"):
      np.testing.assert_array_equal(best[path], value, err_msg=path)
  assert not np.array_equal(best["classifier/kernel"], init["classifier/kernel"])
  scores = finetune.evaluate(config, workdir)
  assert scores["dev/accuracy"] == pytest.approx(result["best"]["value"])


def test_t5_lora_text_to_text_decodes_merged(shared_data, spm, tmp_path):
  """T5 with LoRA: teacher-forced training changes the factors alone, and eval / predict
  decode with the factors folded in (peft.merged on the unwrapped model)."""
  from test_finetune_t5 import VOCAB, _config  # pylint: disable=import-outside-toplevel
  config = _config("sst2", shared_data, **{
      "data.tokenizer": str(spm), "data.max_train_examples": 8, "data.max_eval_examples": 8,
      "data.max_length": 32, "data.max_target_length": 4, "train.batch_size": 8,
      "eval.batch_size": 8, "train.num_epochs": 1, "optim.learning_rate": 1e-2,
      "data.predict_split": "dev", "finetune.method": "lora", "finetune.lora_rank": 2})
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=VOCAB, dropout_rate=0.0)
  workdir = str(tmp_path / "run")
  out = finetune.finetune(config, workdir)
  assert "eval/dev/accuracy" in out
  run = finetune._setup(config)
  best, _, _ = finetune._restore_best(config, run, workdir)
  assert isinstance(run.model, peft.LoraModel)
  factors = jax.tree.leaves(best["lora"])
  assert any(np.any(np.asarray(x) != 0) for x in factors)
  path = finetune.predict(config, workdir)
  assert len(open(path, encoding="utf-8").read().splitlines()) == 9
