"""The tensor table that Hugging Face converters walk both ways, and the
family-interface pieces they share.

A converter lists one `Entry` per Hugging Face tensor: its name and our
parameter paths it holds, concatenated along its rows (a fused `Wqkv` holds
query, key and value). PyTorch Linear weights are stored [out, in], ours
[in, ...out]. `params_from_state` reads a whole model by the table (fresh
heads where the checkpoint has none), `tensors_from_params` writes it back.
"""
from __future__ import annotations

import logging
from typing import Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.convert.hf import CheckpointError, StateDict
from bert_jax.models import layers


class Entry(NamedTuple):
  """One Hugging Face tensor: its name and the params it holds, concatenated along its rows."""
  name: str
  paths: tuple[tuple[str, ...], ...]
  n_in: int  # leading dims of our arrays that are the matrix's input side (0: a vector)
  transposed: bool  # stored [out, in] (PyTorch Linear)


def linear_entry(ours: tuple[str, ...], name: str, bias: bool, parts=("",), n_in=1):
  """The weight (and bias) entries of a Linear holding the params `ours/part` of `parts`."""
  paths = tuple(ours + (p,) if p else ours for p in parts)
  yield Entry(f"{name}.weight", tuple(p + ("kernel",) for p in paths), n_in, True)
  if bias:
    yield Entry(f"{name}.bias", tuple(p + ("bias",) for p in paths), 0, False)


# ---------------------------------------------------------------------------
# Tensors <-> params.
# ---------------------------------------------------------------------------
def _abstract_params(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return flax.traverse_util.flatten_dict(flax.linen.unbox(shapes)["params"])


def _hf_shape(shape: tuple[int, ...], entry: Entry) -> tuple[int, ...]:
  """The checkpoint's shape of a tensor holding len(entry.paths) params of our `shape`."""
  k = len(entry.paths)
  if entry.n_in == 0:
    return (k * int(np.prod(shape)),)
  rows, cols = int(np.prod(shape[:entry.n_in])), int(np.prod(shape[entry.n_in:]))
  return (k * cols, rows) if entry.transposed else (k * rows, cols)


def _split(value: np.ndarray, shape: tuple[int, ...], entry: Entry) -> list[np.ndarray]:
  """A checkpoint tensor -> our len(entry.paths) arrays of `shape`."""
  k = len(entry.paths)
  value = value.reshape(k, -1, *value.shape[1:])  # [k, rows of one part, ...]
  if entry.transposed:
    value = np.swapaxes(value, 1, 2)
  return [np.ascontiguousarray(v).reshape(shape) for v in value]


def join_entries(arrays: list[np.ndarray], entry: Entry) -> np.ndarray:
  """Inverse of `_split`."""
  if entry.n_in == 0:
    return np.concatenate([a.reshape(-1) for a in arrays])
  n = entry.n_in
  mats = [a.reshape(int(np.prod(a.shape[:n])), -1) for a in arrays]
  return np.concatenate([m.T if entry.transposed else m for m in mats], axis=0)


def _fresh(path: tuple[str, ...], shape: tuple[int, ...], key) -> np.ndarray:
  """A newly initialised head parameter: norm scales 1, kernels N(0, 0.02), biases 0."""
  if path[-1] == "scale":
    return np.ones(shape, np.float32)
  if path[-1] == "kernel":
    return np.asarray(layers.bert_init(key, shape, jnp.float32))
  return np.zeros(shape, np.float32)


def params_from_state(model, entries: list[Entry], state: StateDict,
                       optional_heads: bool) -> dict:
  """Every parameter of `model` from `state`; with `optional_heads`, head tensors the
  checkpoint lacks are freshly initialised (logged)."""
  shapes = _abstract_params(model)
  flat, fresh = {}, []
  for entry in entries:
    shape = shapes[entry.paths[0]].shape
    if optional_heads and entry.paths[0][0] != "encoder" and entry.name not in state:
      fresh.extend(entry.paths)
      continue
    value = state.take(entry.name, _hf_shape(shape, entry))
    flat.update(zip(entry.paths, _split(value, shape, entry)))
  missing = sorted(set(shapes) - set(flat) - set(fresh))
  if missing:  # the table and the model disagree: a bug here, not in the checkpoint
    raise CheckpointError(f"{state.source}: no checkpoint name for parameter(s) "
                          f"{['/'.join(p) for p in missing]}")
  if fresh:
    logging.warning("%s: newly initialised (not in the checkpoint): %s", state.source,
                    ", ".join("/".join(p) for p in fresh))
    for key, path in zip(jax.random.split(jax.random.key(0), len(fresh)), fresh):
      flat[path] = _fresh(path, shapes[path].shape, key)
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})




def tensors_from_params(entries: Iterable[Entry], params: dict) -> dict[str, np.ndarray]:
  """The checkpoint tensors of `params` (a boxed or plain tree), walking `entries`."""
  params = flax.linen.unbox(params.get("params", params))
  flat = flax.traverse_util.flatten_dict(params)
  tensors = {}
  for entry in entries:
    lacking = [p for p in entry.paths if p not in flat]
    if lacking:
      raise CheckpointError(f"params lack {'/'.join(lacking[0])} needed for {entry.name}")
    arrays = [np.asarray(flat[p], np.float32) for p in entry.paths]
    tensors[entry.name] = np.ascontiguousarray(join_entries(arrays, entry))
  return tensors


# ---------------------------------------------------------------------------
# The family interface's shared pieces (see bert_jax/convert/__init__.py).
# ---------------------------------------------------------------------------
def task_from_architectures(hf: dict, source: str, architectures: dict[str, str]) -> str:
  """Our task of config.json's first `architectures` name ('encoder' when none is given)."""
  archs = hf.get("architectures") or []
  if not archs:
    return "encoder"
  if archs[0] not in architectures:
    raise CheckpointError(f"{source}: unsupported architecture {archs[0]!r}; supported: "
                          f"{sorted(architectures)} (or pass task=... to load the encoder)")
  return architectures[archs[0]]


def num_labels(hf: dict, default: int = 2) -> int:
  """The label count of config.json: `id2label`'s size, else `num_labels`, else `default`."""
  if hf.get("id2label"):
    return len(hf["id2label"])
  return int(hf.get("num_labels", default))


def head_kwargs(task: str, hf: dict) -> dict:
  """The build() arguments a task head takes from config.json (its label count)."""
  if task in ("sequence_classification", "token_classification"):
    return {"num_labels": num_labels(hf)}
  return {}


def label_fields(task: str, num_labels_: int) -> dict:
  """config.json's label fields for an exported classification head (none for others)."""
  if task not in ("sequence_classification", "token_classification"):
    return {}
  fields = {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels_)},
            "label2id": {f"LABEL_{i}": i for i in range(num_labels_)}}
  if num_labels_ == 1:
    fields["problem_type"] = "regression"
  return fields


def take_tied(state: StateDict, name: str, tied_to: str) -> None:
  """Consumes `name`, a copy of `tied_to` that transformers may write; a different one is refused
  (we keep one table)."""
  if name in state:
    if not np.allclose(state.tensors[name], state.tensors[tied_to]):
      raise CheckpointError(f"{state.source}: {name} differs from {tied_to}; untied MLM output "
                            f"weights are not supported")
    state.take(name)


def warn_unused(state: StateDict) -> None:
  """Logs the checkpoint's tensors that no parameter took."""
  unused = state.unused()
  if unused:
    logging.warning("%s: tensors not used by this model: %s", state.source, ", ".join(unused))
