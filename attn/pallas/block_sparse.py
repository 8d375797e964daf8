"""Dense, sliding-window and block-sparse attention on `pallas_kernels.block_sparse`.

Functions with the signatures of `attn.xla` (plus `variant`, see
`pallas_kernels.platform`). `dense_attention` and `sliding_window_attention`
are band masks: their tables are computed on the device from `q_offset`
(which may be traced), so nothing here depends on the data.
`block_sparse_attention` with a band layout (`BlockLayout.causal` /
`.sliding_window`) runs the same band kernel; a table layout (`from_mask` /
`from_fn`) is turned once into `HostTables` (per key block transposed lists
for the dkv kernel, and the keys no query sees, which are zeroed before the
kernels so NaN/Inf there stays out).
"""

from __future__ import annotations

import functools

import numpy as np

from attn._offsets import call_any_offset
from attn.layout import EMPTY, BlockLayout
from pallas_kernels import block_sparse as kernels
from pallas_kernels import platform
from pallas_kernels.block_sparse import HARDWARE_CHECKS
from pallas_kernels.common import next_pow2

OPS = ("dense_attention", "sliding_window_attention", "block_sparse_attention")

MAX_BLOCK = 512      # splash-sized TPU tiles (per-step overhead dominates at 128)
MIN_WINDOW_BLOCK = 128


def blocks_for(q_len: int, kv_len: int, window: int | None = None) -> tuple[int, int]:
  """Layout blocks of the band kernels: the TPU kernels run these tiles (up to
  512 x 512; a sliding window caps them near the window so edge tiles stay
  few); the GPU kernels split them into their own per-pass tiles
  (`pallas_kernels.block_sparse.default_blocks`)."""
  cap = MAX_BLOCK if window is None else min(MAX_BLOCK, max(MIN_WINDOW_BLOCK, next_pow2(window)))
  return min(cap, next_pow2(q_len, 16)), min(cap, next_pow2(kv_len, 16))


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether these kernels carry a hardware record for `backend`."""
  del q_len  # one kernel set for every query count
  return platform.verified_on(HARDWARE_CHECKS, backend)


def _band(q, k, v, q_offset, *, window, scale, variant, kv_limit=None):
  bq, bk = blocks_for(q.shape[1], k.shape[1], window)
  return kernels.band_attention(q, k, v, q_offset, window=window, scale=scale, block_q=bq,
                                block_k=bk, variant=variant, kv_limit=kv_limit)


def dense_attention(q, k, v, q_offset=None, *, scale, variant=None):
  """Causal attention (`attn.dense_attention` semantics, any traced `q_offset`)."""
  return call_any_offset(_band, q, k, v, q_offset, query_args=(0,), fills=(0,),
                         key_limit=True, window=None, scale=scale, variant=variant)


def sliding_window_attention(q, k, v, q_offset=None, *, window, scale, variant=None):
  """Sliding-window attention (`attn.sliding_window_attention` semantics)."""
  return call_any_offset(_band, q, k, v, q_offset, query_args=(0,), fills=(0,),
                         key_limit=True, window=window, scale=scale, variant=variant)


def kernel_blocks_ok(layout: BlockLayout) -> bool:
  """Whether the kernels accept the layout's blocks (powers of two >= 16)."""
  try:
    kernels.check_blocks(layout.block_q, layout.block_k)
    return True
  except ValueError:
    return False


def block_sparse_attention(q, k, v, *, layout: BlockLayout, scale, variant=None,
                           count_visits: bool = False):
  """Attention under `layout` (`attn.block_sparse_attention` semantics).

  With `count_visits=True` (forward only) also returns int32 `[B, Hq, nq]`,
  the key blocks the kernel computed for each query block.
  """
  if layout.band is not None:
    bq, bk = ((layout.block_q, layout.block_k) if kernel_blocks_ok(layout)
              else blocks_for(layout.q_len, layout.kv_len, layout.band.window))
    return kernels.band_attention(q, k, v, layout.band.q_offset, window=layout.band.window,
                                  scale=scale, block_q=bq, block_k=bk, variant=variant,
                                  count_visits=count_visits)
  return kernels.table_attention(q, k, v, host_tables(layout), scale=scale, variant=variant,
                                 count_visits=count_visits)


@functools.lru_cache(maxsize=64)
def host_tables(layout: BlockLayout) -> kernels.HostTables:
  """The kernels' tables of a table layout (cached per layout).

  Raises ValueError if the layout's blocks do not suit the kernels.
  """
  kernels.check_blocks(layout.block_q, layout.block_k)
  nk = layout.num_k_blocks
  kvb, mids, tiles = layout.kv_blocks, layout.mask_ids.copy(), layout.block_masks
  counts = layout.num_kv_blocks.astype(np.int32)
  slot = np.arange(kvb.shape[1])[None, :]
  active = slot < counts[:, None]
  # Padding slots repeat the last valid mask id too (no extra tile DMA on TPU).
  last = np.take_along_axis(mids, np.maximum(counts - 1, 0)[:, None], axis=1)
  mids = np.where(active, mids, np.where(counts[:, None] > 0, last, EMPTY)).astype(np.int32)

  # Transposed lists: for each key block, the query blocks that list it.
  rows, slots = np.nonzero(active)
  cols, tile_ids = kvb[rows, slots], mids[rows, slots]
  order = np.lexsort((rows, cols))
  rows, cols, tile_ids = rows[order], cols[order], tile_ids[order]
  counts_t = np.bincount(cols, minlength=nk).astype(np.int32)
  width_t = max(int(counts_t.max(initial=0)), 1)
  starts = np.concatenate([[0], np.cumsum(counts_t)[:-1]])
  pos = np.arange(len(cols)) - starts[cols]
  blocks_t = np.zeros((nk, width_t), np.int32)
  masks_t = np.zeros((nk, width_t), np.int32)
  blocks_t[cols, pos] = rows
  masks_t[cols, pos] = tile_ids
  fill = np.maximum(counts_t - 1, 0)[:, None]
  pad = np.arange(width_t)[None, :] >= counts_t[:, None]
  blocks_t = np.where(pad, np.take_along_axis(blocks_t, fill, 1), blocks_t).astype(np.int32)
  masks_t = np.where(pad, np.take_along_axis(masks_t, fill, 1), masks_t).astype(np.int32)

  kvb, mids = _carry_forward(kvb.astype(np.int32), mids, counts)
  blocks_t, masks_t = _carry_forward(blocks_t, masks_t, counts_t)

  # Keys some query sees: OR of the column-any of every listed tile.
  seen = np.zeros((nk, layout.block_k), bool)
  np.logical_or.at(seen, cols, tiles.any(axis=1)[tile_ids])
  keys_seen = seen.reshape(-1)[:layout.kv_len]
  return kernels.HostTables(
      kv_blocks=kvb.astype(np.int32), num_kv_blocks=counts, mask_ids=mids,
      kv_blocks_t=blocks_t, num_kv_blocks_t=counts_t, mask_ids_t=masks_t,
      block_masks=tiles.astype(np.int32), keys_seen=keys_seen,
      q_len=layout.q_len, kv_len=layout.kv_len, block_q=layout.block_q,
      block_k=layout.block_k)


def _carry_forward(blocks, masks, counts):
  """Rows without any slot repeat the previous row's last block and mask id,
  so on TPU their (skipped) grid steps issue no DMA either. O(rows)."""
  blocks, masks = blocks.copy(), masks.copy()
  last_b, last_m = 0, EMPTY
  for i, n in enumerate(counts.tolist()):
    if n == 0:
      blocks[i, :], masks[i, :] = last_b, last_m
    else:
      last_b, last_m = blocks[i, n - 1], masks[i, n - 1]
  return blocks, masks
