"""TensorFlow for the host side only: input pipelines, tokenisers, summaries.

Every bert_jax module takes TensorFlow from here (`from bert_jax.host_tf
import tf`, and tensorflow_datasets from `datasets()`), never with a plain
`import tensorflow`. Importing this module hides the accelerators from
TensorFlow before any TensorFlow op can run, as big_vision's trainer does
first thing: a TensorFlow that sees a GPU claims
nearly all of its memory on the first op (its default allocator grows to the
whole card) and leaves JAX to run out. tf.data, tf.text and the summary
writer need only the CPU.

The hiding must come before TensorFlow initialises its devices. When
something else ran a TensorFlow op first and TensorFlow already holds an
accelerator, that cannot be undone: a warning says so, and what to change.
"""
import logging

import tensorflow as tf

# Device types TensorFlow could take from JAX. A type with no device here is a
# no-op, so this is safe on CPU-only hosts and on TPU VMs alike.
ACCELERATOR_TYPES = ("GPU", "TPU")


def hide_accelerators(config=None) -> list[str]:
  """Makes TensorFlow see no accelerator; returns the ones it still sees.

  Args:
    config: `tf.config` (a stand-in in tests).

  Returns:
    Names of accelerator devices TensorFlow could not be kept from, because
    it had initialised them before this ran (empty when all went well).
  """
  config = config or tf.config
  still_visible = []
  for device_type in ACCELERATOR_TYPES:
    if not config.list_physical_devices(device_type):
      continue
    try:
      config.set_visible_devices([], device_type)
    except RuntimeError:  # "Visible devices cannot be modified after being initialized"
      still_visible += [d.name for d in config.get_visible_devices(device_type)]
  if still_visible:
    logging.warning(
        "TensorFlow initialised %s before bert_jax could hide it, and may hold accelerator "
        "memory that JAX needs; import bert_jax (or call "
        "tf.config.set_visible_devices([], 'GPU')) before running any TensorFlow op.",
        ", ".join(still_visible))
  return still_visible


hide_accelerators()


def datasets():
  """tensorflow_datasets, imported on first use (a heavy import), after the hiding above."""
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel
  return tensorflow_datasets
