"""Prompt tuning and bottleneck adapters: PEFT methods that add computation to an encoder.

`finetune.method`:
  prompt    Lester et al. 2021: `finetune.prompt_length` k trainable vectors
            params['prompt'] [k, hidden] are put before the tokens' hidden
            states at the input of layer 0 (after the embeddings and their
            norm) and removed again at the encoder's output, so every head
            (pooler, token classifier, span heads, a decoder's cross-attention)
            sees [batch, length, hidden] exactly as without prompts: token
            classification never scores a prompt position, and [CLS] is still
            row 0. The prompts get no absolute position or token-type
            embedding, and the tokens keep their positions 0..S-1, so the
            pretrained positions keep their meaning and data.max_length is not
            reduced by k. Attention: every token attends to the prompts (with
            packed rows, all segments share them; in ModernBERT's sliding-window
            layers too: they are global memory, outside any window); a prompt
            attends to the prompts and to every real token. Initialised as in
            the paper from the embeddings of random vocabulary tokens (uniform
            over the whole vocabulary, the seed's draw), passed through the
            embedding norm so they have the scale layer 0 sees.
  houlsby   Houlsby et al. 2019: an adapter (down-projection to
            `finetune.adapter_size`, GELU, up-projection, residual) on the
            attention output and on the FFN output of every layer,
  pfeiffer  Pfeiffer et al. 2021: one on the FFN output only.
            Each adapter acts on its sub-block's output before the residual add
            (post-norm layers: before the add + LayerNorm; pre-norm ModernBERT:
            before the add), and before the block's output dropout where that
            dropout is outside the sub-module (BERT, DeBERTa's FFN, BART). The
            up-projection starts at zero, so at init the model is the base
            model exactly. The adapters, every LayerNorm and the head train.

Families: STACKS, one entry per layer stack, says where the methods act: the
encoder method whose result is the stack's output (the prompts are stripped
from it), the layer class (the prompts are prepended at the first layer's
input; every layer's mask and per-position inputs get k prompt entries),
the adapted sub-modules of a layer, and where the prompt init reads the
embedding table and norm. A new family is one entry. Relative positions:
  BERT (and the families on bert.BertEncoder), BART's encoder: absolute
    positions are added in the embeddings, before the prompts; nothing else.
  ModernBERT: rotary positions are applied in every layer, so the prompts
    need some: they get positions -k..-1 (rotated with the layer's own
    theta), i.e. they sit as a prefix just before each example (packed
    segments restart at 0, so each segment sees them at the same distance).
  DeBERTa: relative distances are index differences computed from the
    layer's input length, so the prompts are at indices 0..k-1 and the
    tokens at k..k+S-1: token-token distances are unchanged and the prompts
    are again a prefix at -k..-1. The enhanced mask decoder (return_emd,
    MLM with model.enhanced_mask_decoder) re-reads the last layer's input
    with absolute positions and is refused under prompts (a ConfigError).
BART: only the encoder is adapted or prompted (the decoder reads the
stripped encoder output); its decoder layers get no adapters.

Neither method edits the model code: the wrappers run the model under flax
method interception (`nn.intercept_methods`) and read their own parameters
(params['prompt'] / params['adapters']) from the tree passed to apply; the
adapters are keyed by the layer's scope path. A model with no STACKS entry
(T5) is a ConfigError naming finetune.method. Neither exports to a plain
Hugging Face model (peft.check_exportable).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import peft
from bert_jax.defaults import ConfigError
from bert_jax.models import bart
from bert_jax.models import bert
from bert_jax.models import deberta
from bert_jax.models import modernbert

PROMPT, ADAPTERS = "prompt", "adapters"


# ---------------------------------------------------------------- the table


def _modernbert_rotary(layer: nn.Module, args: tuple, k: int) -> tuple:
  """ModernBertLayer(x, mask, cos, sin, ...): the prompts' rotary rows (positions -k..-1,
  the layer's theta) put before the tokens'."""
  cfg = layer.config
  theta = cfg.global_rope_theta if cfg.is_global(layer.index) else cfg.local_rope_theta
  x, mask, cos, sin, *rest = args
  pcos, psin = modernbert.rotary_tables(jnp.arange(-k, 0)[None], cfg.head_dim, theta)
  grow = lambda p, t: jnp.concatenate(  # noqa: E731  [batch, k + length, head_dim]
      [jnp.broadcast_to(p, (t.shape[0],) + p.shape[1:]).astype(t.dtype), t], axis=1)
  return (x, mask, grow(pcos, cos), grow(psin, sin), *rest)


def _deberta_emd(kwargs: dict) -> str | None:
  if kwargs.get("return_emd"):
    return ("DeBERTa's enhanced mask decoder (model.enhanced_mask_decoder) reads the last "
            "layer's input with absolute positions, which prompts would shift")
  return None


@dataclasses.dataclass(frozen=True)
class Stack:
  """Where the methods act in one family's layer stack.

  Attributes:
    encoder, method: the module class and method whose result is the stack's
      output [batch, k + length, embed] under prompts (stripped to length).
    layer: the block class, called as layer(x [batch, length, embed], mask
      [batch, 1, q, length], *rest) with x after the embeddings for layer 0.
    sites: adapter site -> the layer's sub-module name, 'attention' (the
      attention output) and 'mlp' (the FFN output); each returns [batch,
      length, embed].
    word_embeddings, embedding_norm: params paths of the [vocab, embed] table
      and of the norm after the embeddings (the prompts' init).
    norm_eps: the config field of that norm's epsilon.
    extend: (layer module, args, k) -> args with per-position inputs other
      than x and the mask grown by k prompt rows (None: there are none).
    refuse: (kwargs of the encoder method) -> why prompts cannot run, or None.
  """
  encoder: type
  method: str
  layer: type
  word_embeddings: tuple[str, ...]
  embedding_norm: tuple[str, ...]
  norm_eps: str = "layer_norm_eps"
  sites: tuple[tuple[str, str], ...] = (("attention", "attention"), ("mlp", "mlp"))
  extend: Callable | None = None
  refuse: Callable | None = None


STACKS = {
    # Every family on bert.BertEncoder (bert, roberta, albert, electra, distilbert, ...).
    "bert": Stack(bert.BertEncoder, "_apply_layers", bert.BertLayer,
                  ("encoder", "embeddings", "word_embeddings", "embedding"),
                  ("encoder", "embeddings", "layer_norm")),
    "modernbert": Stack(modernbert.ModernBertEncoder, "__call__", modernbert.ModernBertLayer,
                        ("encoder", "embeddings", "embedding"), ("encoder", "embeddings_norm"),
                        norm_eps="norm_eps", extend=_modernbert_rotary),
    "deberta": Stack(deberta.DebertaEncoder, "__call__", deberta.DebertaLayer,
                     ("encoder", "word_embeddings", "embedding"), ("encoder", "embeddings_norm"),
                     refuse=_deberta_emd),
    "bart": Stack(bart.Encoder, "__call__", bart.EncoderLayer, ("shared", "embedding"),
                  ("encoder", "layernorm_embedding")),
}


def _stack_of_layer(module: nn.Module) -> Stack | None:
  return next((s for s in STACKS.values() if isinstance(module, s.layer)), None)


def _stack_of_encoder(context) -> str | None:
  return next((name for name, s in STACKS.items() if context.method_name == s.method
               and isinstance(context.module, s.encoder)), None)


# ------------------------------------------------------------------ prompts


def extend_mask(mask: jax.Array, k: int) -> jax.Array:
  """[batch, 1, q, s] attention mask (q = 1: keys only) -> the mask with k prompts first."""
  b, h, q, _ = mask.shape
  mask = jnp.concatenate([jnp.ones((b, h, q, k), mask.dtype), mask], axis=-1)  # [b,h,q,k+s]
  if q > 1:  # a prompt query sees the prompts and every key some token sees
    seen = jnp.any(mask, axis=-2, keepdims=True)  # [b, h, 1, k+s]
    mask = jnp.concatenate([jnp.broadcast_to(seen, (b, h, k, seen.shape[-1])), mask], axis=-2)
  return mask


def vocab_prompts(params: Any, k: int, key: jax.Array, stack: Stack, eps: float) -> jax.Array:
  """[k, hidden]: rows of random vocabulary ids through the embedding norm (the norm's own
  scale and bias, if it has one, without position / type embeddings)."""
  table = _get(params, stack.word_embeddings)  # [vocab, embed]
  rows = table[jax.random.randint(key, (k,), 0, table.shape[0])].astype(jnp.float32)
  mean = rows.mean(-1, keepdims=True)
  var = ((rows - mean) ** 2).mean(-1, keepdims=True)
  norm = _get(params, stack.embedding_norm)
  out = (rows - mean) * jax.lax.rsqrt(var + eps) * peft.unbox(norm["scale"])
  return out + peft.unbox(norm["bias"]) if "bias" in norm else out


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return peft.unbox(tree)


def _prompted(args: tuple, prompt: jax.Array, stack: Stack, layer: nn.Module) -> tuple:
  """A layer's positional args with the prompts: prepended to x at layer 0 (x has as many
  rows as the mask has keys), the mask and per-position inputs grown at every layer."""
  x, mask, *rest = args  # x [batch, length or k + length, embed]
  k = prompt.shape[0]
  if x.shape[1] == mask.shape[-1]:
    p = jnp.broadcast_to(prompt.astype(x.dtype)[None], (x.shape[0], k, x.shape[-1]))
    x = jnp.concatenate([p, x], axis=1)  # [batch, k + length, embed]
  args = (x, extend_mask(mask, k), *rest)
  return stack.extend(layer, args, k) if stack.extend else args


@dataclasses.dataclass(frozen=True)
class PromptModel(peft.Wrapped):
  """`model` with params['prompt'] [k, hidden] before the tokens in its encoder stack."""
  length: int = 20
  stack: str = "bert"  # the STACKS entry
  eps: float = 1e-12  # the embedding norm's epsilon (the prompts' init)
  KEY = PROMPT

  def _added(self, params, key):
    return nn.Partitioned(self._draw(params, key), (None, "embed"))

  def _draw(self, params, key):
    return vocab_prompts(params, self.length, key, STACKS[self.stack], self.eps)

  def _apply(self, params, base, call):
    prompt = params[PROMPT]

    def interceptor(next_fun, args, kwargs, context):
      if _stack_of_encoder(context) is not None:
        return next_fun(*args, **kwargs)[:, prompt.shape[0]:]  # the prompt rows dropped
      stack = _stack_of_layer(context.module)
      if stack is None or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      return next_fun(*_prompted(args, prompt, stack, context.module), **kwargs)
    with nn.intercept_methods(interceptor):
      return call(base)

  def reinit(self, params: Any, key: jax.Array) -> Any:
    """params with the prompts drawn again from the (now pretrained) embeddings."""
    old = params[PROMPT]
    new = self._draw(params, key)
    return {**params, PROMPT: jax.device_put(new, old.sharding) if hasattr(old, "sharding")
            else new}


# ----------------------------------------------------------------- adapters


def _adapter(h: jax.Array, p: dict) -> jax.Array:
  """h + up(gelu(down(h))), h [batch, length, embed]."""
  z = jnp.einsum("ble,ea->bla", h, p["down"]["kernel"].astype(h.dtype)) + p["down"]["bias"]
  z = nn.gelu(z, approximate=False)
  out = h + jnp.einsum("bla,ae->ble", z, p["up"]["kernel"].astype(h.dtype)) + p["up"]["bias"]
  return out.astype(h.dtype)


def _site(context, sites: tuple[str, ...]) -> tuple[str, ...] | None:
  """(layer scope path..., '<site>_adapter') when the call is an adapted sub-module of a
  STACKS layer."""
  module = context.module
  if context.method_name != "__call__" or not isinstance(module.parent, nn.Module):
    return None
  stack = _stack_of_layer(module.parent)
  if stack is None:
    return None
  site = next((s for s, name in stack.sites if name == module.name and s in sites), None)
  if site is None:
    return None
  return tuple(module.scope.path[:-1]) + (f"{site}_adapter",)


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


@dataclasses.dataclass
class _Found:
  """What an abstract init of the plain model shows (`_trace`)."""
  paths: set = dataclasses.field(default_factory=set)  # adapter paths
  hidden: int = 0  # the adapted outputs' width
  stacks: dict = dataclasses.field(default_factory=dict)  # STACKS name -> embedding norm eps
  refusal: str | None = None  # why prompts cannot run (Stack.refuse)


def _trace(model: nn.Module, batch: dict, sites: tuple[str, ...]) -> _Found:
  """The adapter sites and encoder stacks an abstract init of `model` runs through."""
  found = _Found()

  def interceptor(next_fun, args, kwargs, context):
    name = _stack_of_encoder(context)
    if name is not None:
      stack = STACKS[name]
      found.stacks[name] = float(getattr(context.module.config, stack.norm_eps))
      found.refusal = found.refusal or (stack.refuse and stack.refuse(kwargs))
    out = next_fun(*args, **kwargs)
    path = _site(context, sites)
    if path is not None:
      found.paths.add(path)
      found.hidden = out.shape[-1]
    return out
  from bert_jax import steps  # pylint: disable=import-outside-toplevel
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      **steps.model_inputs(model, batch)))
  return found


def wrap(config, model: nn.Module, batch: dict, subclass: Callable[[type], type]) -> Any:
  """`model` as a PromptModel or AdapterModel (`subclass` gives its class for the model's
  type); ConfigError naming finetune.method for a model without a STACKS encoder."""
  ft = config.finetune
  sites = ("attention", "mlp") if ft.method == "houlsby" else ("mlp",)
  found = _trace(model, batch, sites)
  if not found.stacks or (ft.method != "prompt" and not found.paths):
    raise ConfigError("finetune.method", f"{ft.method!r} needs a BERT-family encoder "
                      f"(a peft_modules.STACKS entry: {', '.join(STACKS)}); the "
                      f"{config.family!r} model has none")
  if ft.method != "prompt":
    return subclass(AdapterModel)(model, tuple(sorted(found.paths)), found.hidden,
                                  int(ft.adapter_size), sites)
  if found.refusal:
    raise ConfigError("finetune.method", f"'prompt' cannot run on this {config.family!r} "
                      f"model: {found.refusal}")
  if len(found.stacks) > 1:
    raise ConfigError("finetune.method", f"'prompt' needs one encoder stack; the "
                      f"{config.family!r} model runs {sorted(found.stacks)}")
  (stack, eps), = found.stacks.items()
  return subclass(PromptModel)(model, int(ft.prompt_length), stack, eps)


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
