"""Checkpointer: round trips on a mesh, keep/every_steps, resharding, damaged and
unfinished checkpoints, the preemption step of two processes, and the errors of a bad directory or config.

The tiny BERT state is created once per module (one compile per mesh); the
tests that only need the file-level behaviour use a two-array pytree.
"""
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bert_jax import checkpoint
from bert_jax import loop
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


def _bert_setup(mesh_shape, preset):
  """(model, tx, mesh, rules) of tiny BERT + AdamW on a mesh."""
  # Narrower than the tiny preset: XLA:CPU compiles (init, orbax's shard
  # slices) dominate the time; two layers keep the per-layer tree structure.
  config = bert.BertConfig.preset("tiny", vocab_size=128, max_position_embeddings=16,
                                  hidden_size=32, num_heads=2, intermediate_size=64)
  model = bert.build(config, "pretraining")
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-3, schedule="constant", warmup_steps=0),
                               steps.param_shapes(model, BATCH))
  return model, tx, sharding.make_mesh(*mesh_shape), sharding.get_rules(preset)


def _bert_state(mesh_shape, preset, seed):
  """(state, shardings) of tiny BERT + AdamW created sharded on a mesh."""
  model, tx, mesh, rules = _bert_setup(mesh_shape, preset)
  return steps.create_sharded_state(model, tx, BATCH, mesh, rules, rng=seed,
                                    compiler_options=FAST_COMPILE)


def _bert_abstract(mesh_shape, preset):
  """(abstract state, shardings) as a resuming trainer gets them: nothing compiled.

  eval_shape traces the sharded init without running it; the shardings are
  plain Python values computed while tracing, so they are taken from there.
  """
  model, tx, mesh, rules = _bert_setup(mesh_shape, preset)
  found = {}

  def init():
    state, found["shardings"] = steps.create_sharded_state(model, tx, BATCH, mesh, rules, 0)
    return state

  shapes = jax.eval_shape(init)
  return _abstract(found["shardings"], shapes), found["shardings"]


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

  target, other_shardings = _bert_abstract((1, 2, 4), "fsdp_tensor")
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1)
  restored = ckpt.restore(target)
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


def _fallback_worker(directory: str) -> None:
  """Saves steps 10 and 20 of a 64-array state, truncates step 20, restores.

  Many arrays, because the flood this guards against came from the reads
  still in flight when the first one failed (about one traceback per array).
  Logs at INFO to stderr; prints the restored step.
  """
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)

  def state(scale):
    return {f"w{i}": jnp.full((4, 4), scale + i, jnp.float32) for i in range(64)}

  ckpt = checkpoint.Checkpointer(directory, every_steps=10, keep=5)
  for step in (10, 20):
    ckpt.save(step, state(step), data_position={"i": step}, config=None)
  ckpt.close()
  for name in glob.glob(os.path.join(directory, "20", "state", "d", "*")):
    with open(name, "r+b") as f:
      f.truncate(10)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state(0))
  ckpt = checkpoint.Checkpointer(directory, every_steps=10, keep=5)
  restored = ckpt.restore(abstract)
  ckpt.close()
  # Read back after close: any late callback of the failed restore came before.
  print(f"RESULT step={restored.step} "
        f"same={bool(np.all(np.asarray(restored.state['w3']) == 13))}", flush=True)


def test_corrupt_latest_fallback_logs_one_warning_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, __file__, "fallback", str(tmp_path / "ckpt")],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RESULT step=10 same=True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
  # orbax's restore used to close its event loop with reads in flight: one
  # "RuntimeError: Event loop is closed" traceback per array after the fallback.
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
  assert len(warnings) == 1, warnings
  # It names the step and why (the reader's error, without tensorstore's spec dump).
  assert "checkpoint step 20" in warnings[0] and "Error" in warnings[0], warnings
  assert "tensorstore_spec" not in warnings[0] and len(warnings[0]) < 700, warnings


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


# ----------------------------------------------------------- two processes


def _two_process_worker(process_id: int, port: int, directory: str) -> None:
  """One of two jax.distributed CPU processes (4 devices each, one 8-device mesh).

  Saves and restores a sharded array together, then process 0 gets a SIGTERM
  at step 3 and both must see the preemption at the SAME step. Prints one
  result line for the test to compare.
  """
  jax.distributed.initialize(f"localhost:{port}", 2, process_id,
                             heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  split, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
  values = np.arange(32, dtype=np.float32).reshape(16, 2)
  state = {"w": jax.make_array_from_callback(values.shape, split, lambda i: values[i]),
           "step": jax.device_put(np.int32(5), replicated)}
  ckpt = checkpoint.Checkpointer(directory, every_steps=5, keep=2)
  preemption = loop.Preemption()
  # No per-host Python handler: jax.distributed's preemption sync owns SIGTERM.
  handler = signal.getsignal(signal.SIGTERM) == preemption._on_sigterm
  assert ckpt.save(5, state, data_position={"pos": 5}, config={"a": 1})
  ckpt.wait_until_finished()
  abstract = {"w": jax.ShapeDtypeStruct(values.shape, np.float32, sharding=split),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}
  restored = ckpt.restore(abstract)
  same = restored.step == 5 and restored.data_position == {"pos": 5} and all(
      np.array_equal(np.asarray(s.data), values[s.index])
      for s in restored.state["w"].addressable_shards)
  preempted_at = None
  for step in range(1, 60):
    if process_id == 0 and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    if preemption.requested(step):
      preempted_at = step
      break
    time.sleep(0.1)
  ckpt.close()
  print(f"RESULT handler={handler} restored={same} preempted_at={preempted_at}", flush=True)


def test_two_processes_agree_on_preemption_step(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(i), str(port), str(tmp_path / "ckpt")], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  results = []
  for proc, out in zip(procs, outputs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    results.append(lines[-1])
  assert results[0] == results[1], results
  assert results[0].startswith("RESULT handler=False restored=True preempted_at=")
  assert int(results[0].rsplit("=", 1)[1]) >= 3  # not before the notice was sent


if __name__ == "__main__":
  if sys.argv[1] == "fallback":
    _fallback_worker(sys.argv[2])
  else:
    _two_process_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
