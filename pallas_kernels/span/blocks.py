"""Block logic of the span kernels: pure functions on int32 tables.

The kernels of this family compute *interval attention*: every row `r` of a
row tensor (a query of one head) attends the contiguous key range
`[lo[r], hi[r]]` (inclusive; empty when `hi < lo`). Superlinear span
attention is two such calls:

  * the **window**: rows are the queries (query-major, the `G` heads of a kv
    head interleaved), `[pos - W + 1, pos]`;
  * the **spans**: rows are the (query, head, slot) pairs, sorted by span
    start, `[max(a - back(t), 0), min(a + fwd(t), pos - W)]`.

Rows are cut into tiles of `block_q` rows. A tile visits the key blocks
(`block_k` keys each) covering the union `[min lo, max hi]` of its non-empty
rows, with per-row masks. Because span rows are sorted by start, the rows of
a tile have nearly equal starts and their spans overlap almost entirely:
a tile visits at most `(max_span + block_k) / block_k + spread` blocks, where
the spreads of all tiles of a head sum to at most the number of key blocks.
The work is therefore bounded by the sum of the span lengths (plus one block
per tile), whatever anchors the search chose, and no span is ever cut short.

Shapes: rows `[B, H, R]` (`R` a multiple of `block_q`), tables per tile
`[B, H, R // block_q]`, per key block `[B, H, Lk // block_k]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMPTY_LO, EMPTY_HI = 0, -1
_BIG = jnp.iinfo(jnp.int32).max


def tile_bounds(lo, hi, block_q: int):
  """Key range each tile must visit: the union of its non-empty rows.

  Args:
    lo, hi: int32 `[B, H, R]` row bounds (inclusive; `hi < lo` = empty).
    block_q: rows per tile (`R % block_q == 0`).

  Returns:
    `(tile_lo, tile_hi)` int32 `[B, H, R // block_q]`; an all-empty tile
    gets `(0, -1)`.
  """
  b, h, r = lo.shape
  nonempty = hi >= lo
  lo_t = jnp.where(nonempty, lo, _BIG).reshape(b, h, r // block_q, block_q).min(-1)
  hi_t = jnp.where(nonempty, hi, -1).reshape(b, h, r // block_q, block_q).max(-1)
  any_t = hi_t >= 0
  return jnp.where(any_t, lo_t, EMPTY_LO).astype(jnp.int32), hi_t.astype(jnp.int32)


def tile_blocks(tile_lo, tile_hi, block_k: int):
  """First key block and number of key blocks a tile visits (0 if empty)."""
  first = tile_lo // block_k
  count = jnp.where(tile_hi >= tile_lo, tile_hi // block_k - first + 1, 0)
  return first.astype(jnp.int32), count.astype(jnp.int32)


def key_block_tiles(tile_lo, tile_hi, num_key_blocks: int, block_k: int):
  """For each key block, a contiguous range of tiles holding every tile that
  visits it (used by the dk/dv kernel, which loops over tiles per key block).

  A tile visits key block `c` iff `first_t <= c <= last_t`. With the suffix
  minimum of `first` and the prefix maximum of `last` (both monotone) the
  visiting tiles lie in `[t0, t1]`, `t0` = first tile whose prefix-max
  `last >= c`, `t1` = last tile whose suffix-min `first <= c`. That holds for
  any row order; for rows sorted by start the range holds (almost) only
  visiting tiles. Tiles in the range that do not visit `c` contribute zero
  (their row masks exclude the block).

  Returns:
    `(t0, count)` int32 `[B, H, num_key_blocks]`.
  """
  nonempty = tile_hi >= tile_lo
  first = jnp.where(nonempty, tile_lo // block_k, num_key_blocks)
  last = jnp.where(nonempty, tile_hi // block_k, -1)
  suffix_min_first = jax.lax.cummin(first, axis=2, reverse=True)
  prefix_max_last = jax.lax.cummax(last, axis=2)
  c = jnp.arange(num_key_blocks, dtype=jnp.int32)
  search = jax.vmap(jax.vmap(lambda a, v, side: jnp.searchsorted(a, v, side=side),
                             in_axes=(0, None, None)), in_axes=(0, None, None))
  t0 = search(prefix_max_last, c, "left")
  t1 = search(suffix_min_first, c, "right") - 1
  count = jnp.maximum(t1 - t0 + 1, 0)
  return t0.astype(jnp.int32), count.astype(jnp.int32)


def window_bounds(pos, window: int, kv_len: int):
  """Row bounds of the window `[pos - W + 1, pos]` (clipped to the keys).

  `pos`: int32 absolute query positions (any shape); `window = 0`: empty.
  """
  if window <= 0:
    return jnp.full_like(pos, EMPTY_LO), jnp.full_like(pos, EMPTY_HI)
  lo = jnp.maximum(pos - window + 1, 0)
  hi = jnp.minimum(pos, kv_len - 1)
  empty = hi < lo
  return jnp.where(empty, EMPTY_LO, lo), jnp.where(empty, EMPTY_HI, hi)


def sort_rows_by_start(lo, hi):
  """Permutation `[B, H, N]` ordering rows by start, empty rows last.

  Sorting makes the rows of a tile start close together, so a tile's key
  union is about one span long (see the module docstring).
  """
  key = jnp.where(hi >= lo, lo, _BIG)
  return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)


def visited_keys_mask(lo, hi, block_q: int, block_k: int, kv_len: int):
  """bool `[B, H, R, kv_len]`: the keys the kernels load for each row's tile.

  Host-side/test helper: a row's keys are those of the key blocks its tile
  visits (`tile_blocks`), so a row's interval is attended in full iff it lies
  inside this mask. Quadratic in size; for tests only.
  """
  tlo, thi = tile_bounds(lo, hi, block_q)
  first, count = tile_blocks(tlo, thi, block_k)
  kb = jnp.arange(kv_len, dtype=jnp.int32) // block_k
  vis = (kb >= first[..., None]) & (kb < (first + count)[..., None])   # [B,H,T,Lk]
  return jnp.repeat(vis, block_q, axis=2)
