"""GPU variant: Pallas Triton kernels (any recent NVIDIA GPU).

Triton has no scalar prefetch: the layout tables are ordinary int32 inputs,
and each program loops over its own slots with `lax.fori_loop(0, count)`, so
empty slots cost nothing. Full tiles and partial tiles take two branches
(`lax.cond`): only partial tiles build a mask. K/V of one head stay in HBM
(a whole-head block) and each step loads one `[block_k, Dp]` slice at a
block-aligned start (never negative, never past the padded end).

  * forward and dq: grid `(B, Hq, nq)`, loop over the query block's key blocks;
  * dkv: grid `(B, Hk, nk)`, loop over the group's query heads and the query
    blocks that list the key block (GQA accumulates in registers).

Block sizes and the padded head_dim are powers of two >= 16 (Triton).
This backend is deprecated upstream in favour of Mosaic GPU; the block logic
lives in `common.py` so a Mosaic GPU variant can sit beside this one
(docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import F32, LANES, Spec, Tables
from pallas_kernels.common import pad_head_dim


def _params(dp):
  return pltriton.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2)


def _full(x):
  """BlockSpec holding the whole array (tables, tiles)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _tile(spec, tiles_ref, mid):
  if spec.mode != "table":
    return None
  return tiles_ref[mid]


def _load_rows(ref, start, size):
  return ref[pl.ds(pl.multiple_of(start, size), size), :]


# ------------------------------------------------------------------ forward


def _fwd_kernel(blocks, counts, masks, qo_ref, tiles_ref, q_ref, k_ref, v_ref, o_ref,
                lse_ref, *vis, spec: Spec):
  bq, bk = spec.block_q, spec.block_k
  i = pl.program_id(2)
  qo = qo_ref[0]
  q = q_ref[...]
  dp = q.shape[-1]
  n = counts[i]

  def body(slot, carry):
    acc, m, l, visited = carry
    kb = common.slot_block(spec, blocks, counts, i, slot, spec.width)
    mid = common.slot_mask_id(spec, masks, i, slot, spec.width)
    k = _load_rows(k_ref, kb * bk, bk)
    v = _load_rows(v_ref, kb * bk, bk)

    def update(use_mask):
      kk, vv = k, v
      vis = None
      if use_mask:
        vis = common.tile_visible(spec, i, kb, qo, _tile(spec, tiles_ref, mid))
        (vv,) = common.zero_unseen(spec, kb, qo, vv)
      s = common.dot(q, kk, (1, 1)) * spec.scale
      m_new, l_new, p, alpha = common.online_step(s, vis, m, l)
      return alpha * acc + common.dot(p.astype(vv.dtype), vv), m_new, l_new

    masked = common.needs_mask(spec, i, kb, qo, mid)
    acc, m, l = lax.cond(masked, lambda: update(True), lambda: update(False))
    return acc, m, l, visited + 1

  init = (jnp.zeros((bq, dp), F32), jnp.full((bq, 1), common.NEG, F32),
          jnp.zeros((bq, 1), F32), jnp.int32(0))
  acc, m, l, visited = lax.fori_loop(0, n, body, init)
  out, lse = common.finish(acc, m, l)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]
  if vis:
    vis[0][...] = jnp.full(vis[0].shape, visited, jnp.int32)


def fwd(q, k, v, tabs: Tables, *, spec: Spec, interpret=False):
  """Forward: `(o [B, Hq, Lq_pad, D] like q, lse [B, Hq, Lq_pad] f32[, visits])`."""
  d = q.shape[-1]
  dp = pad_head_dim(d, "gpu")
  q, k, v = (common.pad_last(x, dp) for x in (q, k, v))
  b, hq, lqp, _ = q.shape
  hk, lkp = k.shape[1], k.shape[2]
  bq, g = spec.block_q, spec.groups
  tables = (tabs.kv_blocks, tabs.num_kv_blocks, tabs.mask_ids, tabs.q_offset, tabs.block_masks)
  kv_spec = pl.BlockSpec((None, None, lkp, dp), lambda b, h, i: (b, h // g, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((b, hq, lqp, dp), q.dtype),
               jax.ShapeDtypeStruct((b, hq, lqp), F32)]
  out_specs = [pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, i, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  if spec.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((b, hq, spec.num_q_blocks * 8, LANES), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, 8, LANES), lambda b, h, i: (b, h, i, 0)))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec), grid=(b, hq, spec.num_q_blocks),
      in_specs=[_full(t) for t in tables] + [
          pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, i, 0)), kv_spec, kv_spec],
      out_specs=out_specs, out_shape=out_shape, compiler_params=_params(dp),
      interpret=interpret, name="block_sparse_fwd")(*tables, q, k, v)
  o = outs[0][..., :d]
  if spec.count_visits:
    return o, outs[1], outs[2][:, :, ::8, 0]
  return o, outs[1]


# ----------------------------------------------------------------- backward


def _dq_kernel(blocks, counts, masks, qo_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, spec: Spec):
  bk = spec.block_k
  i = pl.program_id(2)
  qo = qo_ref[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(slot, acc):
    kb = common.slot_block(spec, blocks, counts, i, slot, spec.width)
    mid = common.slot_mask_id(spec, masks, i, slot, spec.width)
    k = _load_rows(k_ref, kb * bk, bk)
    v = _load_rows(v_ref, kb * bk, bk)

    def update(use_mask):
      vis = (common.tile_visible(spec, i, kb, qo, _tile(spec, tiles_ref, mid))
             if use_mask else None)
      kk, _, ds = common.bwd_tile(spec, kb, qo, q, k, v, do, lse, delta, vis)
      return acc + common.dot(ds.astype(kk.dtype), kk) * spec.scale

    return lax.cond(common.needs_mask(spec, i, kb, qo, mid),
                    lambda: update(True), lambda: update(False))

  acc = lax.fori_loop(0, counts[i], body, jnp.zeros(q.shape, F32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(blocks, counts, masks, qo_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, spec: Spec):
  bq = spec.block_q
  j = pl.program_id(2)
  qo = qo_ref[0]
  k, v = k_ref[...], v_ref[...]
  n = counts[j]

  def head(g, carry):
    gi = g.astype(jnp.int32)

    def body(slot, carry):
      dk, dv = carry
      qb = common.slot_block(spec, blocks, counts, j, slot, spec.width_t)
      mid = common.slot_mask_id(spec, masks, j, slot, spec.width_t)
      rows = pl.ds(pl.multiple_of(qb * bq, bq), bq)
      q = q_ref[gi, rows, :]
      do = do_ref[gi, rows, :]
      lse = lse_ref[gi, rows][:, None]
      delta = delta_ref[gi, rows][:, None]

      def update(use_mask):
        vis = (common.tile_visible(spec, qb, j, qo, _tile(spec, tiles_ref, mid))
               if use_mask else None)
        _, p, ds = common.bwd_tile(spec, j, qo, q, k, v, do, lse, delta, vis)
        return (dk + common.dot(ds.astype(q.dtype).T, q) * spec.scale,
                dv + common.dot(p.astype(do.dtype).T, do))

      return lax.cond(common.needs_mask(spec, qb, j, qo, mid),
                      lambda: update(True), lambda: update(False))

    return lax.fori_loop(0, n, body, carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, spec.groups, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def bwd(q, k, v, do, lse, delta, tabs: Tables, *, spec: Spec, interpret=False):
  """Gradients `(dq, dk, dv)` in the padded layouts of `q, k, v`."""
  d = q.shape[-1]
  dp = pad_head_dim(d, "gpu")
  q, k, v, do = (common.pad_last(x, dp) for x in (q, k, v, do))
  b, hq, lqp, _ = q.shape
  hk, lkp = k.shape[1], k.shape[2]
  bq, bk, g = spec.block_q, spec.block_k, spec.groups
  fwd_tables = (tabs.kv_blocks, tabs.num_kv_blocks, tabs.mask_ids, tabs.q_offset, tabs.block_masks)
  row = pl.BlockSpec((None, None, bq, dp), lambda b, h, i: (b, h, i, 0))
  vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  kv_all = pl.BlockSpec((None, None, lkp, dp), lambda b, h, i: (b, h // g, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec), grid=(b, hq, spec.num_q_blocks),
      in_specs=[_full(t) for t in fwd_tables] + [row, kv_all, kv_all, row, vec, vec],
      out_specs=row, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(dp), interpret=interpret,
      name="block_sparse_dq")(*fwd_tables, q, k, v, do, lse, delta)
  t_tables = (tabs.kv_blocks_t, tabs.num_kv_blocks_t, tabs.mask_ids_t, tabs.q_offset,
              tabs.block_masks)
  group_rows = pl.BlockSpec((None, g, lqp, dp), lambda b, h, j: (b, h, 0, 0))
  group_vec = pl.BlockSpec((None, g, lqp), lambda b, h, j: (b, h, 0))
  kv_blk = pl.BlockSpec((None, None, bk, dp), lambda b, h, j: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec), grid=(b, hk, spec.num_k_blocks),
      in_specs=[_full(t) for t in t_tables] + [group_rows, kv_blk, kv_blk, group_rows,
                                               group_vec, group_vec],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(dp), interpret=interpret,
      name="block_sparse_dkv")(*t_tables, q, k, v, do, lse, delta)
  return dq[..., :d], dk[..., :d], dv[..., :d]
