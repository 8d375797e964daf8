"""Residue-grouped stripe tables: host (static offset) and device builds."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.stripe import common


def _oracle(deltas, unit, sign):
  """Plain loops: group `u` = the deltas with `(sign * d) mod unit == u`, in
  input order; bounds = cumulative group sizes; padded to a power of two."""
  groups = [[int(d) for d in deltas if (sign * int(d)) % unit == u] for u in range(unit)]
  flat = [d for g in groups for d in g]
  bounds = [0]
  for g in groups:
    bounds.append(bounds[-1] + len(g))
  size = 1
  while size < max(len(flat), 1):
    size *= 2
  return np.array(flat + [0] * (size - len(flat)), np.int32), np.array(bounds, np.int32)


@pytest.mark.parametrize("count", [1, 5, 64, 347])
@pytest.mark.parametrize("unit", [8, 16])
@pytest.mark.parametrize("sign", [1, -1])
def test_host_tables_match_oracle_and_device(count, unit, sign):
  rng = np.random.default_rng(count * unit + sign)
  far = np.sort(rng.choice(100_000, count, replace=False)) + 1
  deltas = 4096 - far                                   # negative and positive
  want_sorted, want_bounds = _oracle(deltas, unit, sign)
  host = common.group_by_residue_host(deltas, unit, sign=sign)
  dev = common.group_by_residue(jnp.asarray(deltas, jnp.int32), count, unit, sign=sign)
  for got in (host, dev):
    chex.assert_trees_all_equal(tuple(np.asarray(x) for x in got), (want_sorted, want_bounds))
    assert all(x.dtype == jnp.int32 for x in got)
