"""Mesh, logical-axis rules and the sharded train step on 1 vs 8 CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from train import sharding as shd

from tests.train_helpers import REPO, subprocess_env


def _mesh(shape):
  return AbstractMesh(shape, shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_resolve_mesh_shape():
  assert shd.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert shd.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 4 devices"):
    shd.resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    shd.resolve_mesh_shape((3, -1, 1), 8)


def test_logical_rules_and_fallback():
  m = _mesh((2, 2, 2))
  assert shd.logical_to_spec(("vocab", "embed"), (256, 64), m) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("embed", "q_heads", "head_dim"), (64, 8, 8), m) == \
      P("fsdp", "tensor", None)
  assert shd.logical_to_spec(("norm",), (64,), m) == P(None)
  # Not divisible: replicate that dimension instead of failing.
  assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (63, 3, 8), m) == \
      P(None, None, None)
  m8 = _mesh((1, 1, 8))
  assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), m8) == \
      P(None, None, None)
  assert shd.logical_to_spec(("embed", "mlp"), (64, 128), m8) == P(None, "tensor")
  # A mesh axis is used at most once per array.
  assert shd.logical_to_spec(("mlp", "vocab"), (128, 256), m8) == P("tensor", None)
  # Batch over ("data", "fsdp"), or the longest prefix that divides it.
  assert shd.logical_to_spec(("batch",), (8,), _mesh((2, 4, 1))) == P(("data", "fsdp"))
  assert shd.logical_to_spec(("batch",), (6,), _mesh((2, 4, 1))) == P("data")
  assert shd.logical_to_spec(None, (3, 3), m) == P()


# One superlinear layer (GQA, grad_accum=2): the op with top-k routing and
# gathers is the one most likely to break under GSPMD partitioning.
LAYER_PATTERN = "superlinear"


@pytest.mark.slow
def test_same_step_on_1_and_8_devices(tmp_path):
  """One jitted train step (loss, gradients, updated params) on a 1-device mesh
  and on 8 devices as (8,1,1), (2,2,2), (1,1,8): equal up to float rounding."""
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharding_check.py"),
                      str(tmp_path), LAYER_PATTERN], cwd=REPO,
                     env=subprocess_env(num_devices=8), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  ref = dict(np.load(tmp_path / "1x1x1.npz"))
  specs = json.loads((tmp_path / "specs.json").read_text())
  assert np.isfinite(ref["loss"]) and ref["loss"] > 1.0
  for name in ("8x1x1", "2x2x2", "1x1x8"):
    got = dict(np.load(tmp_path / f"{name}.npz"))
    assert got.keys() == ref.keys()
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    for k in ref:
      if k.startswith("g"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=2e-6, err_msg=f"{name} {k}")
      elif k.startswith("p"):  # after one AdamW step
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-5, err_msg=f"{name} {k}")
  # The parameters really were sharded as the rules say.
  s = specs["2x2x2"]
  assert s["['embedding']"] == ["tensor", "fsdp"]
  assert s["['blocks'][0]['attention']['wq']"] == ["fsdp", "tensor", None]
  assert s["['blocks'][0]['mlp']['w_down']"] == ["tensor", "fsdp"]
  t = specs["1x1x8"]
  assert t["['blocks'][0]['attention']['wq']"] == [None, "tensor", None]
  assert t["['blocks'][0]['attention']['wk']"] == [None, None, None]  # 2 kv heads, 8 shards
  assert all(all(a is None for a in v) for v in specs["8x1x1"].values())
