"""Cloud TPU accelerator types: runtime version, chips, workers, JAX devices.

This is the one place that knows TPU generations. An accelerator type is
`GENERATION-SIZE` (`v4-32`, `v5litepod-16`, `v6e-8`), and SIZE means different
things per generation, which is the usual source of wrong device counts:
- v2, v3, v4, v5p: SIZE counts TensorCores, two per chip (v4-32 = 16 chips).
- v5e (spelled `v5litepod`), v6e: SIZE counts chips (one TensorCore each).
JAX shows one device per chip on v4/v5p (the two cores act as one "megacore")
and on v5e/v6e, but one device per TensorCore on v2/v3 (v3-8 = 8 devices).
Every multi-host slice has 4 chips per TPU VM ("worker"); a single VM holds at
most 4 chips on v2-v5p and 8 on v5e/v6e (v5litepod-8, v6e-8 are one VM).

Runtime versions (the TPU VM image) follow the generation; the table below can
be overridden per run with the RUNTIME_VERSION setting, and a new generation is
one more `Generation` row.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Generation:
  """What an accelerator-type prefix implies.

  Attributes:
    runtime_version: default TPU VM software version for `--runtime-version`.
    size_counts: 'cores' (2 per chip) or 'chips': what SIZE in GEN-SIZE counts.
    devices_per_chip: JAX devices per chip.
    chips_per_worker: chips on each VM of a multi-host slice.
    max_single_host_chips: the largest slice that is a single VM.
    sizes: the allowed SIZE values, or None for "any multiple of 8".
  """
  runtime_version: str
  size_counts: str
  devices_per_chip: int
  chips_per_worker: int
  max_single_host_chips: int
  sizes: tuple[int, ...] | None = None


_CHIP_SLICES = (1, 4, 8, 16, 32, 64, 128, 256)

GENERATIONS: dict[str, Generation] = {
    "v2": Generation("tpu-ubuntu2204-base", "cores", 2, 4, 4),
    "v3": Generation("tpu-ubuntu2204-base", "cores", 2, 4, 4),
    "v4": Generation("tpu-ubuntu2204-base", "cores", 1, 4, 4),
    "v5p": Generation("v2-alpha-tpuv5", "cores", 1, 4, 4),
    "v5litepod": Generation("v2-alpha-tpuv5-lite", "chips", 1, 4, 8, _CHIP_SLICES),
    "v6e": Generation("v2-alpha-tpuv6e", "chips", 1, 4, 8, _CHIP_SLICES),
}

# Names people type that gcloud does not accept, with the spelling it does.
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A parsed accelerator type.

  Attributes:
    accelerator_type: as given, e.g. 'v4-32'.
    generation: 'v4'.
    chips: TPU chips in the slice.
    workers: TPU VMs (= JAX processes, one per VM).
    devices: `jax.device_count()` on the slice.
    runtime_version: the runtime version to create it with.
  """
  accelerator_type: str
  generation: str
  chips: int
  workers: int
  devices: int
  runtime_version: str

  @property
  def multi_host(self) -> bool:
    """True when the slice spans several TPU VMs (jax.distributed needed)."""
    return self.workers > 1


def parse(accelerator_type: str, runtime_version: str = "") -> Slice:
  """Parses an accelerator type into chip, worker and device counts.

  Args:
    accelerator_type: e.g. 'v4-32', 'v5litepod-16', 'v5p-8', 'v6e-8'.
    runtime_version: overrides the generation's default runtime version.

  Returns:
    The Slice.

  Raises:
    ValueError: unknown generation or a size that generation does not have.
  """
  known = ", ".join(GENERATIONS)
  match = re.fullmatch(r"([a-z0-9]+?)-(\d+)", accelerator_type or "")
  if not match:
    raise ValueError(f"accelerator type {accelerator_type!r} is not GENERATION-SIZE "
                     f"(e.g. v4-32, v5litepod-16, v6e-8); generations: {known}")
  name, size = match.group(1), int(match.group(2))
  if name not in GENERATIONS:
    hint = ""
    if name in _ALIASES:
      hint = f"; gcloud spells it {_ALIASES[name]}-{size}"
    raise ValueError(f"unknown accelerator type {accelerator_type!r}: generation {name!r} is "
                     f"not one of {known}{hint} (a new generation is one row of GENERATIONS "
                     f"in tpu_scripts/accelerators.py)")
  gen = GENERATIONS[name]
  if gen.size_counts == "cores":
    if size < 8 or size % 8:
      raise ValueError(f"accelerator type {accelerator_type!r}: for {name} the size counts "
                       "TensorCores (2 per chip) and is a multiple of 8 (e.g. "
                       f"{name}-8, {name}-32)")
    chips = size // 2
  else:
    if gen.sizes is not None and size not in gen.sizes:
      raise ValueError(f"accelerator type {accelerator_type!r}: {name} slices have "
                       f"{', '.join(map(str, gen.sizes))} chips")
    chips = size
  workers = 1 if chips <= gen.max_single_host_chips else chips // gen.chips_per_worker
  return Slice(accelerator_type=accelerator_type, generation=name, chips=chips,
               workers=workers, devices=chips * gen.devices_per_chip,
               runtime_version=runtime_version or gen.runtime_version)
