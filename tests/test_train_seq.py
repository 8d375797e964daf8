"""Context-parallel training: a `seq` mesh axis shards the activations along
the sequence (`mesh_axes=data,seq`), and the attention ops run with
`seq_axis="seq"`.

The 8-device checks run in one subprocess (`python tests/test_train_seq.py
<out>`, 8 forced CPU devices) on the micro model with one superlinear layer
(accumulated search key, as in the million-token recipe; the op's own
context parallelism of every kind is tested in tests/test_sharded_ops.py):

  * two steps on (data 2, seq 4) equal two steps on (data 8): the losses
    and the train state after each step (parameters, and the AdamW moments,
    which hold the clipped gradients);
  * `train()` on (data 2, seq 4) for one step, checkpointed, resumed on
    (data 8) and, separately, on (data 4, seq 2): the losses and gradient
    norms of steps 2 and 3 equal those of three uninterrupted steps on
    (data 2, seq 4). (Each further mesh is one more compile.)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import attn

from tests.train_helpers import MICRO_CONFIG, REPO, read_jsonl, subprocess_env

MESHES = {"data8": (("data",), (8,)), "data2_seq4": (("data", "seq"), (2, 4)),
          "data4_seq2": (("data", "seq"), (4, 2))}
RESUMED_ON = ("data8", "data4_seq2")


def _config(workdir="/tmp/unused", mesh="data8", **kw):
  from train.config import load_config
  base = load_config(MICRO_CONFIG)
  # An 8-key local window: at seq_len 64 the routing (spans in earlier
  # shards) decides most of what a query sees.
  model = dataclasses.replace(base.model, attention="superlinear", search_key="accumulated",
                              superlinear=attn.SuperlinearConfig(sw_index=2))
  axes, shape = MESHES[mesh]
  return dataclasses.replace(base, workdir=str(workdir), seq_len=64, warmup_steps=1,
                             model=model, mesh_axes=axes, mesh_shape=shape,
                             checkpoint_every=0, async_checkpoints=False, **kw)


# ---------------------------------------------------------------------------
# In-process checks (no devices needed).


def test_mesh_axes_name_the_sizes_and_the_sequence_rule_is_checked():
  from train import sharding as shd
  from train.config import Config, ConfigError, apply_overrides
  c = apply_overrides(Config(), ["mesh_axes=data,seq,tensor", "mesh_shape=2,-1,1"])
  assert (c.mesh_axes, c.mesh_shape) == (("data", "seq", "tensor"), (2, -1, 1))
  assert shd.full_mesh_shape(c.mesh_shape, c.mesh_axes, 8) == (2, 1, 4, 1)
  with pytest.raises(ConfigError, match="mesh_shape.*3 comma-separated.*data,seq,tensor"):
    apply_overrides(Config(), ["mesh_axes=data,seq,tensor", "mesh_shape=2,4"])
  with pytest.raises(ConfigError, match="mesh_axes"):
    apply_overrides(Config(), ["mesh_axes=data,sequence", "mesh_shape=2,4"])
  with pytest.raises(ConfigError, match="sharding.sequence='data'"):
    apply_overrides(Config(), ["sharding.sequence=data"])


def test_activation_spec_shards_the_sequence_or_raises():
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

  from train import sharding as shd
  from train.config import ALL_MESH_AXES, ShardingConfig
  mesh = AbstractMesh((2, 1, 4, 1), ALL_MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  assert shd.activation_spec(mesh, 64) == P(("data", "fsdp"), "seq", None)
  assert shd.seq_axis(mesh, ShardingConfig(sequence=None)) is None
  flat = AbstractMesh((8, 1, 1, 1), ALL_MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  assert shd.activation_spec(flat, 63) == P(("data", "fsdp"), None, None)  # size-1 axis
  # Not divisible: an error naming seq_len, the axis and the fix, even when
  # every parameter rule may fall back to replication.
  with pytest.raises(ValueError) as e:
    shd.activation_spec(mesh, 62, ShardingConfig(allow_replication=("*",)))
  for part in ("seq_len=62", "'seq'", "size 4", "sharding.sequence=none"):
    assert part in str(e.value), (part, str(e.value))


def test_index_block_of_a_sequence_split_across_processes():
  """The devices of one process on a (data 2, seq 2) mesh over a [4, 8]
  batch: one data row block with the whole sequence, one half of the
  sequence of every row, or two diagonal blocks (not a rectangle)."""
  from train import sharding as shd

  def dev(row, col):  # the device at (data row, seq col)
    return (slice(2 * row, 2 * row + 2), slice(4 * col, 4 * col + 4))

  assert shd.index_block([dev(1, 0), dev(1, 1)], (4, 8)) == (slice(2, 4), slice(0, 8))
  assert shd.index_block([dev(0, 1), dev(1, 1)], (4, 8)) == (slice(0, 4), slice(4, 8))
  # Replicated copies of a block (e.g. over a tensor axis) count once.
  assert shd.index_block([dev(0, 1), dev(0, 1)], (4, 8)) == (slice(0, 2), slice(4, 8))
  with pytest.raises(ValueError, match="contiguous block"):
    shd.index_block([dev(0, 0), dev(1, 1)], (4, 8))


def test_remat_gives_the_same_loss_and_gradients():
  """`model.remat` (recompute each block in the backward pass) changes
  memory, not values: loss and gradients of the (dense) micro model on one
  device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from train.config import load_config
  from train.loop import cross_entropy
  from train.model import Transformer
  config = load_config(MICRO_CONFIG)
  tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 256)
  graphdefs = [nnx.split(Transformer(dataclasses.replace(config.model, remat=remat),
                                     rngs=nnx.Rngs(0)), nnx.Param) for remat in (False, True)]
  params = graphdefs[0][1]

  def loss(graphdef, p):
    return cross_entropy(nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:])

  # One compile for both (remat's optimization barriers keep them apart).
  (l0, g0), (l1, g1) = jax.jit(lambda p: [jax.value_and_grad(
      lambda q, g=g: loss(g, q))(p) for g, _ in graphdefs])(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert jnp.isfinite(l0) and l0 > 1.0
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# 8 CPU devices (one subprocess).


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _steps(out):
  """Three train steps on each of data2_seq4, data8 from the same state: the
  losses, gradient norms and the states (params, AdamW moments) after each
  step."""
  import jax

  from train import data as data_lib
  from train import loop
  init = None
  for mesh in ("data2_seq4", "data8"):
    config = _config(mesh=mesh, steps=3)
    trainer = loop.Trainer.cached(config)  # the train() runs below reuse it
    if init is None:
      init = jax.device_get(trainer.init_state())
    state = jax.device_put(init[0], trainer.state_shardings)
    rest = jax.device_put(init[1], trainer.rest_shardings)
    it = data_lib.make_iterator(config, **trainer.data_shard())
    saved = {}
    for step in (1, 2, 3):
      batch = trainer.global_batch(next(it)["tokens"])
      if step == 1 and mesh == "data2_seq4":
        saved["input_spec"] = np.array(str(batch["inputs"].sharding.spec))
        saved["shard_shape"] = np.array(batch["inputs"].addressable_shards[0].data.shape)
      state, metrics = trainer.step_fn(state, rest, batch)
      saved[f"loss{step}"] = np.asarray(metrics["loss"])
      saved[f"grad_norm{step}"] = np.asarray(metrics["grad_norm"])
      if step < 3:
        saved.update({f"s{step}{k}": v for k, v in _flat(state).items()})
    np.savez(os.path.join(out, f"{mesh}.npz"), **saved)


def _resume(out):
  """train() on data2_seq4 for 1 step, then resumed up to step 3 on each
  mesh of RESUMED_ON (from copies of that checkpoint): metrics under
  out/<mesh>/."""
  from train import loop
  first = os.path.join(out, "first")
  assert loop.train(_config(first, "data2_seq4", steps=1)).status == "done"
  for mesh in RESUMED_ON:
    workdir = os.path.join(out, mesh)
    shutil.copytree(first, workdir)
    result = loop.train(_config(workdir, mesh, steps=3), resume=True)
    assert result.status == "done", result.message


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("seq")
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "test_train_seq.py"),
                      str(out)], cwd=REPO, env=subprocess_env(num_devices=8),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  return out


@pytest.mark.slow
def test_step_on_data2_seq4_equals_step_on_data8(eight_devices):
  ref = dict(np.load(eight_devices / "data8.npz"))
  got = dict(np.load(eight_devices / "data2_seq4.npz"))
  # Each device got its own tokens: batch over data, sequence over seq.
  assert str(got.pop("input_spec")) in ("P(('data', 'fsdp'), 'seq')", "PartitionSpec(('data', 'fsdp'), 'seq')")
  assert tuple(got.pop("shard_shape")) == (8 // 2, 64 // 4)
  assert got.keys() == ref.keys()
  mu = [k for k in ref if k.startswith("s1") and "[0].mu" in k]  # AdamW first moments
  assert mu, sorted(ref)
  for step in (1, 2, 3):
    assert np.isfinite(ref[f"loss{step}"]) and ref[f"loss{step}"] > 1.0
    np.testing.assert_allclose(got[f"loss{step}"], ref[f"loss{step}"], rtol=1e-5)
    np.testing.assert_allclose(got[f"grad_norm{step}"], ref[f"grad_norm{step}"], rtol=1e-4)
  for k in ref:
    if k.startswith("s"):  # params, (1 - b1) * clipped grads, (1 - b2) * grads^2, counts
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-6, err_msg=k)
  # The gradients are not vanishingly small, and step 2 moved the parameters
  # (lr is 0 at step 1, warmup): the comparisons are not vacuous.
  assert min(np.abs(ref[k]).max() for k in mu) > 1e-6
  moved = [np.abs(ref[k] - ref["s1" + k[2:]]).max() for k in ref
           if k.startswith("s2") and "params" in k]
  assert moved and max(moved) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mesh", RESUMED_ON)
def test_checkpoint_from_seq4_resumes_on_another_mesh(eight_devices, mesh):
  """The metrics of the run resumed on `mesh` (no seq axis; seq 2) equal
  those of three uninterrupted steps on (data 2, seq 4) (`_steps`, the same
  initial state and batches)."""
  ref = dict(np.load(eight_devices / "data2_seq4.npz"))
  rows = read_jsonl(eight_devices / mesh / "metrics.jsonl")
  got = {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}
  assert sorted(got) == [1, 2, 3]
  for step in (1, 2, 3):
    np.testing.assert_allclose(got[step], (ref[f"loss{step}"], ref[f"grad_norm{step}"]),
                               rtol=2e-5, err_msg=f"step {step}")
  changes = (eight_devices / mesh / "config_changes.jsonl").read_text()
  assert "mesh_shape" in changes, changes
  assert ("mesh_axes" in changes) == (MESHES[mesh][0] != MESHES["data2_seq4"][0]), changes


if __name__ == "__main__":
  import jax
  assert jax.device_count() == 8, jax.devices()
  _steps(sys.argv[1])
  _resume(sys.argv[1])
