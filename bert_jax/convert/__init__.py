"""Import and export of Hugging Face and original TF checkpoints.

    model, params = bert_jax.from_pretrained("path/to/hf_folder")
    bert_jax.save_pretrained(model, params, "path/to/out")   # loads in transformers

One module per family (bert.py, t5.py; `models.Family.convert_module` names
it) holds the parameter-name maps; this module reads the folder, picks the
family from config.json and dispatches. Each family module provides:
  MODEL_TYPES: the config.json `model_type` values it handles;
  load_hf(hf_config, state, task, dtype) -> (model, params);
  export_hf(model, params) -> (hf_config, {name: np.ndarray});
and optionally export_hf_folders(model, params) -> {subfolder: (hf_config,
tensors)} for a model that is several Hugging Face models ('' is the folder
itself). bert.py also has load_tf_checkpoint(path, task, dtype) for Google's
TF BERT; its joint ELECTRA model is saved as PATH/discriminator +
PATH/generator, and loads back from PATH.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import jax.numpy as jnp

from bert_jax import models
from bert_jax.convert import electra
from bert_jax.convert.hf import CONFIG, CheckpointError, load_state_dict, read_config, write_folder


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
      pytorch_model.bin), an original TF BERT folder (bert_config.json +
      bert_model.ckpt.*), or a folder holding an ELECTRA pair as
      save_pretrained writes it (discriminator/ + generator/: the joint
      model, or with another task the discriminator alone).
    task: which head to build; None picks the one the checkpoint's
      `architectures` names (bare encoder if none). See each family's TASKS.
    dtype: computation dtype of the returned model (parameters stay float32).
  """
  path = pathlib.Path(path)
  pair = [path / name for name in electra.JOINT_FOLDERS]
  if not (path / CONFIG).is_file() and all((p / CONFIG).is_file() for p in pair):
    if task not in (None, "electra"):
      return from_pretrained(path / "discriminator", task=task, dtype=dtype)
    disc, gen = (from_pretrained(p, dtype=dtype) for p in pair)
    return electra.join(*disc, *gen)
  if (path / "bert_config.json").is_file() and not (path / "config.json").is_file():
    return models.get("bert").converter().load_tf_checkpoint(path, task=task, dtype=dtype)
  hf_config = read_config(path)
  family = _family_for(hf_config, str(path / "config.json"))
  state = load_state_dict(path)
  return family.load_hf(hf_config, state, task=task, dtype=dtype)


def save_pretrained(model: Any, params: dict, path: str | os.PathLike,
                    overwrite: bool = False) -> pathlib.Path:
  """Writes `(model, params)` as a Hugging Face folder that `transformers` loads.

  A model that is several Hugging Face models (ELECTRA's joint generator +
  discriminator) is written as subfolders of `path` (see each family's
  export_hf_folders); `path` is returned either way. Existing checkpoints are
  kept unless `overwrite`: every folder is checked before any is written.
  """
  path = pathlib.Path(path)
  for module in _converters():
    if module.handles(model):
      split = getattr(module, "export_hf_folders", None)
      folders = split(model, params) if split else {"": module.export_hf(model, params)}
      targets = {sub: path / sub if sub else path for sub in folders}
      for target in targets.values():
        if (target / CONFIG).exists() and not overwrite:
          raise CheckpointError(f"{target}: already holds a checkpoint; pass overwrite=True to "
                                f"replace it")
      for sub, (hf_config, tensors) in folders.items():
        write_folder(targets[sub], hf_config, tensors, overwrite=overwrite)
      return path
  raise CheckpointError(f"cannot export a {type(model).__name__}: not a bert_jax BERT or T5 model")


__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
