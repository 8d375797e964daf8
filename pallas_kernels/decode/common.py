"""Block logic shared by the decode kernels' TPU and GPU variants.

Small pure functions of int32 scalars / arrays: they run inside the kernels
(on traced values), in the `attn` glue and in the tests (on numpy), so the
loop bounds a kernel uses and the work a test counts are the same numbers.

Conventions. A decode call has `lq <= MAX_QUERIES` queries at absolute
positions `pos_i = q_offset + i` against a cache of `kv_len` rows. The
*rows* of a kernel are its softmax states: per kv head, `r = g * lq + i` for
query head `g` of the group and query `i` (the query's position is
`q_offset + r % lq`). A *band* of width `w` holds, for every row, the keys
at offsets `0 <= pos - key < w`; a *stripe* of offset `d` the key
`pos - d`; a *range* `[lo, hi]` (absolute, inclusive) the keys of one
row's superlinear span.

Tiles: a piece of `n` consecutive keys starting at a nominal key `start` is
read as a window of `n_buf >= n` rows starting at `row0 = window_start(...)`
(rounded down to `align`, clamped into the cache); the kernel masks every
row outside `[start, start + n)` and outside the piece, so rounding and
clamping never count a key twice and never expose a row no query may see.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import F32, cdiv

MAX_QUERIES = 16
NEG_INF = float("-inf")


def window_start(start, *, align: int, n_buf: int, kv_len: int):
  """First row of the `n_buf`-row window that holds `[start, start + n)`.

  `start` rounded down to a multiple of `align`, then clamped to
  `[0, kv_len - n_buf]` (requires `n_buf <= kv_len` and
  `n_buf >= n + align - 1`, so the piece stays inside the window).
  """
  row0 = (start // align) * align
  return jnp.clip(row0, 0, kv_len - n_buf)


def band_bounds(q_offset, *, lq: int, width: int):
  """Keys `[lo, hi)` a band of `width` offsets touches for the `lq` queries."""
  lo = jnp.maximum(q_offset - width + 1, 0)
  return lo, q_offset + lq


def num_tiles(lo, hi, n: int):
  """Tiles of `n` keys covering `[lo, hi)` (0 when empty)."""
  return jnp.maximum(cdiv(hi - lo, n), 0)


def first_stripe(f_desc, q_offset, *, lq: int):
  """Index of the farthest stripe some query can use.

  `f_desc`: int32 `[S]` stripe offsets `f(j)`, far to near (descending).
  Stripe `j` anchors query `i` at `q_offset + i + 1 - f(j)`, valid when
  `>= 0`; stripes with `f(j) > q_offset + lq` are invalid for every query,
  and they form a prefix of the table.
  """
  return jnp.sum((f_desc > q_offset + lq).astype(jnp.int32))


def num_near_offsets(offsets_asc, q_offset, *, lq: int):
  """Number of ascending stripe offsets `d` with `d <= q_offset + lq - 1`."""
  return jnp.sum((offsets_asc <= q_offset + lq - 1).astype(jnp.int32))


def topk_insert(scores, anchors, s, a):
  """Insert `(s, a)` into running top-k lists (descending, ties keep the older).

  scores, anchors: tuples of `num` arrays (slot 0 best); s, a: arrays of the
  same shape. A new entry goes after every entry `>=` it, so among equal
  scores the one inserted first (the farther stripe) stays ahead, as
  `lax.top_k` over a far-to-near table does; `-inf` is never inserted.
  """
  num = len(scores)
  pos = sum((c >= s).astype(jnp.int32) for c in scores)
  new_s, new_a = [], []
  for k in range(num):
    prev_s = scores[k - 1] if k else s
    prev_a = anchors[k - 1] if k else a
    new_s.append(jnp.where(pos > k, scores[k], jnp.where(pos == k, s, prev_s)))
    new_a.append(jnp.where(pos > k, anchors[k], jnp.where(pos == k, a, prev_a)))
  return tuple(new_s), tuple(new_a)


def softmax_step(m, l, s, axis: int):
  """One flash-attention step of the running max / sum.

  m, l: running max and `sum exp(s - m)` (keepdims shape of `s` reduced over
  `axis`); s: float32 scores, `-inf` where invisible. Returns
  `(m_new, l_new, p, alpha)`: `p = exp(s - m_new)` (0 where invisible) and
  `alpha` rescales the running weighted values, `o_new = alpha o + p v`.
  Never NaN: an all-invisible step keeps `m = -inf, l = 0`.
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=axis, keepdims=True))
  safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
  p = jnp.where(jnp.isfinite(s), jnp.exp(s - safe), 0.0)
  return m_new, alpha * l + jnp.sum(p, axis=axis, keepdims=True), p, alpha
