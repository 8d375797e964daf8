"""Two processes on localhost (CPU, gloo collectives) train together through
`train.distributed.initialize` and agree on the loss: with the batch split
over them (`data`) and with the sequence split over them (`seq`)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess

import numpy as np
import pytest

from train import distributed, loop
from train.config import load_config

from tests.train_helpers import (MICRO_CONFIG, REPO, checkpoint_steps, subprocess_env,
                                 trace, train_cmd)

STEPS = 6


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_detect_environment(monkeypatch):
  for name in ("TRAIN_COORDINATOR_ADDRESS", "TRAIN_DISTRIBUTED", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.detect() is None
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detect() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detect() == "auto"
  monkeypatch.setenv("TRAIN_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert distributed.detect() == "explicit"
  monkeypatch.setenv("TRAIN_DISTRIBUTED", "0")
  assert distributed.detect() is None


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  """The job as one process on one device: `(workdir, trace)`."""
  base = load_config(MICRO_CONFIG)
  workdir = tmp_path_factory.mktemp("single")
  config = dataclasses.replace(base, workdir=str(workdir), steps=STEPS, checkpoint_every=3,
                               debug_trace_data=True)
  assert loop.train(config).status == "done"
  return trace(workdir, 0)


# data: each process holds half of the batch rows; seq: each holds half of
# the sequence of every row (context parallelism across processes: the
# attention's key all-gather runs over the two processes).
MESHES = {"data": ("mesh_shape=-1,1,1",), "seq": ("mesh_axes=seq", "mesh_shape=-1")}


# CI runs the sequence-sharded pair (its attention all-gathers keys across
# the two processes); the data-parallel pair is in the `full` tier.
@pytest.mark.slow
@pytest.mark.parametrize("mesh", [pytest.param("data", marks=pytest.mark.full), "seq"])
def test_two_processes_train_together(tmp_path, single_run, mesh):
  workdir = tmp_path / "mp"
  sets = (f"steps={STEPS}", "checkpoint_every=3", "debug_trace_data=true") + MESHES[mesh]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = subprocess_env(TRAIN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         TRAIN_NUM_PROCESSES=2, TRAIN_PROCESS_ID=pid)
    procs.append(subprocess.Popen(train_cmd(workdir, *sets), cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  errs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    errs.append(err)
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-4000:]
  assert "process 1 of 2" in errs[1] and "2 global devices" in errs[1]

  t0, t1, ts = trace(workdir, 0), trace(workdir, 1), single_run
  assert [r["step"] for r in t0] == [r["step"] for r in t1] == list(range(1, STEPS + 1))
  for a, b, s in zip(t0, t1, ts):
    assert a["loss"] == b["loss"]  # one global loss, the same on both processes
    if mesh == "data":
      assert len(a["indices"]) == len(b["indices"]) == 4
      assert not set(a["indices"]) & set(b["indices"])  # each process reads its own shard
      assert sorted(a["indices"] + b["indices"]) == sorted(s["indices"])
    else:  # both read every row (each keeps its half of the sequence)
      assert a["indices"] == b["indices"] == s["indices"]
    np.testing.assert_allclose(a["loss"], s["loss"], rtol=2e-5)
  assert checkpoint_steps(workdir) == [3, 6]
  # Both processes' data-iterator states were gathered into the checkpoint.
  import json
  meta = json.loads((workdir / "checkpoints" / "6" / "data" / "metadata").read_text())
  assert meta["process_count"] == 2 and len(meta["states"]) == 2
