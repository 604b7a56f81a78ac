"""Frozen features and selective fine-tuning: an ELMo scalar mix, gradual unfreezing.

Scalar mix (`finetune.method = 'scalar_mix'`, Peters et al. 2018, the ELMo
task representation; Tenney et al. 2019 read BERT's layers the same way): the
encoder stays frozen and the task head reads

    gamma * sum_j softmax(w)_j * h_j,   j = 0 (embedding output) .. L (layer L),

instead of the last layer's output h_L. w [L + 1] (init 0: the plain average)
and gamma [1] (init 1) are params['scalar_mix'] {'weights', 'gamma'}; they and the
task head train (with the pooler, which reads the mix: the classification
head's first layer), every other carried-over weight is frozen by peft.freeze_rules (optim freeze regexes: no update, no optimizer
state). The mix replaces the last encoder layer's output, under flax method
interception (no model code is edited), so what follows the layers
(ModernBERT's final norm), the pooler, the classification,
token-classification and QA heads all read it. The hidden
states are taken through `stop_gradient`: nothing upstream of them trains, so
the frozen encoder's backward pass is skipped (and `model.remat` is turned
off, having nothing to save). Any encoder family whose layer stack
peft_modules.STACKS names works: the BERT family (bert, roberta, albert,
electra, distilbert), ModernBERT and DeBERTa; encoder-decoders (T5, BART) are
a one-line ConfigError naming finetune.method and the family.

Gradual unfreezing (ULMFiT, Howard & Ruder 2018; `finetune.unfreeze` or the
preset `finetune.unfreeze_schedule`): (step, regex) stages; a parameter trains
from the smallest step of the stages whose regex matches its '/'-joined path
(re.search), and from step 0 when none matches. Before its step it gets no
update, no weight decay and no Adam moments (optim.make_optimizer's `unfreeze`).
The preset 'top_ln_all' with `finetune.unfreeze_steps = (s1, s2)`: the head,
the pooler and the top layer from step 0, every LayerNorm from s1, everything
from s2.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import optim
from bert_jax import peft
from bert_jax import peft_modules
from bert_jax import models
from bert_jax.defaults import ConfigError

MIX = "scalar_mix"  # the top-level key of {'weights', 'gamma'} in the params tree
UNFREEZE_SCHEDULES = ("", "top_ln_all")
_LAYER_NORM = r"norm/(scale|bias)$"  # BERT's attention_norm, mlp_norm, embeddings/layer_norm


# ---------------------------------------------------------------- scalar mix


def scalar_mix(hidden: Sequence[jax.Array], weights: jax.Array, gamma: jax.Array) -> jax.Array:
  """gamma * sum_j softmax(weights)_j * hidden[j], in float32, cast to hidden's dtype.

  Args:
    hidden: L + 1 arrays [batch, length, embed].
    weights: [L + 1] unnormalised layer weights.
    gamma: [] or [1] scale.
  """
  if len(hidden) != weights.shape[0]:
    raise ValueError(f"scalar mix of {len(hidden)} hidden states with {weights.shape[0]} "
                     "weights")
  s = jax.nn.softmax(weights.astype(jnp.float32))  # [L + 1]
  stacked = jnp.stack([h.astype(jnp.float32) for h in hidden])  # [L + 1, batch, length, embed]
  out = jnp.reshape(gamma, ()).astype(jnp.float32) * jnp.einsum("j,jble->ble", s, stacked)
  return out.astype(hidden[-1].dtype)  # [batch, length, embed]


def _layer_class(model: nn.Module) -> type | None:
  """The encoder-layer class of `model`'s family (peft_modules.STACKS; encoders only)."""
  try:
    family = models.family_of(model)
  except ValueError:
    return None
  stack = peft_modules.STACKS.get(family.name)
  return None if stack is None or family.encoder_decoder else stack.layer


def _recording_interceptor(layer_class: type, num_layers: int,
                           on_encoder: Callable[[list, Any], Any]) -> Callable:
  """A flax interceptor that, for every pass through an encoder's `num_layers` layers
  (instances of `layer_class`), collects the states [input of the first layer (the
  embedding output), layer 1 output, ..., layer L output] and returns
  on_encoder(states, last) in place of the last layer's output.

  So whatever the encoder does after its layers (ModernBERT's final norm) and every
  head reads the replacement. A layer's output is recorded after its 'ffn' part
  (ALBERT-style sharing calls a BERT layer once per sub-block, the FFN last) or its
  single call; calls nested inside a layer's (a remat wrapper re-entering __call__)
  are not recorded twice. Two passes (a two-tower model) are two mixes. DeBERTa's
  optional ConvLayer adds to layer 1's output after the call, so there h_1 is the
  layer's own output.
  """
  states, depth = [], [0]

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name != "__call__" or not isinstance(context.module, layer_class)
        or depth[0]):
      return next_fun(*args, **kwargs)
    if not states:
      states.append(args[0])  # [batch, length, embed] the embedding output
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    part = kwargs.get("part", args[3] if len(args) > 3 and isinstance(args[3], str) else "all")
    if part not in ("all", "ffn"):
      return out
    states.append(out)
    if len(states) < num_layers + 1:
      return out
    done = list(states)
    states.clear()
    return on_encoder(done, out)

  return interceptor


@dataclasses.dataclass(frozen=True)
class ScalarMixModel(peft.Wrapped):
  """`model` whose encoder's last layer output is the scalar mix of its hidden states."""
  layer_class: type = nn.Module  # the family's encoder layer (peft_modules.STACKS)
  num_layers: int = 0  # L: the mix is over L + 1 states
  KEY = MIX

  def _added(self, params, key):
    del params, key
    # Replicated: L + 1 floats and gamma, stored [1] as in AllenNLP's ScalarMix.
    return {"weights": nn.Partitioned(jnp.zeros((self.num_layers + 1,), jnp.float32),
                                      (None,)),
            "gamma": nn.Partitioned(jnp.ones((1,), jnp.float32), (None,))}

  def _apply(self, params, base, call):
    p = params[MIX]

    def mixed(states, last):
      del last
      states = [jax.lax.stop_gradient(h) for h in states]  # the encoder is frozen
      return scalar_mix(states, peft.unbox(p["weights"]), peft.unbox(p["gamma"]))
    with nn.intercept_methods(_recording_interceptor(self.layer_class, self.num_layers, mixed)):
      return call(base)


def hidden_states(model: nn.Module, variables: dict, *args, **kwargs) -> list:
  """[h_0, ..., h_L] of `model`'s (first) encoder pass for one apply (tests, probing)."""
  found = []

  def keep(states, last):
    found.append(states)
    return last
  family = models.family_of(model)
  with nn.intercept_methods(_recording_interceptor(_layer_class(model),
                                                   family.num_layers(model.config), keep)):
    model.apply(variables, *args, **kwargs)
  return found[0] if found else []


def _count_passes(model: nn.Module, layer_class: type, num_layers: int, batch: dict) -> int:
  """How many full passes through the encoder's layers `model` makes (an abstract init)."""
  from bert_jax import steps  # pylint: disable=import-outside-toplevel  (steps imports optim)
  passes = []

  def count(states, last):
    passes.append(len(states))
    return last
  with nn.intercept_methods(_recording_interceptor(layer_class, num_layers, count)):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      **steps.model_inputs(model, batch)))
  return len(passes)


def wrap(config, model: nn.Module, batch: dict, subclass: Callable[[type], type]) -> Any:
  """`model` as a ScalarMixModel (`subclass` gives its class for the model's type, see
  peft._wrapper_class); ConfigError naming finetune.method for a model that is not an
  encoder with a layer stack in peft_modules.STACKS, or that runs none."""
  if getattr(model.config, "remat", False):
    # Layer outputs under nn.remat live inside jax.checkpoint, out of the interceptor's
    # reach; and with no backward pass through the frozen encoder there is nothing to
    # rematerialise. Same params, same outputs.
    model = model.clone(config=dataclasses.replace(model.config, remat=False))
  layer_class = _layer_class(model)
  num_layers = models.family_of(model).num_layers(model.config) if layer_class else 0
  if layer_class is None or not _count_passes(model, layer_class, num_layers, batch):
    raise ConfigError("finetune.method", f"'scalar_mix' needs an encoder family whose layers "
                      f"it can read (peft_modules.STACKS: bert, modernbert, deberta); "
                      f"the {config.family!r} model has none")
  return subclass(ScalarMixModel)(model, layer_class, num_layers)


# -------------------------------------------------------- gradual unfreezing


def validate(config) -> None:
  """One-line ConfigErrors for finetune.unfreeze / unfreeze_schedule / unfreeze_steps."""
  ft = config.finetune
  if ft.unfreeze_schedule not in UNFREEZE_SCHEDULES:
    raise ConfigError("finetune.unfreeze_schedule", f"unknown schedule "
                      f"{ft.unfreeze_schedule!r}; choose one of {list(UNFREEZE_SCHEDULES)}")
  if ft.unfreeze and ft.unfreeze_schedule:
    raise ConfigError("finetune.unfreeze", "give the stages or finetune.unfreeze_schedule, "
                      "not both")
  for stage in ft.unfreeze:
    if not (isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[0], int)
            and not isinstance(stage[0], bool) and stage[0] >= 0 and isinstance(stage[1], str)):
      raise ConfigError("finetune.unfreeze", f"must be (step >= 0, regex) pairs, got "
                        f"{stage!r}")
    try:
      re.compile(stage[1])
    except re.error as e:
      raise ConfigError("finetune.unfreeze", f"invalid regex {stage[1]!r}: {e}") from None
  if ft.unfreeze_schedule:
    s = tuple(ft.unfreeze_steps)
    if len(s) != 2 or not all(isinstance(x, int) for x in s) or not 0 < s[0] <= s[1]:
      raise ConfigError("finetune.unfreeze_steps", f"{ft.unfreeze_schedule!r} needs two "
                        f"steps 0 < s1 <= s2 (LayerNorms, everything), got {s!r}")
  if (ft.unfreeze or ft.unfreeze_schedule) and ft.method != "full":
    raise ConfigError("finetune.unfreeze", f"stages apply to finetune.method 'full', not "
                      f"{ft.method!r}")


def unfreeze_stages(config, family, model_config, params: Any) -> tuple[tuple[int, str], ...]:
  """The (step, regex) stages of the config (() when off), each regex checked to match
  some parameter of `params` (paths as optim reads them)."""
  validate(config)
  ft = config.finetune
  if ft.unfreeze_schedule == "top_ln_all":
    if family.layer_prefix is None or getattr(model_config, "share_layers", "none") != "none":
      raise ConfigError("finetune.unfreeze_schedule", f"'top_ln_all' needs a parameter tree "
                        f"per layer, which the {family.name!r} model lacks; give "
                        "finetune.unfreeze stages")
    carried = "|".join(map(re.escape, family.carried_over or ()))
    top = "^" + family.layer_prefix.format(i=family.num_layers(model_config) - 1)
    first = [top] + ([f"^(?!({carried})(/|$))"] if carried else [])
    if family.pooler_prefix:
      first.append("^" + family.pooler_prefix)
    s1, s2 = (int(x) for x in ft.unfreeze_steps)
    stages = ((0, "|".join(first)), (s1, _LAYER_NORM), (s2, ".*"))
  else:
    stages = tuple((int(s), str(r)) for s, r in ft.unfreeze)
  paths = jax.tree.leaves(optim.path_tree(params))
  for _, regex in stages:
    if not any(re.search(regex, p) for p in paths):
      raise ConfigError("finetune.unfreeze", f"regex {regex!r} matches no parameter (e.g. "
                        f"{', '.join(paths[:3])})")
  return stages
