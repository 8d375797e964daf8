"""PPA prefill routing: per query block, stripes or masked block-sparse tiles.

The stripe kernels (`pallas_kernels.stripe.ppa_attention`) load, per query
block and kv head, the key tiles of the dense runs of kept offsets plus one
`block_q`-row window of K and V per far offset. At large `p` the far offsets
are so many that this reads more than the tiles of the block's causal PPA
mask would. This module decides, for static sizes, which query blocks go
to the block-sparse kernels instead (with the PPA mask as per-tile masks)
and builds their `attn.BlockLayout`.

The rule counts the bytes of K, V and masks each path loads per query
block and kv head (`row = 2 * head_dim * itemsize`, a K row and a V row):

    tile_bytes   = group * (nonempty_tiles * block_k * row
                            + mask_tiles * mask_row * 4)
    stripe_bytes = (band_rows + far_offsets * block_q) * row

* `nonempty_tiles`: `block_q x block_k` tiles of the block's PPA mask that
  hold a kept offset (the block-sparse kernels visit exactly these);
  `mask_tiles`: those not entirely kept, whose mask the block-sparse
  kernels read (table mode, one per tile and query head; none when the mask
  is a band, `ppa_layout`). A PPA tile mask depends only on `i - j`, so the
  kernels take it as one int32 diagonal row of `mask_row =
  pallas_kernels.block_sparse.common.diag_width(block_q, block_k)` lanes
  (256 at 128 x 128 tiles), not as a `[block_q, block_k]` tile;
* `band_rows`: per dense run `(lo, hi)` of kept offsets
  (`attn.masks.ppa_dense_runs`), the block's key range
  `[first_pos - hi, last_pos - lo]` (clipped to `>= 0`) in whole `block_k`
  tiles;
* `far_offsets`: the far offsets up to the block's last query position: a
  stripe kernel's query block visits only the offsets that reach a key at or
  after position 0 from one of its rows (`pallas_kernels.cost.
  ppa_stripe_visits`);
* `group = q_heads // kv_heads`: the stripe kernels load a row once for the
  group, the block-sparse kernels once per query head (grid `(B, Hq, nq)`);
  the accounting of `pallas_kernels.cost.ppa_fwd` (stripes) and
  `cost.block_sparse_fwd` (tiles) plus the mask tiles.

The stripes take the longest run of final query blocks whose every block
has `stripe_bytes < tile_bytes`; every other block takes the tiles (ties go
to the tiles: matmuls, not row-wise dots). So a prefill is at most two
kernel calls (tiles for the first blocks, stripes for the last). Two calls
cost a concatenation of their outputs (`split_bytes`: `2 * group * q_len *
head_dim * itemsize` per kv head, read and written), so a split whose
routed blocks save no more than that runs every block on the stripes (at
`p = 0.5` the first three 128-row blocks would save 0.01 % of the stripes'
bytes at L = 32K). The K and
V rows of the tile path are at most those of dense causal tiles at the
same blocks, and its masks add `mask_row * 4` bytes per masked tile and
query head: 1/64 of the tile's K and V at head_dim 128, bf16, 128 x 128
tiles (at `p = 0.75` nearly every tile is masked, so a routed block loads
at most about 1.6 % more than dense attention's tiles at the same blocks).
The stripe kernels pay per block only the far offsets up to the block's own
last query (they skip the others), so one stripe call costs what separate
calls per block would.

Not counted: TPU alignment rows of misaligned stripes, and the kernels' own
block sizes (the count uses the routing blocks).

Budgets: the routed blocks are the longest first run of the cheaper ones
that stays within two budgets; past them the remaining blocks run the
stripes even where the tiles would load less, so the routed call is never
refused for the size of its tables:

* `max_tiles` (`MAX_ROUTED_TILES`, about every causal tile of L = 128K at
  128-row blocks): the routed tiles are host tables;
* `fits`, optional: a predicate on the `TableShape` of the routed call's
  tables (forward/dq `[num_q_blocks, width]`, dkv `[num_k_blocks,
  width_t]`). `attn.pallas.ppa` passes the TPU kernels' SMEM budget when
  the call targets them: they scalar-prefetch each pass's whole tables
  into 1 MiB of SMEM (`pallas_kernels.block_sparse.tpu.table_bytes`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import numpy as np

from attn import _checks, masks
from attn.layout import FULL, BlockLayout
from pallas_kernels.block_sparse.common import diag_width

# Routing blocks: powers of two >= 16 (the block-sparse kernels' layouts).
ROUTE_BLOCK = 128
# Table budget: the routed blocks' tiles are listed in host tables (int32
# `[num_q_blocks, width]` and the transposed ones) and their distinct masks
# (one `[block_q, block_k]` int32 tile per diagonal) become constants of the
# program; at most this many tiles are routed (PPA at p >= 0.75 routes
# every causal tile: 525K at L = 128K with 128-row blocks).
MAX_ROUTED_TILES = 1 << 20
# Bytes per entry of the block-sparse kernels' diagonal mask rows (int32 0/1).
MASK_ITEMSIZE = 4


class TableShape(NamedTuple):
  """Sizes of the tables of a routed block-sparse call (as
  `attn.pallas.block_sparse.host_tables` builds them for `ppa_layout`).

  Attributes:
    num_q_blocks: routed query blocks (rows of the forward / dq tables).
    width: slots per row, the most tiles of a routed block (>= 1).
    num_k_blocks: key blocks up to the last routed query (rows of the dkv
      tables).
    width_t: slots per key block, the most routed blocks listing one (>= 1).
    tiles: non-empty tiles of the routed blocks.
    band: the layout is a band (`ppa_layout`: tables of O(rows), no mask ids).
  """

  num_q_blocks: int
  width: int
  num_k_blocks: int
  width_t: int
  tiles: int
  band: bool


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
  """Per query block costs of the two paths and the decision.

  Attributes:
    q_len, kv_len: the call's lengths (queries at positions
      `kv_len - q_len + i`).
    block_q, block_k: routing tiles.
    stripe_bytes, tile_bytes: int64 `[num_q_blocks]`, bytes each path loads
      per kv head (see the module doc).
    tiles, mask_tiles: int64 `[num_q_blocks]`, non-empty tiles of the
      block's PPA mask, and the mask tiles the block-sparse kernels read
      for them (the tiles not entirely kept; none for a band layout).
    num_routed: query blocks `[0, num_routed)` take the tiles, the others
      the stripes.
  """

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  stripe_bytes: np.ndarray
  tile_bytes: np.ndarray
  tiles: np.ndarray
  mask_tiles: np.ndarray
  num_routed: int

  @property
  def routed(self) -> np.ndarray:
    """bool `[num_q_blocks]`: the block runs the block-sparse tiles."""
    return np.arange(self.tile_bytes.size) < self.num_routed

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


def _tile_states(offsets, p0, p1, c0, c1):
  """Broadcast bools `(nonempty, masked)` of tiles with rows at positions
  `[p0, p1]` and keys `[c0, c1]`.

  Such a tile meets every offset of `[p0 - c1, p1 - c0]`: it is non-empty iff
  a kept offset lies in that range (clipped to `>= 0`), and needs no mask iff
  the range has no negative offset and every offset in it is kept.
  """
  lo, hi = np.maximum(p0 - c1, 0), p1 - c0
  n = np.searchsorted(offsets, hi, side="right") - np.searchsorted(offsets, lo, side="left")
  nonempty = (hi >= 0) & (n > 0)
  full = (p0 - c1 >= 0) & (n == hi - lo + 1)
  return nonempty, nonempty & ~full


def _tiles(offsets, p0, p1, kv_len, block_k, chunk_entries=1 << 22):
  """`(rows, cols, masked)`: the non-empty (query block, key block) tiles,
  row-major, and whether each needs a mask. Query blocks go in chunks of
  about `chunk_entries` tiles: memory O(chunk_entries + result)."""
  c0 = np.arange(-(-kv_len // block_k), dtype=np.int64) * block_k
  c1 = np.minimum(c0 + block_k, kv_len) - 1
  step = max(1, chunk_entries // max(c0.size, 1))
  rows, cols, masked = [], [], []
  for s in range(0, p0.size, step):
    ne, mk = _tile_states(offsets, p0[s:s + step, None], p1[s:s + step, None],
                          c0[None, :], c1[None, :])
    r, c = np.nonzero(ne)
    rows.append(r + s)
    cols.append(c)
    masked.append(mk[r, c])
  return (np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64),
          np.concatenate(masked))


def _tile_counts(offsets, p0, p1, kv_len, block_q, block_k):
  """int64 `([nq], [nq])`: non-empty tiles and masked tiles per query block.

  With `block_q == block_k = b`, a tile with full rows and columns covers the
  offsets `p0[0] + (i - j) b + (-b, b)`, a function of the diagonal `i - j`:
  one lookup per diagonal, prefix sums over them, and the last key block and
  query block (maybe partial) recounted: O(nq + nk). Otherwise tile by tile.
  """
  nq, nk = p0.size, -(-kv_len // block_k)
  if block_q != block_k:
    rows, _, masked = _tiles(offsets, p0, p1, kv_len, block_k)
    return (np.bincount(rows, minlength=nq).astype(np.int64),
            np.bincount(rows[masked], minlength=nq).astype(np.int64))
  b = block_q
  c0 = np.arange(nk, dtype=np.int64) * b
  c1 = np.minimum(c0 + b, kv_len) - 1
  diag = p0[0] + np.arange(-(nk - 1), nq, dtype=np.int64) * b     # p0 - c0 by i - j
  i = np.arange(nq)
  out = []
  for per_diag, last_col, last_row in zip(_tile_states(offsets, diag, diag + b - 1, 0, b - 1),
                                          _tile_states(offsets, p0, p1, c0[-1], c1[-1]),
                                          _tile_states(offsets, p0[-1], p1[-1], c0, c1)):
    sums = np.concatenate([[0], np.cumsum(per_diag)])
    counts = sums[i + nk] - sums[i]                  # key blocks j = 0 .. nk - 1
    counts += last_col.astype(np.int64) - per_diag[i]   # j = nk - 1 (diagonal index i)
    counts[-1] = last_row.sum()
    out.append(counts.astype(np.int64))
  return tuple(out)


def _band_window(offsets, kv_len) -> int | None:
  """The window `w` when the kept offsets are exactly `[0, w)` (a band mask:
  sliding window, or causal when `w >= kv_len`), else None."""
  n = offsets.size
  return n if n and offsets[-1] == n - 1 else None


def _is_band(offsets, end) -> bool:
  """Whether `ppa_layout` of keys `[0, end)` is a band: the kept offsets
  below `end` are `[0, w)`."""
  return _band_window(offsets[:int(np.searchsorted(offsets, end))], end) is not None


def _transposed_widths(offsets, p0, p1, end, block_k):
  """int64 `[n]`: entry `m - 1` is `width_t` of the first `m` query blocks
  (positions `p0, p1 [n]`, keys `[0, end)`): the most of them that list one
  key block, at least 1. O(n * num_k_blocks) in chunks (`_tiles`)."""
  rows, cols, _ = _tiles(offsets, p0, p1, end, block_k)
  if not rows.size:
    return np.ones(p0.size, np.int64)
  order = np.argsort(cols, kind="stable")          # by key block, then query block
  by_col = cols[order]
  rank = np.empty_like(rows)
  rank[order] = np.arange(rows.size) - np.searchsorted(by_col, by_col) + 1  # place in column
  best = np.maximum.accumulate(rank)               # row-major: over the tiles so far
  ends = np.searchsorted(rows, np.arange(1, p0.size + 1))   # tiles of the first m blocks
  return np.where(ends > 0, best[np.maximum(ends, 1) - 1], 1).astype(np.int64)


def _longest_within(n_max, fits, shape_of) -> int:
  """The largest `n <= n_max` with `fits(shape_of(n))`, `n = 0` (nothing
  routed) always within; assumes `fits` monotone. O(log n_max) calls."""
  lo, hi = 0, n_max
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(shape_of(mid)) else (lo, mid - 1)
  return lo


def _routed_within(fits, n_max, offsets, p0, p1, block_k, tiles) -> int:
  """The longest first run of at most `n_max` query blocks whose routed
  call's `TableShape` satisfies `fits`. Every field of the shape grows with
  the run (`band` only turns False), so the shapes with `width_t = 1` bound
  them from below: a first bisection on those, then `width_t` is counted
  only for the blocks left."""
  ends = p1[:n_max] + 1                 # keys up to each block's last query
  widths = np.maximum(np.maximum.accumulate(tiles[:n_max]), 1)
  counts = np.cumsum(tiles[:n_max])

  def shape_of(n, width_t):
    end = int(ends[n - 1])
    return TableShape(num_q_blocks=n, width=int(widths[n - 1]), num_k_blocks=-(-end // block_k),
                      width_t=int(width_t), tiles=int(counts[n - 1]),
                      band=_is_band(offsets, end))
  n_hi = _longest_within(n_max, fits, lambda n: shape_of(n, 1))
  if n_hi == 0:
    return 0
  width_t = _transposed_widths(offsets, p0[:n_hi], p1[:n_hi], int(ends[n_hi - 1]), block_k)
  return _longest_within(n_hi, fits, lambda n: shape_of(n, width_t[n - 1]))


def _split(kv_len, p, window):
  offsets = masks.ppa_offsets(kv_len - 1, p=p, window=min(window, kv_len))
  runs, far = masks.ppa_dense_runs(offsets)
  return offsets, runs, far


@functools.lru_cache(maxsize=64)
def split_bytes(q_len: int, *, group: int, head_dim: int, itemsize: int) -> int:
  """Bytes per kv head a split prefill adds: its two calls' outputs are
  concatenated (`group * q_len` rows of `head_dim` read and written)."""
  return 2 * group * q_len * head_dim * itemsize


def ppa_routing(q_len: int, kv_len: int, *, p: float, window: int, block_q: int,
                block_k: int, group: int = 1, head_dim: int = 128, itemsize: int = 2,
                max_tiles: int = MAX_ROUTED_TILES,
                fits: Callable[[TableShape], bool] | None = None) -> PpaRouting:
  """The routing of a PPA prefill (queries = the last `q_len` of `kv_len`).

  Args:
    q_len, kv_len: `1 <= q_len <= kv_len`.
    p, window: as in `attn.ppa_attention`.
    block_q, block_k: routing tiles, powers of two >= 16.
    group: query heads per kv head.
    head_dim, itemsize: of K and V (a row of each is `head_dim * itemsize`
      bytes).
    max_tiles: host table budget: the routed blocks hold at most this many
      tiles.
    fits: kernel table budget, or None: whether the block-sparse kernels
      accept a routed call whose tables have this `TableShape`. It must be
      monotone (when a shape fits, so does every shape with no larger
      fields, and the same shape as a band) and hashable (the result is
      cached), e.g. `attn.pallas.ppa.SmemBudget`.

    Beyond either budget, the longest first run of the cheaper blocks that
    fits is routed and the rest run the stripes, cheaper or not.

  Returns:
    `PpaRouting`, one decision per `block_q` query rows. Host numpy:
    O(num_q_blocks + num_k_blocks) at `block_q == block_k` without `fits`,
    else O(num_q_blocks * num_k_blocks) time in chunks of bounded memory.
  """
  q_len = _checks.check_seq_len(q_len, "q_len")
  kv_len = _checks.check_seq_len(kv_len, "kv_len")
  if not 1 <= q_len <= kv_len:
    raise ValueError(f"q_len={q_len}, kv_len={kv_len}: need 1 <= q_len <= kv_len.")
  bq, bk = _pow2_block("block_q", block_q), _pow2_block("block_k", block_k)
  for name, val, least in (("group", group, 1), ("head_dim", head_dim, 1),
                           ("itemsize", itemsize, 1), ("max_tiles", max_tiles, 0)):
    if not _checks.is_int(val) or val < least:
      raise ValueError(f"{name}={val!r}: must be an int >= {least}.")
  offsets, runs, far = _split(kv_len, _checks.check_p(p), _checks.check_window(window))
  p0, p1 = _block_positions(q_len, kv_len, bq)
  band = np.zeros_like(p0)
  for lo, hi in runs:
    first, last = np.maximum(p0 - hi, 0), p1 - lo
    band += np.where(last >= first, -(-(last - first + 1) // bk) * bk, 0)
  row = 2 * head_dim * itemsize                                # a K row and a V row
  nonempty, masked = _tile_counts(offsets, p0, p1, kv_len, bq, bk)
  if _band_window(offsets, kv_len) is not None:
    masked = np.zeros_like(masked)          # a band layout: masks from positions
  tile_bytes = group * (nonempty * bk * row + masked * diag_width(bq, bk) * MASK_ITEMSIZE)
  stripe_bytes = (band + bq * np.searchsorted(far, p1, side="right")) * row
  cheaper = stripe_bytes < tile_bytes
  num_stripes = int(np.argmin(cheaper[::-1])) if not cheaper.all() else cheaper.size
  n = min(p0.size - num_stripes,
          int(np.searchsorted(np.cumsum(nonempty), max_tiles, side="right")))
  if fits is not None:
    n = _routed_within(fits, n, offsets, p0, p1, bk, nonempty)
  if 0 < n < p0.size and (stripe_bytes[:n] - tile_bytes[:n]).sum() <= split_bytes(
      q_len, group=group, head_dim=head_dim, itemsize=itemsize):
    n = 0                                   # a split that does not pay for its concat
  for a in (stripe_bytes, tile_bytes, nonempty, masked):
    a.flags.writeable = False
  return PpaRouting(q_len, kv_len, bq, bk, stripe_bytes, tile_bytes, nonempty, masked, n)


@functools.lru_cache(maxsize=64)
def ppa_layout(q_len: int, kv_len: int, *, q_offset: int, p: float, window: int,
               block_q: int, block_k: int) -> BlockLayout:
  """Block-sparse layout of the PPA mask of `q_len` queries at positions
  `q_offset + i` against `kv_len` keys (`q_offset + q_len <= kv_len`).

  When the kept offsets are exactly `[0, w)` (`p = 1`, `p = 0`, or a
  sequence within the window) the mask is a band: a band layout (causal or
  sliding window), whose kernels mask from positions and read no mask
  tiles. Otherwise a table layout; a tile's mask depends only on its
  diagonal `q_offset + r0 - c0` and its in-range rows and columns, so each
  distinct mask is built once: O(num_q_blocks * num_k_blocks + distinct
  masks * block_q * block_k), never an `[L, L]` array.
  """
  q_len = _checks.check_seq_len(q_len, "q_len")
  kv_len = _checks.check_seq_len(kv_len, "kv_len")
  if not _checks.is_int(q_offset) or not 0 <= q_offset <= kv_len - q_len:
    raise ValueError(f"q_offset={q_offset!r}: must be an int in [0, kv_len - q_len].")
  bq, bk = _pow2_block("block_q", block_q), _pow2_block("block_k", block_k)
  offsets, _, _ = _split(kv_len, _checks.check_p(p), _checks.check_window(window))
  w = _band_window(offsets, kv_len)
  if w is not None:
    return BlockLayout.band_layout(q_len, kv_len, window=None if w >= kv_len else w,
                                   q_offset=q_offset, block_q=bq, block_k=bk)
  keep = np.zeros((kv_len,), bool)
  keep[offsets] = True
  p0, p1 = _block_positions(q_len, q_offset + q_len, bq)
  rows, cols, _ = _tiles(offsets, p0, p1, kv_len, bk)
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
