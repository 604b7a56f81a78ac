"""Schedules, optimizers and regex rules against hand formulas."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import defaults
from bert_jax import optim
from bert_jax.models import layers


def tiny_params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
      "encoder": {
          "embeddings": {"word": {"embedding": f(5, 4)}},
          "layer_0": {"dense": {"kernel": f(4, 4), "bias": f(4)},
                      "attention_norm": {"scale": f(4)}},
          "layer_1": {"dense": {"kernel": f(4, 4), "bias": f(4)}},
      },
      "mlm": {"output_bias": f(5)},
  }


def rand_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), tree)


def run_steps(tx, params, n, seed=1):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(n):
    updates, state = update(rand_like(params, seed + i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# ----------------------------------------------------------------- schedules

def test_linear_schedule_key_steps():
  s = optim.make_schedule("linear", 1e-3, num_steps=1000, warmup_steps=100)
  for step, want in [(0, 0.0), (50, 5e-4), (100, 1e-3), (550, 5e-4), (1000, 0.0), (2000, 0.0)]:
    np.testing.assert_allclose(s(step), want, rtol=1e-6, atol=1e-12)
  s2 = optim.make_schedule("linear", 1e-3, 1000, 0, end_factor=0.1)
  np.testing.assert_allclose(s2(0), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(s2(500), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(s2(1000), 1e-4, rtol=1e-6)


def test_cosine_schedule_key_steps():
  s = optim.make_schedule("cosine", 2.0, num_steps=300, warmup_steps=100, end_factor=0.1)
  np.testing.assert_allclose(s(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(s(50), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s(100), 2.0, rtol=1e-6)
  np.testing.assert_allclose(s(200), 2.0 * (0.1 + 0.9 * 0.5), rtol=1e-6)  # cos(pi/2) = 0
  np.testing.assert_allclose(s(150), 2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4))),
                             rtol=1e-6)
  np.testing.assert_allclose(s(300), 0.2, rtol=1e-6)
  np.testing.assert_allclose(s(5000), 0.2, rtol=1e-6)


def test_rsqrt_schedule_is_t5x_constant_times_rsqrt_decay():
  s = optim.make_schedule("rsqrt", 1.0, warmup_steps=10_000)
  for step in (0, 1, 5_000, 10_000):
    np.testing.assert_allclose(s(step), 0.01, rtol=1e-6)
  np.testing.assert_allclose(s(40_000), 0.005, rtol=1e-6)
  np.testing.assert_allclose(s(1_000_000), 0.001, rtol=1e-6)
  # No warmup: 1/sqrt(step), guarded at step 0.
  s0 = optim.make_schedule("rsqrt", 2.0)
  np.testing.assert_allclose([s0(0), s0(4)], [2.0, 1.0], rtol=1e-6)


def test_constant_schedule_with_and_without_warmup():
  s = optim.make_schedule("constant", 1e-3, warmup_steps=10)
  np.testing.assert_allclose([s(0), s(5), s(10), s(10**6)], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(optim.make_schedule("constant", 1e-3)(0), 1e-3, rtol=1e-6)


def test_wsd_schedule_warms_up_holds_then_cools_down():
  s = optim.make_schedule("wsd", 2.0, num_steps=1000, warmup_steps=100, decay_steps=400)
  for step, want in [(0, 0.0), (50, 1.0), (100, 2.0), (350, 2.0), (600, 2.0),
                     (700, 2.0 * (1 - np.sqrt(0.25))), (1000, 0.0), (3000, 0.0)]:
    np.testing.assert_allclose(s(step), want, rtol=1e-6, atol=1e-7, err_msg=str(step))
  linear = optim.make_schedule("wsd", 2.0, 1000, 100, decay_steps=400, decay_shape="linear",
                               end_factor=0.1)
  np.testing.assert_allclose(linear(800), 2.0 * (0.1 + 0.9 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(linear(1000), 0.2, rtol=1e-6)
  cosine = optim.make_schedule("wsd", 2.0, 1000, 0, decay_steps=1000, decay_shape="cosine")
  np.testing.assert_allclose(cosine(500), optim.make_schedule("cosine", 2.0, 1000)(500),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="0 < decay_steps <= num_steps - warmup_steps = 900"):
    optim.make_schedule("wsd", 1.0, 1000, 100)
  with pytest.raises(ValueError, match="decay_shape 'exp'"):
    optim.make_schedule("wsd", 1.0, 1000, 100, decay_steps=10, decay_shape="exp")
  # Through the config: make_optimizer reads decay_steps / decay_shape.
  params = {"w": np.zeros((2,), np.float32), "bias": np.zeros((2,), np.float32)}
  _, schedule = optim.make_optimizer(dict(schedule="wsd", learning_rate=1.0, warmup_steps=0,
                                          decay_steps=10), params, num_steps=20)
  np.testing.assert_allclose([schedule(10), schedule(15)], [1.0, 1 - np.sqrt(0.5)], rtol=1e-6)


def test_schedule_errors():
  with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
    optim.make_schedule("cosin", 1.0, 10, 0)
  with pytest.raises(ValueError, match="num_steps > warmup_steps"):
    optim.make_schedule("linear", 1.0, None, 10)
  with pytest.raises(ValueError, match="end_factor"):
    optim.make_schedule("rsqrt", 1.0, end_factor=0.1)


# -------------------------------------------------------------------- adamw

def numpy_adamw(p, grads, lr, b1, b2, eps, wd, correct=True):
  m, v = np.zeros_like(p), np.zeros_like(p)
  p = p.astype(np.float64)
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if correct else (1.0, 1.0)
    u = (m / c1) / (np.sqrt(v / c2) + eps) + wd * p
    p = p - lr * u
  return p


def test_adamw_matches_numpy_with_and_without_decay():
  params = tiny_params()
  lr, wd = 1e-2, 0.1
  tx, _ = optim.make_optimizer(None, params, schedule="constant", warmup_steps=0,
                               learning_rate=lr, weight_decay=wd, clip_norm=0.0)
  new, _ = run_steps(tx, params, 3)
  grads = [rand_like(params, 1 + i) for i in range(3)]
  paths = {"kernel": ("encoder", "layer_0", "dense", "kernel"),
           "bias": ("encoder", "layer_0", "dense", "bias")}
  for name, path in paths.items():
    get = lambda t: np.asarray(t[path[0]][path[1]][path[2]][path[3]])
    want = numpy_adamw(get(params), [get(g) for g in grads], lr, 0.9, 0.999, 1e-6,
                       wd if name == "kernel" else 0.0)
    np.testing.assert_allclose(get(new), want, rtol=1e-5, atol=1e-7)
  # And the bias would have moved differently had it been decayed.
  decayed = numpy_adamw(get(params), [get(g) for g in grads], lr, 0.9, 0.999, 1e-6, wd)
  assert np.abs(decayed - get(new)).max() > 1e-5


def test_adamw_without_bias_correction_is_original_bert():
  params = tiny_params()
  lr, wd = 1e-2, 0.01
  tx, _ = optim.make_optimizer(None, params, schedule="constant", warmup_steps=0,
                               learning_rate=lr, weight_decay=wd, clip_norm=0.0,
                               bias_correction=False)
  new, _ = run_steps(tx, params, 3)
  grads = [rand_like(params, 1 + i) for i in range(3)]
  get = lambda t: np.asarray(t["encoder"]["layer_1"]["dense"]["kernel"])
  want = numpy_adamw(get(params), [get(g) for g in grads], lr, 0.9, 0.999, 1e-6, wd,
                     correct=False)
  np.testing.assert_allclose(get(new), want, rtol=1e-5, atol=1e-7)
  corrected = numpy_adamw(get(params), [get(g) for g in grads], lr, 0.9, 0.999, 1e-6, wd)
  assert np.abs(corrected - want).max() > 1e-4  # the flag matters


def test_default_decay_mask_excludes_bias_scale_and_norms():
  tree = {"mlm": {"output_bias": 0, "transform": {"kernel": 0}},
          "layer_0": {"attention_norm": {"scale": 0, "bias": 0},
                      "LayerNorm": {"gamma": 0}, "mlp": {"wi": {"kernel": 0}}},
          "embeddings": {"word": {"embedding": 0}}}
  mask = optim.regex_mask(tree, optim.DEFAULT_NO_DECAY, "no_decay")
  assert mask["mlm"]["output_bias"] and mask["layer_0"]["attention_norm"]["scale"]
  assert mask["layer_0"]["attention_norm"]["bias"] and mask["layer_0"]["LayerNorm"]["gamma"]
  assert not mask["mlm"]["transform"]["kernel"]
  assert not mask["layer_0"]["mlp"]["wi"]["kernel"]
  assert not mask["embeddings"]["word"]["embedding"]


# ------------------------------------------------------------- regex rules

def test_frozen_params_stay_bit_identical_and_have_no_state():
  params = tiny_params()
  for name in optim.OPTIMIZERS:
    tx, _ = optim.make_optimizer(defaults.optim_config(name), params, num_steps=100,
                                 warmup_steps=0, freeze=[r"embeddings/", r"layer_1/"])
    new, state = run_steps(tx, params, 4)
    enc, enc_new = params["encoder"], new["encoder"]
    for a, b in zip(jax.tree.leaves([enc["embeddings"], enc["layer_1"]]),
                    jax.tree.leaves([enc_new["embeddings"], enc_new["layer_1"]])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = np.asarray(enc_new["layer_0"]["dense"]["kernel"] - enc["layer_0"]["dense"]["kernel"])
    assert np.abs(changed).min() > 0, name
    # No optimizer moments for frozen params: the state is smaller than 2x params.
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    n_frozen = sum(x.size for x in jax.tree.leaves([enc["embeddings"], enc["layer_1"]]))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    if name != "adafactor":  # Adafactor's state is factored, smaller anyway.
      assert n_state == 2 * (n_params - n_frozen), name


def test_lr_multiplier_scales_update_exactly():
  params = tiny_params()
  grads = rand_like(params, 7)
  base_cfg = dict(schedule="constant", warmup_steps=0, learning_rate=1e-3, clip_norm=0.0)
  tx, _ = optim.make_optimizer(None, params, **base_cfg)
  tx_m, _ = optim.make_optimizer(None, params, lr_multipliers=[(r"layer_1/", 0.25),
                                                              (r"layer_", 3.0)], **base_cfg)
  u, _ = tx.update(grads, tx.init(params), params)
  u_m, _ = tx_m.update(grads, tx_m.init(params), params)
  l0, l1 = ("encoder", "layer_0"), ("encoder", "layer_1")
  for leaf, leaf_m in zip(jax.tree.leaves(u[l1[0]][l1[1]]), jax.tree.leaves(u_m[l1[0]][l1[1]])):
    np.testing.assert_array_equal(np.asarray(leaf_m), np.asarray(leaf * 0.25))  # first match
  for leaf, leaf_m in zip(jax.tree.leaves(u[l0[0]][l0[1]]), jax.tree.leaves(u_m[l0[0]][l0[1]])):
    np.testing.assert_array_equal(np.asarray(leaf_m), np.asarray(leaf * 3.0))
  np.testing.assert_array_equal(u["mlm"]["output_bias"], u_m["mlm"]["output_bias"])


def test_layerwise_lr_multipliers():
  rules = optim.layerwise_lr_multipliers(2, 0.5)
  factors = optim.multiplier_tree(tiny_params(), rules)
  assert factors["encoder"]["layer_1"]["dense"]["kernel"] == 0.5
  assert factors["encoder"]["layer_0"]["dense"]["kernel"] == 0.25
  assert factors["encoder"]["embeddings"]["word"]["embedding"] == 0.125
  assert factors["mlm"]["output_bias"] == 1.0


@pytest.mark.parametrize("field,value", [
    ("freeze", [r"layer_0/", r"layr_1"]),
    ("lr_multipliers", [(r"decoder/", 0.5)]),
    ("no_decay", [r"LayerNormz"]),
])
def test_regex_matching_nothing_is_an_error_naming_it(field, value):
  with pytest.raises(ValueError, match=rf"optim\.{field}: regex .* matches no parameter"):
    optim.make_optimizer(None, tiny_params(), num_steps=10, warmup_steps=0, **{field: value})


def test_config_errors():
  with pytest.raises(ValueError, match="unknown optimizer optim.name='adam'"):
    optim.make_optimizer({"name": "adam"}, tiny_params(), num_steps=10)
  with pytest.raises(ValueError, match=r"unknown optim field\(s\) \['lerning_rate'\]"):
    optim.make_optimizer({"lerning_rate": 1.0}, tiny_params(), num_steps=10)
  with pytest.raises(ValueError, match="num_steps > warmup_steps"):
    optim.make_optimizer(defaults.optim_config(), tiny_params())  # num_steps missing
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.make_optimizer(None, tiny_params(), num_steps=10, warmup_steps=0, freeze=["."])


# --------------------------------------------------- other optimizers, clip

@pytest.mark.parametrize("name,lr,extra", [
    ("adafactor", 0.1, {}), ("adafactor", 0.1, {"momentum": 0.9, "weight_decay": 1e-3}),
    ("lamb", 0.05, {}), ("lamb", 0.05, {"bias_correction": False}), ("adamw", 0.05, {}),
])
def test_optimizers_reduce_a_quadratic(name, lr, extra):
  params = {"w": {"kernel": jnp.full((4, 3), 2.0)}, "norm": {"scale": jnp.full((3,), -1.5)}}
  target = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))

  def loss(p):
    return jnp.sum((p["w"]["kernel"] - target) ** 2) + jnp.sum(p["norm"]["scale"] ** 2)

  tx, _ = optim.make_optimizer(defaults.optim_config(name), params, schedule="constant",
                               warmup_steps=0, learning_rate=lr,
                               **{"weight_decay": 0.0, **extra})
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  start = float(loss(params))
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.1 * start, (name, float(loss(params)), start)


def test_clip_by_global_norm_clips_and_reports_norm():
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  clip = optim.clip_by_global_norm(1.0)
  out, state = clip.update(grads, clip.init(grads))
  np.testing.assert_allclose(state.grad_norm, 5.0, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.norm(out), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
  small = jax.tree.map(lambda g: g / 10, grads)  # norm 0.5 < 1: untouched
  out_s, _ = clip.update(small, clip.init(grads))
  np.testing.assert_array_equal(out_s["a"], small["a"])
  off = optim.clip_by_global_norm(None)
  out_off, state_off = off.update(grads, off.init(grads))
  np.testing.assert_array_equal(out_off["b"], grads["b"])
  np.testing.assert_allclose(state_off.grad_norm, 5.0, rtol=1e-6)


def test_make_optimizer_clips_and_reports_norm_without_frozen():
  params = tiny_params()
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), params)
  tx, _ = optim.make_optimizer(defaults.optim_config("lamb"), params, num_steps=10,
                               warmup_steps=0, freeze=[r"embeddings/"], clip_norm=1.0)
  _, state = tx.update(grads, tx.init(params), params)
  n_trainable = sum(x.size for x in jax.tree.leaves(params)) - 20  # embedding 5x4 frozen
  np.testing.assert_allclose(optim.grad_norm(state), 10.0 * np.sqrt(n_trainable), rtol=1e-6)


# ------------------------------------------------------- abstract / boxed

class TinyBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.DenseGeneral(8, kernel_axes=("embed", "mlp"), name="dense")(x)
    return layers.LayerNorm(name="layer_norm")(x)


def test_works_on_abstract_and_boxed_flax_params():
  model = TinyBlock()
  x = jnp.ones((2, 4))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)  # boxed ShapeDtypeStructs
  assert any(isinstance(l, nn.Partitioned)
             for l in jax.tree.leaves(abstract, is_leaf=lambda l: isinstance(l, nn.Partitioned)))
  assert "params/dense/kernel" in jax.tree.leaves(optim.path_tree(abstract))
  tx, schedule = optim.make_optimizer(None, abstract, num_steps=10, warmup_steps=2,
                                      freeze=[r"layer_norm/"])
  # The trainer derives state shardings from the abstract state.
  abstract_state = jax.eval_shape(tx.init, nn.unbox(abstract))
  assert optim.grad_norm(abstract_state).shape == ()
  boxed = model.init(jax.random.key(0), x)
  for params in (nn.unbox(boxed), boxed):  # the trainer may use either form
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
      updates, state = jax.jit(tx.update)(grads, state, params)
      params = optax.apply_updates(params, updates)
    plain, start = nn.unbox(params), nn.unbox(boxed)
    np.testing.assert_array_equal(plain["params"]["layer_norm"]["scale"],
                                  start["params"]["layer_norm"]["scale"])
    assert np.abs(plain["params"]["dense"]["kernel"] - start["params"]["dense"]["kernel"]).min() > 0
  np.testing.assert_allclose(schedule(1), 0.5e-4, rtol=1e-6)


# ------------------------------------------------------- t5x Adafactor parity

def numpy_t5x_adafactor(param, grads, lr, decay_rate=0.8, clip=1.0, eps1=1e-30, eps2=1e-3):
  """The t5x Adafactor update (no momentum, no decay) for one matrix or vector."""
  p = param.astype(np.float64)
  v_row = v_col = v = 0.0
  for step, g in enumerate(grads):
    g = g.astype(np.float64)
    beta2 = 1.0 - (step + 1.0) ** -decay_rate
    g2 = g * g + eps1
    if p.ndim == 2 and min(p.shape) >= 128:
      small, large = np.argsort(p.shape)[-2], np.argsort(p.shape)[-1]
      v_row = beta2 * v_row + (1 - beta2) * g2.mean(axis=large)
      v_col = beta2 * v_col + (1 - beta2) * g2.mean(axis=small)
      row = (v_row / v_row.mean()) ** -0.5
      col = v_col ** -0.5
      y = g * np.expand_dims(row, large) * np.expand_dims(col, small)
    else:
      v = beta2 * v + (1 - beta2) * g2
      y = g * v ** -0.5
    y = y / max(1.0, np.sqrt((y * y).mean()) / clip)
    scale = lr * max(np.sqrt((p * p).mean()), eps2)
    p = p - scale * y
  return p


def test_adafactor_defaults_match_t5x_update():
  rng = np.random.default_rng(3)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(128, 130)).astype(np.float32)),
                      "bias": jnp.zeros((130,), jnp.float32)}}
  cfg = defaults.optim_config("adafactor")  # rsqrt, base 1.0, 10k warmup -> lr 0.01
  tx, schedule = optim.make_optimizer(cfg, params)
  np.testing.assert_allclose(schedule(0), 0.01, rtol=1e-6)
  new, state = run_steps(tx, params, 3, seed=11)
  grads = [rand_like(params, 11 + i) for i in range(3)]
  for name in ("kernel", "bias"):
    want = numpy_t5x_adafactor(np.asarray(params["dense"][name]),
                               [np.asarray(g["dense"][name]) for g in grads], 0.01)
    np.testing.assert_allclose(new["dense"][name], want, rtol=1e-4, atol=1e-7)
  # Factored: second moments of a 128x130 kernel take 128 + 130 numbers.
  sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert 128 * 130 not in sizes and 128 in sizes


def test_configdict_fields_and_bad_rule_shapes():
  cfg = defaults.optim_config("adamw")
  cfg.lock()
  cfg.freeze = (r"embeddings/",)
  cfg.learning_rate = 2e-5
  cfg.num_steps = 100
  cfg.warmup_steps = 10
  with pytest.raises(AttributeError):
    cfg.lerning_rate = 1.0  # locked ConfigDict: typo caught by ml_collections
  tx, schedule = optim.make_optimizer(cfg, tiny_params())
  np.testing.assert_allclose(schedule(100), 0.0, atol=1e-12)
  new, _ = run_steps(tx, tiny_params(), 1)
  np.testing.assert_array_equal(new["encoder"]["embeddings"]["word"]["embedding"],
                                tiny_params()["encoder"]["embeddings"]["word"]["embedding"])
  # In a plain dict a lone string is one regex, not a list of characters.
  tx_s, _ = optim.make_optimizer({"freeze": r"embeddings/", "warmup_steps": 0}, tiny_params(),
                                  num_steps=10)
  new_s, _ = run_steps(tx_s, tiny_params(), 1)
  np.testing.assert_array_equal(new_s["encoder"]["embeddings"]["word"]["embedding"],
                                tiny_params()["encoder"]["embeddings"]["word"]["embedding"])
  with pytest.raises(ValueError, match="pairs"):
    optim.make_optimizer(None, tiny_params(), num_steps=10, warmup_steps=0,
                         lr_multipliers=("layer_0", 0.5))


def test_adafactor_weight_decay_is_scaled_by_lr_and_masked():
  params = tiny_params()
  grads = rand_like(params, 5)
  common = dict(num_steps=10, warmup_steps=0, schedule="constant", learning_rate=0.3)
  tx0, _ = optim.make_optimizer(defaults.optim_config("adafactor"), params, **common)
  tx1, _ = optim.make_optimizer(defaults.optim_config("adafactor"), params, weight_decay=0.1,
                                **common)
  u0, _ = tx0.update(grads, tx0.init(params), params)
  u1, _ = tx1.update(grads, tx1.init(params), params)
  kernel = lambda t: np.asarray(t["encoder"]["layer_0"]["dense"]["kernel"])
  np.testing.assert_allclose(kernel(u1) - kernel(u0), -0.3 * 0.1 * kernel(params),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(u1["mlm"]["output_bias"], u0["mlm"]["output_bias"])
