"""The workdir path layer: local directories and remote URIs alike.

Every file the trainer reads or writes in its workdir (checkpoints through
orbax, `metrics.jsonl`, `config.json`, `config_changes.jsonl`, traces) goes
through `etils.epath`, so a workdir such as `gs://bucket/runs/run1` reaches
orbax verbatim instead of becoming a local `./gs:/bucket/...` directory.

Remote schemes: orbax-checkpoint writes array data with tensorstore, which it
points at Google Cloud Storage for `gs://` paths and at local files for
everything else, so `gs://` is the one remote scheme a checkpoint can be
written to (`REMOTE_SCHEMES`). Other URIs are refused up front with a message,
before anything is written.

Object stores cannot append to a file: `JsonlLog` appends line by line to a
local file (each line flushed, so `kill -9` loses at most the line being
written) and, on a remote path, keeps the lines in memory and rewrites the
whole object on `flush()` (the trainer flushes at every checkpoint and at the
end, and at most every `remote_flush_s` seconds in between).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from etils import epath

REMOTE_SCHEMES = ("gs",)


def is_remote(path: Any) -> bool:
  """Whether `path` (str or epath.Path) is a URI such as `gs://bucket/x`."""
  return "://" in os.fspath(path)


def workdir_path(workdir: str) -> epath.Path:
  """The workdir as an `epath.Path`: a URI verbatim, a local path made absolute.

  Raises:
    ValueError: `workdir` is empty, or a URI whose scheme checkpoints cannot
      be written to.
  """
  if not isinstance(workdir, (str, os.PathLike)):
    raise ValueError(f"workdir={workdir!r}: expected a path string")
  text = os.fspath(workdir)
  if not text.strip():
    raise ValueError(f"workdir={text!r}: must name a directory (e.g. /tmp/run1 or "
                     "gs://bucket/run1); an empty workdir would train into the current "
                     "directory")
  if is_remote(text):
    scheme = text.split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
      raise ValueError(
          f"workdir={text!r}: scheme {scheme}:// is not supported for checkpoints "
          f"(orbax-checkpoint writes arrays to local paths or "
          f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}); use one of those, or a "
          "mounted file system path")
    if not text.split("://", 1)[1].strip("/"):
      raise ValueError(f"workdir={text!r}: a URI workdir needs a bucket and a path, "
                       f"e.g. {scheme}://bucket/run1")
    path = epath.Path(text)
    if os.fspath(path) != text.rstrip("/"):  # etils did not parse it as a URI
      raise ValueError(f"workdir={text!r}: not understood as a {scheme}:// URI by "
                       "etils.epath")
    return path
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_text(path: epath.Path) -> str | None:
  """The file's text, or None when it does not exist."""
  return path.read_text() if path.exists() else None


def write_text_atomic(path: epath.Path, text: str):
  """Writes a whole file so that a reader sees the old or the new text, never
  a mix: a local file is written beside it then renamed over it; an object
  store replaces an object in one request."""
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def json_safe(value: Any) -> Any:
  """`value` with every non-finite float replaced by None (strict JSON has no
  NaN / Infinity)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def json_line(record: dict) -> str:
  """One strict-JSON line (non-finite floats written as null)."""
  return json.dumps(json_safe(record), allow_nan=False) + "\n"


def _step_of(line: str) -> int | None:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None  # a line cut by kill -9
  if not isinstance(record, dict):
    return None
  step = record.get("step", 0)
  return step if isinstance(step, int) else None


class JsonlLog:
  """A JSON-lines file of `{"step": ..., ...}` records, local or remote.

  Opening it keeps the existing records with `step <= keep_until_step` (all of
  them when None) and drops unreadable lines, so a resumed run's file reads
  like one uninterrupted run.
  """

  def __init__(self, path: epath.Path, *, keep_until_step: int | None = None,
               remote_flush_s: float = 30.0):
    self.path = path
    self._remote = is_remote(path)
    self._remote_flush_s = remote_flush_s
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_text(path)
    kept = []
    if old is not None:
      for line in old.splitlines(keepends=True):
        step = _step_of(line)
        if step is not None and (keep_until_step is None or step <= keep_until_step):
          kept.append(line if line.endswith("\n") else line + "\n")
      if "".join(kept) != old:
        write_text_atomic(path, "".join(kept))
    self.last = json.loads(kept[-1]) if kept else None  # the last record kept
    self._lines = kept if self._remote else None
    self._dirty = False
    self._last_flush = time.monotonic()
    self._file = None if self._remote else path.open("a")

  def write(self, record: dict):
    line = json_line(record)
    self.last = json.loads(line)
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    self._dirty = True
    if time.monotonic() - self._last_flush > self._remote_flush_s:
      self.flush()

  def flush(self):
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      self.path.write_text("".join(self._lines))
      self._dirty = False
      self._last_flush = time.monotonic()

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
