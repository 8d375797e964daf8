"""BlockLayout: band layouts from block arithmetic, table layouts tile by tile."""

import numpy as np
import pytest

import attn
from attn.layout import FULL, BlockLayout


def _band_mask(lq, lk, off, window):
  """Oracle with its own arithmetic."""
  rows = off + np.arange(lq)[:, None]
  cols = np.arange(lk)[None, :]
  ok = cols <= rows
  return ok if window is None else ok & (cols > rows - window)


BANDS = [  # (q_len, kv_len, q_offset, window, bq, bk)
    (37, 37, 0, None, 8, 8), (37, 50, 13, 5, 8, 16), (20, 60, 3, 17, 4, 8),
    (64, 64, 0, 64, 16, 16), (1, 40, 39, 9, 8, 8), (33, 33, 0, 1, 16, 8),
    (50, 70, 20, None, 16, 32),
]


@pytest.mark.parametrize("lq,lk,off,window,bq,bk", BANDS)
def test_band_layout_equals_layout_of_its_mask(lq, lk, off, window, bq, bk):
  band = BlockLayout.band_layout(lq, lk, window=window, q_offset=off, block_q=bq, block_k=bk)
  mask = _band_mask(lq, lk, off, window)
  table = BlockLayout.from_mask(mask, block_q=bq, block_k=bk)
  np.testing.assert_array_equal(band.to_mask(), mask)
  np.testing.assert_array_equal(band.num_kv_blocks, table.num_kv_blocks)
  np.testing.assert_array_equal(band.kv_blocks, table.kv_blocks)
  np.testing.assert_array_equal(band.mask_ids == FULL, table.mask_ids == FULL)
  assert band.num_active_blocks == table.num_active_blocks
  # The run of key blocks is contiguous and starts at block_lo.
  for i, n in enumerate(band.num_kv_blocks):
    np.testing.assert_array_equal(band.kv_blocks[i, :n], band.block_lo[i] + np.arange(n))


def test_million_token_band_layouts_are_small():
  """Built from block arithmetic: O(query blocks) bytes, no derived tables."""
  n = 1 << 20
  causal = BlockLayout.causal(n)
  window = BlockLayout.sliding_window(n, window=4096)
  for layout in (causal, window):
    assert layout.nbytes() <= 2 * 4 * (n // 128)
    assert "_derived" not in layout.__dict__       # no padded [nq, width] table built
  nq = n // 128
  assert causal.num_active_blocks == nq * (nq + 1) // 2
  # window 4096 = 32 blocks: 33 tiles per aligned query block, fewer at the start.
  assert window.num_active_blocks == sum(min(i + 1, 33) for i in range(nq))


def test_from_fn_document_mask_at_a_million_tokens():
  """A windowed document mask at 1M tokens, described by a predicate."""
  n, w = 1 << 20, 128
  doc = np.arange(n) // 5000
  within = BlockLayout.sliding_window(n, window=w)
  layout = BlockLayout.from_fn(lambda i, j: doc[i] == doc[j], n, n, within=within)
  assert layout.nbytes() < 4 << 20
  assert layout.block_masks.shape[0] < 100            # partial tiles deduplicated
  # Spot-check tiles against the predicate with plain arithmetic.
  rng = np.random.default_rng(0)
  for i in rng.integers(0, n // 128, 20):
    rows = np.arange(i * 128, i * 128 + 128)[:, None]
    for slot in range(layout.num_kv_blocks[i]):
      j = layout.kv_blocks[i, slot]
      cols = np.arange(j * 128, j * 128 + 128)[None, :]
      want = (doc[rows] == doc[cols]) & (cols <= rows) & (cols > rows - w)
      np.testing.assert_array_equal(layout.block_masks[layout.mask_ids[i, slot]], want)
    listed = set(layout.kv_blocks[i, :layout.num_kv_blocks[i]].tolist())
    for j in range(max(0, i - 2), i + 1):
      cols = np.arange(j * 128, j * 128 + 128)[None, :]
      any_ = ((doc[rows] == doc[cols]) & (cols <= rows) & (cols > rows - w)).any()
      assert (j in listed) == any_


@pytest.mark.parametrize("seed", range(3))
def test_from_fn_equals_from_mask(seed):
  rng = np.random.default_rng(seed)
  lq, lk = rng.integers(5, 60, 2)
  keep = rng.random(lk) < 0.3
  fn = lambda i, j: keep[j] | (i % 7 == j % 5)  # noqa: E731
  mask = keep[None, :] | (np.arange(lq)[:, None] % 7 == np.arange(lk)[None, :] % 5)
  for bq, bk in ((4, 8), (16, 16)):
    a = BlockLayout.from_fn(fn, int(lq), int(lk), block_q=bq, block_k=bk, chunk_entries=64)
    b = BlockLayout.from_mask(mask, block_q=bq, block_k=bk)
    np.testing.assert_array_equal(a.to_mask(), mask)
    np.testing.assert_array_equal(a.kv_blocks, b.kv_blocks)
    assert a == b and hash(a) == hash(b)


def test_from_block_mask_lists_full_tiles():
  bm = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], bool)
  layout = BlockLayout.from_block_mask(bm, 40, 45, block_q=16, block_k=16)
  want = np.kron(bm, np.ones((16, 16), bool))[:40, :45]
  np.testing.assert_array_equal(layout.to_mask(), want)
  np.testing.assert_array_equal(layout.num_kv_blocks, [2, 0, 2])
  assert (layout.mask_ids[layout.num_kv_blocks[:, None] > np.arange(2)] == FULL).all()


def test_from_tiles_equals_from_mask():
  rng = np.random.default_rng(4)
  lq, lk, b = 40, 45, 16
  mask = rng.random((lq, lk)) < 0.2
  mask[:16, 16:32] = True                  # one full tile
  mask[16:32] = False                      # a query block without tiles
  ref = BlockLayout.from_mask(mask, block_q=b, block_k=b)
  tiles = [np.zeros((b, b), bool), np.ones((b, b), bool)]
  kv_rows, id_rows = [], []
  for i in range(3):
    cols, ids = [], []
    for j in range(3):
      tile = np.zeros((b, b), bool)
      part = mask[i * b:(i + 1) * b, j * b:(j + 1) * b]
      tile[:part.shape[0], :part.shape[1]] = part
      if tile.any():
        cols.append(j)
        ids.append(FULL if tile.all() else len(tiles))
        if not tile.all():
          tiles.append(tile)
    kv_rows.append(cols)
    id_rows.append(ids)
  layout = BlockLayout.from_tiles(lq, lk, block_q=b, block_k=b, kv_rows=kv_rows,
                                  id_rows=id_rows, block_masks=np.stack(tiles))
  np.testing.assert_array_equal(layout.to_mask(), mask)
  np.testing.assert_array_equal(layout.num_kv_blocks, ref.num_kv_blocks)
  np.testing.assert_array_equal(layout.kv_blocks, ref.kv_blocks)
  with pytest.raises(ValueError, match="block_masks"):
    BlockLayout.from_tiles(lq, lk, block_q=b, block_k=b, kv_rows=kv_rows, id_rows=id_rows,
                           block_masks=np.stack(tiles[1:]))
  with pytest.raises(ValueError, match="kv_rows"):
    BlockLayout.from_tiles(lq, lk, block_q=b, block_k=b, kv_rows=kv_rows[:2],
                           id_rows=id_rows[:2], block_masks=np.stack(tiles))
  with pytest.raises(ValueError, match=r"kv_rows\[0\]"):
    BlockLayout.from_tiles(lq, lk, block_q=b, block_k=b, kv_rows=[[1, 0]] + kv_rows[1:],
                           id_rows=[[FULL, FULL]] + id_rows[1:], block_masks=np.stack(tiles))


def test_band_hash_and_equality():
  a = BlockLayout.sliding_window(100, window=9, block_q=16, block_k=16)
  assert a == BlockLayout.sliding_window(100, window=9, block_q=16, block_k=16)
  assert a != BlockLayout.sliding_window(100, window=10, block_q=16, block_k=16)
  assert a != BlockLayout.causal(100, block_q=16, block_k=16)
  assert hash(a) == hash(BlockLayout.sliding_window(100, window=9, block_q=16, block_k=16))


def test_layout_errors_name_the_argument():
  with pytest.raises(ValueError, match="q_offset"):
    BlockLayout.causal(10, kv_len=20, q_offset=11)
  with pytest.raises(ValueError, match="within"):
    BlockLayout.from_fn(lambda i, j: i >= j, 10, 10, block_q=4, block_k=4,
                        within=BlockLayout.causal(10, block_q=8, block_k=8))
  with pytest.raises(ValueError, match="block_mask"):
    BlockLayout.from_block_mask(np.ones((2, 2), bool), 40, 40, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="kv_len"):
    BlockLayout.from_fn(lambda i, j: i >= j, 10, 0)
  with pytest.raises(ValueError, match="window"):
    attn.BlockLayout.sliding_window(16, window=0)
