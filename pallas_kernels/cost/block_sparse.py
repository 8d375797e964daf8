"""Cost model of the block-sparse (and dense) kernels (see the package doc)."""

from __future__ import annotations

from pallas_kernels.cost.base import F32_BYTES, KernelCost, _group, _out, padded_head_dim


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


def block_sparse_delta(*, batch: int, q_heads: int, head_dim: int, rows: int,
                       itemsize: int = 2, detail: bool = False):
  """The backward's `delta = rowsum(o * do)` as a kernel (TPU), grid
  `(B, Hq, nq)`: o and do in (`rows` per head, unpadded head_dim), one
  float32 per row out; `2 D` FLOPs per row."""
  n = batch * q_heads * rows
  return _out(KernelCost(vector_flops=2 * n * head_dim,
                         bytes_accessed=n * (2 * head_dim * itemsize + F32_BYTES),
                         programs=batch * q_heads), detail)


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
