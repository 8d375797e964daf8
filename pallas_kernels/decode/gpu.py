"""Decode kernels, GPU variant (Pallas Triton).

Tables are ordinary int32 inputs; loops are `lax.fori_loop` with bounds read
from them; tiles are `pltriton.load`s of `ref.at[b, pl.ds(row0, n), h, :]`
straight from the cache in its `[batch, kv_len, kv_heads, head_dim]` layout
(no copy of the cache). Triton block dims must be powers of two: the rows
and head_dim of the (small) query arrays are padded here; the cache is padded
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

from pallas_kernels.decode import common as cm
from pallas_kernels.common import F32, next_pow2

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


def _dot_t(a, b):
  """`a [m, d] @ b[n, d].T` in float32 (exact float32 products)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=F32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=F32)


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


# --------------------------------------------------------------------- search


def _search_kernel(scal_ref, f_ref, qs_ref, ks_ref, s_ref, a_ref, *, lq, r, num,
                   n_stripes, win, kv_len):
  b, h = pl.program_id(0), pl.program_id(1)
  q_offset, first = scal_ref[0], scal_ref[1]
  qs = qs_ref[b, h]                                            # [Rp, Ds]
  rp = qs.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp,), 0)
  qi = rows % lq
  row_ok = rows < r
  cols = jax.lax.broadcasted_iota(jnp.int32, (win,), 0)

  def body(j, state):
    scores, anchors = state
    a0 = q_offset + 1 - f_ref[j]                               # anchor of query 0
    row0 = cm.window_start(a0, align=1, n_buf=win, kv_len=kv_len)
    tile = ks_ref[b, pl.ds(row0, win), h, :]                   # [win, Ds]
    s_all = _dot_t(qs, tile)                                   # [Rp, win]
    anchor = a0 + qi                                           # [Rp]
    hit = (row0 + cols)[None, :] == anchor[:, None]
    s = jnp.sum(jnp.where(hit, s_all, 0.0), axis=1)
    s = jnp.where((anchor >= 0) & row_ok, s, cm.NEG_INF)
    return cm.topk_insert(scores, anchors, s, anchor)

  init = (tuple(jnp.full((rp,), cm.NEG_INF, F32) for _ in range(num)),
          tuple(jnp.full((rp,), -1, jnp.int32) for _ in range(num)))
  scores, anchors = jax.lax.fori_loop(first, n_stripes, body, init)
  for k in range(num):
    s_ref[b, h, jnp.int32(k), :] = scores[k]
    a_ref[b, h, jnp.int32(k), :] = anchors[k]


def search(scal, f_desc, qs, ks, *, lq, num, interpret):
  """See `ops.search`."""
  bsz, hk = qs.shape[0], qs.shape[1]
  qs, ks, _, r, rp, _ = _prep(qs, ks)
  win = next_pow2(lq, _ROWS_MIN)
  ks = _pad_rows(ks, win)
  kv_len = ks.shape[1]
  kernel = functools.partial(_search_kernel, lq=lq, r=r, num=num,
                             n_stripes=f_desc.shape[0], win=win, kv_len=kv_len)
  s, a = pl.pallas_call(
      kernel, grid=(bsz, hk),
      out_shape=(jax.ShapeDtypeStruct((bsz, hk, num, rp), F32),
                 jax.ShapeDtypeStruct((bsz, hk, num, rp), jnp.int32)),
      compiler_params=_params(), interpret=interpret, name="decode_search",
  )(scal, f_desc, qs, ks)
  to_rows = lambda x: jnp.swapaxes(x, 2, 3)[:, :, :r]  # noqa: E731
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
  return m, l, alpha * o + _dot(p, vt.astype(F32))


def _init(rp, dp):
  """Empty `(m, l, o)` state of `rp` query rows."""
  return (jnp.full((rp, 1), cm.NEG_INF, F32), jnp.zeros((rp, 1), F32),
          jnp.zeros((rp, dp), F32))


def _store(state, m_ref, l_ref, o_ref, b, h):
  """Writes an `(m, l, o)` state as the partial of (batch b, kv head h)."""
  m, l, o = state
  m_ref[b, h] = m[:, 0]
  l_ref[b, h] = l[:, 0]
  o_ref[b, h] = o


def _band_kernel(scal_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, lq, r,
                 width, scale, bk, kv_len):
  b, h = pl.program_id(0), pl.program_id(1)
  q_offset = scal_ref[0]
  q = q_ref[b, h]                                              # [Rp, Dp]
  rp, dp = q.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
  pos = q_offset + rows % lq                                   # [Rp, 1]
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  lo, hi = cm.band_bounds(q_offset, lq=lq, width=width)

  def body(c, state):
    start = lo + c * bk
    row0 = cm.window_start(start, align=1, n_buf=bk, kv_len=kv_len)
    kpos = row0 + cols                                         # [1, bk]
    d = pos - kpos
    vis = ((kpos >= start) & (kpos < start + bk) & (d >= 0) & (d < width)
           & (rows < r))                                       # [Rp, bk]
    return _masked_step(state, q, k_ref[b, pl.ds(row0, bk), h, :],
                        v_ref[b, pl.ds(row0, bk), h, :], vis, scale)

  _store(jax.lax.fori_loop(0, cm.num_tiles(lo, hi, bk), body, _init(rp, dp)),
         m_ref, l_ref, o_ref, b, h)


def _rows_out(bsz, hk, rp, dp):
  return (jax.ShapeDtypeStruct((bsz, hk, rp), F32), jax.ShapeDtypeStruct((bsz, hk, rp), F32),
          jax.ShapeDtypeStruct((bsz, hk, rp, dp), F32))


def _unpad_rows(m, l, o, r, d):
  return m[:, :, :r], l[:, :, :r], o[:, :, :r, :d]


def band(scal, q, k, v, *, lq, width, scale, interpret):
  """See `ops.band`."""
  bsz, hk, _, d = q.shape
  q, k, v, r, rp, dp = _prep(q, k, v)
  k, v = _pad_rows(k, _BK), _pad_rows(v, _BK)
  kernel = functools.partial(_band_kernel, lq=lq, r=r, width=width, scale=scale,
                             bk=_BK, kv_len=k.shape[1])
  out = pl.pallas_call(
      kernel, grid=(bsz, hk), out_shape=_rows_out(bsz, hk, rp, dp),
      compiler_params=_params(), interpret=interpret, name="decode_band",
  )(scal, q, k, v)
  return _unpad_rows(*out, r, d)


# -------------------------------------------------------------------- stripes


def _stripes_kernel(scal_ref, d_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                    lq, r, scale, win, kv_len):
  b, h = pl.program_id(0), pl.program_id(1)
  q_offset, count = scal_ref[0], scal_ref[1]
  q = q_ref[b, h]                                              # [Rp, Dp]
  rp, dp = q.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, win), 1)

  def body(j, state):
    a0 = q_offset - d_ref[j]                                   # key of query 0
    row0 = cm.window_start(a0, align=1, n_buf=win, kv_len=kv_len)
    key = a0 + rows % lq                                       # [Rp, 1]
    vis = ((row0 + cols) == key) & (key >= 0) & (rows < r)     # [Rp, win]
    return _masked_step(state, q, k_ref[b, pl.ds(row0, win), h, :],
                        v_ref[b, pl.ds(row0, win), h, :], vis, scale)

  _store(jax.lax.fori_loop(0, count, body, _init(rp, dp)), m_ref, l_ref, o_ref, b, h)


def stripes(scal, d_asc, q, k, v, *, lq, scale, interpret):
  """See `ops.stripes`."""
  bsz, hk, _, d = q.shape
  q, k, v, r, rp, dp = _prep(q, k, v)
  win = next_pow2(lq, _ROWS_MIN)
  k, v = _pad_rows(k, win), _pad_rows(v, win)
  kernel = functools.partial(_stripes_kernel, lq=lq, r=r, scale=scale, win=win,
                             kv_len=k.shape[1])
  out = pl.pallas_call(
      kernel, grid=(bsz, hk), out_shape=_rows_out(bsz, hk, rp, dp),
      compiler_params=_params(), interpret=interpret, name="decode_stripes",
  )(scal, d_asc, q, k, v)
  return _unpad_rows(*out, r, d)


# --------------------------------------------------------------------- ranges


def _ranges_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                   num, scale, bk, kv_len):
  b, h, pr = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[b, h, pr], hi_ref[b, h, pr]                 # inclusive range
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
  m_ref[b, h, pl.ds(pr, 1)] = m
  l_ref[b, h, pl.ds(pr, 1)] = l
  o_ref[b, h, pr] = o


def ranges(lo, hi, q, k, v, *, scale, interpret):
  """See `ops.ranges`."""
  bsz, hk, r, num = lo.shape
  d = q.shape[-1]
  q, k, v, _, _, dp = _prep(q, k, v)
  k, v = _pad_rows(k, _BK), _pad_rows(v, _BK)
  flat = lambda x: x.reshape(bsz, hk, r * num)  # noqa: E731
  kernel = functools.partial(_ranges_kernel, num=num, scale=scale, bk=_BK,
                             kv_len=k.shape[1])
  m, l, o = pl.pallas_call(
      kernel, grid=(bsz, hk, r * num), out_shape=(
          jax.ShapeDtypeStruct((bsz, hk, r * num), F32),
          jax.ShapeDtypeStruct((bsz, hk, r * num), F32),
          jax.ShapeDtypeStruct((bsz, hk, r * num, dp), F32)),
      compiler_params=_params(), interpret=interpret, name="decode_ranges",
  )(flat(lo), flat(hi), q, k, v)
  shape = (bsz, hk, r, num)
  return m.reshape(shape), l.reshape(shape), o[..., :d].reshape(*shape, d)
