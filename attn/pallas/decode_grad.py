"""Hand-written backward of the superlinear decode (`attn.pallas.decode`).

The forward (`decode._superlinear_forward`) picks, per query row, up to `K`
anchors; slot `k` of row `r` attends over its span `[lo, hi]` (at most
`max_len` consecutive cache rows, ending at or before `pos - W`) and the
window `(pos - W, pos]`, merged by log-sum-exp; the slots are mixed by gates
`softmax(<q_search, k_search[anchor]>)`. This module computes the gradients
at those fixed anchors without `jax.vjp` of a gather formulation, in a form
that XLA:TPU compiles in seconds:

  * the window is one contiguous block of `W + Lq - 1` cache rows shared by
    every row of a kv head, so its scores and gradients are batched matmuls
    `[R, D] x [D, W + Lq - 1]` (no per-slot copy of the window);
  * each (batch, kv head, row, slot) span is a `dynamic_slice` of
    `max_len` rows `[M, D]` of the `[B, Hk, Lk, D]` cache inside one
    `lax.fori_loop`; its key and value gradients are added back with
    `dynamic_update_slice`, so there is no scatter and no
    `[R, K, M, D]` gathered tensor to relayout.

Rows are `r = g * Lq + i` (`decode._to_rows`); every array here is per
(batch, kv head): `[B, Hk, R, ...]`. Unused cache rows (NaN included) are
zeroed before any arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import sharding
from pallas_kernels import common as pk_common

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def window_block(q_offset, lq: int, lk: int, window: int):
  """Start (traced int32) and static length `n` of the cache block holding
  every row's window `(pos - W, pos]`, `pos` in `[q_offset, q_offset + lq)`:
  `n = min(W + lq - 1, lk)`, start clipped into `[0, lk - n]`."""
  n = min(window + lq - 1, lk)
  start = jnp.clip(q_offset - window + 1, 0, lk - n).astype(jnp.int32)
  return start, n


def window_state(qr, kt, vt, pos, start, n: int, window: int, scale: float):
  """Unnormalised softmax state of each row over its window.

  qr: f32 `[B, Hk, R, D]`; kt, vt: `[B, Hk, Lk, D]`; pos: int32 `[R]`.
  Returns `(state (m, l, o) [B, Hk, R] / [B, Hk, R, D], e [B, Hk, R, n]
  = exp(s - m) masked, kw, vw [B, Hk, n, D] f32 with unused rows zeroed)`.
  """
  b, hk, _, d = kt.shape
  jpos = start + jnp.arange(n, dtype=jnp.int32)                   # [n]
  used = (jpos <= jnp.max(pos))[:, None]
  kw = jax.lax.dynamic_slice(kt, (0, 0, start, 0), (b, hk, n, d))
  vw = jax.lax.dynamic_slice(vt, (0, 0, start, 0), (b, hk, n, d))
  kw = jnp.where(used, kw, 0).astype(_F32)
  vw = jnp.where(used, vw, 0).astype(_F32)
  ok = (jpos[None, :] <= pos[:, None]) & (jpos[None, :] > pos[:, None] - window)
  s = jnp.einsum("bhrd,bhjd->bhrj", qr, kw, precision=_HI) * scale
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
  o = jnp.einsum("bhrj,bhjd->bhrd", e, vw, precision=_HI)
  return pk_common.SoftmaxState(m, jnp.sum(e, axis=-1), o), e, kw, vw


def _zeros(shapes, *like):
  """float32 zeros of each shape, as a loop carry: inside a `jax.shard_map`
  with `check_vma` they vary over every axis any array in `like` varies over
  (the loop body's results do)."""
  zeros = tuple(jnp.zeros(s, _F32) for s in shapes)
  axes = frozenset().union(*(sharding.varying_axes(x) for x in jax.tree.leaves(like)))
  return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _span_block(xt, b, h, lo, m: int):
  """Rows `[st, st + m)` of `xt[b, h]` (`[B, Hk, Lk, D]`), `st = clip(lo)`:
  returns `(st, block [m, D])`."""
  st = jnp.clip(lo, 0, xt.shape[2] - m)
  blk = jax.lax.dynamic_slice(xt, (b, h, st, 0), (1, 1, m, xt.shape[3]))
  return st, blk[0, 0]


def _get(x, *idx):
  """`x[idx]` for traced scalar leading indices, as a `dynamic_slice`."""
  start = tuple(idx) + (0,) * (x.ndim - len(idx))
  size = (1,) * len(idx) + x.shape[len(idx):]
  return jax.lax.dynamic_slice(x, start, size).reshape(x.shape[len(idx):])


def _add(acc, val, *idx):
  """`acc[idx] += val` (`val` shaped like `acc[idx]`) as a slice update;
  with one more index than the leading axes, `val` covers
  `acc[idx[:-1]][idx[-1]:idx[-1] + len(val)]`."""
  start = tuple(idx) + (0,) * (acc.ndim - len(idx))
  size = (1,) * (acc.ndim - val.ndim) + val.shape
  cur = jax.lax.dynamic_slice(acc, start, size)
  return jax.lax.dynamic_update_slice(acc, cur + val.reshape(size), start)


def _add_rows(acc, b, h, st, rows):
  """`acc[b, h, st:st + m] += rows` (`rows [m, D]`)."""
  return _add(acc, rows, b, h, st)


def _set(acc, val, *idx):
  """`acc[idx] = val` as a slice update."""
  start = tuple(idx) + (0,) * (acc.ndim - len(idx))
  size = (1,) * len(idx) + acc.shape[len(idx):]
  return jax.lax.dynamic_update_slice(acc, val.reshape(size).astype(acc.dtype), start)


def span_loop(qr, kt, vt, lo, hi, gates, dout, win, max_len: int, scale: float):
  """Forward recompute and span gradients, one (batch, head, row, slot) per step.

  qr, dout: f32 `[B, Hk, R, D]`; kt, vt: `[B, Hk, Lk, D]`; lo, hi, gates:
  `[B, Hk, R, K]`; win: the window `SoftmaxState` (or None: no window).
  Returns `(o f32 [B, Hk, R, K, D] slot outputs, lse [B, Hk, R, K], dq
  [B, Hk, R, D], dk, dv f32 [B, Hk, Lk, D])`: span parts of the gradients.
  """
  bsz, hk, rows, nk = lo.shape
  lk, d = kt.shape[2], kt.shape[3]
  m_len = min(max_len, lk)
  init = _zeros(((bsz, hk, rows, nk, d), (bsz, hk, rows, nk), (bsz, hk, rows, d),
                 (bsz, hk, lk, d), (bsz, hk, lk, d)), qr, kt, vt, lo, hi, gates, dout, win)

  def body(i, carry):
    o_all, lse_all, dq, dk, dv = carry
    k_ = i % nk
    r = (i // nk) % rows
    h = (i // (nk * rows)) % hk
    b = i // (nk * rows * hk)
    at = lambda x: _get(x, b, h, r)  # noqa: E731
    lo_i, hi_i, g = (_get(x, b, h, r, k_) for x in (lo, hi, gates))
    q_i, do_i = at(qr), g * at(dout)
    st, kb = _span_block(kt, b, h, lo_i, m_len)
    _, vb = _span_block(vt, b, h, lo_i, m_len)
    kpos = st + jnp.arange(m_len, dtype=jnp.int32)
    ok = (kpos >= lo_i) & (kpos <= hi_i)
    kb = jnp.where(ok[:, None], kb, 0).astype(_F32)
    vb = jnp.where(ok[:, None], vb, 0).astype(_F32)
    s = jnp.where(ok, jnp.dot(kb, q_i, precision=_HI) * scale, -jnp.inf)
    m_s = jnp.max(s)
    e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m_s), m_s, 0.0)), 0.0)
    state = pk_common.SoftmaxState(m_s, jnp.sum(e), jnp.dot(e, vb, precision=_HI))
    if win is not None:
      state = pk_common.merge_states(state, jax.tree.map(at, win))
    o_i, lse = pk_common.finish_state(state)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
    ds = p * (jnp.dot(vb, do_i, precision=_HI) - jnp.dot(do_i, o_i, precision=_HI))
    dq = _add(dq, scale * jnp.dot(ds, kb, precision=_HI), b, h, r)
    dk = _add_rows(dk, b, h, st, scale * ds[:, None] * q_i[None, :])
    dv = _add_rows(dv, b, h, st, p[:, None] * do_i[None, :])
    return (_set(o_all, o_i, b, h, r, k_), _set(lse_all, lse, b, h, r, k_), dq, dk, dv)

  return jax.lax.fori_loop(0, bsz * hk * rows * nk, body, init)


def window_grads(qr, dout, gates, lse, o, win, e, kw, vw, scale: float):
  """Window parts of `(dq [B, Hk, R, D], dk, dv [B, Hk, n, D])`, all slots at once.

  Slot `k`'s window probabilities are `e * exp(m_w - lse_k)`; summed over
  slots with the weights the gradient needs they are `e * c1` and
  `e * (c1 * <dout, v> - c2)`, so nothing here has a slot axis but `c1, c2`.
  """
  m_w = win.m
  w = jnp.where(jnp.isfinite(lse) & jnp.isfinite(m_w)[..., None],
                jnp.exp(m_w[..., None] - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  delta = gates * jnp.sum(dout[..., None, :] * o, axis=-1)        # <do_k, o_k>
  c1 = jnp.sum(w * gates, axis=-1)[..., None]                     # [B, Hk, R, 1]
  c2 = jnp.sum(w * delta, axis=-1)[..., None]
  dpv = jnp.einsum("bhrd,bhjd->bhrj", dout, vw, precision=_HI)
  ds = e * (c1 * dpv - c2)                                        # [B, Hk, R, n]
  dq = scale * jnp.einsum("bhrj,bhjd->bhrd", ds, kw, precision=_HI)
  dk = scale * jnp.einsum("bhrj,bhrd->bhjd", ds, qr, precision=_HI)
  dv = jnp.einsum("bhrj,bhrd->bhjd", e * c1, dout, precision=_HI)
  return dq, dk, dv


def add_block(acc, block, start):
  """`acc[:, :, start:start + n] += block` (`block [B, Hk, n, D]`)."""
  idx = (0, 0, start, 0)
  cur = jax.lax.dynamic_slice(acc, idx, block.shape)
  return jax.lax.dynamic_update_slice(acc, cur + block, idx)


def gate_grads(qs, kst, anchors, gates, dgates):
  """Gradients through the gates `softmax(<qs_r, ks[anchor]>)` over valid slots.

  qs: `[B, Hk, R, Ds]`; kst: `[B, Hk, Lk, Ds]`; anchors int32 `[B, Hk, R, K]`
  (-1 = empty); dgates: f32 cotangent of the gates. Returns `(dqs [B, Hk, R,
  Ds], dks [B, Hk, Lk, Ds])` f32; the key rows are added one anchor per step.
  """
  valid = anchors >= 0
  dlogit = gates * (dgates - jnp.sum(gates * dgates, axis=-1, keepdims=True))
  dlogit = jnp.where(valid, dlogit, 0.0)
  bsz, hk, rows, nk = anchors.shape
  init = _zeros((qs.shape, kst.shape), qs, kst, anchors, gates, dgates)

  def body(i, carry):
    dqs, dks = carry
    k_ = i % nk
    r = (i // nk) % rows
    h = (i // (nk * rows)) % hk
    b = i // (nk * rows * hk)
    a = jnp.maximum(_get(anchors, b, h, r, k_), 0)
    g = _get(dlogit, b, h, r, k_)
    krow = _get(kst, b, h, a).astype(_F32)
    dqs = _add(dqs, g * krow, b, h, r)
    return dqs, _add_rows(dks, b, h, a, g * _get(qs, b, h, r)[None, :].astype(_F32))

  return jax.lax.fori_loop(0, bsz * hk * rows * nk, body, init)
