"""T5 model: position buckets, cached decoding, packing, sharding, dtypes, config.

Parity with transformers lives in test_convert_t5.py (it needs the converter).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import sharding
from bert_jax.models import t5

# REFERENCE.md: rel = memory - query -> bucket (32 buckets, max distance 128).
REL = [-128, -64, -9, -8, -7, -1, 0, 1, 8, 16, 64, 128]
BIDIRECTIONAL = [15, 14, 8, 8, 7, 1, 0, 17, 24, 26, 30, 31]
CAUSAL = [31, 26, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0]

ENC = np.array([[5, 17, 9, 33, 41, 12, 7, 60, 21, 3, 8, 1],
                [14, 22, 90, 6, 1, 0, 0, 0, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 11, 4, 19, 27, 30, 2, 52, 1],
                [0, 70, 13, 1, 0, 0, 0, 0, 0]], np.int32)


def _tiny(version: str, **overrides):
  """A tiny config whose short sequences reach the logarithmic buckets (max distance 16)."""
  fields = dict(vocab_size=96, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, dropout_rate=0.0)
  fields.update(overrides)
  return t5.T5Config.preset(f"t5_v{version}_tiny", **fields)


_PARAMS = {}


def _init(model, enc=ENC, dec=DEC, seed=0):
  # Eager, not jitted: on CPU compiling a whole init costs more than running it,
  # and eager primitives compile once per shape for the whole file. Cached per
  # parameter shapes, because initialising is the slow part of these tests.
  key = (model.config.activations, model.config.tie_word_embeddings, seed)
  if key not in _PARAMS:
    _PARAMS[key] = nn.unbox(
        model.init(jax.random.key(seed), jnp.asarray(enc), jnp.asarray(dec))["params"])
  return _PARAMS[key]


def _forward(model, params, *args, **kwargs):
  """Teacher-forced forward pass; kwargs are arrays (segment ids, positions)."""
  return model.apply({"params": params}, *args, **kwargs)


def test_relative_position_buckets_match_reference_table():
  rel = jnp.asarray(REL)
  np.testing.assert_array_equal(t5.relative_position_bucket(rel, bidirectional=True),
                                BIDIRECTIONAL)
  np.testing.assert_array_equal(t5.relative_position_bucket(rel, bidirectional=False), CAUSAL)
  # Beyond max_distance everything shares the last bucket of its direction.
  far = jnp.asarray([-1000, 1000])
  np.testing.assert_array_equal(t5.relative_position_bucket(far), [15, 31])
  np.testing.assert_array_equal(t5.relative_position_bucket(far, bidirectional=False), [31, 0])


def test_presets_and_unknown_keys():
  base = t5.T5Config.preset("t5_v1_1_base")
  assert (base.d_model, base.d_ff, base.num_heads, base.d_kv) == (768, 2048, 12, 64)
  assert base.activations == ("gelu_tanh", "linear") and not base.tie_word_embeddings
  small = t5.T5Config.preset("t5_v1_0_small")
  assert (small.d_model, small.d_ff, small.num_heads, small.num_encoder_layers) == (512, 2048, 8, 6)
  assert small.activations == ("relu",) and small.tie_word_embeddings
  large = t5.T5Config.preset("t5_v1_1_large", dtype="bfloat16")
  assert (large.d_ff, large.num_decoder_layers, large.dtype) == (2816, 24, jnp.bfloat16)
  with pytest.raises(ValueError, match="d_modle"):
    t5.T5Config.from_dict({"d_modle": 3})
  with pytest.raises(ValueError, match="unknown T5 preset"):
    t5.T5Config.preset("t5_huge")
  with pytest.raises(ValueError, match="unknown activation"):
    t5.T5Config(activations=("gelu_fast",))


def test_one_relative_bias_table_per_stack():
  params = _init(t5.T5Model(_tiny("1_1")))
  for stack in ("encoder", "decoder"):
    tables = [k for k in jax.tree_util.tree_flatten_with_path(params[stack])[0]
              if "rel_embedding" in jax.tree_util.keystr(k[0])]
    assert len(tables) == 1, stack
    assert params[stack]["relpos_bias"]["rel_embedding"].shape == (8, 4)
  assert "logits_dense" in params
  assert "logits_dense" not in _init(t5.T5Model(_tiny("1_0")))


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_cached_decoding_matches_full_forward(version):
  model = t5.T5Model(_tiny(version))
  params = _init(model)
  enc, dec = jnp.asarray(ENC), jnp.asarray(DEC)
  full = _forward(model, params, enc, dec)
  encoded = model.apply({"params": params}, enc, method=t5.T5Model.encode)
  cache = model.init(jax.random.key(1), enc, jnp.zeros_like(dec), decode=True)["cache"]

  @jax.jit
  def step(cache, token):
    logits, state = model.apply({"params": params, "cache": cache}, encoded, enc, token,
                                decode=True, method=t5.T5Model.decode, mutable=["cache"])
    return logits, state["cache"]

  for i in range(dec.shape[1]):
    logits, cache = step(cache, dec[:, i:i + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, rtol=0, err_msg=f"step {i}")
  # A stale cache would make later steps differ: check it really advanced.
  assert int(cache["decoder"]["cache_index"]) == dec.shape[1]
  with pytest.raises(ValueError, match="one token per call"):
    model.apply({"params": params, "cache": cache}, encoded, enc, dec[:, :2], decode=True,
                method=t5.T5Model.decode, mutable=["cache"])


def test_packed_examples_equal_each_alone():
  model = t5.T5Model(_tiny("1_1"))
  params = _init(model)
  enc = {"a": [7, 8, 9, 10, 1], "b": [20, 21, 22, 1]}
  dec = {"a": [0, 31, 32, 33], "b": [0, 41, 42]}

  def row(parts, values, enc_or_dec):
    """One packed row of ENC's or DEC's width: concatenation, then zeros."""
    width = (ENC if enc_or_dec is enc else DEC).shape[1]
    flat = [v for part in parts for v in values(part)]
    return flat + [0] * (width - len(flat))

  packed = {}  # row 0 packs a then b, row 1 packs b then a
  for name, source in (("encoder", enc), ("decoder", dec)):
    orders = (("a", "b"), ("b", "a"))
    packed[f"{name}_input_tokens"] = [row(o, lambda p: source[p], source) for o in orders]
    packed[f"{name}_segment_ids"] = [
        row(o, lambda p, o=o: [o.index(p) + 1] * len(source[p]), source) for o in orders]
    packed[f"{name}_positions"] = [
        row(o, lambda p: list(range(len(source[p]))), source) for o in orders]
  packed = {k: jnp.asarray(v, jnp.int32) for k, v in packed.items()}
  logits = np.asarray(_forward(model, params, **packed))
  # Each example alone (padded to the same widths: padding never changes valid positions).
  alone = np.asarray(_forward(
      model, params, jnp.asarray([row(p, lambda q: enc[q], enc) for p in ("a", "b")]),
      jnp.asarray([row(p, lambda q: dec[q], dec) for p in ("a", "b")])))
  np.testing.assert_allclose(logits[0, :4], alone[0, :4], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 4:7], alone[1, :3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[1, :3], alone[1, :3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[1, 3:7], alone[0, :4], atol=1e-5, rtol=0)
  # Without segment ids and positions the second example sees the first.
  mixed = np.asarray(_forward(model, params, packed["encoder_input_tokens"],
                              packed["decoder_input_tokens"]))
  assert not np.allclose(mixed[0, 4:7], alone[1, :3], atol=1e-3)


def test_dropout_is_off_by_default_and_seeded_when_on():
  model = t5.T5Model(_tiny("1_0", dropout_rate=0.3))
  params = _init(model)
  enc, dec = jnp.asarray(ENC), jnp.asarray(DEC)
  a = _forward(model, params, enc, dec)
  np.testing.assert_array_equal(a, _forward(model, params, enc, dec))
  # Jitted, with 'rbg' keys: threefry's bit generator at a dozen dropout sites
  # takes XLA's CPU compiler ~3x longer (30 s against 11 s here).
  train = jax.jit(lambda p, key: model.apply({"params": p}, enc, dec, enable_dropout=True,
                                             rngs={"dropout": key}))
  run = lambda seed: np.asarray(train(params, jax.random.key(seed, impl="rbg")))  # noqa: E731
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), a, atol=1e-3)
  assert not np.allclose(run(1), run(2), atol=1e-3)


def test_bfloat16_computation_keeps_float32_params():
  config = _tiny("1_1")
  model32 = t5.T5Model(config)
  model16 = t5.T5Model(t5.T5Config.from_dict({**config.__dict__, "dtype": "bfloat16"}))
  params = _init(model16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  enc, dec = jnp.asarray(ENC), jnp.asarray(DEC)
  out32 = np.asarray(_forward(model32, params, enc, dec))
  out16 = _forward(model16, params, enc, dec)
  assert out16.dtype == jnp.float32  # logits are handed to the loss in float32
  assert not np.array_equal(np.asarray(out16), out32)  # bfloat16 really ran
  assert np.abs(np.asarray(out16) - out32).max() < 0.05 * np.abs(out32).max() + 0.05
  encoded = model16.apply({"params": params}, enc, method=t5.T5Model.encode)
  assert encoded.dtype == jnp.bfloat16


@pytest.mark.slow
def test_t5_base_sharded_on_fsdp_tensor_mesh_matches_unsharded():
  config = t5.T5Config.preset("t5_v1_1_base")
  model = t5.T5Model(config)
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(2, 32000, (4, 8)), jnp.int32)
  dec = jnp.asarray(rng.randint(2, 32000, (4, 4)), jnp.int32).at[:, 0].set(0)
  mesh = sharding.make_mesh(2, 2, 2)
  rules = sharding.get_rules("fsdp_tensor")
  init = lambda key: model.init(key, enc, dec)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_sharding(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = nn.unbox(jax.jit(init, out_shardings=shardings)(jax.random.key(0)))["params"]
    apply = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    sharded = np.asarray(apply(params, enc, dec))

  P = jax.sharding.PartitionSpec
  layer = params["decoder"]["layers_0"]
  expected = {  # name: (array, spec, shard shape on the 2x2x2 mesh)
      "query": (layer["self_attention"]["query"]["kernel"], P("fsdp", "tensor", None),
                (384, 6, 64)),
      "cross_out": (layer["encoder_decoder_attention"]["out"]["kernel"],
                    P("tensor", None, "fsdp"), (6, 64, 384)),
      "wi_0": (layer["mlp"]["wi_0"]["kernel"], P("fsdp", "tensor"), (384, 1024)),
      "wo": (layer["mlp"]["wo"]["kernel"], P("tensor", "fsdp"), (1024, 384)),
      "shared": (params["shared"]["embedding"], P("tensor", "fsdp"), (16064, 384)),
      "logits": (params["logits_dense"]["kernel"], P("fsdp", "tensor"), (384, 16064)),
  }
  for name, (x, spec, shard) in expected.items():
    assert x.sharding.spec == spec, name
    assert x.addressable_shards[0].data.shape == shard, name

  host = jax.device_get(params)
  plain = np.asarray(jax.jit(lambda p: model.apply({"params": p}, enc, dec))(host))
  np.testing.assert_allclose(sharded, plain, atol=1e-4, rtol=0)
