"""Throughput and model FLOPs utilisation (MFU), without TensorFlow.

`Throughput` turns wall time between two logged steps into steps/s, tokens/s
and MFU, from a FLOP count per step (each model family's formula,
`bert_jax.models.flops`) and the peak of `peak_flops_per_device`.
`for_train_step` builds the one the trainer logs. Nothing here imports
TensorFlow, so bench/gpu_step.py reports the trainer's MFU on accelerator
images that have JAX but no TensorFlow.
"""
from __future__ import annotations

import re
import time
from typing import Mapping, Sequence

import numpy as np

# Dense bfloat16 peak FLOP/s (no structured sparsity) per JAX device, keyed by
# `jax.Device.device_kind`. On TPU v2 and v3 a JAX device is one TensorCore
# (two per chip), so the per-chip figures (45 and 123 TFLOP/s) are halved; from
# v4 on a JAX device is a chip (v4 and v5p fuse their two cores, "megacore";
# v5e and v6e have one core). v5e reports "TPU v5 lite", v6e "TPU v6 lite",
# v5p "TPU v5" (newer runtimes: "TPU v5p").
_TPU_PEAK = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
# CUDA device names vary with form factor and memory ("NVIDIA A100-SXM4-40GB",
# "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"): matched by pattern, in
# order. NVL boards (lower clocks) are left unknown rather than guessed.
_GPU_PEAK = (
    (re.compile(r"NVL"), None),
    (re.compile(r"\bA100\b"), 312e12),
    (re.compile(r"\bH100\b.*PCIe", re.IGNORECASE), 756e12),
    (re.compile(r"\bH100\b"), 989e12),  # SXM (HBM3)
    (re.compile(r"\bH200\b"), 989e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one JAX device, or None when not known.

  Args:
    device_kind: `jax.devices()[0].device_kind`, e.g. 'TPU v4', 'TPU v5 lite',
      'NVIDIA H100 80GB HBM3'.

  Returns:
    FLOP/s per JAX device (TPU v2/v3: per core; later TPUs and GPUs: per
    chip); None for CPUs and kinds not in the table, so MFU is reported as
    unknown rather than against a made-up peak.
  """
  if device_kind in _TPU_PEAK:
    return _TPU_PEAK[device_kind]
  for pattern, peak in _GPU_PEAK:
    if pattern.search(device_kind):
      return peak
  return None


class Throughput:
  """Steps/s, tokens/s and MFU over the interval since the last measurement.

  JAX dispatches asynchronously: call `start` and `measure` only after the
  step's outputs have reached the host (e.g. after fetching the loss), or the
  interval measures dispatch, not compute. Call `start` after the first
  (compiling) step so compilation is not counted.

  Attributes:
    tokens_per_step: tokens of one global batch (what the run counts as a
      token, e.g. non-padding input tokens).
    flops_per_step: model FLOPs of one global step (per-example FLOPs x
      global batch size).
    peak_flops: peak FLOP/s of all devices of the run together, or None.
  """

  def __init__(self, *, tokens_per_step: float, flops_per_step: float,
               peak_flops: float | None):
    if tokens_per_step < 0 or flops_per_step < 0:
      raise ValueError(f"tokens_per_step ({tokens_per_step}) and flops_per_step "
                       f"({flops_per_step}) must be >= 0")
    if peak_flops is not None and peak_flops <= 0:
      raise ValueError(f"peak_flops must be > 0 or None, got {peak_flops}")
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._step = None
    self._time = None

  def start(self, step: int) -> None:
    """Marks the beginning of a measured interval after `step` completed."""
    self._step, self._time = step, time.perf_counter()

  def measure(self, step: int) -> dict[str, float | None]:
    """Rates since the last `start`/`measure`; starts the next interval.

    Returns:
      {'steps_per_sec', 'tokens_per_sec', 'mfu'}; mfu = flops_per_step *
      steps_per_sec / peak_flops, None when the peak is unknown. All None
      when no step or no time has passed.
    """
    if self._time is None:
      raise ValueError("Throughput.measure called before start")
    now = time.perf_counter()
    steps, seconds = step - self._step, now - self._time
    self._step, self._time = step, now
    if steps <= 0 or seconds <= 0:
      return {"steps_per_sec": None, "tokens_per_sec": None, "mfu": None}
    rate = steps / seconds
    mfu = None if self.peak_flops is None else self.flops_per_step * rate / self.peak_flops
    return {"steps_per_sec": rate, "tokens_per_sec": self.tokens_per_step * rate, "mfu": mfu}


def for_train_step(family, model_config, task: str, local: Mapping[str, np.ndarray],
                   batch_size: int, devices: Sequence, process_count: int = 1) -> Throughput:
  """The trainer's meter: tokens and FLOPs of a step against the devices' peak.

  Args:
    family: the model family (`models.get(name)`), whose `train_flops` counts.
    model_config: its config.
    task: the training task ('mlm', 'seq2seq', ...).
    local: this host's share of a batch (shapes are read from it).
    batch_size: the global batch size.
    devices: the run's devices (all hosts').
    process_count: hosts feeding the batch; tokens scale with it.
  """
  shapes = {k: v.shape for k, v in local.items()}
  tokens = sum(local[k].size for k in ("encoder_input_tokens", "decoder_input_tokens")
               if k in local) * process_count
  peak = peak_flops_per_device(devices[0].device_kind)
  return Throughput(
      tokens_per_step=tokens,
      flops_per_step=family.train_flops(model_config, shapes, task) * batch_size,
      peak_flops=peak * len(devices) if peak else None)
