"""The training loop: kill -9 + resume is exact, SIGTERM saves and exits 0,
NaN stops with the last good checkpoint kept, every attention type learns,
gradient accumulation, schedule, metrics and progress output."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import loop
from train.config import load_config

from tests.train_helpers import (checkpoint_steps, read_jsonl, run_train, start_train,
                           subprocess_env, trace)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _cache_env(tmp_path):
  # The three runs of a test compile the same programs: share a compilation
  # cache so the later ones skip XLA compilation (results are identical).
  return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)


def _restore(workdir, config):
  trainer = loop.Trainer.cached(dataclasses.replace(config, workdir=str(workdir)))
  ck = ckpt_lib.Checkpointer(str(workdir))
  try:
    return ck.restore_latest(trainer.abstract_state)
  finally:
    ck.close()


def _wait_for_trace(workdir, n, proc, timeout=120.0):
  t0 = time.time()
  while len(trace(workdir)) < n:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
    if time.time() - t0 > timeout:
      raise AssertionError("training made no progress")
    time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(tmp_path):
  env = _cache_env(tmp_path)
  sets = ("steps=24", "checkpoint_every=4", "debug_trace_data=true")
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  ref = start_train(ref_dir, *sets, env=env)  # uninterrupted, concurrently
  victim = start_train(run_dir, *sets, "debug_step_delay=0.15", env=env)
  _wait_for_trace(run_dir, 11, victim)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=60)
  assert victim.returncode == -signal.SIGKILL
  before = trace(run_dir)
  seen_steps = [r["step"] for r in before]
  assert seen_steps == list(range(1, len(seen_steps) + 1)) and len(seen_steps) < 24
  ckpts = checkpoint_steps(run_dir)
  assert ckpts and ckpts[-1] <= seen_steps[-1]
  last = ckpts[-1]

  resumed = run_train(run_dir, *sets, resume=True, env=env)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from checkpoint step {last}" in resumed.stderr
  out, err = ref.communicate(timeout=300)
  assert ref.returncode == 0, err

  # Steps up to the checkpoint come from the killed process, the rest from the
  # resumed one: no step missing, none repeated, same data as the reference.
  after, expected = trace(run_dir), trace(ref_dir)
  assert [r["step"] for r in after] == list(range(1, 25))
  assert [r["indices"] for r in after] == [r["indices"] for r in expected]
  assert [r["indices"] for r in after[:len(before)]] == [r["indices"] for r in before]
  all_idx = [i for r in after for i in r["indices"]]
  assert len(all_idx) == 24 * 8
  assert [r["loss"] for r in after] == [r["loss"] for r in expected]
  metrics = read_jsonl(run_dir / "metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(1, 25))

  config = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(config, steps=24)
  a, b = _restore(ref_dir, config), _restore(run_dir, config)
  assert a[0] == b[0] == 24 and a[2] == b[2]
  chex.assert_trees_all_equal(a[1], b[1])  # bitwise: params, Adam moments, step


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = start_train(tmp_path, "steps=200", "checkpoint_every=0", "debug_trace_data=true",
                     "debug_step_delay=0.1")
  _wait_for_trace(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "received SIGTERM" in err and "stopped by signal at step" in err
  steps = [r["step"] for r in trace(tmp_path)]
  assert 3 <= steps[-1] < 200
  assert checkpoint_steps(tmp_path) == [steps[-1]]  # checkpoint_every=0: only this save


@pytest.mark.slow
def test_nan_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
  r = run_train(tmp_path, "steps=30", "checkpoint_every=4", "debug_nan_at_step=10")
  assert r.returncode == 3, r.stderr
  assert "non-finite loss (nan) at step 10" in r.stderr
  assert "last good checkpoint: step 8" in r.stderr
  assert checkpoint_steps(tmp_path) == [4, 8]
  assert max(m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")) == 9


ATTENTION = {
    "dense": dict(attention="dense"),
    "sliding": dict(attention="sliding", window=8),
    "ppa": dict(attention="ppa", window=8, ppa_p=0.5),
    "superlinear": dict(attention="superlinear", superlinear=attn.SuperlinearConfig(sw_index=2)),
    "hybrid": dict(num_layers=2, layer_pattern=("sliding", "superlinear"), window=8,
                   search_key="accumulated", superlinear=attn.SuperlinearConfig(sw_index=2)),
}


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_loss_decreases_for_every_attention_type(kind):
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(
      base, steps=30, learning_rate=1e-2, warmup_steps=2, seq_len=32,
      model=dataclasses.replace(base.model, **ATTENTION[kind]))
  trainer = loop.Trainer(config)
  assert set(config.model.layer_types) == set(ATTENTION[kind].get(
      "layer_pattern", (ATTENTION[kind].get("attention"),)))
  state, rest = trainer.init_state()
  batch = trainer.global_batch(next(data_lib.make_iterator(config))["tokens"])  # real bytes
  losses = []
  for _ in range(30):
    state, metrics = trainer.step_fn(state, rest, batch)
    losses.append(float(metrics["loss"]))
  assert all(math.isfinite(x) for x in losses)
  assert losses[0] > 4.5  # ~ln(256) at init
  assert losses[-1] < 0.6 * losses[0], losses


def test_grad_accumulation_matches_full_batch():
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  t1 = loop.Trainer.cached(base)
  t4 = loop.Trainer.cached(dataclasses.replace(base, grad_accum=4))
  state, rest = t1.init_state()
  tokens = t1.global_batch(next(data_lib.make_iterator(base))["tokens"])
  l1, g1 = t1.grad_fn(state["params"], rest, tokens)
  l4, g4 = t4.grad_fn(state["params"], rest, tokens)
  np.testing.assert_allclose(float(l4), float(l1), rtol=1e-5)
  chex.assert_trees_all_close(g4, g1, rtol=2e-4, atol=1e-6)


def test_schedule_and_clipping():
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(base, steps=100, warmup_steps=10, learning_rate=1e-3,
                               min_lr_ratio=0.1, clip_norm=0.5)
  sched = loop.make_schedule(config)
  lrs = np.array([float(sched(i)) for i in range(101)])
  assert lrs[0] == 0.0 and np.all(np.diff(lrs[:11]) > 0)
  np.testing.assert_allclose(lrs[10], 1e-3, rtol=1e-6)
  assert np.all(np.diff(lrs[10:]) <= 1e-12)
  np.testing.assert_allclose(lrs[100], 1e-4, rtol=1e-5)
  tx, _ = loop.make_optimizer(config)
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
  grads = {"w": jnp.full((3, 3), 100.0), "b": jnp.full((3,), 100.0)}
  state = tx.init(params)
  # Clipping: the update after clipping does not depend on the gradient scale.
  u1, _ = tx.update(grads, state, params)
  u2, _ = tx.update(jax.tree.map(lambda g: g * 10, grads), state, params)
  chex.assert_trees_all_close(u1, u2, rtol=1e-5)


def test_metrics_and_progress(tmp_path, capsys):
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(base, workdir=str(tmp_path), log_every=10, checkpoint_every=0)
  assert config.steps == 30
  result = loop.train(config)
  assert result.status == "done" and result.step == 30 and result.last_checkpoint == 30
  metrics = read_jsonl(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in metrics] == [10, 20, 30]
  for m in metrics:
    assert math.isfinite(m["loss"]) and m["tokens"] == m["step"] * 8 * 32
    np.testing.assert_allclose(m["bits_per_byte"], m["loss"] / math.log(2))
  err = capsys.readouterr().err
  assert "30/30" in err and "tok/s" in err and "ETA" in err
  assert checkpoint_steps(tmp_path) == [30]
  with pytest.raises(FileExistsError, match="--resume"):
    loop.train(config)  # never silently trains over existing checkpoints


def test_resume_refuses_a_different_model(tmp_path):
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(base, workdir=str(tmp_path), checkpoint_every=0)
  loop.train(config)
  other = dataclasses.replace(config, model=dataclasses.replace(config.model, mlp_dim=32))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="model.mlp_dim"):
    loop.train(other, resume=True)
  assert checkpoint_steps(tmp_path) == [30]  # untouched
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")


def _strict_jsonl(path) -> list[dict]:
  def no_constants(name):
    raise ValueError(f"non-standard JSON constant {name} in {path}")
  with open(path) as f:
    return [json.loads(line, parse_constant=no_constants) for line in f]


def test_metrics_and_trace_are_strict_json(tmp_path):
  # The first record has no tokens/s yet, and a NaN step's trace has no loss:
  # both are null, never the non-JSON NaN.
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(base, workdir=str(tmp_path), steps=4, log_every=1,
                               checkpoint_every=0, debug_nan_at_step=4,
                               debug_trace_data=True)
  result = loop.train(config)
  assert result.status == "nan" and result.step == 4
  metrics = _strict_jsonl(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in metrics] == [1, 2, 3]
  assert metrics[0]["tokens_per_s"] is None
  assert all(m["tokens_per_s"] > 0 for m in metrics[1:])
  traced = _strict_jsonl(tmp_path / "trace" / "process_0.jsonl")
  assert [t["step"] for t in traced] == [1, 2, 3, 4]
  assert traced[-1]["loss"] is None and all(math.isfinite(t["loss"]) for t in traced[:-1])
