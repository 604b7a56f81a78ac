"""PEFT beyond BERT (peft_modules.STACKS): prompts and adapters on ModernBERT, DeBERTa and
BART's encoder; LoRA and BitFit there too; the combinations that are refused.

Tiny random sequence classifiers train a few steps on one fixed batch through the
pieces finetune.py uses (peft.wrap, finetune_init.optimizer_rules,
optim.make_optimizer, the jitted steps.train_step), as tests/test_peft.py does for BERT.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import finetune_init
from bert_jax import models
from bert_jax import optim
from bert_jax import peft
from bert_jax import peft_modules
from bert_jax import sharding
from bert_jax import steps
from bert_jax.defaults import ConfigError

FAST_COMPILE = {"xla_backend_optimization_level": 0}
HIDDEN, VOCAB, NUM_STEPS, PROMPTS = 32, 64, 2, 4
MODELS = {  # tiny configs; ModernBERT: layer 0 global, layer 1 a 5-token sliding window
    "modernbert": dict(num_layers=2, hidden_size=HIDDEN, num_heads=2, intermediate_size=48,
                       local_attention=4, max_position_embeddings=32),
    "deberta": dict(num_layers=2, hidden_size=HIDDEN, num_heads=2, intermediate_size=64,
                    position_buckets=8, max_relative_positions=32, max_position_embeddings=32,
                    hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0),
    "bart": dict(d_model=HIDDEN, encoder_attention_heads=2, decoder_attention_heads=2,
                 num_encoder_layers=2, num_decoder_layers=1, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_position_embeddings=32, dropout_rate=0.0),
}
RUNS = [(f, m) for f in ("modernbert", "deberta") for m in ("prompt", "houlsby", "pfeiffer")]


def _config(family: str, method: str, **model_fields):
  config = defaults.finetune_config()
  config.family = family
  config.model = models.model_config(family, "tiny", vocab_size=VOCAB,
                                     **{**MODELS[family], **model_fields})
  config.finetune.method = method
  config.finetune.prompt_length = PROMPTS
  config.finetune.adapter_size = 8
  config.finetune.lora_rank = 2
  config.optim.learning_rate = 1e-2
  return config


def _models(config, task="sequence_classification", **head):
  """(plain task model, what peft.wrap makes of it, init shapes)."""
  family = models.get(config.family)
  model_cfg, _ = finetune_init.model_config(config, None, None)
  if task == "sequence_classification":
    head = {"num_labels": 2, **head}
  plain = family.build(model_cfg, task, **head)
  shapes = steps.init_shapes(family.init_features)
  return plain, peft.wrap(config, plain, shapes), shapes


def _tokens(rows=8, length=12):
  # Ids from 5: no row holds a pad id (0 for ModernBERT / DeBERTa, 1 for BART).
  return np.random.default_rng(0).integers(5, VOCAB, size=(rows, length)).astype(np.int32)


def _train(family: str, method: str) -> dict:
  """NUM_STEPS steps on one batch: params before / after, losses, freeze rules, models."""
  config = _config(family, method)
  plain, model, shapes = _models(config)
  mesh = sharding.make_mesh(*sharding.mesh_shape_of(config.mesh))
  rules = sharding.get_rules(config.mesh.rules)
  overrides = finetune_init.optimizer_rules(config, models.get(family), model.config)
  tx, _ = optim.make_optimizer(config.optim, steps.param_shapes(model, shapes),
                               num_steps=NUM_STEPS, **overrides)
  state, shardings = steps.create_sharded_state(model, tx, shapes, mesh, rules, 0,
                                                compiler_options=FAST_COMPILE)
  before = jax.device_get(state.params)
  step = steps.make_train_step(model, tx, "classification", shardings,
                               sharding.batch_sharding(mesh), rules=rules,
                               compiler_options=FAST_COMPILE)
  tokens = _tokens()
  batch = {"encoder_input_tokens": tokens, "encoder_type_ids": np.zeros_like(tokens),
           "classifier_labels": (tokens[:, 1] % 2).astype(np.int32),
           "classifier_weights": np.ones(8, np.float32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return {"before": before, "after": jax.device_get(state.params), "losses": losses,
          "plain": plain, "model": model, "freeze": overrides["freeze"]}


@pytest.fixture(scope="module")
def runs():
  return {run: _train(*run) for run in RUNS}


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _encoder_inputs(model, tokens):
  return steps.model_inputs(model, {"encoder_input_tokens": tokens,
                                    "encoder_type_ids": np.zeros_like(tokens)})


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("family, method", RUNS)
def test_only_the_methods_params_train(runs, family, method):
  """The loss falls; what the method adds and the fresh head move; every carried-over
  weight the method does not train (all but LayerNorms for adapters, all but biases for
  BitFit, all for prompts and LoRA) is bit-identical after training."""
  run = runs[family, method]
  before, after = _flat(run["before"]), _flat(run["after"])
  assert run["losses"][-1] < run["losses"][0], run["losses"]
  carried = models.get(family).carried_over
  added = {"lora": "lora/", "prompt": "prompt", "houlsby": "adapters/",
           "pfeiffer": "adapters/", "bitfit": None}[method]
  trained = {"bitfit": lambda p: p.endswith("bias"), "houlsby": lambda p: "norm/" in p,
             "pfeiffer": lambda p: "norm/" in p}.get(method, lambda p: False)
  changed = {p for p in before if not np.array_equal(after[p], before[p])}
  for path in before:
    if path.split("/")[0] in carried and not trained(path):
      assert path not in changed, path
  assert any(p.split("/")[0] not in carried for p in changed), changed  # the head
  if added:
    assert any(p.startswith(added) for p in changed), changed
  else:
    assert any(p.split("/")[0] in carried and p.endswith("bias") for p in changed), changed


@pytest.mark.parametrize("family, method", [r for r in RUNS if r[1] in ("houlsby", "pfeiffer")])
def test_adapters_start_as_the_base_model_exactly(runs, family, method):
  """Zero up-projections: at init the adapted model equals the plain one bit for bit,
  with one adapter per layer and site; a non-zero adapter changes the outputs."""
  run = runs[family, method]
  params, model = run["before"], run["model"]
  base = {k: v for k, v in params.items() if k != "adapters"}
  tokens = _tokens(4)
  want = run["plain"].apply({"params": base}, **_encoder_inputs(run["plain"], tokens))["logits"]
  got = model.apply({"params": params}, **_encoder_inputs(model, tokens))["logits"]
  np.testing.assert_array_equal(got, want)
  per_layer = 2 if method == "houlsby" else 1
  assert len(model.paths) == 2 * per_layer, model.paths
  up = jax.tree.map(lambda x: x, params)
  node = up["adapters"]
  for name in model.paths[0]:
    node = node[name]
  for i, part in enumerate(("down", "up")):
    node[part]["kernel"] = jax.random.normal(jax.random.PRNGKey(i), node[part]["kernel"].shape)
  moved = model.apply({"params": up}, **_encoder_inputs(model, tokens))["logits"]
  assert np.abs(moved - want).max() > 1e-5, (moved, want)  # float noise: ~1e-8 here


# ------------------------------------------------------------------ prompts


@pytest.fixture(scope="module", params=["modernbert", "deberta", "bart"])
def prompted(request):
  """(family, token-level model with prompts, its params): ModernBERT / DeBERTa token
  classifiers, BART's bare encoder."""
  family = request.param
  config = _config(family, "prompt")
  task = "base" if family == "bart" else "token_classification"
  _, model, shapes = _models(config, task, **({} if family == "bart" else {"num_labels": 3}))
  variables = model.init({"params": jax.random.PRNGKey(0)},
                         **steps.model_inputs(model, steps.dummy_batch(shapes)))
  return family, model, steps._unbox(variables["params"])


def _token_outputs(family, model):
  if family == "bart":  # the encoder's output: [batch, length, d_model]
    return jax.jit(lambda p, t: model.apply({"params": p}, t, method=type(model).encode))
  return jax.jit(lambda p, t: model.apply({"params": p}, encoder_input_tokens=t)["logits"])


def test_prompts_keep_the_shape_and_ignore_padding(prompted):
  """[batch, length, ...] as without prompts, and a row's outputs do not depend on the
  padding after it (the grown mask hides padding and shows the prompts; ModernBERT's
  rotary tables and DeBERTa's relative distances stay those of the tokens)."""
  family, model, params = prompted
  assert params["prompt"].shape == (PROMPTS, HIDDEN)
  pad = 1 if family == "bart" else 0
  tokens = _tokens(2, 8)
  padded = np.pad(tokens, ((0, 0), (0, 4)), constant_values=pad)
  run = _token_outputs(family, model)
  short, long = run(params, tokens), run(params, padded)
  assert short.shape[:2] == (2, 8) and long.shape[:2] == (2, 12)
  np.testing.assert_allclose(long[:, :8], short, atol=1e-5)
  moved = run({**params, "prompt": params["prompt"] + 1.0}, tokens)
  assert not np.allclose(moved, short, atol=1e-4)


def test_prompts_get_gradient(prompted):
  """Every prompt row gets a non-zero gradient from a token-level loss."""
  family, model, params = prompted
  run = _token_outputs(family, model)
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(run({**params, "prompt": p}, _tokens(2, 8)))))(
      params["prompt"])
  assert grad.shape == (PROMPTS, HIDDEN)
  assert np.all(np.abs(np.asarray(grad)).sum(-1) > 0), grad


# ------------------------------------------------------------------- errors


def test_bitfit_on_modernbert_is_refused():
  """ModernBERT has no biases: only its fresh head would train."""
  with pytest.raises(ConfigError, match="^config.finetune.method: 'bitfit' trains biases; "
                     "the 'modernbert' model has none") as e:
    _models(_config("modernbert", "bitfit"))
  assert "\n" not in str(e.value)
  _models(_config("modernbert", "bitfit", attention_bias=True))  # with biases it runs


def test_prompts_with_debertas_enhanced_mask_decoder_are_refused():
  with pytest.raises(ConfigError, match="^config.finetune.method: 'prompt' cannot run on "
                     "this 'deberta' model: DeBERTa's enhanced mask decoder") as e:
    _models(_config("deberta", "prompt", enhanced_mask_decoder=True), "mlm")
  assert "\n" not in str(e.value)
  _models(_config("deberta", "houlsby", enhanced_mask_decoder=True), "mlm")  # adapters run


def test_every_stack_names_real_params():
  """Each STACKS entry's embedding paths exist in its family's params (the prompt init)."""
  for family in ("modernbert", "deberta", "bart"):
    _, model, shapes = _models(_config(family, "prompt"))
    shape_tree = steps.param_shapes(model, shapes)
    stack = peft_modules.STACKS[model.stack]
    assert model.stack == family
    for path in (stack.word_embeddings, stack.embedding_norm + ("scale",)):
      node = shape_tree
      for name in path:
        node = node[name]


@pytest.mark.parametrize("family, method, trained", [
    ("modernbert", "lora", "lora/"), ("deberta", "lora", "lora/"), ("bart", "lora", "lora/"),
    ("deberta", "bitfit", "bias"), ("bart", "bitfit", "bias"), ("bart", "houlsby", "adapters/"),
    ("bart", "prompt", "prompt")])
def test_lora_bitfit_and_bart_wrap_and_freeze(family, method, trained):
  """LoRA and BitFit serve every family, adapters and prompts BART's encoder: the carried-
  over weights the method does not train are frozen, what it trains is not."""
  config = _config(family, method)
  _, model, shapes = _models(config)
  rules = finetune_init.optimizer_rules(config, models.get(family), model.config)["freeze"]
  split = peft.split(steps.param_shapes(model, shapes), rules)
  free = _flat(split[0])
  carried = models.get(family).carried_over
  assert any(trained in p and p.split("/")[0] not in carried for p in free) or any(
      p.endswith(trained) and p.split("/")[0] in carried for p in free), sorted(free)
  norms = method in ("houlsby", "pfeiffer")
  assert all(p.endswith("bias") or (norms and "norm/" in p) for p in free
             if p.split("/")[0] in carried), sorted(free)
  if method == "houlsby":  # the encoder's layers only: BART's decoder gets none
    assert sorted({p.split("/")[3] for p in free if p.startswith("adapters/")}) == [
        "attention_adapter", "mlp_adapter"]
    assert {p.split("/")[1] for p in free if p.startswith("adapters/")} == {"encoder"}


# --------------------------------------------------------------------- loop


@pytest.mark.slow
def test_finetune_modernbert_with_prompts_on_glue_rows(tmp_path):
  """`finetune` on SST-2-format rows (a WordPiece vocab, a random ModernBERT) with method
  'prompt': the loop runs and best/ restores with the trained prompts."""
  from bert_jax import finetune  # pylint: disable=import-outside-toplevel
  from test_finetune import _vocab  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
  rows = [(" ".join(rng.choice(good if y else bad, 3)) + " film", y)
          for y in rng.randint(0, 2, 16)]
  (tmp_path / "SST-2").mkdir()
  for split in ("train", "dev"):
    (tmp_path / "SST-2" / f"{split}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
  vocab = _vocab(tmp_path / "vocab.txt", [t for t, _ in rows])
  config = _config("modernbert", "prompt")
  config.model.vocab_size = len(vocab.read_text().split())
  config.update_from_flattened_dict({
      "task": "glue", "glue_task": "sst2", "data.tokenizer": str(vocab),
      "data.data_dir": str(tmp_path), "data.max_length": 16, "train.batch_size": 8,
      "eval.batch_size": 16, "train.num_epochs": 2, "optim.learning_rate": 3e-3,
      "checkpoint.every_epochs": 100, "log.every_steps": 1, "log.progress": False})
  workdir = str(tmp_path / "run")
  scores = finetune.finetune(config, workdir)
  assert "eval/dev/accuracy" in scores
  run = finetune._setup(config)
  assert isinstance(run.model, peft_modules.PromptModel) and run.model.stack == "modernbert"
  best, _, _ = finetune._restore_best(config, run, workdir)
  assert {"prompt", "encoder", "classifier"} <= set(best)  # the delta joined to its base
  assert np.asarray(best["prompt"]).shape == (PROMPTS, HIDDEN)
