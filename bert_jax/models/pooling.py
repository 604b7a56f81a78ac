"""Sentence embeddings from token states: the pooling of Sentence-BERT (Reimers & Gurevych 2019).

An encoder gives one vector per token, hidden [batch, length, hidden]; a
sentence embedding is a fixed-size summary of the real (non-padding) tokens
of each row. The modes are those of sentence-transformers' Pooling module,
so a sentence-transformers folder's `1_Pooling/config.json` reads as one
`PoolingConfig`:

  cls                   the first token's state ([CLS] in BERT)
  mean                  the mean over real tokens (SBERT's default)
  max                   the element-wise max over real tokens
  mean_sqrt_len_tokens  the sum over real tokens / sqrt(number of them)
  weightedmean          tokens weighted 1, 2, ..., L by position (SGPT)
  lasttoken             the last real token's state

Several modes concatenate their vectors in the order above (the order
sentence-transformers uses, so a multi-mode checkpoint reads the same).
`normalize` divides by the L2 norm (the `Normalize` module), which makes a
dot product a cosine. Rows are right-padded, as the batch contract has them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import jax.numpy as jnp

Array = jnp.ndarray

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# 1_Pooling/config.json of sentence-transformers before v5: one boolean per mode.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# What sentence-transformers' Normalize divides by at least (torch F.normalize's eps).
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
  """How token states become one sentence vector.

  Attributes:
    modes: one or more of MODES, concatenated in MODES order.
    normalize: divide the result by its L2 norm.
  """
  modes: tuple[str, ...] = ("mean",)
  normalize: bool = False

  def __post_init__(self):
    if not self.modes:
      raise ValueError(f"pooling needs at least one mode; choose from {MODES}")
    unknown = [m for m in self.modes if m not in MODES]
    if unknown:
      raise ValueError(f"unknown pooling mode {unknown[0]!r}; choose one of {MODES}")
    # Canonical order, so ("mean", "cls") and ("cls", "mean") pool alike.
    object.__setattr__(self, "modes", tuple(m for m in MODES if m in self.modes))


def parse_modes(text: str) -> tuple[str, ...]:
  """'mean' or 'cls,max' -> a tuple of mode names (checked by PoolingConfig)."""
  return tuple(m.strip() for m in text.split(",") if m.strip())


def read_sentence_transformers(folder: str) -> PoolingConfig | None:
  """The pooling of a sentence-transformers folder (modules.json), or None if it is not one.

  modules.json lists the pipeline; its Pooling module's folder holds
  config.json (legacy booleans or `pooling_mode`), and a Normalize module
  anywhere after it sets `normalize`. A folder without modules.json but with
  1_Pooling/config.json is read the same way (normalize off).
  """
  modules_path = os.path.join(folder, "modules.json")
  pooling_dir, normalize = None, False
  if os.path.isfile(modules_path):
    with open(modules_path, encoding="utf-8") as f:
      modules = json.load(f)
    for module in modules:
      kind = str(module.get("type", "")).rsplit(".", 1)[-1]
      if kind == "Pooling":
        pooling_dir = os.path.join(folder, module.get("path", ""))
      elif kind == "Normalize":
        normalize = True
  elif os.path.isfile(os.path.join(folder, "1_Pooling", "config.json")):
    pooling_dir = os.path.join(folder, "1_Pooling")
  if pooling_dir is None:
    return None
  config_path = os.path.join(pooling_dir, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      fields = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{modules_path} lists a Pooling module but {config_path} "
                            "does not exist") from None
  return PoolingConfig(modes_from_fields(fields, config_path), normalize)


def modes_from_fields(fields: dict, where: str) -> tuple[str, ...]:
  """The modes a Pooling config.json names: `pooling_mode` (str or list) or legacy booleans."""
  if "pooling_mode" in fields:
    value = fields["pooling_mode"]
    modes = (value,) if isinstance(value, str) else tuple(value)
  else:
    modes = tuple(mode for key, mode in _LEGACY_KEYS.items() if fields.get(key))
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ValueError(f"{where}: unknown pooling mode {unknown[0]!r}; supported: {MODES}")
  return modes or ("mean",)


def pool(hidden: Array, mask: Array, config: PoolingConfig) -> Array:
  """Sentence vectors from token states.

  Args:
    hidden: [batch, length, hidden] the encoder's last hidden states.
    mask: [batch, length] 1 for real tokens, 0 for padding (right-padded).
    config: the modes and normalisation.

  Returns:
    float32 [batch, hidden * len(config.modes)].
  """
  hidden = hidden.astype(jnp.float32)  # sums over hundreds of tokens: not in bfloat16
  mask = mask.astype(jnp.float32)
  weights = mask[:, :, None]  # [batch, length, 1]
  # A fully padded row (a filler row of the last batch) must not divide by 0.
  count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)  # [batch, 1]
  out = []
  for mode in config.modes:
    if mode == "cls":
      out.append(hidden[:, 0])
    elif mode == "max":
      top = jnp.where(weights > 0, hidden, -jnp.inf).max(axis=1)
      out.append(jnp.where(mask.sum(axis=1, keepdims=True) > 0, top, 0.0))  # no -inf rows
    elif mode == "mean":
      out.append((hidden * weights).sum(axis=1) / count)
    elif mode == "mean_sqrt_len_tokens":
      out.append((hidden * weights).sum(axis=1) / jnp.sqrt(count))
    elif mode == "weightedmean":
      position = jnp.arange(1, hidden.shape[1] + 1, dtype=jnp.float32)[None, :, None]
      w = weights * position
      out.append((hidden * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9))
    else:  # lasttoken: right padding, so the last real token is at count - 1
      last = jnp.maximum(mask.sum(axis=1).astype(jnp.int32) - 1, 0)  # [batch]
      out.append(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
  x = jnp.concatenate(out, axis=-1)  # [batch, hidden * modes]
  if config.normalize:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)
  return x


def cosine_matrix(u: Array, v: Array) -> Array:
  """[n, m] cosine similarities of the rows of u [n, hidden] and v [m, hidden]."""
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), _NORM_EPS)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), _NORM_EPS)
  return u @ v.T

