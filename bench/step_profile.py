"""Where the time of one bert_jax training step goes, op by op, on this machine.

Runs the step of bench/train_step.py (same shapes, random weights and tokens)
under jax.profiler, then sums the trace's per-op events by XLA op and by the
model path the op came from (layer indices folded, forward and backward
apart), and rates every matmul in GFLOP/s. It is how the CPU step was
profiled for the "Training speed" issue:

  python bench/step_profile.py --shape=minilm --form=every
  python bench/step_profile.py --shape=t5 --top=40

Read the op times as shares, not a sum: XLA:CPU runs independent ops side by
side (a weight gradient next to an input gradient), so op times can add up to
more than the step's wall time, and an op sharing the cores looks slower than
it is alone.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position

from bert_jax import models  # noqa: E402  pylint: disable=wrong-import-position

# Trace events that are not XLA ops: Python frames ('$...'), the executor's
# own spans, thread-pool waits.
_NOT_OPS = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction")


def build_step(shape: str, form: str, dtype: str, layers: int | None = None):
  """(run, description) of one bert_jax step of train_step's `shape`."""
  rng = np.random.default_rng(0)
  if shape == "t5":
    overrides = {} if layers is None else dict(num_encoder_layers=layers,
                                               num_decoder_layers=layers)
    config = models.get("t5").preset("t5_v1_1_small", vocab_size=train_step.T5_VOCAB,
                                     dropout_rate=0.1, dtype=jnp.dtype(dtype), **overrides)
    batch = train_step._t5_batch(rng, 4, 512, 114)  # pylint: disable=protected-access
    return (train_step.ours("t5", config, "seq2seq", "span_corruption", batch),
            "T5 v1.1-small, 4 x 512 -> 114")
  preset, size, overrides = train_step.BERT_SHAPES[shape]
  if layers is not None:
    overrides = dict(overrides, num_layers=layers)
  config = models.get("bert").preset(preset, vocab_size=train_step.VOCAB,
                                     dtype=jnp.dtype(dtype), **overrides)
  batch = train_step._bert_batch(rng, size, 128, form == "gathered")  # pylint: disable=protected-access
  return (train_step.ours("bert", config, "mlm", "mlm", batch),
          f"BERT {shape} shape, {size} x 128, MLM {form}")


def hlo_ops(hlo: str) -> dict:
  """Instruction name -> (op_name metadata, dot FLOPs or 0); a fusion counts its body's dot."""
  shapes = {}
  for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo):
    shapes.setdefault(m.group(1), [int(d) for d in m.group(2).split(",") if d])
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}$", hlo, re.S | re.M)}
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
    if not m:
      continue
    name = m.group(1)
    op_name = re.search(r'op_name="([^"]*)"', line)
    # A fusion's dot is in the body it calls (XLA:CPU wraps most matmuls in a
    # YNNPACK `ynn_fusion` whose body is the lone dot).
    calls = re.search(r"calls=%([\w.\-]+)", line)
    text = bodies.get(calls.group(1), line) if calls else line
    ops.setdefault(name, (op_name.group(1) if op_name else "", _dot_flops(text, shapes)))
  return ops


def _dot_flops(text: str, shapes: dict) -> int:
  """2 x output size x contracted size of the first dot in `text`, else 0."""
  m = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*?lhs_contracting_dims=\{([\d,]*)\}",
                text)
  if not m or m.group(2) not in shapes:
    return 0
  out = np.prod([int(d) for d in m.group(1).split(",") if d], dtype=np.int64)
  lhs = shapes[m.group(2)]
  contracted = np.prod([lhs[int(d)] for d in m.group(3).split(",") if d], dtype=np.int64)
  return int(2 * out * contracted)


def path_of(op_name: str) -> str:
  """'bwd layer_L/mlp/wi/dot_general' from an XLA op_name (jit and jvp wrappers dropped)."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  path = re.sub(r"jit\(\w+\)/|transpose\(|jvp\(|\)", "", op_name)
  path = re.sub(r"\w+\._encode/|\w+\._apply_layers/|\w+\.encode/|\w+\.decode/", "", path)
  path = re.sub(r"layers?_\d+", "layer_L", path)
  return f"{direction} {path or '(unnamed)'}"


# Model components, first match wins: (name, pattern on the folded path).
COMPONENTS = (
    # self_attention/, encoder_decoder_attention/ (T5, BART) and BERT's attention/.
    ("attention projections", r"attention/(query|key|value|out|qkv)/dot_general"),
    # mlp/dot_general: the gated FFN's one dot over its stacked wi_0 and wi_1.
    ("FFN matmuls", r"/mlp/(w\w*/)?dot_general"),
    ("attention core", r"attention/|relpos|relative"),
    ("dropout", r"[Dd]ropout"),
    ("FFN elementwise", r"/mlp/"),
    ("norms", r"norm"),
    ("vocabulary head", r"/mlm/|logits|lm_head"),
    ("loss", r"^(fwd|bwd) /"),
    ("embeddings", r"embed|/shared/"),
    # No model path at all: AdamW's update (add, square, sqrt) and the like.
    ("optimizer and unnamed", r"^(fwd|bwd) [^/]*$"),
)


def component_of(path: str) -> str:
  """The model component a folded path belongs to ('other' when none matches)."""
  for name, pattern in COMPONENTS:
    if re.search(pattern, path):
      return name
  return "other"


def profile(run, steps: int) -> dict:
  """Op name -> microseconds per step, from a jax.profiler trace of `steps` steps."""
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    trace, = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace, "rt") as f:
      events = json.load(f)["traceEvents"]
  per_op = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and not event["name"].startswith(_NOT_OPS):
      per_op[event["name"]] += event["dur"] / steps
  return per_op


def report(per_op: dict, ops: dict, seconds: float, top: int) -> list[str]:
  """The printed lines: totals, the `top` ops, the `top` model paths."""
  total = sum(per_op.values()) / 1e6
  dots = {n: us for n, us in per_op.items() if ops.get(n, ("", 0))[1]}
  dot_s = sum(dots.values()) / 1e6
  dot_flops = sum(ops[n][1] for n in dots)
  lines = [f"step {seconds:.3f} s; ops {total:.3f} s (matmuls {dot_s:.3f} s at "
           f"{dot_flops / max(dot_s, 1e-9) / 1e9:.1f} GFLOP/s, other ops {total - dot_s:.3f} s)",
           f"\ntop {top} ops (s/step, share of op time, GFLOP/s for matmuls):"]
  for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    op_name, flops = ops.get(name, ("", 0))
    rate = f"{flops / us / 1e3:6.1f}" if flops else "      "
    lines.append(f"  {us / 1e6:7.3f} {us / 1e6 / total:6.1%} {rate}  {name[:28]:28s} "
                 f"{path_of(op_name)[-90:]}")
  by_path = collections.Counter()
  for name, us in per_op.items():
    by_path[path_of(ops.get(name, ("", 0))[0])] += us / 1e6
  lines.append(f"\ntop {top} model paths (all layers together):")
  for path, s in by_path.most_common(top):
    lines.append(f"  {s:7.3f} {s / total:6.1%}  {path[-100:]}")
  by_component = collections.Counter()
  for path, s in by_path.items():
    by_component[component_of(path)] += s
  lines.append("\nby component (op time; ops that overlap count in full):")
  for name, s in by_component.most_common():
    lines.append(f"  {s:7.3f} {s / total:6.1%}  {name}")
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="minilm", choices=[*train_step.BERT_SHAPES, "t5"])
  parser.add_argument("--form", default="gathered", choices=["gathered", "every"],
                      help="BERT MLM head at 20 gathered positions or at every position")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--layers", type=int, default=None, help="override the layer count")
  parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up)")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  print(train_step.machine())
  run, what = build_step(args.shape, args.form, args.dtype, args.layers)
  for _ in range(2):
    run()
  start = time.perf_counter()
  for _ in range(args.steps):
    run()
  seconds = (time.perf_counter() - start) / args.steps
  print(f"{what}, {args.dtype}: {seconds:.3f} s/step unprofiled")
  per_op = profile(run, args.steps)
  for line in report(per_op, hlo_ops(run.hlo_text()), seconds, args.top):
    print(line)


if __name__ == "__main__":
  main()
