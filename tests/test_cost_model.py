"""The cost model (`pallas_kernels/cost/`) against what the kernels really load.

Each kernel runs in GPU interpret mode at a tiny size with its row loads
recorded (a `jax.debug.callback` wrapped around the load helper the kernel
body calls, so every loop iteration is counted at run time). Two oracles,
both plain code:

  * the visit counts (tiles, stripes, key blocks, decode windows) from
    numpy / Python loops over the mask or the offsets, never from the tables
    the kernels or the model use;
  * the model's `bytes_accessed` = the recorded loads (rows x padded
    head_dim x itemsize) plus each program's own blocks (q in, o out, ...)
    written out here as arithmetic.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import masks, ppa_routing
from pallas_kernels import block_sparse, cost, span, stripe
from pallas_kernels.block_sparse import gpu as bs_gpu
from pallas_kernels.decode import common as dec_common
from pallas_kernels.decode import gpu as dec_gpu
from pallas_kernels.decode import ops as dec_ops
from pallas_kernels.span import gpu as span_gpu
from pallas_kernels.stripe import gpu as stripe_gpu

F32 = 4
V = "gpu_interpret"


class Loads:
  """Records `(name, rows)` of every load made through a patched helper."""

  def __init__(self):
    self.log = []

  def note(self, name, rows, start):
    jax.debug.callback(lambda s: self.log.append((name, rows)), start)

  def count(self, name=None, rows=None):
    return sum(1 for n, r in self.log if (name is None or n == name)
               and (rows is None or r == rows))

  def rows(self, name=None):
    return sum(r for n, r in self.log if name is None or n == name)


def _flush(x):
  jax.block_until_ready(x)
  jax.effects_barrier()


@pytest.fixture
def loads(monkeypatch):
  rec = Loads()
  orig_bs = bs_gpu._load_rows
  monkeypatch.setattr(bs_gpu, "_load_rows",
                      lambda ref, start, size: (rec.note("kv", size, start),
                                                orig_bs(ref, start, size))[1])
  orig_rows = stripe_gpu._GpuCtx.rows

  def rows(self, name, start, n, u, g=None):
    rec.note(name, n, start)
    return orig_rows(self, name, start, n, u, g)

  monkeypatch.setattr(stripe_gpu._GpuCtx, "rows", rows)
  orig_span = span_gpu._load
  monkeypatch.setattr(span_gpu, "_load", lambda ref, start, size, head=None: (
      rec.note("span", size, start), orig_span(ref, start, size, head))[1])
  orig_ws = dec_common.window_start

  def window_start(start, *, align, n_buf, kv_len):
    rec.note("window", n_buf, start)
    return orig_ws(start, align=align, n_buf=n_buf, kv_len=kv_len)

  monkeypatch.setattr(dec_common, "window_start", window_start)
  orig_gather = dec_gpu._gather_rows

  def gather_rows(ref, b, keys, h, ok):
    jax.debug.callback(lambda n: rec.log.append(("gather", int(n))), jnp.sum(ok))
    return orig_gather(ref, b, keys, h, ok)

  monkeypatch.setattr(dec_gpu, "_gather_rows", gather_rows)
  return rec


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


# --------------------------------------------------------------- block-sparse


def _nonempty_tiles(mask, bq, bk):
  """Plain oracle: tiles of a dense bool mask holding a True entry."""
  n = 0
  for i in range(0, mask.shape[0], bq):
    for j in range(0, mask.shape[1], bk):
      n += bool(mask[i:i + bq, j:j + bk].any())
  return n


def _padded(rows, width):
  """`[n, width]` int32, each row padded by repeating its last entry."""
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if len(r):
      out[i, :len(r)], out[i, len(r):] = r, r[-1]
  return out


def _full_tile_tables(blocks, l, bs):
  """Kernel tables of a tile mask whose listed tiles are all visible (plain loops)."""
  rows = [np.nonzero(r)[0] for r in blocks]
  cols = [np.nonzero(c)[0] for c in blocks.T]
  w, wt = max(map(len, rows)), max(max(map(len, cols)), 1)
  tiles = np.stack([np.zeros((bs, bs), np.int32), np.ones((bs, bs), np.int32)])
  return block_sparse.HostTables(
      kv_blocks=_padded(rows, w), num_kv_blocks=np.array([len(r) for r in rows], np.int32),
      mask_ids=np.where(_padded([np.ones(len(r)) for r in rows], w) > 0, 1, 0).astype(np.int32),
      kv_blocks_t=_padded(cols, wt), num_kv_blocks_t=np.array([len(c) for c in cols], np.int32),
      mask_ids_t=np.where(_padded([np.ones(len(c)) for c in cols], wt) > 0, 1, 0).astype(np.int32),
      block_masks=tiles, keys_seen=np.ones((l,), bool), q_len=l, kv_len=l, block_q=bs, block_k=bs)


def _cases(l):
  """`name -> (layout, kernel fn(q, k, v), dense mask)`."""
  rng = np.random.default_rng(0)
  blocks = rng.random((l // 16, l // 16)) < 0.3
  blocks[np.arange(l // 16), rng.integers(0, l // 16, l // 16)] = True
  qi, ki = np.arange(l)[:, None], np.arange(l)[None, :]
  band = lambda w: lambda q, k, v: block_sparse.band_attention(  # noqa: E731
      q, k, v, None, window=w, scale=0.25, block_q=16, block_k=16, variant=V)
  tables = _full_tile_tables(blocks, l, 16)
  return {
      "causal": (attn.BlockLayout.causal(l, block_q=16, block_k=16), band(None), ki <= qi),
      "window": (attn.BlockLayout.sliding_window(l, window=20, block_q=16, block_k=16),
                 band(20), (ki <= qi) & (qi - ki < 20)),
      "random": (attn.BlockLayout.from_block_mask(blocks, l, l, block_q=16, block_k=16),
                 lambda q, k, v: block_sparse.table_attention(q, k, v, tables, scale=0.25,
                                                              variant=V),
                 np.kron(blocks, np.ones((16, 16), bool)).astype(bool)),
  }


@pytest.mark.parametrize("name", ["causal", "window", "random"])
def test_block_sparse_fwd_and_dq_bytes(loads, name):
  b, l, hq, hk, d = 1, 64, 2, 1, 16
  layout, fn, dense_mask = _cases(l)[name]
  tiles = _nonempty_tiles(dense_mask, 16, 16)
  assert layout.num_active_blocks == tiles            # what eval/roofline_model.py feeds the model
  q, k, v = _normal(0, (b, l, hq, d)), _normal(1, (b, l, hk, d)), _normal(2, (b, l, hk, d))
  _flush(fn(q, k, v))
  assert loads.count("kv", 16) == 2 * b * hq * tiles   # K and V per tile and query head
  kw = dict(batch=b, q_heads=hq, kv_heads=hk, head_dim=d, tiles=tiles, block_q=16,
            block_k=16, itemsize=4)
  fwd = cost.block_sparse_fwd(num_q_blocks=l // 16, **kw)
  own = b * hq * l * (2 * d * 4 + F32)                 # q in, o out, lse out
  assert fwd.bytes_accessed == loads.rows("kv") * d * 4 + own
  assert fwd.flops == 4 * b * hq * tiles * 16 * 16 * d
  loads.log.clear()
  _flush(jax.grad(lambda q: fn(q, k, v).sum())(q))     # forward again, then dq and dkv
  dq_loads = loads.count("kv", 16) - 2 * b * hq * tiles
  assert dq_loads == 2 * b * hq * tiles
  dq = cost.block_sparse_dq(num_q_blocks=l // 16, **kw)
  assert dq.bytes_accessed == dq_loads * 16 * d * 4 + b * hq * l * (3 * d * 4 + 2 * F32)
  shared = cost.block_sparse_fwd(num_q_blocks=l // 16, gqa_shared_reads=True, **kw)
  assert fwd.bytes_accessed - shared.bytes_accessed == (hq - hk) * tiles * 2 * 16 * d * 4


# ------------------------------------------------------------------ stripes


def _num_stripes(l, config):
  """Plain loop: stripes j > s with floor(j ** (1/p)) <= L, at least num_spans."""
  j, n = config.sw_index + 1, 0
  while math.floor(j ** (1 / config.search_power) + 1e-9) <= l:
    n, j = n + 1, j + 1
  return max(n, config.num_spans)


def _search_visits(l, config, bq):
  """Plain loops: (query block, stripe) pairs where some query `i` of the
  block has its stripe-`j` anchor `i + 1 - floor(j ** (1/p))` in `[0, l)`."""
  n, j = 0, config.sw_index + 1
  offsets = []
  while math.floor(j ** (1 / config.search_power) + 1e-9) <= l:
    offsets.append(math.floor(j ** (1 / config.search_power) + 1e-9))
    j += 1
  for i0 in range(0, l, bq):
    for f in offsets:
      n += any(0 <= i + 1 - f < l for i in range(i0, i0 + bq))
  return n


@pytest.mark.parametrize("l,sw_index", [(48, 1), (64, 2)])
def test_stripe_search_bytes(loads, l, sw_index):
  b, hq, hk, ds, bq = 1, 4, 2, 8, 16
  config = attn.SuperlinearConfig(sw_index=sw_index, num_spans=2)
  s = _num_stripes(l, config)
  qs, ks = _normal(3, (b, l, hq, ds)), _normal(4, (b, l, hk, ds))
  table = masks.superlinear_stripe_table(l, config)
  anchors, _ = stripe.search_topk(qs, ks, table, num_spans=2, q_offset=0, variant=V,
                                  block_q=bq)
  _flush(anchors)
  nq, dp = l // bq, 16
  visits = _search_visits(l, config, bq)
  # A program visits only the stripes with an anchor in its block: fewer
  # than every stripe in every block (the first block sees few of them).
  assert visits < nq * s
  assert loads.count("ks", bq) == b * hk * visits     # one program per kv head
  model = cost.stripe_search(batch=b, q_heads=hq, kv_heads=hk, head_dim=ds, q_len=l,
                             stripes=s, num_spans=2, block_q=bq, itemsize=4,
                             visits=cost.stripe_visits(1 - table, q_blocks=nq, block_q=bq,
                                                       kv_len=l))
  own = b * hq * l * (dp * 4 + 2 * 2 * 4)             # q rows in, scores + anchors out
  assert model.bytes_accessed == loads.rows("ks") * dp * 4 + own


def _ppa_far(max_offset, p, window):
  """Plain loop: kept offsets d >= window with floor(d^p) > floor((d-1)^p)."""
  far = []
  for d in range(max(window, 1), max_offset + 1):
    if math.floor(d ** p + 1e-12) > math.floor((d - 1) ** p + 1e-12):
      far.append(d)
  return far


def _ppa_visits(far, l, block, transposed=False):
  """Plain loop (q_offset 0, q_len = kv_len = l): (block, far offset) pairs
  with a kept row: some query row r of the block meets key r - f in
  [0, l) (forward, dq), or some key x of the block query x + f in [0, l)
  (dk/dv)."""
  n = 0
  for r0 in range(0, l, block):
    for f in far:
      rows = range(r0, r0 + block)
      n += any(0 <= (x + f if transposed else x - f) < l for x in rows)
  return n


def test_ppa_fwd_dq_dkv_bytes(loads):
  b, l, hq, hk, d, bq, bk, w, p = 1, 64, 2, 1, 16, 16, 32, 8, 0.5
  far = _ppa_far(l - 1, p, w)
  q, k, v = _normal(5, (b, l, hq, d)), _normal(6, (b, l, hk, d)), _normal(7, (b, l, hk, d))
  fn = lambda q, k, v: stripe.ppa_attention(  # noqa: E731
      q, k, v, dense_runs=((0, w - 1),), far_offsets=far, scale=0.25, q_offset=0,
      variant=V, block_q=bq, block_k=bk)
  _flush(fn(q, k, v))
  nq, nk = l // bq, l // bk
  band = cost.band_chunks(l, l, 0, 0, w - 1, bk, bq)
  visits, visits_t = _ppa_visits(far, l, bq), _ppa_visits(far, l, bk, transposed=True)
  # A block skips the stripes that reach before key 0 (forward, dq) or past
  # the last query (dk/dv): fewer than every far stripe in every block.
  assert visits < nq * len(far) and visits_t < nk * len(far)
  vis = functools.partial(cost.ppa_stripe_visits, far, q_len=l, kv_len=l, q_offset=0)
  assert vis(block=bq) == visits and vis(block=bk, transposed=True) == visits_t
  assert loads.count("k", bq) == b * hk * visits             # the visited stripes per block
  assert loads.count("k", bk) == b * hk * band               # once per kv head
  kw = dict(batch=b, q_heads=hq, kv_heads=hk, head_dim=d, far_offsets=len(far),
            block_q=bq, block_k=bk, itemsize=4)
  fwd = cost.ppa_fwd(q_len=l, band_tiles=band, visits=visits, **kw)
  assert fwd.bytes_accessed == ((loads.rows("k") + loads.rows("v")) * d * 4
                                + b * hq * l * (2 * d * 4 + F32))
  loads.log.clear()
  _flush(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v))
  dq = cost.ppa_dq(q_len=l, band_tiles=band, visits=visits, **kw)
  dq_kv = (loads.rows("k") + loads.rows("v")) // 2          # forward again, then dq
  assert dq.bytes_accessed == dq_kv * d * 4 + b * hq * l * (2 * d * 4 + d * 4 + 2 * F32)
  band_t = cost.band_chunks(l, l, 0, 0, w - 1, bq, bk, transposed=True)
  assert loads.count("q", bq) == b * hq * band_t
  assert loads.count("q", bk) == b * hq * visits_t
  dkv = cost.ppa_dkv(kv_len=l, band_chunks_t=band_t, visits=visits_t, **kw)
  q_rows = loads.rows("q")
  assert dkv.bytes_accessed == (q_rows * (2 * d * 4 + 2 * F32)
                                + b * hk * l * (2 * d * 4 + 2 * d * 4))


# --------------------------------------------------------------------- span


def test_span_fwd_and_bwd_bytes(loads):
  b, h, r, lk, d, bq, bk = 1, 2, 48, 96, 16, 16, 32
  rng = np.random.default_rng(1)
  lo = rng.integers(0, lk - 20, (b, h, r))
  hi = lo + rng.integers(-3, 20, (b, h, r))                # some rows empty (hi < lo)
  order = np.argsort(np.where(hi >= lo, lo, 10 ** 6), axis=-1)
  lo, hi = np.take_along_axis(lo, order, -1), np.take_along_axis(hi, order, -1)
  blocks = 0                                               # plain oracle, tile by tile
  for bb in range(b):
    for hh in range(h):
      for t in range(0, r, bq):
        ok = hi[bb, hh, t:t + bq] >= lo[bb, hh, t:t + bq]
        if ok.any():
          blocks += (hi[bb, hh, t:t + bq][ok].max() // bk
                     - lo[bb, hh, t:t + bq][ok].min() // bk + 1)
  q, k, v = _normal(8, (b, h, r, d)), _normal(9, (b, h, lk, d)), _normal(10, (b, h, lk, d))
  o, _ = span.interval_attention(q, k, v, jnp.asarray(lo, jnp.int32),
                                     jnp.asarray(hi, jnp.int32), scale=0.25, block_q=bq,
                                     block_k=bk, variant=V)
  _flush(o)
  assert loads.count("span", bk) == 2 * blocks
  model = cost.span_fwd(batch=b, heads=h, head_dim=d, rows=r, key_blocks=blocks,
                        block_q=bq, block_k=bk, itemsize=4)
  assert model.bytes_accessed == (loads.rows("span") * d * 4
                                  + b * h * r * (d * 4 + 8 + d * 4 + 4))
  # Backward: dq revisits the forward's key blocks; dkv loads q, do, lse,
  # delta, lo, hi (bq rows each) per row tile in each key block's range,
  # which holds every tile visiting that block.
  loads.log.clear()
  lo_j, hi_j = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
  f = lambda q, k, v: span.interval_attention(q, k, v, lo_j, hi_j, scale=0.25,  # noqa: E731
                                              block_q=bq, block_k=bk, variant=V)[0].sum()
  _flush(jax.grad(f, argnums=(0, 1, 2))(q, k, v))
  assert loads.count("span", bk) == 2 * 2 * blocks             # forward again, then dq
  visits_t = loads.count("span", bq) // 6
  assert loads.count("span", bq) == 6 * visits_t and visits_t >= blocks
  bwd = cost.span_bwd(batch=b, heads=h, head_dim=d, rows=r, kv_len=lk, key_blocks=blocks,
                      tile_visits_t=visits_t, block_q=bq, block_k=bk, itemsize=4)
  dq_own = b * h * r * (2 * d * 4 + 4 * 4 + d * 4)             # q, do, lse, delta, lo, hi; dq
  dkv_own = b * h * lk * (2 * d * 4 + 2 * d * 4)               # k, v in; dk, dv out
  dkv_rows = visits_t * bq * (2 * d * 4 + 4 * 4)
  assert bwd.bytes_accessed == 2 * blocks * bk * d * 4 + dq_own + dkv_rows + dkv_own


# ------------------------------------------------------------------- decode


def test_decode_kernels_bytes(loads):
  b, hq, hk, d, lk, num = 1, 4, 2, 16, 200, 2
  config = attn.SuperlinearConfig(sw_index=1, num_spans=num)
  f_desc = masks.superlinear_stripe_table(lk, config)
  q_offset = lk - 1
  visited = sum(1 for f in np.asarray(f_desc) if f <= q_offset + 1)   # plain count
  qs = _normal(11, (b, hk, hq // hk, d))
  ks = _normal(12, (b, lk, hk, d))
  first = dec_common.first_stripe(jnp.asarray(f_desc), q_offset, lq=1)
  splits = dec_common.stripe_splits(f_desc.size, programs=b * hk)
  _flush(dec_ops.search(q_offset, first, jnp.asarray(f_desc), qs, ks, lq=1, num=num,
                        variant=V))
  assert loads.rows("gather") == b * hk * visited               # one row per stripe
  kw = dict(batch=b, q_heads=hq, kv_heads=hk, head_dim=d, q_len=1, itemsize=4)
  search = cost.decode_search(stripes=visited, num_spans=num, num_splits=splits, **kw)
  assert search.bytes_accessed == (loads.rows("gather") * d * 4
                                   + b * hk * (16 * d * 4 + splits * 2 * num * 16 * 4))
  loads.log.clear()
  v = _normal(13, (b, lk, hk, d))
  width = 10
  _flush(dec_ops.band(q_offset, qs, ks, v, lq=1, width=width, scale=0.25, variant=V))
  tile = 16     # float32 band tiles: 16 keys (decode/gpu.py `_band_block`)
  assert loads.count("window", tile) == b * hk * math.ceil(width / tile)
  band = cost.decode_band(width=width, tile=tile, **kw)
  assert band.bytes_accessed == (2 * loads.rows("window") * d * 4
                                 + b * hk * 16 * (d * 4 + (d + 2) * 4))
  loads.log.clear()
  far = np.array([12, 30, 77, 150, 260], np.int32)                      # 260 > q_offset
  near = sum(1 for x in far.tolist() if x <= q_offset)
  _flush(dec_ops.stripes(q_offset, near, jnp.asarray(far), qs, ks, v, lq=1, scale=0.25,
                         variant=V))
  assert loads.rows("gather") == 2 * b * hk * near              # K and V, one row each
  st = cost.decode_stripes(stripes=near, **kw)
  assert st.bytes_accessed == (loads.rows("gather") * d * 4
                               + b * hk * 16 * (d * 4 + (d + 2) * 4))
  loads.log.clear()
  rng = np.random.default_rng(2)
  lo = rng.integers(0, 150, (b, hk, hq // hk, num))
  hi = lo + rng.integers(0, 140, lo.shape)
  hi = np.minimum(hi, lk - 1)
  _flush(dec_ops.ranges(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), qs, ks, v,
                        scale=0.25, variant=V))
  tiles = int(sum(math.ceil((h_ - l_ + 1) / 64) for l_, h_ in zip(lo.ravel(), hi.ravel())))
  assert loads.count("window", 64) == tiles
  rng_cost = cost.decode_ranges(num_spans=num, range_tiles=tiles, **kw)
  assert rng_cost.bytes_accessed == (2 * loads.rows("window") * d * 4
                                     + b * hq * num * (d * 4 + 8 + (d + 2) * 4))


# ------------------------------------------------------------ model plumbing


def test_estimate_is_a_pallas_cost_estimate_and_changes_only_lower_cost():
  from jax.experimental import pallas as pl
  kw = dict(batch=1, q_heads=32, kv_heads=8, head_dim=128, q_len=4096, stripes=60,
            num_spans=2)
  est = cost.stripe_search(**kw)
  assert isinstance(est, pl.CostEstimate)
  assert est.bytes_accessed == cost.stripe_search(detail=True, **kw).bytes_accessed
  # The stripe kernels share reads across the GQA group by default now.
  assert est.bytes_accessed < cost.stripe_search(gqa_shared_reads=False, **kw).bytes_accessed
  # The old decode search (a 16-row window per stripe, one program per kv
  # head) against the split, gathered one (one row per stripe, 17 splits).
  full = cost.decode_search(batch=1, q_heads=32, kv_heads=8, head_dim=128, q_len=1,
                            stripes=1000, num_spans=2, rows_per_stripe=16, num_splits=1,
                            detail=True)
  split = cost.decode_search(batch=1, q_heads=32, kv_heads=8, head_dim=128, q_len=1,
                             stripes=1000, num_spans=2, detail=True)      # the rule: 17
  assert split.programs == 17 * full.programs >= 132
  assert split.bytes_accessed < full.bytes_accessed
  assert cost.padded_head_dim(80, "gpu") == 128 and cost.padded_head_dim(80, "tpu") == 128
  assert cost.padded_head_dim(192, "gpu") == 256 and cost.padded_head_dim(192, "tpu") == 256


# ---------------------------------------------------------- per-op model


def test_roofline_tile_counts_match_plain_loops():
  # Window call of span attention: rows (head, query), query axis last.
  l, w, g, bq, bk = 208, 30, 4, 16, 16
  want = 0
  for r0 in range(0, l * g, bq):
    pos = [r % l for r in range(r0, min(r0 + bq, l * g))]
    lo, hi = max(min(pos) - w + 1, 0), max(pos)
    want += hi // bk - lo // bk + 1
  assert cost.window_key_blocks(l, w, g, bq, bk) == want
  # PPA: non-empty tiles per query block of the causal PPA mask.
  l, p, win, b = 160, 0.5, 4, 16
  kept = {d for d in range(l) if d < win or d in _ppa_far(l - 1, p, win)}
  dense_mask = np.array([[i - j in kept for j in range(l)] for i in range(l)])
  per_block = [_nonempty_tiles(dense_mask[i:i + b], b, b) for i in range(0, l, b)]
  plan = ppa_routing.ppa_routing(l, l, p=p, window=win, block_q=b, block_k=b)
  np.testing.assert_array_equal(plan.tiles, per_block)   # what the roofline reads


def test_roofline_ppa_follows_the_routing():
  from eval import roofline_model as roofline
  shape = roofline.Shape()
  for l, p in ((4096, 0.5), (32768, 0.75), (16384, 0.9)):
    routed = roofline.ppa(l, p, 64, shape)
    stripes = roofline.ppa(l, p, 64, shape, roofline.Changes(ppa_routing=False))
    dense = roofline.dense_pallas(l, shape)
    plan = ppa_routing.ppa_routing(l, l, p=p, window=64, block_q=128, block_k=128,
                                   group=shape.group, head_dim=shape.head_dim,
                                   itemsize=shape.itemsize)
    names = [n for n, _ in routed.parts]
    assert len(names) == len(plan.segments())
    assert sum("block-sparse" in n for n in names) == sum(r for _, _, r in plan.segments())
    # Routing never loads more; it loads less wherever it routes a block (at
    # 4K, p = 0.5 every block keeps its stripes).
    if plan.num_routed:
      assert routed.total.bytes_accessed < stripes.total.bytes_accessed
    else:
      assert routed.total.bytes_accessed == stripes.total.bytes_accessed
    # The routed tiles' FLOPs are a subset of dense causal tiles' (same blocks).
    tiles_routed = sum(c.flops for n, c in routed.parts if "block-sparse" in n)
    assert tiles_routed <= dict(dense.parts)["block_sparse_fwd"].flops


def test_roofline_changes_only_remove_work():
  from eval import roofline_model as roofline
  shape, cfg = roofline.Shape(), roofline.CONFIGS["default"]
  today = roofline.superlinear(4096, cfg, shape, backward=True)
  names = [n for n, _ in today.parts]
  assert "gate_logits_bwd" in names and "stripe_search" in names
  assert not any("selected" in n for n in names)     # search once: no second pass
  for ch in roofline.SCENARIOS[1:]:
    op = roofline.superlinear(4096, cfg, shape, backward=True, changes=ch)
    if not ch.gqa_shared_reads:      # a done change switched off: more work
      assert op.total.bytes_accessed > today.total.bytes_accessed
      continue
    assert op.total.bytes_accessed <= today.total.bytes_accessed
    assert op.time() <= today.time()
  # Item 4 (split decode) is in today's kernels: the flag changes nothing.
  dec = roofline.superlinear_decode(1 << 16, cfg, shape)
  split = roofline.superlinear_decode(1 << 16, cfg, shape, roofline.Changes(split_decode=True))
  assert min(c.programs for _, c in dec.parts if c.programs) >= 8
  assert dict(dec.parts)["decode_search"].programs >= roofline.H100.num_sms
  assert dict(dec.parts)["decode_ranges"].programs >= roofline.H100.num_sms
  assert split.time() == dec.time()
