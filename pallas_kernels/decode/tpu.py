"""Decode kernels, TPU variant (Mosaic).

Tables are scalar-prefetched (SMEM) and drive `lax.fori_loop`s; grids are
`(batch, num_splits)` for search, band and stripes (each split its own chunk,
`common.split_range`), whose DMAs are double-buffered (`_walk`); the cache
stays in HBM (`memory_space=ANY`) in the model's `[batch, kv_len, kv_heads,
head_dim]` layout and is read by `pltpu.make_async_copy` of row windows
`k.at[b, pl.ds(row0, n_buf)]` into VMEM buffers `[n_buf, kv_heads,
head_dim]`: the last two dims are whole (the (8, 128) rule holds for any
head count and head_dim, nothing is padded or copied), and window starts
are rounded down to 8 (f32) / 16 (16-bit) rows and clamped into the cache
(`common.window_start`), the rows outside the piece masked. All kv heads of
a row window come in one DMA (as in jax's ragged paged attention); a head
is selected by masking its plane, so no kernel slices the sublane dim at a
dynamic offset. Arithmetic is elementwise float32 with lane reductions:
decode is bound by the key reads, not by the MXU.

Same arrays in, same arrays out as `gpu.py` (see `ops.py` for shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import cost
from pallas_kernels.decode import common as cm
from pallas_kernels.common import F32, cdiv, pallas_call

BLOCK_K = 128         # key rows per tile (band, ranges)


def _align(dtype) -> int:
  return 8 if jnp.dtype(dtype).itemsize >= 4 else 16


def dma_window(n: int, dtype, kv_len: int, *, aligned: bool = True):
  """`(n, align, n_buf)`: piece size, start alignment, DMA window rows.

  `aligned=False` (the `lq`-row windows of search and stripes) reads exactly
  the piece: rounding a one-row window to 16 rows would read 16x the rows,
  and the row axis of the cache is a major (untiled) dim, so any start is a
  whole-tile offset.
  """
  n = min(n, kv_len)
  align = _align(dtype) if aligned else 1
  n_buf = cdiv(n + align - 1, align) * align
  if n_buf > kv_len:          # a cache shorter than one aligned window
    align, n_buf = 1, n
  return n, align, n_buf


def _copy(src_hbm, b, row0, n_buf, buf, sem):
  """Blocking DMA of cache rows `[row0, row0 + n_buf)` (all heads) into `buf`."""
  cp = pltpu.make_async_copy(src_hbm.at[b, pl.ds(row0, n_buf)], buf, sem)
  cp.start()
  cp.wait()


def _walk(lo, hi, row0_of, srcs, bufs, sem, b, body):
  """`for j in [lo, hi)`: the window `row0_of(j)` of every cache in `srcs`
  DMA'd (all heads) into slot `(j - lo) % 2` of its double buffer
  `[2, n_buf, Hk, D]`; step `j + 1`'s copies start before step `j` waits,
  so one window is in flight while the other is used. `body(j, row0, slot)`.
  """
  n_buf = bufs[0].shape[1]

  def copies(j, slot):
    row0 = row0_of(j)
    return [pltpu.make_async_copy(src.at[b, pl.ds(row0, n_buf)], buf.at[slot],
                                  sem.at[i, slot])
            for i, (src, buf) in enumerate(zip(srcs, bufs))]

  @pl.when(lo < hi)
  def _():
    for cp in copies(lo, 0):
      cp.start()

  @pl.loop(lo, hi)
  def _(j):
    slot = (j - lo) % 2

    @pl.when(j + 1 < hi)
    def _():
      for cp in copies(j + 1, 1 - slot):
        cp.start()

    for cp in copies(j, slot):
      cp.wait()
    body(j, row0_of(j), slot)




def _planes(q):
  """`[B, Hk, R, D] -> [B, R, Hk, D]`: row `r` of every kv head as one plane."""
  return jnp.swapaxes(q, 1, 2)


def _params(*sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


def _any():
  return pl.BlockSpec(memory_space=pl.ANY)


# --------------------------------------------------------------------- search


def _search_kernel(scal_ref, f_ref, qs_ref, ks_hbm, s_ref, a_ref, buf, sem, ts, ta, *,
                   lq, r, num, n_stripes, splits, align, n_buf, kv_len):
  b, sp = pl.program_id(0), pl.program_id(1)
  q_offset, first = scal_ref[0], scal_ref[1]
  ts[...] = jnp.full(ts.shape, cm.NEG_INF, F32)
  ta[...] = jnp.full(ta.shape, -1, jnp.int32)
  lo, hi = cm.split_range(sp, splits, n_stripes)
  lo = jnp.maximum(lo, first)                                   # skip invalid stripes
  row0_of = lambda j: cm.window_start(q_offset + 1 - f_ref[j], align=align,  # noqa: E731
                                      n_buf=n_buf, kv_len=kv_len)

  def step(j, row0, slot):
    a0 = q_offset + 1 - f_ref[j]                                # anchor of query 0

    @pl.loop(0, r)
    def _(row):
      key = a0 + row % lq
      krow = buf[slot, jnp.clip(key - row0, 0, n_buf - 1)].astype(F32)    # [Hk, Ds]
      s = jnp.sum(krow * qs_ref[row].astype(F32), axis=-1, keepdims=True)  # [Hk, 1]
      s = jnp.where(key >= 0, s, cm.NEG_INF)
      scores = tuple(ts[row, k] for k in range(num))
      anchors = tuple(ta[row, k] for k in range(num))
      scores, anchors = cm.topk_insert(scores, anchors, s,
                                       jnp.full(s.shape, key, jnp.int32))
      for k in range(num):
        ts[row, k] = scores[k]
        ta[row, k] = anchors[k]

  _walk(lo, hi, row0_of, (ks_hbm,), (buf,), sem, b, step)
  s_ref[...] = ts[...]
  a_ref[...] = ta[...]


def search(scal, f_desc, qs, ks, *, lq, num, interpret, num_splits=None):
  """See `ops.search`. Returns per-split lists `[B, Hk, R, S * K]`."""
  bsz, hk, r, ds = qs.shape
  kv_len = ks.shape[1]
  _, align, n_buf = dma_window(lq, ks.dtype, kv_len, aligned=False)
  n_stripes = f_desc.shape[0]
  splits = cm.stripe_splits(n_stripes, programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_search_kernel, lq=lq, r=r, num=num, n_stripes=n_stripes,
                             splits=splits, align=align, n_buf=n_buf, kv_len=kv_len)
  state = (r, num, hk, 1)
  out = pl.BlockSpec((None, None, *state), lambda b, sp, *_: (b, sp, 0, 0, 0, 0))
  s, a = pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, splits),
          in_specs=[pl.BlockSpec((None, r, hk, ds), lambda b, sp, *_: (b, 0, 0, 0)),
                    _any()],
          out_specs=[out, out],
          scratch_shapes=[pltpu.VMEM((2, n_buf, hk, ds), ks.dtype),
                          pltpu.SemaphoreType.DMA((1, 2)),
                          pltpu.VMEM(state, F32), pltpu.VMEM(state, jnp.int32)]),
      out_shape=(jax.ShapeDtypeStruct((bsz, splits, *state), F32),
                 jax.ShapeDtypeStruct((bsz, splits, *state), jnp.int32)),
      compiler_params=_params("parallel", "parallel"), interpret=interpret,
      name="decode_search",
      cost_estimate=cost.decode_search(
          batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk, head_dim=ds, q_len=lq,
          stripes=n_stripes, num_spans=num, itemsize=ks.dtype.itemsize, platform="tpu",
          rows_per_stripe=n_buf, num_splits=splits),
  )(scal, f_desc, _planes(qs), ks)
  # [B, S, R, K, Hk] -> [B, Hk, R, S * K]
  to_rows = lambda x: jnp.transpose(x[..., 0], (0, 4, 2, 1, 3)).reshape(  # noqa: E731
      bsz, hk, r, splits * num)
  return to_rows(s), to_rows(a)


# ---------------------------------------------------------- band and stripes


def _rows_call(kernel, scal, tables, q, k, v, *, n_buf, splits, cost_estimate, interpret,
               name):
  """pallas_call of a kernel whose state is one softmax per (row, kv head),
  grid `(B, S)`; returns per-split states `[B, Hk, S, R(, D)]`."""
  bsz, hk, r, d = q.shape
  stat = (r, hk, 1)
  m, l, o = pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1 + len(tables), grid=(bsz, splits),
          in_specs=[pl.BlockSpec((None, r, hk, d), lambda b, sp, *_: (b, 0, 0, 0)),
                    _any(), _any()],
          out_specs=[pl.BlockSpec((None, None, *stat),
                                  lambda b, sp, *_: (b, sp, 0, 0, 0))] * 2
          + [pl.BlockSpec((None, None, r, hk, d), lambda b, sp, *_: (b, sp, 0, 0, 0))],
          scratch_shapes=[pltpu.VMEM((2, n_buf, hk, d), k.dtype),
                          pltpu.VMEM((2, n_buf, hk, d), v.dtype),
                          pltpu.SemaphoreType.DMA((2, 2))]),
      out_shape=(jax.ShapeDtypeStruct((bsz, splits, *stat), F32),
                 jax.ShapeDtypeStruct((bsz, splits, *stat), F32),
                 jax.ShapeDtypeStruct((bsz, splits, r, hk, d), F32)),
      compiler_params=_params("parallel", "parallel"), interpret=interpret, name=name,
      cost_estimate=cost_estimate,
  )(scal, *tables, _planes(q), k, v)
  rows = lambda x: jnp.transpose(x[..., 0], (0, 3, 1, 2))  # noqa: E731
  return rows(m), rows(l), jnp.transpose(o, (0, 3, 1, 2, 4))


def _init(m_ref, l_ref, o_ref):
  m_ref[...] = jnp.full(m_ref.shape, cm.NEG_INF, F32)
  l_ref[...] = jnp.zeros(l_ref.shape, F32)
  o_ref[...] = jnp.zeros(o_ref.shape, F32)


def _update(m_ref, l_ref, o_ref, row, s, vt):
  """Online softmax of `row` (state `[Hk, 1]`, `[Hk, D]`) over scores
  `s [n, Hk, 1]` (-inf = invisible) and values `vt [n, Hk, D]` (zeroed there)."""
  m, l, p, alpha = cm.softmax_step(m_ref[row][None], l_ref[row][None], s, axis=0)
  m_ref[row] = m[0]
  l_ref[row] = l[0]
  o_ref[row] = alpha[0] * o_ref[row] + jnp.sum(p * vt, axis=0)


def _band_kernel(scal_ref, q_ref, k_hbm, v_hbm, m_ref, l_ref, o_ref, kbuf, vbuf, sem, *,
                 lq, r, width, scale, n, splits, align, n_buf, kv_len):
  b, sp = pl.program_id(0), pl.program_id(1)
  q_offset = scal_ref[0]
  _init(m_ref, l_ref, o_ref)
  lo, hi = cm.band_bounds(q_offset, lq=lq, width=width)
  u0, u1 = cm.split_range(sp, splits, cm.band_units(width, lq))
  k0, k1 = lo + u0 * cm.BAND_UNIT, jnp.minimum(lo + u1 * cm.BAND_UNIT, hi)  # its keys
  row0_of = lambda c: cm.window_start(k0 + c * n, align=align, n_buf=n_buf,  # noqa: E731
                                      kv_len=kv_len)

  def step(c, row0, slot):
    start = k0 + c * n
    kpos = row0 + jax.lax.broadcasted_iota(jnp.int32, (n_buf, 1, 1), 0)
    in_piece = (kpos >= start) & (kpos < jnp.minimum(start + n, k1))

    @pl.loop(0, r)
    def _(row):
      d = q_offset + row % lq - kpos
      vis = in_piece & (d >= 0) & (d < width)                   # [n_buf, 1, 1]
      q = q_ref[row].astype(F32)                                # [Hk, D]
      s = jnp.sum(kbuf[slot].astype(F32) * q[None], axis=-1, keepdims=True) * scale
      _update(m_ref, l_ref, o_ref, row, jnp.where(vis, s, cm.NEG_INF),
              jnp.where(vis, vbuf[slot].astype(F32), 0.0))

  _walk(0, cm.num_tiles(k0, k1, n), row0_of, (k_hbm, v_hbm), (kbuf, vbuf), sem, b, step)


def band(scal, q, k, v, *, lq, width, scale, interpret, num_splits=None):
  """See `ops.band`. Returns per-split states `[B, Hk, S, R(, D)]`."""
  bsz, hk, r, d = q.shape
  kv_len = k.shape[1]
  n, align, n_buf = dma_window(BLOCK_K, k.dtype, kv_len)
  splits = cm.band_splits(width, lq=lq, programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_band_kernel, lq=lq, r=r, width=width, scale=scale, n=n,
                             splits=splits, align=align, n_buf=n_buf, kv_len=kv_len)
  est = cost.decode_band(batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk,
                         head_dim=d, q_len=lq, width=width, itemsize=k.dtype.itemsize,
                         platform="tpu", num_splits=splits, tile=n_buf)
  return _rows_call(kernel, scal, (), q, k, v, n_buf=n_buf, splits=splits,
                    cost_estimate=est, interpret=interpret, name="decode_band")


def _stripes_kernel(scal_ref, d_ref, q_ref, k_hbm, v_hbm, m_ref, l_ref, o_ref, kbuf,
                    vbuf, sem, *, lq, r, scale, n_tab, splits, align, n_buf, kv_len):
  b, sp = pl.program_id(0), pl.program_id(1)
  q_offset, count = scal_ref[0], scal_ref[1]
  _init(m_ref, l_ref, o_ref)
  lo, hi = cm.split_range(sp, splits, n_tab)
  hi = jnp.minimum(hi, count)                                   # offsets <= q_offset + lq - 1
  row0_of = lambda j: cm.window_start(q_offset - d_ref[j], align=align,  # noqa: E731
                                      n_buf=n_buf, kv_len=kv_len)

  def step(j, row0, slot):
    a0 = q_offset - d_ref[j]                                    # key of query 0

    @pl.loop(0, r)
    def _(row):
      key = a0 + row % lq
      idx = jnp.clip(key - row0, 0, n_buf - 1)
      q = q_ref[row].astype(F32)
      s = jnp.sum(kbuf[slot, idx].astype(F32) * q, axis=-1, keepdims=True) * scale
      ok = key >= 0
      _update(m_ref, l_ref, o_ref, row, jnp.where(ok, s, cm.NEG_INF)[None],
              jnp.where(ok, vbuf[slot, idx].astype(F32), 0.0)[None])

  _walk(lo, hi, row0_of, (k_hbm, v_hbm), (kbuf, vbuf), sem, b, step)


def stripes(scal, d_asc, q, k, v, *, lq, scale, interpret, num_splits=None):
  """See `ops.stripes`. Returns per-split states `[B, Hk, S, R(, D)]`."""
  bsz, hk, r, d = q.shape
  kv_len = k.shape[1]
  _, align, n_buf = dma_window(lq, k.dtype, kv_len, aligned=False)
  splits = cm.stripe_splits(d_asc.shape[0], programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_stripes_kernel, lq=lq, r=r, scale=scale,
                             n_tab=d_asc.shape[0], splits=splits,
                             align=align, n_buf=n_buf, kv_len=kv_len)
  est = cost.decode_stripes(batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk,
                            head_dim=d, q_len=lq, stripes=d_asc.shape[0],
                            itemsize=k.dtype.itemsize, platform="tpu",
                            rows_per_stripe=n_buf, num_splits=splits)
  return _rows_call(kernel, scal, (d_asc,), q, k, v, n_buf=n_buf, splits=splits,
                    cost_estimate=est, interpret=interpret, name="decode_stripes")


# --------------------------------------------------------------------- ranges


def _ranges_kernel(lo_ref, hi_ref, q_ref, k_hbm, v_hbm, m_ref, l_ref, o_ref, kbuf, vbuf,
                   sem, *, num, hk, rk, splits, scale, n, align, n_buf, kv_len):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pr = i // splits                                              # (row, slot)
  idx = (b * hk + h) * rk + pr
  lo, hi = cm.range_part(lo_ref[idx], hi_ref[idx], i % splits, splits)  # inclusive
  plane = jax.lax.broadcasted_iota(jnp.int32, (hk, 1), 0) == h  # this kv head
  q = jnp.where(plane, q_ref[pr // num].astype(F32), 0.0)       # [Hk, D]
  m_ref[...] = jnp.full(m_ref.shape, cm.NEG_INF, F32)
  l_ref[...] = jnp.zeros(l_ref.shape, F32)
  o_ref[...] = jnp.zeros(o_ref.shape, F32)
  o_acc = jnp.zeros(q.shape, F32)

  def body(c, o_acc):
    start = lo + c * n
    row0 = cm.window_start(start, align=align, n_buf=n_buf, kv_len=kv_len)
    _copy(k_hbm, b, row0, n_buf, kbuf, sem.at[0])
    _copy(v_hbm, b, row0, n_buf, vbuf, sem.at[1])
    kpos = row0 + jax.lax.broadcasted_iota(jnp.int32, (n_buf, 1, 1), 0)
    vis = (kpos >= start) & (kpos < start + n) & (kpos <= hi)   # [n_buf, 1, 1]
    s = jnp.sum(kbuf[...].astype(F32) * q[None], axis=-1, keepdims=True)
    s = jnp.where(vis, jnp.sum(s, axis=1, keepdims=True) * scale, cm.NEG_INF)
    m, l, p, alpha = cm.softmax_step(m_ref[...][None], l_ref[...][None], s, axis=0)
    m_ref[...] = m[0]
    l_ref[...] = l[0]
    vt = jnp.where(vis & plane[None], vbuf[...].astype(F32), 0.0)
    return alpha[0] * o_acc + jnp.sum(p * vt, axis=0)

  o_acc = jax.lax.fori_loop(0, cm.num_tiles(lo, hi + 1, n), body, o_acc)
  o_ref[...] = jnp.sum(o_acc, axis=0, keepdims=True)


def ranges(lo, hi, q, k, v, *, scale, interpret, max_len=None, num_splits=None):
  """See `ops.ranges`. Returns per-split states `[B, Hk, R, K, S(, D)]`."""
  bsz, hk, r, num = lo.shape
  d = q.shape[-1]
  kv_len = k.shape[1]
  n, align, n_buf = dma_window(BLOCK_K, k.dtype, kv_len)
  rk = r * num
  splits = cm.range_splits(max_len, programs=bsz * hk * rk, num_splits=num_splits)
  kernel = functools.partial(_ranges_kernel, num=num, hk=hk, rk=rk, splits=splits,
                             scale=scale, n=n,
                             align=align, n_buf=n_buf, kv_len=kv_len)
  m, l, o = pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, hk, rk * splits),
          in_specs=[pl.BlockSpec((None, r, hk, d), lambda b, h, i, *_: (b, 0, 0, 0)),
                    _any(), _any()],
          out_specs=[pl.BlockSpec((None, None, None, 1, 1),
                                  lambda b, h, i, *_: (b, h, i, 0, 0))] * 2
          + [pl.BlockSpec((None, None, None, 1, d), lambda b, h, i, *_: (b, h, i, 0, 0))],
          scratch_shapes=[pltpu.VMEM((n_buf, hk, d), k.dtype),
                          pltpu.VMEM((n_buf, hk, d), v.dtype),
                          pltpu.SemaphoreType.DMA((2,))]),
      out_shape=(jax.ShapeDtypeStruct((bsz, hk, rk * splits, 1, 1), F32),
                 jax.ShapeDtypeStruct((bsz, hk, rk * splits, 1, 1), F32),
                 jax.ShapeDtypeStruct((bsz, hk, rk * splits, 1, d), F32)),
      compiler_params=_params("parallel", "parallel", "parallel"),
      interpret=interpret, name="decode_ranges",
      # Span lengths are data: the estimate counts one tile per program.
      cost_estimate=cost.decode_ranges(
          batch=bsz, q_heads=hk * r, kv_heads=hk, head_dim=d, q_len=1, num_spans=num,
          range_tiles=bsz * hk * rk * splits, itemsize=k.dtype.itemsize, platform="tpu",
          num_splits=splits, tile=n_buf),
  )(lo.reshape(-1), hi.reshape(-1), _planes(q), k, v)
  shape = (bsz, hk, r, num, splits)
  return m.reshape(shape), l.reshape(shape), o.reshape(*shape, d)
