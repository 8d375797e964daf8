"""Compiled-kernel tests (`@pytest.mark.gpu` / `@pytest.mark.tpu`) run only
on a machine with that backend; everywhere else they are skipped."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for mark in ("gpu", "tpu"):
      if item.get_closest_marker(mark) is not None and backend != mark:
        item.add_marker(pytest.mark.skip(reason=f"needs a {mark.upper()} (backend is {backend})"))
