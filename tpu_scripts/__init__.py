"""Cloud TPU VM scripts for bert_jax: create, set up, launch, watch, recover, delete.

Standard library only, so they run on a laptop without JAX. Entry point:
`python tpu_scripts/tpu.py COMMAND [--flags]`; see tpu_scripts/README.md.
"""
