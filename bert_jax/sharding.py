"""Device mesh, logical-axis rules and the shardings of state and batches.

Every parameter and key activation carries *logical* axis names (`embed`,
`mlp`, `heads`, ...). One short rule table maps them onto the mesh axes
('data', 'fsdp', 'tensor'); switching between data-parallel, FSDP and
FSDP+tensor parallel is a change of table, never of model code (the t5x
partitioning scheme, with fewer rules).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimensions are split over every axis that holds distinct examples.
BATCH_AXES = ("data", "fsdp")

# Parameters and activations use distinct logical names: a parameter's
# `embed` dimension is split by FSDP, an activation's hidden dimension is not
# (its batch dimension already is).
_ACTIVATIONS = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_kv", None),
    ("act_decode_length", None),
)
_DATA_PARALLEL = _ACTIVATIONS + (
    ("act_heads", None), ("act_mlp", None), ("act_vocab", None),
    ("vocab", None), ("embed", None), ("mlp", None), ("heads", None),
    ("kv", None),
)
_FSDP = _ACTIVATIONS + (
    ("act_heads", None), ("act_mlp", None), ("act_vocab", None),
    ("vocab", None), ("embed", "fsdp"), ("mlp", None), ("heads", None),
    ("kv", None),
)
_FSDP_TENSOR = _ACTIVATIONS + (
    ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
    ("heads", "tensor"), ("kv", None),
)
RULES = {"data_parallel": _DATA_PARALLEL, "fsdp": _FSDP, "fsdp_tensor": _FSDP_TENSOR}
# Logical names with no rule (positions, token types, relative-position
# buckets, norm scales) are replicated: they are small.


def get_rules(preset: str) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rule table of a preset: data_parallel, fsdp or fsdp_tensor."""
  if preset not in RULES:
    raise ValueError(f"unknown sharding preset {preset!r}; choose one of {sorted(RULES)}")
  return RULES[preset]


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves mesh axis sizes; one of them may be -1 to take the remaining devices."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(
        f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh data={data} fsdp={fsdp} tensor={tensor} uses {math.prod(sizes)} devices, "
        f"but {num_devices} are present")
  return tuple(sizes)


def mesh_shape_of(mesh_config) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of a run's `config.mesh` on this run's devices.

  Raises:
    ValueError naming config.mesh.rules or the sizes that do not fit.
  """
  if mesh_config.rules not in RULES:
    raise ValueError(f"config.mesh.rules: unknown preset {mesh_config.rules!r}; choose one of "
                     f"{sorted(RULES)}")
  try:
    return mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor,
                      jax.device_count())
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices.

  Axes are Auto, not Explicit (jax.make_mesh's default since 0.7): Linen's
  logical constraints and jit's in/out shardings work on Auto axes.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (e.g. a vocab of 30522 over 4).

  Such a dimension is then replicated along that axis instead of failing:
  the parameter stays correct, only less evenly spread.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
        kept.append(axis)
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (boxed) abstract values with logical axis names.

  `abstract_tree` is what `jax.eval_shape(model.init, ...)` returns: leaves are
  `nn.LogicallyPartitioned` boxes (or plain arrays, which are replicated).
  """
  specs = nn.get_partition_spec(abstract_tree)
  specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_tree))
  return jax.tree.map(
      lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def describe(shardings: Any, params: Any) -> str:
  """One line per parameter: path, shape and mesh spec (for start-up logs and tests)."""
  lines = []
  flat_s = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_p = jax.tree.leaves(params)
  for (path, s), p in zip(flat_s, flat_p):
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(p.shape)} {s.spec}")
  logging.debug("%d parameters sharded", len(lines))
  return "\n".join(lines)
