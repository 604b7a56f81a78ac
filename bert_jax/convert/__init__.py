"""Import and export of Hugging Face and original TF checkpoints.

    model, params = bert_jax.from_pretrained("path/to/hf_folder")
    bert_jax.save_pretrained(model, params, "path/to/out")   # loads in transformers

One module per family (bert.py, t5.py; `models.Family.convert_module` names
it) holds the parameter-name maps; this module reads the folder, picks the
family from config.json and dispatches. Each family module provides:
  MODEL_TYPES: the config.json `model_type` values it handles;
  load_hf(hf_config, state, task, dtype) -> (model, params);
  export_hf(model, params) -> (hf_config, {name: np.ndarray});
and bert.py also load_tf_checkpoint(path, task, dtype) for Google's TF BERT.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import jax.numpy as jnp

from bert_jax import models
from bert_jax.convert.hf import CheckpointError, load_state_dict, read_config, write_folder


def _converters() -> list:
  """Every registered family's converter module."""
  return [family.converter() for family in models.FAMILIES.values()]


def _family_for(hf_config: dict, source: str):
  model_type = hf_config.get("model_type")
  archs = hf_config.get("architectures") or []
  for module in _converters():
    if model_type in module.MODEL_TYPES:
      return module
  raise CheckpointError(
      f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
      f"supported model_type values: "
      f"{sorted(t for module in _converters() for t in module.MODEL_TYPES)}")


def from_pretrained(path: str | os.PathLike, *, task: str | None = None,
                    dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """Loads a checkpoint folder as `(model, params)`.

  Args:
    path: a Hugging Face folder (config.json + model.safetensors or
      pytorch_model.bin) or an original TF BERT folder (bert_config.json +
      bert_model.ckpt.*).
    task: which head to build; None picks the one the checkpoint's
      `architectures` names (bare encoder if none). See each family's TASKS.
    dtype: computation dtype of the returned model (parameters stay float32).
  """
  path = pathlib.Path(path)
  if (path / "bert_config.json").is_file() and not (path / "config.json").is_file():
    return models.get("bert").converter().load_tf_checkpoint(path, task=task, dtype=dtype)
  hf_config = read_config(path)
  family = _family_for(hf_config, str(path / "config.json"))
  state = load_state_dict(path)
  return family.load_hf(hf_config, state, task=task, dtype=dtype)


def save_pretrained(model: Any, params: dict, path: str | os.PathLike,
                    overwrite: bool = False) -> pathlib.Path:
  """Writes `(model, params)` as a Hugging Face folder that `transformers` loads."""
  for module in _converters():
    if module.handles(model):
      hf_config, tensors = module.export_hf(model, params)
      return write_folder(path, hf_config, tensors, overwrite=overwrite)
  raise CheckpointError(f"cannot export a {type(model).__name__}: not a bert_jax BERT or T5 model")


__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
