"""Resuming a run never loses work or changes it silently.

A readable checkpoint that does not fit the new config is an error that
names the differing keys (never "corrupt", nothing moved or truncated); keys
that change the data stream or the model are refused without an explicit
opt-in; what changed is recorded; `steps` below the checkpoint is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from train import checkpoint as ckpt_lib
from train import loop
from train import resume as resume_lib
from train.config import load_config

from tests.train_helpers import (MICRO_CONFIG, REPO, checkpoint_steps, read_jsonl,
                                 subprocess_env, train_cmd)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEPS = 10


def _config(workdir, **kw):
  base = load_config(MICRO_CONFIG)
  kw.setdefault("steps", STEPS)
  return dataclasses.replace(base, workdir=str(workdir), checkpoint_every=5, log_every=1,
                             **kw)


def _snapshot(workdir) -> dict[str, str]:
  """Every file under `workdir` -> sha256 of its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 10-step run (checkpoints 5 and 10) to copy from."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = loop.train(_config(workdir))
  assert result.status == "done" and checkpoint_steps(workdir) == [5, 10]
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  dest = tmp_path / "run"
  shutil.copytree(finished_run, dest)
  return dest


def test_changed_optimizer_is_refused_and_nothing_is_moved(run_copy):
  # The reported case: --resume --set clip_norm=0 --set learning_rate=1e-3.
  before = _snapshot(run_copy)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    loop.train(_config(run_copy, clip_norm=0.0, learning_rate=1e-3), resume=True)
  msg = str(e.value)
  assert "clip_norm: 1.0 -> 0.0" in msg and "learning_rate: 0.003 -> 0.001" in msg
  assert "--allow-config-change" in msg
  assert _snapshot(run_copy) == before  # nothing moved, deleted, truncated or rewritten
  assert not os.path.exists(run_copy / "corrupt_checkpoints")


def test_changed_optimizer_exits_2_from_the_command_line(run_copy):
  before = _snapshot(run_copy)
  r = subprocess.run(train_cmd(run_copy, f"steps={STEPS}", "checkpoint_every=5", "log_every=1",
                               "clip_norm=0", "learning_rate=1e-3", resume=True),
                     cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert "clip_norm" in r.stderr and "learning_rate" in r.stderr
  assert _snapshot(run_copy) == before


@pytest.mark.parametrize("change, words", [
    (dict(seed=1), "seed: 0 -> 1"),
    (dict(seq_len=16), "seq_len: 32 -> 16"),
    (dict(batch_size=4), "batch_size: 8 -> 4"),
    (dict(data="max_bytes"), "data.max_bytes: 200000 -> 100000"),
    (dict(data="shuffle"), "data.shuffle: true -> false"),
])
def test_data_stream_changes_are_refused(run_copy, change, words):
  before = _snapshot(run_copy)
  if change.get("data") == "max_bytes":
    base = _config(run_copy)
    config = dataclasses.replace(base, data=dataclasses.replace(base.data, max_bytes=100_000))
  elif change.get("data") == "shuffle":
    base = _config(run_copy)
    config = dataclasses.replace(base, data=dataclasses.replace(base.data, shuffle=False))
  else:
    config = _config(run_copy, **change)
  with pytest.raises(resume_lib.ResumeConfigError, match="change the data stream") as e:
    loop.train(config, resume=True)
  assert words in str(e.value)
  assert _snapshot(run_copy) == before


def test_resumable_keys_change_freely_and_are_recorded(finished_run, run_copy):
  config = _config(run_copy, steps=STEPS + 4, keep_checkpoints=5)
  config = dataclasses.replace(config, checkpoint_every=2, log_every=2)
  result = loop.train(config, resume=True)
  assert result.status == "done" and result.step == STEPS + 4
  assert checkpoint_steps(run_copy) == [5, 10, 12, 14]
  metrics = read_jsonl(run_copy / "metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) + [12, 14]
  saved = json.loads((run_copy / "config.json").read_text())
  assert saved["steps"] == STEPS + 4 and saved["checkpoint_every"] == 2
  changes = read_jsonl(run_copy / "config_changes.jsonl")
  assert len(changes) == 1 and changes[0]["step"] == STEPS and changes[0]["resume"]
  assert changes[0]["opt_in"] is False
  assert changes[0]["changes"] == {
      "workdir": {"old": str(finished_run), "new": str(run_copy)},  # a copied run
      "steps": {"old": STEPS, "new": STEPS + 4},
      "checkpoint_every": {"old": 5, "new": 2},
      "keep_checkpoints": {"old": 3, "new": 5},
      "log_every": {"old": 1, "new": 2}}


def test_opt_in_continues_and_records_the_change(finished_run, run_copy):
  config = _config(run_copy, clip_norm=0.0, learning_rate=1e-3)
  result = loop.train(config, resume=True, allow_config_change=True)
  assert result.status == "done" and result.step == STEPS  # resumed at 10: nothing left
  config = dataclasses.replace(config, steps=STEPS + 2)
  result = loop.train(config, resume=True, allow_config_change=True)
  assert result.status == "done" and result.step == STEPS + 2
  assert [m["step"] for m in read_jsonl(run_copy / "metrics.jsonl")] == list(
      range(1, STEPS + 3))
  saved = json.loads((run_copy / "config.json").read_text())
  assert saved["clip_norm"] == 0.0 and saved["learning_rate"] == 1e-3
  changes = read_jsonl(run_copy / "config_changes.jsonl")
  assert [c["step"] for c in changes] == [STEPS, STEPS]
  assert changes[0]["opt_in"] is True
  assert changes[0]["changes"] == {"workdir": {"old": str(finished_run), "new": str(run_copy)},
                                   "learning_rate": {"old": 3e-3, "new": 1e-3},
                                   "clip_norm": {"old": 1.0, "new": 0.0}}
  assert changes[1]["changes"] == {"steps": {"old": STEPS, "new": STEPS + 2}}


def test_checkpoint_that_does_not_fit_is_an_error_even_with_opt_in(run_copy):
  before = _snapshot(run_copy)
  base = _config(run_copy)
  other = dataclasses.replace(base, model=dataclasses.replace(base.model, mlp_dim=48))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    loop.train(other, resume=True, allow_config_change=True)
  msg = str(e.value)
  assert "model.mlp_dim: 64 -> 48" in msg  # the differing config key
  assert "w_gate" in msg and "(32, 64)" in msg and "(32, 48)" in msg  # the misfit
  assert _snapshot(run_copy) == before
  assert not os.path.exists(run_copy / "corrupt_checkpoints")


def test_fewer_steps_than_the_checkpoint_is_an_error(run_copy):
  before = _snapshot(run_copy)
  with pytest.raises(ValueError, match=rf"steps=5: .* already at step {STEPS}"):
    loop.train(_config(run_copy, steps=5), resume=True)
  assert _snapshot(run_copy) == before


def test_resuming_a_finished_run_reports_its_last_loss(run_copy):
  last = read_jsonl(run_copy / "metrics.jsonl")[-1]
  result = loop.train(_config(run_copy), resume=True)
  assert result.status == "done" and result.step == STEPS
  assert "nothing to train" in result.message and "nan" not in result.message
  assert result.loss == last["loss"]
  assert read_jsonl(run_copy / "metrics.jsonl")[-1] == last


def test_config_changes_between_versions():
  # A key absent from an older config.json means its default.
  base = load_config(MICRO_CONFIG)
  saved = json.loads(json.dumps(resume_lib.to_dict(base)))
  del saved["debug_step_delay"]
  del saved["model"]["norm_eps"]
  assert resume_lib.config_changes(saved, base) == {}
  changed = dataclasses.replace(base, debug_step_delay=0.5)
  assert resume_lib.config_changes(saved, changed) == {"debug_step_delay": (0.0, 0.5)}


def test_config_without_search_rope_resumes_as_it_ran():
  """A run saved before `search_rope` existed searched its accumulated key with
  RoPE: resuming it under today's default (no RoPE) is a reported change; a
  run with `search_key="k"` (unaffected) resumes with no change."""
  base = load_config(MICRO_CONFIG)
  acc = dataclasses.replace(base, model=dataclasses.replace(
      base.model, attention="superlinear", search_key="accumulated"))
  for config, expected in [
      (acc, {"model.search_rope": (True, False)}),
      (dataclasses.replace(acc, model=dataclasses.replace(acc.model, search_rope=True)), {}),
      (base, {})]:
    saved = json.loads(json.dumps(resume_lib.to_dict(config)))
    del saved["model"]["search_rope"]
    assert resume_lib.config_changes(saved, config) == expected


def test_resume_without_a_checkpoint_is_refused_and_writes_nothing(tmp_path):
  workdir = tmp_path / "empty"
  with pytest.raises(resume_lib.NothingToResumeError, match="nothing to resume"):
    loop.train(_config(workdir), resume=True)
  assert not checkpoint_steps(workdir)
  assert not (workdir / resume_lib.CONFIG_FILE).exists()


def test_resume_without_a_checkpoint_exits_2_from_the_command_line(tmp_path):
  proc = subprocess.run(train_cmd(tmp_path / "empty", resume=True), cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "holds no checkpoint" in proc.stderr and "--allow-fresh-start" in proc.stderr


def test_allow_fresh_start_trains_from_step_0(tmp_path):
  workdir = tmp_path / "fresh"
  result = loop.train(_config(workdir, steps=2), resume=True, allow_fresh_start=True)
  assert result.status == "done" and checkpoint_steps(workdir) == [2]
