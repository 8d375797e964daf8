"""`attn.Attention(..., )(x, seq_axis=...)` and the accumulated-key scan on a
sequence sharded over 4 CPU devices equal the unsharded call (values,
gradients wrt x and every parameter) and a plain step-by-step loop
(`tests/layer_seq_check.py`, run in a subprocess with 4 devices)."""

import json
import os
import subprocess
import sys

from tests.train_helpers import REPO, subprocess_env

CASES = {"scan/explicit/jit", "scan/explicit/shard_map", "scan/auto/jit",
         "scan/auto/shard_map", "layer/superlinear/explicit", "layer/sliding/explicit"}


def test_layer_and_scan_on_a_sequence_sharded_mesh():
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "layer_seq_check.py")],
                     cwd=REPO, env=subprocess_env(num_devices=4), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-5000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert {row["case"] for row in rows} == CASES, rows
  bad = [row for row in rows if not row["ok"]]
  assert not bad, bad
