"""Shared layers and sharding helpers: attention paths agree, masks, mesh resolution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import sharding
from bert_jax.models import layers


def _qkv(seed, shape=(2, 5, 4, 8)):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape) for k in keys]


def test_segment_mask_blocks_padding_and_other_segments():
  seg = jnp.array([[1, 1, 2, 0]])
  mask = np.asarray(layers.segment_mask(seg, seg))[0, 0]
  expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_fused_and_einsum_attention_agree_with_mask_and_bias():
  q, k, v = _qkv(0)
  seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 0]])
  mask = layers.segment_mask(seg, seg)
  bias = jax.random.normal(jax.random.key(1), (1, 4, 5, 5))
  fused = layers.dot_product_attention(q, k, v, mask=mask, bias=bias)
  # A dropout rate of ~0 forces the einsum path while dropping nothing.
  manual = layers.dot_product_attention(q, k, v, mask=mask, bias=bias, dropout_rate=1e-12,
                                        dropout_rng=jax.random.key(2), deterministic=False)
  np.testing.assert_allclose(fused, manual, atol=1e-5)
  # Reference: plain softmax attention, valid rows only.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias
  logits = jnp.where(mask, logits, -1e30)
  ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
  valid = np.asarray(seg > 0)
  np.testing.assert_allclose(np.asarray(fused)[valid], np.asarray(ref)[valid], atol=1e-5)


def test_attention_dropout_drops_and_rescales():
  q, k, v = _qkv(3)
  out = layers.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0),
                                     deterministic=False)
  det = layers.dot_product_attention(q, k, v)
  assert not np.allclose(out, det)


def test_parameters_carry_logical_names():
  model = layers.MultiHeadAttention(num_heads=4, head_dim=8)
  x = jnp.ones((2, 5, 32))
  boxed = jax.eval_shape(model.init, jax.random.key(0), x, x)
  names = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert all(len(n) > 0 for n in names)
  assert nn.get_partition_spec(boxed)["params"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")


@pytest.mark.parametrize("data,fsdp,tensor,expected", [
    (-1, 1, 1, (8, 1, 1)), (2, -1, 2, (2, 2, 2)), (1, 8, 1, (1, 8, 1))])
def test_mesh_shape_fills_minus_one(data, fsdp, tensor, expected):
  assert sharding.mesh_shape(data, fsdp, tensor, 8) == expected


@pytest.mark.parametrize("bad", [(3, -1, 1), (-1, -1, 1), (2, 2, 1), (0, 8, 1)])
def test_mesh_shape_rejects_bad_sizes(bad):
  with pytest.raises(ValueError, match="mesh"):
    sharding.mesh_shape(*bad, 8)


def test_sharding_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(2, 2, 2)
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((30522, 64), jnp.float32),
                                        ("vocab", "embed")),
           "b": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 64), jnp.float32),
                                        ("vocab", "embed"))}
  shard = sharding.logical_to_sharding(boxed, mesh, sharding.get_rules("fsdp_tensor"))
  assert shard["w"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert shard["b"].spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_keep_mask_rate_lanes_and_exact_scaling():
  keep, p = layers.keep_mask(jax.random.key(0), 0.1, (64, 12, 129))  # an odd last axis
  keep = np.asarray(keep)
  assert keep.shape == (64, 12, 129) and p == pytest.approx(1 - 6554 / 65536)
  n = keep.size
  assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # The two lanes of one word are independent: neighbours agree as often as chance says.
  pairs = keep[..., 0:128:2] == keep[..., 1:128:2]
  chance = p * p + (1 - p) * (1 - p)
  assert abs(pairs.mean() - chance) < 5 * np.sqrt(chance * (1 - chance) / pairs.size)
  # A function of the key alone; another key gives another mask.
  np.testing.assert_array_equal(layers.keep_mask(jax.random.key(0), 0.1, (64, 12, 129))[0], keep)
  assert (np.asarray(layers.keep_mask(jax.random.key(1), 0.1, (64, 12, 129))[0]) != keep).any()
  assert not np.asarray(layers.keep_mask(jax.random.key(0), 1.0, (3, 4))[0]).any()
  assert np.asarray(layers.keep_mask(jax.random.key(0), 0.0, (3, 4))[0]).all()
  # Dropout keeps the expectation: kept values are scaled by exactly 1 / P(keep).
  x = jnp.ones((256, 512))
  drop = layers.Dropout(0.3)
  out = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
  kept = out[out != 0]
  _, p = layers.keep_mask(jax.random.key(3), 0.3, x.shape)
  np.testing.assert_allclose(kept, 1 / p, rtol=1e-6)
  assert abs(out.mean() - 1.0) < 0.01
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


def test_dropout_mask_is_the_same_on_a_sharded_mesh():
  """The masks of a batch sharded over 8 devices equal the unsharded ones (exact resume and
  N hosts = 1 host rest on this)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jnp.ones((16, 8, 10))
  run = lambda x, key: layers.Dropout(0.5).apply({}, x, deterministic=False,  # noqa: E731
                                                 rngs={"dropout": key})
  whole = jax.jit(run)(x, jax.random.key(4))
  sharded = jax.jit(run, in_shardings=(spec, None), out_shardings=spec)(
      jax.device_put(x, spec), jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))


def test_add_bias_matches_a_plain_add_in_value_and_gradient():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))
  bias = jax.random.normal(jax.random.key(1), (7,))
  cot = jax.random.normal(jax.random.key(2), (3, 5, 7))

  def loss(add, x, bias):
    return jnp.sum(add(x, bias) * cot)

  ours = jax.jit(jax.grad(lambda x, b: loss(layers.add_bias, x, b), argnums=(0, 1)))(x, bias)
  plain = jax.grad(lambda x, b: loss(jnp.add, x, b), argnums=(0, 1))(x, bias)
  np.testing.assert_allclose(layers.add_bias(x, bias), x + bias)
  np.testing.assert_allclose(ours[0], plain[0])
  np.testing.assert_allclose(ours[1], plain[1], rtol=1e-5)  # = cot summed over 15 rows
  bf16 = jax.grad(lambda b: jnp.sum(layers.add_bias(x.astype(jnp.bfloat16), b)
                                    .astype(jnp.float32)))(bias.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16 and np.all(np.asarray(bf16, np.float32) == 15.0)
  with pytest.raises(ValueError, match="x is bfloat16 but bias is float32"):
    layers.add_bias(x.astype(jnp.bfloat16), bias)


def test_attention_implementation_asks_for_cudnn_only_where_it_applies():
  h100 = "NVIDIA H100 80GB HBM3"
  pick = layers.attention_implementation
  assert pick(64, jnp.bfloat16, h100) == "cudnn"
  assert pick(128, jnp.float16, h100) == "cudnn"
  assert pick(64, jnp.float32, h100) == "xla"  # cuDNN's flash kernel is half precision only
  assert pick(36, jnp.bfloat16, h100) == "xla"  # not a multiple of 8
  assert pick(256, jnp.bfloat16, h100) == "xla"
  assert pick(64, jnp.bfloat16, "TPU v4") == "xla"
  assert pick(64, jnp.bfloat16) == "xla"  # this CPU
  assert pick(64, jnp.float32, "TPU v4", setting="cudnn") == "cudnn"
  assert pick(64, jnp.bfloat16, h100, setting="xla") == "xla"
  with pytest.raises(ValueError, match="'flash' is not one of"):
    pick(64, jnp.bfloat16, h100, setting="flash")


def test_attention_operand_keeps_batch_and_heads_unbroadcast_for_cudnn_only():
  full = (4, 12, 128, 128)
  padding = jnp.ones((4, 1, 1, 128), bool)  # [batch, 1, 1, kv]
  position_bias = jnp.zeros((1, 12, 128, 128))  # T5's, shared by the batch
  assert layers.attention_operand(padding, "xla", full).shape == full
  assert layers.attention_operand(padding, "cudnn", full).shape == (4, 1, 128, 128)
  assert layers.attention_operand(position_bias, "cudnn", full).shape == (1, 12, 128, 128)
  assert layers.attention_operand(jnp.ones((128, 128)), "cudnn", full).shape == (1, 1, 128, 128)
  assert layers.attention_operand(None, "cudnn", full) is None


def test_one_token_decoding_stays_on_xla():
  h100 = "NVIDIA H100 80GB HBM3"
  assert layers.attention_implementation(64, jnp.bfloat16, h100, q_len=1, kv_len=64) == "xla"
  assert layers.attention_implementation(64, jnp.bfloat16, h100, q_len=128, kv_len=127) == "xla"
  assert layers.attention_implementation(64, jnp.bfloat16, h100, q_len=128, kv_len=128) == "cudnn"


def test_auto_falls_back_to_xla_where_cudnn_cannot_run(monkeypatch, caplog):
  # Pretend this CPU qualifies: jax.nn's cuDNN path then fails (no cuDNN here)
  # and 'auto' must still attend, with XLA, saying why.
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.bfloat16) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 1, 8)) > 0.3)
  expected = layers.dot_product_attention(q, k, v, mask=mask, dtype=jnp.bfloat16)
  monkeypatch.setattr(layers, "attention_implementation", lambda *a, **k: "cudnn")
  with caplog.at_level("WARNING"):
    out = layers.dot_product_attention(q, k, v, mask=mask, dtype=jnp.bfloat16)
  assert "cuDNN attention unavailable" in caplog.text
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  # Forced, the failure is not hidden.
  monkeypatch.setattr(layers, "attention_implementation_setting", "cudnn")
  with pytest.raises((NotImplementedError, RuntimeError, ValueError)):
    layers.dot_product_attention(q, k, v, mask=mask, dtype=jnp.bfloat16)


@pytest.mark.parametrize("use_bias", [False, True])
def test_gated_mlp_stacks_its_kernels_but_keeps_their_paths(use_bias):
  """One dot over [embed, 2, mlp] gives act(x @ wi_0 + b0) * (x @ wi_1 + b1) @ wo, with
  the params of separate DenseGenerals (wi_0/kernel, wi_1/kernel: checkpoints load as
  before) and their logical axes."""
  mlp = layers.Mlp(16, activations=("gelu_tanh", "linear"), use_bias=use_bias)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  variables = mlp.init(jax.random.key(1), x)
  params = nn.unbox(variables["params"])
  expected_keys = {"kernel", "bias"} if use_bias else {"kernel"}
  for name in ("wi_0", "wi_1"):
    assert set(params[name]) == expected_keys and params[name]["kernel"].shape == (8, 16)
    assert variables["params"][name]["kernel"].names == ("embed", "mlp")
  if use_bias:
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases
  b = lambda name: params[name]["bias"] if use_bias else 0.0  # noqa: E731
  gate = jax.nn.gelu(x @ params["wi_0"]["kernel"] + b("wi_0"), approximate=True)
  hidden = gate * (x @ params["wi_1"]["kernel"] + b("wi_1"))
  want = hidden @ params["wo"]["kernel"] + b("wo")
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), np.asarray(want),
                             rtol=1e-5, atol=1e-5)
