"""Static block-sparse layouts: compact mask metadata, separate from kernels.

A `BlockLayout` describes a `[q_len, kv_len]` boolean mask at the granularity
of `block_q x block_k` tiles: for each query block, the key blocks that hold
at least one visible entry (so work follows the number of non-empty tiles),
and for each such tile whether it is full or partial.

Two kinds, never an `[L, L]` array:

  * **band** layouts (`causal`, `sliding_window`): query at absolute position
    `p = q_offset + i` sees key `c` iff `0 <= p - c < window` (`window=None`:
    unbounded, i.e. causal). Every table is block arithmetic, O(number of
    query blocks) to build; a kernel masks partial tiles from iota positions
    and the scalars `q_offset`, `window` (`layout.band`).
  * **table** layouts (`from_mask`, `from_fn`): arbitrary masks; partial
    tiles point into a deduplicated table of in-tile masks.

Both expose the same padded tables (`kv_blocks`, `num_kv_blocks`,
`mask_ids`, `block_masks`), which the `xla` path gathers from; for band
layouts they are derived on first use (a causal layout's `kv_blocks` is
`[nq, nq]`, so do not ask for them at a million tokens: kernels use
`block_lo` / `num_kv_blocks` instead).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable

import numpy as np

from attn import _checks
from attn._checks import is_int

EMPTY, FULL = 0, 1  # reserved ids in `BlockLayout.block_masks`


@dataclasses.dataclass(frozen=True)
class Band:
  """Band mask: query at `p = q_offset + i` sees key `c` iff `0 <= p - c < window`.

  `window=None` means no lower limit (causal attention).
  """

  q_offset: int
  window: int | None

  def visible(self, q_idx, kv_idx):
    """Bool mask of (broadcasting) query row indices and key indices."""
    d = self.q_offset + np.asarray(q_idx, np.int64) - np.asarray(kv_idx, np.int64)
    ok = d >= 0
    return ok if self.window is None else ok & (d < self.window)


def _check_blocks(block_q, block_k):
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if not is_int(val) or val < 1:
      raise ValueError(f"{name}={val!r}: must be a positive int.")


def _check_len(name, val):
  if not is_int(val) or val < 1:
    raise ValueError(f"{name}={val!r}: must be a positive int.")
  return int(val)


def band_ranges(q_len: int, kv_len: int, q_offset: int, window: int | None,
                block_q: int, block_k: int):
  """Per query block, the contiguous range of key blocks a band mask touches.

  Returns `(block_lo, counts)`, int32 `[num_q_blocks]`: query block `i` has
  non-empty tiles with key blocks `block_lo[i] .. block_lo[i] + counts[i] - 1`
  (`counts[i] = 0`: no visible key). O(num_q_blocks).
  """
  nq = -(-q_len // block_q)
  r0 = np.arange(nq, dtype=np.int64) * block_q
  r1 = np.minimum(r0 + block_q, q_len) - 1
  kmax = np.minimum(q_offset + r1, kv_len - 1)
  kmin = np.maximum(q_offset + r0 - (window - 1), 0) if window is not None else np.zeros_like(r0)
  lo = kmin // block_k
  counts = np.where(kmin <= kmax, kmax // block_k - lo + 1, 0)
  lo = np.where(counts > 0, lo, 0)
  return lo.astype(np.int32), counts.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Block-sparse attention layout.

  Attributes:
    q_len, kv_len: sequence lengths the layout was built for.
    block_q, block_k: tile sizes.
    num_kv_blocks: int32 `[num_q_blocks]`: non-empty tiles per query block.
    band: the `Band` of a causal / sliding-window layout (its partial tiles
      are masked from positions), or `None` for a table layout.
    block_lo: int32 `[num_q_blocks]` (band layouts): first key block; the
      key blocks of query block `i` are `block_lo[i] + range(num_kv_blocks[i])`.

  Tables (stored for table layouts, derived on first use for band layouts):
    kv_blocks: int32 `[num_q_blocks, max_kv_blocks]`: key-block indices to
      visit for each query block, ascending; padding slots repeat the last
      valid index (a kernel that re-reads the same block skips the copy).
    mask_ids: int32 `[num_q_blocks, max_kv_blocks]`: per slot, an index into
      `block_masks` (`EMPTY = 0` for padding, `FULL = 1`, partial tiles >= 2).
    block_masks: bool `[num_masks, block_q, block_k]`: deduplicated in-tile
      masks; entry 0 is all False and entry 1 all True. A tile is FULL when
      every in-range entry is visible (entries past `q_len` / `kv_len` are
      masked separately by the ops).
  """

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  num_kv_blocks: np.ndarray
  band: Band | None = None
  block_lo: np.ndarray | None = None
  _tables: tuple | None = dataclasses.field(default=None, repr=False)

  # -- construction: table layouts -----------------------------------------

  @classmethod
  def from_mask(cls, mask: np.ndarray, *, block_q: int = 128,
                block_k: int = 128) -> "BlockLayout":
    """Builds the layout of an arbitrary bool mask `[q_len, kv_len]`."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
      raise ValueError(f"mask must be a 2-D bool array [q_len, kv_len], got "
                       f"shape {mask.shape} dtype {mask.dtype}.")
    _check_blocks(block_q, block_k)
    q_len, kv_len = mask.shape
    return cls.from_fn(lambda qi, ki: mask[qi, ki], q_len, kv_len,
                       block_q=block_q, block_k=block_k)

  @classmethod
  def from_fn(cls, fn: Callable, q_len: int, kv_len: int, *, block_q: int = 128,
              block_k: int = 128, within: "BlockLayout | None" = None,
              chunk_entries: int = 1 << 22) -> "BlockLayout":
    """Builds a layout from a per-position predicate, tile by tile.

    `fn(q_idx, kv_idx) -> bool` gets int64 arrays of query rows (`0..q_len-1`)
    and key positions (`0..kv_len-1`) that broadcast against each other (a
    batch of tiles: `[n, block_q, 1, 1]` and `[n, 1, width, block_k]`) and
    returns their broadcast bool mask, e.g. a document mask
    `lambda i, j: (doc[i] == doc[j]) & (j <= i)`. No `[q_len, kv_len]` array
    is built: memory is O(tiles + chunk_entries).

    Cost is one predicate call per entry of the evaluated tiles: every tile
    by default, only the non-empty tiles of `within` when given (the result
    is then `fn & within`); e.g. `within=BlockLayout.sliding_window(...)`
    makes a windowed document mask at 1M tokens cost O(L * window).
    """
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    _check_blocks(block_q, block_k)
    bq, bk = int(block_q), int(block_k)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    if within is not None:
      if not isinstance(within, BlockLayout) or (
          within.q_len, within.kv_len, within.block_q, within.block_k) != (q_len, kv_len, bq, bk):
        raise ValueError("within must be a BlockLayout with the same q_len, kv_len, "
                         "block_q and block_k.")
      cand, cand_n = within.kv_blocks, within.num_kv_blocks
      within_mask = within
    else:
      cand = np.broadcast_to(np.arange(nk, dtype=np.int32), (nq, nk))
      cand_n = np.full((nq,), nk, np.int32)
      within_mask = None
    width = cand.shape[1]
    rows_per = max(1, chunk_entries // max(1, bq * width * bk))
    table = [np.zeros((bq, bk), bool), np.ones((bq, bk), bool)]
    seen: dict[bytes, int] = {}
    kv_rows, id_rows, counts = [], [], np.zeros((nq,), np.int32)
    for start in range(0, nq, rows_per):
      blocks = np.arange(start, min(start + rows_per, nq))
      cb = cand[blocks]                                         # [n, width]
      slot_ok = np.arange(width)[None, :] < cand_n[blocks][:, None]
      qi = blocks[:, None, None, None] * bq + np.arange(bq)[None, :, None, None]
      ki = cb[:, None, :, None] * bk + np.arange(bk)[None, None, None, :]
      q_ok = qi < q_len
      k_ok = (ki < kv_len) & slot_ok[:, None, :, None]
      vals = np.asarray(fn(np.minimum(qi, q_len - 1), np.minimum(ki, kv_len - 1)), bool)
      vals = np.broadcast_to(vals, np.broadcast_shapes(qi.shape, ki.shape))
      if within_mask is not None:
        vals = vals & within_mask._tile_values(blocks, cb)
      in_range = q_ok & k_ok
      vals = vals & in_range
      any_ = vals.any(axis=(1, 3))                              # [n, width]
      full = np.all(vals | ~in_range, axis=(1, 3)) & any_
      for r, i in enumerate(blocks):
        slots = np.nonzero(any_[r])[0]
        counts[i] = len(slots)
        cols = cb[r, slots].astype(np.int32)
        ids = np.full((len(slots),), FULL, np.int32)
        for s_i, s in enumerate(slots):
          if not full[r, s]:
            tile = vals[r, :, s, :]
            key = np.packbits(tile).tobytes()
            if key not in seen:
              seen[key] = len(table)
              table.append(tile.copy())
            ids[s_i] = seen[key]
        kv_rows.append(cols)
        id_rows.append(ids)
    kv_blocks, mask_ids = _pad_rows(kv_rows, id_rows, counts)
    return cls(q_len, kv_len, bq, bk, counts,
               _tables=(kv_blocks, mask_ids, np.stack(table)))

  @classmethod
  def from_block_mask(cls, block_mask: np.ndarray, q_len: int, kv_len: int, *,
                      block_q: int = 128, block_k: int = 128) -> "BlockLayout":
    """Layout whose listed tiles are entirely visible: bool `[nq, nk]` of
    tiles (e.g. random block-sparse patterns). O(tiles), no entry-level work."""
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    _check_blocks(block_q, block_k)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    block_mask = np.asarray(block_mask)
    if block_mask.shape != (nq, nk) or block_mask.dtype != bool:
      raise ValueError(f"block_mask must be bool [{nq}, {nk}] (ceil(q_len / block_q), "
                       f"ceil(kv_len / block_k)), got {block_mask.shape} {block_mask.dtype}.")
    counts = block_mask.sum(axis=1).astype(np.int32)
    rows = [np.nonzero(r)[0].astype(np.int32) for r in block_mask]
    kv_blocks, mask_ids = _pad_rows(rows, [np.full(len(r), FULL, np.int32) for r in rows],
                                    counts)
    tiles = np.stack([np.zeros((block_q, block_k), bool), np.ones((block_q, block_k), bool)])
    return cls(q_len, kv_len, int(block_q), int(block_k), counts,
               _tables=(kv_blocks, mask_ids, tiles))

  @classmethod
  def from_tiles(cls, q_len: int, kv_len: int, *, block_q: int, block_k: int,
                 kv_rows, id_rows, block_masks: np.ndarray) -> "BlockLayout":
    """Layout from per-query-block tile lists, for builders that know their
    tiles by arithmetic (e.g. `attn.ppa_routing`, whose tile masks depend
    only on the tile's diagonal).

    `kv_rows[i]`, `id_rows[i]`: int sequences of query block `i`'s key blocks
    (ascending) and their ids into `block_masks` (`FULL = 1` or a partial
    tile >= 2); `block_masks`: bool `[num_masks, block_q, block_k]` with
    entry 0 all False and entry 1 all True.
    """
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    _check_blocks(block_q, block_k)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    tiles = np.asarray(block_masks)
    if (tiles.ndim != 3 or tiles.shape[1:] != (block_q, block_k) or tiles.dtype != bool
        or tiles.shape[0] < 2 or tiles[0].any() or not tiles[1].all()):
      raise ValueError("block_masks must be bool [num_masks, block_q, block_k] with "
                       "entry 0 all False and entry 1 all True.")
    kv_rows = [np.asarray(r, np.int32).reshape(-1) for r in kv_rows]
    id_rows = [np.asarray(r, np.int32).reshape(-1) for r in id_rows]
    if len(kv_rows) != nq or len(id_rows) != nq:
      raise ValueError(f"kv_rows and id_rows need one entry per query block ({nq}), got "
                       f"{len(kv_rows)} and {len(id_rows)}.")
    for i, (cols, ids) in enumerate(zip(kv_rows, id_rows)):
      if (cols.shape != ids.shape or np.any(np.diff(cols) <= 0)
          or (cols.size and (cols[0] < 0 or cols[-1] >= nk))
          or np.any(ids < FULL) or np.any(ids >= tiles.shape[0])):
        raise ValueError(f"kv_rows[{i}] / id_rows[{i}]: key blocks must ascend in [0, {nk}) "
                         f"with one mask id in [1, {tiles.shape[0]}) each.")
    counts = np.array([r.size for r in kv_rows], np.int32)
    kv_blocks, mask_ids = _pad_rows(kv_rows, id_rows, counts)
    return cls(q_len, kv_len, int(block_q), int(block_k), counts,
               _tables=(kv_blocks, mask_ids, tiles))

  # -- construction: band layouts --------------------------------------------

  @classmethod
  def band_layout(cls, q_len: int, kv_len: int | None = None, *, window: int | None,
                  q_offset: int | None = None, block_q: int = 128,
                  block_k: int = 128) -> "BlockLayout":
    """Query at `q_offset + i` sees keys `c` with `0 <= q_offset + i - c < window`.

    `kv_len` defaults to `q_len`, `q_offset` to `kv_len - q_len` (the queries
    are the last positions), `window=None` is causal. O(num_q_blocks).
    """
    q_len = _check_len("q_len", q_len)
    kv_len = q_len if kv_len is None else _check_len("kv_len", kv_len)
    if window is not None:
      window = _checks.check_window(window)
    _check_blocks(block_q, block_k)
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if not is_int(q_offset) or not 0 <= q_offset <= kv_len - q_len:
      raise ValueError(f"q_offset={q_offset!r}: must be an int in [0, kv_len - q_len] "
                       f"= [0, {kv_len - q_len}].")
    band = Band(int(q_offset), window)
    lo, counts = band_ranges(q_len, kv_len, band.q_offset, window, int(block_q), int(block_k))
    return cls(q_len, kv_len, int(block_q), int(block_k), counts, band=band, block_lo=lo)

  @classmethod
  def causal(cls, seq_len: int, *, kv_len: int | None = None, q_offset: int | None = None,
             block_q: int = 128, block_k: int = 128) -> "BlockLayout":
    """Causal layout: `seq_len` queries (the last ones of `kv_len` keys)."""
    return cls.band_layout(seq_len, kv_len, window=None, q_offset=q_offset,
                           block_q=block_q, block_k=block_k)

  @classmethod
  def sliding_window(cls, seq_len: int, *, window: int, kv_len: int | None = None,
                     q_offset: int | None = None, block_q: int = 128,
                     block_k: int = 128) -> "BlockLayout":
    """Causal sliding window: the query at position `i` sees keys `[i - window + 1, i]`."""
    window = _checks.check_window(window)
    return cls.band_layout(seq_len, kv_len, window=window, q_offset=q_offset,
                           block_q=block_q, block_k=block_k)

  # -- views ----------------------------------------------------------------

  @property
  def num_q_blocks(self) -> int:
    return int(self.num_kv_blocks.shape[0])

  @property
  def num_k_blocks(self) -> int:
    return -(-self.kv_len // self.block_k)

  @property
  def num_active_blocks(self) -> int:
    """Number of non-empty tiles (the work a kernel does)."""
    return int(self.num_kv_blocks.sum())

  @property
  def max_kv_blocks(self) -> int:
    """Width of the padded per-query-block tables (>= 1)."""
    return max(int(self.num_kv_blocks.max(initial=0)), 1)

  @property
  def kv_blocks(self) -> np.ndarray:
    return self._derived[0]

  @property
  def mask_ids(self) -> np.ndarray:
    return self._derived[1]

  @property
  def block_masks(self) -> np.ndarray:
    return self._derived[2]

  @functools.cached_property
  def _derived(self):
    if self._tables is not None:
      return self._tables
    return self._band_tables()

  def _band_tables(self):
    """Padded tables of a band layout: tile states from block arithmetic."""
    bq, bk, band = self.block_q, self.block_k, self.band
    nq, width = self.num_q_blocks, self.max_kv_blocks
    slot = np.arange(width)[None, :]
    cnt = self.num_kv_blocks[:, None]
    kv_blocks = (self.block_lo[:, None] + np.minimum(slot, np.maximum(cnt - 1, 0))).astype(np.int32)
    active = slot < cnt
    # Tile (i, j): rows [r0, r1], keys [c0, c1] in range; d = q_offset + r - c.
    r0 = (np.arange(nq) * bq)[:, None]
    r1 = np.minimum(r0 + bq, self.q_len) - 1
    c0 = kv_blocks.astype(np.int64) * bk
    c1 = np.minimum(c0 + bk, self.kv_len) - 1
    dmin, dmax = band.q_offset + r0 - c1, band.q_offset + r1 - c0
    full = (dmin >= 0) & (dmax < (band.window if band.window is not None else np.inf))
    # A partial tile's mask depends only on (q_offset + r0 - c0, rows, cols in range).
    keys = np.stack(np.broadcast_arrays(band.q_offset + r0 - c0, r1 - r0 + 1, c1 - c0 + 1), -1)
    partial = active & ~full
    uniq, inv = (np.unique(keys[partial], axis=0, return_inverse=True)
                 if partial.any() else (np.zeros((0, 3), np.int64), np.zeros((0,), np.int64)))
    mask_ids = np.where(active, FULL, EMPTY).astype(np.int32)
    mask_ids[partial] = 2 + inv.reshape(-1)
    rr, cc = np.arange(bq)[:, None], np.arange(bk)[None, :]
    tiles = [np.zeros((bq, bk), bool), np.ones((bq, bk), bool)]
    for delta, nrows, ncols in uniq:
      d = delta + rr - cc
      ok = (d >= 0) & (rr < nrows) & (cc < ncols)
      if band.window is not None:
        ok &= d < band.window
      tiles.append(ok)
    return kv_blocks, mask_ids, np.stack(tiles)

  def _tile_values(self, blocks: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mask values `[n, block_q, width, block_k]` of query blocks `blocks`
    against key blocks `cols [n, width]` (slots past the count are False)."""
    bq, bk = self.block_q, self.block_k
    qi = blocks[:, None, None, None] * bq + np.arange(bq)[None, :, None, None]
    ki = cols[:, None, :, None] * bk + np.arange(bk)[None, None, None, :]
    if self.band is not None:
      return self.band.visible(qi, ki) & (qi < self.q_len) & (ki < self.kv_len)
    out = np.zeros(np.broadcast_shapes(qi.shape, ki.shape), bool)
    kvb, ids, tiles = self._derived
    for r, i in enumerate(blocks):
      row = dict(zip(kvb[i, :self.num_kv_blocks[i]].tolist(),
                     ids[i, :self.num_kv_blocks[i]].tolist()))
      for s, j in enumerate(cols[r].tolist()):
        if j in row:
          out[r, :, s, :] = tiles[row[j]]
    return out

  def to_mask(self) -> np.ndarray:
    """The dense bool mask `[q_len, kv_len]` this layout describes (tests only)."""
    nk = self.num_k_blocks
    kvb, ids, tiles = self._derived
    out = np.zeros((self.num_q_blocks * self.block_q, nk * self.block_k), bool)
    for i in range(self.num_q_blocks):
      for slot in range(int(self.num_kv_blocks[i])):
        j = int(kvb[i, slot])
        out[i * self.block_q:(i + 1) * self.block_q,
            j * self.block_k:(j + 1) * self.block_k] = tiles[ids[i, slot]]
    return out[:self.q_len, :self.kv_len]

  def nbytes(self) -> int:
    """Bytes held by the layout's stored tables (derived ones excluded)."""
    own = self.num_kv_blocks.nbytes + (0 if self.block_lo is None else self.block_lo.nbytes)
    if self._tables is not None:
      own += sum(a.nbytes for a in self._tables)
    return own

  # -- hashing (a layout is a static argument of jitted ops) ----------------

  @functools.cached_property
  def _key(self):
    base = (self.q_len, self.kv_len, self.block_q, self.block_k)
    if self.band is not None:
      return base + ("band", self.band.q_offset, self.band.window)
    h = hashlib.sha1()
    for a in (self.num_kv_blocks,) + tuple(self._tables):
      h.update(np.ascontiguousarray(a).tobytes())
      h.update(str(a.shape).encode())
    return base + ("table", h.hexdigest())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, BlockLayout) and self._key == other._key


def _pad_rows(kv_rows, id_rows, counts):
  """Stacks per-row key blocks / mask ids into padded `[nq, width]` tables;
  padding slots repeat the row's last block (EMPTY mask id)."""
  nq = len(counts)
  width = max(int(counts.max(initial=0)), 1)
  kv_blocks = np.zeros((nq, width), np.int32)
  mask_ids = np.zeros((nq, width), np.int32)
  for i, (cols, ids) in enumerate(zip(kv_rows, id_rows)):
    n = len(cols)
    kv_blocks[i, :n] = cols
    mask_ids[i, :n] = ids
    if n:
      kv_blocks[i, n:] = cols[-1]
  return kv_blocks, mask_ids
