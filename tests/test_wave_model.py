"""GPU launch order (`pallas_kernels.common.block_first`) and the roofline's
wave model (`cost.search_wave_rows`, `cost.span_wave_key_blocks`,
`eval.roofline_model.wave_key_blocks`), each against plain loops."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import attn
from attn import masks
from eval import roofline_model
from pallas_kernels import common, cost


def test_block_first_launches_the_block_axis_first_and_keeps_logical_ids():
  grid = (2, 3, 5)                       # (batch, head, block)

  def kernel(o_ref):
    ids = [common.block_first_id(a) for a in range(3)]
    o_ref[...] = jnp.stack(ids).reshape(1, 1, 1, 3)

  spec = pl.BlockSpec((1, 1, 1, 3), lambda b, h, i: (b, h, i, 0))
  launch, in_specs, out_spec = common.block_first(grid, [], spec)
  assert launch == (5, 2, 3) and in_specs == []
  out = common.block_first_call(
      kernel, grid=grid, in_specs=[], out_specs=spec, interpret=True,
      out_shape=jax.ShapeDtypeStruct((2, 3, 5, 3), jnp.int32))()
  b, h, i = np.meshgrid(np.arange(2), np.arange(3), np.arange(5), indexing="ij")
  np.testing.assert_array_equal(np.asarray(out), np.stack([b, h, i], -1))


@pytest.mark.parametrize("l,bq,wave", [(96, 16, 2), (130, 16, 3), (64, 32, 1)])
def test_search_wave_rows_is_the_union_of_each_waves_keys(l, bq, wave):
  config = attn.SuperlinearConfig(sw_index=1, num_spans=2)
  f = masks.superlinear_stripe_table(l, config).astype(np.int64)
  oracle = 0
  for w0 in range(0, l, wave * bq):      # a wave: `wave` query blocks launched together
    keys = {i + 1 - ff for i in range(w0, min(w0 + wave * bq, l)) for ff in f}
    oracle += sum(1 for x in keys if 0 <= x < l)
  got = cost.search_wave_rows(1 - f, q_len=l, block_q=bq, kv_len=l, wave=wave)
  assert got == oracle
  # One program per wave re-reads nothing: the union is every row it loads.
  visits = cost.stripe_visits(1 - f, q_blocks=-(-l // bq), block_q=bq, kv_len=l)
  assert got <= visits * bq


@pytest.mark.parametrize("seed,per_key,max_keys", [(0, 4, 24), (1, 1, 7), (2, 6, 60)])
def test_span_wave_key_blocks_bounds_the_exact_union(seed, per_key, max_keys):
  rng = np.random.default_rng(seed)
  lk, bq, bk, wave = 256, 16, 16, 3
  rows = per_key * lk
  lo = np.sort(rng.integers(0, lk, rows))
  hi = np.minimum(lo + rng.integers(0, max_keys, rows), lk - 1)
  exact = 0
  tiles = range(0, rows, bq)
  for w in range(0, len(tiles), wave):
    blocks = set()
    for t in list(tiles)[w:w + wave]:
      for r in range(t, min(t + bq, rows)):
        blocks.update(range(lo[r] // bk, hi[r] // bk + 1))
    exact += len(blocks)
  est = cost.span_wave_key_blocks(rows, lk, max_keys, block_q=bq, block_k=bk, wave=wave,
                                  rows_per_key=per_key)
  # An upper bound (every wave charged the longest interval), off by at most
  # that interval per wave.
  waves = -(-len(tiles) // wave)
  assert exact <= est <= exact + waves * (-(-max_keys // bk) + 2)


@pytest.mark.parametrize("name", ["causal", "window", "random"])
def test_block_sparse_wave_key_blocks_match_plain_loops(name):
  l, b = 256, 16
  if name == "causal":
    layout = attn.BlockLayout.causal(l, block_q=b, block_k=b)
  elif name == "window":
    layout = attn.BlockLayout.sliding_window(l, window=40, block_q=b, block_k=b)
  else:
    rng = np.random.default_rng(3)
    layout = attn.BlockLayout.from_block_mask(rng.random((l // b, l // b)) < 0.3, l, l,
                                              block_q=b, block_k=b)
  mask = layout.to_mask()
  nq = l // b
  oracle = 0
  for w0 in range(0, nq, 5):             # heaviest (last) query block first
    wave_rows = [nq - 1 - i for i in range(w0, min(w0 + 5, nq))]
    cols = set()
    for qb in wave_rows:
      for kb in range(l // b):
        if mask[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b].any():
          cols.add(kb)
    oracle += len(cols)
  assert roofline_model.wave_key_blocks(layout, 5) == oracle


def test_wave_model_times_sit_between_no_reuse_and_all_l2():
  shape = roofline_model.Shape()
  for op in (roofline_model.superlinear(32768, roofline_model.CONFIGS["default"], shape),
             roofline_model.dense_pallas(16384, shape)):
    none, wave, all_l2 = (op.time(reuse=r) for r in roofline_model.REUSE)
    assert all_l2 <= wave < none
  with pytest.raises(ValueError, match="reuse="):
    roofline_model.kernel_time(cost.KernelCost(bytes_accessed=1), reuse=True)


def test_compute_floor_and_needed_bandwidth_by_hand():
  """The floor counts the Pallas kernels' arithmetic only; the bandwidth a
  target needs divides their loads by the time left after the glue."""
  from pallas_kernels import cost
  from eval import roofline, roofline_model as rm
  hw = rm.H100
  kern = cost.KernelCost(flops=989 * 10**9, vector_flops=67 * 10**9, bytes_accessed=10**10,
                         programs=1000)
  glue = cost.KernelCost(bytes_accessed=335 * 10**7, programs=rm.XLA)
  ours = rm.OpCost((("kernel", kern), ("glue", glue)))
  # 989 GFLOP at 989 TFLOP/s + 67 GFLOP at 67 TFLOP/s = 2 ms; the glue is not counted.
  chex.assert_trees_all_close(roofline.compute_floor(ours, hw), 2e-3, rtol=1e-12)
  base = rm.OpCost((("base", cost.KernelCost(bytes_accessed=335 * 10**8, programs=rm.XLA)),))
  cell = roofline.Cell("t", "op", 1, ours, base, need=2.0)
  # Budget 10 ms / 2 = 5 ms; the glue takes 1 ms at 3.35 TB/s; 10 GB in 4 ms.
  chex.assert_trees_all_close(roofline.needed_bandwidth(cell, hw), 10**10 / 4e-3, rtol=1e-9)
  assert roofline.needed_bandwidth(dataclasses.replace(cell, need=0.0), hw) is None
  assert roofline.needed_bandwidth(dataclasses.replace(cell, need=20.0), hw) is None
  # Named kernels also pay their loads at L2 bandwidth (the design floor).
  chex.assert_trees_all_close(roofline.compute_floor(ours, hw, ("kernel",)),
                              max(2e-3, 10**10 / hw.l2_bw), rtol=1e-12)
