"""TPU (Mosaic) variant of the interval-attention kernels.

Layout (prepared by `pallas_kernels.span.ops`): rows `q, do: [B, H, R, Dp]`
(`H` row heads), `k, v: [B, Hk, Lk, Dp]` (row head `h` reads kv head
`h // (H / Hk)`) with `R % block_q == 0`, `Lk % block_k == 0`,
`Dp % 128 == 0`; tables int32 `[B, H, 2, N]` (entry `i` is column `i`:
lane-dense, so XLA:TPU builds them without relayouts).

Per-row vectors (row bounds `lo`, `hi`, statistics `lse`, `delta`) are
`[B, H, R]` arrays, passed as they are: XLA:TPU stores them lane-dense (tile
`(H, 128)` for small `H`), and the kernels take `(H, block_q)` blocks of
them (every row head's entries for one tile; the (8, 128) rule then needs
`block_q % 128 == 0` or one tile for all rows, `check_block_q`). Two layouts
are worse: `[B, H, R, 1]` (what these kernels had) is padded to 128 lanes,
128 times the data (GBs each at a million rows); a reshape to one
`(1, block_q)` row per tile (`[B, H, R / block_q, 1, block_q]`) is a
relayout that XLA:TPU compiles into straight-line code linear in `R`
(deviceless v5p, interval attention grad at 8M rows: 90 CPU s against 5).
In the kernel, head `h`'s row is a masked sum over sublanes (`_head_row`)
and the forward and dq tile math gets it as a `[block_q, 1]` column by
`pallas_kernels.common.to_column` (a diagonal sum: a reshape lowers to a
sublane gather v4 lacks); dk/dv work on transposed tiles, where the row is
what the math needs.

* tables: each grid step gets the SMEM block (`2 x 128` int32) holding its
  own table column (`_table_spec`), not the whole table: scalar prefetch would
  copy every table entry into SMEM, which is small, and the tables grow with
  the sequence (rows / block_q tiles per row head). The kernels read their
  loop bounds from that block.
* forward / dq: grid `(B, tiles, H)`, heads innermost (`arbitrary`), so a
  tile's `(H, block_q)` vector blocks are fetched once and the forward's
  lse block is written back once, after every head has written its row; a
  row tile of q / do / o / dq is a BlockSpec block; the tile's key blocks
  are DMAed from HBM (`memory_space=ANY`) one at a time at
  `pl.multiple_of(c * block_k, block_k)` (aligned by construction: tiles
  start at a key block, never at a raw span start; extra rows are masked).
  A tile's key blocks are those of its own row head, so no grid order keeps
  them resident for another grid step.
* dk/dv: grid `(B, Hk, key blocks)`; the key block is a BlockSpec block,
  and for each of the kv head's row heads in turn, the row tiles that visit
  it (a contiguous tile range from that head's table, all of the heads'
  table columns in one SMEM block) are DMAed from HBM at `t * block_q`
  (aligned; vectors: the tile's lanes of an aligned group of 8 row heads,
  or of all `H` when `H % 8`).

dq, dk and dv accumulate in float32 in the kernel (one grid step sees all
of an output block's terms) and are written in the input's dtype.

The DMAs are double-buffered: the copies of step `i + 1` are in flight while
step `i` computes. dk/dv accumulate over every row of every row head of
the kv head, i.e. over the query heads of its group, in the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.span import common
from pallas_kernels.common import F32, pallas_call, to_column, to_row


def _pipelined(count, copies, body, init):
  """`fori_loop(0, count, ...)` with the DMAs of step `i + 1` in flight while
  step `i` computes (two buffer slots).

  `copies(i, slot)`: the step's async-copy descriptors into buffer `slot`;
  `body(i, slot, carry)`: the compute once they have landed.
  """
  @pl.when(count > 0)
  def _():
    for cp in copies(0, 0):
      cp.start()

  def step(i, carry):
    slot = i % 2

    @pl.when(i + 1 < count)
    def _():
      for cp in copies(i + 1, 1 - slot):
        cp.start()

    for cp in copies(i, slot):
      cp.wait()
    return body(i, slot, carry)

  return jax.lax.fori_loop(0, count, step, init)


TABLE_LANES = 128   # table columns per SMEM block (the (8, 128) rule: full x 128)


def table_blocks(tbl):
  """`[B, H, 2, N]` -> `[B, H, 2, ceil(N / 128) * 128]` (zero-padded) for `_table_spec`."""
  n = tbl.shape[-1]
  return jnp.pad(tbl, ((0, 0), (0, 0), (0, 0), (0, -(-n // TABLE_LANES) * TABLE_LANES - n)))


def _table_spec(tiles_first: bool = False, heads: int | None = None):
  """Grid step `(b, h, i)` (`tiles_first`: `(b, i, h)`) gets the SMEM block
  holding table column `i`; with `heads`, that of the `heads` table heads
  `h * heads ...` (`[heads, 2, 128]`)."""
  if tiles_first:
    index = lambda bb, ii, hh: (bb, hh, 0, ii // TABLE_LANES)  # noqa: E731
  else:
    index = lambda bb, hh, ii: (bb, hh, 0, ii // TABLE_LANES)  # noqa: E731
  return pl.BlockSpec((None, heads, 2, TABLE_LANES), index, memory_space=pltpu.SMEM)


def _table_entry(tbl_ref, i, head=None):
  """Entry `i` of the SMEM block `_table_spec` picks (`head`: of table head
  `head` of a `[heads, 2, 128]` block)."""
  ref = tbl_ref if head is None else tbl_ref.at[head]
  return ref[0, i % TABLE_LANES], ref[1, i % TABLE_LANES]


def _row_loop(b, h, tlo, thi, k_hbm, v_hbm, kbuf, vbuf, sem, body, init, block_k):
  """Runs `body(k_start, k, v, carry)` over the key blocks of `[tlo, thi]`.

  `kbuf`, `vbuf`: VMEM `[2, block_k, Dp]`; `sem`: DMA semaphores `[2, 2]`.
  """
  first = tlo // block_k
  count = jnp.where(thi >= tlo, thi // block_k - first + 1, 0)

  def k_start_of(i):
    return pl.multiple_of((first + i) * block_k, block_k)

  def copies(i, slot):
    rows = pl.ds(k_start_of(i), block_k)
    return (pltpu.make_async_copy(k_hbm.at[b, h, rows, :], kbuf.at[slot], sem.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[b, h, rows, :], vbuf.at[slot], sem.at[1, slot]))

  def compute(i, slot, carry):
    k_start = k_start_of(i)
    k = common.clean_rows(kbuf[slot], k_start, tlo, thi)
    v = common.clean_rows(vbuf[slot], k_start, tlo, thi)
    return body(k_start, k, v, carry)

  return _pipelined(count, copies, compute, init)


def check_block_q(block_q: int, rows: int):
  """Compiled TPU kernels take per-row vectors in `(H, block_q)` lane blocks:
  `block_q` must be a multiple of 128 unless one tile holds every row (the
  interpreters accept any `block_q`)."""
  if block_q % 128 and block_q != rows:
    raise ValueError(f"block_q={block_q} with {rows} rows: the TPU span kernels need a "
                     "multiple of 128 (lane-dense per-row vectors), or one tile for all "
                     "rows.")


def _vec_spec(block_q: int, heads: int):
  """Grid step `(b, t, h)` gets tile `t` of every head of a `[B, H, R]` vector."""
  return pl.BlockSpec((None, heads, block_q), lambda bb, tt, hh: (bb, 0, tt))


def _head_row(block, h):
  """Row `h` of an `[H, n]` block as `[1, n]`: a masked sum over sublanes
  (exact), not a dynamic sublane slice."""
  i = jax.lax.broadcasted_iota(jnp.int32, block.shape, 0)
  return jnp.sum(jnp.where(i == h, block, jnp.zeros((), block.dtype)), axis=0, keepdims=True)


def _head_column(ref, h):
  """Head `h`'s entries of an `(H, block_q)` vector block as a `[block_q, 1]` column."""
  return to_column(_head_row(ref[...], h))


def _fwd_kernel(tbl_ref, q_ref, lo_ref, hi_ref, k_hbm, v_hbm, o_ref, lse_ref,
                kbuf, vbuf, sem, *, scale, block_q, block_k, kv_group):
  b, t, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tlo, thi = _table_entry(tbl_ref, t)
  q = q_ref[...]
  lo, hi = _head_column(lo_ref, h), _head_column(hi_ref, h)
  body = common.fwd_body(q, lo, hi, scale=scale, block_q=block_q, block_k=block_k)

  state = _row_loop(b, h // kv_group, tlo, thi, k_hbm, v_hbm, kbuf, vbuf, sem, body,
                    common.init_state(block_q, q.shape[-1]), block_k)
  o, lse = common.fwd_finish(state)
  o_ref[...] = o.astype(o_ref.dtype)
  # The (H, block_q) lse block stays in VMEM while the innermost grid axis
  # runs over the heads; each head writes its own row.
  heads = jax.lax.broadcasted_iota(jnp.int32, lse_ref.shape, 0)
  lse_ref[...] = jnp.where(heads == h, to_row(lse), lse_ref[...])


def _dq_kernel(tbl_ref, q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, k_hbm,
               v_hbm, dq_ref, kbuf, vbuf, sem, *, scale, block_q, block_k, kv_group):
  b, t, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tlo, thi = _table_entry(tbl_ref, t)
  q, do = q_ref[...], do_ref[...]
  lse, delta, lo, hi = (_head_column(r, h) for r in (lse_ref, delta_ref, lo_ref, hi_ref))
  body = common.dq_body(q, do, lse, delta, lo, hi, scale=scale, block_q=block_q,
                        block_k=block_k)

  dq = _row_loop(b, h // kv_group, tlo, thi, k_hbm, v_hbm, kbuf, vbuf, sem, body,
                 jnp.zeros(q.shape, F32), block_k)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(kv_tbl_ref, k_ref, v_ref, q_hbm, do_hbm, lse_hbm, delta_hbm,
                lo_hbm, hi_hbm, dk_ref, dv_ref, qbuf, dobuf, lsebuf, deltabuf, lobuf,
                hibuf, sem, *, scale, block_q, block_k, kv_group, vec_heads):
  """Grid step `(b, h, c)`: kv head `h`, key block `c`; loops over the
  `kv_group` row heads of kv head `h` and, for each, over its table's tiles.
  The vector DMAs bring `vec_heads` rows (an aligned group of 8 row heads,
  or all of them) holding the row head's."""
  b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_start = c * block_k
  prec = common.precision_for(k.dtype)
  srcs = (q_hbm, do_hbm, lse_hbm, delta_hbm, lo_hbm, hi_hbm)
  bufs = (qbuf, dobuf, lsebuf, deltabuf, lobuf, hibuf)

  def one_head(g, carry):
    hr = h * kv_group + g                                  # the row head
    base = pl.multiple_of(hr // vec_heads * vec_heads, vec_heads)
    t0, count = _table_entry(kv_tbl_ref, c, g)

    def copies(i, slot):
      rows = pl.ds(pl.multiple_of((t0 + i) * block_q, block_q), block_q)
      # q, do: the tile's rows of row head hr; vectors: its lanes of vec_heads heads.
      windows = [src.at[b, hr, rows, :] for src in srcs[:2]]
      windows += [src.at[b, pl.ds(base, vec_heads), rows] for src in srcs[2:]]
      return tuple(pltpu.make_async_copy(w, dst.at[slot], sem.at[j, slot])
                   for j, (w, dst) in enumerate(zip(windows, bufs)))

    def compute(i, slot, carry):
      dk, dv = carry
      lse, delta, lo, hi = (_head_row(buf[slot], hr - base) for buf in bufs[2:])
      mask_t = common.row_mask_t(k_start, lo, hi, block_k, block_q)
      return common.dkv_update(dk, dv, qbuf[slot], dobuf[slot], k, v, lse, delta, mask_t,
                               scale=scale, precision=prec)

    return _pipelined(count, copies, compute, carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = jax.lax.fori_loop(0, kv_group, one_head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _kv_scratch(block_k, dp, dtype):
  """Two K and two V buffers (double-buffered DMA) and their semaphores."""
  return [pltpu.VMEM((2, block_k, dp), dtype), pltpu.VMEM((2, block_k, dp), dtype),
          pltpu.SemaphoreType.DMA((2, 2))]


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _row_specs(block_q: int, dp: int, heads: int):
  """BlockSpecs of the forward / dq grid `(B, tiles, H)`: a `[B, H, R, Dp]`
  row tile and an `(H, block_q)` vector block (`_vec_spec`)."""
  return (pl.BlockSpec((None, None, block_q, dp), lambda bb, tt, hh: (bb, hh, tt, 0)),
          _vec_spec(block_q, heads))


def fwd(q, k, v, lo, hi, tile_tbl, *, scale, block_q, block_k, interpret,
        cost_estimate=None):
  """Forward: `(o [B, H, R, Dp] in q's dtype, lse [B, H, R] f32)`.

  `lo`, `hi`: int32 `[B, H, R]`; `tile_tbl`: int32 `[B, H, 2, R / block_q]`
  (tile key bounds). Grid `(B, tiles, H)`: heads innermost, so the
  `(H, block_q)` vector blocks are fetched (and lse written back) once per
  tile.
  """
  b, h, r, dp = q.shape
  if not interpret:
    check_block_q(block_q, r)
  row, vec = _row_specs(block_q, dp, h)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             kv_group=h // k.shape[1])
  return pallas_call(
      kernel, grid=(b, r // block_q, h),
      in_specs=[_table_spec(True), row, vec, vec,
                pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[row, vec],
      scratch_shapes=_kv_scratch(block_k, dp, k.dtype),
      out_shape=[jax.ShapeDtypeStruct((b, h, r, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, h, r), F32)],
      compiler_params=_params(), interpret=interpret,
      cost_estimate=cost_estimate)(table_blocks(tile_tbl), q, lo, hi, k, v)


def dq(q, k, v, do, lse, delta, lo, hi, tile_tbl, *, scale, block_q, block_k, interpret,
       cost_estimate=None):
  """dq `[B, H, R, Dp]` in q's dtype; `lse`, `delta`, `lo`, `hi`: `[B, H, R]`.
  Grid `(B, tiles, H)` as the forward."""
  b, h, r, dp = q.shape
  if not interpret:
    check_block_q(block_q, r)
  row, vec = _row_specs(block_q, dp, h)
  kernel = functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             kv_group=h // k.shape[1])
  return pallas_call(
      kernel, grid=(b, r // block_q, h),
      in_specs=[_table_spec(True), row, row, vec, vec, vec, vec,
                pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=row,
      scratch_shapes=_kv_scratch(block_k, dp, k.dtype),
      out_shape=jax.ShapeDtypeStruct((b, h, r, dp), q.dtype),
      compiler_params=_params(), interpret=interpret,
      cost_estimate=cost_estimate)(
          table_blocks(tile_tbl), q, do, lse, delta, lo, hi, k, v)


def dkv(q, k, v, do, lse, delta, lo, hi, tile_tbl, kv_tbl, *, scale, block_q, block_k,
        interpret, cost_estimate=None):
  """`(dk, dv)` `[B, Hk, Lk, Dp]` in k's and v's dtypes.

  `kv_tbl`: int32 `[B, H, 2, Lk / block_k]`: first tile and tile count per
  row head and key block (`common.key_block_tiles`). Grid `(B, Hk, key
  blocks)`: each step loops over its kv head's `H / Hk` row heads.
  """
  del tile_tbl  # the kv table's tile ranges suffice; row masks do the rest.
  b, h, r, dp = q.shape
  if not interpret:
    check_block_q(block_q, r)
  hk, lk = k.shape[1], k.shape[2]
  group = h // hk
  vec_heads = 8 if h % 8 == 0 else h
  blk = lambda bb, hh, cc: (bb, hh, cc, 0)  # noqa: E731
  kernel = functools.partial(_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             kv_group=group, vec_heads=vec_heads)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  vec_buf = lambda dtype: pltpu.VMEM((2, vec_heads, block_q), dtype)  # noqa: E731
  return pallas_call(
      kernel, grid=(b, hk, lk // block_k),
      in_specs=[_table_spec(heads=group), pl.BlockSpec((None, None, block_k, dp), blk),
                pl.BlockSpec((None, None, block_k, dp), blk)] + [hbm] * 6,
      out_specs=[pl.BlockSpec((None, None, block_k, dp), blk),
                 pl.BlockSpec((None, None, block_k, dp), blk)],
      scratch_shapes=[pltpu.VMEM((2, block_q, dp), q.dtype),
                      pltpu.VMEM((2, block_q, dp), do.dtype),
                      vec_buf(F32), vec_buf(F32), vec_buf(jnp.int32), vec_buf(jnp.int32),
                      pltpu.SemaphoreType.DMA((6, 2))],
      out_shape=[jax.ShapeDtypeStruct((b, hk, lk, dp), k.dtype),
                 jax.ShapeDtypeStruct((b, hk, lk, dp), v.dtype)],
      compiler_params=_params(), interpret=interpret,
      cost_estimate=cost_estimate)(
          table_blocks(kv_tbl), k, v, q, do, lse, delta, lo, hi)
