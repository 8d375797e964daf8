"""PPA and superlinear attention for a few queries on `pallas_kernels.decode`.

Builds the integer tables the decode kernels consume from `attn.masks` /
`SuperlinearConfig` (the same host tables the `reference` and `xla` paths
use), runs the kernels, and finishes the small per-query arithmetic (gates,
span bounds, log-sum-exp merges) in plain jnp on `[batch, q_len, heads, K]`
arrays, never on the cache.

For `q_len <= MAX_QUERIES` queries at absolute positions
`q_offset + i` against a cache `k, v: [batch, kv_len, kv_heads, head_dim]`
(`q_offset` may be traced; rows past the last query may hold garbage, NaN
included, and never reach the output):

  * `superlinear_attention`: span-search over the stripes some query can use
    (`O(t^p)` rows), the top `num_spans` per query head, then each selected
    span (`O(t^sigma)` rows) merged with the window by log-sum-exp, gated;
  * `ppa_attention`: the dense band of kept offsets next to the query (the
    window, and every offset when `p = 1`) plus one row per kept far offset
    (`O(w + t^p)` rows).

Decode needs no gradient, but a differentiated decode op returns correct
numbers (a `custom_vjp`). Superlinear's backward is written by hand in
`attn.pallas.decode_grad` at the anchors the forward chose: the window, one
block of `W + Lq - 1` cache rows shared by a kv head's rows, by batched
matmuls; each (row, slot) span by a `dynamic_slice` of `max_len` rows in one
`lax.fori_loop`, its key/value gradients added back by
`dynamic_update_slice`; the gate gradients by a second loop over the slots.
(`jax.vjp` of the same output written as gathers of `[rows, K, max_len + W,
D]` keys took up to 55 s (L = 4K, head_dim 64) and 78 s (1M) to compile for
TPU v5e: XLA:TPU relaid those arrays out with huge unrolled loop bodies,
3.2M LLO lines in all at head_dim 64.) PPA's backward is
`jax.vjp` of `_ppa_gathered`, the rows at each query's kept offsets gathered
(the xla path's VJP past `MAX_GATHERED_OFFSETS` kept offsets, i.e. p near 1
on long caches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn import masks, xla
from attn.config import SuperlinearConfig
from attn.pallas import decode_grad as grad
from pallas_kernels import common as pk_common
from pallas_kernels import platform
from pallas_kernels.decode import HARDWARE_CHECKS, common
from pallas_kernels.decode import ops as kernels

OPS = ("ppa_attention", "superlinear_attention")
MAX_QUERIES = common.MAX_QUERIES


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the decode kernels carry a hardware record for `backend`."""
  del q_len  # callers send at most MAX_QUERIES queries
  return platform.verified_on(HARDWARE_CHECKS, backend)


def _to_rows(x, num_kv_heads):
  """`[B, Lq, Hq, D] -> [B, Hk, R, D]`, row `r = g * Lq + i` (head `h * G + g`)."""
  b, lq, hq, d = x.shape
  g = hq // num_kv_heads
  x = x.reshape(b, lq, num_kv_heads, g, d)
  return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, num_kv_heads, g * lq, d)


def _from_rows(x, lq):
  """`[B, Hk, R, ...] -> [B, Lq, Hq, ...]` (inverse of `_to_rows`)."""
  b, hk, r = x.shape[:3]
  rest = x.shape[3:]
  x = jnp.moveaxis(x.reshape(b, hk, r // lq, lq, *rest), 3, 1)
  return x.reshape(b, lq, hk * (r // lq), *rest)


def _row_positions(q_offset, rows: int, lq: int):
  """Absolute position of each row: int32 `[R]`."""
  return q_offset + jnp.arange(rows, dtype=jnp.int32) % lq


def _check(q, k, q_offset):
  lq, lk = q.shape[1], k.shape[1]
  if lq > MAX_QUERIES:
    raise ValueError(f"q_len={lq}: the decode kernels take at most "
                     f"{MAX_QUERIES} queries; use the prefill path.")
  return jnp.asarray(lk - lq if q_offset is None else q_offset, jnp.int32)


# ---------------------------------------------------------------- superlinear


def superlinear_tables(kv_len: int, config: SuperlinearConfig):
  """Host tables of a superlinear decode against a `kv_len` cache.

  Returns `(stripes int32 [S] far to near, spans int32 [kv_len + 1, 2])`:
  `masks.superlinear_stripe_table` and `masks.superlinear_span_table`.
  """
  return (masks.superlinear_stripe_table(kv_len, config),
          masks.superlinear_span_table(kv_len, config))


def superlinear_span_bounds(anchors, pos, spans, config: SuperlinearConfig):
  """Inclusive key range `[lo, hi]` of each selected anchor (`hi < lo`: none).

  anchors: int32 `[..., R, K]` (-1 = no anchor); pos: `[R]` positions;
  spans: the span table (`pallas_kernels.common.span_bounds`).
  """
  back, fwd = pk_common.span_lengths(spans, pos[:, None])
  return pk_common.span_bounds(anchors, pos[:, None], back, fwd, config.window)


def _superlinear_forward(q, k, v, q_search, k_search, q_offset, config, scale, variant,
                         num_splits):
  lq, hk = q.shape[1], k.shape[2]
  num, w = config.num_spans, config.window
  f_desc, spans = superlinear_tables(k.shape[1], config)
  first = common.first_stripe(jnp.asarray(f_desc), q_offset, lq=lq)
  top_s, top_a = kernels.search(q_offset, first, f_desc, _to_rows(q_search, hk), k_search,
                                lq=lq, num=num, variant=variant, num_splits=num_splits)
  valid = jnp.isfinite(top_s)
  anchors = jnp.where(valid, top_a, -1)                        # [B, Hk, R, K]
  gates = jax.nn.softmax(jnp.where(valid, top_s, -1e9), axis=-1)
  qr = _to_rows(q, hk)
  pos = _row_positions(q_offset, qr.shape[2], lq)
  lo, hi = superlinear_span_bounds(anchors, pos, spans, config)
  max_len = int(np.max(spans.astype(np.int64).sum(axis=1))) + 1  # longest span, static
  part = kernels.ranges(lo, hi, qr, k, v, scale=scale, variant=variant, max_len=max_len,
                        num_splits=num_splits)
  if w > 0:
    win = kernels.band(q_offset, qr, k, v, lq=lq, width=w, scale=scale, variant=variant,
                       num_splits=num_splits)
    part = pk_common.merge_states(part, jax.tree.map(lambda x: x[:, :, :, None], win))
  out, _ = pk_common.finish_state(part)                          # [B, Hk, R, K, D]
  out = jnp.sum(gates[..., None] * out, axis=-2)                 # [B, Hk, R, D]
  return (_from_rows(out, lq).astype(q.dtype), _from_rows(anchors, lq),
          _from_rows(gates, lq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _superlinear(q, k, v, q_search, k_search, q_offset, config, scale, variant, num_splits):
  return _superlinear_forward(q, k, v, q_search, k_search, q_offset, config, scale,
                              variant, num_splits)


def _rows_of(x, idx):
  """Gather cache rows per (batch, kv head): x `[B, Lk, Hk, D]`, idx int32
  `[B, Hk, ...]` in `[0, Lk)` -> `[B, Hk, ..., D]`."""
  xt = jnp.moveaxis(x, 2, 1)                                    # [B, Hk, Lk, D]
  return jax.vmap(jax.vmap(lambda rows, i: rows[i]))(xt, idx)


def _gathered_softmax(qr, k, v, idx, ok, scale):
  """Softmax attention of each row over its own list of cache rows.

  qr: `[B, Hk, R, D]`; k, v: `[B, Lk, Hk, D]`; idx, ok: `[B, Hk, R, K, N]`
  (key positions, and which of them count). Returns float32 `[B, Hk, R, K, D]`
  (0 where a list is empty). Masked rows are zeroed before any arithmetic,
  so NaN in unused cache rows reaches neither the output nor a gradient.
  """
  lk = k.shape[1]
  safe = jnp.clip(idx, 0, lk - 1)
  kg = jnp.where(ok[..., None], _rows_of(k, safe), 0).astype(jnp.float32)
  vg = jnp.where(ok[..., None], _rows_of(v, safe), 0).astype(jnp.float32)
  s = jnp.einsum("bhrd,bhrknd->bhrkn", qr.astype(jnp.float32), kg,
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(ok, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bhrkn,bhrknd->bhrkd", p, vg, precision=jax.lax.Precision.HIGHEST)
  return jnp.where((l > 0)[..., None], o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def _superlinear_fwd(q, k, v, q_search, k_search, q_offset, config, scale, variant,
                     num_splits):
  out = _superlinear_forward(q, k, v, q_search, k_search, q_offset, config, scale,
                             variant, num_splits)
  return out, (q, k, v, q_search, k_search, q_offset, out[1])


def _superlinear_bwd(config, scale, variant, num_splits, res, cts):
  del variant, num_splits
  q, k, v, q_search, k_search, q_offset, anchors = res
  lq, lk, hk, w = q.shape[1], k.shape[1], k.shape[2], config.window
  _, spans = superlinear_tables(lk, config)
  max_len = int(np.max(spans.astype(np.int64).sum(axis=1))) + 1  # longest span, static
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  cache = lambda x: jnp.moveaxis(x, 2, 1)  # noqa: E731  [B, Lk, Hk, D] -> [B, Hk, Lk, D]
  qr, qs, kst = f32(_to_rows(q, hk)), _to_rows(q_search, hk), cache(k_search)
  kt, vt, anchors = cache(k), cache(v), _to_rows(anchors, hk)
  pos = _row_positions(q_offset, qr.shape[2], lq)
  valid = anchors >= 0
  ks_sel = _rows_of(k_search, jnp.maximum(anchors, 0))           # [B, Hk, R, K, Ds]
  logits = jnp.einsum("bhrd,bhrkd->bhrk", f32(qs), f32(ks_sel),
                      precision=jax.lax.Precision.HIGHEST)
  gates = jax.nn.softmax(jnp.where(valid, logits, -1e9), axis=-1)  # [B, Hk, R, K]
  lo, hi = superlinear_span_bounds(anchors, pos, spans, config)
  dout = f32(_to_rows(cts[0], hk))
  win = None
  if w > 0:
    start, n = grad.window_block(q_offset, lq, lk, w)
    win, e, kw, vw = grad.window_state(qr, kt, vt, pos, start, n, w, scale)
  o, lse, dq, dk, dv = grad.span_loop(qr, kt, vt, lo, hi, gates, dout, win, max_len, scale)
  if w > 0:
    dq_w, dk_w, dv_w = grad.window_grads(qr, dout, gates, lse, o, win, e, kw, vw, scale)
    dq = dq + dq_w
    dk = grad.add_block(dk, dk_w, start)
    dv = grad.add_block(dv, dv_w, start)
  dgates = jnp.sum(dout[..., None, :] * o, axis=-1) + f32(_to_rows(cts[2], hk))
  dqs, dks = grad.gate_grads(qs, kst, anchors, gates, dgates)
  back = lambda x, like: jnp.moveaxis(x, 1, 2).astype(like.dtype)  # noqa: E731
  return (_from_rows(dq, lq).astype(q.dtype), back(dk, k), back(dv, v),
          _from_rows(dqs, lq).astype(q_search.dtype), back(dks, k_search), None)


_superlinear.defvjp(_superlinear_fwd, _superlinear_bwd)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale: float, variant=None,
                          num_splits: int | None = None):
  """Superlinear attention for a few decode queries with the Pallas kernels.

  Args:
    q: `[B, Lq, Hq, D]`, `Lq <= MAX_QUERIES`; k, v: `[B, Lk, Hk, D]`;
    q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]` (pass `k` for
      the reference's behaviour); q_offset: absolute position of `q[:, 0]`
      (int or traced int32 scalar; None = `Lk - Lq`).
    config, scale: as in `attn.superlinear_attention`.
    variant: `pallas_kernels.platform` variant (None = per platform).
    num_splits: programs per (batch, kv head) that the stripe walk and the
      band tiles are cut into (None = `pallas_kernels.decode.common.split_count`,
      the rule; an int overrides it, e.g. in tests).

  Returns:
    `(out [B, Lq, Hq, D] q.dtype, anchors int32 [B, Lq, Hq, K], gates float32
    [B, Lq, Hq, K])`, as `attn.superlinear_attention_with_anchors`.
  """
  q_offset = _check(q, k, q_offset)
  return _superlinear(q, k, v, q_search, k_search, q_offset, config, float(scale),
                      variant, None if num_splits is None else int(num_splits))


# ----------------------------------------------------------------------- PPA


def ppa_tables(kv_len: int, *, p: float, window: int):
  """Host tables of a PPA decode: `(band width, far offsets int32 [S] ascending)`.

  The band is the leading run of consecutive kept offsets `0..width-1` (the
  window, or every offset when `p = 1`); every other kept offset is a
  stripe, one row per query.
  """
  offsets = masks.ppa_offsets(kv_len - 1, p=p, window=window)
  runs, far = masks.ppa_dense_runs(offsets, min_run=offsets.size + 1)
  width = runs[0][1] + 1 if runs else 0
  return width, far.astype(np.int32)


def _ppa_forward(q, k, v, q_offset, p, window, scale, variant, num_splits):
  lq, hk = q.shape[1], k.shape[2]
  width, far = ppa_tables(k.shape[1], p=p, window=window)
  qr = _to_rows(q, hk)
  part = kernels.band(q_offset, qr, k, v, lq=lq, width=width, scale=scale,
                      variant=variant, num_splits=num_splits)
  if far.size:
    count = common.num_near_offsets(jnp.asarray(far), q_offset, lq=lq)
    far_part = kernels.stripes(q_offset, count, far, qr, k, v, lq=lq, scale=scale,
                               variant=variant, num_splits=num_splits)
    part = pk_common.merge_states(part, far_part)
  out, _ = pk_common.finish_state(part)
  return _from_rows(out, lq).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _ppa(q, k, v, q_offset, p, window, scale, variant, num_splits):
  return _ppa_forward(q, k, v, q_offset, p, window, scale, variant, num_splits)


def _ppa_fwd(q, k, v, q_offset, p, window, scale, variant, num_splits):
  return (_ppa_forward(q, k, v, q_offset, p, window, scale, variant, num_splits),
          (q, k, v, q_offset))


def _ppa_gathered(q, k, v, q_offset, offsets, scale):
  """PPA decode as plain gathers (differentiable): each row attends over the
  cache rows at its kept `offsets` (host `[N]`, `masks.ppa_offsets`: the
  band and the far offsets, `O(w + t^p)` of them), those at or before its
  position. Returns `[B, Lq, Hq, D]` in q's dtype."""
  lq, lk, hk = q.shape[1], k.shape[1], k.shape[2]
  offsets = jnp.asarray(offsets, jnp.int32)                        # [N]
  qr = _to_rows(q, hk)
  pos = _row_positions(q_offset, qr.shape[2], lq)                  # [R]
  idx = pos[:, None] - offsets[None, :]                            # [R, N]
  ok = (idx >= 0) & (idx < lk)
  shape = qr.shape[:3] + (1, offsets.size)                         # [B, Hk, R, 1, N]
  idx, ok = jnp.broadcast_to(idx[:, None], shape), jnp.broadcast_to(ok[:, None], shape)
  o = _gathered_softmax(qr, k, v, idx, ok, scale)[..., 0, :]       # [B, Hk, R, D]
  return _from_rows(o, lq).astype(q.dtype)


# Kept offsets per row above which the PPA decode backward is the xla path's
# VJP instead of gathers (p near 1 on a long cache: the gathered
# `[rows, offsets, D]` keys would approach the cache's size per query row).
MAX_GATHERED_OFFSETS = 1 << 16


def _ppa_bwd(p, window, scale, variant, num_splits, res, ct):
  del variant, num_splits
  q, k, v, q_offset = res
  offsets = masks.ppa_offsets(k.shape[1] - 1, p=p, window=window)
  if offsets.size > MAX_GATHERED_OFFSETS:
    fn = lambda *a: xla.ppa_attention(*a, q_offset, p=p, window=window,  # noqa: E731
                                      scale=scale)
  else:
    fn = lambda *a: _ppa_gathered(*a, q_offset, offsets, scale)  # noqa: E731
  _, pull = jax.vjp(fn, q, k, v)
  return (*pull(ct), None)


_ppa.defvjp(_ppa_fwd, _ppa_bwd)


def ppa_attention(q, k, v, q_offset=None, *, p: float, window: int, scale: float,
                  variant=None, num_splits: int | None = None):
  """PPA for a few decode queries with the Pallas kernels.

  Args as `superlinear_attention` (no search arrays; `num_splits` cuts the
  band tiles and the far-offset walk); `p`, `window` as in
  `attn.ppa_attention`. Returns `[B, Lq, Hq, D]` in `q.dtype`.
  """
  q_offset = _check(q, k, q_offset)
  return _ppa(q, k, v, q_offset, float(p), int(window), float(scale), variant,
              None if num_splits is None else int(num_splits))
