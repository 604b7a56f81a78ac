"""Metric writers (JSONL + TensorBoard), FLOP counts against XLA, throughput, progress bar."""
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from bert_jax import losses
from bert_jax import metrics
from bert_jax import models
from bert_jax import throughput
from bert_jax.models import bert
from bert_jax.models import flops
from bert_jax.models import t5


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write_lines(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def _tensorboard_scalars(workdir):
  """{tag: {step: value}} from every event file under workdir/tensorboard."""
  tb_dir = os.path.join(workdir, "tensorboard")
  found = {}
  for name in sorted(os.listdir(tb_dir)):
    for raw in tf.data.TFRecordDataset(os.path.join(tb_dir, name)):
      event = event_pb2.Event.FromString(raw.numpy())
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"
        found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return found


class FakeClock:
  """Stands in for time.perf_counter; `now` is advanced by the test."""

  def __init__(self, now=100.0):
    self.now = now

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = FakeClock()
  monkeypatch.setattr(metrics.time, "perf_counter", fake)
  return fake


# ---------------------------------------------------------------------------
# MetricWriter.
# ---------------------------------------------------------------------------
def test_jsonl_lines_keep_key_order_types_and_null_for_non_finite(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(10, {"loss": np.float32(2.5), "learning_rate": jnp.asarray(1e-4),
                    "grad_norm": float("nan"), "tokens_per_sec": np.int64(4096),
                    "mfu": None, "eval/loss": jnp.asarray(-np.inf),
                    "bf16": jnp.asarray(1.5, jnp.bfloat16), "finite": np.bool_(True)})
  # The line is readable before close: runs are tailed while they go on.
  partial = _read_jsonl(tmp_path / "metrics.jsonl")
  writer.write(20, {"loss": 2.0})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert partial == [json.loads(lines[0])]
  assert lines[0].startswith('{"step": 10, ')
  first = json.loads(lines[0])
  assert list(first) == ["step", "loss", "learning_rate", "grad_norm", "tokens_per_sec",
                         "mfu", "eval/loss", "bf16", "finite"]
  assert first["loss"] == 2.5 and isinstance(first["loss"], float)
  assert first["learning_rate"] == pytest.approx(1e-4)
  assert first["tokens_per_sec"] == 4096 and isinstance(first["tokens_per_sec"], int)
  assert first["grad_norm"] is None and first["mfu"] is None and first["eval/loss"] is None
  assert first["bf16"] == 1.5 and first["finite"] == 1
  assert json.loads(lines[1]) == {"step": 20, "loss": 2.0}


def test_write_rejects_non_scalars_and_the_step_key(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'loss' is not a scalar"):
      writer.write(1, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="'name' is not a number"):
      writer.write(1, {"name": "bert"})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 3})
  with pytest.raises(ValueError, match="closed"):
    writer.write(2, {"loss": 1.0})


def test_tensorboard_events_hold_the_scalars(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {"loss": 3.25, "mfu": None, "grad_norm": jnp.asarray(0.5)})
    writer.write(2, {"loss": np.float32(3.0), "grad_norm": float("inf")})
  scalars = _tensorboard_scalars(str(tmp_path))
  assert set(scalars) == {"loss", "grad_norm"}  # None is skipped
  assert scalars["loss"] == {1: 3.25, 2: 3.0}
  assert scalars["grad_norm"][1] == 0.5 and math.isinf(scalars["grad_norm"][2])


def test_resume_keeps_exactly_the_steps_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [{"step": s, "loss": 10.0 - s} for s in (0, 100, 200, 300, 400)])
  with metrics.MetricWriter(str(tmp_path), resume_step=200) as writer:
    writer.write(300, {"loss": 1.5})
  records = _read_jsonl(path)
  assert [r["step"] for r in records] == [0, 100, 200, 300]
  assert records[:3] == [{"step": s, "loss": 10.0 - s} for s in (0, 100, 200)]
  assert records[3] == {"step": 300, "loss": 1.5}
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_fresh_run_appends_and_minus_one_empties(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [{"step": 5, "loss": 1.0}])
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(6, {"loss": 0.5})
  assert [r["step"] for r in _read_jsonl(path)] == [5, 6]
  with metrics.MetricWriter(str(tmp_path), resume_step=-1) as writer:
    writer.write(1, {"loss": 9.0})
  assert _read_jsonl(path) == [{"step": 1, "loss": 9.0}]


def test_torn_last_line_of_a_killed_run_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  with metrics.MetricWriter(str(tmp_path), resume_step=1) as writer:
    writer.write(2, {"loss": 1.0})
  assert _read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def test_failed_rewrite_leaves_the_log_whole(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [{"step": s} for s in (1, 2, 3)])
  before = path.read_bytes()

  def broken_rename(*args, **kwargs):
    raise tf.errors.UnavailableError(None, None, "storage went away")

  monkeypatch.setattr(tf.io.gfile, "rename", broken_rename)
  with pytest.raises(tf.errors.UnavailableError):
    metrics.MetricWriter(str(tmp_path), resume_step=1)
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary left behind


@pytest.mark.parametrize("bad", ["not json", '[1, 2]', '{"loss": 1.0}', '{"step": "7"}'])
def test_corrupt_line_is_an_error_naming_file_and_line(tmp_path, bad):
  path = tmp_path / "metrics.jsonl"
  text = '{"step": 1}\n' + bad + '\n{"step": 3}\n'
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"metrics\.jsonl:2: corrupt"):
    metrics.MetricWriter(str(tmp_path), resume_step=1)
  assert path.read_text() == text


def test_disabled_writer_touches_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricWriter(str(workdir), resume_step=3, enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# FLOP counts against XLA's cost analysis.
#
# XLA counts 2*m*n*k per dot like our formulas, plus one FLOP per element of
# every elementwise op (norms, softmax, GELU, biases, the loss). So its count
# must be at least ours, and above it only by that elementwise work, which
# scales with the activations while the products scale with hidden x
# activations: at hidden 256 we measured XLA/ours = 1.006-1.025, so the bound
# is 1.06. Counts that left out the attention products (-7.5% at these
# shapes), put the MLM head at every position (+16%) or swapped encoder and
# decoder lengths (+17%) fall outside it.
# ---------------------------------------------------------------------------
def _xla_flops_per_example(loss_fn, params, batch, compile=True):
  """XLA's FLOP count of one value_and_grad step, per example.

  compile=False analyses the module as JAX lowered it, before XLA's
  optimisation passes: the same HloCostAnalysis without the compile time.
  Compiling at backend (LLVM) optimisation level 0 leaves the optimised HLO,
  and so the count, as at the default level, in less time.
  """
  lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch)
  if compile:
    cost = lowered.compile({"xla_backend_optimization_level": 0}).cost_analysis()
  else:
    cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return cost["flops"] / batch["encoder_input_tokens"].shape[0]


def _bert_xla_flops(task, cfg, length, predictions, batch_size=2, compile=True):
  model = bert.build(cfg, task)
  rs = np.random.RandomState(0)
  batch = dict(
      encoder_input_tokens=rs.randint(1, cfg.vocab_size, (batch_size, length)).astype(np.int32),
      mlm_positions=rs.randint(0, length, (batch_size, predictions)).astype(np.int32),
      mlm_targets=rs.randint(1, cfg.vocab_size, (batch_size, predictions)).astype(np.int32),
      mlm_weights=np.ones((batch_size, predictions), np.float32),
      nsp_labels=rs.randint(0, 2, (batch_size,)).astype(np.int32))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), batch["encoder_input_tokens"],
      mlm_positions=batch["mlm_positions"]))["params"]

  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch["encoder_input_tokens"],
                      mlm_positions=batch["mlm_positions"])
    loss, _ = losses.mlm_loss(out["mlm_logits"], batch)
    if "nsp_logits" in out:
      loss += losses.nsp_loss(out["nsp_logits"], batch["nsp_labels"])[0]
    return loss

  return _xla_flops_per_example(loss_fn, params, batch, compile)


def test_bert_pretraining_flops_match_xla():
  cfg = bert.BertConfig.preset("tiny", hidden_size=256, num_heads=4, intermediate_size=1024,
                               vocab_size=1024, max_position_embeddings=128)
  ours = flops.bert_train_flops(cfg, 128, 20, nsp=True)
  xla = _bert_xla_flops("pretraining", cfg, 128, 20)
  assert 1.0 <= xla / ours <= 1.06, xla / ours


def test_bert_nsp_head_flops_match_xla():
  # The pooler + NSP head is what the MLM-only model lacks. It is too small
  # to see in the total, so compare the difference of the two models. XLA
  # adds ~4 elementwise FLOPs per [length, hidden] element there (merging the
  # pooler's gradient into the hidden states'), which grows with the length
  # while the head does not: extrapolating to length 0 removes it. Four
  # compilations would double this file's run time: the uncompiled module's
  # analysis serves (it agrees within 0.5% on the totals above).
  cfg = bert.BertConfig.preset("tiny", hidden_size=256, num_heads=4, intermediate_size=1024,
                               vocab_size=1024, max_position_embeddings=128, num_layers=1)
  head = {s: (_bert_xla_flops("pretraining", cfg, s, 20, compile=False)
              - _bert_xla_flops("mlm", cfg, s, 20, compile=False)) for s in (64, 128)}
  head_at_zero_length = 2 * head[64] - head[128]
  ours = flops.bert_train_flops(cfg, 64, 20, nsp=True) - flops.bert_train_flops(
      cfg, 64, 20, nsp=False)
  assert ours == 3 * (2 * 256 * 256 + 2 * 256 * 2)
  assert 1.0 <= head_at_zero_length / ours <= 1.05, head_at_zero_length / ours


def test_albert_flops_count_applied_layers_projection_and_factorised_head():
  # ALBERT-base, S=128, P=20, E=128: the 12 shared layers are computed 12
  # times; the E -> H projection runs at every position and the MLM head
  # maps H -> E before the E-wide tied logits.
  cfg = bert.BertConfig.preset("base", vocab_size=30000, embedding_size=128,
                               share_layers="all", model_type="albert")
  s, h, i, p, v, e = 128, 768, 3072, 20, 30000, 128
  forward = 12 * (8 * s * h * h + 4 * s * s * h + 4 * s * h * i)
  forward += 2 * s * e * h  # embedding projection
  forward += 2 * p * h * e + 2 * p * e * v  # MLM transform + tied logits
  forward += 2 * h * h + 4 * h  # pooler + sentence-order head
  assert flops.bert_train_flops(cfg, s, p, nsp=True) == 3 * forward
  unshared = bert.BertConfig.preset("base", vocab_size=30000, embedding_size=128)
  assert flops.bert_train_flops(unshared, s, p, nsp=True) == 3 * forward


def test_albert_flops_match_xla():
  cfg = bert.BertConfig.preset("tiny", hidden_size=256, num_heads=4, intermediate_size=1024,
                               vocab_size=1024, max_position_embeddings=128,
                               embedding_size=64, share_layers="all", num_layers=3)
  ours = flops.bert_train_flops(cfg, 128, 20, nsp=True)
  xla = _bert_xla_flops("pretraining", cfg, 128, 20, compile=False)
  assert 1.0 <= xla / ours <= 1.06, xla / ours


def _t5_xla_flops(cfg, inputs_length, targets_length, batch_size=2, compile=True):
  model = t5.T5Model(cfg)
  rs = np.random.RandomState(0)
  tokens = lambda n: rs.randint(2, cfg.vocab_size, (batch_size, n)).astype(np.int32)
  batch = dict(encoder_input_tokens=tokens(inputs_length),
               decoder_input_tokens=tokens(targets_length),
               decoder_target_tokens=tokens(targets_length),
               decoder_loss_weights=np.ones((batch_size, targets_length), np.float32))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]))["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"])
    return losses.seq2seq_loss(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"])[0]

  return _xla_flops_per_example(loss_fn, params, batch, compile)


def _t5_config(preset):
  return t5.T5Config.preset(preset, d_model=256, d_ff=512, num_heads=4, d_kv=64,
                            num_encoder_layers=1, num_decoder_layers=1, vocab_size=1024)


@pytest.mark.parametrize("preset", ["t5_v1_1_tiny", "t5_v1_0_tiny"])
def test_t5_flops_match_xla(preset):
  cfg = _t5_config(preset)
  xla = _t5_xla_flops(cfg, 128, 32)
  ours = flops.t5_train_flops(cfg, 128, 32)
  assert 1.0 <= xla / ours <= 1.06, xla / ours


def test_t5_cross_attention_flops_match_xla():
  # Cross-attention scores are the only products that grow with
  # inputs_length x targets_length, too small a part of the total to check
  # there. The mixed difference f(a, c) - f(a, d) - f(b, c) + f(b, d) keeps
  # exactly that term (plus the softmax over it, a few % more in XLA).
  cfg = _t5_config("t5_v1_1_tiny")
  lengths = [(128, 64), (128, 32), (64, 64), (64, 32)]
  xla = [_t5_xla_flops(cfg, i, t, compile=False) for i, t in lengths]
  ours = [flops.t5_train_flops(cfg, i, t) for i, t in lengths]
  mixed = lambda f: f[0] - f[1] - f[2] + f[3]
  assert mixed(ours) == 3 * 4 * (128 - 64) * (64 - 32) * 4 * 64  # 3 x 2 products x 2*Sq*Skv*A
  assert 1.0 <= mixed(xla) / mixed(ours) <= 1.06, mixed(xla) / mixed(ours)


def test_flop_formulas_match_their_docstrings_at_base_size():
  cfg = bert.BertConfig.preset("base")
  # BERT-base, S=128, P=20: 12 layers of 8SH^2 + 4S^2H + 4SHI, MLM head, pooler + NSP.
  s, h, i, p, v = 128, 768, 3072, 20, 30522
  forward = 12 * (8 * s * h * h + 4 * s * s * h + 4 * s * h * i)
  forward += 2 * p * h * h + 2 * p * h * v + 2 * h * h + 4 * h
  assert flops.bert_train_flops(cfg, s, p, nsp=True) == 3 * forward
  # T5 v1.1 base (gated, inner dim 12 x 64 = 768 = D), inputs 512, targets 114.
  cfg = t5.T5Config.preset("t5_v1_1_base")
  d, f, v, se, sd = 768, 2048, 32128, 512, 114
  attention = lambda sq, skv: 4 * sq * d * d + 4 * skv * d * d + 4 * sq * skv * d
  mlp = lambda n: 2 * n * d * 2 * f + 2 * n * f * d
  forward = 12 * (attention(se, se) + mlp(se))
  forward += 12 * (attention(sd, sd) + attention(sd, se) + mlp(sd)) + 2 * sd * d * v
  assert flops.t5_train_flops(cfg, se, sd) == 3 * forward


# ---------------------------------------------------------------------------
# Peak FLOP/s and throughput.
# ---------------------------------------------------------------------------
def test_peak_flops_by_device_kind():
  assert throughput.peak_flops_per_device("TPU v4") == 275e12
  assert throughput.peak_flops_per_device("TPU v5 lite") == 197e12
  assert throughput.peak_flops_per_device("TPU v5") == throughput.peak_flops_per_device("TPU v5p")
  assert throughput.peak_flops_per_device("TPU v6 lite") == 918e12
  assert throughput.peak_flops_per_device("TPU v3") == 123e12 / 2  # a JAX device is one core
  assert throughput.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
  assert throughput.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert throughput.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert throughput.peak_flops_per_device("NVIDIA H200") == 989e12
  assert throughput.peak_flops_per_device("NVIDIA H100 NVL") is None
  assert throughput.peak_flops_per_device(jax.devices()[0].device_kind) is None  # CPU
  assert throughput.peak_flops_per_device("TPU v99") is None


def test_throughput_rates_and_mfu_with_a_fake_clock(clock):
  meter = throughput.Throughput(tokens_per_step=4096, flops_per_step=2e12, peak_flops=8e12)
  meter.start(1)
  clock.now += 5.0
  first = meter.measure(11)  # 10 steps in 5 s
  assert first == {"steps_per_sec": 2.0, "tokens_per_sec": 8192.0, "mfu": 0.5}
  clock.now += 4.0
  second = meter.measure(13)  # the interval restarted at step 11
  assert second == {"steps_per_sec": 0.5, "tokens_per_sec": 2048.0, "mfu": 0.125}
  assert meter.measure(13) == {"steps_per_sec": None, "tokens_per_sec": None, "mfu": None}


def test_throughput_without_a_known_peak_reports_no_mfu(clock):
  meter = throughput.Throughput(tokens_per_step=100, flops_per_step=1e9, peak_flops=None)
  with pytest.raises(ValueError, match="before start"):
    meter.measure(1)
  meter.start(0)
  clock.now += 2.0
  assert meter.measure(4) == {"steps_per_sec": 2.0, "tokens_per_sec": 200.0, "mfu": None}


def test_for_train_step_counts_tokens_flops_and_the_peak_of_every_device():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"
  family = models.get("bert")
  config = family.preset("small", vocab_size=1000)
  local = {"encoder_input_tokens": np.zeros((4, 16), np.int32),
           "mlm_positions": np.zeros((4, 3), np.int32)}
  meter = throughput.for_train_step(family, config, "mlm", local, batch_size=8,
                                    devices=[Device()] * 2, process_count=2)
  assert meter.tokens_per_step == 4 * 16 * 2
  shapes = {k: v.shape for k, v in local.items()}
  assert meter.flops_per_step == family.train_flops(config, shapes, "mlm") * 8 > 0
  assert meter.peak_flops == 2 * 989e12
  cpu = throughput.for_train_step(family, config, "mlm", local, 8, jax.devices())
  assert cpu.peak_flops is None and cpu.tokens_per_step == 4 * 16


def test_throughput_imports_no_tensorflow():
  # bench/gpu_step.py reports MFU on accelerator images without TensorFlow.
  code = ("import sys; import bert_jax.throughput, bert_jax.steps, bert_jax.models.flops; "
          "sys.exit('tensorflow' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------
# Progress bar.
# ---------------------------------------------------------------------------
def test_progress_bar_lines_rate_eta_postfix_and_interval(clock):
  out = io.StringIO()
  bar = metrics.ProgressBar(1000, stream=out, min_interval_s=1.0)
  bar.update(1, loss=7.0)  # first update: written at once, no rate yet
  clock.now += 0.5
  bar.update(2, loss=6.5)  # within min_interval_s: held back
  clock.now += 0.5
  bar.update(5, loss=jnp.asarray(5.12345))  # 4 steps in 1 s since step 1
  clock.now += 0.2
  bar.update(6, loss=5.0)  # held back
  lines = out.getvalue().splitlines()
  assert lines == ["step 1/1000 [0%] ? step/s ETA ? loss 7",
                   "step 5/1000 [0%] 4 step/s ETA 4m09s loss 5.123"]
  bar.close()  # the held-back state is written on close
  assert out.getvalue().splitlines()[-1].startswith("step 6/1000 [0%] 4.17 step/s ETA 3m59s")
  assert "\r" not in out.getvalue()


def test_progress_bar_always_writes_the_last_step(clock):
  out = io.StringIO()
  bar = metrics.ProgressBar(120, initial_step=100, stream=out, min_interval_s=60.0)
  bar.update(101)
  clock.now += 1.0
  bar.update(110)
  clock.now += 1.0
  bar.update(120, loss=1.5)
  bar.close()
  lines = out.getvalue().splitlines()
  assert lines == ["step 101/120 [84%] ? step/s ETA ?",
                   "step 120/120 [100%] 9.5 step/s ETA 0s loss 1.5"]


def test_progress_bar_redraws_in_place_on_a_terminal(clock):
  class Tty(io.StringIO):
    def isatty(self):
      return True

  out = Tty()
  bar = metrics.ProgressBar(10, stream=out)
  bar.update(1, loss=12.25)
  clock.now += 1.0
  bar.update(2)
  bar.close()
  text = out.getvalue()
  assert text.count("\n") == 1 and text.endswith("\n")
  frames = text[:-1].split("\r")[1:]
  assert frames[0] == "step 1/10 [10%] ? step/s ETA ? loss 12.25"
  # The shorter frame is padded so no characters of the longer one remain.
  assert frames[1].rstrip() == "step 2/10 [20%] 1 step/s ETA 8s"
  assert len(frames[1]) == len(frames[0])


def test_disabled_progress_bar_writes_nothing(clock):
  out = io.StringIO()
  bar = metrics.ProgressBar(10, stream=out, enabled=False)
  bar.update(10, loss=1.0)
  bar.close()
  assert out.getvalue() == ""


def test_format_duration():
  seconds = (0, 59.4, 259, 3 * 3600 + 7 * 60, 2 * 86400 + 5 * 3600)
  assert [metrics.format_duration(s) for s in seconds] == ["0s", "59s", "4m19s", "3h07m",
                                                          "2d05h"]
