"""`python -m train.memory`: the compiled per-device memory of a config's
train step (compile only), on 4 forced CPU devices in one subprocess.

The micro model (sliding window 16, seq_len 256) on a (data 1, seq 4) mesh,
batch 1, with the sequence sharded over `seq` and without
(`sharding.sequence=none`: every device holds the whole row). Checked
against the test's own arithmetic: the argument bytes are those of the
parameters, the AdamW moments, the int32 counters and this device's tokens;
sequence sharding cuts the temporaries; bad input exits with code 2 and a
message naming the setting.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest

from tests.train_helpers import MICRO_CONFIG, REPO, subprocess_env

SETS = ("mesh_axes=data,seq", "mesh_shape=1,4", "batch_size=1", "seq_len=256",
        "model.attention=sliding")
RUNS = {"seq4": (), "unsharded": ("sharding.sequence=none",), "bad_seq_len": ("seq_len=250",)}


def _argv(extra):
  argv = ["--config", MICRO_CONFIG]
  for s in SETS + extra:
    argv += ["--set", s]
  return argv


def _run_main(argv) -> dict:
  """`train.memory.main(argv)`: its return code, stdout and stderr."""
  from train import memory
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = memory.main(argv)
  return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def _param_bytes() -> tuple[int, int]:
  """(count, bytes) of the micro model's parameters, from their shapes."""
  import jax
  from flax import nnx

  from train.config import apply_overrides, load_config
  from train.model import Transformer
  config = apply_overrides(load_config(MICRO_CONFIG), list(SETS))
  abstract = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
  count = sum(math.prod(s) for s, _ in shapes)
  return count, sum(math.prod(s) * d.itemsize for s, d in shapes)


@pytest.fixture(scope="module")
def reports():
  code = ("import json, sys; from tests.test_memory import RUNS, _argv, _run_main; "
          "print(json.dumps({k: _run_main(_argv(v)) for k, v in RUNS.items()}))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(num_devices=4),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  runs = json.loads(r.stdout.splitlines()[-1])
  return {k: (json.loads(v["out"]) if v["rc"] == 0 else v) for k, v in runs.items()}


def test_argument_bytes_are_params_adamw_state_and_this_devices_tokens(reports):
  count, param_bytes = _param_bytes()
  counters = 3 * 4           # int32: the train step, AdamW's count, the schedule's count
  for name, tokens in (("seq4", 256 // 4), ("unsharded", 256)):
    got = reports[name]
    assert got["mesh"]["seq"] == 4 and got["params"] == count
    assert got["seq_axis"] == ("seq" if name == "seq4" else None)
    assert got["tokens_per_device"] == tokens
    # params, AdamW mu and nu (replicated), counters, inputs + targets (int32)
    want = 3 * param_bytes + counters + 2 * tokens * 4
    assert round(got["argument_MiB"] * 2**20) == want, (name, got)


def test_sequence_sharding_cuts_the_temporaries(reports):
  """The activations are per token and each device holds a quarter of them;
  parameter-sized temporaries (the gradients) do not shrink, so the bound is
  a half, not a quarter."""
  seq4, whole = reports["seq4"]["temp_MiB"], reports["unsharded"]["temp_MiB"]
  assert 0 < seq4 < whole / 2, (seq4, whole)


def test_bad_input_exits_2_naming_the_setting(reports):
  bad = reports["bad_seq_len"]
  assert bad["rc"] == 2 and bad["out"] == ""
  for part in ("error:", "seq_len=250", "'seq'", "size 4"):
    assert part in bad["err"], (part, bad["err"])


def test_a_missing_config_file_exits_2():
  got = _run_main(["--config", "/nonexistent/config.py"])
  assert got["rc"] == 2 and "no such file" in got["err"], got
