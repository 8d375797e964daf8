"""Static block-sparse layouts: compact mask metadata, separate from kernels.

A `BlockLayout` describes a `[q_len, kv_len]` boolean mask at the granularity
of `block_q x block_k` tiles. For each query block it stores the key blocks
that hold at least one visible entry (so work follows the number of non-empty
tiles), and for each such tile whether it is full or partial; partial tiles
point into a deduplicated table of in-block masks. This is the metadata the
`xla` path gathers from and the Pallas kernels will prefetch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np

from attn import masks
from attn._checks import is_int

EMPTY, FULL = 0, 1  # reserved ids in `BlockLayout.block_masks`


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Block-sparse attention layout.

  Attributes:
    q_len, kv_len: sequence lengths the layout was built for.
    block_q, block_k: tile sizes.
    kv_blocks: int32 `[num_q_blocks, max_kv_blocks]`: key-block indices to
      visit for each query block, ascending; padding slots repeat the last
      valid index (a kernel that re-reads the same block skips the copy).
    num_kv_blocks: int32 `[num_q_blocks]`: valid slots per query block.
    mask_ids: int32 `[num_q_blocks, max_kv_blocks]`: per slot, an index into
      `block_masks` (`EMPTY = 0` for padding, `FULL = 1`, partial tiles >= 2).
    block_masks: bool `[num_masks, block_q, block_k]`: deduplicated in-tile
      masks; entry 0 is all False and entry 1 all True.
  """

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  kv_blocks: np.ndarray
  num_kv_blocks: np.ndarray
  mask_ids: np.ndarray
  block_masks: np.ndarray

  # -- construction ---------------------------------------------------------

  @classmethod
  def from_mask(cls, mask: np.ndarray, *, block_q: int = 128,
                block_k: int = 128) -> "BlockLayout":
    """Builds the layout of an arbitrary bool mask `[q_len, kv_len]`."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
      raise ValueError(f"mask must be a 2-D bool array [q_len, kv_len], got "
                       f"shape {mask.shape} dtype {mask.dtype}.")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
      if not is_int(val) or val < 1:
        raise ValueError(f"{name}={val!r}: must be a positive int.")
    q_len, kv_len = mask.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    padded = np.zeros((nq * block_q, nk * block_k), bool)
    padded[:q_len, :kv_len] = mask
    tiles = padded.reshape(nq, block_q, nk, block_k).transpose(0, 2, 1, 3)
    any_ = tiles.any(axis=(2, 3))                                   # [nq, nk]
    # A tile is "full" if every in-range entry is visible; out-of-range
    # (padding) entries are masked separately by the ops.
    in_range = np.zeros_like(padded)
    in_range[:q_len, :kv_len] = True
    in_range = in_range.reshape(nq, block_q, nk, block_k).transpose(0, 2, 1, 3)
    full = np.all(tiles | ~in_range, axis=(2, 3)) & any_
    counts = any_.sum(axis=1).astype(np.int32)
    width = max(int(counts.max(initial=0)), 1)
    kv_blocks = np.zeros((nq, width), np.int32)
    mask_ids = np.zeros((nq, width), np.int32)
    table = [np.zeros((block_q, block_k), bool), np.ones((block_q, block_k), bool)]
    seen: dict[bytes, int] = {}
    for i in range(nq):
      cols = np.nonzero(any_[i])[0]
      for slot, j in enumerate(cols):
        kv_blocks[i, slot] = j
        if full[i, j]:
          mask_ids[i, slot] = FULL
        else:
          key = np.packbits(tiles[i, j]).tobytes()
          if key not in seen:
            seen[key] = len(table)
            table.append(tiles[i, j].copy())
          mask_ids[i, slot] = seen[key]
      if len(cols):
        kv_blocks[i, len(cols):] = cols[-1]
    return cls(q_len, kv_len, int(block_q), int(block_k), kv_blocks, counts,
               mask_ids, np.stack(table))

  @classmethod
  def causal(cls, seq_len: int, *, block_q: int = 128, block_k: int = 128):
    """Causal layout of a `seq_len` self-attention."""
    return cls.from_mask(masks.causal_mask(seq_len), block_q=block_q, block_k=block_k)

  @classmethod
  def sliding_window(cls, seq_len: int, *, window: int, block_q: int = 128,
                     block_k: int = 128):
    """Query `i` sees keys `[i - window + 1, i]`."""
    return cls.from_mask(masks.sliding_window_mask(seq_len, window=window),
                         block_q=block_q, block_k=block_k)

  # -- views ----------------------------------------------------------------

  @property
  def num_q_blocks(self) -> int:
    return int(self.kv_blocks.shape[0])

  @property
  def num_active_blocks(self) -> int:
    """Number of non-empty tiles (the work a kernel does)."""
    return int(self.num_kv_blocks.sum())

  def to_mask(self) -> np.ndarray:
    """The dense bool mask `[q_len, kv_len]` this layout describes."""
    nk = -(-self.kv_len // self.block_k)
    out = np.zeros((self.num_q_blocks * self.block_q, nk * self.block_k), bool)
    for i in range(self.num_q_blocks):
      for slot in range(int(self.num_kv_blocks[i])):
        j = int(self.kv_blocks[i, slot])
        out[i * self.block_q:(i + 1) * self.block_q,
            j * self.block_k:(j + 1) * self.block_k] = \
            self.block_masks[self.mask_ids[i, slot]]
    return out[:self.q_len, :self.kv_len]

  # -- hashing (a layout is a static argument of jitted ops) ----------------

  @functools.cached_property
  def _key(self):
    h = hashlib.sha1()
    for a in (self.kv_blocks, self.num_kv_blocks, self.mask_ids, self.block_masks):
      h.update(np.ascontiguousarray(a).tobytes())
      h.update(str(a.shape).encode())
    return (self.q_len, self.kv_len, self.block_q, self.block_k, h.hexdigest())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, BlockLayout) and self._key == other._key
