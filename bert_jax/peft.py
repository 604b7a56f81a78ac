"""Parameter-efficient fine-tuning: LoRA and BitFit, as options of `config.finetune`.

`finetune.method`:
  full    every parameter trains (subject to the freeze_* controls).
  lora    Hu et al. 2021: each kernel W matched by `finetune.lora_targets`
          gets factors A [fan_in, r] and B [r, fan_out], and the model runs on
          W + (lora_alpha / r) * reshape(A @ B). W and everything the model
          carries over from pretraining stay frozen; the factors and the task
          head (classifier, ... -- fresh weights, as in the paper's GLUE setup
          and HF peft's modules_to_save) train.
  bitfit  Ben Zaken et al. 2021: only the carried-over biases (paths ending
          in 'bias') and the task head train.
Freezing is optim's freeze regex, so frozen weights get no update and no
optimizer state and stay bit-identical.

LoRA is a parameter transformation, not a model rewrite, so it serves every
family and head. The params tree is the model's own plus one subtree,
params['lora'], mirroring the targeted kernels' paths down to {'a', 'b'}.
`LoraModel` wraps the model: its `init` adds the factors, its `apply` folds
them into the kernels (`merge`) and applies the wrapped model. It is a
plain object, not a flax module, because steps.py only needs
`init`/`apply` and the call signature (`steps.model_input_names` reads
`type(model).__call__`), and a flax wrapper module would move the wrapped
model's params under a submodule name, which would break init_from's name
map, the freeze rules and the checkpoints' layout. Keeping the model's own
tree at the top means `init_from.load_pretrained` fills the base weights as
for full fine-tuning (the factors are left fresh), and `merge` gives plain
model params for export.

DenseGeneral kernels may be 3-D ([embed, heads, kv] projections in,
[heads, kv, embed] out): they are [in..., out...] and flattened to
[fan_in, fan_out] with the input axes found from the logical names (a
kernel whose last axis is 'embed' projects back into the residual stream,
so all its other axes are inputs; otherwise only the first is). The factors
carry logical names so sharding.py's rules place them: A (input axis, None),
B (None, output axis), a flattened (heads, kv) group named by 'heads', which
is right because 'kv' maps to no mesh axis in every preset.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bert_jax.defaults import ConfigError

METHODS = ("full", "lora", "bitfit")
LORA = "lora"  # the top-level key of the factors in the params tree


def validate(config) -> None:
  """One-line ConfigErrors for the `finetune.method` / `lora_*` fields."""
  ft = config.finetune
  if ft.method not in METHODS:
    raise ConfigError("finetune.method", f"unknown method {ft.method!r}; choose one of "
                      f"{list(METHODS)}")
  if ft.method != "full" and ft.reinit_layers:
    raise ConfigError("finetune.reinit_layers", f"re-initialised layers would stay frozen at "
                      f"random values under method {ft.method!r}; use 0")
  if ft.method != "lora":
    return
  if ft.lora_rank < 1:
    raise ConfigError("finetune.lora_rank", f"must be >= 1, got {ft.lora_rank}")
  if ft.lora_alpha <= 0:
    raise ConfigError("finetune.lora_alpha", f"must be > 0, got {ft.lora_alpha}")
  try:
    re.compile(ft.lora_targets)
  except re.error as e:
    raise ConfigError("finetune.lora_targets", f"invalid regex {ft.lora_targets!r}: {e}"
                      ) from None


# ------------------------------------------------------------------ factors


def _unbox(x):
  return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _input_axes(shape: Sequence[int], names: Sequence[str | None] | None) -> int:
  """How many leading axes of a [in..., out...] kernel are inputs (see the module doc)."""
  if len(shape) > 2 and names and names[-1] == "embed":
    return len(shape) - 1
  return 1


def _flat(params: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(
      params, is_leaf=lambda _, x: _is_box(x)).items()}


def target_paths(params: Any, targets: str) -> tuple[str, ...]:
  """'/'-joined paths of the kernels the `targets` regex matches (re.search)."""
  regex = re.compile(targets)
  return tuple(p for p, v in _flat(params).items()
               if regex.search(p) and p.endswith("kernel") and _unbox(v).ndim >= 2)


def init_factors(boxed_params: Any, paths: Sequence[str], rank: int, key: jax.Array) -> dict:
  """{path...: {'a', 'b'}} for each kernel path, boxed with logical names.

  A ~ N(0, 1/fan_in) (the kaiming-like scale of the LoRA paper's reference
  code), B = 0: the merged model starts exactly as the base model.
  """
  flat = _flat(boxed_params)
  out = {}
  for i, path in enumerate(paths):
    box = flat[path]
    kernel = _unbox(box)
    names = tuple(box.names) if _is_box(box) else (None,) * kernel.ndim
    n_in = _input_axes(kernel.shape, names)
    fan_in = math.prod(kernel.shape[:n_in])
    fan_out = math.prod(kernel.shape[n_in:])
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32)
    a = a / math.sqrt(fan_in)
    b = jnp.zeros((rank, fan_out), jnp.float32)
    out[tuple(path.split("/"))] = {
        "a": nn.Partitioned(a, (names[0], None)),
        "b": nn.Partitioned(b, (None, names[n_in])),
    }
  nested = {}
  for key_path, ab in out.items():
    node = nested
    for k in key_path[:-1]:
      node = node.setdefault(k, {})
    node[key_path[-1]] = ab
  return nested


def merge(params: Any, alpha: float) -> Any:
  """Plain model params: every LoRA delta folded into its kernel, the factors dropped.

  Params without a 'lora' subtree come back unchanged. With B = 0 the result
  equals the base params exactly (W + 0).
  """
  if not isinstance(params, dict) or LORA not in params:
    return params
  base = {k: v for k, v in params.items() if k != LORA}
  flat = traverse_util.flatten_dict(base)
  for key, ab in traverse_util.flatten_dict(params[LORA], is_leaf=lambda _, x: (
      isinstance(x, dict) and set(x) == {"a", "b"})).items():
    a, b = ab["a"], ab["b"]
    w = flat[key]
    scale = alpha / a.shape[-1]
    flat[key] = w + (scale * (a @ b)).reshape(w.shape).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


# -------------------------------------------------------------- the wrapper


@functools.cache
def _wrapper_class(inner_cls: type) -> type:
  """A LoraModel subclass whose `__call__` signature (what steps reads) is inner_cls's, and
  whose methods (`type(model).encode`, used as `apply(method=...)`) are inner_cls's."""
  attrs = {"__call__": inner_cls.__call__}
  for klass in reversed(inner_cls.__mro__[:inner_cls.__mro__.index(nn.Module)]):
    attrs.update({k: v for k, v in vars(klass).items()
                  if inspect.isfunction(v) and not k.startswith("_") and k != "setup"})
  return type(f"Lora{inner_cls.__name__}", (LoraModel,), attrs)


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """`model` with LoRA factors: init adds params['lora'], apply merges them first.

  Hashable (a jit static argument, like a flax module); attributes it lacks
  (`config`, ...) are the wrapped model's.
  """
  model: nn.Module
  paths: tuple[str, ...]
  rank: int
  alpha: float

  def __getattr__(self, name):
    if name.startswith("__") or name == "model":  # copy/pickle probe before __init__
      raise AttributeError(name)
    return getattr(self.model, name)

  def init(self, rngs, *args, **kwargs):
    """The wrapped model's variables, with params['lora'] added (boxed like the model's)."""
    variables = self.model.init(rngs, *args, **kwargs)
    key = rngs["params"] if isinstance(rngs, dict) else rngs
    factors = init_factors(variables["params"], self.paths, self.rank,
                           jax.random.fold_in(key, 0x10FA))
    return {**variables, "params": {**variables["params"], LORA: factors}}

  def apply(self, variables, *args, **kwargs):
    """The wrapped model's apply on the merged params."""
    params = merge(variables["params"], self.alpha)
    return self.model.apply({**variables, "params": params}, *args, **kwargs)


def unwrap(model) -> Any:
  """The plain model under a LoraModel (the model itself otherwise)."""
  return model.model if isinstance(model, LoraModel) else model


def merged(model, params: Any) -> Any:
  """Params for `unwrap(model)`: LoRA folded in (unchanged for other models)."""
  return merge(params, model.alpha) if isinstance(model, LoraModel) else params


def wrap(config, model: nn.Module, init_shapes: dict) -> Any:
  """`model`, wrapped in a LoraModel when finetune.method is 'lora'.

  Raises ConfigError naming finetune.lora_targets when it matches no kernel,
  or finetune.method when BitFit finds no bias.
  """
  validate(config)
  ft = config.finetune
  if ft.method == "full":
    return model
  from bert_jax import steps  # pylint: disable=import-outside-toplevel  (steps imports optim)
  shapes = steps.param_shapes(model, init_shapes)
  check_bitfit(config, shapes)
  if ft.method != "lora":
    return model
  paths = target_paths(shapes, ft.lora_targets)
  if not paths:
    kernels = [p for p in _flat(shapes) if p.endswith("kernel")]
    raise ConfigError("finetune.lora_targets", f"regex {ft.lora_targets!r} matches no kernel "
                      f"(e.g. {', '.join(kernels[:3])})")
  return _wrapper_class(type(model))(model, paths, int(ft.lora_rank), float(ft.lora_alpha))


# ---------------------------------------------------------------- freezing


def freeze_rules(config, family) -> list[str]:
  """optim.freeze regexes of the method: the carried-over weights (LoRA) or all but
  their biases (BitFit); the task head and the factors stay trainable."""
  method = config.finetune.method
  if method == "full":
    return []
  carried = family.carried_over
  base = f"^({'|'.join(map(re.escape, carried))})/" if carried else f"^(?!{LORA}/)"
  if method == "lora":
    return [base]
  return [base + r"(?!.*bias$)"]


def check_bitfit(config, params: Any) -> None:
  """BitFit needs biases to train: a ConfigError when the model has none (T5)."""
  if config.finetune.method == "bitfit" and not any(
      p.endswith("bias") for p in _flat(params)):
    raise ConfigError("finetune.method", f"'bitfit' trains biases; the {config.family!r} "
                      "model has none")


def count_trainable(params: Any, freeze: Sequence[str]) -> tuple[int, int]:
  """(trainable, total) parameter counts under the freeze regexes."""
  compiled = [re.compile(p) for p in freeze]
  trainable = total = 0
  for path, leaf in _flat(params).items():
    n = math.prod(_unbox(leaf).shape)
    total += n
    if not any(r.search(path) for r in compiled):
      trainable += n
  return trainable, total


def log_trainable(params: Any, freeze: Sequence[str]) -> tuple[int, int]:
  """Logs and returns "trainable parameters: N of M"."""
  trainable, total = count_trainable(params, freeze)
  logging.info("trainable parameters: %d of %d (%.2f%%)", trainable, total,
               100.0 * trainable / max(total, 1))
  return trainable, total
