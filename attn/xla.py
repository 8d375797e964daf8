"""Sub-quadratic pure-jnp (`implementation="xla"`) paths.

No op here builds an `[q_len, kv_len]` matrix (except `dense_attention`,
whose scores are quadratic by definition, and even it only holds one query
block at a time). Queries are processed in blocks of `bq` under `lax.map`
with a rematerialised body, so memory is one block's working set in the
forward and in the backward pass. Inside a block every piece of work reads
*contiguous* key slices with `dynamic_slice`:

* a band of offsets `[lo, hi]` (the local window; PPA's dense runs of kept
  offsets): one slice of `bq + hi - lo` keys per query block, a masked matmul;
* a stripe (a fixed offset `d`: PPA's sparse power offsets, superlinear's
  search anchors): one slice of consecutive keys for consecutive queries,
  scored row-wise (`q_i . k_{i-d}`), no gather of single keys;
* a superlinear span: one slice of `max_span` keys per (query, head, span).

Pieces of one softmax are merged through their running max / sum / weighted
values, as in flash attention. Softmax statistics are float32 whatever the
input dtype. Keys and values are sliced from float32 copies (cast back to the
input dtype where a matmul reads them), or, for superlinear spans, read in
the input dtype by a gather whose VJP sums in float32 (`_span_rows`), so in
the backward pass the cotangents of overlapping slices accumulate in
float32, not bfloat16.

Positions: query `i` sits at absolute position `q_offset + i`. A traced
`q_offset` may lie outside `[0, kv_len - q_len]`: `_any_offset` then shifts
the query rows so that the kernels always run at an in-range offset, and a
query whose position lies outside `[0, kv_len)` returns a zero row, as in
`attn.reference`. Inside the kernels every row outside the call's valid
position range `[lo, hi]` (padding rows of the last block included) sees no
key. Keys no valid query may see contribute exactly nothing even if they
hold NaN or Inf: every slice read is zeroed where no row of the block may
see it before any arithmetic (`0 * NaN` would be NaN in values and
gradients).

Shapes: `q: [B, Lq, Hq, D]`, `k, v: [B, Lk, Hk, D]`, `G = Hq // Hk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn._offsets import any_offset as _any_offset
from attn._offsets import shift_rows as _shift_rows
from attn.config import SuperlinearConfig
from attn.layout import BlockLayout
from pallas_kernels.common import (F32, SoftmaxState, finish_state, merge_states,
                                   span_bounds, span_lengths)

# Elements of the largest per-block temporary (scores or gathered keys).
_BLOCK_BUDGET = 1 << 21
# Superlinear: query segments with their own (shorter) span and stripe bounds
# (early queries reach fewer stripes and have shorter spans; 4 segments made
# the 16K-32K forward 25-50% faster on CPU than one).
_SEGMENTS = 4
_SEGMENT_ALIGN = 128


def _pad_seq(x, before, after):
  """Zero-pads axis 1 (the sequence axis)."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (before, after)
  return jnp.pad(x, widths)


def _group(x, num_kv_heads):
  b, l, hq, d = x.shape
  return x.reshape(b, l, num_kv_heads, hq // num_kv_heads, d)


def _block_size(q_len: int, cols: int, heads: int, head_dim: int, batch: int) -> int:
  """Largest query block (power of two <= 128) whose temporaries fit the budget."""
  bq = 128
  while bq > 8 and bq * cols * heads * max(head_dim, 1) * batch > _BLOCK_BUDGET:
    bq //= 2
  return min(bq, q_len)


def _partial(s, v, contract):
  """Softmax state of masked scores `s` (-inf = masked) against values `v`.

  `contract` is an einsum spec from (`exp(s)`, `v`) to `o`, or a function
  of them; the key axis of `s` is its last axis.
  """
  m = jnp.max(s, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m_safe[..., None])
  o = (jnp.einsum(contract, e, v.astype(F32)) if isinstance(contract, str)
       else contract(e, v))
  return SoftmaxState(m, jnp.sum(e, axis=-1), o)


def _rowwise_qk(q, keys, scale=None):
  """`q: [..., D]`, `keys: [..., n, D]` -> `[..., n]` float32 row-wise dots.

  Written as multiply-and-reduce rather than a batched `einsum`: XLA fuses
  it with the slicing of `keys` (no gathered copy), while a batched dot
  with one query row per batch entry runs far slower on CPU.
  """
  s = jnp.sum(q[..., None, :].astype(F32) * keys.astype(F32), axis=-1)
  return s if scale is None else s * scale


def _rowwise_pv(e, values):
  """`e: [..., n]`, `values: [..., n, D]` -> `[..., D]` float32."""
  return jnp.sum(e[..., None] * values.astype(F32), axis=-2)


def _qk(qg, keys, spec, scale=None):
  s = jnp.einsum(spec, qg, keys, preferred_element_type=F32)
  return s if scale is None else s * scale


def _map_query_blocks(body, bq: int, q_offset, bounds, *xs):
  """Runs `body(qpos [bq], row_ok [bq], *blocks)` over query blocks of `xs`.

  `xs` are `[B, Lq, ...]`; `bounds = (lo, hi)`: a row is valid (`row_ok`)
  iff its position lies in `[lo, hi]` (padding rows of the last block never
  are). The body's outputs must be `[B, bq, ...]`; they are stitched back to
  `[B, Lq, ...]`. The body is rematerialised in the backward pass.
  """
  lo, hi = bounds
  q_len = xs[0].shape[1]
  nb = -(-q_len // bq)
  pad = nb * bq - q_len

  def split(x):
    x = _pad_seq(x, 0, pad)
    return jnp.moveaxis(x.reshape(x.shape[0], nb, bq, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def step(args):
    i, *blocks = args
    qpos = q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)
    return body(qpos, (qpos >= lo) & (qpos <= hi), *blocks)

  outs = jax.lax.map(step, (jnp.arange(nb, dtype=jnp.int32), *map(split, xs)))

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], nb * bq, *y.shape[3:])[:, :q_len]

  return jax.tree.map(join, outs)


def _zero_unseen(x, seen):
  """Zeroes the rows of `x: [B, n, H, D]` whose `seen: [n]` is False."""
  return jnp.where(seen[None, :, None, None], x, jnp.zeros((), x.dtype))


# ------------------------------------------------------------------ pieces


def _band_partial(qg, k_pad, v_pad, qpos, row_ok, *, lo, hi, pad_left, kv_len,
                  scale, keep=None):
  """State of the keys at offsets `lo <= d <= hi` from each query of a block.

  One contiguous slice of `bq + hi - lo` keys serves the whole block (a
  matmul, masked to the band). qg: `[B, bq, Hk, G, D]`; k_pad, v_pad: float32
  keys padded by `pad_left >= hi` on the left and `bq` on the right; row_ok:
  bool `[bq]`; keep: optional bool `[hi - lo + 1]`, the offsets of the band
  that are kept. Returns a `SoftmaxState` over `[B, Hk, G, bq]`.
  """
  bq = qg.shape[1]
  n = bq + hi - lo
  # The slice actually read (dynamic_slice clamps its start): key positions
  # follow the clamped start, so a row never scores a key it did not get.
  start = jnp.clip(qpos[0] - hi + pad_left, 0, k_pad.shape[1] - n)
  kpos = start - pad_left + jnp.arange(n, dtype=jnp.int32)
  d = qpos[:, None] - kpos[None, :]
  ok = (d >= lo) & (d <= hi) & (kpos >= 0) & (kpos < kv_len) & row_ok[:, None]
  if keep is not None:
    ok &= jnp.asarray(keep)[jnp.clip(d - lo, 0, hi - lo)]
  seen = jnp.any(ok, axis=0)
  kw = _zero_unseen(jax.lax.dynamic_slice_in_dim(k_pad, start, n, axis=1), seen)
  vw = _zero_unseen(jax.lax.dynamic_slice_in_dim(v_pad, start, n, axis=1), seen)
  s = jnp.where(ok, _qk(qg, kw.astype(qg.dtype), "bqhgd,bkhd->bhgqk", scale), -jnp.inf)
  return _partial(s, vw, "bhgqk,bkhd->bhgqd")


def _window_partial(qg, k_pad, v_pad, qpos, row_ok, *, window, kv_len, scale):
  """Local-window state of one query block (keys padded by `window - 1`)."""
  return _band_partial(qg, k_pad, v_pad, qpos, row_ok, lo=0, hi=window - 1,
                       pad_left=window - 1, kv_len=kv_len, scale=scale)


def _stripe_slices(x_pad, starts, bq):
  """`[S, B, bq, H, D]`: for each stripe, the `bq` rows from `starts[s]`."""
  return jax.vmap(lambda st: jax.lax.dynamic_slice_in_dim(x_pad, st, bq, axis=1))(starts)


def _window_only(q, k, v, *, window, scale, q_offset):
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq = _block_size(lq, 128 + window, hq, d, b)
  k_pad = _pad_seq(k.astype(F32), window - 1, bq)
  v_pad = _pad_seq(v.astype(F32), window - 1, bq)

  def run(xs, offset, bounds):
    def body(qpos, row_ok, qb):
      part = _window_partial(_group(qb, hk), k_pad, v_pad, qpos, row_ok,
                             window=window, kv_len=lk, scale=scale)
      out, _ = finish_state(part)                                 # [B, Hk, G, bq, D]
      return jnp.moveaxis(out, 3, 1).reshape(b, -1, hq, d)
    return _map_query_blocks(body, bq, offset, bounds, *xs)

  return _any_offset(run, [q], q_offset, lq, lk, (0,)).astype(q.dtype)


# --------------------------------------------------------------------- ops


def dense_attention(q, k, v, q_offset=None, *, scale):
  """Causal attention, one query block against all keys at a time."""
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq = _block_size(lq, lk, hq, 1, b)
  kpos = jnp.arange(lk, dtype=jnp.int32)

  def run(xs, offset, bounds):
    # Keys past the last valid query are seen by no one: zeroed once.
    seen = (kpos <= bounds[1]) & (bounds[0] <= bounds[1])
    k32, v32 = _zero_unseen(k.astype(F32), seen), _zero_unseen(v.astype(F32), seen)

    def body(qpos, row_ok, qb):
      s = _qk(_group(qb, hk), k32.astype(k.dtype), "bqhgd,bkhd->bhgqk", scale)
      ok = (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
      out, _ = finish_state(_partial(jnp.where(ok, s, -jnp.inf), v32, "bhgqk,bkhd->bhgqd"))
      return jnp.moveaxis(out, 3, 1).reshape(b, -1, hq, d)
    return _map_query_blocks(body, bq, offset, bounds, *xs)

  return _any_offset(run, [q], q_offset, lq, lk, (0,)).astype(q.dtype)


def sliding_window_attention(q, k, v, q_offset=None, *, window, scale):
  """Banded attention: one contiguous key slice per query block."""
  return _window_only(q, k, v, window=min(window, k.shape[1]), scale=scale,
                      q_offset=q_offset)


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale):
  """PPA: dense runs of kept offsets as banded slices, sparse ones as
  stripes (`attn.xla_ppa`, which builds on this module's pieces)."""
  from attn import xla_ppa
  return xla_ppa.ppa_attention(q, k, v, q_offset, p=p, window=window, scale=scale)


def block_sparse_attention(q, k, v, *, layout: BlockLayout, scale):
  """Attention restricted to `layout`: each query block gathers its key blocks.

  Query blocks are bucketed by their number of key blocks (rounded up to a
  power of two), and each bucket runs with its own static width, so the work
  is at most twice the number of non-empty tiles (a single padded width
  would make a causal layout cost every tile of the square).
  """
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq, bk = layout.block_q, layout.block_k
  nq, nk = layout.num_q_blocks, -(-lk // bk)
  kr = _pad_seq(k.astype(F32), 0, nk * bk - lk).reshape(b, nk, bk, hk, d)
  vr = _pad_seq(v.astype(F32), 0, nk * bk - lk).reshape(b, nk, bk, hk, d)
  qr = jnp.moveaxis(_pad_seq(q, 0, nq * bq - lq).reshape(b, nq, bq, hq, d), 1, 0)
  tiles = jnp.asarray(layout.block_masks)
  widths = 2 ** np.ceil(np.log2(np.maximum(layout.num_kv_blocks, 1))).astype(int)
  widths = np.minimum(widths, layout.kv_blocks.shape[1])

  def bucket(ids, width):
    """Outputs `[len(ids), B, bq, Hq, D]` of the query blocks `ids`."""
    @jax.checkpoint
    def step(args):
      qb, cols, mids = args                                # [B, bq, Hq, D], [width] x2
      ok = jnp.moveaxis(tiles[mids], 0, 1).reshape(bq, width * bk)
      kpos = (cols[:, None] * bk + jnp.arange(bk)).reshape(-1)
      ok = ok & (kpos < lk)[None, :]
      seen = jnp.any(ok, axis=0)
      kb = _zero_unseen(kr[:, cols].reshape(b, width * bk, hk, d), seen)
      vb = _zero_unseen(vr[:, cols].reshape(b, width * bk, hk, d), seen)
      s = jnp.where(ok, _qk(_group(qb, hk), kb.astype(q.dtype), "bqhgd,bkhd->bhgqk",
                            scale), -jnp.inf)
      out, _ = finish_state(_partial(s, vb, "bhgqk,bkhd->bhgqd"))
      return jnp.moveaxis(out, 3, 1).reshape(b, bq, hq, d)

    return jax.lax.map(step, (qr[ids], jnp.asarray(layout.kv_blocks[ids, :width]),
                              jnp.asarray(layout.mask_ids[ids, :width])))

  out = jnp.zeros(qr.shape, F32)
  for width in np.unique(widths):
    ids = np.nonzero(widths == width)[0]
    out = out.at[ids].set(bucket(ids, int(width)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, hq, d)[:, :lq]
  return out.astype(q.dtype)


# -------------------------------------------------------------- superlinear


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
                          config: SuperlinearConfig, scale, window_keys=None):
  """Superlinear attention (N = 2): stripe search, top-k spans, gated merge.

  Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32, gates
  [B, Lq, Hq, K] float32)`; see `attn.superlinear_attention`.
  `window_keys`: optional `(k_win, v_win, base)`: the local window reads its
  keys from `k_win, v_win: [B, n, Hk, D]`, row `i` holding the key at
  position `base + i` (int32, may be traced), not from `k, v`; they must
  hold every window key of every query (context parallelism: a shard's own
  keys after its predecessor's last `W - 1`, `attn.context_parallel`).
  """
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  ds = q_search.shape[-1]
  num = config.num_spans
  w = min(config.window, lk)
  f_all = masks.superlinear_stripe_table(lk, config)         # far -> near, [S]
  max_span_all = min(masks.superlinear_max_span(lk, config), lk)
  spans = jnp.asarray(masks.superlinear_span_table(lk, config))

  # Padded float32 copies shared by all segments (gathered rows' cotangents
  # then accumulate in float32). Search keys: every stripe slice
  # [start, start + bq) stays in range. Span rows are read from k, v
  # themselves (`_span_rows`: float32 rows, float32 cotangent sums).
  pad_left = int(f_all[0])
  ks_pad = _pad_seq(jax.lax.stop_gradient(k_search), pad_left, 128)
  k_win, v_win, win_base = (k, v, 0) if window_keys is None else window_keys
  k_pad = _pad_seq(k_win.astype(F32), max(w - 1, 0), 128)
  v_pad = _pad_seq(v_win.astype(F32), max(w - 1, 0), 128)
  ks_rows = jnp.moveaxis(k_search.astype(F32), 2, 1)         # [B, Hk, Lk, Ds]

  def segment(q_seg, qs_seg, offset, t_max, bounds):
    """Runs the queries of one segment whose positions are all `< t_max`."""
    f = f_all[-masks.superlinear_num_stripes(t_max, config):]
    max_span = min(masks.superlinear_max_span(t_max, config), max_span_all)
    cols = max(128 + w, f.size * ds // max(d, 1) + num * max_span)
    bq = _block_size(q_seg.shape[1], cols, hq, d, b)
    f_j = jnp.asarray(f, jnp.int32)

    def body(qpos, row_ok, qb, qsb):
      qg = _group(qb, hk)                                      # [B, bq, Hk, G, D]
      qsg = _group(qsb, hk)
      bq_ = qb.shape[1]
      # 1. Span-search over the stripes (not differentiated: routing learns
      #    through the gate below).
      starts = qpos[0] + 1 - f_j + pad_left
      ks = _stripe_slices(ks_pad, starts, bq_)                 # [S, B, bq, Hk, Ds]
      ks = jnp.moveaxis(ks, 0, 3)                              # [B, bq, Hk, S, Ds]
      search = _rowwise_qk(jax.lax.stop_gradient(qsg), ks[:, :, :, None])
      search = jnp.moveaxis(search, 1, 3)                      # [B, Hk, G, bq, S]
      anchor_all = qpos[:, None] + 1 - f_j[None, :]            # [bq, S]
      search = jnp.where((anchor_all >= 0) & row_ok[:, None], search, -jnp.inf)
      top, sel = jax.lax.top_k(search, num)                    # [B, Hk, G, bq, K]
      valid = jnp.isfinite(top)
      anchor = jnp.where(valid, jnp.take_along_axis(
          jnp.broadcast_to(anchor_all, search.shape), sel, axis=-1), -1)
      a_safe = jnp.maximum(anchor, 0)
      # 2. Gate: differentiable search scores of the chosen anchors.
      k_sel = jax.vmap(jax.vmap(lambda x, i: x[i]))(ks_rows, a_safe)  # [B,Hk,G,bq,K,Ds]
      k_sel = jnp.where(valid[..., None], k_sel, 0.0)          # no junk from empty slots
      qs_t = jnp.moveaxis(qsg, 1, 3)                           # [B, Hk, G, bq, Ds]
      logits = _rowwise_qk(qs_t, k_sel)                        # [B, Hk, G, bq, K]
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
      s = _rowwise_qk(q_t[..., None, :], ksp, scale)           # [B,Hk,G,bq,K,span]
      span_part = _partial(jnp.where(ok, s, -jnp.inf), vsp, _rowwise_pv)
      # 4. Window once, merged into every span's softmax.
      if w > 0:
        win = _window_partial(qg, k_pad, v_pad, qpos - win_base, row_ok, window=w,
                              kv_len=k_win.shape[1], scale=scale)
        win = SoftmaxState(win.m[..., None], win.l[..., None], win.o[..., None, :])
        span_part = merge_states(span_part, win)
      o_k, _ = finish_state(span_part)                              # [B, Hk, G, bq, K, D]
      out = jnp.sum(gates[..., None] * o_k, axis=-2)           # [B, Hk, G, bq, D]
      to_q = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, bq_, hq, *x.shape[4:])  # noqa: E731
      return to_q(out), to_q(anchor), to_q(gates)

    return _map_query_blocks(body, bq, offset, bounds, q_seg, qs_seg)

  if q_offset is not None:   # positions unknown at trace time: one segment.
    segments = [(0, lq, lk)]
  else:
    # Static positions: cut the queries into segments (block-aligned) so that
    # early queries use the shorter spans and fewer stripes they can reach.
    cuts = sorted({0, lq} | {(lq * i // _SEGMENTS) // _SEGMENT_ALIGN * _SEGMENT_ALIGN
                             for i in range(1, _SEGMENTS)})
    segments = [(s0, s1, lk - lq + s1) for s0, s1 in zip(cuts, cuts[1:]) if s1 > s0]

  def run(xs, offset, bounds):
    q_, qs_ = xs
    outs = [segment(q_[:, s0:s1], qs_[:, s0:s1], offset + s0, t_max, bounds)
            for s0, s1, t_max in segments]
    return tuple(jnp.concatenate(x, axis=1) for x in zip(*outs))

  out, anchors, gates = _any_offset(run, [q, q_search], q_offset, lq, lk, (0, -1, 0))
  return out.astype(q.dtype), anchors, gates
