"""Stripe kernels (span-search top-k, gate logits, PPA) in interpret mode against
the `reference` ops and plain jnp oracles, plus lowering for TPU and CUDA.

Interpret mode is slow on CPU, so shapes are tiny (L <= ~80, blocks of 16)
and most cases run the GPU variant (`gpu_interpret`, one residue loop); the
TPU variant runs under `tpu_interpret` and the bounds-checked `tpu_checked`
on a few cases.
"""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import masks, ppa_routing
from attn.pallas import block_sparse as pallas_block_sparse
from attn.pallas import ppa as pallas_ppa
from attn.pallas import superlinear as pallas_superlinear
from pallas_kernels import stripe
from pallas_kernels.block_sparse import tpu as block_sparse_tpu
from pallas_kernels.stripe import tpu as stripe_tpu
from tests import attn_oracles
from tests import pallas_harness as ph

BLOCKS = dict(block_q=16, block_k=16)


def _normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------- search


SEARCH_CASES = {
    # name: (num_spans, search_power, sw_index, (hq, hk), q_len, kv_len, q_offset, variant)
    "k1_p05_w0_mha": (1, 0.5, 0, (2, 2), 29, 29, None, "gpu_interpret"),
    "k2_p055_s1_gqa": (2, 0.55, 1, (4, 1), 45, 45, None, "gpu_interpret"),
    "k3_p05_s2_chunk": (3, 0.5, 2, (4, 1), 13, 50, 30, "gpu_interpret"),
    "k2_p05_s1_gqa42_chunk": (2, 0.5, 1, (4, 2), 21, 40, 19, "gpu_interpret"),
    "k5_p055_s0_decode": (5, 0.55, 0, (2, 2), 1, 41, 40, "gpu_interpret"),
    "k2_p05_s1_tpu": (2, 0.5, 1, (4, 1), 37, 37, None, "tpu_interpret"),
    "k3_p055_s1_checked": (3, 0.55, 1, (2, 1), 21, 21, None, "tpu_checked"),
}


def _search_inputs(key, hq, hk, lq, lk, ds=8, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return _normal(k1, (1, lq, hq, ds), dtype), _normal(k2, (1, lk, hk, ds), dtype)


def _reference_search(qs, ks, config, q_offset):
  ref = attn.superlinear_attention_with_anchors(
      qs, ks, ks, qs, ks, config=config, q_offset=q_offset, implementation="reference")
  return ref.anchors, ref.gates


def _gather_scores(qs, ks, anchors):
  """Plain oracle: `<qs[b, i, h], ks[b, anchors, h // G]>`, 0 for anchor -1."""
  g = qs.shape[2] // ks.shape[2]
  kh = jnp.repeat(ks.astype(jnp.float32), g, axis=2)                  # [B, Lk, Hq, D]
  b = jnp.arange(qs.shape[0])[:, None, None, None]
  h = jnp.arange(qs.shape[2])[None, None, :, None]
  rows = kh[b, jnp.maximum(anchors, 0), h]                             # [B, Lq, Hq, K, D]
  s = jnp.sum(qs.astype(jnp.float32)[:, :, :, None, :] * rows, axis=-1)
  return jnp.where(anchors >= 0, s, 0.0)


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_search_anchors_equal_reference(case):
  num, power, sw, (hq, hk), lq, lk, q_offset, variant = SEARCH_CASES[case]
  config = attn.SuperlinearConfig(sw_index=sw, num_spans=num, search_power=power,
                                  span_power=power, backward_factor=3.0)
  qs, ks = _search_inputs(jax.random.PRNGKey(lq * 7 + lk), hq, hk, lq, lk)
  anchors, scores = pallas_superlinear.search(qs, ks, q_offset, config=config, variant=variant)
  ref_anchors, ref_gates = _reference_search(qs, ks, config, q_offset)
  np.testing.assert_array_equal(anchors, ref_anchors)
  # Scores: the selected stripes' dots (independent gather oracle), -inf if empty.
  want = jnp.where(ref_anchors >= 0, _gather_scores(qs, ks, ref_anchors), -jnp.inf)
  chex.assert_trees_all_close(scores, want, atol=1e-5, rtol=1e-5)
  # Gates = softmax of the gate logits (the search's scores) at the chosen anchors.
  heads_first = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # noqa: E731
  logits = pallas_superlinear.gate_logits(qs, ks, heads_first(anchors), heads_first(scores))
  gates = jax.nn.softmax(jnp.where(anchors >= 0, jnp.transpose(logits, (0, 3, 1, 2)), -1e9),
                         axis=-1)
  chex.assert_trees_all_close(gates, ref_gates, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,depth", [
    ("gpu_interpret", None), ("tpu_interpret", None), ("tpu_checked", 1), ("tpu_checked", 2),
    ("tpu_checked", 3), ("tpu_checked", 4)])
def test_search_at_a_traced_offset_equals_reference(variant, depth, monkeypatch):
  """A traced `q_offset`: the stripe runs each block visits come from the
  traced deltas (binary search in the kernel), not from host tables. TPU:
  `depth` stripe DMAs in flight (`stripe.tpu.DEPTH`), under the
  bounds-checked interpreter whose DMAs land only when waited for: every
  block's run (0 to ~10 stripes here, fewer or more than the depth) gives
  the reference anchors and never reads past its run or the table."""
  if depth is not None:
    monkeypatch.setattr(stripe_tpu, "DEPTH", depth)
  config = attn.SuperlinearConfig(sw_index=1, num_spans=2)
  lq, lk = 19, 53
  qs, ks = _search_inputs(jax.random.PRNGKey(5), 4, 2, lq, lk)
  table = masks.superlinear_stripe_table(lk, config)
  run = jax.jit(lambda off: stripe.search_topk(qs, ks, table, num_spans=2, q_offset=off,
                                               variant=variant, block_q=8))
  for q_offset in (0, 17, lk - lq):
    ref_anchors, _ = _reference_search(qs, ks, config, q_offset)
    anchors, scores = run(jnp.int32(q_offset))
    np.testing.assert_array_equal(anchors, ref_anchors)
    want = jnp.where(ref_anchors >= 0, _gather_scores(qs, ks, ref_anchors), -jnp.inf)
    chex.assert_trees_all_close(scores, want, atol=1e-5, rtol=1e-5)


def test_search_ties_keep_the_farther_stripe_and_bf16():
  """Identical keys: every valid anchor scores the same; the farthest win."""
  config = attn.SuperlinearConfig(sw_index=1, num_spans=3)
  lq = 24
  qs = _normal(jax.random.PRNGKey(1), (1, lq, 2, 8), jnp.bfloat16)
  ks = jnp.ones((1, lq, 1, 8), jnp.bfloat16)
  anchors, _ = pallas_superlinear.search(qs, ks, None, config=config, variant="gpu_interpret")
  ref_anchors, _ = _reference_search(qs, ks, config, None)
  np.testing.assert_array_equal(anchors, ref_anchors)
  # Independent statement of the rule: the smallest valid anchors, ascending.
  f = masks.superlinear_stripe_table(lq, config)
  for i in (5, 17, 23):
    valid = np.sort([i + 1 - x for x in f if i + 1 - x >= 0])[:3]
    valid = np.pad(valid, (0, 3 - valid.size), constant_values=-1)
    np.testing.assert_array_equal(anchors[0, i, 0], valid)


def test_search_rejects_bad_num_spans():
  qs, ks = _search_inputs(jax.random.PRNGKey(0), 2, 1, 8, 8)
  with pytest.raises(ValueError, match="num_spans"):
    stripe.search_topk(qs, ks, np.array([4, 1], np.int32), num_spans=0, q_offset=0)


# -------------------------------------------------------------------- PPA


def _ppa_kernel(q, k, v, *, p, window, q_offset, variant, min_run=masks.PPA_MIN_RUN,
                blocks=BLOCKS):
  lk = k.shape[1]
  runs, far = masks.ppa_dense_runs(
      masks.ppa_offsets(lk - 1, p=p, window=min(window, lk)), min_run)
  return stripe.ppa_attention(q, k, v, dense_runs=runs, far_offsets=far,
                              scale=q.shape[-1] ** -0.5, q_offset=q_offset,
                              variant=variant, **BLOCKS)


def _ppa_ref(q, k, v, *, p, window, q_offset):
  return attn.ppa_attention(q, k, v, p=p, window=window, q_offset=q_offset,
                            implementation="reference")


PPA_CASES = {
    # name: (p, window, dtype, (hq, hk), head_dim, q_len, kv_len, q_offset, variant)
    "p0_w4_gqa": (0.0, 4, jnp.float32, (4, 1), 16, 37, 37, None, "gpu_interpret"),
    "p03_w1_mha": (0.3, 1, jnp.float32, (2, 2), 16, 45, 45, None, "gpu_interpret"),
    "p05_w4_bf16": (0.5, 4, jnp.bfloat16, (4, 1), 16, 41, 41, None, "gpu_interpret"),
    "p075_w4_d40": (0.75, 4, jnp.float32, (2, 1), 40, 39, 39, None, "gpu_interpret"),
    "p1_w64": (1.0, 64, jnp.float32, (2, 2), 16, 33, 33, None, "gpu_interpret"),
    "p05_w64_far": (0.5, 64, jnp.float32, (2, 1), 16, 81, 81, None, "gpu_interpret"),
    "p05_w4_chunk": (0.5, 4, jnp.float32, (4, 2), 16, 13, 40, 27, "gpu_interpret"),
    "p05_w2_gqa62_bf16": (0.5, 2, jnp.bfloat16, (6, 2), 16, 30, 30, None, "gpu_interpret"),
    "p05_w4_d128_tpu": (0.5, 4, jnp.float32, (2, 1), 128, 35, 35, None, "tpu_interpret"),
    # float32 at head_dim > 64 with the default blocks (`_DEFAULT_BLOCKS`): the
    # GPU's 32-row key tiles and dk/dv chunks (`gpu.ppa_rows`), 3 key blocks.
    "p05_w4_d128_gpu": (0.5, 4, jnp.float32, (2, 1), 128, 70, 70, None, "gpu_interpret"),
    "p075_w1_bf16_checked": (0.75, 1, jnp.bfloat16, (2, 1), 16, 24, 24, None,
                             "tpu_checked"),
}


# The TPU-interpreter cases take 20-30 s each on a loaded 2-core machine
# (DMA emulation per stripe and grid step): marked slow, still run in CI.
def _ppa_inputs(dtype, hq, hk, d, lq, lk):
  """`((q, k, v), cotangent key)` of a PPA case, seeded by its lengths."""
  key = jax.random.split(jax.random.PRNGKey(lq + 100 * lk), 4)
  return ((_normal(key[0], (1, lq, hq, d), dtype), _normal(key[1], (1, lk, hk, d), dtype),
           _normal(key[2], (1, lk, hk, d), dtype)), key[3])


_SLOW_PPA = {"p05_w4_d128_tpu", "p075_w1_bf16_checked"}
_DEFAULT_BLOCKS = {"p05_w4_d128_gpu"}   # cases run with the kernels' own block sizes


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_PPA else c for c in PPA_CASES])
def test_ppa_values_and_vjp_match_reference(case):
  p, window, dtype, (hq, hk), d, lq, lk, q_offset, variant = PPA_CASES[case]
  (q, k, v), cot_key = _ppa_inputs(dtype, hq, hk, d, lq, lk)
  kw = dict(p=p, window=window, q_offset=q_offset)
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  blocks = {} if case in _DEFAULT_BLOCKS else BLOCKS
  ph.vjp_check(functools.partial(_ppa_kernel, variant=variant, blocks=blocks, **kw),
               functools.partial(_ppa_ref, **kw), (q, k, v), cot_key, argnums=(0, 1, 2),
               **tol)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_ppa_pipeline_depths_at_a_traced_offset_match_reference(depth, monkeypatch):
  """TPU kernels with `depth` stripe DMAs in flight (`stripe.tpu.DEPTH`; 3
  is the default, run by the cases above) under the bounds-checked
  interpreter (DMAs land when waited for), at a traced `q_offset` (tables
  built on the device): forward and VJP equal the reference."""
  monkeypatch.setattr(stripe_tpu, "DEPTH", depth)
  lq, lk, q_offset = 13, 40, 27
  (q, k, v), cot_key = _ppa_inputs(jnp.float32, 4, 2, 16, lq, lk)
  kw = dict(p=0.5, window=4)
  fn = jax.jit(lambda q, k, v, off: _ppa_kernel(q, k, v, q_offset=off, variant="tpu_checked",
                                                **kw))
  ph.vjp_check(fn, lambda q, k, v, off: _ppa_ref(q, k, v, q_offset=q_offset, **kw),
               (q, k, v, jnp.int32(q_offset)), cot_key, argnums=(0, 1, 2), atol=1e-5,
               rtol=1e-5)


def test_ppa_ignores_nan_junk_beyond_the_cache_end():
  """A KV cache holding NaN past the last query: same values as the cache
  cut at the last query, and exactly zero gradients to the junk rows."""
  lq, filled, cache, q_offset = 13, 40, 48, 27
  key = jax.random.split(jax.random.PRNGKey(5), 4)
  q = _normal(key[0], (1, lq, 4, 16))
  k = _normal(key[1], (1, cache, 2, 16)).at[:, filled:].set(jnp.nan)
  v = _normal(key[2], (1, cache, 2, 16)).at[:, filled:].set(jnp.nan)
  kw = dict(p=0.5, window=4, q_offset=q_offset)
  out, pull = jax.vjp(functools.partial(_ppa_kernel, variant="gpu_interpret", **kw), q, k, v)
  ref, ref_pull = jax.vjp(functools.partial(_ppa_ref, **kw), q, k[:, :filled], v[:, :filled])
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  ct = _normal(key[3], out.shape)
  (dq, dk, dv), (rq, rk, rv) = pull(ct), ref_pull(ct)
  chex.assert_trees_all_close((dq, dk[:, :filled], dv[:, :filled]), (rq, rk, rv),
                              atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(dk[:, filled:], 0)
  np.testing.assert_array_equal(dv[:, filled:], 0)


# `attn.ppa_attention(implementation="pallas")` (prefill and decode kernels):
# tests/test_op_suite.py.


# ------------------------------------------------------------ PPA routing


def _plain_kept(max_offset, p, window):
  return attn_oracles.ppa_kept_offsets(max_offset, p, window)


def _plain_split(kept):
  """Runs of consecutive kept offsets: the one holding 0 and those of at
  least `PPA_MIN_RUN` offsets are dense runs, the rest far offsets."""
  runs, far, cur = [], [], []
  for d in sorted(kept) + [None]:
    if cur and (d is None or d != cur[-1] + 1):
      if cur[0] == 0 or len(cur) >= masks.PPA_MIN_RUN:
        runs.append((cur[0], cur[-1]))
      else:
        far += cur
      cur = []
    if d is not None:
      cur.append(d)
  return runs, far


def _plain_routing(lq, lk, p, window, bq, bk, group, head_dim, itemsize):
  """Plain loops, per query block and kv head: the stripes' bytes (dense-run
  key tiles + `bq` rows per far offset up to the block's last query, K and
  V) and
  the tiles' (`group` x (`bk` K and V rows per tile holding a kept (query,
  key) pair + an int32 diagonal mask row of bq + bk - 1 entries in whole
  128-lane rows per such tile not entirely kept, none when the kept offsets
  are 0 .. w - 1: a band layout)); then the longest run of final blocks
  whose stripes load less takes them, unless the first blocks save less
  than reading and writing every output row again (the concat of a split)."""
  kept = _plain_kept(lk - 1, p, min(window, lk))
  runs, far = _plain_split(kept)
  band = kept == set(range(len(kept)))
  row = 2 * head_dim * itemsize
  stripe_bytes, tile_bytes, tiles, masked = [], [], [], []
  for r0 in range(0, lq, bq):
    pos = [lk - lq + r for r in range(r0, min(r0 + bq, lq))]
    rows = bq * sum(1 for d in far if d <= pos[-1])   # a key >= 0 for the block's last row
    for lo, hi in runs:
      c = max(pos[0] - hi, 0)
      while c <= pos[-1] - lo:      # key tiles from the run's first key of the block
        rows += bk
        c += bk
    stripe_bytes.append(rows * row)
    n = m = 0
    for c0 in range(0, lk, bk):
      seen = [t - c in kept for t in pos for c in range(c0, min(c0 + bk, lk))]
      n += any(seen)
      m += any(seen) and not all(seen) and not band
    tiles.append(n)
    masked.append(m)
    lanes = 128 * ((bq + bk - 1 + 127) // 128)      # one int32 mask row per diagonal
    tile_bytes.append(group * (n * bk * row + m * lanes * 4))
  num_stripes = 0
  while (num_stripes < len(tiles)
         and stripe_bytes[-1 - num_stripes] < tile_bytes[-1 - num_stripes]):
    num_stripes += 1
  routed = len(tiles) - num_stripes
  saved = sum(stripe_bytes[i] - tile_bytes[i] for i in range(routed))
  if 0 < routed < len(tiles) and saved <= 2 * group * lq * head_dim * itemsize:
    routed = 0                                       # the output concat costs more
  return (np.array(stripe_bytes), np.array(tile_bytes), np.array(tiles), np.array(masked),
          routed)


@pytest.mark.parametrize("lq, lk, p, window, bq, bk, group, head_dim", [
    (96, 96, 0.5, 8, 16, 16, 2, 16), (90, 96, 0.75, 16, 16, 32, 4, 8),
    (70, 70, 0.9, 4, 32, 16, 3, 64), (64, 64, 1.0, 8, 16, 16, 1, 16),
    (64, 64, 1.0, 8, 16, 16, 2, 16), (50, 80, 0.3, 1, 16, 16, 1, 32),
    (128, 128, 0.5, 4, 16, 16, 2, 16), (45, 75, 0.6, 3, 16, 16, 1, 16)])
def test_ppa_routing_rule_counts_the_bytes_each_path_loads(lq, lk, p, window, bq, bk, group,
                                                           head_dim):
  plan = ppa_routing.ppa_routing(lq, lk, p=p, window=window, block_q=bq, block_k=bk,
                                 group=group, head_dim=head_dim, itemsize=2)
  stripe_bytes, tile_bytes, tiles, masked, num_routed = _plain_routing(
      lq, lk, p, window, bq, bk, group, head_dim, 2)
  np.testing.assert_array_equal(plan.tiles, tiles)
  np.testing.assert_array_equal(plan.mask_tiles, masked)
  np.testing.assert_array_equal(plan.tile_bytes, tile_bytes)
  np.testing.assert_array_equal(plan.stripe_bytes, stripe_bytes)
  assert plan.num_routed == num_routed
  # Every block loads at most its tiles' bytes; their K/V rows are at most
  # dense causal tiles'.
  loads = np.where(plan.routed, tile_bytes, stripe_bytes)
  assert np.all(loads <= tile_bytes)
  causal = [-(-(lk - lq + min(r0 + bq, lq)) // bk) for r0 in range(0, lq, bq)]
  assert np.all(tiles <= np.array(causal))
  # Segments: tiles then stripes, covering every query row.
  cut = min(num_routed * bq, lq)
  want = [(0, cut, True), (cut, lq, False)]
  assert plan.segments() == tuple(seg for seg in want if seg[1] > seg[0])


def test_ppa_routing_table_budget_routes_the_first_blocks_that_fit():
  kw = dict(p=0.9, window=4, block_q=16, block_k=16)
  full = ppa_routing.ppa_routing(96, 96, **kw)
  assert full.num_routed == 6                       # every block on the tiles
  tiles = full.tiles
  budget = int(tiles[:3].sum()) + 1                 # room for three blocks, not four
  capped = ppa_routing.ppa_routing(96, 96, max_tiles=budget, **kw)
  assert capped.num_routed == 3
  assert capped.segments() == ((0, 48, True), (48, 96, False))
  assert ppa_routing.ppa_routing(96, 96, max_tiles=0, **kw).segments() == ((0, 96, False),)


def _routed_shape(lq, lk, n, *, p, window, block_q, block_k):
  """Oracle: `TableShape` of the real host tables of the first `n` routed blocks."""
  r1 = min(n * block_q, lq)
  layout = ppa_routing.ppa_layout(r1, lk - lq + r1, q_offset=lk - lq, p=p, window=window,
                                  block_q=block_q, block_k=block_k)
  if layout.band is not None:
    return ppa_routing.TableShape(n, 1, layout.num_k_blocks, 1, layout.num_active_blocks, True)
  t = pallas_block_sparse.host_tables(layout)
  return ppa_routing.TableShape(n, t.kv_blocks.shape[1], layout.num_k_blocks,
                                t.kv_blocks_t.shape[1], layout.num_active_blocks, False)


@dataclasses.dataclass(frozen=True)
class _Cap:
  """A monotone table budget: `shape.<field> <= limit`."""
  field: str
  limit: int

  def __call__(self, shape):
    return getattr(shape, self.field) <= self.limit


@pytest.mark.parametrize("lq, lk, p, window, bq, bk, head_dim", [
    (96, 96, 0.9, 4, 16, 16, 128), (80, 112, 0.75, 4, 16, 32, 128),
    (70, 96, 0.9, 2, 32, 16, 128)])
def test_ppa_routing_fits_sees_the_real_table_shapes(lq, lk, p, window, bq, bk, head_dim):
  kw = dict(p=p, window=window, block_q=bq, block_k=bk)
  full = ppa_routing.ppa_routing(lq, lk, head_dim=head_dim, **kw).num_routed
  assert full >= 3
  shapes = [_routed_shape(lq, lk, n, **kw) for n in range(1, full + 1)]
  for field in ("num_q_blocks", "width", "num_k_blocks", "width_t", "tiles"):
    for limit in sorted({getattr(s, field) for s in shapes}):
      fits = _Cap(field, limit)
      want = next((n for n, s in enumerate(shapes) if not fits(s)), full)
      plan = ppa_routing.ppa_routing(lq, lk, head_dim=head_dim, fits=fits, **kw)
      saved = int(np.sum(plan.stripe_bytes[:want] - plan.tile_bytes[:want]))
      if 0 < want < plan.tiles.size and saved <= 2 * lq * head_dim * 2:
        want = 0                       # too few blocks to pay for the split's concat
      assert plan.num_routed == want, (field, limit)


def _prefetch(lq, lk, n, **kw):
  """Real forward/dq and dkv SMEM bytes of the first `n` routed blocks' tables."""
  s = _routed_shape(lq, lk, n, **kw)
  mode = "band" if s.band else "table"
  return (block_sparse_tpu.table_bytes(mode, s.num_q_blocks, s.width),
          block_sparse_tpu.table_bytes(mode, s.num_k_blocks, s.width_t))


# 16 blocks of 16 rows, all cheaper on the tiles at p = 0.75; their tables (16 x 16
# slots) take 3072 B a pass, over a 2560 B budget, which leaves 11 blocks (11 x 11).
BUDGET_CASE = dict(p=0.75, window=4, block_q=16, block_k=16)


def test_smem_budget_keeps_the_routed_tables_within_it():
  kw, budget = BUDGET_CASE, 2560
  full = ppa_routing.ppa_routing(256, 256, **kw)
  assert full.num_routed == 16 and max(_prefetch(256, 256, 16, **kw)) > budget
  plan = ppa_routing.ppa_routing(256, 256, fits=pallas_ppa.SmemBudget(budget), **kw)
  assert plan.num_routed == 11
  assert max(_prefetch(256, 256, 11, **kw)) <= budget < max(_prefetch(256, 256, 12, **kw))
  assert plan.segments() == ((0, 176, True), (176, 256, False))


def test_routed_prefill_within_smem_budget_matches_reference():
  kw = BUDGET_CASE
  (q, k, v), cot_key = _ppa_inputs(jnp.float32, 2, 1, 8, 256, 256)
  fn = functools.partial(pallas_ppa.routed_prefill, p=kw["p"], window=kw["window"], scale=0.3,
                         variant="gpu_interpret", block_q=16, block_k=16,
                         table_budget=pallas_ppa.SmemBudget(2560))
  ref = functools.partial(attn.ppa_attention, p=kw["p"], window=kw["window"], scale=0.3,
                          implementation="reference")
  ph.vjp_check(fn, ref, (q, k, v), cot_key, argnums=(0, 1, 2), atol=1e-5, rtol=1e-5)


def test_routed_prefill_targeting_tpu_is_never_refused_for_smem():
  """Unbudgeted, all 512 blocks take the tiles (head_dim 128, bf16: the
  routing's own defaults) and their tables (512 x 512 slots) would exceed
  SMEM, so `check_smem` would raise while tracing for the TPU kernels."""
  kw = dict(p=0.75, window=4, block_q=16, block_k=16)
  assert ppa_routing.ppa_routing(8192, 8192, **kw).num_routed == 512
  assert min(_prefetch(8192, 8192, 512, **kw)) > block_sparse_tpu.SMEM_BUDGET
  q = jax.ShapeDtypeStruct((1, 8192, 1, 128), jnp.bfloat16)

  def grads(**budget):
    fn = functools.partial(pallas_ppa.routed_prefill, scale=0.3, variant="tpu", **kw, **budget)
    return jax.eval_shape(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)), q, q, q)
  chex.assert_shape(grads(), [(1, 8192, 1, 128)] * 3)
  with pytest.raises(ValueError, match="SMEM"):         # a budget that admits every block
    grads(table_budget=_Cap("num_q_blocks", 1 << 30))
  n = ppa_routing.ppa_routing(8192, 8192, fits=pallas_ppa.SmemBudget(), **kw).num_routed
  assert 0 < n < 512 and max(_prefetch(8192, 8192, n, **kw)) <= block_sparse_tpu.SMEM_BUDGET


def test_ppa_routing_rejects_bad_blocks():
  with pytest.raises(ValueError, match="block_q"):
    ppa_routing.ppa_routing(64, 64, p=0.5, window=4, block_q=24, block_k=16)
  with pytest.raises(ValueError, match="group"):
    ppa_routing.ppa_routing(64, 64, p=0.5, window=4, block_q=16, block_k=16, group=0)
  with pytest.raises(ValueError, match="max_tiles"):
    ppa_routing.ppa_routing(64, 64, p=0.5, window=4, block_q=16, block_k=16, max_tiles=-1)


@pytest.mark.parametrize("lq, lk, q_offset, p, window, bq, bk", [
    (40, 90, 35, 0.75, 4, 16, 32), (37, 37, 0, 0.5, 8, 16, 16), (48, 64, 16, 0.9, 2, 32, 16),
    (40, 64, 24, 1.0, 8, 16, 16), (33, 50, 10, 0.0, 6, 16, 32)])
def test_ppa_layout_is_the_ppa_mask(lq, lk, q_offset, p, window, bq, bk):
  layout = ppa_routing.ppa_layout(lq, lk, q_offset=q_offset, p=p, window=window,
                                  block_q=bq, block_k=bk)
  assert (layout.band is not None) == (p in (0.0, 1.0))   # causal / window: no mask tiles
  kept = _plain_kept(lk - 1, p, min(window, lk))
  want = np.array([[q_offset + i - j in kept for j in range(lk)] for i in range(lq)])
  np.testing.assert_array_equal(layout.to_mask(), want)
  tiles = sum(bool(want[i:i + bq, j:j + bk].any())
              for i in range(0, lq, bq) for j in range(0, lk, bk))
  assert layout.num_active_blocks == tiles


# name: (p, window, (hq, hk), q_len, kv_len, blocks, dtype, which paths run);
# blocks None: through `attn.ppa_attention(implementation="pallas")` (default
# blocks, the default variant: TPU interpret on CPU).
ROUTED_CASES = {
    "p065_mixed_gqa_chunk": (0.65, 2, (2, 1), 192, 256, 16, jnp.float32, {True, False}),
    "p045_mixed": (0.45, 2, (1, 1), 128, 128, 16, jnp.float32, {True, False}),
    "p09_tiles_bf16": (0.9, 4, (1, 1), 48, 48, 16, jnp.bfloat16, {True}),
    "p1_op_all_tiles": (1.0, 8, (1, 1), 32, 32, None, jnp.float32, {True}),
}


@pytest.mark.parametrize("case", list(ROUTED_CASES))
def test_routed_prefill_values_and_vjp_match_reference(case):
  p, window, (hq, hk), lq, lk, blk, dtype, paths = ROUTED_CASES[case]
  blocks = ((ppa_routing.default_block(lq), ppa_routing.default_block(lk)) if blk is None
            else (blk, blk))
  plan = ppa_routing.ppa_routing(lq, lk, p=p, window=window, block_q=blocks[0],
                                 block_k=blocks[1], group=hq // hk, head_dim=16,
                                 itemsize=jnp.dtype(dtype).itemsize)
  assert {routed for _, _, routed in plan.segments()} == paths
  (q, k, v), cot_key = _ppa_inputs(dtype, hq, hk, 16, lq, lk)
  if blk is None:
    fn = functools.partial(attn.ppa_attention, p=p, window=window, scale=0.25,
                           implementation="pallas")
  else:
    fn = functools.partial(pallas_ppa.routed_prefill, p=p, window=window, scale=0.25,
                           variant="gpu_interpret", block_q=blk, block_k=blk)
  if p == 1.0:   # every block on the tiles of a causal band layout: dense attention
    ref = functools.partial(attn.dense_attention, scale=0.25, implementation="reference")
  else:
    ref = functools.partial(attn.ppa_attention, p=p, window=window, scale=0.25,
                            implementation="reference")
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  ph.vjp_check(fn, ref, (q, k, v), cot_key, argnums=(0, 1, 2), **tol)


# --------------------------------------------------------------- lowering


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_forward_and_backward_lower_with_the_platform_kernel(target):
  s = jax.ShapeDtypeStruct
  q, k = s((1, 64, 4, 40), jnp.bfloat16), s((1, 64, 2, 40), jnp.bfloat16)
  table = masks.superlinear_stripe_table(64, attn.SuperlinearConfig())
  search = lambda a, b: stripe.search_topk(a, b, table, num_spans=3, q_offset=0)  # noqa: E731
  ph.assert_kernel_in(ph.export_text(search, target, q, k), target)

  runs, far = masks.ppa_dense_runs(masks.ppa_offsets(63, p=0.5, window=8))
  ppa = functools.partial(stripe.ppa_attention, dense_runs=runs, far_offsets=far,
                          scale=0.2, q_offset=0)

  def ppa_vjp(a, b, c):
    out, pull = jax.vjp(ppa, a, b, c)
    return out, pull(jnp.ones(out.shape, out.dtype))
  ph.assert_kernel_in(ph.export_text(ppa_vjp, target, q, k, k), target, at_least=3)


def _tpu_kernel_operands(text: str, results_only: bool = False):
  """Shapes of the operands and results (or results only) of every TPU kernel
  in an exported module's text."""
  shapes = []
  for line in text.splitlines():
    if "@tpu_custom_call" in line:
      part = line.rsplit("->", 1)[-1] if results_only else line.rsplit(":", 1)[-1]
      shapes += [tuple(int(x) for x in m.split("x")[:-1])
                 for m in re.findall(r"tensor<([0-9x]*[a-z][a-z0-9]*)>", part)]
  return shapes


def test_tpu_search_outputs_are_lane_dense():
  """The TPU search writes anchors / scores as `[B, Hq, nq, K, block_q]`
  (query axis minor), not `[B, Hq, L, K]` (a `K`-lane minor dim that TPU
  layouts pad to 128 lanes); the entry keeps its shapes."""
  s = jax.ShapeDtypeStruct
  q, k = s((1, 64, 4, 40), jnp.bfloat16), s((1, 64, 2, 40), jnp.bfloat16)
  table = masks.superlinear_stripe_table(64, attn.SuperlinearConfig())
  search = lambda a, b: stripe.search_topk(a, b, table, num_spans=3, q_offset=0,  # noqa: E731
                                           variant="tpu")
  assert _tpu_kernel_operands(ph.export_text(search, "tpu", q, k), results_only=True) == [
      (1, 4, 1, 4, 64), (1, 4, 1, 4, 64)]
  assert [x.shape for x in jax.eval_shape(search, q, k)] == [(1, 64, 4, 3)] * 2


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_routed_prefill_lowers_both_paths_with_the_platform_kernels(target):
  s = jax.ShapeDtypeStruct
  q, k = s((1, 192, 2, 32), jnp.bfloat16), s((1, 256, 1, 32), jnp.bfloat16)
  kw = dict(p=0.65, window=2, block_q=16, block_k=16)
  plan = ppa_routing.ppa_routing(192, 256, group=2, head_dim=32, itemsize=2, **kw)
  assert {routed for _, _, routed in plan.segments()} == {True, False}
  fn = functools.partial(pallas_ppa.routed_prefill, scale=0.2, **kw)

  def fn_vjp(a, b, c):
    out, pull = jax.vjp(fn, a, b, c)
    return out, pull(jnp.ones(out.shape, out.dtype))
  # Forward, dq and dk/dv kernels of each path.
  ph.assert_kernel_in(ph.export_text(fn_vjp, target, q, k, k), target, at_least=6)


# ------------------------------------------------------ compiled (GPU only)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["k2_p055_s1_gqa", "k3_p05_s2_chunk"])
def test_search_compiled_on_gpu(case):
  num, power, sw, (hq, hk), lq, lk, q_offset, _ = SEARCH_CASES[case]
  config = attn.SuperlinearConfig(sw_index=sw, num_spans=num, search_power=power,
                                  span_power=power, backward_factor=3.0)
  qs, ks = _search_inputs(jax.random.PRNGKey(lq * 7 + lk), hq, hk, lq, lk)
  anchors, _ = pallas_superlinear.search(qs, ks, q_offset, config=config, variant="gpu")
  np.testing.assert_array_equal(anchors, _reference_search(qs, ks, config, q_offset)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["p05_w4_bf16", "p1_w64", "p05_w4_chunk"])
def test_ppa_compiled_on_gpu(case):
  p, window, dtype, (hq, hk), d, lq, lk, q_offset, _ = PPA_CASES[case]
  (q, k, v), cot_key = _ppa_inputs(dtype, hq, hk, d, lq, lk)
  kw = dict(p=p, window=window, q_offset=q_offset)
  tol = dict(atol=1e-3, rtol=1e-3) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  ph.vjp_check(functools.partial(_ppa_kernel, variant="gpu", **kw),
               functools.partial(_ppa_ref, **kw), (q, k, v), cot_key, argnums=(0, 1, 2),
               **tol)
