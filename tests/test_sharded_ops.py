"""Every op on sharded inputs (8 CPU devices, `tests/sharded_ops_check.py`).

For every op (dense, sliding window, PPA, block sparse, superlinear, and PPA
and superlinear decode calls with a traced q_offset) and implementation
(reference, xla, pallas in interpret mode), on one 2 x 2 x 2 mesh
(data, model, seq): jit with batch/heads sharded on an Explicit mesh and on
an Auto mesh under `jax.set_mesh` (the compiled HLO of both holds no
all-gather, all-to-all or reduce-scatter), and with the sequence sharded
too (`seq_axis=`; decode: a sequence-sharded cache; Auto: the Explicit
HLO's reduce-scatters, at most twice its all-gathers) on both; inside a
user's `jax.shard_map` (default check_vma; Pallas on CPU there runs the
TPU interpreter, `pallas_kernels.platform.dispatch`); the zigzag order
(`seq_order="zigzag"`). Values and gradients equal the unsharded reference
call. Plus MQA with heads sharded (Explicit and Auto), `jax.vmap` of an op
on an Auto mesh, a superlinear needle in shard 0 found from the last shard,
and bad input. Sliding window with the sequence sharded (contiguous and
zigzag, Explicit mesh) compiles to a neighbour exchange: no all-gather,
all-to-all or reduce-scatter in its HLO. Pallas block sparse in the zigzag
order runs at L = 64 (16-row chunks, the kernels' block).

The cases run in two subprocesses at once (reference + xla, pallas), each
compiling every jitted function once, at XLA backend optimisation level 0
(compile time dominates; the values do not depend on it).

Pallas inside a user's check_vma shard_map: every kernel there reads an
integer table that varies over a manual axis, which JAX's Pallas HLO
interpreter (`interpret=True`) fails to lower (docs/training.md has the
repro); on a CPU mesh `pallas_kernels.platform.dispatch` runs those kernels
in the TPU interpreter (`pltpu.InterpretParams`) instead, the path a user's
call takes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from attn.context_parallel import zigzag_order
from tests.train_helpers import REPO, subprocess_env

FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
# ops x modes (tests/sharded_ops_check.py): 5 prefill ops x 5 modes + zigzag,
# 2 decode ops x 4 modes; xla adds zigzag in shard_map, k_search=None and 4
# extra; pallas runs block sparse zigzag at L = 64 instead of L = 32.
EXPECTED = {"reference": 5 * 6 + 2 * 4, "xla": 5 * 7 + 2 * 4 + 5 + 4,
            "pallas": 5 * 5 + 4 + 2 * 4 + 1}
# The CI tier (`sharded_ops_check.CI_MODES`): reference jit batch/heads and
# sequence sharded; pallas sequence sharded and in a user's shard_map, plus
# block sparse in the zigzag order; xla all but the Auto batch/heads mode
# (4 prefill modes, 3 decode) with the zigzag order outside shard_map only,
# k_search=None in 4 modes and the 4 extra checks.
EXPECTED_CI = {"reference": 5 * 2 + 2 * 2, "xla": 5 * (4 + 1) + 2 * 3 + 4 + 4,
               "pallas": 5 * 2 + 2 * 2 + 1}


def _start(impls, tier):
  env = subprocess_env()
  env["XLA_FLAGS"] = FLAGS
  return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "sharded_ops_check.py"),
                           impls, tier], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _rows(proc):
  out, err = proc.communicate(timeout=1800)
  assert proc.returncode == 0, err[-5000:]
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _check_all(tier, expected):
  procs = [_start("reference,xla", tier), _start("pallas", tier)]
  rows = _rows(procs[0]) + _rows(procs[1])
  failed = {row["case"]: row["err"] for row in rows if not row["ok"]}
  assert not failed, "\n\n".join(f"{c}:\n{e}" for c, e in failed.items())
  counts = {impl: sum(r["case"].startswith(impl + "/") for r in rows) for impl in expected}
  assert counts == expected, counts


@pytest.mark.slow
def test_every_op_sharded_every_implementation():
  _check_all("ci", EXPECTED_CI)


@pytest.mark.full
def test_every_op_sharded_every_implementation_every_mode():
  _check_all("full", EXPECTED)


def test_zigzag_order_puts_chunks_s_and_2n_minus_1_minus_s_on_shard_s():
  n, length = 4, 32
  perm = zigzag_order(length, n)
  assert sorted(perm.tolist()) == list(range(length))
  c = length // (2 * n)
  for s, block in enumerate(perm.reshape(n, 2 * c)):
    np.testing.assert_array_equal(block[:c], np.arange(s * c, (s + 1) * c))
    np.testing.assert_array_equal(block[c:], np.arange((2 * n - 1 - s) * c, (2 * n - s) * c))


def test_zigzag_order_rejects_a_length_not_divisible_by_2n():
  with pytest.raises(ValueError, match="2 \\* axis size"):
    zigzag_order(36, 4)


def test_zigzag_balances_causal_pairs():
  """Causal pairs per shard, counted by hand: contiguous grows with the
  shard index, zigzag is equal on every shard."""
  import importlib
  cp_memory = importlib.import_module("eval.cp_memory")
  n, length = 4, 64
  mask = np.tril(np.ones((length, length), bool))
  contiguous = cp_memory.shard_pairs(mask, n, "contiguous")
  zigzag = cp_memory.shard_pairs(mask, n, "zigzag")
  per = length // n
  want = [sum(i + 1 for i in range(s * per, (s + 1) * per)) for s in range(n)]
  assert contiguous.tolist() == want
  assert zigzag.tolist() == [sum(want) // n] * n
