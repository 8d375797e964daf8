"""Superlinear attention (N = 2) on the `xla` path: stripe search, top-k
spans, gated merge."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import masks
from attn.config import SuperlinearConfig
from attn.xla.blocks import (F32, any_offset, block_size, group, map_query_blocks, pad_seq,
                             partial, rowwise_pv, rowwise_qk, window_partial)
from pallas_kernels.common import SoftmaxState, finish_state, merge_states, span_bounds, span_lengths

# Superlinear: query segments with their own (shorter) span and stripe bounds
# (early queries reach fewer stripes and have shorter spans; 4 segments made
# the 16K-32K forward 25-50% faster on CPU than one).
_SEGMENTS = 4
_SEGMENT_ALIGN = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _span_rows(x, first, size):
  """Span rows read in the input dtype, returned in float32.

  x: `[B, Lk, Hk, D]` (any float dtype); first: `[B, Hk, ...]` int32 first
  row of each slice, `0 <= first <= Lk - size`. Returns `[B, Hk, ..., size,
  D]` float32, `x[b, first + j, h]`. Its VJP scatter-adds the cotangents of
  overlapping slices in float32 and casts the sum to `x`'s dtype once, so
  no float32 copy of the whole `x` is held in the forward pass.
  """
  return _take_rows(x, first, size).astype(F32)


def _take_rows(x, first, size):
  b, hk = x.shape[0], x.shape[2]
  rows = first[..., None] + jnp.arange(size, dtype=jnp.int32)  # [B, Hk, ..., size]
  lead = (1,) * (rows.ndim - 2)
  bi = jnp.arange(b).reshape((b, 1) + lead)
  hi = jnp.arange(hk).reshape((1, hk) + lead)
  return x[bi, rows, hi]


def _span_rows_fwd(x, first, size):
  return _span_rows(x, first, size), (x, first)


def _span_rows_bwd(size, res, ct):
  # The gather's transpose reads only the shape (and, inside a shard_map,
  # the manual-axis type) of its float32 primal, whose cast is dead code.
  x, first = res
  _, pull = jax.vjp(lambda z: _take_rows(z, first, size), x.astype(F32))
  (dx,) = pull(ct)
  return dx.astype(x.dtype), None


_span_rows.defvjp(_span_rows_fwd, _span_rows_bwd)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, window_keys=None,
                          block_budget=None, offset_in_range=False):
  """Superlinear attention (N = 2): stripe search, top-k spans, gated merge.

  Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32, gates
  [B, Lq, Hq, K] float32)`; see `attn.superlinear_attention`.
  `window_keys`: optional `(k_win, v_win, base)`: the local window reads its
  keys from `k_win, v_win: [B, n, Hk, D]`, row `i` holding the key at
  position `base + i` (int32, may be traced), not from `k, v`; they must
  hold every window key of every query (context parallelism: a shard's own
  keys after its predecessor's last `W - 1`, `attn.context_parallel`).
  `block_budget`: elements of one query block's largest temporary (default
  `blocks.BLOCK_BUDGET`, blocks of at least 8 queries); given, blocks may
  shrink to one query (context parallelism: the budget of a shard).
  `offset_in_range`: the caller guarantees a traced `q_offset` in `[0, Lk -
  Lq]`, so the rows need no shift (`any_offset`) and no shifted copies.
  """
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  ds = q_search.shape[-1]
  num = config.num_spans
  w = min(config.window, lk)
  f_all = masks.superlinear_stripe_table(lk, config)         # far -> near, [S]
  max_span_all = min(masks.superlinear_max_span(lk, config), lk)
  spans = jnp.asarray(masks.superlinear_span_table(lk, config))

  if q_offset is not None:   # positions unknown at trace time: one segment.
    segments = [(0, lq, lk)]
  else:
    # Static positions: cut the queries into segments (block-aligned) so that
    # early queries use the shorter spans and fewer stripes they can reach.
    cuts = sorted({0, lq} | {(lq * i // _SEGMENTS) // _SEGMENT_ALIGN * _SEGMENT_ALIGN
                             for i in range(1, _SEGMENTS)})
    segments = [(s0, s1, lk - lq + s1) for s0, s1 in zip(cuts, cuts[1:]) if s1 > s0]

  def tables(q_len, t_max):
    """Stripes, longest span and query block of a segment (positions < t_max)."""
    f = f_all[-masks.superlinear_num_stripes(t_max, config):]
    max_span = min(masks.superlinear_max_span(t_max, config), max_span_all)
    cols = max(128 + w, f.size * ds // max(d, 1) + num * max_span)
    bq = block_size(q_len, cols, hq, d, b, block_budget,
                    min_block=8 if block_budget is None else 1)
    return f, max_span, bq

  # Padded float32 copies shared by all segments (gathered rows' cotangents
  # then accumulate in float32). Window keys: padded by W - 1 on the left
  # and the largest query block on the right (`window_partial`). Span rows
  # are read from k, v themselves (`_span_rows`: float32 rows, float32
  # cotangent sums).
  bq_max = max(tables(s1 - s0, t)[2] for s0, s1, t in segments)
  k_win, v_win, win_base = (k, v, 0) if window_keys is None else window_keys
  k_pad = pad_seq(k_win.astype(F32), max(w - 1, 0), bq_max)
  v_pad = pad_seq(v_win.astype(F32), max(w - 1, 0), bq_max)
  # Search keys: one float32 copy, padded by `bq_max` rows on each side, so
  # that every stripe slice of a block starts in range (clamped, see
  # `body`); the gate's rows (anchor + bq_max) are read from it too.
  ks_rows = jnp.pad(jnp.moveaxis(k_search.astype(F32), 2, 1),
                    ((0, 0), (0, 0), (bq_max, bq_max), (0, 0)))  # [B, Hk, Lk + 2 bq_max, Ds]

  def segment(q_seg, qs_seg, offset, t_max, bounds):
    """Runs the queries of one segment whose positions are all `< t_max`."""
    f, max_span, bq = tables(q_seg.shape[1], t_max)
    f_j = jnp.asarray(f, jnp.int32)

    def body(qpos, row_ok, qb, qsb):
      qg = group(qb, hk)                                      # [B, bq, Hk, G, D]
      qsg = group(qsb, hk)
      bq_ = qb.shape[1]
      # 1. Span-search over the stripes (not differentiated: routing learns
      #    through the gate below).
      # Row i of stripe j's slice: the key at anchor qpos[0] + i + 1 - f_j.
      # A slice starting more than `bq_max >= bq` rows before key 0 holds
      # no anchor >= 0 (all its rows are masked below): its start is clamped.
      starts = jnp.maximum(qpos[0] + 1 - f_j, -bq_max) + bq_max
      ks = jax.vmap(lambda st: jax.lax.dynamic_slice_in_dim(
          jax.lax.stop_gradient(ks_rows), st, bq_, axis=2))(starts)  # [S, B, Hk, bq, Ds]
      ks = jnp.transpose(ks, (1, 3, 2, 0, 4))                  # [B, bq, Hk, S, Ds]
      search = rowwise_qk(jax.lax.stop_gradient(qsg), ks[:, :, :, None])
      search = jnp.moveaxis(search, 1, 3)                      # [B, Hk, G, bq, S]
      anchor_all = qpos[:, None] + 1 - f_j[None, :]            # [bq, S]
      search = jnp.where((anchor_all >= 0) & row_ok[:, None], search, -jnp.inf)
      top, sel = jax.lax.top_k(search, num)                    # [B, Hk, G, bq, K]
      valid = jnp.isfinite(top)
      anchor = jnp.where(valid, jnp.take_along_axis(
          jnp.broadcast_to(anchor_all, search.shape), sel, axis=-1), -1)
      a_safe = jnp.maximum(anchor, 0)
      # 2. Gate: differentiable search scores of the chosen anchors.
      k_sel = jax.vmap(jax.vmap(lambda x, i: x[i]))(ks_rows, a_safe + bq_max)  # [B,Hk,G,bq,K,Ds]
      k_sel = jnp.where(valid[..., None], k_sel, 0.0)          # no junk from empty slots
      qs_t = jnp.moveaxis(qsg, 1, 3)                           # [B, Hk, G, bq, Ds]
      logits = rowwise_qk(qs_t, k_sel)                        # [B, Hk, G, bq, K]
      gates = jax.nn.softmax(jnp.where(valid, logits, -1e9), axis=-1)
      gates = jnp.where(row_ok[:, None], gates, 0.0)
      # 3. Spans: [max(a - back, 0), min(a + fwd, q - W)], one slice each.
      back, fwd = span_lengths(spans, qpos[:, None])
      start, end = span_bounds(anchor, qpos[:, None], back, fwd, w)
      first = jnp.clip(start, 0, lk - max_span)                # slices stay in range
      ksp = _span_rows(k, first, max_span)                     # [B,Hk,G,bq,K,span,D]
      vsp = _span_rows(v, first, max_span)
      kpos = first[..., None] + jnp.arange(max_span, dtype=jnp.int32)
      ok = ((kpos >= start[..., None]) & (kpos <= end[..., None])
            & valid[..., None])                                # [B,Hk,G,bq,K,span]
      ksp = jnp.where(ok[..., None], ksp, 0.0)                 # keys outside the span
      vsp = jnp.where(ok[..., None], vsp, 0.0)                 # contribute nothing
      q_t = jnp.moveaxis(qg, 1, 3)                             # [B, Hk, G, bq, D]
      s = rowwise_qk(q_t[..., None, :], ksp, scale)           # [B,Hk,G,bq,K,span]
      span_part = partial(jnp.where(ok, s, -jnp.inf), vsp, rowwise_pv)
      # 4. Window once, merged into every span's softmax.
      if w > 0:
        win = window_partial(qg, k_pad, v_pad, qpos - win_base, row_ok, window=w,
                              kv_len=k_win.shape[1], scale=scale)
        win = SoftmaxState(win.m[..., None], win.l[..., None], win.o[..., None, :])
        span_part = merge_states(span_part, win)
      o_k, _ = finish_state(span_part)                              # [B, Hk, G, bq, K, D]
      out = jnp.sum(gates[..., None] * o_k, axis=-2)           # [B, Hk, G, bq, D]
      to_q = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, bq_, hq, *x.shape[4:])  # noqa: E731
      return to_q(out), to_q(anchor), to_q(gates)

    return map_query_blocks(body, bq, offset, bounds, q_seg, qs_seg)

  def run(xs, offset, bounds):
    q_, qs_ = xs
    outs = [segment(q_[:, s0:s1], qs_[:, s0:s1], offset + s0, t_max, bounds)
            for s0, s1, t_max in segments]
    return tuple(jnp.concatenate(x, axis=1) for x in zip(*outs))

  if offset_in_range:
    if q_offset is None:
      raise ValueError("offset_in_range=True needs a q_offset (in [0, Lk - Lq]); pass "
                       "one or leave offset_in_range False.")
    off = jnp.asarray(q_offset, jnp.int32)
    out, anchors, gates = run([q, q_search], off, (off, off + lq - 1))
  else:
    out, anchors, gates = any_offset(run, [q, q_search], q_offset, lq, lk, (0, -1, 0))
  return out.astype(q.dtype), anchors, gates

