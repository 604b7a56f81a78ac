"""bert_jax: BERT-family encoders and T5 encoder-decoders in JAX/Flax.

The package root re-exports the entry points most users need; everything else
lives in its own module (see README.md for the layout). The re-exports load
on first use (PEP 562), so that `bert_jax.defaults` and the config files
import neither JAX nor TensorFlow.
"""
import importlib

__all__ = ["from_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return getattr(importlib.import_module("bert_jax.convert"), name)
  raise AttributeError(f"module 'bert_jax' has no attribute {name!r}")
