"""Parameter-efficient fine-tuning: LoRA, BitFit, prompts, adapters (`config.finetune`).

`finetune.method`:
  full    every parameter trains (subject to the freeze_* controls).
  lora    Hu et al. 2021: each kernel W matched by `finetune.lora_targets`
          gets factors A [fan_in, r] and B [r, fan_out], and the model runs on
          W + (lora_alpha / r) * reshape(A @ B). W and everything the model
          carries over from pretraining stay frozen; the factors and the task
          head (classifier, ... -- fresh weights, as in the paper's GLUE setup
          and HF peft's modules_to_save) train.
  bitfit  Ben Zaken et al. 2021: only the carried-over biases (paths ending
          in 'bias') and the task head train. Carried-over weights without
          any bias (T5; ModernBERT unless its attention_bias / mlp_bias /
          norm_bias are on) are a ConfigError: only the head would train.
  prompt, houlsby, pfeiffer: soft prompts and bottleneck adapters, peft_modules.py.
Layer-wise LR decay (optim.layerwise_lr_multipliers' `(^|/)layer_{i}/`) also
matches the factors and adapters of layer i (lora/encoder/layer_i/...,
adapters/encoder/layer_i/...): they get the decay of the layer they adapt, on
purpose. Checkpoints of these methods hold only the trainable params (see
`split`, `fingerprint` and finetune.py's "Delta checkpoints").
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

METHODS = ("full", "lora", "bitfit", "prompt", "houlsby", "pfeiffer",
           "scalar_mix")  # the last: frozen_features.py
LORA = "lora"  # the top-level key of the factors in the params tree
# Top-level keys a method adds to the model's params (peft_modules.py has the last two).
ADDED = (LORA, "prompt", "adapters", "scalar_mix")  # the last: frozen_features.py
# Methods that train the encoder's LayerNorms (and would be void under freeze_encoder).
_TRAINS_ENCODER = {"bitfit": "biases", "houlsby": "LayerNorms", "pfeiffer": "LayerNorms"}


def validate(config) -> None:
  """One-line ConfigErrors for the `finetune.method` / `lora_*` fields."""
  ft = config.finetune
  if ft.method not in METHODS:
    raise ConfigError("finetune.method", f"unknown method {ft.method!r}; choose one of "
                      f"{list(METHODS)}")
  if ft.method != "full" and ft.reinit_layers:
    raise ConfigError("finetune.reinit_layers", f"re-initialised layers would stay frozen at "
                      f"random values under method {ft.method!r}; use 0")
  if ft.method in _TRAINS_ENCODER and ft.freeze_encoder:
    raise ConfigError("finetune.freeze_encoder", f"would freeze the encoder "
                      f"{_TRAINS_ENCODER[ft.method]} that method {ft.method!r} trains; use False")
  if ft.method == "prompt" and ft.prompt_length < 1:
    raise ConfigError("finetune.prompt_length", f"must be >= 1, got {ft.prompt_length}")
  if ft.method in ("houlsby", "pfeiffer") and ft.adapter_size < 1:
    raise ConfigError("finetune.adapter_size", f"must be >= 1, got {ft.adapter_size}")
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


def unbox(x):
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
               if regex.search(p) and p.endswith("kernel") and unbox(v).ndim >= 2)


def init_factors(boxed_params: Any, paths: Sequence[str], rank: int, key: jax.Array) -> dict:
  """{path...: {'a', 'b'}} for each kernel path, boxed with logical names.

  A ~ N(0, 1/fan_in) (the kaiming-like scale of the LoRA paper's reference
  code), B = 0: the merged model starts exactly as the base model.
  """
  flat = _flat(boxed_params)
  out = {}
  for i, path in enumerate(paths):
    box = flat[path]
    kernel = unbox(box)
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
def _wrapper_class(wrapper: type, inner_cls: type) -> type:
  """A `wrapper` subclass whose `__call__` signature (what steps reads) is inner_cls's, and
  whose methods (`type(model).encode`, used as `apply(method=...)`) are inner_cls's."""
  attrs = {"__call__": inner_cls.__call__}
  for klass in reversed(inner_cls.__mro__[:inner_cls.__mro__.index(nn.Module)]):
    attrs.update({k: v for k, v in vars(klass).items()
                  if inspect.isfunction(v) and not k.startswith("_") and k != "setup"})
  return type(f"{wrapper.__name__[:-len('Model')]}{inner_cls.__name__}", (wrapper,), attrs)


@dataclasses.dataclass(frozen=True)
class Wrapped:
  """A model plus one params subtree of a PEFT method (params[KEY]).

  Hashable (a jit static argument, like a flax module); attributes it lacks
  (`config`, ...) are the wrapped model's. Subclasses give `_added(params,
  key)` (the boxed subtree) and `_apply(variables, params, call)`.
  """
  model: nn.Module

  def __getattr__(self, name):
    if name.startswith("__") or name == "model":  # copy/pickle probe before __init__
      raise AttributeError(name)
    return getattr(self.model, name)

  def init(self, rngs, *args, **kwargs):
    """The wrapped model's variables, with the method's subtree added (boxed like the
    model's)."""
    variables = self.model.init(rngs, *args, **kwargs)
    key = rngs["params"] if isinstance(rngs, dict) else rngs
    added = self._added(variables["params"], jax.random.fold_in(key, 0x10FA))
    return {**variables, "params": {**variables["params"], self.KEY: added}}

  def apply(self, variables, *args, **kwargs):
    params = variables["params"]
    base = {k: v for k, v in params.items() if k != self.KEY}
    call = lambda p: self.model.apply({**variables, "params": p}, *args, **kwargs)
    return self._apply(params, base, call)


@dataclasses.dataclass(frozen=True)
class LoraModel(Wrapped):
  """`model` with LoRA factors: init adds params['lora'], apply merges them first."""
  paths: tuple[str, ...] = ()
  rank: int = 1
  alpha: float = 1.0
  KEY = LORA

  def _added(self, params, key):
    return init_factors(params, self.paths, self.rank, key)

  def _apply(self, params, base, call):
    del base
    return call(merge(params, self.alpha))


def unwrap(model) -> Any:
  """The plain model under a PEFT wrapper (the model itself otherwise)."""
  return model.model if isinstance(model, Wrapped) else model


def merged(model, params: Any) -> Any:
  """Params for `unwrap(model)`: LoRA folded in (unchanged for other models)."""
  return merge(params, model.alpha) if isinstance(model, LoraModel) else params


def wrap(config, model: nn.Module, init_shapes: dict) -> Any:
  """`model`, wrapped for the method: LoraModel, PromptModel or AdapterModel.

  Raises ConfigError naming finetune.lora_targets when it matches no kernel,
  finetune.method when BitFit finds no pretrained bias or the model has no
  encoder stack (peft_modules.STACKS) for prompts / adapters.
  """
  validate(config)
  ft = config.finetune
  if ft.method == "full":
    return model
  from bert_jax import steps  # pylint: disable=import-outside-toplevel  (steps imports optim)
  shapes = steps.param_shapes(model, init_shapes)
  check_bitfit(config, shapes)
  if ft.method == "bitfit":
    return model
  if ft.method == "scalar_mix":  # ELMo's mix of a frozen encoder's layers
    from bert_jax import frozen_features  # pylint: disable=import-outside-toplevel
    return frozen_features.wrap(config, model, steps.dummy_batch(init_shapes),
                                lambda cls: _wrapper_class(cls, type(model)))
  if ft.method in ("prompt", "houlsby", "pfeiffer"):
    from bert_jax import peft_modules  # pylint: disable=import-outside-toplevel
    return peft_modules.wrap(config, model, steps.dummy_batch(init_shapes),
                             lambda cls: _wrapper_class(cls, type(model)))
  paths = target_paths(shapes, ft.lora_targets)
  if not paths:
    kernels = [p for p in _flat(shapes) if p.endswith("kernel")]
    raise ConfigError("finetune.lora_targets", f"regex {ft.lora_targets!r} matches no kernel "
                      f"(e.g. {', '.join(kernels[:3])})")
  return _wrapper_class(LoraModel, type(model))(model, paths, int(ft.lora_rank),
                                                float(ft.lora_alpha))


# ---------------------------------------------------------------- freezing


def freeze_rules(config, family) -> list[str]:
  """optim.freeze regexes of the method: the carried-over weights (LoRA) or all but
  their biases (BitFit); the task head and the factors stay trainable."""
  method = config.finetune.method
  if method == "full":
    return []
  carried = family.carried_over
  # A carried-over name may be a leaf (BART's final_logits_bias) or a subtree.
  base = (f"^({'|'.join(map(re.escape, carried))})(/|$)" if carried
          else f"^(?!({'|'.join(ADDED)})/)")
  if method == "bitfit":
    return [base + r"(?!.*bias$)"]
  if method in ("houlsby", "pfeiffer"):  # the adapters and every LayerNorm train
    return [base + r"(?!.*norm/)"]
  if method == "scalar_mix" and family.pooler_prefix:
    # The pooler reads the mix and is part of the classification head: it trains. (A
    # sentence-embedding checkpoint's pooler was never trained; frozen, it starves the
    # classifier.)
    return [f"^(?!{re.escape(family.pooler_prefix)})" + base[1:]]
  return [base]


def check_bitfit(config, params: Any) -> None:
  """BitFit needs pretrained biases to train: a ConfigError when the carried-over weights
  have none (T5; ModernBERT without attention_bias / mlp_bias / norm_bias), where only the
  fresh head's biases would train -- a head-only run is method 'full' with
  finetune.freeze_encoder."""
  if config.finetune.method != "bitfit":
    return
  from bert_jax import models  # pylint: disable=import-outside-toplevel
  carried = models.get(config.family).carried_over
  if not any(p.endswith("bias") and (carried is None or p.split("/")[0] in carried)
             for p in _flat(params) if p.split("/")[0] not in ADDED):
    raise ConfigError("finetune.method", f"'bitfit' trains biases; the {config.family!r} "
                      "model has none in its pretrained weights (for the head alone use "
                      "method 'full' with finetune.freeze_encoder=True)")


def count_trainable(params: Any, freeze: Sequence[str]) -> tuple[int, int]:
  """(trainable, total) parameter counts under the freeze regexes."""
  compiled = [re.compile(p) for p in freeze]
  trainable = total = 0
  for path, leaf in _flat(params).items():
    n = math.prod(unbox(leaf).shape)
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


# --------------------------------------------------- delta-only checkpoints


def split(params: Any, freeze: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen): the nested params divided by the freeze regexes (re.search on
  '/'-joined paths, as optim does). Leaves are not copied."""
  compiled = [re.compile(p) for p in freeze]
  trainable, frozen = {}, {}
  for key, leaf in traverse_util.flatten_dict(params, is_leaf=lambda _, x: _is_box(x)).items():
    frozen_leaf = any(r.search("/".join(key)) for r in compiled)
    (frozen if frozen_leaf else trainable)[key] = leaf
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join(base: Any, delta: Any) -> dict:
  """`base` with every leaf of `delta` put in (a leaf of delta that base lacks is added)."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(delta))
  return traverse_util.unflatten_dict(flat)


def _host_array(x) -> Any:
  """x as a numpy array on this host (every host gathers a sharded multi-host array)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x))


def fingerprint(params: Any) -> str:
  """sha256 (hex) over the params: for each leaf in sorted path order, its '/'-joined path,
  dtype, shape and little-endian C-order bytes.

  Over the values rather than the files they came from, so it identifies the
  base model whatever its source (a Hugging Face folder in either format, a
  pretraining workdir, or a seeded random init) and does not change when the
  same weights are re-saved in another layout.
  """
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for path, leaf in sorted(_flat(params).items()):
    array = _host_array(unbox(leaf))
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    digest.update(f"{path}|{array.dtype.str}|{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def check_base(saved: dict | None, current: dict, where: str) -> None:
  """ValueError (one line, both hashes) when the base a delta checkpoint was trained on is not
  the one rebuilt now."""
  if not saved or saved.get("sha256") != current["sha256"]:
    was = (saved or {}).get("sha256", "none recorded")
    raise ValueError(
        f"{where}: the delta checkpoint was trained on base {saved and saved.get('path')!r} "
        f"sha256 {was}, but the base rebuilt from init_from={current['path']!r} has sha256 "
        f"{current['sha256']}; restore the original base model")


EXPORTABLE = ("full", "lora", "bitfit")  # methods whose result is a plain model


def check_exportable(config) -> None:
  """`bert-jax export` writes plain Hugging Face models: a ConfigError for the methods that
  add modules those lack."""
  if config.finetune.method not in EXPORTABLE:
    raise ConfigError("finetune.method", f"{config.finetune.method!r} adds parameters a plain "
                      f"Hugging Face model has no place for; export handles {list(EXPORTABLE)}")
