"""Optimizers as optax transformations: schedules, AdamW/Adafactor/LAMB, regex rules.

Policy is stated as regular expressions over "/"-joined parameter paths such
as 'params/encoder/layer_3/attention/query/kernel' (big_vision style), matched
with `re.search`:

  no_decay        parameters without weight decay (norm scales, biases),
  freeze          parameters that never change (no update, no decay, no
                  optimizer state),
  lr_multipliers  (regex, factor) pairs scaling the update of matching
                  parameters, first match wins (e.g. layer-wise LR decay).
  unfreeze        (make_optimizer's argument, not a config field) (step, regex)
                  stages of gradual unfreezing: a parameter trains from its
                  stage's step on (`unfreeze_starts`, `gate_by_step`).

Every regex must match at least one parameter, else `make_optimizer` fails
naming it: a typo in a freeze rule must not silently freeze nothing.
Masks depend on the tree's paths only, so the optimizer can be built from
`jax.eval_shape` output (leaves `jax.ShapeDtypeStruct`) before any parameter
exists. Flax `nn.Partitioned` boxes count as leaves (their `.value` is not
part of the path).

Config fields (`config.optim.*`, see `defaults.optim_config`): name, learning_rate,
schedule, warmup_steps, num_steps, end_factor, decay_steps, decay_shape, weight_decay, b1, b2, eps,
clip_norm, bias_correction, decay_rate, momentum, factored, multiply_by_parameter_scale,
clipping_threshold, min_dim_size_to_factor, no_decay, freeze, lr_multipliers.
"""
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bert_jax import defaults

Schedule = Callable[[Any], jax.Array]

SCHEDULES = ("linear", "cosine", "rsqrt", "constant", "wsd")
# The cool-down of 'wsd': 1 - sqrt (Hägele et al. 2024; ModernBERT), linear or cosine.
DECAY_SHAPES = ("sqrt", "linear", "cosine")
OPTIMIZERS = ("adamw", "adafactor", "lamb")
DEFAULT_NO_DECAY = defaults.DEFAULT_NO_DECAY


# ----------------------------------------------------------------- schedules


def make_schedule(name: str, base_lr: float, num_steps: int | None = None,
                  warmup_steps: int = 0, *, end_factor: float = 0.0, decay_steps: int = 0,
                  decay_shape: str = "sqrt") -> Schedule:
  """A learning-rate schedule step -> lr (float32), step counting from 0.

  With w = warmup_steps and N = num_steps:
    linear:   base * s / w during warmup, then linear from base at w to
              base * end_factor at N, constant after (BERT, end_factor 0).
              Original BERT decays from step 0 instead of from w, so its lr
              right after warmup is base * (1 - w / N); this form (Hugging
              Face, optax) is continuous.
    cosine:   the same warmup, then half a cosine from base at w to
              base * end_factor at N.
    rsqrt:    base / sqrt(max(s, w, 1)) -- t5x's "constant * rsqrt_decay":
              flat at base / sqrt(w) until step w (0.01 for base 1.0 and w
              10k), then decaying as 1/sqrt(s); no linear ramp, no end.
    constant: base, after an optional linear warmup base * s / w.
    wsd:      warmup-stable-decay, the "trapezoidal" schedule of ModernBERT
              (Warner et al. 2024): the same warmup, base until N - d, then
              a cool-down of d = decay_steps steps to base * end_factor at N,
              shaped 1 - sqrt(p) (decay_shape 'sqrt', Hägele et al. 2024),
              1 - p ('linear') or half a cosine, with p the cool-down's
              progress. A run can be extended from any checkpoint before the
              cool-down, which is why it is used for long pretraining.

  Args:
    name: one of SCHEDULES.
    base_lr: peak learning rate (the constant factor for rsqrt).
    num_steps: total steps N; needed by linear and cosine.
    warmup_steps: w (>= 0).
    end_factor: final lr as a fraction of base_lr (linear, cosine and wsd).
    decay_steps: wsd only: d, the cool-down's length (0 < d <= N - w).
    decay_shape: wsd only: one of DECAY_SHAPES.

  Returns:
    A function of the (integer) step usable as an optax schedule.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if name in ("linear", "cosine", "wsd"):
    if not num_steps or num_steps <= warmup_steps:
      raise ValueError(f"schedule {name!r} needs num_steps > warmup_steps, got "
                       f"num_steps={num_steps}, warmup_steps={warmup_steps}")
  elif end_factor:
    raise ValueError(f"end_factor applies to 'linear', 'cosine' and 'wsd' only, not {name!r}")
  if name == "wsd":
    if not 0 < decay_steps <= num_steps - warmup_steps:
      raise ValueError(f"schedule 'wsd' needs 0 < decay_steps <= num_steps - warmup_steps = "
                       f"{num_steps - warmup_steps}, got decay_steps={decay_steps}")
    if decay_shape not in DECAY_SHAPES:
      raise ValueError(f"unknown decay_shape {decay_shape!r}; choose one of {list(DECAY_SHAPES)}")
  w = float(warmup_steps)

  def warmup(step):
    return jnp.minimum(1.0, step / w) if warmup_steps else jnp.ones_like(step)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if name == "rsqrt":
      return base_lr / jnp.sqrt(jnp.maximum(jnp.maximum(step, w), 1.0))
    if name == "constant":
      return base_lr * warmup(step)
    start = num_steps - decay_steps if name == "wsd" else w  # where the decay begins
    progress = jnp.clip((step - start) / (num_steps - start), 0.0, 1.0)
    shape = decay_shape if name == "wsd" else name
    if shape == "sqrt":
      decay = 1.0 - jnp.sqrt(progress)
    elif shape == "linear":
      decay = 1.0 - progress
    else:
      decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    after = base_lr * (end_factor + (1.0 - end_factor) * decay)
    return jnp.where(step < w, base_lr * warmup(step), after)

  return schedule


# ---------------------------------------------------------------- regex rules


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def path_tree(params: Any) -> Any:
  """The tree of "/"-joined path strings, one per leaf (boxes are leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(_key_name(k) for k in path), params, is_leaf=_is_box)


def _paths(params: Any) -> list[str]:
  return jax.tree_util.tree_leaves(path_tree(params))


def _check_matches(patterns: Sequence[str], paths: Sequence[str], field: str) -> None:
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"optim.{field}: invalid regex {pattern!r}: {e}") from e
    if not any(regex.search(p) for p in paths):
      examples = ", ".join(paths[:4])
      raise ValueError(f"optim.{field}: regex {pattern!r} matches no parameter "
                       f"({len(paths)} paths, e.g. {examples})")


def regex_mask(params: Any, patterns: Sequence[str], field: str = "mask") -> Any:
  """Bool tree: True where any pattern matches the path; each must match one.

  Args:
    params: parameter tree (arrays, ShapeDtypeStructs or flax boxes).
    patterns: regexes, matched with re.search.
    field: config field named in the error when a regex matches nothing.

  Returns:
    A tree like `params` (boxes as leaves) of Python bools.
  """
  _check_matches(patterns, _paths(params), field)
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda p: any(r.search(p) for r in compiled), path_tree(params))


def multiplier_tree(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """Float tree of LR multipliers: the factor of the first matching rule, else 1.

  Args:
    params: parameter tree.
    rules: (regex, factor) pairs; each regex must match some parameter.

  Returns:
    A tree like `params` (boxes as leaves) of Python floats.
  """
  def is_pair(rule):
    return (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (int, float)))
  bad = [r for r in rules if not is_pair(r)]
  if bad:
    raise ValueError(f"optim.lr_multipliers must be a list of (regex, factor) pairs; "
                     f"bad entries: {bad[:3]}")
  rules = [(r, float(f)) for r, f in rules]
  _check_matches([r for r, _ in rules], _paths(params), "lr_multipliers")
  for regex, factor in rules:
    if factor < 0:
      raise ValueError(f"optim.lr_multipliers: factor {factor} for {regex!r} is negative")
  compiled = [(re.compile(r), f) for r, f in rules]

  def factor_of(path):
    return next((f for r, f in compiled if r.search(path)), 1.0)

  return jax.tree.map(factor_of, path_tree(params))


def layerwise_lr_multipliers(num_layers: int, decay: float, *,
                             layer_regex: str = r"(^|/)layer_{i}/",
                             embeddings_regex: str = r"(^|/)embeddings/"
                             ) -> list[tuple[str, float]]:
  """Layer-wise LR decay rules for fine-tuning (ELECTRA, BEiT style).

  Layer i (0 = next to the embeddings) gets decay ** (num_layers - i), the
  embeddings decay ** (num_layers + 1); heads and pooler keep factor 1.

  Args:
    num_layers: encoder depth.
    decay: per-layer factor in (0, 1].
    layer_regex: regex of layer i's parameters, with `{i}` for the index.
    embeddings_regex: regex of the embedding parameters.

  Returns:
    A list of (regex, factor) for `optim.lr_multipliers`.
  """
  rules = [(layer_regex.format(i=i), decay ** (num_layers - i)) for i in range(num_layers)]
  return rules + [(embeddings_regex, decay ** (num_layers + 1))]


# ------------------------------------------------------- custom transforms


class GradNormState(NamedTuple):
  """State of `clip_by_global_norm`: the gradient norm of the last update."""
  grad_norm: jax.Array


def clip_by_global_norm(max_norm: float | None) -> optax.GradientTransformation:
  """optax's global-norm clipping that also records the pre-clip norm.

  Args:
    max_norm: clip threshold; 0 or None records the norm without clipping.

  Returns:
    A transformation whose state is a GradNormState (see `grad_norm`).
  """
  def init(params):
    del params
    return GradNormState(grad_norm=jnp.zeros([], jnp.float32))

  def update(updates, state, params=None):
    del state, params
    norm = optax.tree.norm(updates).astype(jnp.float32)
    if max_norm:
      # Same rule as optax: scale by max_norm / norm only when norm > max_norm.
      scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
      updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    return updates, GradNormState(grad_norm=norm)

  return optax.GradientTransformation(init, update)


def grad_norm(opt_state: Any) -> jax.Array:
  """The gradient norm of the last update, read from `make_optimizer`'s state.

  It is the global norm before clipping, over trainable parameters only.

  Args:
    opt_state: state returned by the optimizer's init/update.

  Returns:
    A float32 scalar (0 before the first update).
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if path and getattr(path[-1], "name", None) == "grad_norm":
      return leaf
  raise ValueError("optimizer state has no grad_norm (not built by make_optimizer?)")


def _scale_by_tree(factors: Any) -> optax.GradientTransformation:
  """Multiplies each update by a constant per-parameter factor."""
  def update(updates, state, params=None):
    del params
    scaled = jax.tree.map(
        lambda f, u: u if f == 1.0 else jax.tree.map(lambda x: (x * f).astype(x.dtype), u),
        factors, updates)
    return scaled, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _scale_by_adam_uncorrected(b1: float, b2: float, eps: float
                               ) -> optax.GradientTransformation:
  """Adam's m / (sqrt(v) + eps) without bias correction, as in original BERT's
  AdamWeightDecayOptimizer (and ALBERT's LAMB)."""
  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                  nu=jax.tree.map(jnp.copy, zeros))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype),
                       mu, nu, updates)
    return out, optax.ScaleByAdamState(optax.safe_int32_increment(state.count), mu, nu)

  return optax.GradientTransformation(init, update)


def _decay_scaled_by_lr(rate: float, schedule: Schedule) -> optax.GradientTransformation:
  """Adds -lr(step) * rate * param to (already sign-flipped) updates."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    lr = schedule(state.count)
    updates = jax.tree.map(lambda u, p: (u - lr * rate * p).astype(u.dtype), updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------- gradual unfreezing


def unfreeze_starts(params: Any, stages: Sequence[tuple[int, str]]) -> Any:
  """Int tree: the step from which each parameter trains.

  A parameter starts at the smallest step of the stages whose regex matches
  its path (re.search), at 0 when none does; each regex must match some
  parameter. A parameter with start s is unchanged by the updates of steps
  1..s and trains from step s + 1 (the update made at optimizer count s).
  """
  bad = [s for s in stages if not (isinstance(s, (tuple, list)) and len(s) == 2
                                   and isinstance(s[0], int) and s[0] >= 0
                                   and isinstance(s[1], str))]
  if bad:
    raise ValueError(f"unfreeze must be (step >= 0, regex) pairs; bad entries: {bad[:3]}")
  _check_matches([r for _, r in stages], _paths(params), "unfreeze")
  compiled = [(int(s), re.compile(r)) for s, r in stages]
  return jax.tree.map(lambda p: min((s for s, r in compiled if r.search(p)), default=0),
                      path_tree(params))


class GateState(NamedTuple):
  """State of `gate_by_step`: the updates made so far (the train step)."""
  count: jax.Array


def _map_starts(fn: Callable, starts: Any, *trees: Any) -> Any:
  """fn(start, *leaves) over trees whose structure `starts` is a prefix of (a masked
  group's MaskedNode or a box under a start is mapped through)."""
  return jax.tree.map(lambda s, *xs: jax.tree.map(lambda *ys: fn(s, *ys), *xs), starts, *trees)


def gate_by_step(starts: Any) -> optax.GradientTransformation:
  """Zeroes the updates of every parameter whose start (see `unfreeze_starts`) is above
  the update count: a pure function of the step, so a resumed run gates the same."""
  def update(updates, state, params=None):
    del params
    out = _map_starts(lambda s, u: jnp.where(state.count >= s, u, jnp.zeros_like(u)),
                      starts, updates)
    return out, GateState(optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(lambda _: GateState(jnp.zeros([], jnp.int32)), update)


def _scale_by_adam_staged(b1: float, b2: float, eps: float, starts: Any
                          ) -> optax.GradientTransformation:
  """optax.scale_by_adam with the bias correction of each parameter counted from its start:
  a group unfrozen at step s (its moments zero until then, the gradients being gated)
  takes Adam's first step at s + 1, not a step under a correction already near 1,
  which would scale its first updates by up to (1 - b1) / sqrt(1 - b2) (3.2 at the
  defaults)."""
  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                  nu=jax.tree.map(jnp.copy, zeros))

  def update(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)

    def step(start, m, v, g):
      k = jnp.maximum(count - start, 1).astype(jnp.float32)  # this group's Adam steps
      m_hat, v_hat = m / (1 - b1 ** k), v / (1 - b2 ** k)
      return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)
    out = _map_starts(step, starts, mu, nu, updates)
    return out, optax.ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


# -------------------------------------------------------------- entry point


def _core(cfg: Mapping[str, Any], schedule: Schedule, decay_mask: Any, starts: Any = None
          ) -> optax.GradientTransformation:
  """The optimizer proper, applied to trainable parameters only (`starts`: see
  `_scale_by_adam_staged`)."""
  name, wd = cfg["name"], float(cfg["weight_decay"])
  if name in ("adamw", "lamb"):
    if cfg["bias_correction"] and starts is not None:
      adam = _scale_by_adam_staged(cfg["b1"], cfg["b2"], cfg["eps"], starts)
    elif cfg["bias_correction"]:
      adam = optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"])
    else:
      adam = _scale_by_adam_uncorrected(cfg["b1"], cfg["b2"], cfg["eps"])
    # Decay is added before the lr scaling: decoupled, lr-scaled (AdamW).
    parts = [adam, optax.add_decayed_weights(wd, mask=decay_mask)]
    if name == "lamb":
      # As in the BERT/ALBERT LAMB: parameters without decay also skip the
      # layer-wise trust ratio (exclude_from_layer_adaptation).
      parts.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
    return optax.chain(*parts, optax.scale_by_learning_rate(schedule))
  if name == "adafactor":
    # t5x Adafactor -> optax.adafactor: decay_rate, clipping_threshold,
    # min_dim_size_to_factor, factored, multiply_by_parameter_scale keep their
    # names; beta1 -> momentum (None = off); epsilon1 1e-30 -> eps (default);
    # epsilon2 1e-3 -> the fixed floor of optax's parameter scale;
    # step_offset -> decay_offset (0). Matrices and vectors get the same
    # update as t5x; rank-3 kernels are factored over their two largest dims,
    # where t5x with logical factor rules factors embed vs (heads, kv).
    momentum = float(cfg["momentum"]) or None
    clip = float(cfg["clipping_threshold"]) or None
    tx = optax.adafactor(
        schedule, min_dim_size_to_factor=int(cfg["min_dim_size_to_factor"]),
        decay_rate=cfg["decay_rate"], multiply_by_parameter_scale=bool(
            cfg["multiply_by_parameter_scale"]),
        clipping_threshold=clip, momentum=momentum, factored=bool(cfg["factored"]))
    if not wd:
      return tx
    # t5x/optax Adafactor decay is not scaled by the lr; ours is, so that
    # weight_decay means the same thing for every optimizer.
    return optax.chain(tx, optax.masked(_decay_scaled_by_lr(wd, schedule), decay_mask))
  raise ValueError(f"unknown optimizer optim.name={name!r}; choose one of {list(OPTIMIZERS)}")


def _as_dict(config: Any) -> dict[str, Any]:
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def patterns(value: Any) -> list[str]:
  """A regex list; a lone string is one regex, not a list of characters."""
  return [value] if isinstance(value, str) else [str(v) for v in value]


def resolve_config(config: Any = None, **overrides) -> dict[str, Any]:
  """Config fields merged over `defaults.optim_config(name)`; unknown keys are errors.

  Args:
    config: ConfigDict, mapping, or None (all defaults).
    **overrides: fields that replace those of `config`.

  Returns:
    A plain dict with every field.
  """
  given = {**_as_dict(config), **overrides}
  name = given.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer optim.name={name!r}; choose one of {list(OPTIMIZERS)}")
  known = defaults.optim_config(name).to_dict()
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"unknown optim field(s) {unknown}; valid fields: {sorted(known)}")
  return {**known, **given}


def make_optimizer(config: Any, params: Any, *, num_steps: int | None = None,
                   unfreeze: Sequence[tuple[int, str]] = (),
                   **overrides) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the full optimizer from `config.optim`-style fields.

  Chain: zero the gradients of frozen parameters -> global-norm clipping
  (recording the norm, see `grad_norm`) -> the optimizer on trainable
  parameters (frozen ones get a zero update and no state) -> per-parameter
  LR multipliers. Weight decay is decoupled and scaled by the scheduled lr
  for every optimizer and skips `no_decay` and frozen parameters.

  Args:
    config: ConfigDict/mapping of fields (see `defaults.optim_config`), or None.
    params: the parameter tree or its `jax.eval_shape` (only paths are read).
    num_steps: total training steps; overrides `num_steps` of the config
      (which, when 0, must be given here for linear/cosine schedules).
    unfreeze: gradual unfreezing, (step, regex) stages (see `unfreeze_starts`):
      the gradients going in and the updates coming out are zero for a
      parameter before its stage, so it gets no update, no weight decay and
      zero Adam moments, and Adam's bias correction counts its steps from its
      stage (adamw / lamb with bias_correction).
    **overrides: config fields to replace.

  Returns:
    (optax transformation, schedule) -- the schedule for logging the lr.
  """
  cfg = resolve_config(config, **overrides)
  steps = num_steps if num_steps is not None else (cfg["num_steps"] or None)
  schedule = make_schedule(cfg["schedule"], float(cfg["learning_rate"]), steps,
                           int(cfg["warmup_steps"]), end_factor=float(cfg["end_factor"]),
                           decay_steps=int(cfg["decay_steps"]),
                           decay_shape=str(cfg["decay_shape"]))
  frozen = regex_mask(params, patterns(cfg["freeze"]), "freeze")
  no_decay = regex_mask(params, patterns(cfg["no_decay"]), "no_decay")
  decay_mask = jax.tree.map(lambda f, n: not (f or n), frozen, no_decay)
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
  if all(jax.tree.leaves(frozen)):
    raise ValueError(f"optim.freeze {patterns(cfg['freeze'])} freezes every parameter")
  starts = unfreeze_starts(params, unfreeze) if unfreeze else None
  parts = [
      optax.masked(optax.set_to_zero(), frozen),
      clip_by_global_norm(float(cfg["clip_norm"] or 0.0)),
      optax.multi_transform({"trainable": _core(cfg, schedule, decay_mask, starts),
                             "frozen": optax.set_to_zero()}, labels),
  ]
  if cfg["lr_multipliers"]:
    parts.append(_scale_by_tree(multiplier_tree(params, cfg["lr_multipliers"])))
  if starts is not None:  # before clipping: the norm is over the unfrozen gradients
    parts = [gate_by_step(starts)] + parts + [gate_by_step(starts)]
  return optax.chain(*parts), schedule
