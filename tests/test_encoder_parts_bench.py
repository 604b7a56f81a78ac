"""bench/encoder_parts.py: its FLOP count is what XLA compiles, and a short run reports."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("encoder_parts")


@pytest.mark.parametrize("with_attention", [False, True])
def test_flop_count_is_the_compiled_matmuls(bench, with_attention):
  profile = load_bench("step_profile")
  shapes = dict(q=(384, 384), k=(384, 384), v=(384, 384), o=(384, 384), wi=(384, 1536),
                wo=(1536, 384))
  params = [{k: jnp.zeros(s) for k, s in shapes.items()} for _ in range(2)]
  x = jnp.zeros((bench.TOKENS, bench.HIDDEN))
  grad = jax.jit(jax.grad(bench.encoder_loss), static_argnums=2)
  hlo = grad.lower(params, x, with_attention).compile().as_text()
  # Each dot once: its own instruction, not the fusions that call its body too.
  compiled = sum(flops for name, (_, flops) in profile.hlo_ops(hlo).items()
                 if "fusion" not in name)
  # The input x is not differentiated: layer 0's Q/K/V input gradients never run.
  skipped = 3 * 2 * bench.TOKENS * bench.HIDDEN * bench.HIDDEN
  assert compiled == bench.encoder_flops(2, with_attention) - skipped


def test_a_short_run_reports_every_part(bench, capsys):
  bench.main(["--layers=1", "--repeats=1"])
  out = capsys.readouterr().out
  rates = [float(r) for r in re.findall(r"= (\d+)% of the matmul rate", out)]
  assert len(rates) == 2 and all(r > 0 for r in rates), out
  for part in ("batched matmul qk", "batched matmul pv", "softmax"):
    assert re.search(part + r": XLA [\d.]+ G\w+/s, torch [\d.]+ G\w+/s, [\d.]+x", out), out
  xla, ref = map(float, re.search(r"XLA \(jitted\) ([\d.]+) GFLOP/s, torch ([\d.]+) GFLOP/s",
                                  out).groups())
  assert xla > 0 and ref > 0 and np.isfinite(xla)
