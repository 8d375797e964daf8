"""PPA prefill routing: per query block, stripes or masked block-sparse tiles.

The stripe kernels (`pallas_kernels.stripe.ppa_attention`) load, per query
block and kv head, the key tiles of the dense runs of kept offsets plus one
`block_q`-row window of K and V per far offset. At large `p` the far offsets
are so many that this reads more than the tiles of the block's causal PPA
mask would. This module decides, for static sizes, which query blocks go
to the block-sparse kernels instead (with the PPA mask as per-tile masks)
and builds their `attn.BlockLayout`.

The rule counts rows of K loaded per query block and kv head (V the same):

    tile_rows   = group * nonempty_tiles * block_k
    stripe_rows = band_rows + far_offsets * block_q

* `nonempty_tiles`: `block_q x block_k` tiles of the block's PPA mask that
  hold a kept offset (the block-sparse kernels visit exactly these);
* `band_rows`: per dense run `(lo, hi)` of kept offsets
  (`attn.masks.ppa_dense_runs`), the block's key range
  `[first_pos - hi, last_pos - lo]` (clipped to `>= 0`) in whole `block_k`
  tiles;
* `far_offsets`: every far offset up to the last query position: a stripe
  call loops each of its query blocks over all the far offsets it is given,
  valid for the block or not;
* `group = q_heads // kv_heads`: the stripe kernels load a row once for the
  group, the block-sparse kernels once per query head (grid `(B, Hq, nq)`);
  the accounting of `pallas_kernels.cost.ppa_fwd` (stripes) and
  `cost.block_sparse_fwd` (tiles).

The stripes take the longest run of final query blocks whose every block
has `stripe_rows < tile_rows`; every other block takes the tiles (ties go
to the tiles: matmuls, not row-wise dots). So a prefill is at most two
kernel calls (tiles for the first blocks, stripes for the last), and every
block loads at most its tiles' rows, which are at most the rows of dense
causal tiles at the same blocks: by this count a routed PPA never reads
more than dense attention. (Splitting the stripe blocks into several calls,
each paying only the far offsets up to its own last query, would load
2-6% fewer rows at `p` 0.5-0.6 and `L` 4K-128K, by this count, for up to
12 calls' compiles and launches.)

Not counted: the block-sparse kernels' partial-tile mask loads (`[block_q,
block_k]` each), TPU alignment rows of misaligned stripes, and the stripe
kernels' own block sizes (the count uses the routing blocks).

Limit: the routed tiles are host tables (`MAX_ROUTED_TILES`, about every
causal tile of L = 128K at 128-row blocks); past that budget the remaining
blocks run the stripes even where the tiles would load less.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attn import _checks, masks
from attn.layout import FULL, BlockLayout

# Routing blocks: powers of two >= 16 (the block-sparse kernels' layouts).
ROUTE_BLOCK = 128
# Table budget: the routed blocks' tiles are listed in host tables (int32
# `[num_q_blocks, width]` and the transposed ones) and their distinct masks
# (one `[block_q, block_k]` int32 tile per diagonal) become constants of the
# program; at most this many tiles are routed (PPA at p >= 0.75 routes
# every causal tile: 525K at L = 128K with 128-row blocks).
MAX_ROUTED_TILES = 1 << 20


def _pow2_block(name: str, value: int) -> int:
  if not _checks.is_int(value) or value < 16 or value & (value - 1):
    raise ValueError(f"{name}={value!r}: must be a power of two >= 16 (block-sparse "
                     "kernel tiles).")
  return int(value)


def default_block(length: int) -> int:
  """`ROUTE_BLOCK`, or the next power of two >= 16 above a shorter `length`."""
  return min(ROUTE_BLOCK, max(16, 1 << max(int(length) - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True, eq=False)
class PpaRouting:
  """Per query block row counts of the two paths and the decision.

  Attributes:
    q_len, kv_len: the call's lengths (queries at positions
      `kv_len - q_len + i`).
    block_q, block_k: routing tiles.
    stripe_rows, tile_rows: int64 `[num_q_blocks]`, rows each path loads.
    num_routed: query blocks `[0, num_routed)` take the tiles, the others
      the stripes.
  """

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  stripe_rows: np.ndarray
  tile_rows: np.ndarray
  num_routed: int

  @property
  def routed(self) -> np.ndarray:
    """bool `[num_q_blocks]`: the block runs the block-sparse tiles."""
    return np.arange(self.tile_rows.size) < self.num_routed

  def segments(self) -> tuple[tuple[int, int, bool], ...]:
    """One entry per kernel call, `(row0, row1, routed)`: query rows `[row0,
    row1)`, ascending, covering `[0, q_len)`."""
    cut = min(self.num_routed * self.block_q, self.q_len)
    return tuple(seg for seg in ((0, cut, True), (cut, self.q_len, False)) if seg[1] > seg[0])


def _block_positions(q_len, kv_len, block_q):
  """First and last absolute query position of each query block, int64 `[nq]`."""
  r0 = np.arange(-(-q_len // block_q), dtype=np.int64) * block_q
  r1 = np.minimum(r0 + block_q, q_len) - 1
  return kv_len - q_len + r0, kv_len - q_len + r1


def _nonempty(offsets, p0, p1, kv_len, block_k, chunk_entries=1 << 22):
  """`(rows, cols)`, int64: the (query block, key block) tiles holding a kept
  offset (`_tile_nonempty`), row-major. Query blocks go in chunks of about
  `chunk_entries` tiles: memory O(chunk_entries + result), not O(nq * nk).
  """
  c0 = np.arange(-(-kv_len // block_k), dtype=np.int64) * block_k
  c1 = np.minimum(c0 + block_k, kv_len) - 1
  step = max(1, chunk_entries // max(c0.size, 1))
  rows, cols = [], []
  for s in range(0, p0.size, step):
    r, c = np.nonzero(_tile_nonempty(offsets, p0[s:s + step, None], p1[s:s + step, None],
                                     c0[None, :], c1[None, :]))
    rows.append(r + s)
    cols.append(c)
  return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _tile_nonempty(offsets, p0, p1, c0, c1):
  """Broadcast bool: rows at positions `[p0, p1]` and keys `[c0, c1]` meet
  every offset of `[p0 - c1, p1 - c0]`, so the tile is non-empty iff a kept
  offset lies in that range (clipped to `>= 0`)."""
  lo, hi = np.maximum(p0 - c1, 0), p1 - c0
  n = np.searchsorted(offsets, hi, side="right") - np.searchsorted(offsets, lo, side="left")
  return (hi >= 0) & (n > 0)


def _nonempty_counts(offsets, p0, p1, kv_len, block_q, block_k):
  """int64 `[nq]`: non-empty tiles per query block.

  With `block_q == block_k = b`, a tile with full rows and columns covers the
  offsets `qoff + (i - j) b + (-b, b)`, a function of the diagonal `i - j`:
  one lookup per diagonal, prefix sums over them, and the partial last key
  block and query block recounted: O(nq + nk). Otherwise tile by tile.
  """
  nq, nk = p0.size, -(-kv_len // block_k)
  c0 = np.arange(nk, dtype=np.int64) * block_k
  c1 = np.minimum(c0 + block_k, kv_len) - 1
  if block_q != block_k:
    rows, _ = _nonempty(offsets, p0, p1, kv_len, block_k)
    return np.bincount(rows, minlength=nq).astype(np.int64)
  b = block_q
  diag = np.arange(-(nk - 1), nq, dtype=np.int64)             # i - j
  full = _tile_nonempty(offsets, p0[0] + diag * b, p0[0] + diag * b + b - 1, 0, b - 1)
  sums = np.concatenate([[0], np.cumsum(full)])
  i = np.arange(nq)
  counts = sums[i + nk] - sums[i]                              # j = 0 .. nk - 1
  # The last key block (maybe partial) of every row, exactly.
  counts += (_tile_nonempty(offsets, p0, p1, c0[-1], c1[-1]).astype(np.int64)
             - full[i])                                 # diagonal i - (nk - 1)
  # The last query block (maybe partial), exactly.
  counts[-1] = _tile_nonempty(offsets, p0[-1], p1[-1], c0, c1).sum()
  return counts.astype(np.int64)


def _split(kv_len, p, window):
  offsets = masks.ppa_offsets(kv_len - 1, p=p, window=min(window, kv_len))
  runs, far = masks.ppa_dense_runs(offsets)
  return offsets, runs, far


@functools.lru_cache(maxsize=64)
def ppa_routing(q_len: int, kv_len: int, *, p: float, window: int, block_q: int,
                block_k: int, group: int = 1,
                max_tiles: int = MAX_ROUTED_TILES) -> PpaRouting:
  """The routing of a PPA prefill (queries = the last `q_len` of `kv_len`).

  Args:
    q_len, kv_len: `1 <= q_len <= kv_len`.
    p, window: as in `attn.ppa_attention`.
    block_q, block_k: routing tiles, powers of two >= 16.
    group: query heads per kv head.
    max_tiles: table budget: the routed blocks hold at most this many tiles
      (beyond it, the first blocks that fit are routed and the rest run the
      stripes, cheaper or not).

  Returns:
    `PpaRouting`, one decision per `block_q` query rows. Host numpy:
    O(num_q_blocks + num_k_blocks) at `block_q == block_k`, else
    O(num_q_blocks * num_k_blocks) time in chunks of bounded memory.
  """
  q_len = _checks.check_seq_len(q_len, "q_len")
  kv_len = _checks.check_seq_len(kv_len, "kv_len")
  if not 1 <= q_len <= kv_len:
    raise ValueError(f"q_len={q_len}, kv_len={kv_len}: need 1 <= q_len <= kv_len.")
  bq, bk = _pow2_block("block_q", block_q), _pow2_block("block_k", block_k)
  if not _checks.is_int(group) or group < 1:
    raise ValueError(f"group={group!r}: must be a positive int (q_heads // kv_heads).")
  if not _checks.is_int(max_tiles) or max_tiles < 0:
    raise ValueError(f"max_tiles={max_tiles!r}: must be an int >= 0.")
  offsets, runs, far = _split(kv_len, _checks.check_p(p), _checks.check_window(window))
  p0, p1 = _block_positions(q_len, kv_len, bq)
  band = np.zeros_like(p0)
  for lo, hi in runs:
    first, last = np.maximum(p0 - hi, 0), p1 - lo
    band += np.where(last >= first, -(-(last - first + 1) // bk) * bk, 0)
  tile_rows = group * _nonempty_counts(offsets, p0, p1, kv_len, bq, bk) * bk
  stripe_rows = band + bq * int(np.searchsorted(far, p1[-1], side="right"))
  cheaper = stripe_rows < tile_rows
  num_stripes = int(np.argmin(cheaper[::-1])) if not cheaper.all() else cheaper.size
  fits = int(np.searchsorted(np.cumsum(tile_rows // (group * bk)), max_tiles, side="right"))
  for a in (stripe_rows, tile_rows):
    a.flags.writeable = False
  return PpaRouting(q_len, kv_len, bq, bk, stripe_rows, tile_rows,
                    min(p0.size - num_stripes, fits))


@functools.lru_cache(maxsize=64)
def ppa_layout(q_len: int, kv_len: int, *, q_offset: int, p: float, window: int,
               block_q: int, block_k: int) -> BlockLayout:
  """Block-sparse layout of the PPA mask of `q_len` queries at positions
  `q_offset + i` against `kv_len` keys (`q_offset + q_len <= kv_len`).

  A tile's mask depends only on its diagonal `q_offset + r0 - c0` and its
  in-range rows and columns, so each distinct mask is built once:
  O(num_q_blocks * num_k_blocks + distinct masks * block_q * block_k), never
  an `[L, L]` array.
  """
  q_len = _checks.check_seq_len(q_len, "q_len")
  kv_len = _checks.check_seq_len(kv_len, "kv_len")
  if not _checks.is_int(q_offset) or not 0 <= q_offset <= kv_len - q_len:
    raise ValueError(f"q_offset={q_offset!r}: must be an int in [0, kv_len - q_len].")
  bq, bk = _pow2_block("block_q", block_q), _pow2_block("block_k", block_k)
  offsets, _, _ = _split(kv_len, _checks.check_p(p), _checks.check_window(window))
  keep = np.zeros((kv_len,), bool)
  keep[offsets] = True
  p0, p1 = _block_positions(q_len, q_offset + q_len, bq)
  rows, cols = _nonempty(offsets, p0, p1, kv_len, bk)
  c0 = cols.astype(np.int64) * bk
  keys = np.stack([p0[rows] - c0, p1[rows] - p0[rows] + 1,
                   np.minimum(c0 + bk, kv_len) - c0], axis=-1)   # (diagonal, rows, cols)
  uniq, inv = np.unique(keys, axis=0, return_inverse=True)
  rr, cc = np.arange(bq)[:, None], np.arange(bk)[None, :]
  tiles, ids = [np.zeros((bq, bk), bool), np.ones((bq, bk), bool)], []
  for delta, nrows, ncols in uniq:
    d = delta + rr - cc
    in_range = (rr < nrows) & (cc < ncols)
    m = in_range & (d >= 0) & keep[np.clip(d, 0, kv_len - 1)]
    if np.array_equal(m, in_range):
      ids.append(FULL)
    else:
      ids.append(len(tiles))
      tiles.append(m)
  tile_id = np.asarray(ids, np.int32)[inv.reshape(-1)]
  starts = np.searchsorted(rows, np.arange(p0.size + 1))
  kv_rows = [cols[a:b] for a, b in zip(starts[:-1], starts[1:])]
  id_rows = [tile_id[a:b] for a, b in zip(starts[:-1], starts[1:])]
  return BlockLayout.from_tiles(q_len, kv_len, block_q=bq, block_k=bk, kv_rows=kv_rows,
                                id_rows=id_rows, block_masks=np.stack(tiles))
