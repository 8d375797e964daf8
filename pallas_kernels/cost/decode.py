"""Cost model of the decode kernels (see the package doc)."""

from __future__ import annotations

from pallas_kernels.common import next_pow2
from pallas_kernels.cost.base import (F32_BYTES, I32_BYTES, KernelCost, _cdiv, _group,
                                      _out, padded_head_dim)


DECODE_TILE = 64        # key rows per decode band / range tile (GPU)


def _decode_rows(q_heads: int, kv_heads: int, q_len: int) -> int:
  """Padded query rows per kv head (`G * lq`, a power of two >= 16)."""
  return max(16, next_pow2(_group(q_heads, kv_heads) * q_len))


def _decode_splits(num_splits, rule, *args, **kw) -> int:
  """`num_splits`, or (None) the split count the decode kernels choose
  (`pallas_kernels.decode.common`, imported here to keep this module free of
  kernel imports at load time)."""
  if num_splits is not None:
    return int(num_splits)
  from pallas_kernels.decode import common as dec_common
  return getattr(dec_common, rule)(*args, **kw)


def _split_overhead(batch, kv_heads, rp, dp, num_splits):
  """Partial `(m, l, o)` states written and read back by a split merge."""
  if num_splits <= 1:
    return 0
  return 2 * batch * kv_heads * num_splits * rp * (dp + 2) * F32_BYTES


def _kv_windows(batch, kv_heads, rp, dp, windows, rows, itemsize, num_splits) -> KernelCost:
  """A decode kernel that scores its `rp` query rows (per kv head) against
  `windows` windows of `rows` K and V rows each (as matmuls), its partial
  states merged over `num_splits` splits (`decode_band`, `decode_stripes`)."""
  kv = batch * kv_heads * windows * 2 * rows * dp * itemsize
  own = batch * kv_heads * rp * (dp * itemsize + (dp + 2) * F32_BYTES)
  work = batch * kv_heads * windows * rp * rows
  return KernelCost(flops=4 * work * dp, transcendentals=work,
                    bytes_accessed=kv + own + _split_overhead(batch, kv_heads, rp, dp,
                                                              num_splits),
                    programs=batch * kv_heads * num_splits)


def decode_search(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
                  stripes: int, num_spans: int, itemsize: int = 2, platform: str = "gpu",
                  rows_per_stripe: int | None = None, num_splits: int | None = None,
                  detail: bool = False):
  """Decode span-search, grid `(B, Hk, num_splits)`: per visited stripe
  `rows_per_stripe` cache rows (default `q_len`: the rows its queries use,
  gathered many stripes per step) scored against all `G lq` query rows as
  one padded matmul; per split a top-`num_spans` list written."""
  dp = padded_head_dim(head_dim, platform)
  num_splits = _decode_splits(num_splits, "stripe_splits", stripes,
                              programs=batch * kv_heads)
  rp = _decode_rows(q_heads, kv_heads, q_len)
  win = q_len if rows_per_stripe is None else rows_per_stripe
  ks = batch * kv_heads * stripes * win * dp * itemsize
  own = batch * kv_heads * (rp * dp * itemsize + num_splits * 2 * num_spans * rp * 4)
  flops = batch * kv_heads * stripes * 2 * rp * win * dp
  return _out(KernelCost(flops=flops, bytes_accessed=ks + own,
                         programs=batch * kv_heads * num_splits), detail)


def decode_band(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
                width: int, itemsize: int = 2, platform: str = "gpu",
                num_splits: int | None = None,
                tile: int = DECODE_TILE, detail: bool = False):
  """Decode band (window), grid `(B, Hk, num_splits)`: `ceil((width + lq -
  1) / tile)` tiles of K, V shared by the splits; all `G lq` rows per tile
  as a matmul."""
  dp = padded_head_dim(head_dim, platform)
  num_splits = _decode_splits(num_splits, "band_splits", width, lq=q_len,
                              programs=batch * kv_heads)
  rp = _decode_rows(q_heads, kv_heads, q_len)
  tiles = _cdiv(width + q_len - 1, tile)
  return _out(_kv_windows(batch, kv_heads, rp, dp, tiles, tile, itemsize, num_splits),
              detail)


def decode_stripes(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
                   stripes: int, itemsize: int = 2, platform: str = "gpu",
                   rows_per_stripe: int | None = None, num_splits: int | None = None,
                   detail: bool = False):
  """Decode PPA stripes, grid `(B, Hk, num_splits)`: per visited far offset
  `rows_per_stripe` rows (default `q_len`, gathered) of K and V."""
  dp = padded_head_dim(head_dim, platform)
  num_splits = _decode_splits(num_splits, "stripe_splits", stripes,
                              programs=batch * kv_heads)
  rp = _decode_rows(q_heads, kv_heads, q_len)
  win = q_len if rows_per_stripe is None else rows_per_stripe
  return _out(_kv_windows(batch, kv_heads, rp, dp, stripes, win, itemsize, num_splits),
              detail)


def decode_ranges(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
                  num_spans: int, range_tiles: int, itemsize: int = 2,
                  platform: str = "gpu", num_splits: int = 1, tile: int = DECODE_TILE,
                  detail: bool = False):
  """Decode span ranges, grid `(B, Hk, G lq K)` (`x num_splits`): one
  program per (row, slot); `range_tiles` `tile`-row tiles of K, V summed over
  every program of the grid (a data-dependent count); row-wise dots
  (`4 Dp` FLOPs per key)."""
  dp = padded_head_dim(head_dim, platform)
  rows = _group(q_heads, kv_heads) * q_len * num_spans
  kv = range_tiles * 2 * tile * dp * itemsize
  own = batch * kv_heads * rows * (dp * itemsize + 2 * I32_BYTES + (dp + 2) * F32_BYTES)
  work = range_tiles * tile
  split = 0 if num_splits <= 1 else 2 * batch * kv_heads * rows * num_splits * (dp + 2) * 4
  return _out(KernelCost(vector_flops=4 * work * dp, transcendentals=work,
                         bytes_accessed=kv + own + split,
                         programs=batch * kv_heads * rows * num_splits), detail)
