"""Checkpoints of the training state, the data position and the config.

One `Checkpointer` wraps an orbax `CheckpointManager`. Every checkpoint step
holds three items written together (orbax Composite args), so they can never
disagree after a crash:

  state          the TrainState (sharded arrays, StandardSave),
  data_position  where the input pipeline stands (JSON),
  config         the run's config (JSON), to see what produced the state.

Reliability rules (DESIGN.md, "Reliability stance"):
- A save never overwrites an existing step.
- An unfinished save is never read. orbax 0.12.8 writes a step into
  `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete (local
  disks), or writes `<step>/commit_success.txt` last (GCS); it writes that
  marker in both modes, so a step folder without it is unfinished.
- A step that cannot be read (truncated or deleted files) is skipped with one
  warning (the step and the reader's error) and the previous one is
  restored, with no asyncio noise after it (`_draining_event_loops`); the
  unreadable step folders are moved aside (renamed, never deleted) so the
  resumed run can save those step numbers again.
Preemption (when to save and stop) is the loop's, not the checkpointer's:
loop.Preemption, one per run.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# The marker orbax 0.12.8 writes last into every finished step folder.
COMMIT_MARKER = "commit_success.txt"
# Names of the items inside one checkpoint step.
_STATE, _DATA, _CONFIG = "state", "data_position", "config"
_UNFINISHED = f"unfinished save (no {COMMIT_MARKER})"


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore` returns.

  Attributes:
    step: the checkpoint step that was restored.
    state: the restored state, laid out on the requested shardings.
    data_position: the input pipeline position saved with it (or None).
    config: the saved config as a plain dict (tuples read back as lists),
      or None.
  """
  step: int
  state: Any
  data_position: dict | None
  config: dict | None


def _json_safe(value: Any) -> Any:
  """A JSON-serialisable copy of a config value (dicts, lists, scalars).

  Tuples become lists; numpy scalars become Python numbers; anything else
  JSON cannot hold (a dtype, a callable) is stored as its repr: the config is
  saved for the record, the run's config file stays the source of truth.
  """
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _config_dict(config: Any) -> dict | None:
  """ConfigDict (or FrozenConfigDict, or dict) -> JSON-safe dict."""
  if config is None:
    return None
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a ConfigDict or a dict, got {type(config).__name__}")
  return _json_safe(config)


def _check_writable(directory: epath.Path) -> None:
  """Creates `directory` and writes a probe file in it, or fails naming it.

  The trainer builds the Checkpointer before compiling anything, so a typo'd
  or read-only workdir fails in seconds instead of at the first save.
  """
  probe = directory / f".write_probe.{jax.process_index()}.{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # epath raises OSError subclasses, or GCS errors.
    raise OSError(
        f"checkpoint directory {os.fspath(directory)!r} cannot be created or written: "
        f"{type(e).__name__}: {e}") from e


def _short(error: Exception, limit: int = 400) -> str:
  """`Type: message`, cut to `limit` characters.

  Tensorstore errors append the whole JSON spec of the array they failed on
  (` [tensorstore_spec[1]='...']`); the reason comes before it, so it is dropped.
  """
  text = re.split(r" \[tensorstore_spec\b", f"{type(error).__name__}: {error}", maxsplit=1)[0]
  return text if len(text) <= limit else text[:limit] + " ..."


# How long closing a restore's event loop waits for its reads still in flight.
_DRAIN_SECONDS = 60.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop whose close() first lets its unfinished tasks end.

  orbax 0.12.8 runs a restore's reads with `loop.run_until_complete(gather)`
  on a fresh loop and then closes it (asyncio_utils.run_sync). When one read
  fails (a damaged checkpoint), gather raises at once and the loop is closed
  while the other tensorstore reads are still in flight; each one then
  completes into `call_soon_threadsafe` on the closed loop and Python prints
  a "RuntimeError: Event loop is closed" traceback, hundreds of lines for a
  real model. Waiting for those reads here (they end in a success or the same
  error, quickly) closes the loop only once nothing can call back into it.
  """

  def __init__(self):
    super().__init__()
    self.set_exception_handler(_quiet_exception_handler)

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        done, _ = self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
        for task in done:  # retrieved: asyncio would log each as never retrieved
          if not task.cancelled():
            task.exception()
    super().close()


def _quiet_exception_handler(loop, context) -> None:
  """Logs asyncio's leftovers of a failed restore at DEBUG, not as ERROR tracebacks.

  The restore's own exception already says what failed (it is the warning);
  the other reads of the same damaged step fail the same way.
  """
  del loop  # unused
  logging.debug("orbax restore: %s %s", context.get("message"), context.get("exception", ""))


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def _draining_event_loops():
  """Event loops created inside (by orbax's restore) drain before they close.

  A policy and not a patch of orbax: the policy is asyncio's documented hook
  for what `asyncio.new_event_loop()` returns (deprecated from Python 3.14,
  which setup.py excludes); the previous one is put back. It is process-wide
  for the duration: a restore runs before the trainer's first save, so no
  other thread is making loops then, and one that did would only drain too.
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _all_hosts_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (they must pick the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Saves and restores the training state with orbax, asynchronously.

  Attributes:
    directory: where the step folders live (local path or gs://).
    every_steps: a save happens at steps that are multiples of this.
    keep: how many of the newest checkpoints are kept.
  """

  def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: local path or gs:// URL.
      every_steps: config key checkpoint.every_steps, >= 1.
      keep: config key checkpoint.keep, >= 1: older checkpoints are deleted.
      async_save: write in a background thread once the arrays are on host.

    Raises:
      ValueError: every_steps or keep is not a positive integer.
      OSError: the directory cannot be created or written.
    """
    for key, value in (("checkpoint.every_steps", every_steps), ("checkpoint.keep", keep)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    self.directory = epath.Path(directory)
    self.every_steps = int(every_steps)
    self.keep = int(keep)
    _check_writable(self.directory)
    self._name_format = ocp.step.standard_name_format()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep,
        # The save decision is ours (`save`); orbax is always asked with force.
        save_interval_steps=1,
        step_name_format=self._name_format,
        enable_async_checkpointing=async_save,
        # Leftovers of a save killed mid-write (tmp-named folders) go away.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _DATA, _CONFIG))
    self._multi_process = jax.process_count() > 1

  # ------------------------------------------------------------------ queries

  def _step_path(self, step: int) -> epath.Path:
    return ocp.step.build_step_path(self.directory, self._name_format, step)

  def _is_committed(self, step: int) -> bool:
    return (self._step_path(step) / COMMIT_MARKER).exists()

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, oldest first (a save in flight is not one)."""
    return [s for s in sorted(self._manager.all_steps()) if self._is_committed(s)]

  def latest_step(self) -> int | None:
    """The newest finished checkpoint step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # ------------------------------------------------------------------ restore

  def _restore_step(self, step: int, abstract_state: Any) -> Restored:
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _DATA: ocp.args.JsonRestore(),
        _CONFIG: ocp.args.JsonRestore(),
    })
    with _draining_event_loops():
      out = self._manager.restore(step, args=args)
    return Restored(step=step, state=out[_STATE], data_position=out[_DATA]["value"],
                    config=out[_CONFIG]["value"])

  def restore(self, abstract_state: Any) -> Restored | None:
    """Restores the newest readable checkpoint onto the given shardings.

    Args:
      abstract_state: a pytree (e.g. a TrainState) of jax.ShapeDtypeStruct
        whose .sharding is the CURRENT mesh's; the mesh may differ from the
        one that saved (orbax reads each device's slice from the stored
        arrays).

    Returns:
      The restored step, state, data position and config, or None when the
      directory holds no finished checkpoint.

    Raises:
      RuntimeError: finished checkpoints exist but none could be read; the
        message lists every step with its error.
    """
    failures = []  # (step, reason) of each step skipped, newest first
    for step in sorted(self._manager.all_steps(), reverse=True):
      if not self._is_committed(step):
        logging.warning("checkpoint step %d in %s: %s; skipping it", step, self.directory,
                        _UNFINISHED)
        failures.append((step, _UNFINISHED))
        continue
      try:
        restored, error = self._restore_step(step, abstract_state), None
      except Exception as e:  # orbax/tensorstore raise many types for a bad file
        restored, error = None, _short(e)
      if _all_hosts_agree(error is None):
        self._set_aside([s for s, _ in failures])
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored
      error = error or "restore failed on another process"
      logging.warning("cannot restore checkpoint step %d from %s (%s); trying the previous "
                      "step", step, self.directory, error)
      failures.append((step, error))
    if any(reason != _UNFINISHED for _, reason in failures):
      listing = "\n".join(f"  step {s}: {reason}" for s, reason in failures)
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n{listing}")
    self._set_aside([s for s, _ in failures])
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unusable step folders to `<step>.unreadable-<time>`.

    Left in place, an unusable step N would make the resumed run skip its
    own save at N (a step is never overwritten). Renamed, not deleted: a
    read error may have been transient and the files are then still there.
    """
    if not steps:
      return
    if jax.process_index() == 0:
      stamp = int(time.time())
      for step in steps:
        path = self._step_path(step)
        target = path.parent / f"{path.name}.unreadable-{stamp}"
        path.rename(target)
        # INFO: the step's warning (why it is unusable) was logged already.
        logging.info("moved unusable checkpoint step %d to %s", step, target)
    if self._multi_process:
      multihost_utils.sync_global_devices("bert_jax.checkpoint.set_aside")
    self._manager.reload()

  # --------------------------------------------------------------------- save

  def save(self, step: int, state: Any, *, data_position: dict | None, config: Any,
           force: bool = False) -> bool:
    """Saves `state` with the data position and config as checkpoint `step`.

    Args:
      step: the number of updates applied to `state`.
      state: the TrainState (sharded jax.Arrays).
      data_position: JSON-ready dict, already merged over hosts, or None.
      config: the run's ConfigDict or dict (stored as JSON-safe dict), or None.
      force: save even off the every_steps grid (final step, preemption).

    Returns:
      Whether a save was started. It runs in the background once the
      arrays are copied to host memory; `wait_until_finished` waits for it.
    """
    step = int(step)
    if not force and step % self.every_steps:
      return False
    if step in self._manager.all_steps():
      logging.info("checkpoint step %d already exists in %s; not overwriting it", step,
                   self.directory)
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        # Wrapped in a dict: a JSON item must be an object, and None is allowed.
        _DATA: ocp.args.JsonSave({"value": data_position}),
        _CONFIG: ocp.args.JsonSave({"value": _config_dict(config)}),
    })
    # force: the every_steps decision above is the only one (orbax's own
    # interval / preemption policy must not add or drop saves).
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      logging.info("saving checkpoint step %d to %s", step, self.directory)
    return bool(saved)

  # ---------------------------------------------------------------- shutdown

  def wait_until_finished(self) -> None:
    """Blocks until the background save (if any) is written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
