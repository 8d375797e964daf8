"""GPU (Pallas Triton) variant of the interval-attention kernels.

Same arrays and tables as the TPU variant (`tpu.py`: `H` row heads over
`Hk` kv heads; forward and dq grids `(B, H, tiles)` here, dk/dv `(B, Hk,
key blocks)` looping over the kv head's row heads), with `Dp` a power of
two >= 16 and `block_q`, `block_k` powers of two; per-row vectors (`lo`, `hi`, `lse`, `delta`) are
`[B, H, R]` arrays loaded as `[block_q]` blocks (no lane padding on GPU;
reshaped to columns or rows in registers). Tables are ordinary int32 inputs
read with scalar indices; K/V (forward, dq) and the row tensors (dk/dv) are
whole-sequence refs of the program's (batch, head), sliced at aligned
dynamic offsets (`pl.ds(c * block_k, block_k)`); every window starts at a
row >= 0 and ends inside the padded array, so no load is masked or clamped.
dq, dk, dv accumulate in float32 and are written in the input's dtype; dk/dv
work on transposed tiles like the TPU variant.

Query rows by index (`qi`, optional): `q` is then the `[B, H, Rq, Dp]`
source rows of the program's (batch, head), a whole-sequence ref, and row
`r` of the tile math is source row `qi[r]` (int32 `[B, H, R]`), loaded by a
gather in the kernel; the caller materializes no `[R, Dp]` copy of the rows
(span attention's pairs repeat each query row once per slot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.span import common
from pallas_kernels.common import F32, block_first_call, block_first_id

_I = jnp.int32


def _load(ref, start, size, head=None):
  """Rows `[start, start + size)` of a `[n, D]` or `[n]` ref (`head`: of
  head `head` of a `[heads, n, ...]` ref; one indexer, as Triton needs)."""
  rows = pl.ds(start, size)
  return pltriton.load(ref.at[rows] if head is None else ref.at[head, rows])


def _column(x):
  return x.reshape(x.shape[0], 1)


def _row(x):
  return x.reshape(1, x.shape[0])


def _gather(q_ref, idx, head=None):
  """Rows `idx` (int32 `[n]`) of a `[Rq, Dp]` ref (`head`: of head `head` of
  a `[heads, Rq, Dp]` ref): one gathered load, one indexer."""
  return q_ref[idx] if head is None else q_ref[head, idx]


def _q_tile(q_ref, qi_ref):
  """The tile's query rows: the `[block_q, Dp]` block, or (`qi_ref` not None)
  the source rows its `[block_q]` index block names."""
  return q_ref[...] if qi_ref is None else _gather(q_ref, qi_ref[...])


def _tile_entry(tbl_ref, t, head=None):
  """Entry `t` of a `[2, n]` table ref (`head`: of head `head` of a
  `[heads, 2, n]` ref; one indexer)."""
  if head is None:
    return tbl_ref[_I(0), t], tbl_ref[_I(1), t]
  return tbl_ref[head, _I(0), t], tbl_ref[head, _I(1), t]


def _row_loop(tlo, thi, k_ref, v_ref, body, init, block_k):
  first = tlo // block_k
  count = jnp.where(thi >= tlo, thi // block_k - first + 1, 0)

  def step(i, carry):
    k_start = (first + i) * block_k
    k = common.clean_rows(_load(k_ref, k_start, block_k), k_start, tlo, thi)
    v = common.clean_rows(_load(v_ref, k_start, block_k), k_start, tlo, thi)
    return body(k_start, k, v, carry)

  return jax.lax.fori_loop(0, count, step, init)


def _fwd_kernel(tbl_ref, q_ref, *refs, scale, block_q, block_k, gather):
  qi_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
  lo_ref, hi_ref, k_ref, v_ref, o_ref, lse_ref = refs
  tlo, thi = _tile_entry(tbl_ref, block_first_id(2))
  q = _q_tile(q_ref, qi_ref)
  lo, hi = _column(lo_ref[...]), _column(hi_ref[...])
  body = common.fwd_body(q, lo, hi, scale=scale, block_q=block_q, block_k=block_k)

  state = _row_loop(tlo, thi, k_ref, v_ref, body, common.init_state(block_q, q.shape[-1]),
                    block_k)
  o, lse = common.fwd_finish(state)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(block_q)


def _dq_kernel(tbl_ref, q_ref, *refs, scale, block_q, block_k, gather):
  qi_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
  do_ref, lse_ref, delta_ref, lo_ref, hi_ref, k_ref, v_ref, dq_ref = refs
  tlo, thi = _tile_entry(tbl_ref, block_first_id(2))
  q, do = _q_tile(q_ref, qi_ref), do_ref[...]
  lse, delta, lo, hi = (_column(r[...]) for r in (lse_ref, delta_ref, lo_ref, hi_ref))
  body = common.dq_body(q, do, lse, delta, lo, hi, scale=scale, block_q=block_q,
                        block_k=block_k)

  dq = _row_loop(tlo, thi, k_ref, v_ref, body, jnp.zeros(q.shape, F32), block_k)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(kv_tbl_ref, k_ref, v_ref, q_ref, *refs, scale, block_q, block_k, gather,
                kv_group):
  """Program `(b, h, c)`: kv head `h`, key block `c`; loops over the
  `kv_group` row heads of kv head `h` (the row refs hold all of them:
  `[kv_group, ...]`) and, for each, over its table's tiles."""
  qi_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
  do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
  c = block_first_id(2)
  k, v = k_ref[...], v_ref[...]
  k_start = c * block_k
  prec = common.precision_for(k.dtype)

  def one_head(g, carry):
    t0, count = _tile_entry(kv_tbl_ref, c, g)

    def step(i, carry):
      dk, dv = carry
      r0 = (t0 + i) * block_q
      rows = lambda ref: _load(ref, r0, block_q, g)  # noqa: E731
      vec = lambda ref: _row(rows(ref))  # noqa: E731
      mask_t = common.row_mask_t(k_start, vec(lo_ref), vec(hi_ref), block_k, block_q)
      q = rows(q_ref) if qi_ref is None else _gather(q_ref, rows(qi_ref), g)
      return common.dkv_update(dk, dv, q, rows(do_ref), k, v, vec(lse_ref),
                               vec(delta_ref), mask_t, scale=scale, precision=prec)

    return jax.lax.fori_loop(0, count, step, carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = jax.lax.fori_loop(0, kv_group, one_head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


F32_BLOCKS = (32, 16)   # float32 (block_q, block_k) on the GPU
BWD_WIDE_BLOCKS = (32, 32)   # 16-bit backward (block_q, block_k) at padded head_dim > 128
FWD_BLOCKS = (256, 32)       # 16-bit forward (block_q, block_k) at padded head_dim <= 128
FWD_WIDE_BLOCKS = (128, 64)  # 16-bit forward at padded head_dim > 128


def default_blocks(dtype, *, forward: bool = False, head_dim: int = 128) -> tuple[int, int]:
  """Default `(block_q, block_k)` per input dtype and pass (docs/kernels_span.md).

  16-bit: 64 x 64, except the forward's `FWD_BLOCKS`: 256 pair rows by 32
  keys at padded head_dim <= 128 (128 x 64 above). A tile loads about one
  span of K/V plus its rows' start spread, so each doubling of the rows
  halves the K/V tiles loaded per pair (the roofline model; not measured);
  16 warps hold the `[256, Dp]` float32 accumulator in registers (`_params`):
  127 registers, no spill at head_dim 128 in the deviceless H100 compile,
  where 256 x 64 spilled 52 B. float32 dots run at HIGHEST precision
  (`common.precision_for`: the reference is exact float32), which Triton
  lowers to CUDA-core FMA products where a thread holds whole head_dim rows
  of both operands; 64 x 64 tiles then spilled 11-28 KB per kernel in the
  deviceless H100 compile report, so float32 takes `F32_BLOCKS` in every pass.
  16-bit backward at padded `head_dim > 128`: `BWD_WIDE_BLOCKS` (64 x 64
  spilled 240 B in dk/dv and 40 B in dq at head_dim 256).
  """
  if jnp.dtype(dtype).itemsize >= 4:
    return F32_BLOCKS
  if forward:
    return FWD_BLOCKS if head_dim <= 128 else FWD_WIDE_BLOCKS
  return BWD_WIDE_BLOCKS if head_dim > 128 else (64, 64)


def _params(dp, dtype, block_q=64):
  """Triton launch parameters: float32 (small tiles, see `default_blocks`)
  16 warps and one stage; 16-bit 16 warps for 256-row tiles (four
  warpgroups of 64 rows), 4 for `[<=64, <=64]` tiles, else 8."""
  if jnp.dtype(dtype).itemsize >= 4:
    return pltriton.CompilerParams(num_warps=16, num_stages=1)
  warps = 16 if block_q >= 256 else 4 if dp <= 64 and block_q <= 64 else 8
  return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def _seq(n, dp, heads=None, kv_group=1):
  """Whole-sequence block of the program's (batch, head): of kv head
  `head // kv_group`; `heads`: of the `heads` heads `head * heads ...`
  (`[heads, n, dp]`)."""
  return pl.BlockSpec((None, heads, n, dp), lambda bb, hh, tt: (bb, hh // kv_group, 0, 0))


def _seq_vec(n, heads=None):
  """Whole-sequence `[n]` vector of the program's (batch, head) (`heads`: as `_seq`)."""
  return pl.BlockSpec((None, heads, n), lambda bb, hh, tt: (bb, hh, 0))


def _tbl(n, heads=None):
  """The whole `[2, n]` table of the program's (batch, head) (`heads`: as `_seq`)."""
  return pl.BlockSpec((None, heads, 2, n), lambda bb, hh, tt: (bb, hh, 0, 0))


def _q_specs(q, qi, block_q, row):
  """`(specs, args)` of the query rows: a `[block_q, Dp]` block of `q`, or
  (`qi` not None) the whole source `q` and a `[block_q]` block of `qi`."""
  if qi is None:
    return [pl.BlockSpec((None, None, block_q, q.shape[3]), row)], [q]
  vec = pl.BlockSpec((None, None, block_q), lambda bb, hh, tt: (bb, hh, tt))
  return [_seq(q.shape[2], q.shape[3]), vec], [q, qi]


def fwd(q, k, v, lo, hi, tile_tbl, *, scale, block_q, block_k, interpret,
        cost_estimate=None, qi=None):
  """Forward: `(o [B, H, R, Dp] in q's dtype, lse [B, H, R] f32)`; `R` rows
  of `lo` (`qi`: rows by index, module docstring)."""
  b, h, r = lo.shape
  dp = q.shape[3]
  nt, lk = r // block_q, k.shape[2]
  row = lambda bb, hh, tt: (bb, hh, tt, 0)  # noqa: E731
  vec = pl.BlockSpec((None, None, block_q), lambda bb, hh, tt: (bb, hh, tt))
  q_specs, q_args = _q_specs(q, qi, block_q, row)
  kv_seq = _seq(lk, dp, kv_group=h // k.shape[1])      # the row head's kv head
  kernel = functools.partial(_fwd_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             gather=qi is not None)
  return block_first_call(
      kernel, grid=(b, h, nt),
      in_specs=[_tbl(nt), *q_specs, vec, vec, kv_seq, kv_seq],
      out_specs=[pl.BlockSpec((None, None, block_q, dp), row), vec],
      out_shape=[jax.ShapeDtypeStruct((b, h, r, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, h, r), F32)],
      compiler_params=_params(dp, q.dtype, block_q), interpret=interpret,
      cost_estimate=cost_estimate)(
          tile_tbl, *q_args, lo, hi, k, v)


def dq(q, k, v, do, lse, delta, lo, hi, tile_tbl, *, scale, block_q, block_k, interpret,
       cost_estimate=None, qi=None):
  """dq per row `[B, H, R, Dp]` in q's dtype (`R` rows of `do`; `qi`: q's
  rows by index); `lse`, `delta`, `lo`, `hi`: `[B, H, R]`."""
  b, h, r, dp = do.shape
  nt, lk = r // block_q, k.shape[2]
  row = lambda bb, hh, tt: (bb, hh, tt, 0)  # noqa: E731
  vec = pl.BlockSpec((None, None, block_q), lambda bb, hh, tt: (bb, hh, tt))
  q_specs, q_args = _q_specs(q, qi, block_q, row)
  kv_seq = _seq(lk, dp, kv_group=h // k.shape[1])      # the row head's kv head
  kernel = functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             gather=qi is not None)
  return block_first_call(
      kernel, grid=(b, h, nt),
      in_specs=[_tbl(nt), *q_specs, pl.BlockSpec((None, None, block_q, dp), row),
                vec, vec, vec, vec, kv_seq, kv_seq],
      out_specs=pl.BlockSpec((None, None, block_q, dp), row),
      out_shape=jax.ShapeDtypeStruct((b, h, r, dp), q.dtype),
      compiler_params=_params(dp, q.dtype), interpret=interpret,
      cost_estimate=cost_estimate)(
          tile_tbl, *q_args, do, lse, delta, lo, hi, k, v)


def dkv(q, k, v, do, lse, delta, lo, hi, tile_tbl, kv_tbl, *, scale, block_q, block_k,
        interpret, cost_estimate=None, qi=None):
  """`(dk, dv)` `[B, Hk, Lk, Dp]` in k's and v's dtypes (`qi`: q's rows by
  index). Grid `(B, Hk, key blocks)`: a program loops over its kv head's
  `H / Hk` row heads."""
  del tile_tbl  # the kv table's tile ranges suffice; row masks do the rest.
  b, h, r, dp = do.shape
  hk, lk = k.shape[1], k.shape[2]
  g = h // hk
  nkb = lk // block_k
  blk = lambda bb, hh, cc: (bb, hh, cc, 0)  # noqa: E731
  kernel = functools.partial(_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             gather=qi is not None, kv_group=g)
  q_specs = [_seq(q.shape[2], dp, g)] + ([] if qi is None else [_seq_vec(r, g)])
  return block_first_call(
      kernel, grid=(b, hk, nkb),
      in_specs=[_tbl(nkb, g), pl.BlockSpec((None, None, block_k, dp), blk),
                pl.BlockSpec((None, None, block_k, dp), blk),
                *q_specs, _seq(r, dp, g)] + [_seq_vec(r, g)] * 4,
      out_specs=[pl.BlockSpec((None, None, block_k, dp), blk),
                 pl.BlockSpec((None, None, block_k, dp), blk)],
      out_shape=[jax.ShapeDtypeStruct((b, hk, lk, dp), k.dtype),
                 jax.ShapeDtypeStruct((b, hk, lk, dp), v.dtype)],
      compiler_params=_params(dp, q.dtype), interpret=interpret,
      cost_estimate=cost_estimate)(
          kv_tbl, k, v, q, *([] if qi is None else [qi]), do, lse, delta, lo, hi)
