"""Reading and writing Hugging Face checkpoint folders, with strict tensor access.

A folder holds config.json plus model.safetensors (or a sharded
model.safetensors.index.json, or the older pytorch_model.bin). `StateDict`
hands tensors out by name and checks shapes, so a missing or mis-shaped tensor
is an error naming the file and the parameter, never a silent partial load.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Mapping

import numpy as np

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


class CheckpointError(ValueError):
  """A checkpoint folder or file that cannot be converted; the message names the cause."""


def read_config(path: str | os.PathLike) -> dict:
  """Parses `path/config.json`; errors name the folder or the JSON position."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
  file = path / CONFIG
  if not file.is_file():
    raise CheckpointError(f"{path}: no {CONFIG}; a Hugging Face checkpoint folder needs one "
                          f"(or bert_config.json + bert_model.ckpt.* for original TF BERT)")
  try:
    config = json.loads(file.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
  return config


def _load_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(file))
  except Exception as e:  # safetensors raises its own error types
    if "bfloat16" in str(e) or "BF16" in str(e):
      # numpy has no bfloat16: go through torch, which does.
      from safetensors.torch import load_file as load_torch
      return {k: v.float().numpy() for k, v in load_torch(str(file)).items()}
    raise CheckpointError(f"{file}: cannot read safetensors file: {e}") from e


def _load_torch_bin(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{file}: reading pytorch_model.bin needs torch "
                          f"(pip install torch), or convert the folder to safetensors") from e
  state = torch.load(str(file), map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


class StateDict:
  """Tensors of one checkpoint, handed out by name with shape checks.

  Every `take` marks a tensor as used; `unused()` lists the rest so the caller
  can decide whether leftovers (a head it does not need) are acceptable.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self.tensors = dict(tensors)
    self.source = source
    self._used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def keys(self) -> Iterable[str]:
    return self.tensors.keys()

  def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor `name` as float32/int numpy, checked against `shape` when given."""
    if name not in self.tensors:
      raise CheckpointError(f"{self.source}: parameter {name!r} is missing")
    value = np.asarray(self.tensors[name])
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise CheckpointError(f"{self.source}: parameter {name!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(shape)} from the config")
    self._used.add(name)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value

  def unused(self) -> list[str]:
    return sorted(set(self.tensors) - self._used)


def load_state_dict(path: str | os.PathLike) -> StateDict:
  """All tensors of a checkpoint folder: safetensors (single or sharded) or pytorch_model.bin."""
  path = pathlib.Path(path)
  if (path / SAFETENSORS).is_file():
    return StateDict(_load_safetensors(path / SAFETENSORS), str(path / SAFETENSORS))
  if (path / SAFETENSORS_INDEX).is_file():
    index = json.loads((path / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
      if not (path / shard).is_file():
        raise CheckpointError(f"{path / SAFETENSORS_INDEX}: names shard {shard}, which is missing")
      tensors.update(_load_safetensors(path / shard))
    return StateDict(tensors, str(path / SAFETENSORS_INDEX))
  if (path / TORCH_BIN).is_file():
    return StateDict(_load_torch_bin(path / TORCH_BIN), str(path / TORCH_BIN))
  raise CheckpointError(f"{path}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
                        f"or {TORCH_BIN}")


def write_folder(path: str | os.PathLike, config: dict, tensors: Mapping[str, np.ndarray],
                 overwrite: bool = False) -> pathlib.Path:
  """Writes config.json + model.safetensors atomically.

  The files are written to a temporary folder beside `path` and moved into
  place only when complete, so a crash never leaves a half-written checkpoint,
  and an existing checkpoint is never replaced unless `overwrite` is set.
  """
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  if (path / CONFIG).exists() and not overwrite:
    raise CheckpointError(f"{path}: already holds a checkpoint; pass overwrite=True to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / SAFETENSORS),
              metadata={"format": "pt"})
    if path.exists():
      for name in (CONFIG, SAFETENSORS):
        if (path / name).exists():
          (path / name).unlink()
      for f in tmp.iterdir():
        shutil.move(str(f), str(path / f.name))
      tmp.rmdir()
    else:
      tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("wrote %s (%d tensors)", path, len(tensors))
  return path
