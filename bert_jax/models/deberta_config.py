"""DeBERTa-v2/v3 hyperparameters (He et al. 2021, 2023), importable without JAX.

Field meanings follow Hugging Face's DebertaV2Config, with bert_jax's names
for the common sizes (num_layers, num_heads, ...). The defaults are
DeBERTa-v3-base's: relative attention only (no absolute position table),
c2p and p2c terms, 256 log-spaced position buckets over +-512, position
projections shared with the content ones, LayerNorm on the relative table.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bert_jax.models.configs import ACTIVATION_NAMES, as_dtype, config_from_dict

# name: (layers, hidden, heads, ffn). small/base/large: the DeBERTa-v3 paper's sizes.
DEBERTA_PRESETS = {
    "tiny": (2, 128, 2, 512),
    "small": (6, 768, 12, 3072),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
POS_ATT_TYPES = ("c2p", "p2c")
NORM_REL_EBD = ("none", "layer_norm")
# The ConvLayer's activations: the FFN's, plus tanh (Hugging Face's default conv_act).
CONV_ACTIVATIONS = ACTIVATION_NAMES + ("tanh",)
# How the 'electra' task's discriminator shares the generator's embedding tables.
EMBEDDING_SHARING = ("tied", "gdes")


@dataclasses.dataclass(frozen=True)
class DebertaConfig:
  """Hyperparameters of a DeBERTa-v2/v3 encoder.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: sizes.
    hidden_act: the FFN's (and the MLM head's) activation.
    hidden_dropout: after the embeddings, on the relative table, on each
      sub-block's output (and before the token classifier).
    attention_dropout: on the attention probabilities.
    max_position_embeddings: the absolute table's rows (with
      position_biased_input) and the default relative range; inputs longer
      than it are refused.
    type_vocab_size: token-type rows (0: none, as DeBERTa-v3).
    layer_norm_eps: every LayerNorm's epsilon (1e-7 in the released models).
    relative_attention: add the disentangled c2p / p2c terms.
    max_relative_positions: the relative range (<1: max_position_embeddings).
    position_buckets: log buckets of relative distance (<=0: none, the range
      itself); the relative table has 2 x this many rows.
    pos_att_type: which disentangled terms: any of 'c2p', 'p2c'.
    share_att_key: the relative table is projected by the content query/key
      projections (v3) instead of separate pos_query / pos_key ones (v2).
    norm_rel_ebd: 'layer_norm' normalises the relative table (v3), 'none' not.
    position_biased_input: add an absolute position table to the input (v1
      style; False in v2/v3).
    conv_kernel_size: DeBERTa-v2's ConvLayer after the first layer (0: none;
      3 in the v2 xlarge / xxlarge checkpoints): a 1-D convolution over the
      embeddings, masked, activated, added to layer 0's output and
      LayerNormed. Odd only: Hugging Face pads (k - 1) // 2 on each side.
    conv_groups: the convolution's channel groups (must divide hidden_size).
    conv_act: the convolution's activation ('tanh', HF's default, or one of
      hidden_act's; the v2 xlarge / xxlarge checkpoints use 'gelu').
    pooler_hidden_act, pooler_dropout: the sequence classifier's pooler
      (dense over the first token, activation) and the dropout before it.
    classifier_dropout: before the sequence classifier (HF's cls_dropout).
    pad_token_id: padding token when neither a mask nor segment ids are given.
    enhanced_mask_decoder: the MLM head reads the enhanced mask decoder (EMD,
      DeBERTa's pretraining head): absolute position embeddings added to the
      last layer's input, which queries it again through the last layer
      (twice). Adds an absolute position table even without
      position_biased_input. Off for Hugging Face import / export parity
      (DebertaV2ForMaskedLM has no EMD); on in configs/deberta_v3.py.
    embedding_sharing: the 'electra' task (DeBERTa-v3's replaced-token
      detection): 'gdes' (gradient-disentangled: the discriminator's tables
      are stop_gradient(generator's) + its own zero-initialised deltas) or
      'tied' (one table, trained by both losses, as ELECTRA). Other tasks
      ignore it.
    generator_layers: the 'electra' task's generator depth (0: half of
      num_layers, DeBERTa-v3's rtd_*.json); it keeps the discriminator's width.
    remat: recompute each layer in the backward pass.
    dtype: computation dtype; parameters are always float32.
  """
  vocab_size: int = 128100
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  relative_attention: bool = True
  max_relative_positions: int = -1
  position_buckets: int = 256
  pos_att_type: tuple[str, ...] = ("p2c", "c2p")
  share_att_key: bool = True
  norm_rel_ebd: str = "layer_norm"
  position_biased_input: bool = False
  conv_kernel_size: int = 0
  conv_groups: int = 1
  conv_act: str = "tanh"
  pooler_hidden_act: str = "gelu"
  pooler_dropout: float = 0.0
  classifier_dropout: float = 0.1
  pad_token_id: int = 0
  enhanced_mask_decoder: bool = False
  embedding_sharing: str = "gdes"
  generator_layers: int = 0
  remat: bool = False
  dtype: Any = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "DebertaConfig"))
    types = self.pos_att_type
    if isinstance(types, str):  # HF's older 'p2c|c2p' spelling
      types = [t.strip() for t in types.lower().split("|") if t.strip()]
    object.__setattr__(self, "pos_att_type", tuple(types or ()))
    bad = lambda field, why: ValueError(
        f"DebertaConfig.{field}: {why}, got {getattr(self, field)!r}")
    # vocab_size 0 in a train config means "the tokenizer's size", filled in at start-up.
    if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
      raise bad("vocab_size", "must be a positive integer (0: the tokenizer's size)")
    for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise bad(field, "must be a positive integer")
    if self.hidden_size % self.num_heads:
      raise bad("num_heads", f"must divide hidden_size {self.hidden_size}")
    unknown = [t for t in self.pos_att_type if t not in POS_ATT_TYPES]
    if unknown or len(set(self.pos_att_type)) != len(self.pos_att_type):
      raise bad("pos_att_type", f"must be distinct values of {list(POS_ATT_TYPES)}")
    if self.embedding_sharing not in EMBEDDING_SHARING:
      raise bad("embedding_sharing", f"choose one of {list(EMBEDDING_SHARING)}")
    if not isinstance(self.generator_layers, int) or not (
        0 <= self.generator_layers <= self.num_layers):
      raise bad("generator_layers", f"must be in [0, num_layers={self.num_layers}] (0: half)")
    if self.norm_rel_ebd not in NORM_REL_EBD:
      raise bad("norm_rel_ebd", f"choose one of {list(NORM_REL_EBD)}")
    if not isinstance(self.conv_kernel_size, int) or self.conv_kernel_size < 0 or (
        self.conv_kernel_size % 2 == 0 and self.conv_kernel_size):
      raise bad("conv_kernel_size", "must be 0 (no ConvLayer) or odd (padding (k - 1) // 2 "
                "keeps the length only for odd k)")
    if not isinstance(self.conv_groups, int) or self.conv_groups < 1 or (
        self.hidden_size % self.conv_groups):
      raise bad("conv_groups", f"must be a positive divisor of hidden_size {self.hidden_size}")
    if self.conv_act not in CONV_ACTIVATIONS:
      raise bad("conv_act", f"choose one of {list(CONV_ACTIVATIONS)}")
    for field in ("hidden_act", "pooler_hidden_act"):
      if getattr(self, field) not in ACTIVATION_NAMES:
        raise bad(field, f"choose one of {list(ACTIVATION_NAMES)}")
    for field in ("hidden_dropout", "attention_dropout", "pooler_dropout", "classifier_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise bad(field, "must be in [0, 1)")
    if not self.layer_norm_eps > 0:
      raise bad("layer_norm_eps", "must be > 0")
    if self.type_vocab_size < 0:
      raise bad("type_vocab_size", "must be >= 0")
    # Log buckets span distances mid .. range - 1 (mid = buckets // 2): a wider range is needed.
    if (self.relative_attention and self.position_buckets > 0
        and self.relative_range - 1 <= self.position_buckets // 2):
      raise bad("position_buckets", f"must be < 2 x (the relative range {self.relative_range} - 1)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def has_position_table(self) -> bool:
    """An absolute position table exists: added to the input, or read by the EMD."""
    return self.position_biased_input or self.enhanced_mask_decoder

  @property
  def relative_range(self) -> int:
    """max_relative_positions, with <1 meaning max_position_embeddings (as HF)."""
    if self.max_relative_positions < 1:
      return self.max_position_embeddings
    return self.max_relative_positions

  @property
  def attention_span(self) -> int:
    """Half the relative table's rows: the buckets, or the range without bucketing."""
    return self.position_buckets if self.position_buckets > 0 else self.relative_range

  @property
  def scale_factor(self) -> int:
    """Logits are divided by sqrt(head_dim x this): 1 + the number of position terms."""
    return 1 + (len(self.pos_att_type) if self.relative_attention else 0)

  def generator(self) -> "DebertaConfig":
    """The 'electra' task's generator: generator_layers deep (0: half), same width."""
    depth = self.generator_layers or max(1, self.num_layers // 2)
    return dataclasses.replace(self, num_layers=depth)

  @classmethod
  def preset(cls, name: str, **overrides) -> "DebertaConfig":
    """A named size (tiny, small, base, large) with fields overridden."""
    if name not in DEBERTA_PRESETS:
      raise ValueError(f"unknown DeBERTa preset {name!r}; choose one of "
                       f"{list(DEBERTA_PRESETS)}")
    num_layers, hidden, heads, ffn = DEBERTA_PRESETS[name]
    fields = dict(num_layers=num_layers, hidden_size=hidden, num_heads=heads,
                  intermediate_size=ffn)
    if name == "tiny":
      fields.update(vocab_size=512, max_position_embeddings=128, position_buckets=32)
    fields.update(overrides)
    return cls.from_dict(fields)

  @classmethod
  def from_dict(cls, d: dict) -> "DebertaConfig":
    """Builds a config from a mapping (e.g. `config.model`); unknown keys are an error."""
    return config_from_dict(cls, d)
