"""DeBERTa-v3 pretraining: replaced-token detection with a DeBERTa generator and
discriminator, gradient-disentangled embedding sharing (GDES), the enhanced
mask decoder (EMD), the discriminator's export and fine-tuning from a pretraining
workdir, FLOPs, and loading DeBERTa's spm.model.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf

import bert_jax
from bert_jax import checkpoint as checkpoint_lib
from bert_jax import defaults
from bert_jax import finetune_init
from bert_jax import init_from
from bert_jax import losses
from bert_jax import models
from bert_jax import recipe
from bert_jax import sharding
from bert_jax import steps
from bert_jax import train
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import deberta
from bert_jax.models import flops
from bert_jax.models.deberta_config import DebertaConfig
from conftest import sgd_step_on_mesh

VOCAB = 64
# 2-layer discriminator, 1-layer generator (half depth), 8 log buckets over +-32.
TINY = DebertaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                     intermediate_size=64, max_position_embeddings=32, position_buckets=8,
                     max_relative_positions=32, hidden_dropout=0.0, attention_dropout=0.0,
                     enhanced_mask_decoder=True, embedding_sharing="gdes")


def _batch(seed=0, batch=4, length=12, slots=4):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(5, VOCAB, (batch, length)).astype(np.int32)
  tokens[-1, length - 3:] = 0  # padding in the last row
  positions = np.stack([np.sort(rng.choice(np.arange(1, length - 3), slots, replace=False))
                        for _ in range(batch)]).astype(np.int32)
  weights = np.ones((batch, slots), np.float32)
  weights[0, -1] = 0.0  # a padding slot
  targets = np.take_along_axis(tokens, positions, 1)
  tokens = tokens.copy()
  np.put_along_axis(tokens, positions, 4, 1)  # [MASK]
  return dict(encoder_input_tokens=tokens, mlm_positions=positions, mlm_targets=targets,
              mlm_weights=weights)


def _init(model, seed=0):
  variables = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 4), jnp.int32)))(
      jax.random.PRNGKey(seed))
  return flax.linen.unbox(variables)["params"]


@pytest.fixture(scope="module")
def gdes():
  model = deberta.build(TINY, "electra")
  return model, _init(model)


def _largest(tree):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def _grads(model, params, batch, term):
  def loss(p):
    out = model.apply({"params": p}, **batch, rngs={"sample": jax.random.PRNGKey(7)})
    if term == "rtd":
      real = (batch["encoder_input_tokens"] != 0).astype(jnp.float32)
      return losses.rtd_loss(out["rtd_logits"], out["rtd_labels"], real)[0]
    return losses.mlm_loss(out["mlm_logits"], batch)[0]
  return jax.jit(jax.grad(loss))(params)


def test_layout_and_generator_depth(gdes):
  model, params = gdes
  assert set(params) == {"encoder", "rtd", "generator", "generator_mlm"}
  # Half depth (the v3 recipe), same width; the discriminator owns deltas, not tables.
  assert {k for k in params["generator"] if k.startswith("layer_")} == {"layer_0"}
  assert {k for k in params["encoder"] if k.startswith("layer_")} == {"layer_0", "layer_1"}
  assert "word_embeddings" not in params["encoder"]
  assert params["encoder"]["word_embeddings_delta"]["embedding"].shape == (VOCAB, 32)
  # The EMD's absolute table lives in the generator only (the discriminator has none, as v3).
  assert "position_embeddings" in params["generator"]
  assert not any(k.startswith("position") for k in params["encoder"])
  assert TINY.generator().num_layers == 1
  assert dataclasses.replace(TINY, generator_layers=2).generator().num_layers == 2
  assert models.get("deberta").tasks == tuple(deberta.TASKS) and "electra" in deberta.TASKS


def test_gdes_starts_at_the_generators_table_and_splits_the_gradients(gdes):
  model, params = gdes
  batch = _batch(seed=1)
  # E_delta starts at zero: the discriminator's effective table is the generator's.
  assert _largest(params["encoder"]["word_embeddings_delta"]) == 0.0
  _, merged = deberta.discriminator(model, params)
  np.testing.assert_array_equal(merged["encoder"]["word_embeddings"]["embedding"],
                                params["generator"]["word_embeddings"]["embedding"])
  rtd = _grads(model, params, batch, "rtd")
  # The RTD loss reaches the delta and the discriminator, never the generator's table.
  assert _largest(rtd["generator"]) == 0.0 and _largest(rtd["generator_mlm"]) == 0.0
  assert _largest(rtd["encoder"]["word_embeddings_delta"]) > 0
  assert _largest(rtd["encoder"]["layer_0"]) > 0 and _largest(rtd["rtd"]) > 0
  # The MLM loss trains the generator's table and nothing of the discriminator.
  mlm = _grads(model, params, batch, "mlm")
  assert _largest(mlm["generator"]["word_embeddings"]) > 0
  assert _largest(mlm["encoder"]) == 0.0 and _largest(mlm["rtd"]) == 0.0


def test_tied_sharing_lets_the_rtd_loss_reach_the_shared_table():
  """The contrast: with one tied table (ELECTRA's) the RTD loss does move it."""
  model = deberta.build(dataclasses.replace(TINY, embedding_sharing="tied"), "electra")
  params = _init(model)
  assert "word_embeddings" in params["encoder"] and "word_embeddings" not in params["generator"]
  rtd = _grads(model, params, _batch(seed=1), "rtd")
  assert _largest(rtd["encoder"]["word_embeddings"]) > 0
  assert _largest(rtd["generator"]) == 0.0  # the sample carries no gradient


def test_discriminator_export_adds_the_delta_and_loads_in_transformers(gdes, tmp_path):
  model, params = gdes
  delta = 0.1 * np.random.RandomState(0).standard_normal((VOCAB, 32)).astype(np.float32)
  params = dict(params, encoder=dict(params["encoder"],
                                     word_embeddings_delta={"embedding": jnp.asarray(delta)}))
  plain, merged = deberta.discriminator(model, params)
  tokens = _batch(seed=2)["encoder_input_tokens"]
  # The plain model on the merged table = the GDES encoder on generator table + delta.
  gdes_encoder = deberta.DebertaEncoder(dataclasses.replace(TINY, enhanced_mask_decoder=False),
                                        sharing="gdes")
  want = gdes_encoder.apply({"params": params["encoder"]}, tokens,
                            tables={"word": params["generator"]["word_embeddings"]["embedding"]})
  got, _ = plain.apply({"params": merged}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  bert_jax.save_pretrained(plain, merged, tmp_path / "disc")
  hf = transformers.DebertaV2Model.from_pretrained(tmp_path / "disc").eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(tokens != 0, dtype=torch.long)).last_hidden_state
  real = tokens != 0
  np.testing.assert_allclose(theirs.numpy()[real], np.asarray(got)[real], atol=1e-4)


def test_emd_changes_the_mlm_logits_and_is_off_for_hf_parity():
  assert DebertaConfig().enhanced_mask_decoder is False  # HF import/export default
  from bert_jax.convert import deberta as convert  # pylint: disable=import-outside-toplevel
  hf = convert.hf_config_fields(DebertaConfig.preset("tiny"))
  assert convert.config_from_hf(hf).enhanced_mask_decoder is False
  batch = _batch(seed=3)
  args = (batch["encoder_input_tokens"],)
  emd_model = deberta.build(TINY, "mlm")
  params = _init(emd_model, seed=1)
  assert params["encoder"]["position_embeddings"]["embedding"].shape == (32, 32)
  plain_params = dict(params, encoder={k: v for k, v in params["encoder"].items()
                                       if k != "position_embeddings"})
  plain_model = deberta.build(dataclasses.replace(TINY, enhanced_mask_decoder=False), "mlm")
  kwargs = dict(mlm_positions=batch["mlm_positions"])
  with_emd = emd_model.apply({"params": params}, *args, **kwargs)["mlm_logits"]
  without = plain_model.apply({"params": plain_params}, *args, **kwargs)["mlm_logits"]
  assert float(jnp.max(jnp.abs(with_emd - without))) > 1e-3
  # The EMD is where absolute positions enter: a different table, different logits.
  shifted = jax.tree.map(lambda x: x, params)
  shifted["encoder"]["position_embeddings"] = {
      "embedding": params["encoder"]["position_embeddings"]["embedding"][::-1]}
  moved = emd_model.apply({"params": shifted}, *args, **kwargs)["mlm_logits"]
  assert float(jnp.max(jnp.abs(moved - with_emd))) > 1e-3
  # ... and never the encoder's own output (position_biased_input is off).
  hidden = lambda p: deberta.build(TINY, "encoder").apply({"params": p}, *args)[0]  # noqa: E731
  np.testing.assert_array_equal(hidden(params), hidden(shifted))


LR = 0.1  # SGD: the loss falls on one batch within 8 steps (1.0 diverges)


@pytest.fixture(scope="module")
def dp_run(gdes):
  """8 SGD(LR) steps of objective 'electra' on one batch, data-parallel over 8 devices:
  (batch, first step's metrics, its parameter change, every step's loss, last params)."""
  model, _ = gdes
  batch = _batch(seed=5, batch=8, length=16, slots=3)
  mesh = sharding.make_mesh(8, 1, 1)
  rules = sharding.get_rules("data_parallel")
  tx = optax.sgd(LR)
  state, shardings = steps.create_sharded_state(model, tx, batch, mesh, rules, rng=0)
  step = steps.make_train_step(model, tx, "electra", shardings, sharding.batch_sharding(mesh),
                               rules=rules)
  placed = jax.device_put(batch, sharding.batch_sharding(mesh))
  before = jax.device_get(state.params)
  history, first = [], None
  for _ in range(8):
    state, metrics = step(state, placed)
    history.append(float(metrics["loss"]))
    if first is None:
      first = (jax.device_get(metrics),
               jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params)))
  return batch, first[0], first[1], history, jax.device_get(state.params)


def test_rtd_objective_trains(dp_run):
  """A few SGD steps of objective 'electra' on one batch: finite, the loss falls."""
  _, _, _, history, params = dp_run
  assert np.all(np.isfinite(history)), history
  assert np.mean(history[-2:]) < np.mean(history[:2]), history
  # The generator's table moved (MLM) and so did the delta (RTD).
  assert _largest(params["encoder"]["word_embeddings_delta"]) > 0


@pytest.mark.slow  # one more compile of the three-model step: ~25 s alone on 2 CPU cores
def test_sharded_rtd_step_equals_data_parallel(gdes, dp_run):
  """FSDP + tensor sharding on (2, 2, 2) draws the same samples and gives the same update."""
  batch, plain, plain_delta, _, _ = dp_run
  metrics, delta, _ = sgd_step_on_mesh(gdes[0], "electra", batch, "fsdp_tensor", (2, 2, 2))
  for key in ("loss", "mlm/loss_sum", "rtd/loss_sum", "rtd/positives"):
    assert float(metrics[key]) == pytest.approx(float(plain[key]), rel=1e-5), key
  # The helper steps SGD(1.0): its change is 1 / LR times the fixture's.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a * LR, b, rtol=1e-4, atol=1e-7),
               delta, plain_delta)


def test_finetuning_from_a_gdes_workdir_starts_from_the_plain_discriminator(gdes, tmp_path):
  """A `bert-jax train` workdir of objective 'electra' (GDES + EMD): finetune_init gives the
  plain discriminator, word table = generator's + delta, as deberta.discriminator folds it."""
  model, params = gdes
  config = defaults.train_config()
  config.family, config.train.objective = "deberta", "electra"
  config.model = ml_collections.ConfigDict(dict(dataclasses.asdict(TINY), dtype="float32"))
  config.data.tokenizer = str(tmp_path / "vocab.txt")  # recorded only; not read here
  mesh, rules = sharding.make_mesh(8, 1, 1), sharding.get_rules("data_parallel")
  shapes = steps.init_shapes(models.get("deberta").init_features)
  tx, _ = recipe.make_optimizer(config, model, shapes)
  # The fixture's params with a non-zero delta, as after RTD training, so a fold that
  # drops it shows; the optimizer state the run's config makes (restore checks it).
  delta = 0.1 * np.random.RandomState(0).standard_normal((VOCAB, 32)).astype(np.float32)
  saved = dict(params, encoder=dict(params["encoder"],
                                    word_embeddings_delta={"embedding": jnp.asarray(delta)}))
  state = steps.TrainState(step=jnp.int32(1), params=saved, opt_state=tx.init(saved),
                           rng=jax.random.PRNGKey(0))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=1,
                                     async_save=False)
  ckpt.save(1, state, data_position=None, config=config, force=True)
  ckpt.close()

  ft = defaults.finetune_config()
  ft.family, ft.init_from = "deberta", str(tmp_path)
  cfg, loaded = finetune_init.model_config(ft, mesh, rules)
  assert not cfg.enhanced_mask_decoder and cfg.num_layers == TINY.num_layers
  assert set(loaded) == {"encoder"}
  assert not any(k.endswith("_delta") or k.startswith("position") for k in loaded["encoder"])
  np.testing.assert_allclose(loaded["encoder"]["word_embeddings"]["embedding"],
                             saved["generator"]["word_embeddings"]["embedding"] + delta)
  # Into a fresh classification model (every encoder tensor replaced) and run forward.
  family = models.get("deberta")
  task_model = family.build(cfg, "sequence_classification", num_labels=2)
  fresh = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), flax.linen.unbox(
      jax.eval_shape(task_model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  )["params"])  # NaN: a tensor left unloaded shows in the forward below
  filled = init_from.load_pretrained(fresh, loaded, jax.tree.map(lambda _: None, fresh), family,
                                     cfg.num_layers)
  _, merged = deberta.discriminator(model, saved)
  jax.tree.map(np.testing.assert_array_equal, filled["encoder"], merged["encoder"])
  # The fine-tuning encoder computes what the pretraining discriminator did (GDES tables).
  tokens = _batch(seed=6)["encoder_input_tokens"]
  got, _ = deberta.build(cfg, "encoder").apply({"params": {"encoder": filled["encoder"]}}, tokens)
  gdes_encoder = deberta.DebertaEncoder(dataclasses.replace(TINY, enhanced_mask_decoder=False),
                                        sharing="gdes")
  want = gdes_encoder.apply({"params": saved["encoder"]}, tokens,
                            tables={"word": saved["generator"]["word_embeddings"]["embedding"]})
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Continued pretraining (finetuning=False) keeps the run's own tensors.
  raw = init_from.load(str(tmp_path), "deberta", jnp.float32, mesh, rules, lower_case=True)
  assert "word_embeddings_delta" in raw.params["encoder"] and "generator" in raw.params

  # Continued MLM pretraining from the RTD workdir (`bert-jax train` with another objective)
  # starts from the same plain discriminator, with a fresh MLM head. At learning rate 0
  # its step-1 checkpoint holds exactly the folded discriminator.
  vocab = tmp_path / "mlm_vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                             [f"w{i}" for i in range(VOCAB - 5)]) + "\n")
  mlm = defaults.train_config()
  mlm.family, mlm.train.objective, mlm.init_from = "deberta", "mlm", str(tmp_path)
  mlm.model = ml_collections.ConfigDict(dict(dataclasses.asdict(TINY), dtype="float32",
                                             enhanced_mask_decoder=False))
  mlm.data.update(tokenizer=str(vocab), seq_length=16, max_predictions=3)
  mlm.train.update(batch_size=8, num_steps=1)
  mlm.optim.update(learning_rate=0.0, schedule="constant", warmup_steps=0)
  mlm.log.progress, mlm.checkpoint.async_save = False, False
  train.train_and_evaluate(mlm, str(tmp_path / "mlm"))
  continued = init_from.load(str(tmp_path / "mlm"), "deberta", jnp.float32, mesh, rules,
                             lower_case=True)
  assert set(continued.params) == {"encoder", "mlm"}
  jax.tree.map(np.testing.assert_array_equal, continued.params["encoder"], merged["encoder"])


def test_flops_count_generator_emd_and_discriminator():
  s, p, h = 16, 3, TINY.hidden_size
  no_emd = dataclasses.replace(TINY, enhanced_mask_decoder=False)
  one_layer = flops.deberta_train_flops(dataclasses.replace(no_emd, num_layers=1), s, 0)
  # The EMD re-runs the last layer twice over the whole sequence.
  assert flops.deberta_train_flops(TINY, s, p) == pytest.approx(
      flops.deberta_train_flops(no_emd, s, p) + 2 * one_layer)
  expected = (flops.deberta_train_flops(TINY.generator(), s, p)  # generator + EMD + MLM head
              + flops.deberta_train_flops(no_emd, s, 0)  # discriminator layers, no EMD
              + 3 * (2 * s * h * h + 2 * s * h))  # RTD head
  assert flops.deberta_electra_train_flops(TINY, s, p) == pytest.approx(expected)
  shapes = {"encoder_input_tokens": (1, s), "mlm_positions": (1, p)}
  family = models.get("deberta")
  assert family.train_flops(TINY, shapes, "electra") == pytest.approx(expected)
  assert family.train_flops(TINY, shapes, "mlm") < expected


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"^DebertaConfig\.embedding_sharing: "):
    dataclasses.replace(TINY, embedding_sharing="es")
  with pytest.raises(ValueError, match=r"^DebertaConfig\.generator_layers: "):
    dataclasses.replace(TINY, generator_layers=3)
  with pytest.raises(ValueError, match="needs DebertaConfig.enhanced_mask_decoder"):
    deberta.DebertaEncoder(dataclasses.replace(TINY, enhanced_mask_decoder=False)).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), return_emd=True)


def test_deberta_v3_configs_pretrain_with_rtd_and_gdes():
  from configs import deberta_v3  # pylint: disable=import-outside-toplevel
  for variant, disc, gen in (("base", 12, 6), ("small", 6, 3)):
    config = deberta_v3.get_config(variant)
    assert config.train.objective == "electra" and config.family == "deberta"
    model = config.model
    assert (model.num_layers, model.generator_layers) == (disc, gen)
    assert model.embedding_sharing == "gdes" and model.enhanced_mask_decoder


def test_tokenizer_from_a_deberta_folder_with_only_spm_model(tmp_path):
  texts = ["the movie was good", "a very bad film", "not so quite the movie"] * 4
  tok = tokenizer_lib.train_sentencepiece(iter(texts), str(tmp_path / "spm"), 16, extra_ids=0,
                                          bert_special_tokens=True, model_type="word")
  folder = tmp_path / "deberta"
  folder.mkdir()
  (folder / "spm.model").write_bytes((tmp_path / "spm.model").read_bytes())
  (folder / "config.json").write_text("{}")
  loaded = tokenizer_lib.load_tokenizer(str(folder))
  assert isinstance(loaded, tokenizer_lib.SentencePieceTokenizer)
  # DeBERTa's vocabulary: the model's pieces, no T5 sentinels appended.
  assert loaded.vocab_size == tok.vocab_size == 16 and loaded.pieces == tok.pieces
  texts = tf.constant(["the movie was good"])
  assert loaded.tokenize(texts).to_list() == tok.tokenize(texts).to_list()
  assert loaded.pad_id == 0 and loaded.mask_id is not None
  (folder / "spm.model").unlink()
  with pytest.raises(FileNotFoundError, match="spm.model"):
    tokenizer_lib.load_tokenizer(str(folder))
