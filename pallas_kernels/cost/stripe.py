"""Cost model of the stripe kernels: the span-search and PPA (see the package doc)."""

from __future__ import annotations

import numpy as np

from pallas_kernels.common import next_pow2
from pallas_kernels.cost.base import (F32_BYTES, I32_BYTES, KernelCost, _cdiv, _out,
                                      padded_head_dim, stripe_rows)


def _deltas_in(deltas, lo, hi) -> int:
  """Sum over blocks of the `deltas` in `[lo, hi)` (`lo`, `hi`: int arrays,
  one entry per block)."""
  d = np.sort(np.asarray(deltas, np.int64).reshape(-1))
  count = np.searchsorted(d, hi, side="left") - np.searchsorted(d, lo, side="left")
  return int(np.maximum(count, 0).sum())


def stripe_visits(deltas, *, q_blocks: int, block_q: int, kv_len: int) -> int:
  """(query block, stripe) pairs the span-search visits per (batch, kv head).

  deltas: int `[S]`, anchor = query row + delta (`q_offset + 1 - f`). A
  block of rows `[i0, i0 + block_q)` visits the stripes with an anchor in
  `[0, kv_len)` for some row: `-(i0 + block_q - 1) <= delta < kv_len - i0`.
  """
  i0 = np.arange(q_blocks, dtype=np.int64) * block_q
  return _deltas_in(deltas, -(i0 + block_q - 1), kv_len - i0)


def ppa_stripe_visits(far_offsets, *, q_len: int, kv_len: int, q_offset: int, block: int,
                      transposed: bool = False) -> int:
  """(block, far stripe) pairs a PPA kernel visits per (batch, head).

  Query `i` meets key `q_offset + i - f` for far offset `f`. A query block
  `[i0, i0 + block)` (forward, dq) visits the offsets with a key in
  `[0, min(kv_len, q_offset + q_len) - 1]` for some row (the search's rule,
  `stripe_visits`); a key block `[x0, x0 + block)` (`transposed`: dk/dv)
  those with a query in `[0, q_len)` for some key."""
  d = q_offset - np.asarray(far_offsets, np.int64).reshape(-1)   # key - query
  if not transposed:
    return stripe_visits(d, q_blocks=_cdiv(q_len, block), block_q=block,
                         kv_len=min(kv_len, q_offset + q_len))
  x0 = np.arange(_cdiv(kv_len, block), dtype=np.int64) * block
  return _deltas_in(d, x0 - q_len + 1, x0 + block)     # query x - d in [0, q_len)


def stripe_search(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
                  stripes: int, num_spans: int, block_q: int = 64, itemsize: int = 2,
                  platform: str = "gpu", unit: int = 16, gqa_shared_reads: bool = True,
                  visits: int | None = None, wave_rows: int | None = None,
                  detail: bool = False):
  """Span-search (`stripe.search_topk`), grid `(B, Hk, nq)` (`block_q`: query
  rows per head; a program serves the `G` query heads of a kv head).

  A program visits the stripes with an anchor in its block (`visits`
  (query block, stripe) pairs per (batch, kv head), `stripe_visits`; None:
  every stripe in every block, the bound for a traced offset), loading
  `block_q` rows of the search keys per stripe once for its `G` heads and
  scoring them row-wise (`2 Dp` FLOPs a row, vector units).
  `gqa_shared_reads=False`: the former grid `(B, Hq, nq)`, each query head
  re-reading the rows. `wave_rows`: distinct search-key rows per (batch, kv
  head) summed over the waves of the block-first launch (the wave model,
  `search_wave_rows`).
  """
  dp = padded_head_dim(head_dim, platform)
  nq = _cdiv(q_len, block_q)
  visits = nq * stripes if visits is None else visits
  reads_h = kv_heads if gqa_shared_reads else q_heads
  rows = stripe_rows(block_q, platform, unit)
  ks = batch * reads_h * visits * rows * dp * itemsize
  kp = next_pow2(num_spans)
  own = batch * q_heads * nq * block_q * (dp * itemsize + 2 * kp * 4)
  vec = batch * q_heads * visits * block_q * 2 * dp
  hits = 0
  if wave_rows is not None:
    hits = max(0, int(ks) - batch * reads_h * wave_rows * dp * itemsize)
  return _out(KernelCost(vector_flops=int(vec), bytes_accessed=int(ks + own),
                         programs=batch * reads_h * nq, wave_hits=hits), detail)


def search_wave_rows(deltas, *, q_len: int, block_q: int, kv_len: int, wave: int) -> int:
  """Distinct search-key rows the waves of the span-search read, per
  (batch, kv head), summed over waves (the wave model, `KernelCost`).

  A wave is `wave` consecutive query blocks, rows `[i0, i1)`; stripe
  `delta` reads key rows `[i0 + delta, i1 + delta)` (within `[0, kv_len)`)
  across it. Stripes at nearby offsets overlap: the wave's distinct rows are
  the union of those intervals (sorted by start, each counting the part past
  the previous ends).
  """
  d = np.sort(np.asarray(deltas, np.int64))
  if d.size == 0:
    return 0
  i0 = np.arange(0, q_len, wave * block_q, dtype=np.int64)[:, None]
  i1 = np.minimum(i0 + wave * block_q, q_len)
  start, end = np.clip(i0 + d, 0, kv_len), np.clip(i1 + d, 0, kv_len)
  reach = np.maximum.accumulate(end, axis=1)
  prev = np.concatenate([np.zeros_like(reach[:, :1]), reach[:, :-1]], axis=1)
  return int(np.maximum(0, end - np.maximum(start, prev)).sum())


def gate_logits_bwd(*, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                    q_len: int, num_spans: int, itemsize: int = 2, platform: str = "gpu",
                    detail: bool = False):
  """Backward of the gate logits (`attn.pallas.superlinear.gate_logits`; XLA).

  The forward is free (the search's own top-k scores, search once). The
  backward gathers the `k` selected search-key rows per query into a
  float32 dq_search and scatter-adds `k` query rows per query into a
  float32 dk_search (read-modify-write of a row), one slot at a time: no
  stripe loop. `kv_heads` is unused (the scatter targets are per pair).
  """
  del kv_heads
  dp = padded_head_dim(head_dim, platform)
  pairs = batch * q_heads * q_len * num_spans
  dq = pairs * dp * itemsize + batch * q_heads * q_len * dp * F32_BYTES
  dk = pairs * (dp * itemsize + 2 * dp * F32_BYTES)
  return _out(KernelCost(vector_flops=4 * pairs * dp,
                         bytes_accessed=dq + dk + 2 * pairs * (I32_BYTES + F32_BYTES),
                         programs=batch * q_heads * q_len), detail)


def band_chunks(q_len: int, kv_len: int, q_offset: int, lo: int, hi: int, block: int,
                block_other: int, unit: int = 1, transposed: bool = False) -> int:
  """Tiles the PPA kernels visit for one dense run of offsets `[lo, hi]`,
  summed over the blocks of the grid (per batch and head).

  Forward/dq (`transposed=False`): query blocks of `block_other` rows,
  key tiles of `block` rows covering `[qoff + i0 - hi, qoff + i0 + bq - 1 -
  lo]` clipped to the visible keys, started at a multiple of `unit`.
  dkv (`transposed=True`): key blocks of `block_other`, query chunks of
  `block` rows covering `[x0 + lo - qoff, x0 + bk - 1 + hi - qoff]` clipped
  to `[0, q_len - 1]`.
  """
  total = 0
  n_blocks = _cdiv(kv_len if transposed else q_len, block_other)
  last_key = min(kv_len - 1, q_offset + q_len - 1)
  for b in range(n_blocks):
    r0 = b * block_other
    if transposed:
      first, last = r0 + lo - q_offset, r0 + block_other - 1 + hi - q_offset
      first, last = max(first, 0), min(last, q_len - 1)
    else:
      first, last = q_offset + r0 - hi, q_offset + r0 + block_other - 1 - lo
      first, last = max(first, 0), min(last, last_key)
    base = first - first % unit
    total += max(0, (last - base + block) // block)
  return total


def _ppa_query_blocks(flops_per, own_row, *, batch, q_heads, kv_heads, head_dim, q_len,
                      band_tiles, far_offsets, block_q, block_k, itemsize, platform, unit,
                      gqa_shared_reads, visits) -> KernelCost:
  """A PPA kernel over query blocks, grid `(B, Hk or Hq, nq)` (forward, dq):
  band key tiles and far stripes (K and V rows), `flops_per` FLOPs per
  entry and head_dim element, `own_row(dp)` bytes of the rows it reads and
  writes for itself per query row and head."""
  dp = padded_head_dim(head_dim, platform)
  nq = _cdiv(q_len, block_q)
  reads_h = kv_heads if gqa_shared_reads else q_heads
  visits = nq * far_offsets if visits is None else visits
  band = batch * reads_h * band_tiles * 2 * block_k * dp * itemsize
  stripes = (batch * reads_h * visits * 2 * stripe_rows(block_q, platform, unit)
             * dp * itemsize)
  own = batch * q_heads * nq * block_q * own_row(dp)
  mm = batch * q_heads * band_tiles * block_q * block_k
  rw = batch * q_heads * visits * block_q
  return KernelCost(flops=flops_per * mm * dp, vector_flops=flops_per * rw * dp,
                    transcendentals=mm + rw, bytes_accessed=int(band + stripes + own),
                    programs=batch * reads_h * nq)


def ppa_fwd(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
            band_tiles: int, far_offsets: int, block_q: int = 64, block_k: int = 64,
            itemsize: int = 2, platform: str = "gpu", unit: int = 16,
            gqa_shared_reads: bool = True, visits: int | None = None,
            detail: bool = False):
  """PPA forward (`stripe.ppa_attention`), grid `(B, Hk, nq)`: a program
  serves the `G` query heads of a kv head (`block_q` rows per head).
  `visits`: (query block, stripe) pairs visited per (batch, kv head)
  (`ppa_stripe_visits`; None: every far stripe in every block).

  `band_tiles`: key tiles of the dense runs summed over the query blocks
  (`band_chunks`); each loads K, V `block_k` rows once for the group (`4 bq
  bk Dp` matmul FLOPs per head). Every program then loops over *all*
  `far_offsets` stripes, K and V `block_q` rows each (`4 Dp` row-wise FLOPs
  a row and head). `gqa_shared_reads=False`: the former grid `(B, Hq, nq)`.
  """
  own_row = lambda dp: 2 * dp * itemsize + F32_BYTES   # q in, o out, lse  # noqa: E731
  return _out(_ppa_query_blocks(
      4, own_row, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
      q_len=q_len, band_tiles=band_tiles, far_offsets=far_offsets, block_q=block_q,
      block_k=block_k, itemsize=itemsize, platform=platform, unit=unit,
      gqa_shared_reads=gqa_shared_reads, visits=visits), detail)


def ppa_dq(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
           band_tiles: int, far_offsets: int, block_q: int = 64, block_k: int = 64,
           itemsize: int = 2, platform: str = "gpu", unit: int = 16,
           gqa_shared_reads: bool = True, visits: int | None = None,
           detail: bool = False):
  """PPA dq, grid `(B, Hk, nq)` (as `ppa_fwd`, `visits` too): the forward's
  loads plus do, lse, delta; 6 FLOPs per entry and head_dim element; dq out
  in q's dtype (the kernel casts its float32 sums)."""
  # q, do in; dq out; lse, delta.
  own_row = lambda dp: 3 * dp * itemsize + 2 * F32_BYTES  # noqa: E731
  return _out(_ppa_query_blocks(
      6, own_row, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
      q_len=q_len, band_tiles=band_tiles, far_offsets=far_offsets, block_q=block_q,
      block_k=block_k, itemsize=itemsize, platform=platform, unit=unit,
      gqa_shared_reads=gqa_shared_reads, visits=visits), detail)


def ppa_dkv(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, kv_len: int,
            band_chunks_t: int, far_offsets: int, block_q: int = 64, block_k: int = 64,
            itemsize: int = 2, platform: str = "gpu", unit: int = 16,
            visits: int | None = None, detail: bool = False):
  """PPA dk/dv, grid `(B, Hk, nk)`: per query head of the group, the band's
  query chunks (`band_chunks_t`, `block_q` rows of q, do, lse, delta each;
  8 FLOPs per entry and head_dim element) and the far stripes with a query
  in range (`block_k` query rows; `visits` (key block, stripe) pairs per
  (batch, query head), `ppa_stripe_visits(..., transposed=True)`; None:
  every stripe in every block); k, v in, dk, dv out in their dtype."""
  dp = padded_head_dim(head_dim, platform)
  nk = _cdiv(kv_len, block_k)
  visits = nk * far_offsets if visits is None else visits
  row_b = 2 * dp * itemsize + 2 * F32_BYTES
  band = batch * q_heads * band_chunks_t * block_q * row_b
  stripes = batch * q_heads * visits * stripe_rows(block_k, platform, unit) * row_b
  own = batch * kv_heads * nk * block_k * 4 * dp * itemsize
  mm = batch * q_heads * band_chunks_t * block_q * block_k
  rw = batch * q_heads * visits * block_k
  return _out(KernelCost(flops=8 * mm * dp, vector_flops=8 * rw * dp,
                         transcendentals=mm + rw, bytes_accessed=int(band + stripes + own),
                         programs=batch * kv_heads * nk), detail)
