"""PPA kernel bodies (forward, dq, dk/dv), written once for both platforms
against the context of `common.py` (see its module doc: frames, residue
groups, the context's methods). Query block at row `i0`: the band tiles of
the dense runs (masked matmuls) and the far stripes in range (row-wise dots,
`_stripe_loops`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32
from pallas_kernels.stripe.common import (NN, NT, TN, col, dot, first_at_least_in, fold_col,
                                          load_heads, repeat_rows, row, rowdot,
                                          store_heads)


def _stripe_loops(ctx, bounds_ref, deltas_ref, unit, reads, body, carry, *, lo_delta,
                  hi_delta):
  """`body(j, rows, carry)` over the stripes `j` whose delta lies in
  `[lo_delta, hi_delta)` (those with a row the body keeps), residue group by
  group (`rows`: the float32 windows `reads(j)`, any residue; TPU: several in
  flight). Each group is sorted by delta (`ops._ppa_tables`), so its stripes
  in range are one run, found by two binary searches: a block skips the
  stripes that reach before key 0 or past the last query (about a third of
  them in a p = 0.5 prefill). The groups run in one loop, so the Mosaic
  kernel holds one copy of the body instead of one per residue (`unit`
  copies: 16 for bf16), which made the PPA kernels the largest programs of a
  PPA prefill compile (docs/kernels_stripe.md, compile time)."""
  steps = max(deltas_ref.shape[0], 1).bit_length()

  def group(u, c):
    first, end = ctx.scalar(bounds_ref, u), ctx.scalar(bounds_ref, u + 1)
    lo = first_at_least_in(ctx, deltas_ref, first, end, lo_delta, steps)
    hi = first_at_least_in(ctx, deltas_ref, lo, end, hi_delta, steps)
    return ctx.stripe_loop(lo, hi, reads, body, c)

  if unit == 1:
    return group(0, carry)
  return jax.lax.fori_loop(0, unit, group, carry)


def _align_down(x, unit):
  return x - jax.lax.rem(x, unit)




def _band_range(first, last, lo_row, hi_row, unit, block):
  """Aligned start and block count covering rows `[first, last]` within `[lo_row, hi_row]`."""
  first = jnp.maximum(first, lo_row)
  last = jnp.minimum(last, hi_row)
  base = _align_down(first, unit)
  return base, jnp.maximum(0, (last - base + block) // block)


def _online(m, l, acc, s, ok, pv):
  """Flash-style update with scores `s` (masked by `ok`); `pv(p)` -> `[n, D]`."""
  m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, -jnp.inf), axis=1, keepdims=True))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
  p = jnp.where(ok, jnp.exp(s - m_safe), 0.0)
  return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + pv(p)


def ppa_fwd_body(ctx, meta_ref, deltas_ref, bounds_ref, q_ref, o_ref, lse_ref, *, bq,
                 bk, bands, group, lq, lk, front, unit, scale):
  """PPA forward for one query block of the `group` query heads of a kv head
  (folded into `group * bq` rows): band tiles, then stripes (online softmax).
  Each key tile and stripe is loaded once for the whole group."""
  i0 = ctx.block() * bq
  qoff = ctx.scalar(meta_ref, 0)
  qmax = qoff + lq - 1
  q = load_heads(q_ref)
  q32 = q.astype(F32)
  n, d_pad = q.shape
  carry = (jnp.full((n, 1), -jnp.inf, F32), jnp.zeros((n, 1), F32),
           jnp.zeros((n, d_pad), F32))

  def band_step(st, kw, vw, ok):
    s = dot(q, kw, NT) * scale
    return _online(*st, s, ok, lambda p: dot(p.astype(vw.dtype), vw, NN))

  carry = _band_loop(ctx, bands, band_step, carry, i0=i0, qoff=qoff, qmax=qmax, bq=bq,
                     rows=n, bk=bk, lk=lk, front=front, unit=unit)

  def stripe(j, rows, st):
    kw, vw, ok = _stripe_tile(ctx, deltas_ref, j, rows, i0=i0, bq=bq, group=group, lk=lk,
                              qmax=qmax)
    s = rowdot(q32, kw) * scale
    return _online(*st, s, ok, lambda p: p * vw)

  reads = functools.partial(_stripe_reads, ctx, deltas_ref, i0=i0, bq=bq, front=front)
  m, l, acc = _stripe_loops(ctx, bounds_ref, deltas_ref, unit, reads, stripe, carry,
                            **_query_block_deltas(i0, bq, lk, qmax))
  has = l > 0
  store_heads(o_ref, acc / jnp.where(has, l, 1.0))
  store_heads(lse_ref, jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf))


def _band_tile(ctx, base, c, qpos, *, lo, hi, bk, unit, front, lk, qmax):
  """Key tile `c` of a band: `(k, v, ok)`; rows no query of the call may see
  (before 0, past `lk` or the last query) are zeroed, so cache garbage there
  never meets a probability; `ok [bq, bk]`: offset in `[lo, hi]` and visible."""
  start = pl.multiple_of(base + c * bk, unit)
  kc, kr = col(bk, start - front), row(bk, start - front)
  vis = (kc >= 0) & (kc < lk) & (kc <= qmax)
  kw = jnp.where(vis, ctx.rows("k", start, bk, 0), 0)
  vw = jnp.where(vis, ctx.rows("v", start, bk, 0), 0)
  d = qpos - kr
  ok = (d >= lo) & (d <= hi) & (kr >= 0) & (kr < lk) & (kr <= qmax)
  return kw, vw, ok


def _band_loop(ctx, bands, step, carry, *, i0, qoff, qmax, bq, rows, bk, lk, front, unit):
  """`carry = step(carry, k, v, ok)` over every key tile (`_band_tile`) of
  every band `(lo, hi)` of the query block starting at row `i0` (`rows`
  folded rows: `rows / bq` query heads)."""
  qpos = fold_col(rows, bq, qoff + i0)
  for lo, hi in bands:
    base, n = _band_range(front + qoff + i0 - hi, front + qoff + i0 + bq - 1 - lo,
                          front, front + jnp.minimum(lk - 1, qmax), unit, bk)

    def chunk(c, st, lo=lo, hi=hi, base=base):
      kw, vw, ok = _band_tile(ctx, base, c, qpos, lo=lo, hi=hi, bk=bk, unit=unit,
                              front=front, lk=lk, qmax=qmax)
      return step(st, kw, vw, ok)

    carry = jax.lax.fori_loop(0, n, chunk, carry)
  return carry


def _query_block_deltas(i0, bq, lk, qmax):
  """The deltas of the stripes with a key in `[0, min(lk - 1, qmax)]` for
  some row of the query block at row `i0` (key = row + delta)."""
  return dict(lo_delta=-(i0 + bq - 1), hi_delta=jnp.minimum(lk - 1, qmax) - i0 + 1)


def _stripe_reads(ctx, deltas_ref, j, *, i0, bq, front):
  """The windows of stripe `j` for the query block at row `i0`: `bq` key and
  value rows from frame row `front + i0 + delta`."""
  start = front + i0 + ctx.scalar(deltas_ref, j)
  return (("k", start, bq, None), ("v", start, bq, None))


def _stripe_tile(ctx, deltas_ref, j, rows, *, i0, bq, group, lk, qmax):
  """The keys and values of stripe `j` for the query block at row `i0`
  (`rows`: its float32 windows, `_stripe_reads`): `(k, v, ok)`, float32
  `[group * bq, D]` (query `i0 + r` of every head meets key `i0 + r +
  delta`; `bq` rows loaded once, repeated per head), zeroed where the key is
  before 0, past `lk` or past the last query; `ok [group * bq, 1]` marks the
  others."""
  dl = ctx.scalar(deltas_ref, j)
  kc = col(bq, i0 + dl)
  vis = (kc >= 0) & (kc < lk) & (kc <= qmax)
  kw = repeat_rows(jnp.where(vis, rows[0], 0.0), group)
  vw = repeat_rows(jnp.where(vis, rows[1], 0.0), group)
  kf = fold_col(group * bq, bq, i0 + dl)
  return kw, vw, (kf >= 0) & (kf < lk) & (kf <= qmax)


def _probs(s, lse, ok):
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(ok, jnp.exp(s - lse_safe), 0.0)


def ppa_dq_body(ctx, meta_ref, deltas_ref, bounds_ref, q_ref, do_ref, ld_ref,
                dq_ref, *, bq, bk, bands, group, lq, lk, front, unit, scale,
                reload_q=False):
  """dq for one query block of the `group` query heads of a kv head (folded
  rows as in `ppa_fwd_body`; probabilities recomputed from the saved lse;
  `ld_ref`: the block's `[G, bq, 2]` (lse, delta) rows, one array so that
  TPU pads one 2-lane minor dim to 128 lanes, not two 1-lane ones).

  Stripes run before the band tiles. `reload_q` (GPU): each stripe step
  re-reads q and do from the block instead of keeping their float32 copies
  live across the stripe loop; with both, the float32 dq at head_dim 128
  compiles without spills (docs/kernels_stripe.md)."""
  i0 = ctx.block() * bq
  qoff = ctx.scalar(meta_ref, 0)
  qmax = qoff + lq - 1
  q, do = load_heads(q_ref), load_heads(do_ref)
  q32, do32 = q.astype(F32), do.astype(F32)
  lse, delta = _lse_delta(load_heads(ld_ref))
  dq = jnp.zeros(q.shape, F32)

  def band_step(dq, kw, vw, ok):
    p = _probs(dot(q, kw, NT) * scale, lse, ok)
    ds = p * (dot(do, vw, NT) - delta)
    return dq + dot(ds.astype(kw.dtype), kw, NN) * scale

  def stripe(j, rows, dq):
    kw, vw, ok = _stripe_tile(ctx, deltas_ref, j, rows, i0=i0, bq=bq, group=group, lk=lk,
                              qmax=qmax)
    qs, dos = (load_heads(q_ref), load_heads(do_ref)) if reload_q else (q32, do32)
    p = _probs(rowdot(qs, kw) * scale, lse, ok)
    ds = p * (rowdot(dos, vw) - delta)
    return dq + ds * kw * scale

  reads = functools.partial(_stripe_reads, ctx, deltas_ref, i0=i0, bq=bq, front=front)
  dq = _stripe_loops(ctx, bounds_ref, deltas_ref, unit, reads, stripe, dq,
                     **_query_block_deltas(i0, bq, lk, qmax))
  dq = _band_loop(ctx, bands, band_step, dq, i0=i0, qoff=qoff, qmax=qmax, bq=bq,
                  rows=q.shape[0], bk=bk, lk=lk, front=front, unit=unit)
  store_heads(dq_ref, dq)


def _lse_delta(ld):
  """`[n, 2]` rows of the `"ld"` frame -> the columns `(lse, delta)`, `[n, 1]`
  each (a masked lane sum: exact, `-inf` kept; no lane slice, which Triton
  does not lower)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, ld.shape, 1)
  pick = lambda k: jnp.sum(jnp.where(lane == k, ld, 0.0), axis=1, keepdims=True)  # noqa: E731
  return pick(0), pick(1)


def ppa_dkv_body(ctx, meta_ref, deltas_ref, bounds_ref, k_ref, v_ref, dk_ref, dv_ref, *,
                 bq, bk, bands, lq, lk, group, front_q, unit, scale):
  """dk, dv for one key block, accumulated over the query heads of its group.

  Bands: the queries at offsets `[lo, hi]` from the block are one window of
  query rows (aligned chunks of `bq`, masked). Stripes: the queries of
  stripe `delta` are the rows `x - delta` (transposed stripe).
  """
  x0 = ctx.block() * bk
  qoff = ctx.scalar(meta_ref, 0)
  qmax = qoff + lq - 1
  xc, xr = col(bk, x0), row(bk, x0)
  kvis = (xc < lk) & (xc <= qmax)
  k = jnp.where(kvis, k_ref[...], 0)
  v = jnp.where(kvis, v_ref[...], 0)
  k32, v32 = k.astype(F32), v.astype(F32)
  kvis_r = (xr < lk) & (xr <= qmax)
  zeros = jnp.zeros(k.shape, F32)

  def load_q(start, n, u, g):
    ic = col(n, start - front_q)
    ok = (ic >= 0) & (ic < lq)
    qw = jnp.where(ok, ctx.rows("q", start, n, u, g), 0)
    dow = jnp.where(ok, ctx.rows("do", start, n, u, g), 0)
    lse, dl = _lse_delta(ctx.rows("ld", start, n, u, g))
    return ic, ok, qw, dow, lse, jnp.where(ok, dl, 0.0)

  def stripe_start(j):
    return front_q + x0 - ctx.scalar(deltas_ref, j)

  def stripe_reads(j, g):
    """A stripe's query-side windows: q, do, lse, delta rows of head `g`."""
    start = stripe_start(j)
    return tuple((name, start, bk, g) for name in ("q", "do", "ld"))

  def stripe_q(j, rows):
    """`load_q` of a stripe from its float32 windows (any residue)."""
    ic = col(bk, stripe_start(j) - front_q)
    ok = (ic >= 0) & (ic < lq)
    qw, dow, ld = rows
    lse, dl = _lse_delta(ld)
    return (ok, jnp.where(ok, qw, 0.0), jnp.where(ok, dow, 0.0), lse,
            jnp.where(ok, dl, 0.0))

  def head(g, acc):
    dk, dv = acc
    for lo, hi in bands:
      # Query rows i with d = qoff + i - x in [lo, hi] for some x of the block.
      base, n = _band_range(front_q + x0 + lo - qoff, front_q + x0 + bk - 1 + hi - qoff,
                            front_q, front_q + lq - 1, unit, bq)

      def chunk(c, acc, lo=lo, hi=hi, base=base, g=g):
        dk, dv = acc
        start = pl.multiple_of(base + c * bq, unit)
        ic, qok, qw, dow, lse, dl = load_q(start, bq, 0, g)
        d = qoff + ic - xr
        ok = (d >= lo) & (d <= hi) & qok & kvis_r
        p = _probs(dot(qw, k, NT) * scale, lse, ok)          # [bq, bk]
        ds = p * (dot(dow, v, NT) - dl)
        dv = dv + dot(p.astype(dow.dtype), dow, TN)
        dk = dk + dot(ds.astype(qw.dtype), qw, TN) * scale
        return dk, dv

      dk, dv = jax.lax.fori_loop(0, n, chunk, (dk, dv))

    def stripe(j, rows, acc):
      dk, dv = acc
      qok, qw, dow, lse, dl = stripe_q(j, rows)
      ok = qok & kvis
      p = _probs(rowdot(k32, qw) * scale, lse, ok)
      ds = p * (rowdot(v32, dow) - dl)
      return dk + ds * qw * scale, dv + p * dow

    return _stripe_loops(ctx, bounds_ref, deltas_ref, unit,
                         functools.partial(stripe_reads, g=g), stripe, (dk, dv),
                         # query x - delta in [0, lq) for some key x of the block
                         lo_delta=x0 - lq + 1, hi_delta=x0 + bk)

  dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
