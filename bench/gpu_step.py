"""The GPU items of issue 17 (training speed), as one short job for a lent device.

  python bench/gpu_step.py --hf          # on the GPU machine (a few minutes)
  python bench/gpu_step.py --tiny --hf   # the same code on CPU with toy shapes (the test)

Each case is bert_jax's own train step (steps.make_train_step, through
bench/train_step.py's `ours`) in bf16 compute with fp32 parameters and AdamW,
best of --rounds x --steps after warm-up. Printed per case:
  - s/step, tokens/s and MFU, counted as the trainer's log line counts them
    (throughput.for_train_step: the family's FLOP formula against the
    device's dense bf16 peak);
  - the attention kernel in the compiled step: cuDNN's fused attention
    (`__cudnn$fmha` custom calls) or XLA's unfused form;
  - the device's peak memory (where JAX reports it);
  - the loss after the warm-up and timed steps: bert_base and bert_base_xla
    take the same steps from the same weights, so cuDNN's loss must match
    XLA's to bf16 precision;
  - with --hf, Hugging Face PyTorch on the same device and batch under
    torch.autocast(bfloat16) (sdpa attention), and bert_jax's speed-up over it.

Cases (goals from the issue: BERT-base >= 50% MFU, T5-base >= 40%):
  bert_base            BERT-base, 256 x 128, MLM gathered at 20 positions, dropout
                       0.1, attention dropout 0 (modern recipes): cuDNN applies
  bert_base_xla        the same with attention forced to XLA (cuDNN's gain)
  bert_base_attn_drop  attention dropout 0.1 too (original BERT): the einsum path
  t5_base              T5 v1.1-base, 64 x 512 -> 114, no dropout (v1.1 pretraining)

Last, TensorFlow (when installed): bert_jax.host_tf must have kept it off
the GPU while JAX trained, so it may have created no GPU device.
"""
import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order

from bert_jax import models  # noqa: E402  pylint: disable=wrong-import-position
from bert_jax import steps  # noqa: E402  pylint: disable=wrong-import-position
from bert_jax import throughput  # noqa: E402  pylint: disable=wrong-import-position
from bert_jax.models import layers  # noqa: E402  pylint: disable=wrong-import-position

# name -> (family, preset, overrides, batch, inputs, targets, attention setting)
CASES = {
    "bert_base": ("bert", "base", dict(dropout_rate=0.1, attention_dropout_rate=0.0),
                  256, 128, None, "auto"),
    "bert_base_xla": ("bert", "base", dict(dropout_rate=0.1, attention_dropout_rate=0.0),
                      256, 128, None, "xla"),
    "bert_base_attn_drop": ("bert", "base", dict(dropout_rate=0.1, attention_dropout_rate=0.1),
                            256, 128, None, "auto"),
    "t5_base": ("t5", "t5_v1_1_base", dict(dropout_rate=0.0), 64, 512, 114, "auto"),
}
# --tiny: the same cases at toy sizes, for CPU.
TINY = {"base": ("tiny", 4, 32), "t5_v1_1_base": ("t5_v1_1_tiny", 2, 64)}


def case_config(name: str, tiny: bool):
  """(family, config, batch of numpy arrays, objective, task, batch size) of a case."""
  family, preset, overrides, size, inputs, targets, _ = CASES[name]
  if tiny:
    preset, size, inputs = TINY[preset]
    targets = targets and 16
  vocab = 1000 if tiny else (train_step.T5_VOCAB if family == "t5" else train_step.VOCAB)
  config = models.get(family).preset(preset, vocab_size=vocab, dtype=jnp.bfloat16, **overrides)
  rng = np.random.default_rng(0)
  if family == "t5":
    batch = train_step._t5_batch(rng, size, inputs, targets)  # pylint: disable=protected-access
    batch = {k: np.minimum(v, vocab - 1) if v.dtype == np.int32 else v for k, v in batch.items()}
    return family, config, batch, "span_corruption", "seq2seq", size
  batch = train_step._bert_batch(rng, size, inputs, True)  # pylint: disable=protected-access
  for key in ("encoder_input_tokens", "mlm_targets"):
    batch[key] = np.minimum(batch[key], vocab - 1)
  return family, config, batch, "mlm", "mlm", size


def attention_kernel(hlo: str) -> str:
  """What the compiled step runs for attention, from its HLO text."""
  fused = hlo.count("__cudnn$fmha")
  return f"cuDNN fused attention ({fused} custom calls)" if fused else "XLA (unfused)"


def peak_memory() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return "n/a" if peak is None else f"{peak / 2**30:.1f} GiB"


def run_case(name: str, args) -> None:
  family, config, batch, objective, task, size = case_config(name, args.tiny)
  layers.attention_implementation_setting = CASES[name][-1]
  try:
    run = train_step.ours(family, config, task, objective, batch,
                          steps.resolve_prng_impl("auto", jax.default_backend()))
    kernel = attention_kernel(run.hlo_text())
    runs = {"bert_jax": run}
    if args.hf:
      device = "cuda" if jax.default_backend() == "gpu" else "cpu"
      hf = train_step.hf_t5 if family == "t5" else train_step.hf_bert
      runs["HF PyTorch"] = hf(config, batch, bf16=True, device=device)
    best = train_step.timed_rounds(runs, args.warmup, args.steps, args.rounds)
  except Exception as e:  # pylint: disable=broad-except
    # One case failing (a kernel the device rejects) must not cost the others.
    print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return
  finally:
    layers.attention_implementation_setting = "auto"
  meter = throughput.for_train_step(models.get(family), config, task, batch, size,
                                    jax.devices()[:1])
  seconds = best["bert_jax"]
  mfu = (f"{meter.flops_per_step / seconds / meter.peak_flops:.1%}" if meter.peak_flops
         else "n/a (peak unknown)")
  line = (f"{name}: {seconds * 1e3:.1f} ms/step, {meter.tokens_per_step / seconds:,.0f} "
          f"tokens/s, MFU {mfu}, attention {kernel}, peak memory {peak_memory()}, "
          f"loss after {args.warmup + args.rounds * args.steps} steps {run.loss():.4f}")
  if "HF PyTorch" in best:
    line += (f"; HF PyTorch {best['HF PyTorch'] * 1e3:.1f} ms/step "
             f"({best['HF PyTorch'] / seconds:.2f}x)")
  print(line, flush=True)


def tensorflow_check() -> None:
  """TensorFlow, after a tf.data pipeline ran, may have created no GPU device."""
  if importlib.util.find_spec("tensorflow") is None:
    print("TensorFlow: not installed here; it cannot hold the GPU (check skipped)")
    return
  from bert_jax.host_tf import tf  # pylint: disable=import-outside-toplevel
  total = sum(int(x) for x in tf.data.Dataset.range(100).map(lambda x: x * 2).batch(10)
              .reduce(np.int64(0), lambda acc, b: acc + tf.reduce_sum(b)).numpy().ravel())
  gpus = tf.config.list_logical_devices("GPU")
  verdict = "ok" if not gpus else "FAILED: TensorFlow created GPU devices"
  print(f"TensorFlow {tf.__version__}: ran a tf.data pipeline (sum {total}); "
        f"its GPU devices: {[d.name for d in gpus]}; {verdict}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--tiny", action="store_true", help="toy shapes, for CPU")
  parser.add_argument("--hf", action="store_true", help="time Hugging Face PyTorch too")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  for name in args.cases.split(","):
    if name not in CASES:
      parser.error(f"--cases: {name!r} is not one of {list(CASES)}")
  device = jax.devices()[0]
  print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"peak {throughput.peak_flops_per_device(device.device_kind)} FLOP/s; "
        f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
  for name in args.cases.split(","):
    run_case(name, args)
  tensorflow_check()


if __name__ == "__main__":
  main()
