"""bench/gpu_step.py, the GPU job of the training-speed issue, run here on CPU at toy sizes.

The device machine is lent to few sessions and this script must work the
first time it gets one, so its whole path runs here: every case compiles and
trains, the attention kernel is read from the HLO, Hugging Face runs beside
it, and TensorFlow is checked.
"""
import re

import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("gpu_step")


def test_attention_kernel_is_read_from_the_hlo(bench):
  fused = ('%fmha = (bf16[4,128,12,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), '
           'custom_call_target="__cudnn$fmhaSoftmax"\n'
           '%fmha_bwd = custom-call(...), custom_call_target="__cudnn$fmhaSoftmaxBackward"')
  assert bench.attention_kernel(fused) == "cuDNN fused attention (2 custom calls)"
  assert bench.attention_kernel("%dot = f32[4,12,128,128] dot(%q, %k)") == "XLA (unfused)"


def test_unknown_case_is_refused(bench):
  with pytest.raises(SystemExit):
    bench.main(["--cases=bert_huge"])


@pytest.mark.slow
def test_every_case_runs_at_toy_size_beside_hugging_face(bench, capsys):
  bench.main(["--tiny", "--hf", "--rounds=1", "--steps=1", "--warmup=1"])
  out = capsys.readouterr().out
  assert "FAILED" not in out, out
  lines = {m.group(1): m.group(0) for m in re.finditer(r"^(\w+): .*$", out, re.M)}
  assert set(bench.CASES) <= set(lines), out
  for name in bench.CASES:
    assert re.search(r"[\d.]+ ms/step, [\d,]+ tokens/s, MFU n/a", lines[name]), lines[name]
    assert re.search(r"HF PyTorch [\d.]+ ms/step \([\d.]+x\)", lines[name]), lines[name]
    assert "attention XLA (unfused)" in lines[name]  # cuDNN is for NVIDIA GPUs only
  # Same weights, batch and steps: the two attention settings agree (both XLA here).
  loss = {n: float(re.search(r"loss after \d+ steps ([\d.]+)", lines[n]).group(1))
          for n in ("bert_base", "bert_base_xla")}
  assert loss["bert_base"] == pytest.approx(loss["bert_base_xla"], rel=1e-3)
  assert re.search(r"TensorFlow .*its GPU devices: \[\]; ok", out), out
