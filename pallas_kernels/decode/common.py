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


# ------------------------------------------------------------------ splits
#
# Flash-decoding: a decode call has few rows (`G * lq` per kv head) and a
# long serial walk (stripes, band tiles), so a `(batch, kv_heads)` grid
# leaves most of a GPU idle. Each walk is cut into `num_splits` contiguous
# chunks, one program each; the partial softmax states (or per-split top-k
# lists) are merged afterwards in the glue.

TARGET_PROGRAMS = 132   # H100 SMs: a decode grid aims at >= one program per SM
GATHER_ROWS = 16        # cache rows one GPU search / stripes step gathers
BAND_UNIT = 128         # band keys per split are a multiple of this (every tile size)
MIN_STRIPES_PER_SPLIT = 8


def split_count(items: int, *, per_step: int, programs: int,
                target: int = TARGET_PROGRAMS) -> int:
  """Static split count of a walk of `items` (stripes or tiles).

  The rule: enough splits for `programs * splits >= target` (`programs` =
  batch * kv_heads), but never fewer than `per_step` items per split:
  `min(ceil(target / programs), ceil(items / per_step))`, at least 1.
  Only the static table size enters, so the split count is fixed
  per cache length; the work inside each split follows the traced bounds.
  """
  if items <= 0:
    return 1
  return max(1, min(cdiv(target, max(programs, 1)), cdiv(items, per_step)))


def stripes_per_step(lq: int) -> int:
  """Stripes one GPU step gathers (`GATHER_ROWS` rows, `next_pow2(lq)`
  per stripe)."""
  return max(1, GATHER_ROWS // (1 << max(0, lq - 1).bit_length()))


def stripe_splits(n_stripes: int, *, programs: int, num_splits=None) -> int:
  """Split count of a stripe walk over a table of `n_stripes` (both
  variants use it, so they return the same shapes): at least
  `MIN_STRIPES_PER_SPLIT` stripes per split; `num_splits` overrides the
  rule (clipped to `[1, n_stripes]`)."""
  s = num_splits or split_count(n_stripes, per_step=MIN_STRIPES_PER_SPLIT,
                                programs=programs)
  return max(1, min(int(s), max(n_stripes, 1)))


def band_units(width: int, lq: int) -> int:
  """`BAND_UNIT`-key units covering the longest band `width + lq - 1`."""
  return cdiv(width + lq - 1, BAND_UNIT)


def band_splits(width: int, *, lq: int, programs: int, num_splits=None) -> int:
  """Split count of a band: split `s` takes whole `BAND_UNIT`-key units of
  the band's keys (`split_range` over `band_units`)."""
  units = band_units(width, lq)
  s = num_splits or split_count(units, per_step=1, programs=programs)
  return max(1, min(int(s), max(units, 1)))


def range_splits(max_len: int | None, *, programs: int, num_splits=None) -> int:
  """Split count of the span ranges: each (row, slot) range of at most
  `max_len` keys (None: unknown, no split) is cut into that many equal parts
  (`range_part`), at least `BAND_UNIT` keys each by the rule."""
  if num_splits:
    return max(1, int(num_splits))
  if not max_len:
    return 1
  return split_count(cdiv(max_len, BAND_UNIT), per_step=1, programs=programs)


def range_part(lo, hi, split, splits: int):
  """Part `split` of `splits` of the inclusive range `[lo, hi]` (inclusive;
  empty, `hi < lo`, when the range is)."""
  n = jnp.maximum(hi - lo + 1, 0)
  return lo + split * n // splits, lo + (split + 1) * n // splits - 1


def split_range(split, splits: int, items: int):
  """Items `[split * items // splits, (split + 1) * items // splits)`: the
  balanced chunk of split `split` (non-empty when `items >= splits`)."""
  return split * items // splits, (split + 1) * items // splits


def merge_split_states(m, l, o, axis: int):
  """Merges partial softmax states along a split axis.

  m, l: `[..., S, ...]` (split axis `axis`), o: the same with a trailing D.
  Returns `(m, l, o)` without that axis; all-empty splits give
  `(-inf, 0, 0)`.
  """
  m_max = jnp.max(m, axis=axis, keepdims=True)
  safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
  return (jnp.squeeze(m_max, axis), jnp.sum(w * l, axis=axis),
          jnp.sum(w[..., None] * o, axis=axis))


def merge_topk(scores, anchors, num: int):
  """Merges per-split top-k lists into one top-`num` list.

  scores, anchors: `[..., S * K]`, the split lists concatenated in split
  order (split 0 holds the farthest stripes, each list best first, ties
  farther first). A stable sort by descending score keeps, among equal
  scores, the lower position, which is the farther stripe: the tie rule of
  `topk_insert` and of `lax.top_k` over the far-to-near table.
  """
  order = jnp.argsort(-scores, axis=-1, stable=True)[..., :num]
  return (jnp.take_along_axis(scores, order, axis=-1),
          jnp.take_along_axis(anchors, order, axis=-1))
