"""bert_jax: BERT-family encoders and T5 encoder-decoders in JAX/Flax.

The package root re-exports the entry points most users need; everything else
lives in its own module (see README.md for the layout).
"""
from bert_jax.convert import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
