"""Orbax checkpoints of the train state plus the data iterator's state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the train-state
pytree (sharded arrays, written asynchronously), `data` a JSON document with
every process's grain iterator state (gathered to the primary process, which
writes it). Orbax writes each step into a temporary directory and renames it
when complete, so a killed save leaves no step directory behind.

`restore_latest` walks the steps from newest to oldest; a step that fails to
restore (missing or truncated files, wrong structure, non-finite values) is
reported with a warning and moved aside to `<workdir>/corrupt_checkpoints/`
(never deleted, never overwritten), and the previous step is tried.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def gather_json(obj: Any) -> list[Any]:
  """`[obj of process 0, obj of process 1, ...]` on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
  padded = np.zeros((n,), np.uint8)
  padded[:raw.size] = raw
  lens = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lens), n)
  return [json.loads(bytes(everything[i, :lens[i]]).decode()) for i in range(len(lens))]


class CheckpointError(RuntimeError):
  pass


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint this job cannot continue (e.g. another process count)."""


class Checkpointer:
  """Periodic (async) saves with keep-last-N and corruption-tolerant restore."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.corrupt_directory = os.path.join(self.workdir, "corrupt_checkpoints")
    self._keep = keep
    self._async = async_save
    self.manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True,
        enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: Any) -> bool:
    """Starts saving `state` (a pytree of jax.Arrays) and this process's data
    iterator state at `step`; returns when the arrays are copied (async)."""
    states = gather_json(data_state)
    data = {"process_count": jax.process_count(), "states": states}
    step = int(step)
    if step in self.manager.all_steps():
      _log(f"checkpoint: step {step} already exists in {self.directory}; not overwriting it")
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def _quarantine(self, step: int, reason: str):
    msg = (f"checkpoint step {step} in {self.directory} is corrupt or partial "
           f"({reason}); skipping it")
    dest = None
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      os.makedirs(self.corrupt_directory, exist_ok=True)
      dest = os.path.join(self.corrupt_directory, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
      k = 0
      while os.path.exists(dest + (f".{k}" if k else "")):
        k += 1
      dest += f".{k}" if k else ""
      if os.path.isdir(src):
        shutil.move(src, dest)
        msg += f"; moved to {dest}"
    warnings.warn(msg, stacklevel=3)
    _log(f"WARNING: {msg}")
    _sync(f"quarantine_{step}")
    self.manager.close()
    self.manager = self._make_manager()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: the train-state pytree with `jax.ShapeDtypeStruct`
        leaves carrying the target shardings.

    Returns:
      `(step, state, data_state_of_this_process)` or None when no readable
      checkpoint exists.
    """
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        state, data = out["state"], out["data"]
        if not isinstance(data, dict) or "states" not in data:
          raise CheckpointError("data iterator state missing")
        if data["process_count"] != jax.process_count():
          raise IncompatibleCheckpointError(
              f"saved by {data['process_count']} processes, restoring with "
              f"{jax.process_count()}: the data order would change")
        bad = [jax.tree_util.keystr(p) for p, x in
               jax.tree_util.tree_flatten_with_path(state)[0]
               if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
               and not bool(jax.numpy.isfinite(x).all())]
        if bad:
          raise CheckpointError(f"non-finite values in {bad[:3]}")
        return step, state, data["states"][jax.process_index()]
      except IncompatibleCheckpointError as e:
        raise IncompatibleCheckpointError(f"checkpoint step {step}: {e}") from None
      except Exception as e:  # corrupt/partial: any failure means "skip"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self._quarantine(step, reason)
    return None
