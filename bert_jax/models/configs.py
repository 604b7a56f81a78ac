"""Hyperparameters of the model families, importable without JAX.

Config files (configs/*.py) and `bert_jax.defaults` read the presets and the
field lists from here, so loading a config imports neither JAX nor
TensorFlow; the flax modules (bert.py, t5.py) take these dataclasses as they
are. dtypes are numpy dtypes (ml_dtypes supplies bfloat16), equal to the
jnp ones: `BertConfig(dtype="bfloat16").dtype == jnp.bfloat16`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

# Every activation name the layers know (layers.ACTIVATIONS has the functions).
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "gelu_new", "relu", "silu", "linear")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def as_dtype(value: Any, owner: str) -> np.dtype:
  """A computation dtype from its name or a dtype; an unknown one names `owner`."""
  try:
    dtype = np.dtype(DTYPES.get(value, value) if isinstance(value, str) else value)
  except TypeError:
    dtype = None
  if dtype not in DTYPES.values():
    raise ValueError(f"{owner}: unknown dtype {value!r}; choose one of {list(DTYPES)}")
  return dtype


def config_from_dict(cls, d):
  """Builds the config dataclass `cls` from a mapping; an unknown key is an error naming it.

  Shared by every family so `config.model` typos fail the same way in each.
  """
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
  return cls(**dict(d))


# ------------------------------------------------------------------- BERT


# Turc et al. 2019 sizes (layers, hidden); heads = hidden / 64, FFN = 4 x hidden.
BERT_PRESET_SIZES = {
    "tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
    "base": (12, 768), "large": (24, 1024),
}
# gelu_new is Hugging Face's name for gelu_tanh (ALBERT's configs use it).
_BERT_ACTIVATIONS = ("gelu", "gelu_tanh", "gelu_new", "relu", "silu")
BERT_MODEL_TYPES = ("bert", "roberta", "albert", "electra", "distilbert")
# Cross-layer parameter sharing (ALBERT): which sub-blocks every layer takes from layer 0.
SHARE_LAYERS = ("none", "all", "attention", "ffn")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT-family encoder.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: sizes.
    hidden_act: 'gelu' (exact erf, Hugging Face) or 'gelu_tanh' (original BERT;
      'gelu_new' is the same function under Hugging Face's name, as ALBERT).
    max_position_embeddings: rows of the position table.
    type_vocab_size: rows of the token-type (segment A/B) table; RoBERTa has 1.
      0: no table (DistilBERT); encoder_type_ids are then accepted and ignored.
    layer_norm_eps: LayerNorm epsilon.
    dropout_rate: dropout on embeddings and on each sub-layer's output.
    attention_dropout_rate: dropout on the attention probabilities.
    pad_token_id: padding token (0 for BERT, 1 for RoBERTa checkpoints).
    position_offset: row of the position table used for position 0. RoBERTa
      reserves rows 0..pad_token_id, so its offset is pad_token_id + 1; with
      an offset > 0 and no `encoder_positions`, positions count only the
      non-padding tokens and padding tokens read row pad_token_id (as
      Hugging Face RoBERTa does).
    model_type: 'bert', 'roberta', 'albert', 'electra' or 'distilbert': the
      Hugging Face naming used on export, and the sequence classifier:
      RoBERTa's, ELECTRA's and DistilBERT's have no pooler but a dense + tanh
      (ELECTRA: GELU; DistilBERT: ReLU) over the first token; ELECTRA's MLM
      head uses exact GELU whatever hidden_act. DistilBERT (type_vocab_size
      0) also drops out neither the attention output nor the first token
      before its classifier dense, and drops out the hidden states before QA.
    embedding_size: ALBERT's factorised embeddings: the token, position and
      type tables (and their LayerNorm) are this wide, projected up to
      hidden_size before the first layer, and the MLM head maps back down to
      it before the tied output. 0 (the default): no factorisation, the
      tables are hidden_size wide and there is no projection.
    share_layers: cross-layer parameter sharing. 'none': every layer has its
      own parameters; 'all' (ALBERT): layer 0's parameters are applied
      num_layers times; 'attention' / 'ffn': every layer uses layer 0's
      attention (or feed-forward) sub-block, with its LayerNorm, and keeps
      its own other sub-block. Compute is per applied layer either way.
    generator_size: ELECTRA's generator (the 'electra' task) is this
      fraction of hidden_size wide, with the same depth, 64-dim heads and a
      4x FFN (`generator_config`); the paper's 1/4 (small, large) or 1/3
      (base). Other tasks ignore it.
    remat: recompute each block's activations in the backward pass instead
      of storing them (less memory for long sequences / large models).
    dtype: computation dtype (a jnp dtype or its name, e.g. 'bfloat16');
      parameters are always float32.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pad_token_id: int = 0
  position_offset: int = 0
  model_type: str = "bert"
  embedding_size: int = 0
  share_layers: str = "none"
  generator_size: float = 0.25
  remat: bool = False
  dtype: Any = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "BertConfig"))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")
    if self.hidden_act not in _BERT_ACTIVATIONS:
      raise ValueError(f"BertConfig: unknown hidden_act {self.hidden_act!r}; choose one of "
                       f"{list(_BERT_ACTIVATIONS)}")
    if self.model_type not in BERT_MODEL_TYPES:
      raise ValueError(f"BertConfig: model_type must be one of {list(BERT_MODEL_TYPES)}, got "
                       f"{self.model_type!r}")
    if self.share_layers not in SHARE_LAYERS:
      raise ValueError(f"BertConfig: share_layers must be one of {list(SHARE_LAYERS)}, got "
                       f"{self.share_layers!r}")
    if not 0 < self.generator_size <= 1:
      raise ValueError(f"BertConfig: generator_size must be in (0, 1] (a fraction of "
                       f"hidden_size), got {self.generator_size}")
    if self.type_vocab_size < 0:
      raise ValueError(f"BertConfig: type_vocab_size must be >= 0 (0: no token-type table), "
                       f"got {self.type_vocab_size}")
    if self.embedding_size < 0:
      raise ValueError(f"BertConfig: embedding_size must be >= 0 (0: hidden_size, no "
                       f"factorisation), got {self.embedding_size}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def has_pooler(self) -> bool:
    """BERT and ALBERT classify the pooled first token; RoBERTa, ELECTRA and DistilBERT
    have no pooler."""
    return self.model_type in ("bert", "albert")

  @property
  def embed_dim(self) -> int:
    """Width of the embedding tables: embedding_size when factorised, else hidden_size."""
    return self.embedding_size or self.hidden_size

  @classmethod
  def preset(cls, name: str, **overrides) -> "BertConfig":
    """A named size (tiny, mini, small, medium, base, large) with fields overridden."""
    if name not in BERT_PRESET_SIZES:
      raise ValueError(f"unknown BERT preset {name!r}; choose one of {list(BERT_PRESET_SIZES)}")
    num_layers, hidden = BERT_PRESET_SIZES[name]
    fields = dict(num_layers=num_layers, hidden_size=hidden, num_heads=hidden // 64,
                  intermediate_size=4 * hidden)
    fields.update(overrides)
    return cls.from_dict(fields)

  @classmethod
  def from_dict(cls, d: dict) -> "BertConfig":
    """Builds a config from a mapping (e.g. `config.model`); unknown keys are an error."""
    return config_from_dict(cls, d)


def generator_config(config: BertConfig) -> BertConfig:
  """ELECTRA's generator for the discriminator `config` (the reference's get_generator_config).

  hidden = round(generator_size * hidden_size), same depth, max(1, hidden //
  64) heads, FFN 4 x hidden. It shares the discriminator's embedding tables,
  so its embedding_size is their width (projected to its own hidden size).
  """
  hidden = int(round(config.hidden_size * config.generator_size))
  heads = max(1, hidden // 64)
  if hidden % heads:
    raise ValueError(f"BertConfig: generator_size={config.generator_size} makes a generator "
                     f"{hidden} wide, not a multiple of its {heads} 64-dim heads")
  return dataclasses.replace(config, hidden_size=hidden, num_heads=heads,
                             intermediate_size=4 * hidden,
                             embedding_size=0 if config.embed_dim == hidden else config.embed_dim)


# SpanBERT's boundary-objective head (an option of every BERT-family model):
# one relative-position row per token of a span, up to the reference run's
# --max-pair-targets 15 (a span has at most 10 words, so rarely more pieces);
# tokens past it get SBO weight 0, as the reference drops them
# (objectives.sbo_weights). Its width is --pair-positional-embedding-size.
SBO_MAX_TARGETS = 15
SBO_POSITION_SIZE = 200


# --------------------------------------------------------------------- T5


_V10 = dict(activations=("relu",), tie_word_embeddings=True, dropout_rate=0.1)
# v1.1 was pretrained without dropout; fine-tuning configs may set it back to 0.1.
_V11 = dict(activations=("gelu_tanh", "linear"), tie_word_embeddings=False, dropout_rate=0.0)
# name: (d_model, d_ff, num_heads, num_layers per stack, family defaults)
T5_PRESETS = {
    "t5_v1_0_tiny": (64, 128, 4, 2, dict(_V10, vocab_size=512)),
    "t5_v1_0_small": (512, 2048, 8, 6, _V10),
    "t5_v1_0_base": (768, 3072, 12, 12, _V10),
    "t5_v1_0_large": (1024, 4096, 16, 24, _V10),
    "t5_v1_1_tiny": (64, 96, 4, 2, dict(_V11, vocab_size=512)),
    "t5_v1_1_small": (512, 1024, 6, 8, _V11),
    "t5_v1_1_base": (768, 2048, 12, 12, _V11),
    "t5_v1_1_large": (1024, 2816, 16, 24, _V11),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 encoder-decoder.

  Attributes:
    vocab_size: embedding rows (32128: 32000 pieces + 100 sentinels, padded to 128).
    d_model, d_kv, d_ff, num_heads: width, per-head width, MLP width, heads.
    num_encoder_layers, num_decoder_layers: depth of each stack.
    relative_attention_num_buckets, relative_attention_max_distance: the bucket function.
    dropout_rate: dropout on embeddings, sub-layer outputs, MLP hidden and attention.
    activations: ('relu',) for v1.0; ('gelu_tanh', 'linear') for v1.1's gated GELU.
    tie_word_embeddings: True (v1.0): logits = embedding.attend(x * d_model**-0.5);
      False (v1.1): a separate, unscaled `logits_dense` projection.
    layer_norm_eps: RMSNorm epsilon.
    pad_token_id, eos_token_id, decoder_start_token_id: special ids.
    dtype: computation dtype; parameters are always float32.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  activations: tuple[str, ...] = ("relu",)
  tie_word_embeddings: bool = True
  layer_norm_eps: float = 1e-6
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: Any = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "T5Config"))
    object.__setattr__(self, "activations", tuple(self.activations))
    for act in self.activations:  # fails early on a misspelt name
      if act not in ACTIVATION_NAMES:
        raise ValueError(f"T5Config: unknown activation {act!r}; choose one of "
                         f"{list(ACTIVATION_NAMES)}")

  @classmethod
  def preset(cls, name: str, **overrides) -> "T5Config":
    """A named size ('t5_v1_0_small', 't5_v1_1_base', ..., '*_tiny') with fields overridden."""
    if name not in T5_PRESETS:
      raise ValueError(f"unknown T5 preset {name!r}; choose one of {list(T5_PRESETS)}")
    d_model, d_ff, heads, num_layers, family = T5_PRESETS[name]
    fields = dict(family, d_model=d_model, d_ff=d_ff, num_heads=heads,
                  d_kv=16 if name.endswith("tiny") else 64,
                  num_encoder_layers=num_layers, num_decoder_layers=num_layers)
    fields.update(overrides)
    return cls.from_dict(fields)

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    """Builds a config from a mapping (e.g. `config.model`); unknown keys are an error."""
    return config_from_dict(cls, d)


# --------------------------------------------------------------- ModernBERT


# name: (num_layers, hidden_size, num_heads, intermediate_size: the GLU width,
# i.e. each half of Hugging Face's Wi, which is hidden -> 2 x this).
MODERNBERT_PRESETS = {
    "tiny": (2, 64, 4, 96),
    "base": (22, 768, 12, 1152),
    "large": (28, 1024, 16, 2624),
}
_MODERNBERT_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
CLASSIFIER_POOLING = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
  """Hyperparameters of a ModernBERT encoder (Warner et al. 2024).

  Pre-norm layers with rotary positions (no position table), a GeGLU MLP, no
  biases by default, and attention alternating between global layers (every
  `global_attn_every_n_layers`-th, from layer 0) and sliding-window layers.
  Field meanings follow Hugging Face's ModernBertConfig.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads: sizes.
    intermediate_size: the GLU width: the MLP projects hidden -> 2 x this
      (input and gate halves) and back from this.
    hidden_act: the GLU's activation ('gelu': exact erf, Hugging Face's 'gelu').
    norm_eps: LayerNorm epsilon. norm_bias: LayerNorms have a bias.
    attention_bias, mlp_bias: biases on the q/k/v/out and MLP projections.
    classifier_bias: bias on the heads' dense (MLM and task heads).
    decoder_bias: bias on the tied MLM output.
    global_rope_theta, local_rope_theta: rotary base of global / local layers.
    local_attention: the sliding window's total width: a token attends to
      tokens at most local_attention // 2 positions away (either side).
    global_attn_every_n_layers: layer i is global when i % n == 0.
    max_position_embeddings: longest input (rotary has no table; a limit only).
    embedding_dropout, attention_dropout, mlp_dropout, classifier_dropout:
      dropout after the embedding norm; on attention probabilities and the
      attention output; on the GLU's hidden layer; before task classifiers.
    pad_token_id: padding token when neither a mask nor segment ids are given.
    classifier_pooling: 'cls' (first token) or 'mean' (over real tokens).
    classifier_activation: the heads' activation.
    remat: recompute each layer in the backward pass.
    dtype: computation dtype; parameters are always float32.
  """
  vocab_size: int = 50368
  hidden_size: int = 768
  num_layers: int = 22
  num_heads: int = 12
  intermediate_size: int = 1152
  hidden_act: str = "gelu"
  norm_eps: float = 1e-5
  norm_bias: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  classifier_bias: bool = False
  decoder_bias: bool = True
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 10_000.0
  local_attention: int = 128
  global_attn_every_n_layers: int = 3
  max_position_embeddings: int = 8192
  embedding_dropout: float = 0.0
  attention_dropout: float = 0.0
  mlp_dropout: float = 0.0
  classifier_dropout: float = 0.0
  pad_token_id: int = 0
  classifier_pooling: str = "cls"
  classifier_activation: str = "gelu"
  remat: bool = False
  dtype: Any = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "ModernBertConfig"))
    bad = lambda field, why: ValueError(
        f"ModernBertConfig.{field}: {why}, got {getattr(self, field)!r}")
    # vocab_size 0 in a train config means "the tokenizer's size", filled in at start-up.
    if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
      raise bad("vocab_size", "must be a positive integer (0: the tokenizer's size)")
    for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "local_attention", "global_attn_every_n_layers", "max_position_embeddings"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise bad(field, "must be a positive integer")
    if self.hidden_size % self.num_heads or self.head_dim % 2:
      raise bad("num_heads", f"must divide hidden_size {self.hidden_size} into heads of an "
                "even width (rotary)")
    for field in ("hidden_act", "classifier_activation"):
      if getattr(self, field) not in _MODERNBERT_ACTIVATIONS:
        raise bad(field, f"choose one of {list(_MODERNBERT_ACTIVATIONS)}")
    if self.classifier_pooling not in CLASSIFIER_POOLING:
      raise bad("classifier_pooling", f"choose one of {list(CLASSIFIER_POOLING)}")
    for field in ("embedding_dropout", "attention_dropout", "mlp_dropout", "classifier_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise bad(field, "must be in [0, 1)")
    for field in ("norm_eps", "global_rope_theta", "local_rope_theta"):
      if not getattr(self, field) > 0:
        raise bad(field, "must be > 0")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def is_global(self, layer: int) -> bool:
    """Whether layer `layer` attends globally (else within the sliding window)."""
    return layer % self.global_attn_every_n_layers == 0

  @classmethod
  def preset(cls, name: str, **overrides) -> "ModernBertConfig":
    """A named size (tiny, base, large) with fields overridden."""
    if name not in MODERNBERT_PRESETS:
      raise ValueError(f"unknown ModernBERT preset {name!r}; choose one of "
                       f"{list(MODERNBERT_PRESETS)}")
    num_layers, hidden, heads, glu = MODERNBERT_PRESETS[name]
    fields = dict(num_layers=num_layers, hidden_size=hidden, num_heads=heads,
                  intermediate_size=glu)
    if name == "tiny":
      fields.update(vocab_size=512, local_attention=16, max_position_embeddings=512)
    fields.update(overrides)
    return cls.from_dict(fields)

  @classmethod
  def from_dict(cls, d: dict) -> "ModernBertConfig":
    """Builds a config from a mapping (e.g. `config.model`); unknown keys are an error."""
    return config_from_dict(cls, d)
