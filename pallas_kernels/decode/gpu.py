"""Decode kernels, GPU variant (Pallas Triton).

Tables are ordinary int32 inputs; loops are `lax.fori_loop` with bounds read
from them; grids are `(batch, kv_heads, num_splits)`, each split walking its
own chunk of stripes / band keys (`common.split_range`). Band and range
tiles are `pltriton.load`s of `ref.at[b, pl.ds(row0, n), h, :]` straight
from the cache in its `[batch, kv_len, kv_heads, head_dim]` layout (no copy
of the cache); search and stripes gather 16 rows of many stripes per step
(`_gather_rows`, a masked load of only the valid rows). Triton block dims
must be powers of two: the rows and head_dim of the (small) query arrays are padded here; the cache is padded
only when head_dim is not a power of two >= 16 (an O(kv_len) copy; 64 and
128 need none). Window starts are clamped into the cache (never negative:
the interpreter reads NaN, not `other`, there) and every row outside the
piece is masked, scores by `jnp.where`, values zeroed before the product.

Same arrays in, same arrays out as `tpu.py` (see `ops.py` for shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import cost
from pallas_kernels.decode import common as cm
from pallas_kernels.common import F32, next_pow2, pallas_call

_BK = 64          # key rows per tile (band, ranges)
_ROWS_MIN = 16    # tl.dot needs every dim >= 16


def _params(num_warps=4):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _pad_to(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _mm(a, b, dims):
  """Float32-accumulated product: 16-bit operands stay 16-bit (tensor-core
  MMA, no float32 copies of the tiles); float32 operands use exact float32."""
  if a.dtype == b.dtype and jnp.dtype(a.dtype).itemsize == 2:
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)
  return jax.lax.dot_general(a.astype(F32), b.astype(F32), dims,
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=F32)


def _dot_t(a, b):
  """`a [m, d] @ b[n, d].T` in float32."""
  return _mm(a, b, (((1,), (1,)), ((), ())))


def _dot(a, b):
  return _mm(a, b, (((1,), (0,)), ((), ())))


def _pad_rows(x, n):
  """A cache shorter than one window gets zero rows appended (tiny caches
  only; the rows lie past every query, so no query can see them)."""
  return _pad_to(x, 1, max(n, x.shape[1]))


def _prep(q, k, v=None):
  """Pads q rows to a power of two >= 16 and head_dim to a power of two >= 16."""
  r, d = q.shape[2], q.shape[3]
  rp, dp = next_pow2(r, _ROWS_MIN), next_pow2(d, 16)
  q = _pad_to(_pad_to(q, 2, rp), 3, dp)
  k = _pad_to(k, 3, dp)
  v = None if v is None else _pad_to(v, 3, dp)
  return q, k, v, r, rp, dp


def _gather_rows(ref, b, keys, h, ok):
  """Cache rows `keys` (int32 `[n]`, inside the cache) of (batch b, kv head h),
  loading only the rows where `ok` (bool `[n]`; the others read as 0)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, ref.shape[-1]), 1)
  return pltriton.load(ref.at[b, keys[:, None], h, cols], mask=ok[:, None], other=0)


def _gather_layout(lq: int):
  """`(lq_p, per_step, n)`: a gathered tile holds `per_step` stripes' `lq`
  rows, column `t` = stripe `t // lq_p`, query `t % lq_p` (`n` columns)."""
  lq_p = next_pow2(lq)
  per_step = cm.stripes_per_step(lq)
  return lq_p, per_step, max(per_step * lq_p, _ROWS_MIN)


def _gathered_keys(tab_ref, j0, hi, key_of, *, lq, lq_p, n, n_tab, kv_len):
  """Keys of one gathered tile: stripes `j0 + t // lq_p` (those `< hi`),
  query `t % lq_p` (those `< lq`). Returns int32 / bool `[n]` arrays
  `(stripe within the step, key clamped into the cache, key, ok)`."""
  cols = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
  j = j0 + cols // lq_p
  qi = cols % lq_p
  tab = tab_ref[jnp.clip(j, 0, n_tab - 1)]
  key = key_of(tab, qi)
  ok = (j < hi) & (qi < lq) & (key >= 0) & (key < kv_len)
  return cols // lq_p, jnp.clip(key, 0, kv_len - 1), key, ok


# --------------------------------------------------------------------- search


def _search_kernel(scal_ref, f_ref, qs_ref, ks_ref, s_ref, a_ref, *, lq, r, num,
                   n_stripes, splits, lq_p, per_step, n, kv_len):
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_offset, first = scal_ref[0], scal_ref[1]
  lo, hi = cm.split_range(sp, splits, n_stripes)
  lo = jnp.maximum(lo, first)                                  # skip invalid stripes
  qs = qs_ref[b, h]                                            # [Rp, Ds]
  rp = qs.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
  row_ok = rows < r
  qcol = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1) % lq_p

  def body(c, state):
    scores, anchors = state
    unit, kc, key, ok = _gathered_keys(
        f_ref, lo + c * per_step, hi, lambda f, qi: q_offset + qi + 1 - f, lq=lq,
        lq_p=lq_p, n=n, n_tab=n_stripes, kv_len=kv_len)
    s_all = _dot_t(qs, _gather_rows(ks_ref, b, kc, h, ok))        # [Rp, n]
    hit = ok[None, :] & row_ok & (qcol == rows % lq)            # [Rp, n]
    for u in range(per_step):                                  # far to near
      sel = hit & (unit[None, :] == u)
      s = jnp.sum(jnp.where(sel, s_all, 0.0), axis=1)
      a = jnp.sum(jnp.where(sel, key[None, :], 0), axis=1)
      any_ = jnp.max(sel.astype(jnp.int32), axis=1) > 0
      scores, anchors = cm.topk_insert(scores, anchors, jnp.where(any_, s, cm.NEG_INF),
                                       jnp.where(any_, a, -1))
    return scores, anchors

  init = (tuple(jnp.full((rp,), cm.NEG_INF, F32) for _ in range(num)),
          tuple(jnp.full((rp,), -1, jnp.int32) for _ in range(num)))
  steps = cm.num_tiles(lo, hi, per_step)
  scores, anchors = jax.lax.fori_loop(0, steps, body, init)
  for k in range(num):
    s_ref[b, h, sp, jnp.int32(k), :] = scores[k]
    a_ref[b, h, sp, jnp.int32(k), :] = anchors[k]


def search(scal, f_desc, qs, ks, *, lq, num, interpret, num_splits=None):
  """See `ops.search`. Returns per-split lists `[B, Hk, R, S * K]`."""
  bsz, hk = qs.shape[0], qs.shape[1]
  qs, ks, _, r, rp, _ = _prep(qs, ks)
  lq_p, per_step, n = _gather_layout(lq)
  n_stripes = f_desc.shape[0]
  splits = cm.stripe_splits(n_stripes, programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_search_kernel, lq=lq, r=r, num=num, n_stripes=n_stripes,
                             splits=splits, lq_p=lq_p, per_step=per_step, n=n,
                             kv_len=ks.shape[1])
  out = (bsz, hk, splits, num, rp)
  s, a = pallas_call(
      kernel, grid=(bsz, hk, splits),
      out_shape=(jax.ShapeDtypeStruct(out, F32), jax.ShapeDtypeStruct(out, jnp.int32)),
      compiler_params=_params(), interpret=interpret, name="decode_search",
      cost_estimate=cost.decode_search(
          batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk, head_dim=qs.shape[-1],
          q_len=lq, stripes=n_stripes, num_spans=num, itemsize=ks.dtype.itemsize,
          rows_per_stripe=n // per_step, num_splits=splits),
  )(scal, f_desc, qs, ks)
  to_rows = lambda x: jnp.moveaxis(x, 4, 2)[:, :, :r].reshape(bsz, hk, r, -1)  # noqa: E731
  return to_rows(s), to_rows(a)


# ----------------------------------------------------------------------- band


def _masked_step(state, q, kw, vw, vis, scale):
  """One online-softmax step of the rows `q: [Rp, Dp]` over a key window
  `kw, vw: [n, Dp]`, scored where `vis: [Rp, n]`; value rows no query sees
  are zeroed, so cache garbage there cannot reach `p @ v`."""
  m, l, o = state
  s = jnp.where(vis, _dot_t(q, kw) * scale, cm.NEG_INF)
  m, l, p, alpha = cm.softmax_step(m, l, s, axis=1)
  vt = jnp.where((jnp.max(vis.astype(jnp.int32), axis=0) > 0)[:, None], vw, 0)
  return m, l, alpha * o + _dot(p.astype(vt.dtype), vt)


def _init(rp, dp):
  """Empty `(m, l, o)` state of `rp` query rows."""
  return (jnp.full((rp, 1), cm.NEG_INF, F32), jnp.zeros((rp, 1), F32),
          jnp.zeros((rp, dp), F32))


def _store(state, m_ref, l_ref, o_ref, b, h, sp):
  """Writes an `(m, l, o)` state as the partial of (batch b, kv head h, split sp)."""
  m, l, o = state
  m_ref[b, h, sp] = m[:, 0]
  l_ref[b, h, sp] = l[:, 0]
  o_ref[b, h, sp] = o


def _band_kernel(scal_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, lq, r,
                 width, scale, bk, splits, kv_len):
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_offset = scal_ref[0]
  q = q_ref[b, h]                                              # [Rp, Dp]
  rp, dp = q.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
  pos = q_offset + rows % lq                                   # [Rp, 1]
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  lo, hi = cm.band_bounds(q_offset, lq=lq, width=width)
  u0, u1 = cm.split_range(sp, splits, cm.band_units(width, lq))
  k0, k1 = lo + u0 * cm.BAND_UNIT, jnp.minimum(lo + u1 * cm.BAND_UNIT, hi)  # its keys

  def body(c, state):
    start = k0 + c * bk
    row0 = cm.window_start(start, align=1, n_buf=bk, kv_len=kv_len)
    kpos = row0 + cols                                         # [1, bk]
    d = pos - kpos
    vis = ((kpos >= start) & (kpos < jnp.minimum(start + bk, k1)) & (d >= 0)
           & (d < width) & (rows < r))                         # [Rp, bk]
    return _masked_step(state, q, k_ref[b, pl.ds(row0, bk), h, :],
                        v_ref[b, pl.ds(row0, bk), h, :], vis, scale)

  _store(jax.lax.fori_loop(0, cm.num_tiles(k0, k1, bk), body, _init(rp, dp)),
         m_ref, l_ref, o_ref, b, h, sp)


def _rows_out(bsz, hk, splits, rp, dp):
  return (jax.ShapeDtypeStruct((bsz, hk, splits, rp), F32),
          jax.ShapeDtypeStruct((bsz, hk, splits, rp), F32),
          jax.ShapeDtypeStruct((bsz, hk, splits, rp, dp), F32))


def _unpad_rows(m, l, o, r, d):
  """Per-split states `[B, Hk, S, Rp(, Dp)]` -> `[B, Hk, S, R(, D)]`."""
  return m[..., :r], l[..., :r], o[..., :r, :d]


def _band_block(rp: int, dp: int, dtype) -> int:
  """Key rows per band tile: 64, or 32 when the rows x head_dim state is large
  (keeps the `[Rp, bk]` scores and `[Rp, Dp]` accumulator in registers);
  float32 16 (`_band_params`)."""
  if jnp.dtype(dtype).itemsize >= 4:
    return _ROWS_MIN
  return _BK if rp * dp <= 16 * 128 else _BK // 2


def _band_params(dtype):
  """float32 band tiles run 16 warps: its HIGHEST-precision dots are CUDA-core
  FMA products holding whole head_dim rows per thread; at 4 warps (32-key
  tiles) the kernel spilled 60-572 B at q_len 16 (deviceless H100 compile,
  docs/kernels_decode.md). 16-bit: 4 warps."""
  return _params(16 if jnp.dtype(dtype).itemsize >= 4 else 4)


def band(scal, q, k, v, *, lq, width, scale, interpret, num_splits=None):
  """See `ops.band`. Returns per-split states `[B, Hk, S, R(, D)]`."""
  bsz, hk, _, d = q.shape
  q, k, v, r, rp, dp = _prep(q, k, v)
  dt = jnp.result_type(q.dtype, k.dtype)                     # float32 if either is
  bk = _band_block(rp, dp, dt)
  k, v = _pad_rows(k, bk), _pad_rows(v, bk)
  splits = cm.band_splits(width, lq=lq, programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_band_kernel, lq=lq, r=r, width=width, scale=scale,
                             bk=bk, splits=splits, kv_len=k.shape[1])
  out = pallas_call(
      kernel, grid=(bsz, hk, splits), out_shape=_rows_out(bsz, hk, splits, rp, dp),
      compiler_params=_band_params(dt), interpret=interpret, name="decode_band",
      cost_estimate=cost.decode_band(
          batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk, head_dim=dp, q_len=lq,
          width=width, itemsize=k.dtype.itemsize, num_splits=splits, tile=bk),
  )(scal, q, k, v)
  return _unpad_rows(*out, r, d)


# -------------------------------------------------------------------- stripes


def _stripes_kernel(scal_ref, d_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                    lq, r, scale, n_tab, splits, lq_p, per_step, n, kv_len):
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_offset, count = scal_ref[0], scal_ref[1]
  lo, hi = cm.split_range(sp, splits, n_tab)
  hi = jnp.minimum(hi, count)                                  # offsets <= q_offset + lq - 1
  q = q_ref[b, h]                                              # [Rp, Dp]
  rp, dp = q.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
  qcol = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1) % lq_p

  def body(c, state):
    _, kc, _, ok = _gathered_keys(
        d_ref, lo + c * per_step, hi, lambda dd, qi: q_offset + qi - dd, lq=lq,
        lq_p=lq_p, n=n, n_tab=n_tab, kv_len=kv_len)
    vis = ok[None, :] & (qcol == rows % lq) & (rows < r)      # [Rp, n]
    return _masked_step(state, q, _gather_rows(k_ref, b, kc, h, ok),
                        _gather_rows(v_ref, b, kc, h, ok), vis, scale)

  steps = cm.num_tiles(lo, hi, per_step)
  _store(jax.lax.fori_loop(0, steps, body, _init(rp, dp)), m_ref, l_ref, o_ref, b, h, sp)


def stripes(scal, d_asc, q, k, v, *, lq, scale, interpret, num_splits=None):
  """See `ops.stripes`. Returns per-split states `[B, Hk, S, R(, D)]`."""
  bsz, hk, _, d = q.shape
  q, k, v, r, rp, dp = _prep(q, k, v)
  lq_p, per_step, n = _gather_layout(lq)
  n_tab = d_asc.shape[0]
  splits = cm.stripe_splits(n_tab, programs=bsz * hk, num_splits=num_splits)
  kernel = functools.partial(_stripes_kernel, lq=lq, r=r, scale=scale, n_tab=n_tab,
                             splits=splits, lq_p=lq_p, per_step=per_step, n=n,
                             kv_len=k.shape[1])
  out = pallas_call(
      kernel, grid=(bsz, hk, splits), out_shape=_rows_out(bsz, hk, splits, rp, dp),
      compiler_params=_params(), interpret=interpret, name="decode_stripes",
      cost_estimate=cost.decode_stripes(
          batch=bsz, q_heads=hk * max(1, r // lq), kv_heads=hk, head_dim=dp, q_len=lq,
          stripes=n_tab, itemsize=k.dtype.itemsize, rows_per_stripe=n // per_step,
          num_splits=splits),
  )(scal, d_asc, q, k, v)
  return _unpad_rows(*out, r, d)


# --------------------------------------------------------------------- ranges


def _ranges_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                   num, splits, scale, bk, kv_len):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pr = i // splits                                            # (row, slot)
  lo, hi = cm.range_part(lo_ref[b, h, pr], hi_ref[b, h, pr], i % splits, splits)
  q = q_ref[b, h, pr // num].astype(F32)                      # [Dp]
  cols = jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)

  def body(c, state):
    m, l, o = state
    start = lo + c * bk
    row0 = cm.window_start(start, align=1, n_buf=bk, kv_len=kv_len)
    kpos = row0 + cols
    vis = (kpos >= start) & (kpos < start + bk) & (kpos <= hi)  # [bk]
    kt = k_ref[b, pl.ds(row0, bk), h, :].astype(F32)
    s = jnp.where(vis, jnp.sum(kt * q[None, :], axis=1) * scale, cm.NEG_INF)
    m, l, p, alpha = cm.softmax_step(m, l, s, axis=0)
    vt = jnp.where(vis[:, None], v_ref[b, pl.ds(row0, bk), h, :].astype(F32), 0.0)
    return m, l, alpha * o + jnp.sum(p[:, None] * vt, axis=0)

  init = (jnp.full((1,), cm.NEG_INF, F32), jnp.zeros((1,), F32),
          jnp.zeros(q.shape, F32))
  m, l, o = jax.lax.fori_loop(0, cm.num_tiles(lo, hi + 1, bk), body, init)
  m_ref[b, h, pl.ds(i, 1)] = m
  l_ref[b, h, pl.ds(i, 1)] = l
  o_ref[b, h, i] = o


def ranges(lo, hi, q, k, v, *, scale, interpret, max_len=None, num_splits=None):
  """See `ops.ranges`. Returns per-split states `[B, Hk, R, K, S(, D)]`."""
  bsz, hk, r, num = lo.shape
  d = q.shape[-1]
  q, k, v, _, _, dp = _prep(q, k, v)
  k, v = _pad_rows(k, _BK), _pad_rows(v, _BK)
  splits = cm.range_splits(max_len, programs=bsz * hk * r * num, num_splits=num_splits)
  n = r * num * splits
  flat = lambda x: x.reshape(bsz, hk, r * num)  # noqa: E731
  kernel = functools.partial(_ranges_kernel, num=num, splits=splits, scale=scale, bk=_BK,
                             kv_len=k.shape[1])
  m, l, o = pallas_call(
      kernel, grid=(bsz, hk, n), out_shape=(
          jax.ShapeDtypeStruct((bsz, hk, n), F32),
          jax.ShapeDtypeStruct((bsz, hk, n), F32),
          jax.ShapeDtypeStruct((bsz, hk, n, dp), F32)),
      compiler_params=_params(), interpret=interpret, name="decode_ranges",
      # Span lengths are data: the estimate counts one tile per program.
      cost_estimate=cost.decode_ranges(
          batch=bsz, q_heads=hk * r, kv_heads=hk, head_dim=dp, q_len=1, num_spans=num,
          range_tiles=bsz * hk * n, itemsize=k.dtype.itemsize, num_splits=splits),
  )(flat(lo), flat(hi), q, k, v)
  shape = (bsz, hk, r, num, splits)
  return m.reshape(shape), l.reshape(shape), o[..., :d].reshape(*shape, d)
