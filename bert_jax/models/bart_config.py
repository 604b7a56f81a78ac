"""Hyperparameters of the BART family (Lewis et al. 2019), importable without JAX.

Field meanings follow Hugging Face's BartConfig (and fairseq's
bart_base / bart_large architectures); the flax modules are in bart.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bert_jax.models.configs import ACTIVATION_NAMES, as_dtype, config_from_dict

# name: (encoder layers, decoder layers, d_model, heads, FFN width, vocabulary).
# base / large are the paper's sizes (fairseq bart.base / bart.large, 50,265
# byte-level BPE pieces); tiny serves tests and the quick start.
BART_PRESETS = {
    "tiny": (2, 2, 64, 4, 128, 50265),
    "base": (6, 6, 768, 12, 3072, 50265),
    "large": (12, 12, 1024, 16, 4096, 50265),
}


@dataclasses.dataclass(frozen=True)
class BartConfig:
  """Hyperparameters of a BART encoder-decoder.

  Attributes:
    vocab_size: rows of the shared token embedding (tied to the output logits).
    d_model: width of both stacks.
    num_encoder_layers, num_decoder_layers: depth of each stack.
    encoder_attention_heads, decoder_attention_heads: heads (head width d_model / heads).
    encoder_ffn_dim, decoder_ffn_dim: MLP widths.
    max_position_embeddings: positions a sequence may have; the learned table
      has 2 more rows (fairseq reserved rows 0..1 for padding, so position p
      reads row p + 2).
    activation: the MLP's activation (BART: 'gelu', the exact erf form).
    dropout_rate: on the embeddings and every sub-layer output.
    attention_dropout: on the attention probabilities.
    activation_dropout: on the MLP's hidden activations.
    classifier_dropout: before and inside the sequence-classification head.
    scale_embedding: multiply token embeddings by sqrt(d_model) (mBART-style; BART: False).
    layer_norm_eps: LayerNorm epsilon (torch's default 1e-5).
    pad_token_id, bos_token_id, eos_token_id: the RoBERTa BPE vocabulary's
      <pad>=1, <s>=0, </s>=2; the encoder masks pad_token_id.
    decoder_start_token_id: the decoder's first input (BART: </s>).
    dtype: computation dtype; parameters are always float32.
  """
  vocab_size: int = 50265
  d_model: int = 768
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  encoder_attention_heads: int = 12
  decoder_attention_heads: int = 12
  encoder_ffn_dim: int = 3072
  decoder_ffn_dim: int = 3072
  max_position_embeddings: int = 1024
  activation: str = "gelu"
  dropout_rate: float = 0.1
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  classifier_dropout: float = 0.0
  scale_embedding: bool = False
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 0
  eos_token_id: int = 2
  decoder_start_token_id: int = 2
  dtype: Any = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "BartConfig"))
    if self.activation not in ACTIVATION_NAMES:
      raise ValueError(f"BartConfig.activation: unknown {self.activation!r}; choose one of "
                       f"{list(ACTIVATION_NAMES)}")
    for stack in ("encoder", "decoder"):
      heads = getattr(self, f"{stack}_attention_heads")
      if heads <= 0 or self.d_model % heads:
        raise ValueError(f"BartConfig.{stack}_attention_heads: {heads} does not divide "
                         f"d_model={self.d_model}")
    if self.vocab_size < 0 or self.max_position_embeddings <= 0:
      raise ValueError(f"BartConfig: vocab_size ({self.vocab_size}) must be >= 0 and "
                       f"max_position_embeddings ({self.max_position_embeddings}) > 0")

  @property
  def encoder_head_dim(self) -> int:
    return self.d_model // self.encoder_attention_heads

  @property
  def decoder_head_dim(self) -> int:
    return self.d_model // self.decoder_attention_heads

  @classmethod
  def preset(cls, name: str, **overrides) -> "BartConfig":
    """A named size ('tiny', 'base', 'large') with fields overridden."""
    if name not in BART_PRESETS:
      raise ValueError(f"unknown BART preset {name!r}; choose one of {list(BART_PRESETS)}")
    enc, dec, d_model, heads, ffn, vocab = BART_PRESETS[name]
    fields = dict(vocab_size=vocab, d_model=d_model, num_encoder_layers=enc,
                  num_decoder_layers=dec, encoder_attention_heads=heads,
                  decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)
    fields.update(overrides)
    return cls.from_dict(fields)

  @classmethod
  def from_dict(cls, d: dict) -> "BartConfig":
    """Builds a config from a mapping (e.g. `config.model`); unknown keys are an error."""
    return config_from_dict(cls, d)
