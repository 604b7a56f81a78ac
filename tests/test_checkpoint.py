"""Checkpointer: round trips on a mesh, keep/every_steps, resharding, damaged and
unfinished checkpoints, SIGTERM, and the errors of a bad directory or config.

The tiny BERT state is created once per module (one compile per mesh); the
tests that only need the file-level behaviour use a two-array pytree.
"""
import glob
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bert_jax import checkpoint
from bert_jax import optim
from bert_jax import sharding
from bert_jax import steps
from bert_jax.models import bert

FAST_COMPILE = {"xla_backend_optimization_level": 0}
BATCH = {
    "encoder_input_tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32),
    "encoder_type_ids": jax.ShapeDtypeStruct((8, 16), jnp.int32),
    "encoder_segment_ids": jax.ShapeDtypeStruct((8, 16), jnp.int32),
    "mlm_positions": jax.ShapeDtypeStruct((8, 4), jnp.int32),
}


def _bert_state(mesh_shape, preset, seed):
  """(state, shardings) of tiny BERT + AdamW created sharded on a mesh."""
  model = bert.build(bert.BertConfig.preset("tiny", vocab_size=128, max_position_embeddings=16),
                     "pretraining")
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-3, schedule="constant", warmup_steps=0),
                               steps.param_shapes(model, BATCH))
  mesh = sharding.make_mesh(*mesh_shape)
  return steps.create_sharded_state(model, tx, BATCH, mesh, sharding.get_rules(preset),
                                    rng=seed, compiler_options=FAST_COMPILE)


def _abstract(shardings, like):
  """ShapeDtypeStructs of `like` carrying the given (target) shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      like, shardings)


def _assert_same_values(got, want):
  for path_leaf, w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    path, g = path_leaf
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                  err_msg=jax.tree_util.keystr(path))


def _assert_shardings(tree, shardings):
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def _small_state(scale):
  """A two-array pytree, different for every `scale`."""
  return {"w": jnp.arange(16, dtype=jnp.float32).reshape(4, 4) * scale,
          "step": jnp.asarray(scale, jnp.int32)}


def _small_abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _small_state(1))


@pytest.fixture(scope="module")
def fsdp_state():
  """Tiny BERT TrainState on the (2, 4, 1) fsdp mesh."""
  return _bert_state((2, 4, 1), "fsdp", seed=0)


def test_round_trip_on_fsdp_mesh(tmp_path, fsdp_state):
  state, shardings = fsdp_state
  # A config with a tuple and a nested dict: stored as JSON, read back as lists.
  config = ml_collections.ConfigDict({"optim": {"learning_rate": 1e-3, "no_decay": ("bias",)},
                                      "seed": 7})
  position = {"epoch": 1, "index": 12345, "hosts": [3, 4]}
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=5, keep=3)
  assert ckpt.latest_step() is None
  assert ckpt.restore(_abstract(shardings, state)) is None
  assert ckpt.save(5, state, data_position=position, config=config)
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [5]

  restored = ckpt.restore(_abstract(shardings, state))
  ckpt.close()
  assert restored.step == 5
  assert isinstance(restored.state, steps.TrainState)
  _assert_same_values(restored.state, state)
  _assert_shardings(restored.state, shardings)
  # The fsdp preset really split something across the 4-way fsdp axis.
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(restored.state.params))
  assert restored.data_position == position
  assert restored.config == {"optim": {"learning_rate": 1e-3, "no_decay": ["bias"]}, "seed": 7}


def test_restore_onto_another_mesh_shape(tmp_path, fsdp_state):
  state, _ = fsdp_state
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1)
  ckpt.save(3, state, data_position=None, config=None)
  ckpt.close()

  # Different init seed: the values can only match the saved ones if restored.
  other, other_shardings = _bert_state((1, 2, 4), "fsdp_tensor", seed=1)
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(state)))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1)
  restored = ckpt.restore(_abstract(other_shardings, other))
  ckpt.close()
  assert restored.step == 3 and restored.data_position is None and restored.config is None
  _assert_same_values(restored.state, state)
  _assert_shardings(restored.state, other_shardings)
  assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(restored.state.params))


def test_async_saves_keep_the_newest(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=2, async_save=True)
  assert not ckpt.save(15, _small_state(15), data_position=None, config=None)
  for step in (10, 20, 30, 40):
    assert ckpt.save(step, _small_state(step), data_position={"i": step}, config={})
  assert ckpt.save(45, _small_state(45), data_position={"i": 45}, config={}, force=True)
  # The same step again is skipped, never overwritten.
  assert not ckpt.save(45, _small_state(0), data_position={"i": 0}, config={}, force=True)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["40", "45"]

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=2)
  assert ckpt.all_steps() == [40, 45] and ckpt.latest_step() == 45
  restored = ckpt.restore(_small_abstract())
  ckpt.close()
  assert restored.step == 45 and restored.data_position == {"i": 45}
  _assert_same_values(restored.state, _small_state(45))


def _two_checkpoints(directory):
  ckpt = checkpoint.Checkpointer(directory, every_steps=10, keep=5)
  for step in (10, 20):
    ckpt.save(step, _small_state(step), data_position={"i": step}, config=None)
  ckpt.close()


def test_corrupt_latest_falls_back(tmp_path, caplog):
  _two_checkpoints(tmp_path)
  # A truncated write: every data file of step 20 cut to 10 bytes.
  files = glob.glob(str(tmp_path / "20" / "state" / "d" / "*"))
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(10)

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(_small_abstract())
  assert restored.step == 10 and restored.data_position == {"i": 10}
  _assert_same_values(restored.state, _small_state(10))
  assert any("step 20" in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records)
  # Moved aside, so the resumed run can write its own step 20.
  assert ckpt.all_steps() == [10]
  assert any(name.startswith("20.unreadable-") for name in os.listdir(tmp_path))
  assert ckpt.save(20, _small_state(21), data_position={"i": 21}, config=None)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5)
  assert ckpt.restore(_small_abstract()).data_position == {"i": 21}
  ckpt.close()


def test_every_checkpoint_corrupt_raises(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ("10", "20"):
    os.remove(tmp_path / step / "state" / "manifest.ocdbt")
    shutil.rmtree(tmp_path / step / "state" / "ocdbt.process_0")
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5)
  with pytest.raises(RuntimeError, match=r"(?s)step 20: .*step 10: "):
    ckpt.restore(_small_abstract())
  ckpt.close()
  # Nothing is moved when the run cannot go on: the files stay for a look.
  assert sorted(os.listdir(tmp_path)) == ["10", "20"]


def test_unfinished_saves_are_ignored(tmp_path, caplog):
  _two_checkpoints(tmp_path)
  # Killed mid-write on a local disk: orbax's tmp folder, never renamed.
  shutil.copytree(tmp_path / "20", tmp_path / "30.orbax-checkpoint-tmp-1700000000")
  # Killed mid-write on GCS: the final name, but no commit marker yet.
  shutil.copytree(tmp_path / "20", tmp_path / "40")
  os.remove(tmp_path / "40" / checkpoint.COMMIT_MARKER)

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5)
  assert ckpt.latest_step() == 20 and ckpt.all_steps() == [10, 20]
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(_small_abstract())
  assert restored.step == 20
  _assert_same_values(restored.state, _small_state(20))
  assert any("step 40" in r.getMessage() for r in caplog.records)
  # The resumed run saves steps 30 and 40 anew.
  assert ckpt.save(30, _small_state(30), data_position={"i": 30}, config=None)
  assert ckpt.save(40, _small_state(40), data_position={"i": 40}, config=None)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5)
  assert ckpt.all_steps() == [10, 20, 30, 40]
  assert ckpt.restore(_small_abstract()).data_position == {"i": 40}
  ckpt.close()
  assert not any("orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))


def test_sigterm_requests_preemption(tmp_path):
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
  try:
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=1)
    assert not ckpt.preemption_requested(7)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.preemption_requested(7)
    assert calls == [signal.SIGTERM]  # the earlier handler still heard it
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is not ckpt._on_sigterm
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM] * 2
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_unwritable_directory_names_the_path(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(OSError, match="a_file/ckpt"):
    checkpoint.Checkpointer(blocker / "ckpt", every_steps=1, keep=1)


@pytest.mark.parametrize("kwargs, key", [
    (dict(every_steps=0, keep=1), "checkpoint.every_steps"),
    (dict(every_steps=2.5, keep=1), "checkpoint.every_steps"),
    (dict(every_steps=1, keep=0), "checkpoint.keep"),
])
def test_bad_settings_name_the_key(tmp_path, kwargs, key):
  with pytest.raises(ValueError, match=key):
    checkpoint.Checkpointer(tmp_path, **kwargs)
