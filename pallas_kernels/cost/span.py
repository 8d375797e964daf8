"""Cost model of the span kernels (see the package doc)."""

from __future__ import annotations

import numpy as np

from pallas_kernels.cost.base import (F32_BYTES, I32_BYTES, KernelCost, _cdiv, _out,
                                      padded_head_dim)


def span_fwd(*, batch: int, heads: int, head_dim: int, rows: int, key_blocks: int,
             block_q: int = 64, block_k: int = 64, itemsize: int = 2,
             platform: str = "gpu", wave_key_blocks: int | None = None,
             detail: bool = False):
  """Interval attention forward (`span.interval_attention`), grid
  `(B, H, rows / bq)` with `H` the row heads (`span.common.row_heads`).

  `key_blocks`: key blocks visited, summed over every row tile of the grid
  (all batches and heads; each tile visits the blocks covering its rows'
  union, a data-dependent count);
  K, V `block_k` rows each. Rows in: q, lo, hi; out: o (input dtype),
  float32 lse. `wave_key_blocks`: distinct key blocks summed over the waves
  of the block-first launch, all batches and heads (the wave model,
  `span_wave_key_blocks`).
  """
  dp = padded_head_dim(head_dim, platform)
  rp = _cdiv(rows, block_q) * block_q
  kv = key_blocks * 2 * block_k * dp * itemsize
  own = batch * heads * rp * (2 * dp * itemsize + 2 * I32_BYTES + F32_BYTES)
  work = key_blocks * block_q * block_k
  hits = 0
  if wave_key_blocks is not None:
    hits = max(0, kv - wave_key_blocks * 2 * block_k * dp * itemsize)
  return _out(KernelCost(flops=4 * work * dp, transcendentals=work, bytes_accessed=kv + own,
                         programs=batch * heads * (rp // block_q), wave_hits=hits), detail)


def span_wave_key_blocks(rows: int, kv_len: int, max_keys: int, *, block_q: int,
                         block_k: int, wave: int, rows_per_key: float = 1.0) -> int:
  """Distinct key blocks the waves of an interval-attention call read, per
  (batch, row head), summed over waves (the wave model, `KernelCost`).

  Rows are sorted by interval start (span pairs) or ordered by query
  (window rows), `rows_per_key` rows per key position, so a wave of `wave`
  tiles covers starts spread over `wave * block_q / rows_per_key` keys and
  reads that spread plus one interval (at most `max_keys` keys) plus a block
  at each end; the spreads of all waves add up to at most the sequence
  (`kv_len` keys per pass over it).
  """
  tiles = _cdiv(rows, block_q)
  waves = _cdiv(tiles, wave)
  spread = min(rows / rows_per_key, waves * kv_len)
  per_wave = min(_cdiv(kv_len, block_k), _cdiv(max_keys, block_k) + 2)
  return _cdiv(spread, block_k) + waves * per_wave


def window_key_blocks(seq_len: int, window: int, group: int, block_q: int = 64,
                      block_k: int = 64) -> int:
  """Key blocks the span forward visits for superlinear's window call, per
  (batch, row head): rows are ordered (head, query), so a tile holds
  `block_q` consecutive queries of one of the row head's `group` query
  heads (`span.common.row_heads`), whose window
  union is `[p0 - window + 1, p1]` (tiles do not straddle heads when
  `seq_len % block_q == 0`)."""
  if window <= 0:
    return 0
  p0 = np.arange(0, seq_len, block_q, dtype=np.int64)
  p1 = np.minimum(p0 + block_q, seq_len) - 1
  lo = np.maximum(p0 - window + 1, 0)
  return group * int((p1 // block_k - lo // block_k + 1).sum())


def span_key_blocks(rows: int, span_keys: int, kv_len: int, block_q: int = 64,
                    block_k: int = 64) -> int:
  """Expected key blocks of the span call, per (batch, row head).

  `rows`: (query, head, slot) pairs, sorted by span start; `span_keys`: the
  sum of their span lengths. A tile of `block_q` rows with nearly equal
  starts visits about one span's blocks plus one, and the start spreads of
  all tiles add at most the key blocks (`span/blocks.py`):
  `span_keys / (bq bk) + tiles + kv_len / bk`.
  """
  return (_cdiv(span_keys, block_q * block_k) + _cdiv(rows, block_q)
          + _cdiv(kv_len, block_k))


def span_dq(*, batch: int, heads: int, head_dim: int, rows: int, key_blocks: int,
            block_q: int = 64, block_k: int = 64, itemsize: int = 2,
            platform: str = "gpu", detail: bool = False):
  """Interval attention dq kernel: the forward's visits, 6 FLOPs per entry
  and element; q, do, lse, delta, lo, hi in, dq out (input dtype)."""
  dp = padded_head_dim(head_dim, platform)
  rp = _cdiv(rows, block_q) * block_q
  kv = key_blocks * 2 * block_k * dp * itemsize
  own = batch * heads * rp * (3 * dp * itemsize + 4 * F32_BYTES)
  work = key_blocks * block_q * block_k
  return _out(KernelCost(flops=6 * work * dp, transcendentals=work,
                         bytes_accessed=kv + own,
                         programs=batch * heads * (rp // block_q)), detail)


def span_dkv(*, batch: int, heads: int, head_dim: int, kv_len: int, tile_visits_t: int,
             block_q: int = 64, block_k: int = 64, itemsize: int = 2,
             platform: str = "gpu", detail: bool = False):
  """Interval attention dk/dv kernel, grid `(B, H, nkb)` (`H` the kv heads), looping over
  `tile_visits_t` row tiles (total over the grid) with q, do, lse, delta,
  lo, hi each (8 FLOPs per entry and element); dk, dv out (input dtype)."""
  dp = padded_head_dim(head_dim, platform)
  nkb = _cdiv(kv_len, block_k)
  rows = tile_visits_t * block_q * (2 * dp * itemsize + 4 * F32_BYTES)
  own = batch * heads * nkb * block_k * 4 * dp * itemsize
  work = tile_visits_t * block_q * block_k
  return _out(KernelCost(flops=8 * work * dp, transcendentals=work,
                         bytes_accessed=rows + own, programs=batch * heads * nkb), detail)


def span_bwd(*, batch: int, heads: int, head_dim: int, rows: int, kv_len: int,
             key_blocks: int, tile_visits_t: int | None = None, block_q: int = 64,
             block_k: int = 64, itemsize: int = 2, platform: str = "gpu",
             kv_heads: int | None = None, detail: bool = False):
  """Interval attention backward: `span_dq` (over the `heads` row heads)
  plus `span_dkv` (over `kv_heads`, default `heads`; `tile_visits_t`
  default: the forward's visits). `key_blocks`, `tile_visits_t`: totals over
  the grid (all batches, heads)."""
  kw = dict(batch=batch, head_dim=head_dim, block_q=block_q, block_k=block_k,
            itemsize=itemsize, platform=platform, detail=True)
  tv = key_blocks if tile_visits_t is None else tile_visits_t
  total = (span_dq(rows=rows, key_blocks=key_blocks, heads=heads, **kw)
           + span_dkv(kv_len=kv_len, tile_visits_t=tv,
                      heads=heads if kv_heads is None else kv_heads, **kw))
  return _out(total, detail)
