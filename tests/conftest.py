"""Compiled-kernel tests (`@pytest.mark.gpu` / `@pytest.mark.tpu`) run only
on a machine with that backend; everywhere else they are skipped.

On a machine without accelerator device files, JAX is pinned to the CPU
before it is imported: with the `[aot]` extra installed, libtpu would
otherwise probe for a TPU in every test process (seconds each, and noisy).
"""

import glob
import os

if not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests compile thousands of small programs and compute little: XLA:CPU's
# LLVM optimisation is most of their time, and level 0 cuts a Pallas
# interpret-mode test file by ~40% (values do not depend on it; tolerances
# are the same). Subprocesses get their own environment
# (`train_helpers.subprocess_env`); the deviceless GPU / TPU compiles restore
# the default (`test_compiled`), so their registers and spills are the
# compilers' own.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)

import jax  # noqa: E402  (after the platform choice above)
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for mark in ("gpu", "tpu"):
      if item.get_closest_marker(mark) is not None and backend != mark:
        item.add_marker(pytest.mark.skip(reason=f"needs a {mark.upper()} (backend is {backend})"))
