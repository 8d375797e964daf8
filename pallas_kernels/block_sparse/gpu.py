"""GPU variant: Pallas Triton kernels (any recent NVIDIA GPU).

Triton has no scalar prefetch: the layout tables are ordinary int32 inputs.
Each pass has its own tile (`GpuBlocks`: forward, dq, dkv, chosen per padded
head_dim and dtype so that none spills registers or exceeds the H100's
227 KiB of shared memory). A band layout's tables are recomputed at the
pass's tile; a table layout's tiles are split into the pass's sub-tiles
(`Spec.sub_q x Spec.sub_k` per layout tile, masks sliced from the layout's
tile masks).

Each program walks its row's slots in two loops without any branch around
the dots: an unmasked loop over the full tiles (`Tables.full_start`,
`num_full`: band layouts compute the run of full blocks from positions,
table layouts list full tiles first) and a masked loop over the rest.
Scores are taken in base 2 (`exp2`, `log2(e) * scale` folded into one
multiply); `lse` stays natural at the interface. K/V of one head stay in HBM
and each step loads one `[block_k, Dp]` slice at a block-aligned start.

  * forward and dq: grid `(B, Hq, nq)`, the last query blocks (the longest
    causal rows) launched first;
  * dkv: grid `(B, Hk, nk)`, loop over the group's query heads and the query
    blocks that list the key block (GQA accumulates in registers).

Block sizes and the padded head_dim are powers of two >= 16 (Triton).
This backend is deprecated upstream in favour of Mosaic GPU; the block logic
lives in `common.py` so a Mosaic GPU variant can sit beside this one
(docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import F32, LANES, LOG2E, Spec, Tables
from pallas_kernels import cost
from pallas_kernels.common import pad_head_dim, block_first_call, block_first_id


@dataclasses.dataclass(frozen=True)
class PassBlocks:
  """One pass's tile `block_q x block_k` and its Triton launch parameters."""

  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  """Tiles of the three passes (each capped at the layout's tile)."""

  fwd: PassBlocks
  dq: PassBlocks
  dkv: PassBlocks


def default_blocks(dp: int, dtype) -> GpuBlocks:
  """Tiles per padded head_dim `dp` and dtype, chosen from the deviceless H100
  compile report (docs/kernels_block_sparse.md): at `dp <= 256` no pass
  spills registers, in 16-bit and float32, and each stays within 227 KiB of
  shared memory.

  float32 dots run at HIGHEST precision, which Triton lowers to CUDA-core
  FMA products (`input_precision="ieee"`): a thread holds whole head_dim rows
  of both operands, so float32 takes small tiles, many warps and one stage.
  """
  if jnp.dtype(dtype).itemsize >= 4:
    if dp <= 128:   # head_dim 64: a 16-row dkv step (32 spilled 8-16 B in table mode)
      # and 4 warps (8 spilled 8 B with diagonal masks, `_sub_tile`'s gather)
      return GpuBlocks(PassBlocks(64, 16, 16, 1), PassBlocks(16 if dp <= 64 else 32, 16, 8, 1),
                       PassBlocks(16, 32, 4, 1) if dp <= 64 else PassBlocks(32, 32, 8, 1))
    return GpuBlocks(PassBlocks(32, 32, 8), PassBlocks(32, 16, 16, 1), PassBlocks(16, 32, 16, 1))
  if dp <= 64:
    return GpuBlocks(PassBlocks(128, 64, 8), PassBlocks(128, 32, 8), PassBlocks(32, 128, 8))
  if dp <= 128:
    return GpuBlocks(PassBlocks(128, 64, 8), PassBlocks(128, 32, 8), PassBlocks(32, 64, 8))
  return GpuBlocks(PassBlocks(64, 64, 8), PassBlocks(32, 32, 8), PassBlocks(32, 64, 8))


def pass_spec(spec: Spec, blocks: PassBlocks) -> Spec:
  """`spec` at the pass's tile (capped at the layout's)."""
  bq, bk = min(blocks.block_q, spec.block_q), min(blocks.block_k, spec.block_k)
  rq, rk = spec.block_q // bq, spec.block_k // bk
  nq, nk = spec.num_q_blocks * rq, spec.num_k_blocks * rk
  if spec.mode == "band":
    return dataclasses.replace(
        spec, block_q=bq, block_k=bk, num_q_blocks=nq, num_k_blocks=nk,
        width=common.band_width(spec.q_len, spec.kv_len, spec.window, bq, bk),
        width_t=common.band_width_t(spec.q_len, spec.kv_len, spec.window, bq, bk, spec.fold))
  return dataclasses.replace(spec, block_q=bq, block_k=bk, num_q_blocks=nq, num_k_blocks=nk,
                             sub_q=rq, sub_k=rk)


def pass_tables(ps: Spec, tabs: Tables) -> Tables:
  """Band tables recomputed at the pass's tile; table layouts keep theirs."""
  if ps.mode != "band":
    return tabs
  return common.band_tables(tabs.q_offset[0], ps, tabs.q_offset[1])


def _cost(kind: str, ps: Spec, x, hk: int):
  """`pl.CostEstimate` of one pass (`pallas_kernels.cost`, static tile count)."""
  b, hq, _, d = x.shape
  kw = dict(batch=b, q_heads=hq, kv_heads=hk, head_dim=d, tiles=common.tile_count(ps),
            block_q=ps.block_q, block_k=ps.block_k, itemsize=x.dtype.itemsize)
  if kind == "dkv":
    return cost.block_sparse_dkv(num_k_blocks=ps.num_k_blocks, **kw)
  fn = cost.block_sparse_fwd if kind == "fwd" else cost.block_sparse_dq
  return fn(num_q_blocks=ps.num_q_blocks, **kw)


def _params(b: PassBlocks):
  return pltriton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages)


def _full(x):
  """BlockSpec holding the whole array (tables, tiles)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _load_rows(ref, start, size):
  return ref[pl.ds(pl.multiple_of(start, size), size), :]


def _split(t, r):
  """`(t // r, t % r)` for `t >= 0` and a static `r` (free when `r == 1`;
  `lax.div`/`lax.rem`: jnp's sign-fixing floor division does not lower)."""
  if r == 1:
    return t, 0
  r = jnp.int32(r)
  return lax.div(t, r), lax.rem(t, r)


def _sub_tile(ps: Spec, tiles_ref, mid, a, c):
  """Table mode: sub-tile `(a, c)` of layout tile mask `mid`, `[bq, bk]`
  (with `diag_masks`, gathered from the mask's diagonal row: entry
  `j - i + block_q - 1` of the layout tile)."""
  bq, bk = ps.block_q, ps.block_k
  if not ps.diag_masks:
    return tiles_ref[mid, pl.ds(a * bq, bq), pl.ds(c * bk, bk)]
  i = lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  j = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return tiles_ref[mid, 0, (c * bk - a * bq + bq * ps.sub_q - 1) + j - i]


def _masked_slot(t, fs, nf):
  """Slot of the `t`-th masked step: slots `< fs`, then those past the full run."""
  return jnp.where(t < fs, t, t + nf)


def _two_loops(n, fs, nf, r, step, carry):
  """Runs `step(slot, sub, masked, carry)` over the full slots unmasked, then
  over the other slots masked; each slot has `r` sub-tiles."""
  def full(t, c):
    slot, sub = _split(t, r)
    return step(slot, sub, False, c)

  def edge(t, c):
    slot, sub = _split(t, r)
    return step(_masked_slot(slot, fs, nf), sub, True, c)

  carry = lax.fori_loop(fs * r, (fs + nf) * r, full, carry)
  return lax.fori_loop(0, (n - nf) * r, edge, carry)


# ------------------------------------------------------------------ forward


def _range_loops(lo, hi, fs, nf, r, step, carry):
  """`_two_loops` restricted to the slots `[lo, hi)`: masked slots before the
  full run, the full run unmasked, masked slots after it."""
  def loop(first, last, masked, carry):
    def body(t, c):
      slot, sub = _split(t, r)
      return step(slot, sub, masked, c)
    return lax.fori_loop(first * r, last * r, body, carry)

  carry = loop(lo, jnp.minimum(fs, hi), True, carry)
  carry = loop(jnp.maximum(fs, lo), jnp.minimum(fs + nf, hi), False, carry)
  return loop(jnp.maximum(fs + nf, lo), hi, True, carry)


def _fwd_step(spec: Spec, blocks, counts, masks, tiles_ref, k_ref, v_ref, q, i, qo, lim):
  """Online-softmax step over one (sub-)tile of query block `i` (base 2)."""
  bk = spec.block_k
  row, a = _split(i, spec.sub_q)
  c2 = spec.scale * LOG2E

  def step(slot, sub, masked, carry):
    acc, m, l = carry
    kb = common.slot_block(spec, blocks, counts, row, slot, spec.width) * spec.sub_k + sub
    k = _load_rows(k_ref, kb * bk, bk)
    v = _load_rows(v_ref, kb * bk, bk)
    vis = None
    if masked:
      tile = (_sub_tile(spec, tiles_ref, masks[row * spec.width + slot], a, sub)
              if spec.mode == "table" else None)
      vis = common.tile_visible(spec, i, kb, qo, tile, lim)
      (v,) = common.zero_unseen(spec, kb, qo, v, kv_limit=lim)
    s = common.dot(q, k, (1, 1)) * c2
    m_new, l_new, p, alpha = common.online_step(s, vis, m, l, exp=jnp.exp2)
    return alpha * acc + common.dot(p.astype(v.dtype), v), m_new, l_new

  return row, step


def _init_state(bq, dp):
  return (jnp.zeros((bq, dp), F32), jnp.full((bq, 1), common.NEG, F32),
          jnp.zeros((bq, 1), F32))


def _fwd_kernel(blocks, counts, masks, fstart, nfull, qo_ref, tiles_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *vis, spec: Spec):
  i = spec.num_q_blocks - 1 - block_first_id(2)
  q = q_ref[...]
  row, step = _fwd_step(spec, blocks, counts, masks, tiles_ref, k_ref, v_ref, q, i,
                        qo_ref[0], qo_ref[1])
  n = counts[row]
  acc, m, l = _two_loops(n, fstart[row], nfull[row], spec.sub_k, step,
                         _init_state(spec.block_q, q.shape[-1]))
  out, lse = common.finish(acc, m, l, base2=True)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]
  if vis:
    vis[0][...] = jnp.full(vis[0].shape, n * spec.sub_k, jnp.int32)


def _split_kernel(blocks, counts, masks, fstart, nfull, qo_ref, tiles_ref, q_ref, k_ref, v_ref,
                  acc_ref, m_ref, l_ref, *, spec: Spec, chunk: int):
  """Decode: program `s` of a row walks slots `[s * chunk, (s + 1) * chunk)`
  and writes its unnormalised state (merged by `_merge_splits`)."""
  i = spec.num_q_blocks - 1 - block_first_id(2)
  q = q_ref[...]
  row, step = _fwd_step(spec, blocks, counts, masks, tiles_ref, k_ref, v_ref, q, i,
                        qo_ref[0], qo_ref[1])
  lo = block_first_id(3) * chunk
  hi = jnp.minimum(lo + chunk, counts[row])
  acc, m, l = _range_loops(lo, hi, fstart[row], nfull[row], spec.sub_k, step,
                           _init_state(spec.block_q, q.shape[-1]))
  acc_ref[...] = acc
  m_ref[...] = m[:, 0]
  l_ref[...] = l[:, 0]


def _merge_splits(acc, m, l):
  """`(out, lse)` from per-split states `acc: [B, H, S, L, D]`, `m, l: [B, H,
  S, L]` (base 2; `lse` natural, `+inf` where no key was visible)."""
  mm = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp2(m - mm)
  acc = jnp.sum(w[..., None] * acc, axis=2)
  l = jnp.sum(w * l, axis=2)
  out, lse = common.finish(acc, mm[:, :, 0, :, None], l[..., None], base2=True)
  return out, lse[..., 0]


MAX_SPLIT_QUERIES = 16
TARGET_PROGRAMS = 2 * 132    # two waves of an H100's SMs


def num_splits(spec: Spec, programs: int) -> int:
  """Splits per row for decode (`q_len <= 16`): enough programs to fill the
  device, at least 4 slots per split; 1 otherwise."""
  if spec.q_len > MAX_SPLIT_QUERIES * spec.fold or spec.count_visits:
    return 1
  return splits_for(programs, spec.width)


def splits_for(programs: int, width: int) -> int:
  """Splits per row that bring `programs` rows up to `TARGET_PROGRAMS`, at
  least 4 of a row's `width` key-block slots each."""
  want = -(-TARGET_PROGRAMS // programs)
  return max(1, min(want, width // 4))


def _row_tables(tabs: Tables):
  return (tabs.kv_blocks, tabs.num_kv_blocks, tabs.mask_ids, tabs.full_start, tabs.num_full,
          tabs.q_offset, tabs.block_masks)


def _col_tables(tabs: Tables):
  return (tabs.kv_blocks_t, tabs.num_kv_blocks_t, tabs.mask_ids_t, tabs.full_start_t,
          tabs.num_full_t, tabs.q_offset, tabs.block_masks)


def _blocks(spec: Spec, dp: int, dtype) -> GpuBlocks:
  blocks = spec.gpu_blocks or default_blocks(dp, dtype)
  if spec.count_visits:   # visits are counted in the layout's tiles
    blocks = dataclasses.replace(blocks, fwd=dataclasses.replace(
        blocks.fwd, block_q=spec.block_q, block_k=spec.block_k))
  return blocks


def fwd(q, k, v, tabs: Tables, *, spec: Spec, interpret=False):
  """Forward: `(o [B, Hq, Lq_pad, D] like q, lse [B, Hq, Lq_pad] f32[, visits])`
  for `q: [B, Hq, Lq_pad, D]` and `k, v: [B, Lk_pad, Hk, D]` (the caller's
  sequence-major layout, read in place: rows `Hk * Dp` elements apart)."""
  d = q.shape[-1]
  dp = pad_head_dim(d, "gpu")
  q, k, v = (common.pad_last(x, dp) for x in (q, k, v))
  b, hq, lqp, _ = q.shape
  lkp, hk = k.shape[1], k.shape[2]
  pb = _blocks(spec, dp, q.dtype).fwd
  ps = pass_spec(spec, pb)
  bq, g, nq = ps.block_q, ps.groups, ps.num_q_blocks
  tables = _row_tables(pass_tables(ps, tabs))
  kv_spec = pl.BlockSpec((None, lkp, None, dp), lambda b, h, i: (b, 0, h // g, 0))
  out_shape = [jax.ShapeDtypeStruct((b, hq, lqp, dp), q.dtype),
               jax.ShapeDtypeStruct((b, hq, lqp), F32)]
  out_specs = [pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, nq - 1 - i, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, nq - 1 - i))]
  if spec.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((b, hq, nq * 8, LANES), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, 8, LANES),
                                  lambda b, h, i: (b, h, nq - 1 - i, 0)))
  splits = num_splits(ps, b * hq * nq)
  if splits > 1:
    chunk = -(-ps.width // splits)
    sp = lambda *blk: pl.BlockSpec((None, None, None) + blk,  # noqa: E731
                                   lambda b, h, i, s: (b, h, s, nq - 1 - i) + (0,) * (len(blk) - 1))
    acc, m, l = block_first_call(
        functools.partial(_split_kernel, spec=ps, chunk=chunk), grid=(b, hq, nq, splits),
        in_specs=[_full(t) for t in tables] + [
            pl.BlockSpec((None, None, bq, dp), lambda b, h, i, s: (b, h, nq - 1 - i, 0)),
            pl.BlockSpec((None, lkp, None, dp), lambda b, h, i, s: (b, 0, h // g, 0)),
            pl.BlockSpec((None, lkp, None, dp), lambda b, h, i, s: (b, 0, h // g, 0))],
        out_specs=[sp(bq, dp), sp(bq), sp(bq)],
        out_shape=[jax.ShapeDtypeStruct((b, hq, splits, lqp, dp), F32),
                   jax.ShapeDtypeStruct((b, hq, splits, lqp), F32),
                   jax.ShapeDtypeStruct((b, hq, splits, lqp), F32)],
        compiler_params=_params(pb), cost_estimate=_cost("fwd", ps, q, hk),
        interpret=interpret, name="block_sparse_fwd_split")(*tables, q, k, v)
    out, lse = _merge_splits(acc, m, l)
    return out[..., :d].astype(q.dtype), lse
  outs = block_first_call(
      functools.partial(_fwd_kernel, spec=ps), grid=(b, hq, nq),
      in_specs=[_full(t) for t in tables] + [
          pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, nq - 1 - i, 0)),
          kv_spec, kv_spec],
      out_specs=out_specs, out_shape=out_shape, compiler_params=_params(pb),
      cost_estimate=_cost("fwd", ps, q, hk),
      interpret=interpret, name="block_sparse_fwd")(*tables, q, k, v)
  o = outs[0][..., :d]
  if spec.count_visits:
    return o, outs[1], outs[2][:, :, ::8, 0]
  return o, outs[1]


# ----------------------------------------------------------------- backward


def _bwd_tile(spec, q, k, v, do, lse2, delta, vis):
  """`(p, ds)` of one tile; `lse2 = lse * log2(e)` `[bq, 1]`."""
  s = common.dot(q, k, (1, 1)) * (spec.scale * LOG2E)
  p = jnp.exp2(s - lse2)
  if vis is not None:
    p = jnp.where(vis, p, 0.0)
  return p, p * (common.dot(do, v, (1, 1)) - delta)


def _dq_kernel(blocks, counts, masks, fstart, nfull, qo_ref, tiles_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, spec: Spec):
  bk = spec.block_k
  i = spec.num_q_blocks - 1 - block_first_id(2)
  row, a = _split(i, spec.sub_q)
  qo, lim = qo_ref[0], qo_ref[1]
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...][:, None] * LOG2E, delta_ref[...][:, None]

  def step(slot, sub, masked, acc):
    kb = common.slot_block(spec, blocks, counts, row, slot, spec.width) * spec.sub_k + sub
    k = _load_rows(k_ref, kb * bk, bk)
    v = _load_rows(v_ref, kb * bk, bk)
    vis = None
    if masked:
      tile = (_sub_tile(spec, tiles_ref, masks[row * spec.width + slot], a, sub)
              if spec.mode == "table" else None)
      vis = common.tile_visible(spec, i, kb, qo, tile, lim)
      k, v = common.zero_unseen(spec, kb, qo, k, v, kv_limit=lim)
    _, ds = _bwd_tile(spec, q, k, v, do, lse2, delta, vis)
    return acc + common.dot(ds.astype(k.dtype), k)

  acc = _two_loops(counts[row], fstart[row], nfull[row], spec.sub_k, step,
                   jnp.zeros(q.shape, F32))
  dq_ref[...] = (acc * spec.scale).astype(dq_ref.dtype)


def _program_keys(spec: Spec, j, qo, lim, k, v):
  """The dkv program's key block `j` (`[bk, Dp]`) with the rows no query sees
  zeroed. Table layouts zero unseen keys before the kernel; here they zero
  the rows at or past the key limit (padding, already 0) all the same: with
  that select the float32 table-mode dkv compiles without spills; without it
  it spilled 260-4420 B at head_dim 128 at every tile tried (deviceless H100
  compile, docs/kernels_block_sparse.md; why, inside Triton / ptxas, was not
  traced)."""
  if spec.mode == "band":
    return common.zero_unseen(spec, j, qo, k, v, kv_limit=lim)
  rows = j * spec.block_k + lax.broadcasted_iota(jnp.int32, k.shape, 0)
  ok = rows < jnp.minimum(lim, spec.kv_len)
  return jnp.where(ok, k, 0), jnp.where(ok, v, 0)


def _dkv_kernel(blocks, counts, masks, fstart, nfull, qo_ref, tiles_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: Spec):
  bq = spec.block_q
  j = block_first_id(2)
  col, c = _split(j, spec.sub_k)
  qo, lim = qo_ref[0], qo_ref[1]
  k, v = _program_keys(spec, j, qo, lim, k_ref[...], v_ref[...])
  n, fs, nf = counts[col], fstart[col], nfull[col]

  def head(g, carry):
    gi = g.astype(jnp.int32)

    def step(slot, sub, masked, carry):
      dk, dv = carry
      qb = common.slot_block(spec, blocks, counts, col, slot, spec.width_t) * spec.sub_q + sub
      rows = pl.ds(pl.multiple_of(qb * bq, bq), bq)
      q = q_ref[gi, rows, :]
      do = do_ref[gi, rows, :]
      lse2 = lse_ref[gi, rows][:, None] * LOG2E
      delta = delta_ref[gi, rows][:, None]
      vis = None
      if masked:
        tile = (_sub_tile(spec, tiles_ref, masks[col * spec.width_t + slot], sub, c)
                if spec.mode == "table" else None)
        vis = common.tile_visible(spec, qb, j, qo, tile, lim)
      p, ds = _bwd_tile(spec, q, k, v, do, lse2, delta, vis)
      return (dk + common.dot(ds.astype(q.dtype).T, q),
              dv + common.dot(p.astype(do.dtype).T, do))

    return _two_loops(n, fs, nf, spec.sub_q, step, carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, spec.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def bwd(q, k, v, do, lse, o, tabs: Tables, *, spec: Spec, interpret=False):
  """Gradients `(dq, dk, dv)` in the padded layouts of `q, k, v`; `o`: the
  forward's output (for `delta = rowsum(o * do)`, float32 `[B, Hq, Lq_pad]`)."""
  delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)
  d = q.shape[-1]
  dp = pad_head_dim(d, "gpu")
  q, k, v, do = (common.pad_last(x, dp) for x in (q, k, v, do))
  b, hq, lqp, _ = q.shape
  hk, lkp = k.shape[1], k.shape[2]
  blocks = _blocks(spec, dp, q.dtype)
  ps = pass_spec(spec, blocks.dq)
  bq, g, nq = ps.block_q, ps.groups, ps.num_q_blocks
  tables = _row_tables(pass_tables(ps, tabs))
  row = pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, nq - 1 - i, 0))
  vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, nq - 1 - i))
  kv_all = pl.BlockSpec((None, None, lkp, dp), lambda b, h, i: (b, h // g, 0, 0))
  dq = block_first_call(
      functools.partial(_dq_kernel, spec=ps), grid=(b, hq, nq),
      in_specs=[_full(t) for t in tables] + [row, kv_all, kv_all, row, vec, vec],
      out_specs=row, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(blocks.dq), cost_estimate=_cost("dq", ps, q, hk),
      interpret=interpret,
      name="block_sparse_dq")(*tables, q, k, v, do, lse, delta)
  ps = pass_spec(spec, blocks.dkv)
  bk = ps.block_k
  t_tables = _col_tables(pass_tables(ps, tabs))
  group_rows = pl.BlockSpec((None, g, lqp, dp), lambda b, h, j: (b, h, 0, 0))
  group_vec = pl.BlockSpec((None, g, lqp), lambda b, h, j: (b, h, 0))
  kv_blk = pl.BlockSpec((None, None, bk, dp), lambda b, h, j: (b, h, j, 0))
  dk, dv = block_first_call(
      functools.partial(_dkv_kernel, spec=ps), grid=(b, hk, ps.num_k_blocks),
      in_specs=[_full(t) for t in t_tables] + [group_rows, kv_blk, kv_blk, group_rows,
                                               group_vec, group_vec],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(blocks.dkv), cost_estimate=_cost("dkv", ps, q, hk),
      interpret=interpret,
      name="block_sparse_dkv")(*t_tables, q, k, v, do, lse, delta)
  return dq[..., :d], dk[..., :d], dv[..., :d]
