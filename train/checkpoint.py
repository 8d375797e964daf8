"""Orbax checkpoints of the train state plus the data iterator's state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the train-state
pytree (sharded arrays, written asynchronously), `data` a JSON document with
every process's grain iterator state (gathered to the primary process, which
writes it). Orbax writes each step into a temporary directory and renames it
when complete, so a killed save leaves no step directory behind.

`restore_latest` walks the steps from newest to oldest. It first reads a
step's metadata and compares the saved tree (every array's path, shape and
dtype) with the state the current config builds: a readable checkpoint that
does not fit is an `IncompatibleCheckpointError` that lists the differences,
and nothing is moved. Only a step that really fails to read (missing or
truncated files, unreadable metadata, bad bytes, non-finite values) is
reported with a warning and moved aside to `<workdir>/corrupt_checkpoints/`
(never deleted, never overwritten), and the previous step is tried.

Paths go through `train.paths` (etils.epath): a `gs://` workdir reaches orbax
verbatim.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from train import paths


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
  """A readable checkpoint this job cannot continue (another process count, or
  a saved tree that does not fit the state the current config builds)."""


def _describe_leaf(x) -> str:
  return f"{tuple(x.shape)} {np.dtype(x.dtype).name}"


def tree_mismatch(saved: dict, expected: dict, limit: int = 6) -> list[str]:
  """Differences between two flat `{path tuple: array-like}` dicts.

  Both map key paths to objects with `.shape` and `.dtype` (orbax array
  metadata, `jax.ShapeDtypeStruct`). Returns human-readable lines (at most
  `limit`, then a count), empty when every path, shape and dtype agree.
  """
  out = []
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  for k in missing:
    out.append(f"missing in the checkpoint: {'/'.join(k)} {_describe_leaf(expected[k])}")
  for k in extra:
    out.append(f"only in the checkpoint: {'/'.join(k)} {_describe_leaf(saved[k])}")
  for k in sorted(set(saved) & set(expected)):
    a, b = saved[k], expected[k]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      out.append(f"{'/'.join(k)}: checkpoint {_describe_leaf(a)}, config "
                 f"{_describe_leaf(b)}")
  if len(out) > limit:
    out = out[:limit] + [f"... and {len(out) - limit} more"]
  return out


class Checkpointer:
  """Periodic (async) saves with keep-last-N and corruption-tolerant restore."""

  def __init__(self, workdir: str | epath.Path, *, keep: int = 3, async_save: bool = True):
    self.workdir = (workdir if isinstance(workdir, epath.Path)
                    else paths.workdir_path(workdir))
    self.directory = self.workdir / "checkpoints"
    self.corrupt_directory = self.workdir / "corrupt_checkpoints"
    self._keep = keep
    self._async = async_save
    self.manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True,
        enable_async_checkpointing=self._async)
    # Explicit handlers: metadata of a step can be read before any save or
    # restore of this manager (`_check_fits`).
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

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
      src = self.directory / str(step)
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      name = f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
      k = 0
      while (self.corrupt_directory / (name + (f".{k}" if k else ""))).exists():
        k += 1
      dest = self.corrupt_directory / (name + (f".{k}" if k else ""))
      if src.is_dir():
        src.rename(dest)
        msg += f"; moved to {dest}"
    warnings.warn(msg, stacklevel=3)
    _log(f"WARNING: {msg}")
    _sync(f"quarantine_{step}")
    self.manager.close()
    self.manager = self._make_manager()

  def _check_fits(self, step: int, expected: dict):
    """Raises `_Unreadable` when the step's metadata cannot be read and
    `IncompatibleCheckpointError` when it reads but describes another tree."""
    try:
      meta = self.manager.item_metadata(step)
      tree = meta["state"].tree if meta["state"] is not None else None
      if tree is None:
        raise CheckpointError("no state metadata")
      saved = ocp.tree.to_flat_dict(tree)
    except Exception as e:  # missing / truncated metadata: the step is unreadable
      raise _Unreadable(_reason(e)) from None
    if not saved or any(not hasattr(x, "shape") or not hasattr(x, "dtype")
                        for x in saved.values()):
      raise _Unreadable("state metadata without arrays")
    diff = tree_mismatch(saved, expected)
    if diff:
      raise IncompatibleCheckpointError(
          "the saved train state does not fit the state this config builds: "
          + "; ".join(diff))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: the train-state pytree with `jax.ShapeDtypeStruct`
        leaves carrying the target shardings.

    Returns:
      `(step, state, data_state_of_this_process)` or None when no readable
      checkpoint exists.

    A step is set aside only when reading it fails twice in a row (a
    passing storage error does not cost a good checkpoint) and not for lack
    of memory.

    Raises:
      IncompatibleCheckpointError: the newest readable step does not fit
        `abstract_state` (paths, shapes, dtypes) or was saved by another
        number of processes. Nothing is moved in that case.
      CheckpointError: restoring ran out of memory (nothing is moved).
    """
    self.manager.reload()
    expected = ocp.tree.to_flat_dict(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      failure = None
      for _ in range(2):  # a second read tells a passing storage error from damage
        try:
          return self._read_step(step, abstract_state, expected)
        except IncompatibleCheckpointError as e:
          raise IncompatibleCheckpointError(f"checkpoint step {step}: {e}") from None
        except Exception as e:  # unreadable metadata or data: corrupt or partial
          if _out_of_memory(e):
            raise CheckpointError(
                f"checkpoint step {step}: restoring it ran out of memory ({_reason(e)}); "
                "the checkpoint was left in place") from e
          failure = e
      self._quarantine(step, str(failure) if isinstance(failure, _Unreadable)
                       else _reason(failure))
    return None

  def _read_step(self, step: int, abstract_state: Any, expected: dict):
    self._check_fits(step, expected)
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


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


class _Unreadable(CheckpointError):
  """A step whose metadata cannot be read (partial or corrupt)."""


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0][:300] if str(e) else ""
  return f"{type(e).__name__}: {text}"
