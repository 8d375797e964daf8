"""Thin TPU (Mosaic) and GPU (Pallas Triton) launchers for the stripe kernels.

Every stripe kernel body (`kernels.py`) is written once against a small
context object:

  * `ctx.scalar(ref, j)`: entry `j` of an int32 table;
  * `ctx.rows(name, start, n, u, g=None)`: rows `[start, start + n)` of the
    framed array `name` (`[B, H, rows, W]`) for this program's batch row and
    head (`g`: the query head within the group, for key-block kernels);
    `start - u` is a multiple of the alignment unit, `u` a Python int.

`launch_tpu` serves `rows` by a DMA of the aligned window that starts `u`
rows early (frames stay in HBM, `memory_space=ANY`; tables are scalar-
prefetched into SMEM) and a static slice of the VMEM buffer. `launch_gpu`
passes frames as whole per-head blocks and loads the exact rows with
`pltriton.load`; tables are ordinary int32 inputs.

Both take the same description of a kernel:
  grid: `(B, H, n)` (H = query heads for query-block kernels, kv heads for
    key-block kernels);
  tables: 1-D int32 arrays (power-of-two length);
  blocks: `(array [B, H', L, W], block_rows, kind)` read as the block
    `[block_rows, W]` at grid position `(b, head, i)`;
  frames: `{name: (array [B, H', rows, W], kind)}` read through `ctx.rows`;
  outs: `(ShapeDtypeStruct [B, H, L, W], block_rows)`, block `(b, h, i)`.
`kind` maps the grid's head index to the array's head: `"same"`, `"kv"`
(query head `h` reads kv head `h // group`) or `"group"` (kv head `h` reads
the `group` query heads `h * group + g`; frames only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def _head_block(kind: str, group: int):
  return {"same": lambda h: h, "kv": lambda h: h // group}[kind]


# ------------------------------------------------------------------- TPU


class _TpuCtx:
  def __init__(self, frames, bufs, sem, kinds, group, unit):
    self._frames, self._bufs, self._sem = frames, bufs, sem
    self._kinds, self._group, self._unit = kinds, group, unit
    # Read at the kernel's top level (the interpreter resolves program ids
    # there, not inside loop bodies).
    self._b, self._h = pl.program_id(0), pl.program_id(1)

  def scalar(self, ref, j):
    return ref[j]

  def rows(self, name, start, n, u, g=None):
    hbm, buf = self._frames[name], self._bufs[name]
    b, h = self._b, self._h
    kind = self._kinds[name]
    head = h * self._group + g if kind == "group" else _head_block(kind, self._group)(h)
    extra = self._unit if u else 0
    base = pl.multiple_of(start - u, self._unit)
    copy = pltpu.make_async_copy(hbm.at[b, head, pl.ds(base, n + extra), :],
                                 buf.at[pl.ds(0, n + extra), :], self._sem)
    copy.start()
    copy.wait()
    return buf[pl.ds(u, n), :]


def launch_tpu(body, *, grid, tables, blocks, frames, outs, group, unit, buf_rows,
               interpret):
  """Runs `body(ctx, *table_refs, *block_refs, *out_refs)` as a Mosaic kernel."""
  names = list(frames)
  kinds = {k: frames[k][1] for k in names}
  nt, nb, nf, no = len(tables), len(blocks), len(names), len(outs)

  def block_spec(shape_w, rows, kind):
    hb = _head_block(kind, group)
    return pl.BlockSpec((None, None, rows, shape_w),
                        lambda b, h, i, *_: (b, hb(h), i, 0))

  in_specs = [block_spec(a.shape[-1], r, kind) for a, r, kind in blocks]
  in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in names]
  out_specs = [block_spec(s.shape[-1], r, "same") for s, r in outs]
  scratch = [pltpu.VMEM((buf_rows + unit, frames[k][0].shape[-1]), frames[k][0].dtype)
             for k in names]
  scratch.append(pltpu.SemaphoreType.DMA(()))

  def kernel(*refs):
    t = refs[:nt]
    bl = refs[nt:nt + nb]
    fr = dict(zip(names, refs[nt + nb:nt + nb + nf]))
    o = refs[nt + nb + nf:nt + nb + nf + no]
    bufs = dict(zip(names, refs[nt + nb + nf + no:nt + nb + nf + no + nf]))
    sem = refs[-1]
    body(_TpuCtx(fr, bufs, sem, kinds, group, unit), *t, *bl, *o)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=nt, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch)
  return pl.pallas_call(
      kernel, out_shape=[s for s, _ in outs], grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
  )(*tables, *(a for a, _, _ in blocks), *(frames[k][0] for k in names))


# ------------------------------------------------------------------- GPU


class _GpuCtx:
  def __init__(self, frames, kinds):
    self._frames, self._kinds = frames, kinds

  def scalar(self, ref, j):
    return ref[j]

  def rows(self, name, start, n, u, g=None):
    del u
    ref = self._frames[name]
    if self._kinds[name] == "group":
      ref = ref.at[jnp.int32(g)]
    return pltriton.load(ref.at[pl.ds(start, n), :])


def launch_gpu(body, *, grid, tables, blocks, frames, outs, group, unit, buf_rows,
               interpret, num_warps=4):
  """Runs `body(ctx, *table_refs, *block_refs, *out_refs)` as a Triton kernel."""
  del unit, buf_rows
  names = list(frames)
  kinds = {k: frames[k][1] for k in names}
  nt, nb, nf = len(tables), len(blocks), len(names)

  def block_spec(shape_w, rows, kind):
    hb = _head_block(kind, group)
    return pl.BlockSpec((None, None, rows, shape_w), lambda b, h, i: (b, hb(h), i, 0))

  def frame_spec(arr, kind):
    _, _, rows, w = arr.shape
    if kind == "group":
      return pl.BlockSpec((None, group, rows, w), lambda b, h, i: (b, h, 0, 0))
    hb = _head_block(kind, group)
    return pl.BlockSpec((None, None, rows, w), lambda b, h, i: (b, hb(h), 0, 0))

  in_specs = [pl.BlockSpec(t.shape, lambda b, h, i: (0,)) for t in tables]
  in_specs += [block_spec(a.shape[-1], r, kind) for a, r, kind in blocks]
  in_specs += [frame_spec(frames[k][0], kinds[k]) for k in names]
  out_specs = [block_spec(s.shape[-1], r, "same") for s, r in outs]

  def kernel(*refs):
    t = refs[:nt]
    bl = refs[nt:nt + nb]
    fr = dict(zip(names, refs[nt + nb:nt + nb + nf]))
    o = refs[nt + nb + nf:]
    body(_GpuCtx(fr, kinds), *t, *bl, *o)

  return pl.pallas_call(
      kernel, out_shape=[s for s, _ in outs], grid=grid, in_specs=in_specs,
      out_specs=out_specs, interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
  )(*tables, *(a for a, _, _ in blocks), *(frames[k][0] for k in names))


LAUNCH = {"tpu": launch_tpu, "gpu": launch_gpu}
