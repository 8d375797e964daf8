"""Cost model of every kernel: FLOPs, transcendentals and HBM bytes.

Small pure functions of static ints (shapes, block sizes, table sizes), one
per `pallas_call`, so a kernel can pass `cost_estimate=` and a CPU-only
roofline (`eval/roofline_model.py`) can sum the kernels of an op. They count what
each kernel body *really* loads and computes today:

  * every tile / stripe a program visits, at its block size, with head_dim
    padded as the platform pads it (GPU: a power of two >= 16, TPU: a
    multiple of 128; `padded_head_dim`);
  * HBM bytes as if nothing were cached (no L2/VMEM reuse across programs;
    `KernelCost.wave_hits` holds the separate wave model's L2 hits):
    under GQA a query-head program re-reads its kv head's rows, so reads
    scale with the query heads unless `gqa_shared_reads=True` (one program
    per kv head serving its `G` query heads);
  * stripe steps load `block_q` rows per stripe (TPU: one alignment unit
    more when the stripe's residue is not 0, see `stripe/common.py`);
  * decode stripe/search steps (GPU) gather the `lq` rows each stripe uses,
    many stripes per step (TPU: one DMA of the `lq`-row window per stripe).

Switches for the planned changes (issue 15), default = today's code:
`gqa_shared_reads` (stripe kernels per kv head: on by default for the
search and PPA kernels, which share; off for block-sparse), `num_splits`
(decode: the cache split over more programs, partial states merged; the
kernels pass the split count of `decode.common.stripe_splits` /
`band_splits`, also the default when `num_splits=None`; the span ranges
need the span length, default 1 split), `rows_per_stripe` (decode: rows
loaded per stripe; default `q_len`, what the gathers read). Search once
(issue 15 item 1) is in: `gate_logits_bwd` models its backward.

Every public function returns `jax.experimental.pallas.CostEstimate`; with
`detail=True` it returns a `KernelCost` instead, which also says how many
FLOPs are row-wise (vector units, not matmul units) and how many programs
the grid launches (how much of the device it can fill).

Counts that depend on data (the span kernels' key blocks, the decode range
tiles) are traced inside a jitted call, but a `CostEstimate` needs Python
ints: pass the expected count (`window_key_blocks`, `span_key_blocks`
below), not a traced value.

This is a model, not a measurement: it ignores caches, latency, pipelining,
masking overhead and register spills.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.common import cdiv, next_pow2, pad_head_dim

F32_BYTES = 4
I32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """Cost of one kernel launch.

  Attributes:
    flops: matmul-unit FLOPs (tensor cores / MXU).
    vector_flops: row-wise FLOPs (elementwise multiply + reduce on the vector
      units: stripe row dots, decode range dots).
    transcendentals: `exp` evaluations.
    bytes_accessed: HBM bytes read plus written.
    programs: grid programs launched (parallelism available).
    wave_hits: bytes of `bytes_accessed` that the *wave model* serves from
      L2 (0: not modelled). GPU kernels launched block-first
      (`pallas_kernels.common.block_first`) run neighbouring blocks of one
      (batch, head) together; a wave is `wave` programs launched together,
      and the model loads each distinct row a wave reads from HBM once, the
      rest of the wave's loads being L2 hits (`search_wave_rows`,
      `span_wave_key_blocks`, the block-sparse `wave_key_blocks`).
  """

  flops: int = 0
  vector_flops: int = 0
  transcendentals: int = 0
  bytes_accessed: int = 0
  programs: int = 0
  wave_hits: int = 0

  def __add__(self, other: "KernelCost") -> "KernelCost":
    return KernelCost(*(int(a) + int(b) for a, b in zip(dataclasses.astuple(self),
                                                        dataclasses.astuple(other))))

  def estimate(self) -> pl.CostEstimate:
    """The `pl.CostEstimate` (all FLOPs together) for `pallas_call`."""
    return pl.CostEstimate(flops=int(self.flops + self.vector_flops),
                           transcendentals=int(self.transcendentals),
                           bytes_accessed=int(self.bytes_accessed))


def _out(cost: KernelCost, detail: bool):
  return cost if detail else cost.estimate()


def _cdiv(a, b) -> int:
  return cdiv(int(a), int(b))


def padded_head_dim(head_dim: int, platform: str = "gpu") -> int:
  """head_dim inside the kernels (`pallas_kernels.common.pad_head_dim`)."""
  return pad_head_dim(head_dim, platform)


def stripe_rows(block: int, platform: str = "gpu", unit: int = 16,
                misaligned_fraction: float | None = None) -> float:
  """Rows one stripe step loads: the block on GPU; on TPU one alignment
  `unit` more for stripes whose residue is not 0 (`(unit - 1) / unit` of
  them when residues are uniform)."""
  if platform != "tpu":
    return float(block)
  frac = (unit - 1) / unit if misaligned_fraction is None else misaligned_fraction
  return block + unit * frac


def _group(q_heads: int, kv_heads: int) -> int:
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}.")
  return q_heads // kv_heads


# ------------------------------------------------------------ block-sparse


def block_sparse_fwd(*, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                     num_q_blocks: int, tiles: int, block_q: int, block_k: int,
                     itemsize: int = 2, platform: str = "gpu",
                     gqa_shared_reads: bool = False, wave_key_blocks: int | None = None,
                     detail: bool = False):
  """Block-sparse forward, grid `(B, Hq, nq)`.

  `tiles`: non-empty tiles per (batch, head) (`BlockLayout.num_active_blocks`).
  Each tile loads `block_k` rows of K and V and costs `4 bq bk Dp` FLOPs and
  `bq bk` exps; each program loads its q block and writes o and lse.
  `wave_key_blocks`: distinct key blocks per (batch, query head) summed over
  the waves of the block-first launch (the wave model, `KernelCost`).
  """
  dp = padded_head_dim(head_dim, platform)
  reads_h = kv_heads if gqa_shared_reads else q_heads
  kv = batch * reads_h * tiles * 2 * block_k * dp * itemsize
  rows = batch * q_heads * num_q_blocks * block_q
  own = rows * (2 * dp * itemsize + F32_BYTES)
  work = batch * q_heads * tiles * block_q * block_k
  hits = 0
  if wave_key_blocks is not None:
    hits = max(0, kv - batch * reads_h * wave_key_blocks * 2 * block_k * dp * itemsize)
  return _out(KernelCost(flops=4 * work * dp, transcendentals=work, bytes_accessed=kv + own,
                         programs=batch * q_heads * num_q_blocks, wave_hits=hits), detail)


def block_sparse_dq(*, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                    num_q_blocks: int, tiles: int, block_q: int, block_k: int,
                    itemsize: int = 2, platform: str = "gpu",
                    gqa_shared_reads: bool = False, detail: bool = False):
  """Block-sparse dq, grid `(B, Hq, nq)`: per tile K, V (`6 bq bk Dp` FLOPs);
  per program q, do, lse, delta in and dq out."""
  dp = padded_head_dim(head_dim, platform)
  reads_h = kv_heads if gqa_shared_reads else q_heads
  kv = batch * reads_h * tiles * 2 * block_k * dp * itemsize
  rows = batch * q_heads * num_q_blocks * block_q
  own = rows * (3 * dp * itemsize + 2 * F32_BYTES)
  work = batch * q_heads * tiles * block_q * block_k
  return _out(KernelCost(flops=6 * work * dp, transcendentals=work, bytes_accessed=kv + own,
                         programs=batch * q_heads * num_q_blocks), detail)


def block_sparse_dkv(*, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                     num_k_blocks: int, tiles: int, block_q: int, block_k: int,
                     itemsize: int = 2, platform: str = "gpu", detail: bool = False):
  """Block-sparse dk/dv, grid `(B, Hk, nk)`: for each of the `G` query heads
  of its group and each tile listing the key block, q, do (`bq` rows) and
  lse, delta; `8 bq bk Dp` FLOPs per tile; k, v in and dk, dv out once."""
  dp = padded_head_dim(head_dim, platform)
  _group(q_heads, kv_heads)
  per_tile = block_q * (2 * dp * itemsize + 2 * F32_BYTES)
  rows = batch * q_heads * tiles * per_tile
  own = batch * kv_heads * num_k_blocks * block_k * 4 * dp * itemsize
  work = batch * q_heads * tiles * block_q * block_k
  return _out(KernelCost(flops=8 * work * dp, transcendentals=work, bytes_accessed=rows + own,
                         programs=batch * kv_heads * num_k_blocks), detail)


# ----------------------------------------------------------------- stripes


def stripe_visits(deltas, *, q_blocks: int, block_q: int, kv_len: int) -> int:
  """(query block, stripe) pairs the span-search visits per (batch, kv head).

  deltas: int `[S]`, anchor = query row + delta (`q_offset + 1 - f`). A
  block of rows `[i0, i0 + block_q)` visits the stripes with an anchor in
  `[0, kv_len)` for some row: `-(i0 + block_q - 1) <= delta < kv_len - i0`.
  """
  d = np.sort(np.asarray(deltas, np.int64))
  i0 = np.arange(q_blocks, dtype=np.int64) * block_q
  lo = np.searchsorted(d, -(i0 + block_q - 1), side="left")
  hi = np.searchsorted(d, kv_len - i0, side="left")
  return int(np.maximum(hi - lo, 0).sum())


def ppa_stripe_visits(far_offsets, *, q_len: int, kv_len: int, q_offset: int, block: int,
                      transposed: bool = False) -> int:
  """(block, far stripe) pairs a PPA kernel visits per (batch, head).

  Query `i` meets key `q_offset + i - f` for far offset `f`. A query block
  `[i0, i0 + block)` (forward, dq) visits the offsets with a key in
  `[0, min(kv_len, q_offset + q_len) - 1]` for some row; a key block
  `[x0, x0 + block)` (`transposed`: dk/dv) those with a query in
  `[0, q_len)` for some key."""
  d = np.sort(q_offset - np.asarray(far_offsets, np.int64).reshape(-1))   # key - query
  if transposed:
    x0 = np.arange(_cdiv(kv_len, block), dtype=np.int64) * block
    lo, hi = x0 - q_len + 1, x0 + block               # query x - d in [0, q_len)
  else:
    i0 = np.arange(_cdiv(q_len, block), dtype=np.int64) * block
    kmax = min(kv_len - 1, q_offset + q_len - 1)
    lo, hi = -(i0 + block - 1), kmax - i0 + 1          # key i + d in [0, kmax]
  count = np.searchsorted(d, hi, side="left") - np.searchsorted(d, lo, side="left")
  return int(np.maximum(count, 0).sum())


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
  dp = padded_head_dim(head_dim, platform)
  nq = _cdiv(q_len, block_q)
  reads_h = kv_heads if gqa_shared_reads else q_heads
  visits = nq * far_offsets if visits is None else visits
  band = batch * reads_h * band_tiles * 2 * block_k * dp * itemsize
  stripes = (batch * reads_h * visits * 2 * stripe_rows(block_q, platform, unit)
             * dp * itemsize)
  own = batch * q_heads * nq * block_q * (2 * dp * itemsize + F32_BYTES)
  mm = batch * q_heads * band_tiles * block_q * block_k
  rw = batch * q_heads * visits * block_q
  return _out(KernelCost(flops=4 * mm * dp, vector_flops=4 * rw * dp,
                         transcendentals=mm + rw, bytes_accessed=int(band + stripes + own),
                         programs=batch * reads_h * nq), detail)


def ppa_dq(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int,
           band_tiles: int, far_offsets: int, block_q: int = 64, block_k: int = 64,
           itemsize: int = 2, platform: str = "gpu", unit: int = 16,
           gqa_shared_reads: bool = True, visits: int | None = None,
           detail: bool = False):
  """PPA dq, grid `(B, Hk, nq)` (as `ppa_fwd`, `visits` too): the forward's
  loads plus do, lse, delta; 6 FLOPs per entry and head_dim element; float32
  dq out."""
  dp = padded_head_dim(head_dim, platform)
  nq = _cdiv(q_len, block_q)
  reads_h = kv_heads if gqa_shared_reads else q_heads
  visits = nq * far_offsets if visits is None else visits
  band = batch * reads_h * band_tiles * 2 * block_k * dp * itemsize
  stripes = (batch * reads_h * visits * 2 * stripe_rows(block_q, platform, unit)
             * dp * itemsize)
  own = batch * q_heads * nq * block_q * (2 * dp * itemsize + dp * F32_BYTES + 2 * F32_BYTES)
  mm = batch * q_heads * band_tiles * block_q * block_k
  rw = batch * q_heads * visits * block_q
  return _out(KernelCost(flops=6 * mm * dp, vector_flops=6 * rw * dp,
                         transcendentals=mm + rw, bytes_accessed=int(band + stripes + own),
                         programs=batch * reads_h * nq), detail)


def ppa_dkv(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, kv_len: int,
            band_chunks_t: int, far_offsets: int, block_q: int = 64, block_k: int = 64,
            itemsize: int = 2, platform: str = "gpu", unit: int = 16,
            visits: int | None = None, detail: bool = False):
  """PPA dk/dv, grid `(B, Hk, nk)`: per query head of the group, the band's
  query chunks (`band_chunks_t`, `block_q` rows of q, do, lse, delta each;
  8 FLOPs per entry and head_dim element) and the far stripes with a query
  in range (`block_k` query rows; `visits` (key block, stripe) pairs per
  (batch, query head), `ppa_stripe_visits(..., transposed=True)`; None:
  every stripe in every block); k, v in, float32 dk, dv out."""
  dp = padded_head_dim(head_dim, platform)
  nk = _cdiv(kv_len, block_k)
  visits = nk * far_offsets if visits is None else visits
  row_b = 2 * dp * itemsize + 2 * F32_BYTES
  band = batch * q_heads * band_chunks_t * block_q * row_b
  stripes = batch * q_heads * visits * stripe_rows(block_k, platform, unit) * row_b
  own = batch * kv_heads * nk * block_k * (2 * dp * itemsize + 2 * dp * F32_BYTES)
  mm = batch * q_heads * band_chunks_t * block_q * block_k
  rw = batch * q_heads * visits * block_k
  return _out(KernelCost(flops=8 * mm * dp, vector_flops=8 * rw * dp,
                         transcendentals=mm + rw, bytes_accessed=int(band + stripes + own),
                         programs=batch * kv_heads * nk), detail)


# -------------------------------------------------------------------- span


def span_fwd(*, batch: int, heads: int, head_dim: int, rows: int, key_blocks: int,
             block_q: int = 64, block_k: int = 64, itemsize: int = 2,
             platform: str = "gpu", wave_key_blocks: int | None = None,
             detail: bool = False):
  """Interval attention forward (`span.interval_attention`), grid
  `(B, H, rows / bq)` with `H` the kv heads.

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
  (batch, kv head), summed over waves (the wave model, `KernelCost`).

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
  (batch, kv head): rows are ordered (head, query), so a tile holds
  `block_q` consecutive queries of one of the `group` heads, whose window
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
  """Expected key blocks of the span call, per (batch, kv head).

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
  """Interval attention dk/dv kernel, grid `(B, H, nkb)`, looping over
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
             detail: bool = False):
  """Interval attention backward: `span_dq` plus `span_dkv` (`tile_visits_t`
  default: the forward's visits). `key_blocks`, `tile_visits_t`: totals over
  the grid (all batches, heads)."""
  kw = dict(batch=batch, heads=heads, head_dim=head_dim, block_q=block_q, block_k=block_k,
            itemsize=itemsize, platform=platform, detail=True)
  tv = key_blocks if tile_visits_t is None else tile_visits_t
  total = (span_dq(rows=rows, key_blocks=key_blocks, **kw)
           + span_dkv(kv_len=kv_len, tile_visits_t=tv, **kw))
  return _out(total, detail)


# ------------------------------------------------------------------ decode


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
  kv = batch * kv_heads * tiles * 2 * tile * dp * itemsize
  own = batch * kv_heads * rp * (dp * itemsize + (dp + 2) * F32_BYTES)
  work = batch * kv_heads * tiles * rp * tile
  return _out(KernelCost(flops=4 * work * dp, transcendentals=work,
                         bytes_accessed=kv + own + _split_overhead(batch, kv_heads, rp, dp,
                                                                   num_splits),
                         programs=batch * kv_heads * num_splits), detail)


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
  kv = batch * kv_heads * stripes * 2 * win * dp * itemsize
  own = batch * kv_heads * rp * (dp * itemsize + (dp + 2) * F32_BYTES)
  work = batch * kv_heads * stripes * rp * win
  return _out(KernelCost(flops=4 * work * dp, transcendentals=work,
                         bytes_accessed=kv + own + _split_overhead(batch, kv_heads, rp, dp,
                                                                   num_splits),
                         programs=batch * kv_heads * num_splits), detail)


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
