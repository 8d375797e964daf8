"""Every op on sharded inputs (8 CPU devices, one subprocess per group):
batch/head sharding under jit (Explicit and Auto meshes), inside
`jax.shard_map` with the default check_vma, MQA with heads sharded; and
`seq_axis=` context parallelism (Explicit, Auto, inside a user's shard_map),
a superlinear needle in shard 0 found by a query in the last shard, and bad
input. Values and gradients equal the unsharded call
(`tests/sharded_ops_check.py`); the compiled HLO of a batch/head-sharded call
holds no all-gather, all-to-all or reduce-scatter.

The pallas (interpret mode) variant runs the same cases but takes minutes on
a 2-core CPU: it runs when `ATTN_TEST_PALLAS_SHARDED=1`, without the cases
inside a user's shard_map: with check_vma=True a `pallas_call` needs its
`out_shape` to state how it varies over the manual axes, which the kernels
(pallas_kernels/*) do not do yet (ValueError from pallas_call).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.train_helpers import REPO, subprocess_env

XLA_CASES = 6 * 4 + 6 * 3 + 2     # ops x (2 jit, shard_map, mqa) + ops x 3 seq + extra


def _run(impl, groups):
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_ops_check.py"),
                      impl, groups], cwd=REPO, env=subprocess_env(num_devices=8),
                     capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-5000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  failed = {row["case"]: row["err"] for row in rows if not row["ok"]}
  assert not failed, "\n\n".join(f"{c}:\n{e}" for c, e in failed.items())
  return [row["case"] for row in rows]


@pytest.mark.slow
def test_every_op_sharded_xla_and_reference():
  cases = _run("xla,reference", "batch_heads,seq,extra")
  assert len(cases) == 2 * XLA_CASES - 2, cases


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATTN_TEST_PALLAS_SHARDED") != "1",
                    reason="pallas interpret mode on 8 CPU devices takes minutes; "
                           "set ATTN_TEST_PALLAS_SHARDED=1")
def test_every_op_sharded_pallas_interpret():
  cases = _run("pallas", "batch_heads,seq,no_user_shard_map")
  assert len(cases) == XLA_CASES - 2 - 2 * 6, cases
