"""Losses checked against independent numpy computations on tiny arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import losses


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_ce(logits, targets):
  lp = np_log_softmax(logits)
  return -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def rand(shape, seed=0, scale=3.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def test_cross_entropy_hand_value():
  # log(e^1 + e^2 + e^3) - 2 for target 1.
  logits = jnp.array([[1.0, 2.0, 3.0]])
  loss, z = losses.cross_entropy(logits, jnp.array([1]))
  expected = np.log(np.exp(1) + np.exp(2) + np.exp(3)) - 2.0
  np.testing.assert_allclose(loss, [expected], rtol=1e-6)
  np.testing.assert_array_equal(z, [0.0])


def test_mlm_loss_matches_bert_formula_and_ignores_zero_weights():
  logits = rand((2, 3, 7))
  targets = np.array([[1, 4, 0], [6, 0, 0]], np.int32)
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  batch = {"mlm_targets": jnp.asarray(targets), "mlm_weights": jnp.asarray(weights)}
  loss, m = losses.mlm_loss(jnp.asarray(logits), batch)
  ce = np_ce(logits, targets)
  expected = (weights * ce).sum() / (weights.sum() + 1e-5)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(m["mlm/loss_sum"], (weights * ce).sum(), rtol=1e-6)
  assert float(m["mlm/count"]) == 3.0
  correct = (logits.argmax(-1) == targets) * weights
  assert float(m["mlm/correct"]) == correct.sum()

  # Changing logits/targets where the weight is 0 changes nothing.
  logits2 = logits.copy()
  logits2[0, 2] = 100.0
  logits2[1, 1:] = -50.0
  batch2 = dict(batch, mlm_targets=jnp.asarray(np.where(weights > 0, targets, 5)))
  loss2, m2 = losses.mlm_loss(jnp.asarray(logits2), batch2)
  assert float(loss2) == float(loss)
  assert float(m2["mlm/correct"]) == float(m["mlm/correct"])


def test_mlm_loss_all_positions_form_and_empty_batch():
  logits = rand((2, 5, 4), seed=1)
  targets = np.array([[0, 1, 2, 3, 0], [3, 2, 1, 0, 0]], np.int32)
  weights = (targets > 0).astype(np.float32)
  batch = {"targets": jnp.asarray(targets), "w": jnp.asarray(weights)}
  loss, _ = losses.mlm_loss(jnp.asarray(logits), batch, targets_key="targets",
                            weights_key="w")
  expected = (weights * np_ce(logits, targets)).sum() / (weights.sum() + 1e-5)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # No scored token: 0, not NaN (the 1e-5 of original BERT).
  empty = {"targets": jnp.asarray(targets), "w": jnp.zeros_like(batch["w"])}
  loss0, _ = losses.mlm_loss(jnp.asarray(logits), empty, targets_key="targets",
                             weights_key="w")
  assert float(loss0) == 0.0


def test_nsp_loss_mean_and_metrics():
  logits = rand((4, 2), seed=2)
  labels = np.array([0, 1, 1, 0], np.int32)
  loss, m = losses.nsp_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, np_ce(logits, labels).mean(), rtol=1e-6)
  assert float(m["nsp/correct"]) == (logits.argmax(-1) == labels).sum()
  # Weighted: the last example dropped.
  w = np.array([1, 1, 1, 0], np.float32)
  loss_w, m_w = losses.nsp_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w),
                                prefix="sop")
  np.testing.assert_allclose(loss_w, np_ce(logits, labels)[:3].mean(), rtol=1e-6)
  assert float(m_w["sop/count"]) == 3.0


def test_classification_softmax_and_regression():
  logits = rand((3, 5), seed=3)
  labels = np.array([4, 0, 2], np.int32)
  loss, m = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, np_ce(logits, labels).mean(), rtol=1e-6)
  assert "cls/correct" in m
  preds = np.array([[0.5], [2.0], [-1.0]], np.float32)
  targets = np.array([1.0, 2.5, 0.0], np.float32)
  loss_r, m_r = losses.classification_loss(jnp.asarray(preds), jnp.asarray(targets))
  np.testing.assert_allclose(loss_r, ((preds[:, 0] - targets) ** 2).mean(), rtol=1e-6)
  assert "cls/correct" not in m_r


def test_token_classification_ignores_minus_100():
  logits = rand((2, 4, 3), seed=4)
  labels = np.array([[0, 2, -100, 1], [-100, 1, -100, -100]], np.int32)
  loss, m = losses.token_classification_loss(jnp.asarray(logits), jnp.asarray(labels))
  keep = labels != -100
  expected = np_ce(logits[keep], labels[keep]).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(m["token/count"]) == keep.sum()
  # Extra weights combine with the ignore label.
  w = np.ones(labels.shape, np.float32)
  w[0, 0] = 0.0
  loss_w, _ = losses.token_classification_loss(jnp.asarray(logits), jnp.asarray(labels),
                                               jnp.asarray(w))
  keep_w = keep & (w > 0)
  np.testing.assert_allclose(loss_w, np_ce(logits[keep_w], labels[keep_w]).mean(), rtol=1e-6)


def test_span_loss_is_mean_of_start_and_end():
  start, end = rand((3, 6), seed=5), rand((3, 6), seed=6)
  sp, ep = np.array([0, 2, 5], np.int32), np.array([1, 4, 5], np.int32)
  loss, m = losses.span_loss(*map(jnp.asarray, (start, end, sp, ep)))
  expected = ((np_ce(start, sp) + np_ce(end, ep)) / 2).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(m["span/start_correct"]) == (start.argmax(-1) == sp).sum()
  assert float(m["span/end_correct"]) == (end.argmax(-1) == ep).sum()


def _seq2seq_inputs():
  logits = rand((2, 4, 9), seed=7)
  targets = np.array([[3, 1, 8, 0], [2, 2, 0, 0]], np.int32)
  weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  return logits, targets, weights


def test_seq2seq_plain_and_normalisation():
  logits, targets, weights = _seq2seq_inputs()
  loss, m = losses.seq2seq_loss(*map(jnp.asarray, (logits, targets, weights)))
  ce = np_ce(logits, targets)
  np.testing.assert_allclose(loss, (weights * ce).sum() / weights.sum(), rtol=1e-6)
  assert float(m["seq2seq/count"]) == 5.0
  assert float(m["seq2seq/z_loss_sum"]) == 0.0


def test_seq2seq_z_loss_adds_exactly_weighted_z_lse_squared():
  logits, targets, weights = _seq2seq_inputs()
  args = tuple(map(jnp.asarray, (logits, targets, weights)))
  base, m0 = losses.seq2seq_loss(*args)
  z = 1e-2
  with_z, m = losses.seq2seq_loss(*args, z_loss=z)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  z_sum = (weights * z * lse ** 2).sum()
  np.testing.assert_allclose(m["seq2seq/z_loss_sum"], z_sum, rtol=1e-6)
  np.testing.assert_allclose(m["seq2seq/loss_sum"] - m0["seq2seq/loss_sum"], z_sum, rtol=1e-5)
  np.testing.assert_allclose(with_z - base, z_sum / weights.sum(), rtol=1e-5)


def test_seq2seq_label_smoothing_matches_numpy_reference():
  logits, targets, weights = _seq2seq_inputs()
  s, vocab = 0.1, logits.shape[-1]
  loss, _ = losses.seq2seq_loss(*map(jnp.asarray, (logits, targets, weights)),
                                label_smoothing=s)
  # Reference: explicit soft targets, KL(q || p) = sum q log q - sum q log p.
  q = np.full(logits.shape, s / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1 - s, -1)
  kl = (q * np.log(q) - q * np_log_softmax(logits)).sum(-1)
  np.testing.assert_allclose(loss, (weights * kl).sum() / weights.sum(), rtol=1e-5)
  # A perfect, extremely confident smoothed prediction gives (near) zero loss.
  perfect = np.log(q).astype(np.float32)
  loss_p, _ = losses.seq2seq_loss(*map(jnp.asarray, (perfect, targets, weights)),
                                  label_smoothing=s)
  assert abs(float(loss_p)) < 1e-5


def test_bf16_logits_give_float32_losses_close_to_float32():
  logits, targets, weights = _seq2seq_inputs()
  big = np.concatenate([logits] * 40, -1) * 3  # vocab 360, larger magnitude
  t, w = jnp.asarray(targets), jnp.asarray(weights)
  l32, _ = losses.seq2seq_loss(jnp.asarray(big), t, w, z_loss=1e-4)
  l16, m16 = losses.seq2seq_loss(jnp.asarray(big, jnp.bfloat16), t, w, z_loss=1e-4)
  assert l16.dtype == jnp.float32 and m16["seq2seq/loss_sum"].dtype == jnp.float32
  # Only the bf16 rounding of the inputs remains (relative 2^-8 on the logits).
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  batch = {"mlm_targets": t, "mlm_weights": w}
  m32, _ = losses.mlm_loss(jnp.asarray(big), batch)
  m16l, _ = losses.mlm_loss(jnp.asarray(big, jnp.bfloat16), batch)
  assert m16l.dtype == jnp.float32
  np.testing.assert_allclose(m16l, m32, rtol=2e-2)


def test_jit_and_grad_are_finite_with_zero_weights():
  logits, targets, _ = _seq2seq_inputs()
  zero = jnp.zeros(targets.shape)

  def f(x):
    return losses.seq2seq_loss(x, jnp.asarray(targets), zero, z_loss=1e-4)[0]
  g = jax.jit(jax.grad(f))(jnp.asarray(logits))
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) == 0.0


def test_summed_metrics_over_microbatches_equal_full_batch():
  logits, targets, weights = _seq2seq_inputs()
  full_loss, _ = losses.seq2seq_loss(*map(jnp.asarray, (logits, targets, weights)))
  parts = [losses.seq2seq_loss(*map(jnp.asarray, (logits[i:i + 1], targets[i:i + 1],
                                                      weights[i:i + 1])))[1]
           for i in range(2)]
  summed = jax.tree.map(lambda a, b: a + b, *parts)
  out = losses.summarize(dict(summed, learning_rate=0.5))
  np.testing.assert_allclose(out["seq2seq/loss"], float(full_loss), rtol=1e-6)
  assert out["seq2seq/count"] == 5.0
  assert 0.0 <= out["seq2seq/accuracy"] <= 1.0
  assert out["learning_rate"] == 0.5


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="does not fit targets"):
    losses.nsp_loss(jnp.zeros((4, 2)), jnp.zeros((3,), jnp.int32))


def test_seq2seq_constant_normalizing_factor():
  logits, targets, weights = _seq2seq_inputs()
  loss, m = losses.seq2seq_loss(*map(jnp.asarray, (logits, targets, weights)),
                                loss_normalizing_factor=7.0)
  np.testing.assert_allclose(loss, (weights * np_ce(logits, targets)).sum() / 7.0, rtol=1e-6)
  assert float(m["seq2seq/count"]) == 5.0
  with pytest.raises(ValueError, match="loss_normalizing_factor"):
    losses.seq2seq_loss(*map(jnp.asarray, (logits, targets, weights)),
                        loss_normalizing_factor=0.0)


def test_correct_is_the_target_at_the_row_maximum():
  logits = jax.random.normal(jax.random.key(3), (4, 6, 50))
  targets = jax.random.randint(jax.random.key(4), (4, 6), 0, 50)
  targets = targets.at[0].set(jnp.argmax(logits[0], -1))  # a row of hits
  np.testing.assert_array_equal(losses._correct(logits, targets),
                                np.asarray(logits.argmax(-1) == targets, np.float32))
  # An exact tie for the maximum counts as correct for every tied class;
  # an out-of-range target (e.g. -100, "ignore") never does.
  tied = jnp.zeros((1, 4)).at[0, 1].set(2.0).at[0, 3].set(2.0)
  np.testing.assert_array_equal(losses._correct(tied, jnp.array([1])), [1.0])
  np.testing.assert_array_equal(losses._correct(tied, jnp.array([3])), [1.0])
  np.testing.assert_array_equal(losses._correct(tied, jnp.array([0])), [0.0])
  np.testing.assert_array_equal(losses._correct(tied, jnp.array([-100])), [0.0])
