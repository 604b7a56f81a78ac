"""The pretraining step against Hugging Face PyTorch, timed in the same run.

Forward + backward + AdamW of a randomly initialised model, fp32, dropout as
the model's config has it, batches of random tokens, one CPU device (or the
first accelerator). Rounds interleave bert_jax and Hugging Face so that a
change of machine load hits both alike; each round times `--steps` steps
after the warm-up (compiles excluded). Printed per shape: s/step, tokens/s,
the ratio to Hugging Face, and the model FLOPs rate as a fraction of a
matmul peak measured in this run with the same dtype.

Shapes (issue "Training speed"):
  minilm   BERT of the all-MiniLM-L6-v2 shape (6 layers, hidden 384), 32 x 128,
           MLM gathered at 20 positions (original BERT) and at every position
           (Hugging Face's work)
  base     BERT-base, 8 x 128, both MLM forms
  mini     BERT-mini (4 layers, hidden 256), 16 x 128, both MLM forms: the
           model and batch of bench/pretrain_quality.py (not in the default)
  t5       T5 v1.1-small, 4 x 512 inputs -> 114 targets

  python bench/train_step.py                       # all shapes (~15 min on 2 cores)
  python bench/train_step.py --shapes=minilm --rounds=3
  python bench/train_step.py --prng_impls=threefry2x32,rbg,unsafe_rbg

Each bert_jax row is timed once per dropout PRNG of --prng_impls
(train.prng_impl); the first is the plain "bert_jax" row.

--dtypes=float32,bfloat16 adds bf16-compute rows: bert_jax with the model's
`dtype` (params and AdamW stay float32), Hugging Face under
torch.autocast(bfloat16) (fp32 master weights too). Each bf16 row's ratio is
against the Hugging Face row of its own dtype and also against the fp32 one
(the issue's reference step), and its FLOP rate against a bf16 matmul timed
in the same run.
"""
import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bert_jax import defaults  # noqa: E402
from bert_jax import models  # noqa: E402
from bert_jax import optim  # noqa: E402
from bert_jax import sharding  # noqa: E402
from bert_jax import steps  # noqa: E402
from bert_jax.models import flops  # noqa: E402

VOCAB = 30522
PREDICTIONS = 20
T5_VOCAB = 32128
# shape -> (bert preset, batch size, preset overrides); sequences of 128.
BERT_SHAPES = {
    "minilm": ("small", 32, dict(num_layers=6, hidden_size=384, num_heads=12,
                                 intermediate_size=1536)),
    "base": ("base", 8, {}),
    # bench/pretrain_quality.py's model and batch, to time its step on its own.
    "mini": ("mini", 16, {}),
}


def machine() -> str:
  """CPU model, core count, load and versions, for the record."""
  model = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                  if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    # A cloud "AMD EPYC" may be a Zen 4 or a Zen 5 (family 25 or 26), whose
    # matmul rates differ 2x: the family and model say which one ran.
    model = (f"{info.get('model name', model)} (family {info.get('cpu family', '?')}, "
             f"model {info.get('model', '?')})")
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
  return (f"{model}; {os.cpu_count()} CPUs; load {load[0]:.2f}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); transformers {transformers.__version__}")


def matmul_rate(dtype=jnp.float32) -> float:
  """FLOP/s of a jitted [4096, 384] x [384, 1536] product (the MiniLM FFN's shape)."""
  a = jnp.ones((4096, 384), dtype)
  b = jnp.ones((384, 1536), dtype)
  # bf16 inputs with an fp32 result: the form XLA:CPU runs on AMX. The model's
  # bf16 dots return bf16, which XLA:CPU runs at fp32 speed (README).
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = 0.0
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
      out = f(a, b)
    out.block_until_ready()
    best = max(best, 10 * 2 * 4096 * 384 * 1536 / (time.perf_counter() - start))
  return best


# ------------------------------------------------------------------ bert_jax


def _bert_batch(rng, batch, length, gathered):
  tokens = rng.integers(5, VOCAB, (batch, length)).astype(np.int32)
  out = {"encoder_input_tokens": tokens,
         "encoder_type_ids": np.zeros_like(tokens)}
  if gathered:
    positions = np.sort(rng.permuted(np.tile(np.arange(1, length), (batch, 1)), axis=1)
                        [:, :PREDICTIONS], axis=1).astype(np.int32)
    out.update(mlm_positions=positions,
               mlm_targets=np.take_along_axis(tokens, positions, 1),
               mlm_weights=np.ones((batch, PREDICTIONS), np.float32))
  else:  # every position scored by the head; 15% of them weigh in the loss
    out.update(mlm_targets=tokens,
               mlm_weights=(rng.random((batch, length)) < 0.15).astype(np.float32))
  return out


def _t5_batch(rng, batch, inputs, targets):
  targets_ = rng.integers(2, T5_VOCAB, (batch, targets)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, T5_VOCAB, (batch, inputs)).astype(np.int32),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((batch, 1), np.int32), targets_[:, :-1]], 1),
          "decoder_target_tokens": targets_,
          "decoder_loss_weights": np.ones((batch, targets), np.float32)}


def ours(family: str, config, task: str, objective: str, batch: dict,
         prng_impl: str = "threefry2x32"):
  """A function running one bert_jax train step on `batch` (already on device)."""
  spec = models.get(family)
  model = spec.build(config, task)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.get_rules("data_parallel")
  shapes = steps.init_shapes(spec.init_features)
  tx, schedule = optim.make_optimizer(defaults.optim_config("adamw"),
                                      steps.param_shapes(model, shapes), num_steps=100_000)
  state, shardings = steps.create_sharded_state(model, tx, shapes, mesh, rules, 0)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, tx, objective, shardings, batch_sharding, rules=rules,
                               schedule=schedule, prng_impl=prng_impl)
  on_device = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  box = {"state": state}

  def run():
    box["state"], box["metrics"] = step(box["state"], on_device)
    jax.block_until_ready(box["metrics"]["loss"])
  # The last step's loss, to compare runs that took the same steps.
  run.loss = lambda: float(box["metrics"]["loss"])
  # The compiled step's HLO, for bench/step_profile.py's op names.
  run.hlo_text = lambda: step.lower(box["state"], on_device).compile().as_text()
  return run


# ------------------------------------------------------------ Hugging Face


def _torch_step(model, inputs, labels, bf16=False, device="cpu"):
  """One training step of a Hugging Face model: loss, backward, AdamW (lr 1e-4, decay 0.01).

  bf16: the forward under torch.autocast (bf16 matmuls, fp32 weights and
  optimizer), PyTorch's mixed-precision recipe. device: 'cpu' or 'cuda'; on a
  GPU each step waits for the device, so that wall time is compute time.
  """
  model.to(device).train()
  inputs, labels = inputs.to(device), labels.to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

  def run():
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.device(device).type == "cuda":
      torch.cuda.synchronize()
  return run


def hf_bert(config, batch: dict, bf16=False, device="cpu"):
  """One Hugging Face BertForMaskedLM step (sdpa attention, AdamW)."""
  hf = transformers.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      intermediate_size=config.intermediate_size, hidden_act="gelu",
      hidden_dropout_prob=config.dropout_rate,
      attention_probs_dropout_prob=config.attention_dropout_rate)
  model = transformers.BertForMaskedLM(hf)
  tokens = torch.from_numpy(batch["encoder_input_tokens"]).long()
  labels = torch.full_like(tokens, -100)
  if "mlm_positions" in batch:
    rows = np.arange(len(tokens))[:, None]
    labels[rows, batch["mlm_positions"]] = torch.from_numpy(batch["mlm_targets"]).long()
  else:
    keep = torch.from_numpy(batch["mlm_weights"] > 0)
    labels[keep] = tokens[keep]
  return _torch_step(model, tokens, labels, bf16, device)


def hf_t5(config, batch: dict, bf16=False, device="cpu"):
  """One Hugging Face T5ForConditionalGeneration step (v1.1: gated GELU, untied)."""
  hf = transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
      d_ff=config.d_ff, num_heads=config.num_heads, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=config.dropout_rate,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(hf)
  return _torch_step(model, torch.from_numpy(batch["encoder_input_tokens"]).long(),
                     torch.from_numpy(batch["decoder_target_tokens"]).long(), bf16, device)


# ------------------------------------------------------------------ timing


def timed_rounds(runs: dict, warmup: int, steps_per_round: int, rounds: int) -> dict:
  """name -> best s/step over interleaved rounds (warm-up steps untimed)."""
  for run in runs.values():
    for _ in range(warmup):
      run()
  best = {name: float("inf") for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      for _ in range(steps_per_round):
        run()
      best[name] = min(best[name], (time.perf_counter() - start) / steps_per_round)
  return best


def _name(who: str, dtype: str, form: str = "") -> str:
  """'bert_jax' / 'bert_jax rbg' / 'HF PyTorch', then ' bf16' if so, then ', form' if any."""
  name = f"{who} bf16" if dtype == "bfloat16" else who
  return f"{name}, {form}" if form else name


def _ours_names(impls: list[str], dtype: str, form: str = "") -> dict:
  """PRNG -> row name: 'bert_jax' for the first PRNG, 'bert_jax IMPL' for the others."""
  return {impl: _name("bert_jax" if impl == impls[0] else f"bert_jax {impl}", dtype, form)
          for impl in impls}


def cases(shape: str, rng, impls: list[str], dtypes: list[str]):
  """(tokens per step, {name: (run, model FLOPs per step, dtype)}) of one shape."""
  out = {}
  if shape == "t5":
    batch = _t5_batch(rng, 4, 512, 114)
    for dtype in dtypes:
      config = models.get("t5").preset("t5_v1_1_small", vocab_size=T5_VOCAB, dropout_rate=0.1,
                                        dtype=jnp.dtype(dtype))
      per_step = 4 * flops.t5_train_flops(config, 512, 114)
      for impl, name in _ours_names(impls, dtype).items():
        out[name] = (ours("t5", config, "seq2seq", "span_corruption", batch, impl), per_step,
                     dtype)
      out[_name("HF PyTorch", dtype)] = (hf_t5(config, batch, dtype == "bfloat16"), per_step,
                                         dtype)
    return 4 * 512, out
  preset, size, overrides = BERT_SHAPES[shape]
  for gathered in (True, False):
    batch = _bert_batch(rng, size, 128, gathered)
    form = "gathered" if gathered else "every position"
    for dtype in dtypes:
      config = models.get("bert").preset(preset, vocab_size=VOCAB, dtype=jnp.dtype(dtype),
                                         **overrides)
      per_step = size * flops.bert_train_flops(config, 128, PREDICTIONS if gathered else None,
                                               nsp=False)
      for impl, name in _ours_names(impls, dtype, form).items():
        out[name] = (ours("bert", config, "mlm", "mlm", batch, impl), per_step, dtype)
      # Hugging Face runs its vocabulary head at every position either way.
      out[_name("HF PyTorch", dtype, form)] = (
          hf_bert(config, batch, dtype == "bfloat16"),
          size * flops.bert_train_flops(config, 128, None, nsp=False), dtype)
  return size * 128, out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="minilm,base,t5",
                      help=f"comma-separated, of {[*BERT_SHAPES, 't5']}")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--prng_impls", default="threefry2x32,rbg",
                      help="dropout PRNGs of the bert_jax rows (steps.PRNG_IMPLS)")
  parser.add_argument("--dtypes", default="float32",
                      help="compute dtypes, comma-separated: float32, bfloat16")
  args = parser.parse_args()
  impls = args.prng_impls.split(",")
  dtypes = args.dtypes.split(",")
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16"):
      parser.error(f"--dtypes: {dtype!r} is not float32 or bfloat16")
  for impl in impls:
    steps.resolve_prng_impl(impl, jax.default_backend())  # a bad name stops here
  torch.set_num_threads(args.threads)
  print(machine())
  peaks = {dtype: matmul_rate(jnp.dtype(dtype)) for dtype in dtypes}
  for dtype, peak in peaks.items():
    print(f"{dtype} matmul [4096,384]x[384,1536], jitted: {peak / 1e9:.1f} GFLOP/s")
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    tokens, runs = cases(shape, rng, impls, dtypes)
    best = timed_rounds({k: v[0] for k, v in runs.items()}, args.warmup, args.steps,
                        args.rounds)
    print(f"\n{shape}: {tokens} tokens per step, best of {args.rounds} rounds x "
          f"{args.steps} steps")
    for name, seconds in best.items():
      _, per_step, dtype = runs[name]
      form = name[name.index(",") + 2:] if "," in name else ""
      ratio = ""
      if name.startswith("bert_jax"):
        # Against Hugging Face in the same dtype, and bf16 rows also against fp32.
        for ref_dtype in dict.fromkeys((dtype, "float32")):
          reference = _name("HF PyTorch", ref_dtype, form)
          if reference in best:
            ratio += f"  {best[reference] / seconds:.2f}x {reference.split(',')[0]}"
      rate = per_step / seconds
      print(f"  {name:41s} {seconds:7.3f} s/step {tokens / seconds:9,.0f} tokens/s  "
            f"{rate / 1e9:6.1f} GFLOP/s = {rate / peaks[dtype]:5.1%} of the {dtype} matmul "
            f"rate{ratio}")


if __name__ == "__main__":
  main()
