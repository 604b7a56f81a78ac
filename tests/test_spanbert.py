"""SpanBERT's span boundary objective (SBO): head, targets, loss, training, sharding.

The 'span' masking's boundaries themselves are tested in test_batch_masking.py;
here hand-built batches with known spans drive the head and the objective.
"""
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import defaults
from bert_jax import losses
from bert_jax import objectives
from bert_jax import steps
from bert_jax import train
from bert_jax.data import inspect as inspect_lib
from bert_jax.models import bert
from bert_jax.models import flops
from bert_jax.models.configs import SBO_MAX_TARGETS
from conftest import sgd_step_on_mesh, tiny_pretraining_config

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
            max_position_embeddings=32, dropout_rate=0.0, attention_dropout_rate=0.0)


def _span_batch(batch=8, length=24, seed=0):
  """Rows [CLS] x... [SEP] pad pad with two known spans each and one padding slot.

  Span A covers tokens 3..5 (boundaries 2 and 6), span B token 9 (8 and 10);
  slot order is ascending position, as the pipeline emits it.
  """
  rs = np.random.RandomState(seed)
  tokens = rs.randint(5, VOCAB, (batch, length)).astype(np.int32)
  tokens[:, 0], tokens[:, length - 3], tokens[:, length - 2:] = 2, 3, 0
  positions = np.array([3, 4, 5, 9, 0], np.int32)
  left = np.array([2, 2, 2, 8, 0], np.int32)
  right = np.array([6, 6, 6, 10, 0], np.int32)
  weights = np.array([1, 1, 1, 1, 0], np.float32)
  targets = np.where(weights > 0, tokens[:, positions], 0).astype(np.int32)
  masked = tokens.copy()
  masked[:, positions[:4]] = 4  # [MASK]
  tile = lambda a: np.tile(a, (batch, 1))
  return dict(encoder_input_tokens=masked, mlm_positions=tile(positions),
              mlm_targets=targets, mlm_weights=tile(weights),
              sbo_left_positions=tile(left), sbo_right_positions=tile(right))


class _SboOnHidden(nn.Module):
  """The SBO head on given hidden states (the encoder only lends its tied table)."""
  config: bert.BertConfig

  @nn.compact
  def __call__(self, hidden, left, right, relative):
    encoder = bert.BertEncoder(self.config, add_pooler=False, name="encoder")
    return bert.SboHead(self.config, name="sbo")(hidden, left, right, relative, encoder)


def test_head_reads_exactly_the_two_boundary_states():
  cfg = bert.BertConfig(**TINY)
  model = _SboOnHidden(cfg)
  hidden = jnp.asarray(np.random.RandomState(0).randn(1, 10, 32), jnp.float32)
  # One span, tokens 3..5: boundaries 2 and 6, places 0, 1, 2.
  left, right, rel = jnp.array([[2, 2, 2]]), jnp.array([[6, 6, 6]]), jnp.array([[0, 1, 2]])
  params = model.init(jax.random.key(0), hidden, left, right, rel)
  apply = jax.jit(lambda h: model.apply(params, h, left, right, rel))
  base = apply(hidden)  # [1, 3, vocab]
  for row in (0, 3, 4, 5, 9):  # outside the span, and the span's own tokens
    changed = apply(hidden.at[0, row].add(1.0))
    np.testing.assert_array_equal(np.asarray(changed), np.asarray(base))
  for row in (2, 6):
    assert np.abs(np.asarray(apply(hidden.at[0, row].add(1.0)) - base)).max() > 1e-3
  # Only the boundary rows get a gradient.
  grad = jax.grad(lambda h: jnp.sum(jnp.sin(apply(h))))(hidden)
  touched = np.nonzero(np.abs(np.asarray(grad[0])).sum(-1))[0]
  assert touched.tolist() == [2, 6]
  # The place within the span matters: three different predictions.
  assert np.abs(np.asarray(base[0, 0] - base[0, 1])).max() > 1e-3


def test_model_returns_both_heads_from_one_encoder_pass():
  cfg = bert.BertConfig(**TINY)
  batch = _span_batch(batch=2)
  model = bert.build(cfg, "mlm_sbo")
  params = flax.linen.unbox(model.init(jax.random.key(0), batch["encoder_input_tokens"]))
  out = model.apply(params, **steps.model_inputs(model, batch))
  assert set(out) == {"mlm_logits", "sbo_logits"}
  assert out["mlm_logits"].shape == out["sbo_logits"].shape == (2, 5, VOCAB)
  # sbo_logits = the head on the encoder's final states at s-1 and e+1.
  hidden, _ = bert.BertModel(cfg, add_pooler=False).apply(
      {"params": {"encoder": params["params"]["encoder"]}}, batch["encoder_input_tokens"])
  rel = bert.sbo_relative_positions(batch["mlm_positions"], batch["sbo_left_positions"])
  np.testing.assert_array_equal(np.asarray(rel[0]), [0, 1, 2, 0, -1])
  direct = _SboOnHidden(cfg).apply(
      {"params": {k: params["params"][k] for k in ("encoder", "sbo")}}, hidden,
      batch["sbo_left_positions"], batch["sbo_right_positions"], rel)
  np.testing.assert_allclose(np.asarray(out["sbo_logits"]), np.asarray(direct), atol=1e-5)
  # Every parameter has a logical name per dimension.
  leaves = jax.tree.leaves(model.init(jax.random.key(0), batch["encoder_input_tokens"]),
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim
             for x in leaves)
  with pytest.raises(ValueError, match="data.masking='span' emits them"):
    model.apply(params, batch["encoder_input_tokens"], mlm_positions=batch["mlm_positions"])


def test_sbo_targets_and_weights_on_a_known_span():
  batch = _span_batch(batch=1, length=24)
  w = np.asarray(objectives.sbo_weights(batch))
  np.testing.assert_array_equal(w, [[1, 1, 1, 1, 0]])  # the padding slot is not scored
  # The targets are the span's original tokens (the MLM targets), not its inputs.
  assert (batch["encoder_input_tokens"][0, [3, 4, 5, 9]] == 4).all()
  assert (batch["mlm_targets"][0, :4] >= 5).all()
  # A boundary outside the row, or a slot not between its boundaries, scores 0.
  bad = dict(batch, sbo_right_positions=np.array([[24, 6, 6, 10, 0]], np.int32),
             sbo_left_positions=np.array([[2, 4, 2, 8, 0]], np.int32))
  np.testing.assert_array_equal(np.asarray(objectives.sbo_weights(bad)), [[0, 0, 1, 1, 0]])
  # Past the 15th token of a span: no position row (the reference drops them).
  long = dict(batch, mlm_positions=np.array([[2, 15, 16, 17, 0]], np.int32),
              sbo_left_positions=np.array([[1, 1, 1, 1, 0]], np.int32),
              sbo_right_positions=np.array([[18, 18, 18, 18, 0]], np.int32))
  assert SBO_MAX_TARGETS == 15
  # Places 0, 13, 14 have rows; place 15 has none.
  np.testing.assert_array_equal(np.asarray(objectives.sbo_weights(long)), [[1, 1, 1, 0, 0]])


def _numpy_ce(logits, targets):
  logits = logits.astype(np.float64)
  z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_sbo_loss_against_numpy():
  batch = _span_batch(batch=3, length=24, seed=1)
  batch["mlm_weights"][2, 3] = 0.0  # one more unscored slot
  rs = np.random.RandomState(2)
  outputs = {k: rs.randn(3, 5, VOCAB).astype(np.float32) for k in ("mlm_logits", "sbo_logits")}
  objective = objectives.get("mlm_sbo")
  assert [(t.prefix, t.weight) for t in objective.terms] == [("mlm", 1.0), ("sbo", 1.0)]
  assert objective.model_task == "mlm_sbo" and objective.data == ("mlm",)
  metrics = objective.metrics(outputs, batch)
  norms = objective.normalizers(batch)
  w = batch["mlm_weights"]  # every real slot here has valid boundaries
  sbo_ce = _numpy_ce(outputs["sbo_logits"], batch["mlm_targets"])
  mlm_ce = _numpy_ce(outputs["mlm_logits"], batch["mlm_targets"])
  assert float(metrics["sbo/loss_sum"]) == pytest.approx((w * sbo_ce).sum(), rel=1e-5)
  assert float(metrics["sbo/count"]) == float(norms["sbo"]) == w.sum() == 11
  correct = (outputs["sbo_logits"].argmax(-1) == batch["mlm_targets"]) * w
  assert float(metrics["sbo/correct"]) == correct.sum()
  expected = ((w * mlm_ce).sum() / (w.sum() + losses.MLM_DENOMINATOR_EPS)
              + (w * sbo_ce).sum() / w.sum())
  assert float(objective.loss(metrics, norms)) == pytest.approx(expected, rel=1e-5)


def _sharded_step(batch, preset, mesh_shape):
  """Loss, metrics and the SGD(1) parameter change of one step on `mesh_shape`."""
  return sgd_step_on_mesh(bert.build(bert.BertConfig(**TINY), "mlm_sbo"), "mlm_sbo", batch,
                          preset, mesh_shape)


def test_sharded_head_equals_unsharded():
  batch = _span_batch(batch=8)
  plain_metrics, plain_delta, _ = _sharded_step(batch, "data_parallel", (8, 1, 1))
  metrics, delta, params = _sharded_step(batch, "fsdp_tensor", (2, 2, 2))
  for key in ("loss", "sbo/loss_sum", "mlm/loss_sum", "sbo/count"):
    assert float(metrics[key]) == pytest.approx(float(plain_metrics[key]), rel=1e-5), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               delta, plain_delta)
  # The head's big kernels really are split on that mesh.
  left = params["sbo"]["left"]["kernel"]
  assert left.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert np.prod(left.addressable_shards[0].data.shape) < np.prod(left.shape)


def test_mlm_sbo_trains_through_the_trainer(tmp_path):
  config = tiny_pretraining_config(num_steps=4)
  config.train.objective = "mlm_sbo"
  config.data.masking = "span"
  train.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == [1, 2, 3, 4]
  for r in lines:
    # The pipeline's spans all have real boundaries: SBO scores every MLM slot.
    assert r["train/sbo/count"] == r["train/mlm/count"] > 0
    assert 0 <= r["train/sbo/accuracy"] <= 1
    count = r["train/mlm/count"]
    mlm = r["train/mlm/loss"] * count / (count + losses.MLM_DENOMINATOR_EPS)
    assert r["loss"] == pytest.approx(mlm + r["train/sbo/loss"], rel=1e-4)


def test_wrong_masking_fails_before_compiling():
  config = defaults.train_config()
  config.train.objective = "mlm_sbo"  # data.masking stays 'token': no boundaries
  with pytest.raises(ValueError, match="config.data.masking: 'token': the 'mlm_sbo' objective "
                                       "needs 'span'"):
    train.validate(config)
  # A batch without boundaries (built by hand) is refused by the loss itself.
  with pytest.raises(ValueError, match="span boundary objective needs .*data.masking='span'"):
    objectives.sbo_weights({"mlm_positions": np.zeros((1, 2), np.int32)})


def test_flops_count_the_sbo_head():
  cfg = bert.BertConfig.preset("base")
  extra = (flops.bert_train_flops(cfg, 512, 80, nsp=False, sbo=True)
           - flops.bert_train_flops(cfg, 512, 80, nsp=False))
  h, v = cfg.hidden_size, cfg.vocab_size
  assert extra == pytest.approx(3 * 2 * 80 * ((2 * h + 200) * h + h * h + h * v))


class _Pieces:
  def id_to_piece(self, i):
    return {0: "[PAD]", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]"}.get(i, f"t{i}")


def test_inspect_shows_each_span_between_its_boundaries():
  batch = _span_batch(batch=1, length=14)
  text = inspect_lib.format_mlm_example(batch, 0, _Pieces())
  tokens = batch["encoder_input_tokens"][0]
  t = lambda i: f"t{tokens[i]}"
  targets = [f"t{x}" for x in batch["mlm_targets"][0]]
  assert (f"spans (boundaries in <>): <{t(2)}> {' '.join(targets[:3])} <{t(6)}> | "
          f"<{t(8)}> {targets[3]} <{t(10)}>") in text
