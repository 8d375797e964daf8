"""TPU (Mosaic) variant: `pltpu.PrefetchScalarGridSpec` kernels.

The layout tables are scalar-prefetched (SMEM) and read by the K/V index
maps, so a grid step whose slot repeats the previous block index issues no
DMA; the body runs under `pl.when(slot < count)`. Online-softmax state and
gradient accumulators live in VMEM scratch. Block shapes follow the (8, 128)
rule: rows are `block_q` / `block_k` (multiples of 8), lanes the head_dim
padded to a multiple of 128. `lse` / `delta` travel lane-dense, one
`(1, block_q)` row per query block of a `[B, Hq, nq, 1, block_q]` array
(`_rows`; the backward's `delta` is written in it by `delta_rows`, a kernel:
a reshape of a `[B, Hq, L]` array into it is a relayout that XLA:TPU
compiles into code linear in L), and are turned into the `[block_q, 1]`
column the tile math uses inside the kernel (`pallas_kernels.common.to_column` / `to_row`: a diagonal
sum, not a reshape, which v4's Mosaic cannot lower).

SMEM is 1 MiB on v4, v5e and v6e (deviceless compile: a 1 MiB scalar-prefetch
operand fails with "Ran out of memory in memory space smem"), and the whole
tables of one pass are prefetched into it: `check_smem` rejects a `Spec`
whose tables cannot fit before Mosaic does (`prefetch_bytes`); `table_bytes`
sizes tables from their shape, for callers that route work away from these
kernels before building a layout that could not fit (`attn.pallas.ppa`).

  * forward: grid `(B, Hq, nq, width)`, key slots innermost;
  * dq: the same grid;
  * dkv: grid `(B, Hk, nk, G, width_t)`: for a key block, every query head of
    its group and every query block that lists it (GQA accumulates in VMEM);
  * delta (before dq and dkv): grid `(B, Hq, nq)`, `rowsum(o * do)`.

float16 inputs run in float32 (Mosaic has no float16 matmul).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import cost
from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import F32, LANES, Spec, Tables
from pallas_kernels.common import pad_head_dim, pallas_call, to_column, to_row

NUM_PREFETCH = 4  # kv_blocks, num_kv_blocks, mask_ids, q_offset
SMEM_BYTES = 1 << 20     # TPU v4 / v5e / v6e scalar memory (compiler's limit)
SMEM_RESERVE = 2 << 10   # measured: the largest prefetch operand a deviceless
                         # v5e compile accepts is 1 MiB - 2 KiB
SMEM_ALIGN = 512         # each prefetched operand is counted rounded up to this (a model)
SMEM_BUDGET = SMEM_BYTES - SMEM_RESERVE   # bytes of prefetched tables one pass may take


def table_bytes(mode: str, rows: int, width: int) -> int:
  """Bytes of SMEM the scalar-prefetched tables of one pass take: `rows`
  table rows of `width` slots (table mode: key blocks and mask ids
  `[rows, width]`; band mode: one first block per row and a dummy mask id),
  counts `[rows]` and `q_offset` `[2]`, each operand rounded up to
  `SMEM_ALIGN`. Callers that build layouts (`attn.pallas.ppa`) size their
  tables with it before building them."""
  per_row = 1 if mode == "band" else width
  masks = 1 if mode == "band" else rows * width
  words = (rows * per_row, rows, masks, 2)            # blocks, counts, mask ids, q_offset
  return sum(-(-4 * n // SMEM_ALIGN) * SMEM_ALIGN for n in words)


def prefetch_bytes(spec: Spec, transposed: bool) -> int:
  """`table_bytes` of the forward / dq (`transposed=False`) or dkv
  (`transposed=True`) pass of `spec`: the operands of
  `_prefetch(tabs, transposed)`, sized from the static `spec` alone."""
  rows, width = ((spec.num_k_blocks, spec.width_t) if transposed
                 else (spec.num_q_blocks, spec.width))
  return table_bytes(spec.mode, rows, width)


def check_smem(spec: Spec, transposed: bool):
  """Raises ValueError when the prefetched tables of the forward / dq
  (`transposed=False`) or dkv (`transposed=True`) pass cannot fit in SMEM
  (more than `SMEM_BUDGET` bytes)."""
  need = prefetch_bytes(spec, transposed)
  if need > SMEM_BUDGET:
    name, rows, width = (("dkv", spec.num_k_blocks, spec.width_t) if transposed
                         else ("forward/dq", spec.num_q_blocks, spec.width))
    raise ValueError(
        f"layout: the TPU {name} kernel scalar-prefetches its block tables "
        f"({rows} blocks x {width} slots) into SMEM: {need} B > {SMEM_BUDGET} B "
        f"(1 MiB SMEM less {SMEM_RESERVE} B). Build the layout with larger "
        "block_q / block_k (fewer blocks and slots), or with fewer key blocks per "
        "query block, or run implementation='xla'.")


def _rows(x, block_q: int):
  """`[B, H, L] -> [B, H, L / block_q, 1, block_q]`: a per-query vector as
  one lane-dense row per query block (the block's last two dims are the
  array's, which Mosaic accepts for any `block_q`)."""
  b, h, l = x.shape
  return x.reshape(b, h, l // block_q, 1, block_q)


def _cost(kind: str, spec: Spec, x, hk: int):
  """`pl.CostEstimate` of one pass (`pallas_kernels.cost`, static tile count)."""
  b, hq, _, d = x.shape
  kw = dict(batch=b, q_heads=hq, kv_heads=hk, head_dim=d, tiles=common.tile_count(spec),
            block_q=spec.block_q, block_k=spec.block_k, itemsize=x.dtype.itemsize,
            platform="tpu")
  if kind == "dkv":
    return cost.block_sparse_dkv(num_k_blocks=spec.num_k_blocks, **kw)
  fn = cost.block_sparse_fwd if kind == "fwd" else cost.block_sparse_dq
  return fn(num_q_blocks=spec.num_q_blocks, **kw)


def _cast_in(*xs):
  return tuple(x.astype(F32) if x.dtype == jnp.float16 else x for x in xs)


def _prefetch(tabs: Tables, transposed: bool):
  if transposed:
    return (tabs.kv_blocks_t, tabs.num_kv_blocks_t, tabs.mask_ids_t, tabs.q_offset)
  return (tabs.kv_blocks, tabs.num_kv_blocks, tabs.mask_ids, tabs.q_offset)


def _optional_refs(kernel, present, **kw):
  """Kernel body for `pl.pallas_call` whose refs follow `present`.

  The kernels list every ref in their signature; a mode passes only some
  (`tile_ref`, the block masks, in table mode; `vis_ref` when counting
  visits).
  `present[i]` says whether parameter `i` is passed; absent ones are None.
  """

  def body(*refs):
    it = iter(refs)
    kernel(*[next(it) if on else None for on in present], **kw)

  return body


def _compiler(n_parallel, n_arbitrary):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _row_spec(spec: Spec, lanes: int | None, transposed: bool):
  """BlockSpec of a per-query-row input: `[B, Hq, Lq_pad, lanes]` blocks
  `(bq, lanes)` (q, do, o, dq), or with `lanes=None` the lane-dense
  `[B, Hq, nq, 1, bq]` vectors (lse, delta, `_rows`) in `(1, bq)` blocks."""
  bq = spec.block_q
  shape = (None, None, None, 1, bq) if lanes is None else (None, None, bq, lanes)

  def place(b, h, qb):
    return (b, h, qb, 0, 0) if lanes is None else (b, h, qb, 0)
  if not transposed:
    return pl.BlockSpec(shape, lambda b, h, i, j, *_: place(b, h, i))

  def index(b, hk, j, g, t, blocks, counts, masks, qo):
    qb = common.slot_block(spec, blocks, counts, j, t, spec.width_t)
    return place(b, hk * spec.groups + g, qb)
  return pl.BlockSpec(shape, index)


def _kv_spec(spec: Spec, dp: int, transposed: bool, seq_major: bool = False):
  """K / V blocks `(bk, dp)`: heads-first `[B, Hk, Lk_pad, Dp]`, or with
  `seq_major` (forward) the caller's layout flattened to `[B, Lk_pad, Hk * Dp]`
  (kv head `h` is lane block `h`: Mosaic takes no squeezed head axis between
  the rows and the lanes)."""
  bk = spec.block_k
  if transposed:
    return pl.BlockSpec((None, None, bk, dp), lambda b, hk, j, g, t, *_: (b, hk, j, 0))

  def index(b, h, i, j, blocks, counts, masks, qo):
    kb = common.slot_block(spec, blocks, counts, i, j, spec.width)
    return (b, kb, h // spec.groups) if seq_major else (b, h // spec.groups, kb, 0)
  shape = (None, bk, dp) if seq_major else (None, None, bk, dp)
  return pl.BlockSpec(shape, index)


def _tile_spec(spec: Spec, transposed: bool):
  width = spec.width_t if transposed else spec.width

  def index(*args):
    row, slot = (args[2], args[4]) if transposed else (args[2], args[3])
    masks = args[-2]
    return (common.slot_mask_id(spec, masks, row, slot, width), 0, 0)
  if spec.diag_masks:
    return pl.BlockSpec((None, 1, common.diag_width(spec.block_q, spec.block_k)), index)
  return pl.BlockSpec((None, spec.block_q, spec.block_k), index)


def diagonal_tile(row, block_q: int, block_k: int):
  """`[block_q, block_k]` tile with entry `(i, j) = row[0, j - i + block_q - 1]`
  from a diagonal mask row `row: [1, n]` (`common.diagonal_masks`).

  The row, broadcast to every sublane, must move right by `i - (block_q - 1)`
  lanes (mod `n`) in row `i`: one uniform lane rotation by `n - (block_q -
  1)`, then `log2(block_q)` rotations by `2^b` kept in the rows whose index
  has bit `b` set; the first `block_k` lanes are the tile. (A single strided
  rotation, `pltpu.roll(stride=1)`, does not compile for TPU v4.)
  """
  n = row.shape[-1]
  x = pltpu.roll(jnp.broadcast_to(row, (block_q, n)), n - (block_q - 1), 1)
  i = jax.lax.broadcasted_iota(jnp.int32, (block_q, n), 0)
  bit = 1
  while bit < block_q:
    x = jnp.where((i & bit) != 0, pltpu.roll(x, bit, 1), x)
    bit *= 2
  return x[:, :block_k]


def _tile_state(spec, qb, kb, qo, mask_id, tile_ref, lim):
  """`(needs_mask, visible)`: a scalar, and a thunk building the tile mask."""
  masked = common.needs_mask(spec, qb, kb, qo, mask_id, lim)

  def visible():  # read the tile only in the masked branch
    tile = tile_ref[...] if tile_ref is not None else None
    if tile is not None and spec.diag_masks:
      tile = diagonal_tile(tile, spec.block_q, spec.block_k)
    return common.tile_visible(spec, qb, kb, qo, tile, lim)
  return masked, visible


# ------------------------------------------------------------------ forward


def _fwd_kernel(
    # Prefetched inputs
    blocks, counts, masks, qo_ref,
    # Inputs (tile_ref: block_masks, table mode only)
    q_ref, k_ref, v_ref, tile_ref,
    # Outputs (vis_ref: with count_visits only)
    o_ref, lse_ref, vis_ref,
    # Scratch
    m_ref, l_ref, acc_ref,
    *, spec: Spec):
  i, j = pl.program_id(2), pl.program_id(3)
  qo, lim = qo_ref[0], qo_ref[1]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, common.NEG, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
    if vis_ref is not None:
      vis_ref[...] = jnp.zeros(vis_ref.shape, jnp.int32)

  kb = common.slot_block(spec, blocks, counts, i, j, spec.width)
  mid = common.slot_mask_id(spec, masks, i, j, spec.width)
  active = j < counts[i]
  masked, visible = _tile_state(spec, i, kb, qo, mid, tile_ref, lim)

  def step(use_mask):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    if use_mask:
      (v,) = common.zero_unseen(spec, kb, qo, v, kv_limit=lim)
    s = common.dot(q, k, (1, 1)) * spec.scale
    vis = visible() if use_mask else None
    m_prev, l_prev = m_ref[...][:, :1], l_ref[...][:, :1]
    m_new, l_new, p, alpha = common.online_step(s, vis, m_prev, l_prev)
    acc_ref[...] = alpha * acc_ref[...] + common.dot(p.astype(v.dtype), v)
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)
    if vis_ref is not None:
      vis_ref[...] += 1

  pl.when(active & jnp.logical_not(masked))(lambda: step(False))
  pl.when(active & masked)(lambda: step(True))

  @pl.when(j == spec.width - 1)
  def _finish():
    out, lse = common.finish(acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = to_row(lse)


def fwd(q, k, v, tabs: Tables, *, spec: Spec, interpret=False):
  """Forward: `(o [B, Hq, Lq_pad, Dp] like q, lse [B, Hq, Lq_pad] f32[, visits])`
  for `q: [B, Hq, Lq_pad, D]` and `k, v: [B, Lk_pad, Hk, D]` (the caller's
  sequence-major layout: no heads-first copy of the cache)."""
  out_dtype, d = q.dtype, q.shape[-1]
  dp = pad_head_dim(d, "tpu")
  q, k, v = (common.pad_last(x, dp) for x in _cast_in(q, k, v))
  b, hq, lqp, _ = q.shape
  bq = spec.block_q
  # [B, Lk_pad, Hk, Dp] -> [B, Lk_pad, Hk * Dp]: a free reshape when head_dim
  # is already a multiple of 128 (else pad_last above made the copy anyway).
  hk = k.shape[2]
  k, v = (x.reshape(x.shape[0], x.shape[1], -1) for x in (k, v))
  kv = _kv_spec(spec, dp, False, seq_major=True)
  in_specs = [_row_spec(spec, dp, False), kv, kv]
  args = [q, k, v]
  table = spec.mode == "table"
  if table:
    in_specs.append(_tile_spec(spec, False))
    args.append(tabs.block_masks)
  out_shape = [jax.ShapeDtypeStruct((b, hq, lqp, dp), out_dtype),
               jax.ShapeDtypeStruct((b, hq, spec.num_q_blocks, 1, bq), F32)]
  out_specs = [_row_spec(spec, dp, False), _row_spec(spec, None, False)]
  if spec.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((b, hq, spec.num_q_blocks * 8, LANES), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, 8, LANES), lambda b, h, i, j, *_: (b, h, i, 0)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=NUM_PREFETCH, grid=(b, hq, spec.num_q_blocks, spec.width),
      in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, LANES), F32),
                      pltpu.VMEM((bq, dp), F32)])
  outs = pallas_call(
      _optional_refs(_fwd_kernel, [True] * 7 + [table, True, True, spec.count_visits]
                     + [True] * 3, spec=spec), grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=_compiler(3, 1), interpret=interpret,
      cost_estimate=_cost("fwd", spec, q, hk),
      name="block_sparse_fwd")(*_prefetch(tabs, False), *args)
  o = outs[0][..., :d]
  if spec.count_visits:
    return o, outs[1].reshape(b, hq, lqp), outs[2][:, :, ::8, 0]
  return o, outs[1].reshape(b, hq, lqp)


# ----------------------------------------------------------------- backward


def _dq_kernel(
    # Prefetched inputs
    blocks, counts, masks, qo_ref,
    # Inputs (tile_ref: block_masks, table mode only)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tile_ref,
    # Outputs
    dq_ref,
    # Scratch
    acc_ref,
    *, spec: Spec):
  i, j = pl.program_id(2), pl.program_id(3)
  qo, lim = qo_ref[0], qo_ref[1]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  kb = common.slot_block(spec, blocks, counts, i, j, spec.width)
  mid = common.slot_mask_id(spec, masks, i, j, spec.width)
  active = j < counts[i]
  masked, visible = _tile_state(spec, i, kb, qo, mid, tile_ref, lim)

  def step(use_mask):
    k, _, ds = common.bwd_tile(spec, kb, qo, q_ref[...], k_ref[...], v_ref[...],
                               do_ref[...], to_column(lse_ref[...]), to_column(delta_ref[...]),
                               visible() if use_mask else None, kv_limit=lim)
    acc_ref[...] += common.dot(ds.astype(k.dtype), k) * spec.scale

  pl.when(active & jnp.logical_not(masked))(lambda: step(False))
  pl.when(active & masked)(lambda: step(True))

  @pl.when(j == spec.width - 1)
  def _finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(
    # Prefetched inputs
    blocks, counts, masks, qo_ref,
    # Inputs (tile_ref: block_masks, table mode only)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tile_ref,
    # Outputs
    dk_ref, dv_ref,
    # Scratch
    dk_acc, dv_acc,
    *, spec: Spec):
  j, g, t = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  qo, lim = qo_ref[0], qo_ref[1]

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

  qb = common.slot_block(spec, blocks, counts, j, t, spec.width_t)
  mid = common.slot_mask_id(spec, masks, j, t, spec.width_t)
  active = t < counts[j]
  masked, visible = _tile_state(spec, qb, j, qo, mid, tile_ref, lim)

  def step(use_mask):
    q, do = q_ref[...], do_ref[...]
    _, p, ds = common.bwd_tile(spec, j, qo, q, k_ref[...], v_ref[...], do,
                               to_column(lse_ref[...]), to_column(delta_ref[...]),
                               visible() if use_mask else None, kv_limit=lim)  # [bq, bk]
    dv_acc[...] += common.dot(p.astype(do.dtype).T, do)   # [bk, Dp]
    dk_acc[...] += common.dot(ds.astype(q.dtype).T, q) * spec.scale

  pl.when(active & jnp.logical_not(masked))(lambda: step(False))
  pl.when(active & masked)(lambda: step(True))

  @pl.when((g == spec.groups - 1) & (t == spec.width_t - 1))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _delta_kernel(o_ref, do_ref, delta_ref):
  prod = o_ref[...].astype(F32) * do_ref[...].astype(F32)
  delta_ref[...] = to_row(jnp.sum(prod, axis=-1, keepdims=True))


def delta_rows(o, do, *, spec: Spec, interpret=False):
  """`delta = rowsum(o * do)` float32 `[B, Hq, nq, 1, bq]` (`_rows` layout).

  o, do: `[B, Hq, Lq_pad, D]`. A kernel writes each query block's row
  lane-dense; computing `[B, Hq, Lq_pad]` in XLA and reshaping it to
  `_rows` is a relayout that XLA:TPU compiles into straight-line code linear
  in `Lq_pad` (deviceless v4, dense grad at 1M: most of the program's
  low-level code).
  """
  b, hq, lqp, d = o.shape
  bq, nq = spec.block_q, spec.num_q_blocks
  row = pl.BlockSpec((None, None, bq, d), lambda bb, hh, i: (bb, hh, i, 0))
  return pallas_call(
      _delta_kernel, grid=(b, hq, nq), in_specs=[row, row],
      out_specs=pl.BlockSpec((None, None, None, 1, bq), lambda bb, hh, i: (bb, hh, i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hq, nq, 1, bq), F32),
      compiler_params=_compiler(3, 0), interpret=interpret,
      cost_estimate=cost.block_sparse_delta(batch=b, q_heads=hq, head_dim=d, rows=lqp,
                                            itemsize=o.dtype.itemsize),
      name="block_sparse_delta")(o, do)


def bwd(q, k, v, do, lse, o, tabs: Tables, *, spec: Spec, interpret=False):
  """Gradients `(dq, dk, dv)` in the padded layouts of `q, k, v`; `o`: the
  forward's output (`delta_rows`)."""
  dtypes, d = (q.dtype, k.dtype, v.dtype), q.shape[-1]
  delta = delta_rows(*_cast_in(o, do), spec=spec, interpret=interpret)
  dp = pad_head_dim(d, "tpu")
  q, k, v, do = (common.pad_last(x, dp) for x in _cast_in(q, k, v, do))
  b, hq, lqp, _ = q.shape
  hk, lkp = k.shape[1], k.shape[2]
  bq, bk = spec.block_q, spec.block_k
  lse = _rows(lse, bq)
  table = spec.mode == "table"

  def specs(transposed):
    row, kv = _row_spec(spec, dp, transposed), _kv_spec(spec, dp, transposed)
    vec = _row_spec(spec, None, transposed)
    out = [row, kv, kv, row, vec, vec]
    return out + ([_tile_spec(spec, transposed)] if table else [])

  args = [q, k, v, do, lse, delta] + ([tabs.block_masks] if table else [])
  dq = pallas_call(
      _optional_refs(_dq_kernel, [True] * 10 + [table] + [True] * 2, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=NUM_PREFETCH, grid=(b, hq, spec.num_q_blocks, spec.width),
          in_specs=specs(False), out_specs=_row_spec(spec, dp, False),
          scratch_shapes=[pltpu.VMEM((bq, dp), F32)]),
      out_shape=jax.ShapeDtypeStruct((b, hq, lqp, dp), dtypes[0]),
      compiler_params=_compiler(3, 1), interpret=interpret,
      cost_estimate=_cost("dq", spec, q, hk),
      name="block_sparse_dq")(*_prefetch(tabs, False), *args)
  kv_out = pl.BlockSpec((None, None, bk, dp), lambda b, hk, j, g, t, *_: (b, hk, j, 0))
  dk, dv = pallas_call(
      _optional_refs(_dkv_kernel, [True] * 10 + [table] + [True] * 4, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=NUM_PREFETCH,
          grid=(b, hk, spec.num_k_blocks, spec.groups, spec.width_t),
          in_specs=specs(True), out_specs=[kv_out, kv_out],
          scratch_shapes=[pltpu.VMEM((bk, dp), F32), pltpu.VMEM((bk, dp), F32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hk, lkp, dp), dtypes[1]),
                 jax.ShapeDtypeStruct((b, hk, lkp, dp), dtypes[2])],
      compiler_params=_compiler(3, 2), interpret=interpret,
      cost_estimate=_cost("dkv", spec, q, hk),
      name="block_sparse_dkv")(*_prefetch(tabs, True), *args)
  return dq[..., :d], dk[..., :d], dv[..., :d]
