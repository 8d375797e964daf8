"""TPU (Mosaic) launcher of the stripe kernels; see `common.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.stripe.common import head_block as _head_block
from pallas_kernels.common import pallas_call


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

  def rows_f32(self, name, start, n, g=None):
    """Rows `[start, start + n)` of frame `name` as float32, for any (traced)
    `start`: one DMA of the aligned `n + unit` rows from `start` rounded down,
    then a dynamic sublane rotate by the residue. One code path for every
    residue (the `rows` path needs a static one: a loop per residue). `g`:
    the group member of a `"group"` frame, as in `rows`."""
    hbm, buf = self._frames[name], self._bufs[name]
    kind = self._kinds[name]
    head = (self._h * self._group + g if kind == "group"
            else _head_block(kind, self._group)(self._h))
    m = n + self._unit
    u = jax.lax.rem(start, self._unit)
    base = pl.multiple_of(start - u, self._unit)
    copy = pltpu.make_async_copy(hbm.at[self._b, head, pl.ds(base, m), :],
                                 buf.at[pl.ds(0, m), :], self._sem)
    copy.start()
    copy.wait()
    w = buf[pl.ds(0, m), :].astype(jnp.float32)
    return pltpu.roll(w, jax.lax.rem(m - u, m), 0)[:n]


def launch_tpu(body, *, grid, tables, blocks, frames, outs, group, unit, buf_rows,
               interpret, cost=None):
  """Runs `body(ctx, *table_refs, *block_refs, *out_refs)` as a Mosaic kernel."""
  names = list(frames)
  kinds = {k: frames[k][1] for k in names}
  nt, nb, nf, no = len(tables), len(blocks), len(names), len(outs)

  def block_spec(shape_w, rows, kind):
    if kind == "heads":
      return pl.BlockSpec((None, group, rows, shape_w), lambda b, h, i, *_: (b, h, i, 0))
    hb = _head_block(kind, group)
    return pl.BlockSpec((None, None, rows, shape_w),
                        lambda b, h, i, *_: (b, hb(h), i, 0))

  in_specs = [block_spec(a.shape[-1], r, kind) for a, r, kind in blocks]
  in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in names]
  out_specs = [block_spec(o[0].shape[-1], o[1], o[2] if len(o) > 2 else "same")
               for o in outs]
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
  return pallas_call(
      kernel, out_shape=[o[0] for o in outs], grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret, cost_estimate=cost,
  )(*tables, *(a for a, _, _ in blocks), *(frames[k][0] for k in names))


