"""Frozen features and selective fine-tuning (frozen_features.py, optim's `unfreeze`).

A tiny random BERT trains a few steps on one fixed batch through the pieces
finetune.py uses (peft.wrap, finetune_init.optimizer_rules, frozen_features.
unfreeze_stages, optim.make_optimizer, the jitted train step); one
`finetune.finetune` run on toy SST-2 rows covers the loop with scalar_mix.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.linen import meta

from bert_jax import defaults
from bert_jax import finetune
from bert_jax import finetune_init
from bert_jax import frozen_features
from bert_jax import models
from bert_jax import optim
from bert_jax import peft
from bert_jax import sharding
from bert_jax import steps
from bert_jax.defaults import ConfigError

FAST_COMPILE = {"xla_backend_optimization_level": 0}
LAYERS, LR = 2, 1e-2
S1, S2, NUM_STEPS = 2, 4, 6  # top_ln_all: LayerNorms from S1, everything from S2
KERNEL = "encoder/layer_0/attention/query/kernel"  # unfrozen at S2


def _config(method: str = "full", **fields):
  config = defaults.finetune_config()
  config.model.update(vocab_size=64, hidden_size=32, num_layers=LAYERS, num_heads=2,
                      intermediate_size=64, max_position_embeddings=16, dropout_rate=0.0,
                      attention_dropout_rate=0.0)
  config.finetune.method = method
  config.optim.learning_rate = LR
  config.optim.schedule = "constant"
  config.update_from_flattened_dict(fields)
  return config


def _model(config, task: str):
  family = models.get(config.family)
  model_cfg, _ = finetune_init.model_config(config, None, None)
  model = family.build(model_cfg, task, **({} if task == "encoder" else {"num_labels": 3}))
  shapes = steps.init_shapes(family.init_features)
  return model, peft.wrap(config, model, shapes), shapes


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 64, size=(8, 12)).astype(np.int32)
  return {"encoder_input_tokens": tokens, "encoder_type_ids": np.zeros_like(tokens),
          "classifier_labels": (tokens[:, 1] % 3).astype(np.int32),
          "classifier_weights": np.ones(8, np.float32),
          "token_labels": (tokens % 3).astype(np.int32)}


def _flat(tree) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _train(config, task: str, objective: str) -> dict:
  """NUM_STEPS steps; the params and optimizer state after every step (index 0: init)."""
  family = models.get(config.family)
  _, model, shapes = _model(config, task)
  mesh = sharding.make_mesh(*sharding.mesh_shape_of(config.mesh))
  rules = sharding.get_rules(config.mesh.rules)
  overrides = finetune_init.optimizer_rules(config, family, model.config)
  param_shapes = steps.param_shapes(model, shapes)
  stages = frozen_features.unfreeze_stages(config, family, model.config, param_shapes)
  tx, _ = optim.make_optimizer(config.optim, param_shapes, num_steps=NUM_STEPS,
                               unfreeze=stages, **overrides)
  state, shardings = steps.create_sharded_state(model, tx, shapes, mesh, rules, 0,
                                                compiler_options=FAST_COMPILE)
  step = steps.make_train_step(model, tx, objective, shardings, sharding.batch_sharding(mesh),
                               rules=rules, compiler_options=FAST_COMPILE)
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  params, opt_states, losses = [_flat(jax.device_get(state.params))], [], []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    params.append(_flat(jax.device_get(state.params)))
    opt_states.append(jax.device_get(state.opt_state))
    losses.append(float(metrics["loss"]))
  return {"params": params, "opt_states": opt_states, "losses": losses, "stages": stages}


@pytest.fixture(scope="module")
def mix_runs():
  return {
      "classification": _train(_config("scalar_mix"), "sequence_classification",
                               "classification"),
      "token_classification": _train(_config("scalar_mix"), "token_classification",
                                     "token_classification")}


@pytest.fixture(scope="module")
def unfreeze_run():
  # eps 1e-12: Adam's first step is then lr * g / |g| even where g is tiny (the query
  # kernels of a random model).
  return _train(_config(**{"finetune.unfreeze_schedule": "top_ln_all",
                           "finetune.unfreeze_steps": (S1, S2), "optim.eps": 1e-12}),
                "sequence_classification", "classification")


# ---------------------------------------------------------------- scalar mix


@pytest.mark.parametrize("j", range(LAYERS + 1))
def test_one_hot_weights_give_that_layers_hidden_state(j):
  """w large at j: the encoder's output is h_j (h_0 the embeddings) times gamma."""
  model, wrapped, _ = _model(_config("scalar_mix"), "encoder")
  tokens = jnp.asarray(_batch()["encoder_input_tokens"])
  params = dict(meta.unbox(wrapped.init(jax.random.PRNGKey(0), encoder_input_tokens=tokens)
                          )["params"])
  base = {k: v for k, v in params.items() if k != frozen_features.MIX}
  states = frozen_features.hidden_states(model, {"params": base}, encoder_input_tokens=tokens)
  assert len(states) == LAYERS + 1 == wrapped.num_layers + 1
  weights = jnp.zeros(LAYERS + 1).at[j].set(60.0)
  params[frozen_features.MIX] = {"weights": weights, "gamma": jnp.asarray([2.0])}
  hidden, _ = wrapped.apply({"params": params}, encoder_input_tokens=tokens)
  np.testing.assert_allclose(hidden, 2.0 * states[j], rtol=1e-5, atol=1e-5)
  if j == LAYERS:  # the plain model returns h_L itself
    plain, _ = model.apply({"params": base}, encoder_input_tokens=tokens)
    np.testing.assert_allclose(states[j], plain, rtol=1e-6, atol=1e-6)


def test_remat_model_mixes_the_same():
  """model.remat is turned off under the mix (layer outputs inside jax.checkpoint are out
  of reach, and a frozen encoder has no backward pass): same params, same outputs."""
  tokens = jnp.asarray(_batch()["encoder_input_tokens"])
  _, plain, _ = _model(_config("scalar_mix"), "token_classification")
  _, remat, _ = _model(_config("scalar_mix", **{"model.remat": True}), "token_classification")
  variables = meta.unbox(plain.init(jax.random.PRNGKey(0), encoder_input_tokens=tokens))
  variables["params"][frozen_features.MIX]["weights"] = jnp.arange(LAYERS + 1.0)
  np.testing.assert_allclose(remat.apply(variables, encoder_input_tokens=tokens)["logits"],
                             plain.apply(variables, encoder_input_tokens=tokens)["logits"],
                             rtol=1e-6, atol=1e-6)


def test_mix_at_init_is_the_layer_average():
  rng = np.random.default_rng(1)
  hidden = [jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32) for _ in range(3)]
  out = frozen_features.scalar_mix(hidden, jnp.zeros(3), jnp.asarray(1.0))
  np.testing.assert_allclose(out, sum(hidden) / 3, rtol=1e-6)


@pytest.mark.parametrize("head", ["classification", "token_classification"])
def test_scalar_mix_trains_weights_gamma_and_head_only(mix_runs, head):
  """The encoder (but its pooler, the classifier's first layer) stays bit-identical; w,
  gamma, the head (and the pooler, where the head reads it) change; the optimizer holds
  no moments for the frozen encoder."""
  run = mix_runs[head]
  before, after = run["params"][0], run["params"][-1]
  assert run["losses"][-1] < run["losses"][0]
  frozen = lambda p: p.startswith("encoder/") and not p.startswith("encoder/pooler/")  # noqa: E731
  assert any(p.startswith("encoder/pooler/") for p in before) == (head == "classification")
  for path, value in before.items():
    if frozen(path):
      np.testing.assert_array_equal(after[path], value, err_msg=path)
    else:
      assert not np.array_equal(after[path], value), path
  assert {"scalar_mix/weights", "scalar_mix/gamma", "classifier/kernel"} <= set(before)
  trainable = sum(v.size for p, v in before.items() if not frozen(p))
  adam = _adam(run["opt_states"][-1])
  assert sum(x.size for x in jax.tree.leaves((adam.mu, adam.nu))) == 2 * trainable


@pytest.mark.parametrize("family", ["modernbert", "deberta"])
def test_scalar_mix_reads_the_layers_of_modernbert_and_deberta(family):
  """The mix replaces the last layer's output: one-hot at L with gamma 1 is the plain model
  (ModernBERT's final norm still follows); DeBERTa (post-norm, nothing after its layers)
  returns gamma * h_j; and the states are the L + 1 the family's layers see."""
  config = _config("scalar_mix", family=family)
  config.model = defaults.model_config(family, "tiny", vocab_size=64, num_layers=LAYERS)
  model, wrapped, _ = _model(config, "encoder")
  tokens = jnp.asarray(_batch()["encoder_input_tokens"])
  params = dict(meta.unbox(wrapped.init(jax.random.PRNGKey(0), encoder_input_tokens=tokens)
                          )["params"])
  base = {k: v for k, v in params.items() if k != frozen_features.MIX}
  states = frozen_features.hidden_states(model, {"params": base}, encoder_input_tokens=tokens)
  assert len(states) == LAYERS + 1 == wrapped.num_layers + 1

  def mixed(j, gamma):
    params[frozen_features.MIX] = {"weights": jnp.zeros(LAYERS + 1).at[j].set(60.0),
                                   "gamma": jnp.asarray([gamma])}
    return wrapped.apply({"params": params}, encoder_input_tokens=tokens)[0]
  plain = model.apply({"params": base}, encoder_input_tokens=tokens)[0]
  np.testing.assert_allclose(mixed(LAYERS, 1.0), plain, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(mixed(0, 1.0) - plain))) > 1e-2
  if family == "deberta":
    for j in range(LAYERS + 1):
      np.testing.assert_allclose(mixed(j, 2.0), 2.0 * states[j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, preset", [("t5", "t5_v1_1_tiny"), ("bart", "tiny")])
def test_scalar_mix_refuses_encoder_decoders(family, preset):
  config = _config("scalar_mix", family=family)
  config.model = defaults.model_config(family, preset, vocab_size=64)
  spec = models.get(family)
  model = spec.build(finetune_init.model_config(config, None, None)[0], spec.finetune_task)
  with pytest.raises(ConfigError, match=r"^config.finetune.method: 'scalar_mix' needs an "
                     rf"encoder family .* the '{family}' model has none") as e:
    peft.wrap(config, model, steps.init_shapes(spec.init_features))
  assert "\n" not in str(e.value)


# -------------------------------------------------------- gradual unfreezing


def _groups(paths) -> dict:
  """Stage of each path under top_ln_all (tiny BERT: layer_1 is the top layer)."""
  def stage(p):
    if not p.startswith("encoder/") or p.startswith(("encoder/layer_1/", "encoder/pooler/")):
      return 0
    return S1 if p.endswith(("norm/scale", "norm/bias")) else S2
  return {p: stage(p) for p in paths}


def test_groups_are_bit_identical_before_their_stage_and_change_after(unfreeze_run):
  params = unfreeze_run["params"]
  groups = _groups(params[0])
  assert sorted(set(groups.values())) == [0, S1, S2]
  for path, start in groups.items():
    for step in range(1, start + 1):  # no update, no weight decay through step `start`
      np.testing.assert_array_equal(params[step][path], params[0][path], err_msg=path)
    assert not np.array_equal(params[start + 1][path], params[start][path]), path


def _adam(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def test_frozen_groups_have_zero_adam_moments_until_their_stage(unfreeze_run):
  """The gradients are gated on the way in: nothing accumulates before a stage."""
  states = unfreeze_run["opt_states"]  # states[i]: after step i + 1
  before, after = _adam(states[S2 - 1]), _adam(states[S2])  # after steps S2, S2 + 1
  assert not np.any(_flat(before.mu)[KERNEL]) and not np.any(_flat(before.nu)[KERNEL])
  assert np.any(_flat(before.mu)["classifier/kernel"])
  assert np.any(_flat(after.mu)[KERNEL])


def test_first_update_after_unfreezing_is_adams_first_step(unfreeze_run):
  """Adam's bias correction counts from the stage: the first update of a group unfrozen
  late is about lr per element (m_hat / sqrt(v_hat) = g / |g|); a global count would give
  0.55 lr here (count 5) and up to 3.2 lr at later stages."""
  params = unfreeze_run["params"]
  delta = np.abs(params[S2 + 1][KERNEL] - params[S2][KERNEL]).max()
  assert 0.9 * LR < delta < 1.1 * LR, delta


def test_preset_stages_and_restart_from_the_step():
  """The stages of the preset, and the gate being a function of the step alone: a gate
  whose state says step S2 - 1 passes exactly what a gate run S2 - 1 times passes."""
  config = _config(**{"finetune.unfreeze_schedule": "top_ln_all",
                      "finetune.unfreeze_steps": (S1, S2)})
  _, model, shapes = _model(config, "sequence_classification")
  param_shapes = steps.param_shapes(model, shapes)
  stages = frozen_features.unfreeze_stages(config, models.get("bert"), model.config,
                                           param_shapes)
  assert [s for s, _ in stages] == [0, S1, S2]
  starts = optim.unfreeze_starts(param_shapes, stages)
  gate = optim.gate_by_step(starts)
  ones = jax.tree.map(lambda s: jnp.ones(s.shape), param_shapes)
  state = gate.init(ones)
  for _ in range(S2 - 1):
    _, state = gate.update(ones, state)
  out, _ = gate.update(ones, state)
  resumed, _ = gate.update(ones, optim.GateState(jnp.asarray(S2 - 1, jnp.int32)))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  flat = _flat(out)
  assert flat["encoder/layer_0/attention_norm/scale"].all()
  assert not flat[KERNEL].any()


def test_stages_at_step_zero_are_plain_adamw():
  """Every group unfrozen from step 0: the same updates as the optimizer without stages
  (the staged Adam is optax's Adam when every start is 0)."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.zeros(3)}, "norm": {"scale": jnp.ones(3)}}
  cfg = {"learning_rate": 1e-2, "schedule": "constant", "warmup_steps": 0}
  plain, _ = optim.make_optimizer(cfg, params, num_steps=3)
  staged, _ = optim.make_optimizer(cfg, params, num_steps=3, unfreeze=((0, ".*"),))
  states = plain.init(params), staged.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    (a, s0), (b, s1) = plain.update(grads, states[0], params), staged.update(
        grads, states[1], params)
    states = s0, s1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fields, key", [
    ({"finetune.unfreeze_schedule": "slanted"}, "finetune.unfreeze_schedule"),
    ({"finetune.unfreeze_schedule": "top_ln_all"}, "finetune.unfreeze_steps"),
    ({"finetune.unfreeze_schedule": "top_ln_all", "finetune.unfreeze_steps": (5, 2)},
     "finetune.unfreeze_steps"),
    ({"finetune.unfreeze": ((-1, "encoder/"),)}, "finetune.unfreeze"),
    ({"finetune.unfreeze": ((3, "encoder/("),)}, "finetune.unfreeze"),
    ({"finetune.unfreeze": ((3, "encoder/"),), "finetune.method": "lora"},
     "finetune.unfreeze"),
    ({"finetune.unfreeze": ((3, "encoder/"),), "finetune.unfreeze_schedule": "top_ln_all",
      "finetune.unfreeze_steps": (1, 2)}, "finetune.unfreeze"),
])
def test_bad_unfreeze_config_names_the_key(fields, key):
  with pytest.raises(ConfigError, match=f"^config.{key}: ") as e:
    finetune.validate(_config(**fields))
  assert "\n" not in str(e.value)


def test_unfreeze_regex_matching_nothing_names_the_key():
  config = _config(**{"finetune.unfreeze": ((3, "decoder/"),)})
  _, model, shapes = _model(config, "sequence_classification")
  with pytest.raises(ConfigError, match=r"^config.finetune.unfreeze: regex 'decoder/' "
                     "matches no parameter"):
    frozen_features.unfreeze_stages(config, models.get("bert"), model.config,
                                    steps.param_shapes(model, shapes))


# ------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def toy_sst2(tmp_path_factory):
  """(GLUE root, vocab.txt) of 32 train and 16 dev toy SST-2 rows (test_finetune_e2e's)."""
  from test_finetune_e2e import _VOCAB, _sentences  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("glue")
  (root / "SST-2").mkdir()
  rng = np.random.default_rng(0)
  for name, n in (("train", 32), ("dev", 16)):
    lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in _sentences(rng, n)]
    (root / "SST-2" / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
  return root, vocab


def _loop_config(toy, **fields):
  from test_finetune import _random_init_config  # pylint: disable=import-outside-toplevel
  return _random_init_config("glue", *toy, **{
      "data.max_length": 16, "data.padding": "max", "train.batch_size": 16,
      "eval.batch_size": 16, "train.num_epochs": 1, "optim.learning_rate": 1e-2, **fields})


def _init_and_best(config, workdir) -> tuple[dict, dict]:
  run = finetune._setup(config)  # pylint: disable=protected-access
  init, _ = steps.create_sharded_state(run.model, optax.identity(), run.init_shapes, run.mesh,
                                       run.rules, config.seed)
  best, _, _ = finetune._restore_best(config, run, workdir)  # pylint: disable=protected-access
  return _flat(jax.device_get(init.params)), _flat(jax.device_get(best))


def test_scalar_mix_finetune_on_toy_sst2(toy_sst2, tmp_path):
  """`finetune` with method='scalar_mix': best/ holds the mix, the pooler and the head (a
  delta), and completed by the rebuilt base, the rest of the encoder there is its init
  bit for bit."""
  config = _loop_config(toy_sst2, **{"finetune.method": "scalar_mix"})
  workdir = str(tmp_path / "run")
  assert "eval/dev/accuracy" in finetune.finetune(config, workdir)
  init, best = _init_and_best(config, workdir)
  assert any(p.startswith("encoder/pooler/") for p in init)
  for path, value in init.items():
    if path.startswith("encoder/") and not path.startswith("encoder/pooler/"):
      np.testing.assert_array_equal(best[path], value, err_msg=path)
    else:
      assert not np.array_equal(best[path], value), path


def test_unfreeze_schedule_in_the_loop(toy_sst2, tmp_path):
  """`finetune` with top_ln_all over 2 steps, LayerNorms from step 1, the rest never:
  layer_0's kernels end as they started, its LayerNorms and the head do not."""
  config = _loop_config(toy_sst2, **{"finetune.unfreeze_schedule": "top_ln_all",
                                     "finetune.unfreeze_steps": (1, 100)})
  workdir = str(tmp_path / "run")
  finetune.finetune(config, workdir)
  init, best = _init_and_best(config, workdir)
  np.testing.assert_array_equal(best[KERNEL], init[KERNEL])
  for path in ("encoder/layer_0/attention_norm/scale", "encoder/layer_1/attention/query/kernel",
               "classifier/kernel"):
    assert not np.array_equal(best[path], init[path]), path
