"""Prompt tuning and bottleneck adapters: PEFT methods that add computation to a BERT encoder.

`finetune.method`:
  prompt    Lester et al. 2021: `finetune.prompt_length` k trainable vectors
            params['prompt'] [k, hidden] are put before the tokens' embeddings
            (after the embedding LayerNorm, before layer 0) and removed again
            after the last layer, so every head (pooler, token classifier, span
            heads) sees [batch, length, hidden] exactly as without prompts: token
            classification never scores a prompt position, and [CLS] is still
            row 0. Positions: the prompts get no position or token-type
            embedding, and the tokens keep rows 0..S-1 of the position table,
            so the pretrained positions keep their meaning and data.max_length
            is not reduced by k. Attention: every token attends to the prompts
            (with packed rows, all segments share them); a prompt attends to
            the prompts and to every real token. Initialised as in the paper
            from the embeddings of random vocabulary tokens (uniform over the
            whole vocabulary, the seed's draw), passed through the embedding
            LayerNorm so they have the scale layer 0 sees.
  houlsby   Houlsby et al. 2019: an adapter (down-projection to
            `finetune.adapter_size`, GELU, up-projection, residual) on the
            attention output and on the FFN output of every layer,
  pfeiffer  Pfeiffer et al. 2021: one on the FFN output only.
            Each adapter sits before its sub-block's dropout and residual +
            LayerNorm. The up-projection starts at zero, so at init the model
            is the base model exactly. The adapters, every LayerNorm and the
            head train.
Neither method edits the model code: the wrappers run the model under flax
method interception (`nn.intercept_methods`) and read their own parameters
(params['prompt'] / params['adapters']) from the tree passed to apply. The
prompts act on `BertEncoder._apply_layers`; the adapters on the
'attention' and 'mlp' sub-modules' outputs of each `BertLayer`, keyed by the
layer's scope path. Any family built on bert.BertEncoder (bert, roberta,
albert, electra, distilbert, ...) works; another encoder is a ConfigError.
Neither exports to a plain Hugging Face model (peft.check_exportable).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import peft
from bert_jax.defaults import ConfigError
from bert_jax.models import bert
from bert_jax.models import layers

PROMPT, ADAPTERS = "prompt", "adapters"
_WORD_EMBEDDINGS = ("encoder", "embeddings", "word_embeddings", "embedding")
_EMBEDDING_NORM = ("encoder", "embeddings", "layer_norm")


# ------------------------------------------------------------------ prompts


def extend_mask(mask: jax.Array, k: int) -> jax.Array:
  """[batch, 1, q, s] attention mask (q = 1: keys only) -> the mask with k prompts first."""
  b, h, q, _ = mask.shape
  mask = jnp.concatenate([jnp.ones((b, h, q, k), mask.dtype), mask], axis=-1)  # [b,h,q,k+s]
  if q > 1:  # a prompt query sees the prompts and every key some token sees
    seen = jnp.any(mask, axis=-2, keepdims=True)  # [b, h, 1, k+s]
    mask = jnp.concatenate([jnp.broadcast_to(seen, (b, h, k, seen.shape[-1])), mask], axis=-2)
  return mask


def vocab_prompts(params: Any, k: int, key: jax.Array) -> jax.Array:
  """[k, hidden]: rows of random vocabulary ids through the embedding LayerNorm (the
  norm's own scale and bias, without position / type embeddings)."""
  table = _get(params, _WORD_EMBEDDINGS)  # [vocab, embed]
  rows = table[jax.random.randint(key, (k,), 0, table.shape[0])]
  mean = rows.mean(-1, keepdims=True)
  var = ((rows - mean) ** 2).mean(-1, keepdims=True)
  scale, bias = (_get(params, _EMBEDDING_NORM + (n,)) for n in ("scale", "bias"))
  return (rows - mean) * jax.lax.rsqrt(var + 1e-12) * scale + bias


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return peft.unbox(tree)


@dataclasses.dataclass(frozen=True)
class PromptModel(peft.Wrapped):
  """`model` with params['prompt'] [k, hidden] before the tokens in its BERT encoder."""
  length: int = 20
  KEY = PROMPT

  def _added(self, params, key):
    return nn.Partitioned(vocab_prompts(params, self.length, key), (None, "embed"))

  def _apply(self, params, base, call):
    prompt = params[PROMPT]

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != "_apply_layers" or not isinstance(context.module,
                                                                  bert.BertEncoder):
        return next_fun(*args, **kwargs)
      x, mask, *rest = args  # x [batch, length, embed]
      k = prompt.shape[0]
      p = jnp.broadcast_to(prompt.astype(x.dtype)[None], (x.shape[0], k, x.shape[-1]))
      out = next_fun(jnp.concatenate([p, x], axis=1), extend_mask(mask, k), *rest, **kwargs)
      return out[:, k:]  # [batch, length, embed]: the prompt rows dropped
    with nn.intercept_methods(interceptor):
      return call(base)

  def reinit(self, params: Any, key: jax.Array) -> Any:
    """params with the prompts drawn again from the (now pretrained) embeddings."""
    old = params[PROMPT]
    new = vocab_prompts(params, self.length, key)
    return {**params, PROMPT: jax.device_put(new, old.sharding) if hasattr(old, "sharding")
            else new}


# ----------------------------------------------------------------- adapters


def _adapter(h: jax.Array, p: dict) -> jax.Array:
  """h + up(gelu(down(h))), h [batch, length, embed]."""
  z = jnp.einsum("ble,ea->bla", h, p["down"]["kernel"].astype(h.dtype)) + p["down"]["bias"]
  z = nn.gelu(z, approximate=False)
  return h + jnp.einsum("bla,ae->ble", z, p["up"]["kernel"].astype(h.dtype)) + p["up"]["bias"]


def _site(context, sites: tuple[str, ...]) -> tuple[str, ...] | None:
  """(layer scope path..., '<sub-module>_adapter') when the call is an adapted sub-module."""
  module = context.module
  if context.method_name != "__call__" or module.name not in sites:
    return None
  if not isinstance(module, (layers.MultiHeadAttention, layers.Mlp)):
    return None
  if not isinstance(module.parent, bert.BertLayer):
    return None
  return tuple(module.scope.path[:-1]) + (f"{module.name}_adapter",)


@dataclasses.dataclass(frozen=True)
class AdapterModel(peft.Wrapped):
  """`model` with bottleneck adapters after its layers' attention and / or FFN."""
  paths: tuple[tuple[str, ...], ...] = ()  # one per adapter: layer path + '<site>_adapter'
  features: int = 0  # the hidden size
  size: int = 64
  sites: tuple[str, ...] = ("mlp",)
  KEY = ADAPTERS

  def _added(self, params, key):
    del params
    out = {}
    for i, path in enumerate(self.paths):
      # Down: near-zero normal (Houlsby's near-identity init); up: zero, so the adapter
      # adds exactly 0 at init.
      down = 1e-3 * jax.random.normal(jax.random.fold_in(key, i), (self.features, self.size))
      out[path] = {
          "down": {"kernel": nn.Partitioned(down, ("embed", "mlp")),
                   "bias": nn.Partitioned(jnp.zeros((self.size,)), ("mlp",))},
          "up": {"kernel": nn.Partitioned(jnp.zeros((self.size, self.features)),
                                          ("mlp", "embed")),
                 "bias": nn.Partitioned(jnp.zeros((self.features,)), ("embed",))}}
    return _nest(out)

  def _apply(self, params, base, call):
    adapters = params[ADAPTERS]

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = _site(context, self.sites)
      if path is None:
        return out
      p = adapters
      for name in path:
        p = p[name]
      return _adapter(out, p)
    with nn.intercept_methods(interceptor):
      return call(base)


def _nest(flat: dict) -> dict:
  nested = {}
  for path, value in flat.items():
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return nested


# ------------------------------------------------------------------- wrap


def _trace(model: nn.Module, batch: dict, sites: tuple[str, ...]) -> tuple[set, int]:
  """(adapter paths, hidden size) found by an abstract init of `model`, and whether
  BertEncoder._apply_layers ran."""
  found, hidden, encoders = set(), [0], [0]

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "_apply_layers" and isinstance(context.module, bert.BertEncoder):
      encoders[0] += 1
    path = _site(context, sites)
    if path is not None:
      found.add(path)
      hidden[0] = out.shape[-1]
    return out
  from bert_jax import steps  # pylint: disable=import-outside-toplevel
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      **steps.model_inputs(model, batch)))
  return found, hidden[0], encoders[0]


def wrap(config, model: nn.Module, batch: dict, subclass: Callable[[type], type]) -> Any:
  """`model` as a PromptModel or AdapterModel (`subclass` gives its class for the model's
  type); ConfigError naming finetune.method for a model without a BERT encoder."""
  ft = config.finetune
  sites = ("attention", "mlp") if ft.method == "houlsby" else ("mlp",)
  paths, hidden, encoders = _trace(model, batch, sites)
  if not encoders or (ft.method != "prompt" and not paths):
    raise ConfigError("finetune.method", f"{ft.method!r} needs a BERT-family encoder "
                      f"(models/bert.py BertEncoder); the {config.family!r} model has none")
  if ft.method == "prompt":
    return subclass(PromptModel)(model, int(ft.prompt_length))
  return subclass(AdapterModel)(model, tuple(sorted(paths)), hidden, int(ft.adapter_size),
                                sites)


def adapter_count(config, hidden: int, num_layers: int) -> int:
  """Parameters the adapters add (for the logs and tests)."""
  per = 2 * hidden * config.finetune.adapter_size + config.finetune.adapter_size + hidden
  return per * num_layers * (2 if config.finetune.method == "houlsby" else 1)


def reinit(model: Any, params: Any, seed: int) -> Any:
  """params after the pretrained weights are in: prompts redrawn from the pretrained
  embeddings (other models' params unchanged)."""
  if isinstance(model, PromptModel):
    return model.reinit(params, jax.random.fold_in(jax.random.PRNGKey(seed), 0x9803))
  return params

