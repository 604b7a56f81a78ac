"""ALBERT as options of the BERT encoder: factorised embeddings, cross-layer sharing.

Import and export parity with Hugging Face transformers' Albert* classes
(PyTorch, CPU) at max abs diff <= 1e-4 on random weights, in two shapes
(embedding narrower and wider relative to hidden, different depths); the
parameter layout of each sharing mode; sharded = unsharded; ALBERT-base's
published parameter count.
"""
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import models, sharding
from bert_jax.convert import CheckpointError
from bert_jax.models import bert

from conftest import random_hf_folder, random_params
from test_convert_bert import _batch, _close, _hf, _ours, _round_trip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two shapes: E < H with 2 layers, and E > H with 3 layers (and 3 heads).
SHAPES = {
    "e32_h64_l2": dict(vocab_size=99, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128,
                       max_position_embeddings=40),
    "e40_h24_l3": dict(vocab_size=99, embedding_size=40, hidden_size=24, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=56,
                       max_position_embeddings=40),
}
OUTPUTS = {
    "AlbertForPreTraining": {"mlm_logits": "prediction_logits", "nsp_logits": "sop_logits"},
    "AlbertForMaskedLM": {"mlm_logits": "logits"},
    "AlbertForSequenceClassification": {"logits": "logits"},
    "AlbertForTokenClassification": {"logits": "logits"},
    "AlbertForQuestionAnswering": {"start_logits": "start_logits", "end_logits": "end_logits"},
}
TINY = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
            max_position_embeddings=24, embedding_size=16, model_type="albert",
            dropout_rate=0.0, attention_dropout_rate=0.0)


def _random_hf(cls_name, tmp_path, shape, seed=0, **config):
  torch.manual_seed(seed)
  hf_config = transformers.AlbertConfig(**{**SHAPES[shape], **config})
  model = getattr(transformers, cls_name)(hf_config).eval()
  return random_hf_folder(model, tmp_path / f"{cls_name}_{shape}")


# ---------------------------------------------------------------------------
# Import: transformers' outputs from our parameters.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_albert_model_hidden_states_and_pooler_match_transformers(tmp_path, shape):
  reference, folder = _random_hf("AlbertModel", tmp_path, shape)
  model, params = bert_jax.from_pretrained(folder)
  assert isinstance(model, bert.BertModel) and model.add_pooler
  cfg = model.config
  assert (cfg.model_type, cfg.share_layers, cfg.hidden_act) == ("albert", "all", "gelu_tanh")
  assert cfg.embedding_size == SHAPES[shape]["embedding_size"]
  assert set(params["encoder"]) == {"embeddings", "layer_0", "pooler"}  # one stored layer
  ids, types, mask = _batch()
  hidden, pooled = _ours(model, params, ids, types)
  out = _hf(reference, ids, types, mask)
  _close(hidden, out.last_hidden_state, where=mask.astype(bool))
  _close(pooled, out.pooler_output)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("cls_name,config", [
    ("AlbertForPreTraining", {}), ("AlbertForMaskedLM", {}),
    ("AlbertForSequenceClassification", {"num_labels": 3}),
])
def test_albert_heads_match_transformers(tmp_path, shape, cls_name, config):
  reference, folder = _random_hf(cls_name, tmp_path, shape, **config)
  model, params = bert_jax.from_pretrained(folder)
  assert type(model).__name__ == cls_name.replace("Albert", "Bert")
  ids, types, mask = _batch()
  ours, theirs = _ours(model, params, ids, types), _hf(reference, ids, types, mask)
  assert set(ours) == set(OUTPUTS[cls_name])
  for key, attr in OUTPUTS[cls_name].items():
    _close(ours[key], getattr(theirs, attr))  # every position, padding included


@pytest.mark.parametrize("cls_name,config", [
    ("AlbertForTokenClassification", {"num_labels": 5}), ("AlbertForQuestionAnswering", {}),
    ("AlbertForMaskedLM", {"num_hidden_groups": 2}),  # one group per layer: nothing shared
])
def test_albert_other_heads_and_unshared_groups_match_transformers(tmp_path, cls_name, config):
  reference, folder = _random_hf(cls_name, tmp_path, "e32_h64_l2", **config)
  model, params = bert_jax.from_pretrained(folder)
  if "num_hidden_groups" in config:
    assert model.config.share_layers == "none" and "layer_1" in params["encoder"]
  ids, types, mask = _batch()
  ours, theirs = _ours(model, params, ids, types), _hf(reference, ids, types, mask)
  for key, attr in OUTPUTS[cls_name].items():
    _close(ours[key], getattr(theirs, attr))


def test_mlm_positions_gather_the_factorised_head(tmp_path):
  reference, folder = _random_hf("AlbertForMaskedLM", tmp_path, "e40_h24_l3")
  model, params = bert_jax.from_pretrained(folder)
  ids, types, mask = _batch()
  theirs = _hf(reference, ids, types, mask).logits
  positions = np.array([[0, 5, 10], [1, 2, 6], [3, 0, 0]])
  gathered = _ours(model, params, ids, types, mlm_positions=positions)["mlm_logits"]
  _close(gathered, torch.stack([theirs[b, torch.tensor(positions[b])] for b in range(3)]))


@pytest.mark.parametrize("field,value", [("inner_group_num", 2), ("num_hidden_groups", 2)])
def test_unsupported_layer_groups_are_an_error_naming_the_field(tmp_path, field, value):
  _, folder = _random_hf("AlbertModel", tmp_path, "e40_h24_l3")
  config = json.loads((folder / "config.json").read_text())
  config[field] = value
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=f"{field}={value} is not supported"):
    bert_jax.from_pretrained(folder)


# ---------------------------------------------------------------------------
# Export: transformers loads what we write and computes what we compute.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_import_export_round_trip_through_transformers(tmp_path, shape):
  reference, folder = _random_hf("AlbertForPreTraining", tmp_path, shape)
  _, reloaded = _round_trip(transformers.AlbertForPreTraining, folder, tmp_path / "exported")
  ids, types, mask = _batch()
  a, b = _hf(reference, ids, types, mask), _hf(reloaded, ids, types, mask)
  _close(a.prediction_logits.numpy(), b.prediction_logits)
  _close(a.sop_logits.numpy(), b.sop_logits)


@pytest.mark.parametrize("task,kwargs,share", [
    ("encoder", {}, "all"), ("mlm", {}, "all"), ("mlm", {}, "none"),
    ("sequence_classification", {"num_labels": 2}, "all"),
    ("token_classification", {"num_labels": 4}, "all"), ("question_answering", {}, "all"),
])
def test_bert_jax_albert_exports_to_transformers(tmp_path, task, kwargs, share):
  cfg = bert.BertConfig(**{**TINY, "share_layers": share, "hidden_act": "gelu_new"})
  model = bert.build(cfg, task, **kwargs)
  ids, types, mask = _batch(length=11)
  params = random_params(model, ids)
  out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "albert" and config["hidden_act"] == "gelu_new"
  reloaded, info = getattr(transformers, config["architectures"][0]).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs, ours = _hf(reloaded.eval(), ids, types, mask), _ours(model, params, ids, types)
  if task == "encoder":
    _close(ours[0], theirs.last_hidden_state)
    _close(ours[1], theirs.pooler_output)
    return
  for key, value in ours.items():
    _close(value, getattr(theirs, {"mlm_logits": "logits"}.get(key, key)))


@pytest.mark.parametrize("fields,match", [
    (dict(share_layers="attention"), "share_layers='attention'"),
    (dict(embedding_size=0), "embedding_size > 0"),
    (dict(model_type="bert"), "set model_type='albert'"),
])
def test_unexportable_configs_are_an_error_naming_the_field(tmp_path, fields, match):
  model = bert.BertForMaskedLM(bert.BertConfig(**{**TINY, **fields}))
  params = random_params(model, jnp.ones((1, 4), jnp.int32))
  with pytest.raises(CheckpointError, match=match):
    bert_jax.save_pretrained(model, params, tmp_path / "out")


# ---------------------------------------------------------------------------
# Sharing: what is stored, what is computed.
# ---------------------------------------------------------------------------
def _layers(params):
  return {name: set(sub) for name, sub in params["encoder"].items() if name.startswith("layer_")}


def test_sharing_modes_store_each_shared_part_once():
  ids = jnp.ones((2, 9), jnp.int32)
  full = {"attention", "attention_norm", "mlp", "mlp_norm"}
  expect = {
      "none": {f"layer_{i}": full for i in range(3)},
      "all": {"layer_0": full},
      "attention": {"layer_0": full, "layer_1": {"mlp", "mlp_norm"},
                    "layer_2": {"mlp", "mlp_norm"}},
      "ffn": {"layer_0": full, "layer_1": {"attention", "attention_norm"},
              "layer_2": {"attention", "attention_norm"}},
  }
  for share, layers in expect.items():
    model = bert.BertModel(bert.BertConfig(**{**TINY, "share_layers": share}))
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert _layers(flax.linen.unbox(boxed)["params"]) == layers, share
    # Every parameter still carries logical axis names.
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim
               for x in leaves)


@pytest.mark.parametrize("share", ["all", "attention", "ffn"])
def test_shared_model_equals_unshared_model_with_copied_parts(share):
  # A shared model computes what the unshared one does when its layers hold
  # copies of layer 0's shared parts: sharing changes storage, not compute.
  ids, types, _ = _batch(length=9)
  shared = bert.BertModel(bert.BertConfig(**{**TINY, "share_layers": share}))
  params = random_params(shared, ids)
  plain = bert.BertModel(bert.BertConfig(**TINY))
  copied = jax.tree.map(lambda x: x, params)  # a new tree, same leaves
  layer0 = params["encoder"]["layer_0"]
  for i in range(3):
    own = params["encoder"].get(f"layer_{i}", {}) if share != "all" else {}
    copied["encoder"][f"layer_{i}"] = {**layer0, **(own if i else {})}
  a, _ = _ours(shared, params, ids, types)
  b, _ = _ours(plain, copied, ids, types)
  np.testing.assert_allclose(a, b, atol=1e-6)
  # ...and differs from using layer 0 once: the shared block really is applied 3 times.
  once = bert.BertModel(bert.BertConfig(**{**TINY, "num_layers": 1}))
  c, _ = _ours(once, {"encoder": {k: v for k, v in copied["encoder"].items()
                                  if k in ("embeddings", "layer_0", "pooler")}}, ids, types)
  assert not np.allclose(a, c, atol=1e-3)


def test_remat_with_sharing_keeps_outputs_and_gradients():
  # 'attention' sharing calls layer 0 once per layer for its attention and
  # layer i for its own FFN: both kinds of call, under remat, with dropout
  # (every call draws its own mask). Two layers: dropout sites are slow to compile.
  ids, types, _ = _batch(length=9)
  cfg = {**TINY, "share_layers": "attention", "dropout_rate": 0.1, "num_layers": 2}
  plain = bert.BertForMaskedLM(bert.BertConfig(**cfg))
  remat = bert.BertForMaskedLM(bert.BertConfig(**cfg, remat=True))
  params = random_params(plain, ids)

  def loss(model, p):
    logits = model.apply({"params": p}, jnp.asarray(ids, jnp.int32), enable_dropout=True,
                         rngs={"dropout": jax.random.key(3)})["mlm_logits"]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  grads = [jax.jit(jax.grad(lambda p, m=m: loss(m, p)))(params) for m in (plain, remat)]
  assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_small_albert_sharded_on_fsdp_tensor_mesh_matches_unsharded():
  cfg = bert.BertConfig(**{**TINY, "share_layers": "all", "vocab_size": 128})
  model = bert.BertForPreTraining(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 128, (4, 8)), jnp.int32)
  positions = jnp.array([[1, 2]] * 4)
  mesh = sharding.make_mesh(2, 2, 2)
  rules = sharding.get_rules("fsdp_tensor")
  init = lambda key: model.init(key, tokens)
  shardings = sharding.logical_to_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = flax.linen.unbox(jax.jit(init, out_shardings=shardings)(jax.random.key(0)))["params"]
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mlm_positions=positions))
    sharded = apply(params, tokens)
  word = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]  # [vocab, E]
  assert word.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  projection = params["encoder"]["embeddings"]["projection"]["kernel"]  # [E, H]
  assert projection.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  host = jax.device_get(params)
  plain = jax.jit(lambda p: model.apply({"params": p}, tokens, mlm_positions=positions))(host)
  for key in ("mlm_logits", "nsp_logits"):
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(plain[key]), atol=1e-5)


# ---------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------
def test_albert_base_has_the_published_12m_parameters():
  # Lan et al. 2020, Table 1: ALBERT-base 12M (vocab 30000, E 128, H 768, 12
  # shared layers). transformers' AlbertModel(albert-base-v2) has 11,683,584.
  cfg = models.get("bert").preset("base", vocab_size=30000, embedding_size=128,
                                  share_layers="all", model_type="albert")
  model = models.get("bert").build(cfg, "encoder")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.unbox(shapes)))
  assert count == 11_683_584
  unshared = bert.BertModel(bert.BertConfig(**{**cfg.__dict__, "share_layers": "none"}))
  shapes = jax.eval_shape(unshared.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.unbox(shapes))) == (
      count + 11 * 7_087_872)  # 11 more stored layers of 7.09M each
