"""Orbax checkpoints: round trip, keep-last-N, corrupt/partial steps skipped."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import loop
from train.config import load_config

from tests.train_helpers import MICRO_CONFIG, checkpoint_steps

# A failed restore can leave tensorstore callbacks behind orbax's closed event
# loop; they only print.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def trainer():
  return loop.Trainer.cached(load_config(MICRO_CONFIG))


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _states(trainer, n):
  """n successive train states (distinct values) and data states."""
  state, rest = trainer.init_state()
  it = data_lib.make_iterator(trainer.config)
  out = []
  for _ in range(n):
    batch = next(it)
    state, _ = trainer.step_fn(state, rest, trainer.global_batch(batch["tokens"]))
    out.append((state, it.get_state()))
  return out


def test_round_trip_keep_last_n(trainer, tmp_path):
  states = _states(trainer, 4)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=True)
  for i, (state, ds) in enumerate(states, start=1):
    assert ck.save(i, state, ds)
  ck.wait()
  assert ck.all_steps() == [3, 4] == checkpoint_steps(tmp_path)
  assert not ck.save(4, states[0][0], states[0][1])  # never overwrites a step
  step, restored, ds = ck.restore_latest(trainer.abstract_state)
  ck.close()
  assert step == 4 and ds == states[3][1] and int(restored["step"]) == 4
  _leaves_equal(restored, states[3][0])
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, states[3][0])
  # The restored arrays carry the target shardings.
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.state_shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def _corrupt_truncate(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(7)


def _partial_no_data(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))


def _partial_no_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


@pytest.mark.parametrize("damage", [_corrupt_truncate, _partial_no_data,
                                    _partial_no_state_metadata, _empty_dir])
def test_corrupt_or_partial_latest_is_skipped(trainer, tmp_path, damage):
  states = _states(trainer, 3)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=5)
  for i, (state, ds) in enumerate(states, start=1):
    ck.save(i, state, ds)
  ck.close()
  step_dir = os.path.join(tmp_path, "checkpoints", "3")
  damage(step_dir)
  before = sorted(os.path.relpath(p, step_dir) for p in glob.glob(step_dir + "/**", recursive=True))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.warns(UserWarning, match="step 3 .* corrupt or partial"):
    step, restored, ds = ck.restore_latest(trainer.abstract_state)
  assert step == 2 and ds == states[1][1]
  _leaves_equal(restored, states[1][0])
  # Moved aside, content preserved (not deleted, not overwritten).
  moved = glob.glob(os.path.join(tmp_path, "corrupt_checkpoints", "3.*"))
  assert len(moved) == 1
  after = sorted(os.path.relpath(p, moved[0]) for p in glob.glob(moved[0] + "/**", recursive=True))
  assert after == before
  assert ck.all_steps() == [1, 2]
  # Step 3 can be written again without touching the quarantined copy.
  assert ck.save(3, states[2][0], states[2][1])
  ck.close()
  assert checkpoint_steps(tmp_path) == [1, 2, 3] and os.path.isdir(moved[0])


def test_all_corrupt_gives_none(trainer, tmp_path):
  (state, ds), = _states(trainer, 1)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(1, state, ds)
  ck.close()
  _corrupt_truncate(os.path.join(tmp_path, "checkpoints", "1"))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.warns(UserWarning):
    assert ck.restore_latest(trainer.abstract_state) is None
  ck.close()


def test_resume_skips_corrupt_checkpoint_end_to_end(tmp_path):
  """A finished run's copy with step 30 corrupt and step 20 partial resumes from
  step 10 and reproduces the original run bitwise (params, data order, loss)."""
  base = load_config(MICRO_CONFIG)
  cfg = dataclasses.replace(base, workdir=str(tmp_path / "a"), checkpoint_every=10,
                            keep_checkpoints=5, debug_trace_data=True)
  assert cfg.steps == 30
  ref = loop.train(cfg)
  assert ref.status == "done" and checkpoint_steps(cfg.workdir) == [10, 20, 30]
  cfg_b = dataclasses.replace(cfg, workdir=str(tmp_path / "b"))
  shutil.copytree(cfg.workdir, cfg_b.workdir)
  _corrupt_truncate(os.path.join(cfg_b.workdir, "checkpoints", "30"))
  _partial_no_data(os.path.join(cfg_b.workdir, "checkpoints", "20"))
  with pytest.warns(UserWarning) as record:
    res = loop.train(cfg_b, resume=True)
  messages = " ".join(str(w.message) for w in record)
  assert "step 30" in messages and "step 20" in messages
  assert res.status == "done" and res.step == 30
  assert checkpoint_steps(cfg_b.workdir) == [10, 20, 30]
  assert len(glob.glob(os.path.join(cfg_b.workdir, "corrupt_checkpoints", "*"))) == 2
  assert res.loss == ref.loss
  t = loop.Trainer.cached(cfg)
  a = ckpt_lib.Checkpointer(cfg.workdir).restore_latest(t.abstract_state)
  b = ckpt_lib.Checkpointer(cfg_b.workdir).restore_latest(t.abstract_state)
  assert a[0] == b[0] == 30 and a[2] == b[2]
  _leaves_equal(a[1], b[1])
  from tests.train_helpers import trace
  ta, tb = trace(cfg.workdir), trace(cfg_b.workdir)
  assert [r["step"] for r in tb] == list(range(1, 31))
  assert [r["indices"] for r in tb] == [r["indices"] for r in ta]


def test_readable_checkpoint_that_does_not_fit_is_not_corrupt(trainer, tmp_path):
  """Another config's state (here: no weight tying, so an extra lm_head and
  its Adam moments) is an IncompatibleCheckpointError listing the misfits;
  the checkpoint stays where it is and still restores with its own config."""
  (state, ds), = _states(trainer, 1)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(1, state, ds)
  ck.close()
  config = trainer.config
  other = loop.Trainer.cached(dataclasses.replace(
      config, model=dataclasses.replace(config.model, tie_embeddings=False)))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"checkpoint step 1: .*missing in the checkpoint: .*lm_head"):
    ck.restore_latest(other.abstract_state)
  assert checkpoint_steps(tmp_path) == [1]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")
  step, restored, _ = ck.restore_latest(trainer.abstract_state)
  ck.close()
  assert step == 1
  _leaves_equal(restored, state)


def test_tree_mismatch_lists_every_kind_of_difference():
  sds = jax.ShapeDtypeStruct
  saved = {("a",): sds((2, 3), np.float32), ("b",): sds((4,), np.float32),
           ("c",): sds((), np.int32)}
  expected = {("a",): sds((2, 3), np.float32), ("b",): sds((5,), np.float32),
              ("c",): sds((), np.float32), ("d", "e"): sds((1,), np.float32)}
  assert ckpt_lib.tree_mismatch(saved, saved) == []
  assert ckpt_lib.tree_mismatch(saved, expected) == [
      "missing in the checkpoint: d/e (1,) float32",
      "b: checkpoint (4,) float32, config (5,) float32",
      "c: checkpoint () int32, config () float32"]
  assert ckpt_lib.tree_mismatch(expected, saved) == [
      "only in the checkpoint: d/e (1,) float32",
      "b: checkpoint (5,) float32, config (4,) float32",
      "c: checkpoint () float32, config () int32"]


def _fail_first_restores(monkeypatch, ck, errors):
  """Makes `ck.manager.restore` raise `errors[i]` on its i-th call."""
  real = ck.manager.restore
  calls = []

  def restore(*args, **kwargs):
    calls.append(1)
    if len(calls) <= len(errors):
      raise errors[len(calls) - 1]
    return real(*args, **kwargs)
  monkeypatch.setattr(ck.manager, "restore", restore)
  return calls


def test_passing_read_error_or_lack_of_memory_does_not_set_a_checkpoint_aside(
    trainer, tmp_path, monkeypatch):
  (state, ds), = _states(trainer, 1)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(1, state, ds)
  ck.wait()
  calls = _fail_first_restores(monkeypatch, ck, [OSError("connection reset")])
  step, restored, _ = ck.restore_latest(trainer.abstract_state)
  assert step == 1 and len(calls) == 2
  _leaves_equal(restored, state)
  _fail_first_restores(monkeypatch, ck, [MemoryError("host")])
  with pytest.raises(ckpt_lib.CheckpointError, match="ran out of memory"):
    ck.restore_latest(trainer.abstract_state)
  _fail_first_restores(monkeypatch, ck, [RuntimeError("RESOURCE_EXHAUSTED: device")])
  with pytest.raises(ckpt_lib.CheckpointError, match="ran out of memory"):
    ck.restore_latest(trainer.abstract_state)
  ck.close()
  assert checkpoint_steps(tmp_path) == [1]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")
