"""BERT model: config, heads, masking, packing, sharding and dtype behaviour.

Parity with Hugging Face lives in test_convert_bert.py; these tests check the
model's own properties on randomly initialised tiny configs (BERT-base only
for the sharding test).
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import sharding
from bert_jax.models import bert

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            max_position_embeddings=24, dropout_rate=0.1, attention_dropout_rate=0.1)


def _init(model, tokens, seed=0):
  """Random float32 params of `model` (numpy: jax's initialisers are slow to compile)."""
  shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + 0.05 * rng.standard_normal(s.shape)
                       ).astype(np.float32), shapes)


def _tokens(batch=2, length=9, seed=0, vocab=97):
  tokens = np.random.RandomState(seed).randint(1, vocab, (batch, length)).astype(np.int32)
  tokens[1, length - 3:] = 0  # padding
  return jnp.asarray(tokens)


@pytest.mark.parametrize("name,layers_,hidden", [
    ("tiny", 2, 128), ("mini", 4, 256), ("small", 4, 512), ("medium", 8, 512),
    ("base", 12, 768), ("large", 24, 1024)])
def test_presets_follow_turc_sizes(name, layers_, hidden):
  cfg = bert.BertConfig.preset(name)
  assert (cfg.num_layers, cfg.hidden_size) == (layers_, hidden)
  assert cfg.num_heads == hidden // 64 and cfg.intermediate_size == 4 * hidden
  assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (30522, 512, 2)


def test_preset_overrides_and_errors_name_the_cause():
  assert bert.BertConfig.preset("tiny", vocab_size=100).vocab_size == 100
  with pytest.raises(ValueError, match="'huge'.*tiny.*large"):
    bert.BertConfig.preset("huge")
  with pytest.raises(ValueError, match="num_layer"):
    bert.BertConfig.from_dict({"num_layer": 3})
  with pytest.raises(ValueError, match="hidden_act 'gelu_fast'"):
    bert.BertConfig(hidden_act="gelu_fast")
  with pytest.raises(ValueError, match="not a multiple of num_heads"):
    bert.BertConfig(hidden_size=100, num_heads=3)
  with pytest.raises(ValueError, match="unknown BERT task 'ner'"):
    bert.build(bert.BertConfig.preset("tiny"), "ner")


def test_sequence_longer_than_position_table_is_an_error():
  model = bert.BertModel(bert.BertConfig(**TINY))  # 24 positions
  with pytest.raises(ValueError, match="sequence length 25 exceeds the model's 24 positions"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 25), jnp.int32))
  roberta = bert.BertModel(bert.BertConfig(**TINY, pad_token_id=1, position_offset=2))
  with pytest.raises(ValueError, match="23 exceeds the model's 22 positions"):
    jax.eval_shape(roberta.init, jax.random.key(0), jnp.ones((1, 23), jnp.int32))


def test_every_parameter_has_logical_names_and_float32():
  model = bert.BertForPreTraining(bert.BertConfig(**TINY, dtype=jnp.bfloat16))
  boxed = jax.eval_shape(model.init, jax.random.key(0), _tokens())
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  assert all(x.value.dtype == jnp.float32 for x in leaves)


def test_head_output_shapes():
  cfg = bert.BertConfig(**TINY)
  tokens, positions = _tokens(), jnp.array([[1, 2, 3], [0, 4, 5]])
  expect = {
      "encoder": None,
      "pretraining": {"mlm_logits": (2, 3, 97), "nsp_logits": (2, 2)},
      "mlm": {"mlm_logits": (2, 3, 97)},
      "sequence_classification": {"logits": (2, 1)},
      "token_classification": {"logits": (2, 9, 5)},
      "question_answering": {"start_logits": (2, 9), "end_logits": (2, 9)},
  }
  for task, shapes in expect.items():
    kwargs = {"sequence_classification": {"num_labels": 1},
              "token_classification": {"num_labels": 5}}.get(task, {})
    model = bert.build(cfg, task, **kwargs)
    # Shapes only: eval_shape traces without computing (fast on CPU).
    params = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
    out = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, mlm_positions=positions),
                         params)
    if task == "encoder":
      assert out[0].shape == (2, 9, 32) and out[1].shape == (2, 32)
      assert set(params) == {"encoder"}
    else:
      assert {k: v.shape for k, v in out.items()} == shapes


def test_mlm_positions_gather_matches_full_logits():
  model = bert.BertForMaskedLM(bert.BertConfig(**TINY))
  tokens = _tokens()
  params = _init(model, tokens)
  full = model.apply({"params": params}, tokens)["mlm_logits"]  # [2, 9, vocab]
  positions = jnp.array([[0, 3, 8], [2, 2, 5]])
  gathered = model.apply({"params": params}, tokens, mlm_positions=positions)["mlm_logits"]
  expected = np.stack([np.asarray(full)[b, np.asarray(positions[b])] for b in range(2)])
  np.testing.assert_allclose(gathered, expected, atol=1e-5)


def test_padding_mask_defaults_and_explicit_mask_agree():
  model = bert.BertModel(bert.BertConfig(**TINY))
  tokens = _tokens()
  params = _init(model, tokens)
  implicit, _ = model.apply({"params": params}, tokens)
  explicit, _ = model.apply({"params": params}, tokens, encoder_mask=(tokens > 0))
  np.testing.assert_allclose(implicit, explicit, atol=1e-6)
  # Padding really is ignored: other pad-position content changes nothing valid.
  changed = tokens.at[1, -3:].set(5)
  masked, _ = model.apply({"params": params}, changed, encoder_mask=(tokens > 0))
  np.testing.assert_allclose(np.asarray(masked)[1, :6], np.asarray(implicit)[1, :6], atol=1e-5)


def test_dropout_needs_rng_and_changes_outputs():
  # One layer: every dropout site compiles its own random-bits kernel, which is slow on CPU.
  model = bert.BertForSequenceClassification(bert.BertConfig(**{**TINY, "num_layers": 1}))
  tokens = _tokens()
  params = _init(model, tokens)
  det = model.apply({"params": params}, tokens)["logits"]
  a = model.apply({"params": params}, tokens, enable_dropout=True,
                  rngs={"dropout": jax.random.key(1)})["logits"]
  b = model.apply({"params": params}, tokens, enable_dropout=True,
                  rngs={"dropout": jax.random.key(2)})["logits"]
  assert not np.allclose(a, det) and not np.allclose(a, b)
  np.testing.assert_allclose(det, model.apply({"params": params}, tokens)["logits"])
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, tokens, enable_dropout=True)


@pytest.mark.parametrize("roberta", [False, True])
def test_packed_row_equals_examples_run_alone(roberta):
  kw = dict(pad_token_id=1, position_offset=2, model_type="roberta") if roberta else {}
  model = bert.BertModel(bert.BertConfig(**TINY, **kw), add_pooler=False)
  rng = np.random.RandomState(3)
  a, b = rng.randint(2, 97, 5), rng.randint(2, 97, 4)
  ta, tb = rng.randint(0, 2, 5), rng.randint(0, 2, 4)
  pad = 1 if roberta else 0
  tokens = np.concatenate([a, b, [pad] * 3])[None]
  params = _init(model, jnp.asarray(tokens))
  packed, _ = model.apply(
      {"params": params}, jnp.asarray(tokens),
      encoder_type_ids=jnp.asarray(np.concatenate([ta, tb, [0] * 3])[None]),
      encoder_segment_ids=jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3]),
      encoder_positions=jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3]))
  alone_a, _ = model.apply({"params": params}, jnp.asarray(a[None]),
                           encoder_type_ids=jnp.asarray(ta[None]))
  alone_b, _ = model.apply({"params": params}, jnp.asarray(b[None]),
                           encoder_type_ids=jnp.asarray(tb[None]))
  np.testing.assert_allclose(packed[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:9], alone_b[0], atol=1e-5)
  assert np.isfinite(np.asarray(packed)).all()


def test_bfloat16_computation_keeps_float32_params_and_is_close():
  cfg = bert.BertConfig(**TINY)
  tokens = _tokens()
  model32 = bert.BertForPreTraining(cfg)
  params = _init(model32, tokens)
  model16 = bert.BertForPreTraining(bert.BertConfig(**TINY, dtype=jnp.bfloat16))
  boxed = jax.eval_shape(model16.init, jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(flax.linen.unbox(boxed)))
  out32 = model32.apply({"params": params}, tokens)
  out16 = model16.apply({"params": params}, tokens)
  assert out16["mlm_logits"].dtype == jnp.bfloat16
  for key in out32:
    ref = np.asarray(out32[key])
    got = np.asarray(out16[key], np.float32)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 0.02, key
  assert not np.array_equal(np.asarray(out16["mlm_logits"], np.float32), out32["mlm_logits"])


@pytest.mark.slow
def test_bert_base_sharded_on_fsdp_tensor_mesh_matches_unsharded():
  cfg = bert.BertConfig.preset("base", dropout_rate=0.0, attention_dropout_rate=0.0)
  model = bert.BertForMaskedLM(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 30522, (4, 8)), jnp.int32)
  positions = jnp.array([[1, 2]] * 4)
  mesh = sharding.make_mesh(2, 2, 2)
  rules = sharding.get_rules("fsdp_tensor")
  init = lambda key: model.init(key, tokens)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_sharding(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    params = flax.linen.unbox(boxed)["params"]
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mlm_positions=positions))
    sharded_out = apply(params, tokens)["mlm_logits"]
    # The activation constraints reach the compiled program (not silently dropped).
    assert "sharding_constraint" in apply.lower(params, tokens).as_text()

  layer = params["encoder"]["layer_0"]
  big = {
      "query": layer["attention"]["query"]["kernel"], "key": layer["attention"]["key"]["kernel"],
      "value": layer["attention"]["value"]["kernel"], "out": layer["attention"]["out"]["kernel"],
      "wi": layer["mlp"]["wi"]["kernel"], "wo": layer["mlp"]["wo"]["kernel"],
      "word": params["encoder"]["embeddings"]["word_embeddings"]["embedding"],
  }
  for name, x in big.items():
    shard = x.addressable_shards[0].data.shape
    assert np.prod(shard) < np.prod(x.shape), (name, x.sharding.spec)
  assert big["query"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert big["wi"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert big["wo"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert big["word"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")

  host = jax.device_get(params)
  plain = jax.jit(lambda p: model.apply({"params": p}, tokens, mlm_positions=positions))(host)
  plain = plain["mlm_logits"]
  np.testing.assert_allclose(np.asarray(sharded_out), np.asarray(plain), atol=1e-4)


def test_remat_keeps_parameters_outputs_and_gradients():
  tokens = _tokens()
  cfg = {**TINY, "num_layers": 1}
  plain = bert.BertForMaskedLM(bert.BertConfig(**cfg))
  remat = bert.BertForMaskedLM(bert.BertConfig(**cfg, remat=True))
  params = _init(plain, tokens)
  assert jax.tree.structure(params) == jax.tree.structure(_init(remat, tokens))

  def loss(model, p):
    logits = model.apply({"params": p}, tokens)["mlm_logits"]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  grads = [jax.jit(jax.grad(lambda p, m=m: loss(m, p)))(params) for m in (plain, remat)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dtype_given_by_name():
  cfg = bert.BertConfig.from_dict({"dtype": "bfloat16", "num_layers": 1})
  assert cfg.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="dtype 'float8_weird'"):
    bert.BertConfig(dtype="float8_weird")
