"""Where XLA:CPU loses the MiniLM-shape step: its parts alone, against torch on the same cores.

  python bench/encoder_parts.py            # ~2 min on 2 cores
  python bench/encoder_parts.py --layers=2 --repeats=3

Three measurements, all forward + backward, fp32, one device:
  0. The dense matmul [4096,384]x[384,1536] (the MiniLM FFN's), XLA and torch.
  1. The encoder's dense work alone: 6 layers of Q/K/V/O projections, FFN with
     erf GELU and two LayerNorms on [4096, 384] (MiniLM's 32 x 128 tokens),
     no attention. Its FLOP rate against the [4096,384]x[384,1536] matmul rate
     measured in the same run says what XLA gets from the matmuls in a chain.
  2. The same with attention (12 heads of 32, softmax, no dropout): the drop
     from (1) is what attention costs.
  3. Attention's primitives on their own, XLA against torch: the two batched
     matmuls (384 products of [128, 32] x [32, 128] and [128, 128] x
     [128, 32]) and the softmax over [32, 12, 128, 128], each as ratio
     torch time / XLA time (above 1: XLA faster).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import torch  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order

BATCH, SEQ, HEADS, HIDDEN, FFN = 32, 128, 12, 384, 1536
TOKENS = BATCH * SEQ


def _norm(h):
  mean = h.mean(-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-12)


def _attend(q, k, v):
  """[T, D] each -> [T, D]: BERT's attention without dropout, einsum form."""
  q, k, v = (t.reshape(BATCH, SEQ, HEADS, HIDDEN // HEADS) for t in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (HIDDEN // HEADS) ** -0.5
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
  return out.reshape(TOKENS, HIDDEN)


def encoder_loss(params, x, with_attention: bool):
  h = x
  for p in params:
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
    # Without attention, q * k + v: a sum of the three would let XLA merge the
    # three matmuls into one (h @ (Wq + Wk + Wv)) and skip two thirds of them.
    mixed = _attend(q, k, v) if with_attention else q * k + v
    h = _norm(h + mixed @ p["o"])
    h = _norm(h + jax.nn.gelu(h @ p["wi"], approximate=False) @ p["wo"])
  return jnp.mean(h ** 2)


def encoder_flops(layers: int, with_attention: bool) -> float:
  dense = 2 * TOKENS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
  attention = 2 * 2 * BATCH * SEQ * SEQ * HIDDEN if with_attention else 0
  return 3 * layers * (dense + attention)  # forward + backward


def best_time(f, repeats: int) -> float:
  f()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  print(train_step.machine())
  rate = train_step.matmul_rate()
  a, b = torch.randn(TOKENS, HIDDEN), torch.randn(HIDDEN, FFN)
  torch_rate = 2 * TOKENS * HIDDEN * FFN / best_time(lambda: a @ b, args.repeats * 4)
  print(f"matmul [4096,384]x[384,1536]: XLA (jitted) {rate / 1e9:.1f} GFLOP/s, torch "
        f"{torch_rate / 1e9:.1f} GFLOP/s")
  rng = np.random.default_rng(0)
  shapes = dict(q=(HIDDEN, HIDDEN), k=(HIDDEN, HIDDEN), v=(HIDDEN, HIDDEN), o=(HIDDEN, HIDDEN),
                wi=(HIDDEN, FFN), wo=(FFN, HIDDEN))
  params = [{k: jnp.asarray(rng.standard_normal(s, np.float32) * 0.05) for k, s in shapes.items()}
            for _ in range(args.layers)]
  x = jnp.asarray(rng.standard_normal((TOKENS, HIDDEN), np.float32))
  for with_attention in (False, True):
    grad = jax.jit(jax.grad(encoder_loss), static_argnums=2)
    seconds = best_time(lambda: jax.block_until_ready(grad(params, x, with_attention)),
                        args.repeats)
    flop_rate = encoder_flops(args.layers, with_attention) / seconds
    what = "with attention" if with_attention else "dense + LayerNorm + GELU only"
    print(f"{args.layers}-layer encoder, {what}: {seconds * 1e3:.0f} ms, "
          f"{flop_rate / 1e9:.1f} GFLOP/s = {flop_rate / rate:.0%} of the matmul rate")

  d = HIDDEN // HEADS
  arrays = {"qk": ((BATCH * HEADS, SEQ, d), (BATCH * HEADS, d, SEQ)),
            "pv": ((BATCH * HEADS, SEQ, SEQ), (BATCH * HEADS, SEQ, d))}
  print("attention primitives (torch time / XLA time; above 1: XLA faster):")
  for name, (a_shape, b_shape) in arrays.items():
    a, b = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)
    xla = best_time(lambda: matmul(ja, jb).block_until_ready(), args.repeats * 4)
    ref = best_time(lambda: torch.bmm(ta, tb), args.repeats * 4)
    flops = 2 * np.prod(a_shape) * b_shape[-1]
    print(f"  batched matmul {name}: XLA {flops / xla / 1e9:.1f} GFLOP/s, torch "
          f"{flops / ref / 1e9:.1f} GFLOP/s, {ref / xla:.2f}x")
  logits = rng.standard_normal((BATCH, HEADS, SEQ, SEQ), np.float32)
  jl, tl = jnp.asarray(logits), torch.from_numpy(logits)
  softmax = jax.jit(lambda z: jax.nn.softmax(z, -1))
  xla = best_time(lambda: softmax(jl).block_until_ready(), args.repeats * 4)
  ref = best_time(lambda: torch.softmax(tl, -1), args.repeats * 4)
  print(f"  softmax: XLA {logits.nbytes * 2 / xla / 1e9:.1f} GB/s, torch "
        f"{logits.nbytes * 2 / ref / 1e9:.1f} GB/s, {ref / xla:.2f}x")


if __name__ == "__main__":
  main()
