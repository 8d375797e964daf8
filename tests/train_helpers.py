"""Shared helpers of the training tests (not collected by pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]
MICRO_CONFIG = str(Path(__file__).resolve().parent / "train_micro_config.py")


def subprocess_env(num_devices: int | None = None, **extra) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  # The application (train, eval) runs from the checkout, it is not installed.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if num_devices:
    # Multi-device checks compile a tiny model on several meshes and run a
    # few steps: compile-bound, so XLA:CPU at optimisation level 0 as in
    # the test process (tests/conftest.py); values agree to float rounding.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}"
  for name in ("TRAIN_COORDINATOR_ADDRESS", "TRAIN_NUM_PROCESSES", "TRAIN_PROCESS_ID"):
    env.pop(name, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def train_cmd(workdir, *sets: str, config: str = MICRO_CONFIG, resume: bool = False) -> list[str]:
  cmd = [sys.executable, "-m", "train", "--config", config, "--set", f"workdir={workdir}"]
  for s in sets:
    cmd += ["--set", s]
  if resume:
    cmd.append("--resume")
  return cmd


def start_train(workdir, *sets, resume=False, env=None, **kw) -> subprocess.Popen:
  return subprocess.Popen(train_cmd(workdir, *sets, resume=resume), cwd=REPO,
                          env=env or subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def run_train(workdir, *sets, resume=False, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(train_cmd(workdir, *sets, resume=resume), cwd=REPO,
                        env=env or subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


def read_jsonl(path) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def trace(workdir, process: int = 0) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "trace", f"process_{process}.jsonl"))


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())
