"""Where a loss spike comes from: one bert_jax state, stepped by bert_jax and by HF PyTorch.

bench/pretrain_quality.py compares held-out curves run by run. Dropout makes
each run one draw of masks, and at its recipe (lr 1e-3, batch 16) a draw can
put a transient bump in a curve (seed 0: bert_jax at step 139). A bump seen in
bert_jax's curve and not in HF's does not say which framework is at fault:
the two runs are at different points by then. This asks the direct question.

It trains bert_jax for --at steps exactly as pretrain_quality.py does (same
batches, recipe and seed), then moves that state -- parameters, AdamW's first
and second moments, its step count and the scheduled learning rate -- into
transformers' BertForMaskedLM and torch.optim.AdamW (the moments go through
bert_jax.save_pretrained like the parameters, so the name and layout mapping
is the tested export). Both then take step --at from that one state --draws
times, each draw with other dropout masks (the same draw numbers seed JAX's
key and torch's generator; the masks themselves differ), and the held-out loss
after each is printed.

Read: if HF's step from bert_jax's state jumps for some draws too, the
sharpness belongs to that state of the recipe, not to bert_jax's step. The
check line first shows that HF's held-out loss at the moved state equals
bert_jax's, so the transfer itself is exact.

  python bench/pretrain_restep.py --at=139 --draws=30      # ~4 min on 2 idle cores
"""
import argparse
import os
import pathlib
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_quality as pq  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bert_jax  # noqa: E402

CHECK_TOL = 1e-4  # relative: HF's held-out loss at the moved state vs bert_jax's


def adam_moments(opt_state) -> optax.ScaleByAdamState:
  """The one ScaleByAdamState (count, mu, nu) inside bert_jax's optimizer chain."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  if len(found) != 1:
    raise SystemExit(f"expected one Adam state in the optimizer chain, found {len(found)}")
  return found[0]


def snapshot(state):
  """A copy of a train state with buffers of its own (the step donates its input)."""
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def move_to_torch(ours: pq.Ours, theirs: pq.Theirs, step: int, lr: float
                  ) -> Callable[[], None]:
  """Puts bert_jax's params and AdamW state into `theirs` as torch's state
  after `step` updates with learning rate `lr` for the next one. Returns a
  function that restores exactly that state again (call it before each draw:
  torch's optimizer updates the tensors it holds in place)."""
  adam = adam_moments(ours.state.opt_state)
  if int(adam.count) != step:
    raise SystemExit(f"bert_jax's Adam count is {int(adam.count)}, expected {step}")
  trees = {"params": ours.state.params, "mu": adam.mu, "nu": adam.nu}
  with tempfile.TemporaryDirectory() as tmp:
    loaded = {name: dict(transformers.BertForMaskedLM.from_pretrained(
        bert_jax.save_pretrained(ours.model, tree, pathlib.Path(tmp) / name)).named_parameters())
              for name, tree in trees.items()}
  names = [n for n, _ in theirs.model.named_parameters()]
  if set(names) != set(loaded["mu"]):
    raise SystemExit(f"moment names differ from the model's: {set(names) ^ set(loaded['mu'])}")

  def restore():
    with torch.no_grad():
      for name, p in theirs.model.named_parameters():
        p.copy_(loaded["params"][name])
    opt = theirs.optimizer
    opt.state.clear()
    for name, p in theirs.model.named_parameters():
      # torch's AdamW: `step` counts the updates taken, as optax's count does.
      opt.state[p] = {"step": torch.tensor(float(step)),
                      "exp_avg": loaded["mu"][name].detach().clone(),
                      "exp_avg_sq": loaded["nu"][name].detach().clone()}
    for group in opt.param_groups:
      group["lr"] = lr

  restore()
  return restore


def restep(ours: pq.Ours, theirs: pq.Theirs, batch: dict, held_out: list[dict],
           at: int, lr: float, draws: list[int]) -> tuple[float, float, dict]:
  """bert_jax's state before step `at` -> (bert_jax's held-out loss there,
  HF's at the moved state, name -> held-out loss after step `at` per draw)."""
  hf_held, hf_batch = [pq.hf_inputs(b) for b in held_out], pq.hf_inputs(batch)
  before = snapshot(ours.state)
  ours_loss = ours.held_out_loss(held_out)
  restore = move_to_torch(ours, theirs, at, lr)
  theirs_loss = theirs.held_out_loss(hf_held)
  after = {"bert_jax": [], "HF PyTorch": []}
  for d in draws:
    ours.state = snapshot(before)
    ours.reseed_dropout(d)
    ours.train([batch])
    after["bert_jax"].append(ours.held_out_loss(held_out))
    restore()
    torch.manual_seed(d)
    theirs.train([hf_batch])
    after["HF PyTorch"].append(theirs.held_out_loss(hf_held))
    print(f"  draw {d}: held-out after step {at}: bert_jax {after['bert_jax'][-1]:.4f}, "
          f"HF {after['HF PyTorch'][-1]:.4f}", flush=True)
  ours.state = before
  return ours_loss, theirs_loss, after


def main(argv=None):
  parser = pq.recipe_flags(argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
  parser.add_argument("--at", type=int, default=139, help="the step to take again")
  parser.add_argument("--draws", type=int, default=30, help="dropout draws of each")
  parser.add_argument("--first_draw", type=int, default=1000,
                      help="draws are numbered from here (clear of --dropout_seeds' small ones)")
  parser.add_argument("--jump", type=float, default=0.01,
                      help="a draw 'jumps' when its held-out loss rises by more than this "
                           "fraction over the step")
  args = parser.parse_args(argv)
  if not 0 < args.at < args.steps:
    raise SystemExit(f"--at={args.at} must be in 1 .. --steps - 1 = {args.steps - 1}")
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  print(pq.machine())
  train, held_out = pq.prepare(args)
  ours, theirs = pq.make_trainers(args, train[0])
  ours.train(train[:args.at])
  lr = args.lr * pq._torch_schedule(args.warmup, args.steps)(args.at)  # pylint: disable=protected-access
  draws = list(range(args.first_draw, args.first_draw + args.draws))
  print(f"bert_jax trained {args.at} steps (seed {args.seed}); step {args.at} at lr {lr:.4e}, "
        f"{args.draws} dropout draws each:")
  ours_loss, theirs_loss, after = restep(ours, theirs, train[args.at], held_out, args.at, lr,
                                         draws)
  check = abs(theirs_loss - ours_loss) / ours_loss
  print(f"check: held-out at the moved state: bert_jax {ours_loss:.5f}, HF {theirs_loss:.5f} "
        f"({'same' if check <= CHECK_TOL else 'DIFFERENT: the transfer is not exact'})")
  for name, losses in after.items():
    rel = (np.array(losses) - ours_loss) / ours_loss
    print(f"{name:>10s}: {int((rel > args.jump).sum())} of {len(rel)} draws rise by more than "
          f"{args.jump:.0%} (largest {rel.max():+.2%}, median {np.median(rel):+.2%})")


if __name__ == "__main__":
  main()
