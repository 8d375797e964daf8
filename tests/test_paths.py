"""Workdir paths: URIs reach orbax verbatim, every file goes through epath.

A `gs://` workdir is exercised end to end on an emulated bucket: `gs://` is
served by a local-directory fsspec file system registered for the test (it
refuses appends, as an object store does), and orbax's two direct calls to
Google Cloud Storage are pointed at the same directory (tensorstore's kvstore
path, and the hierarchical-namespace probe that needs the GCS client
library). Everything else (etils.epath, orbax's own GCS code paths such as
commit-file atomicity and keep-last-N deletion, the trainer's files) runs as
it would against a bucket.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os


import pytest
from etils import epath
from fsspec.implementations.local import LocalFileSystem

from train import loop
from train import paths
from train.config import load_config

from tests.train_helpers import MICRO_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _strict_jsonl(text: str) -> list[dict]:
  def no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://<bucket>/<path>` backed by `<tmp>/bucket_root/<bucket>/<path>`."""
  root = str(tmp_path / "bucket_root")
  os.makedirs(root)

  class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      if path.startswith(root):
        return path.rstrip("/")
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return os.path.join(root, path.lstrip("/")).rstrip("/")

    def glob(self, path, **kwargs):  # gcsfs returns "bucket/key" names
      return [os.path.relpath(p, root) for p in super().glob(path, **kwargs)]

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("objects in a bucket cannot be appended to")
      return super()._open(path, mode, **kwargs)

  from etils.epath import backend as epath_backend
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils

  fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not the view
  monkeypatch.setitem(fsspec_registry._registry, "gs", FakeGCS)
  monkeypatch.setitem(fsspec_registry._registry, "gcs", FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  normalize = tensorstore_utils._normalize_path
  monkeypatch.setattr(
      tensorstore_utils, "_normalize_path",
      lambda p: normalize(os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p))
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_workdir_path_keeps_uris_and_resolves_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  p = paths.workdir_path("gs://bucket/runs/r1")
  assert os.fspath(p) == "gs://bucket/runs/r1" and paths.is_remote(p)
  assert os.fspath(p / "checkpoints") == "gs://bucket/runs/r1/checkpoints"
  assert os.fspath(paths.workdir_path("rel/run")) == str(tmp_path / "rel" / "run")
  assert not paths.is_remote(paths.workdir_path("rel/run"))
  for bad, words in [("", "empty"), ("   ", "empty"),
                     ("s3://bucket/run", "s3:// is not supported"),
                     ("memory://x", "memory:// is not supported"),
                     ("gs://", "needs a bucket")]:
    with pytest.raises(ValueError, match=words) as e:
      paths.workdir_path(bad)
    assert "workdir=" in str(e.value)


def test_jsonl_log_truncates_and_writes_strict_json(tmp_path):
  path = epath.Path(tmp_path) / "m.jsonl"
  path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')  # cut line
  log = paths.JsonlLog(path, keep_until_step=1)
  assert log.last == {"step": 1, "a": 1}
  log.write({"step": 2, "x": float("nan"), "y": [float("inf"), 1.5]})
  log.close()
  assert _strict_jsonl(path.read_text()) == [{"step": 1, "a": 1},
                                             {"step": 2, "x": None, "y": [None, 1.5]}]


def test_gs_workdir_trains_resumes_and_writes_nothing_locally(fake_gcs, tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a mangled URI would land here as ./gs:/bucket/...
  base = load_config(MICRO_CONFIG)
  config = dataclasses.replace(base, workdir="gs://bucket/runs/r1", steps=6,
                               checkpoint_every=2, keep_checkpoints=2, log_every=1)
  result = loop.train(config)
  assert result.status == "done" and result.step == 6
  assert os.listdir(cwd) == []
  run = os.path.join(fake_gcs, "bucket", "runs", "r1")
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["4", "6"]  # keep-last-2
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["workdir"] == "gs://bucket/runs/r1"
  with open(os.path.join(run, "metrics.jsonl")) as f:
    metrics = _strict_jsonl(f.read())
  assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]

  resumed = loop.train(dataclasses.replace(config, steps=8), resume=True)
  assert resumed.status == "done" and resumed.step == 8
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["6", "8"]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    assert [m["step"] for m in _strict_jsonl(f.read())] == list(range(1, 9))
  with open(os.path.join(run, "config_changes.jsonl")) as f:
    (change,) = _strict_jsonl(f.read())
  assert change["step"] == 6 and change["changes"] == {"steps": {"old": 6, "new": 8}}
  assert os.listdir(cwd) == []
