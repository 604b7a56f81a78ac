"""Building blocks shared by the BERT and T5 families.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`)
so that `bert_jax.sharding` can map one rule table onto the mesh. Parameters are
float32; `dtype` is the computation dtype (bfloat16 on TPU/GPU, float32 in tests).
Normalisations and softmax run in float32 whatever `dtype` is: that is where
bfloat16 loses the most.

Logical names used for parameters: vocab, embed, mlp, heads, kv (per-head
features); small tables (positions, token types, relative-position buckets,
norm scales) use names with no sharding rule and are replicated.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import threefry

Array = jax.Array
Initializer = Callable[..., Array]

# Truncated normal, std 0.02: the BERT initialiser (TF truncates at 2 std, as does this).
bert_init = nn.initializers.truncated_normal(stddev=0.02)

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf: HF BertModel
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # original BERT, T5 v1.1
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # HF's name for gelu_tanh
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


# ----------------------------------------------------------------- dropout

# Dropout draws one 16-bit lane per element: each 32-bit word of the PRNG
# gives two. On CPU the threefry hash behind jax.random.bernoulli (one word
# per element) made dropout ~15% of a BERT training step, attention dropout
# most of it; half the words, bit-cast, cost ~5x less there. The rate is
# resolved to 2**-16 (0.1 drops with probability 6554/65536 = 0.100006) and
# the kept values are scaled by the exact keep probability, so the expected
# output is the input. Masks stay a function of the key alone: resumes and
# multi-host runs are as exact as with bernoulli. The words come from
# threefry.bits32: jax.random.bits' own words, with the hash fused on CPU too.
_LANES = 1 << 16


def keep_mask(rng: Array, rate: float, shape: Sequence[int]) -> tuple[Array, float]:
  """(bool mask, P(keep)): elements kept with probability 1 - rate (to 2**-16).

  The words are drawn in `shape` with its last axis halved, then each word is
  split in two along that axis: the leading axes are generated where they
  are sharded, as jax.random.bits of `shape` itself would be.
  """
  shape = tuple(shape)
  if not shape:
    return keep_mask(rng, rate, (1,))[0].reshape(()), 1.0 - round(rate * _LANES) / _LANES
  threshold = round(rate * _LANES)  # a lane below it is dropped
  if threshold >= _LANES:
    return jnp.zeros(shape, bool), 0.0
  last = shape[-1]
  words = threefry.bits32(rng, shape[:-1] + ((last + 1) // 2,))  # = jax.random.bits
  lanes = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last / 2), 2]
  lanes = lanes.reshape(shape[:-1] + (2 * ((last + 1) // 2),))[..., :last]
  return lanes >= threshold, 1.0 - threshold / _LANES


class Dropout(nn.Module):
  """Inverted dropout with `keep_mask`'s masks; flax's nn.Dropout interface.

  Attributes:
    rate: the probability of zeroing an element.
    rng_collection: where the key comes from (`rngs={'dropout': key}`).
  """
  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x [...] -> x with elements zeroed at `rate`, the rest scaled by 1 / P(keep)."""
    if deterministic or self.rate == 0.0:
      return x
    keep, p = keep_mask(self.make_rng(self.rng_collection), self.rate, x.shape)
    if p == 0.0:
      return jnp.zeros_like(x)
    return jnp.where(keep, x / jnp.asarray(p, x.dtype), jnp.zeros_like(x))


def get_activation(name: str) -> Callable[[Array], Array]:
  """Looks up an activation by its Hugging Face / config name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
  """A dense layer over one or more input axes into one or more output axes.

  Kernels keep their multi-head shape (e.g. [embed, heads, kv]) rather than a
  flattened [embed, heads * kv], so that `heads` can be sharded on its own.

  Attributes:
    features: output feature shape, e.g. (heads, head_dim).
    axis: input axes contracted, e.g. -1 or (-2, -1).
    kernel_axes: logical names of the kernel dimensions (input axes first).
    use_bias: add a bias of shape `features` (logical names: kernel_axes' tail).
  """
  features: int | Sequence[int]
  kernel_axes: Sequence[str]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  kernel_init: Initializer = bert_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = _normalize_axes(axis, inputs.ndim)
    kernel_shape = tuple(inputs.shape[a] for a in axis) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel "
                       f"shape {kernel_shape}")
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        kernel_shape, self.param_dtype)
    inputs = inputs.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    contract = (axis, tuple(range(len(axis))))
    out = jax.lax.dot_general(inputs, kernel, (contract, ((), ())))
    if self.use_bias:
      bias_axes = tuple(self.kernel_axes[len(axis):])
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, bias_axes),
                        features, self.param_dtype)
      out = out + bias.astype(self.dtype)
    return out


@jax.custom_vjp
def add_bias(x: Array, bias: Array) -> Array:
  """x [..., *bias.shape] + bias, whose bias gradient is a matmul, not a reduce.

  The bias gradient of a broadcast add is the cotangent summed over every
  leading axis. XLA:CPU (jax 0.10) runs that column sum of a [rows, vocab]
  array ~30x slower than the same sum as ones[rows] @ g (485 vs 17 ms at
  4096 x 30522): in a BERT MLM step scored at every position it took about a
  fifth of the step. The vocabulary heads add their bias through this; narrow
  biases (DenseGeneral's) stay plain adds, where XLA's sum is as fast.
  x and bias must have one dtype (cast the bias first).
  """
  _same_dtype(x, bias)
  return x + bias


def _same_dtype(x: Array, bias: Array) -> None:
  if x.dtype != bias.dtype:  # the backward hands g back as x's cotangent
    raise ValueError(f"add_bias: x is {x.dtype} but bias is {bias.dtype}; cast the bias first")


def _add_bias_fwd(x: Array, bias: Array) -> tuple[Array, Array]:
  _same_dtype(x, bias)
  return x + bias, bias  # the bias only lends its shape and dtype to the backward


def _add_bias_bwd(bias: Array, g: Array) -> tuple[Array, Array]:
  rows = g.reshape(-1, bias.size)  # [rows, features]
  grad = jnp.dot(jnp.ones(rows.shape[0], rows.dtype), rows,
                 preferred_element_type=jnp.float32)  # [features]
  return g, grad.reshape(bias.shape).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with bias (BERT), computed in float32, axis name `norm` (replicated)."""
  epsilon: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's LayerNorm: no mean subtraction, no bias, computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """A lookup table; `attend` gives logits against it (tied output embeddings).

  Attributes:
    num_embeddings: rows (vocabulary size, positions, token types).
    features: columns (hidden size).
    axes: logical names of [rows, columns]; ('vocab', 'embed') for words.
  """
  num_embeddings: int
  features: int
  axes: tuple[str, str] = ("vocab", "embed")
  embedding_init: Initializer = bert_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{self.name}: ids must be integers, got {ids.dtype}")
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x [..., features] -> logits [..., num_embeddings]."""
    return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


# ---------------------------------------------------------------------------
# Attention masks. Padding id 0 everywhere: a segment id of 0 marks padding.
# ---------------------------------------------------------------------------
def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """[batch, q], [batch, k] -> bool [batch, 1, q, k]: same non-padding segment.

  Unpacked batches pass their 0/1 padding mask as segment ids; packed ones
  pass 1, 2, 3, ... per example, so examples never attend to each other.
  """
  same = query_segments[:, :, None] == key_segments[:, None, :]
  valid = (query_segments[:, :, None] > 0) & (key_segments[:, None, :] > 0)
  return (same & valid)[:, None, :, :]


def causal_mask(length: int) -> Array:
  """bool [1, 1, length, length], True where key position <= query position."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def cross_kv_cache(module: nn.Module, key: Array | None, value: Array | None
                   ) -> tuple[Array, Array]:
  """Encoder-decoder cached decoding: stores the cross-attention key/value [batch, kv_len,
  heads, kv] in `module`'s 'cross_cache' collection (the prefill), or reads them when
  key is None (the decode steps, which then never project the encoder output)."""
  if key is None:
    if not module.has_variable("cross_cache", "cached_key"):
      raise ValueError(f"{module.name}: inputs_kv=None reads the 'cross_cache' collection; "
                       "fill it with the model's prefill_cross first")
    return (module.get_variable("cross_cache", "cached_key"),
            module.get_variable("cross_cache", "cached_value"))
  module.put_variable("cross_cache", "cached_key", key)
  module.put_variable("cross_cache", "cached_value", value)
  return key, value


# The kernel behind jax.nn.dot_product_attention when attention dropout is off.
# JAX's own default (implementation=None) is always XLA's unfused form; 'auto'
# asks for cuDNN's fused (flash) attention where it applies (NVIDIA GPUs, bf16
# or fp16, head dim a multiple of 8 up to 128, even lengths) and XLA's
# elsewhere. 'xla' and 'cudnn' force one; bench/gpu_step.py sets 'xla' to time
# the unfused baseline.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
attention_implementation_setting = "auto"


def attention_implementation(head_dim: int, dtype, device_kind: str | None = None,
                             setting: str | None = None, q_len: int = 2,
                             kv_len: int = 2) -> str:
  """'cudnn' or 'xla': what `dot_product_attention` asks jax.nn for.

  Args:
    head_dim: the per-head size of query and key.
    dtype: the attention's compute dtype.
    device_kind: `jax.devices()[0].device_kind` (default: this process's).
    setting: 'auto', 'xla' or 'cudnn' (default: `attention_implementation_setting`).
    q_len, kv_len: query and key lengths; cuDNN trains with a bias (every
      model's mask becomes one) only when both are even, which also keeps
      one-token decoding steps on XLA.
  """
  setting = setting or attention_implementation_setting
  if setting not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {setting!r} is not one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if setting != "auto":
    return setting
  device_kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
  fused = (device_kind.startswith("NVIDIA")
           and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
           and head_dim % 8 == 0 and head_dim <= 128
           and q_len % 2 == 0 and kv_len % 2 == 0)
  return "cudnn" if fused else "xla"


def attention_operand(x: Array | None, implementation: str,
                      full: tuple[int, int, int, int]) -> Array | None:
  """A mask or bias shaped for `implementation`; full = [batch, heads, q_len, kv_len].

  XLA's form wants it at full size. cuDNN folds the mask into the bias, which
  must span [q_len, kv_len] but may keep batch and heads at 1 (T5's shared
  position bias), so that its gradient stays that small.
  """
  if x is None:
    return None
  if implementation == "xla":
    return jnp.broadcast_to(x, full)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  return jnp.broadcast_to(x, x.shape[:2] + full[2:])


def dot_product_attention(query: Array, key: Array, value: Array, *,
                          mask: Array | None = None, bias: Array | None = None,
                          scale: float | None = None, dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None, deterministic: bool = True,
                          dtype: jnp.dtype = jnp.float32) -> Array:
  """The one attention function every model uses.

  Args:
    query: [batch, q_len, heads, head_dim]; key/value: [batch, kv_len, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len]; False = not attended.
    bias: added to the logits, broadcastable like mask (T5's relative position bias).
    scale: logit scale; None means 1/sqrt(head_dim) (BERT), T5 passes 1.0.
    dropout_rate: dropout on the attention probabilities (BERT's 0.1 in training).

  Without dropout this is `jax.nn.dot_product_attention`, with cuDNN's fused
  kernel where `attention_implementation` picks it; with dropout the
  probabilities must be materialised, so the einsum form runs instead.
  Returns [batch, q_len, heads, head_dim].
  """
  if scale is None:
    scale = query.shape[-1] ** -0.5
  use_dropout = dropout_rate > 0.0 and not deterministic
  if not use_dropout:
    q_len, kv_len = query.shape[1], key.shape[1]
    implementation = attention_implementation(query.shape[-1], dtype, q_len=q_len,
                                              kv_len=kv_len)
    full = (query.shape[0], query.shape[2], q_len, kv_len)

    def attend(implementation):
      b = attention_operand(bias, implementation, full)
      return jax.nn.dot_product_attention(
          query.astype(dtype), key.astype(dtype), value.astype(dtype),
          bias=None if b is None else b.astype(dtype),
          mask=attention_operand(mask, implementation, full), scale=scale,
          implementation=implementation)
    if implementation == "cudnn" and attention_implementation_setting == "auto":
      try:
        return attend("cudnn")
      except (NotImplementedError, RuntimeError, ValueError) as e:
        # cuDNN missing or a shape it rejects: 'auto' means the best that runs.
        logging.warning("cuDNN attention unavailable (%s); using XLA's", e)
        return attend("xla")
    return attend(implementation)
  # [batch, heads, q_len, kv_len]
  logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(dtype), key.astype(dtype)) * scale
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep, p = keep_mask(dropout_rng, dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / p, 0.0).astype(dtype) if p else jnp.zeros_like(probs, dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value.astype(dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head attention with [embed, heads, kv] projections.

  Attributes:
    num_heads, head_dim: heads x head_dim need not equal the model width (T5 v1.1).
    use_bias: BERT has biases on q/k/v/o; T5 has none.
    scale: logit scale, None for 1/sqrt(head_dim); T5 folds it into the init and uses 1.0.
    q_init, kv_init, out_init: initialisers (T5 scales q's std by 1/sqrt(head_dim)).
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  scale: float | None = None
  dropout_rate: float = 0.0
  q_init: Initializer = bert_init
  kv_init: Initializer = bert_init
  out_init: Initializer = bert_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, *, mask: Array | None = None,
               bias: Array | None = None, deterministic: bool = True) -> Array:
    """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed] -> [batch, q_len, embed]."""
    proj = functools.partial(
        DenseGeneral, features=(self.num_heads, self.head_dim),
        kernel_axes=("embed", "heads", "kv"), use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype)
    query = proj(kernel_init=self.q_init, name="query")(inputs_q)  # [batch, q_len, heads, kv]
    key = proj(kernel_init=self.kv_init, name="key")(inputs_kv)  # [batch, kv_len, heads, kv]
    value = proj(kernel_init=self.kv_init, name="value")(inputs_kv)
    query = nn.with_logical_constraint(query, ("act_batch", "act_length", "act_heads", "act_kv"))
    key = nn.with_logical_constraint(key, ("act_batch", "act_length", "act_heads", "act_kv"))
    value = nn.with_logical_constraint(value, ("act_batch", "act_length", "act_heads", "act_kv"))
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    x = dot_product_attention(
        query, key, value, mask=mask, bias=bias, scale=self.scale,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic, dtype=self.dtype)
    # [batch, q_len, heads, kv] -> [batch, q_len, embed]
    out = DenseGeneral(
        features=inputs_q.shape[-1], kernel_axes=("heads", "kv", "embed"), axis=(-2, -1),
        use_bias=self.use_bias, kernel_init=self.out_init, dtype=self.dtype,
        param_dtype=self.param_dtype, name="out")(x)
    return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_embed"))


class Kernel(nn.Module):
  """A DenseGeneral's parameters without its product, under the same names.

  `kernel` (and `bias`) with DenseGeneral's logical axes, initialisers and
  scope, so a module that multiplies by several kernels in one dot (the gated
  Mlp) keeps the checkpoint paths of separate DenseGenerals. Returns
  (kernel, bias or None).
  """
  shape: Sequence[int]
  kernel_axes: Sequence[str]
  use_bias: bool = True
  kernel_init: Initializer = bert_init
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[Array, Array | None]:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        tuple(self.shape), self.param_dtype)
    if not self.use_bias:
      return kernel, None
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (self.kernel_axes[-1],)),
                      (self.shape[-1],), self.param_dtype)
    return kernel, bias


class Mlp(nn.Module):
  """Position-wise feed-forward block, plain (BERT, T5 v1.0) or gated (T5 v1.1).

  With activations=('gelu_tanh', 'linear') the input goes through two
  projections, wi_0 and wi_1, whose activated outputs are multiplied (GEGLU);
  with one activation there is a single projection, wi.
  """
  mlp_dim: int
  activations: Sequence[str] = ("gelu",)
  use_bias: bool = True
  dropout_rate: float = 0.0
  kernel_init: Initializer = bert_init
  out_init: Initializer | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x [batch, length, embed] -> [batch, length, embed]."""
    dense = functools.partial(DenseGeneral, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    if len(self.activations) == 1:
      hidden = get_activation(self.activations[0])(
          dense(features=self.mlp_dim, kernel_axes=("embed", "mlp"),
                kernel_init=self.kernel_init, name="wi")(x))
    else:
      # The gated projections as one dot with the kernels stacked, [embed, n, mlp]:
      # the backward then has one input-gradient matmul (not n and their sum) and
      # one transposed copy of the cotangent: a T5 v1.1-small CPU step went from
      # 2.30 to 2.10 s (both forms built in one process). Params stay wi_0, wi_1.
      parts = [Kernel((x.shape[-1], self.mlp_dim), ("embed", "mlp"), self.use_bias,
                      self.kernel_init, self.param_dtype, name=f"wi_{i}")()
               for i in range(len(self.activations))]
      kernel = jnp.stack([k for k, _ in parts], axis=1).astype(self.dtype)
      h = jax.lax.dot_general(x.astype(self.dtype), kernel,
                              (((x.ndim - 1,), (0,)), ((), ())))  # [batch, length, n, mlp]
      if self.use_bias:
        h = h + jnp.stack([b for _, b in parts]).astype(self.dtype)
      h = nn.with_logical_constraint(h, ("act_batch", "act_length", None, "act_mlp"))
      hidden = None
      for i, act in enumerate(self.activations):
        a = get_activation(act)(h[..., i, :])
        hidden = a if hidden is None else hidden * a
    # [batch, length, mlp]
    hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
    hidden = Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    out = dense(features=x.shape[-1], kernel_axes=("mlp", "embed"),
                kernel_init=self.out_init or self.kernel_init, name="wo")(hidden)
    return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_embed"))
