"""bert_jax.models.threefry: jax.random.bits' exact words, from a fusable hash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.models import layers
from bert_jax.models import threefry

KEYS = {
    "raw": lambda: jax.random.PRNGKey(3),
    "typed": lambda: jax.random.key(11),
    "folded": lambda: jax.random.fold_in(jax.random.PRNGKey(7), 5),  # the trainer's dropout key
}


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 4), (2, 3, 65), (4, 12, 16, 64)])
def test_words_equal_jax_random_bits(kind, shape):
  """Same key, same shape: the same uint32 words as jax.random.bits (masks of earlier runs
  and checkpoints resume unchanged)."""
  key = KEYS[kind]()
  ours = jax.jit(threefry.bits32, static_argnums=1)(key, shape)
  assert ours.dtype == jnp.uint32 and ours.shape == shape
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.bits(key, shape)))


def test_other_generators_and_scalars_go_to_jax():
  """An rbg key is not threefry: its words are jax.random.bits' own, not the hash's."""
  key = jax.random.key(2, impl="rbg")
  words = threefry.bits32(key, (8, 16))
  np.testing.assert_array_equal(np.asarray(words), np.asarray(jax.random.bits(key, (8, 16))))
  data = jax.random.key_data(key)[:2]
  hashed = threefry.bits32(data, (8, 16))  # the same 64 bits read as a threefry key
  assert (np.asarray(words) != np.asarray(hashed)).any()
  np.testing.assert_array_equal(np.asarray(threefry.bits32(jax.random.key(4), ())),
                                np.asarray(jax.random.bits(jax.random.key(4), ())))


def test_words_are_the_same_when_the_array_is_sharded():
  """Each of 8 devices hashes its own slice of the index: the words equal unsharded ones."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  shape = (16, 6, 10)
  sharded = jax.jit(threefry.bits32, static_argnums=1, out_shardings=spec)(
      jax.random.key(9), shape)
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(sharded),
                                np.asarray(jax.random.bits(jax.random.key(9), shape)))


def test_a_cpu_dropout_mask_compiles_without_a_loop():
  """The reason for the module: jax's CPU threefry is a rolled loop XLA cannot fuse."""
  mask = jax.jit(lambda key: layers.keep_mask(key, 0.1, (8, 12, 128, 128))[0])
  hlo = mask.lower(jax.random.PRNGKey(0)).compile().as_text()
  assert " while(" not in hlo and "while" not in hlo.split("ENTRY")[-1]
