"""TPU (Mosaic) launcher of the stripe kernels; see `common.py`.

Frames stay in HBM (`memory_space=ANY`) and are read by DMA into VMEM
scratch. A stripe loop (`_TpuCtx.stripe_loop`) keeps `DEPTH` stripes' DMAs
in flight: while stripe `j` is computed, the windows of stripes `j + 1 ..
j + DEPTH - 1` are on their way into the other slots of a `DEPTH`-slot
buffer, each with its own DMA semaphore. Band tiles (`rows`, `rows_f32`)
are read start-then-wait through slot 0, never while a stripe loop runs.

The search's anchors and scores are written lane-dense: one `(K,
block_q)` block of a `[B, H, nq, K, block_q]` array per query block, not
`[.., L, K]` with a `K`-lane minor dim that TPU layouts pad to 128 lanes.
The kernel's `[rows, 1]` columns are turned into those rows by a diagonal
sum (`pallas_kernels.common.to_row`), not a reshape (Mosaic lowers that to
a sublane gather, which v4 lacks). (PPA's lse stays a column:
docs/kernels_stripe.md.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.stripe.common import head_block as _head_block
from pallas_kernels.common import F32, pallas_call, to_row

# Stripe windows in flight in a stripe loop (issue 15 item 2 asks for 2-4).
DEPTH = 3


class _TpuCtx:
  def __init__(self, frames, bufs, sems, kinds, group, unit, depth):
    self._frames, self._bufs, self._sems = frames, bufs, sems
    self._kinds, self._group, self._unit = kinds, group, unit
    self._depth = depth
    self._index = {k: i for i, k in enumerate(frames)}
    # Read at the kernel's top level (the interpreter resolves program ids
    # there, not inside loop bodies).
    self._b, self._h = pl.program_id(0), pl.program_id(1)

  def scalar(self, ref, j):
    return ref[j]

  def block(self):
    """This program's query (or key) block: grid axis 2."""
    return pl.program_id(2)

  def _copy(self, name, base, m, g, slot):
    """DMA of frame rows `[base, base + m)` into slot `slot` of its buffer."""
    kind = self._kinds[name]
    head = (self._h * self._group + g if kind == "group"
            else _head_block(kind, self._group)(self._h))
    return pltpu.make_async_copy(
        self._frames[name].at[self._b, head, pl.ds(base, m), :],
        self._bufs[name].at[slot, pl.ds(0, m), :],
        self._sems.at[slot, self._index[name]])

  def _window(self, start):
    """`(aligned base, residue)` of a window starting at row `start >= 0`."""
    u = jax.lax.rem(start, self._unit)
    return pl.multiple_of(start - u, self._unit), u

  def _inside(self, name, start, n):
    """A stripe window's `start` moved into the frame: the DMA of its
    aligned `n + unit` rows stays within `[0, rows)` (see `stripe_loop`)."""
    return jnp.clip(start, 0, self._frames[name].shape[2] - n - self._unit)

  def _read_f32(self, name, u, n, slot):
    """Rows `[u, u + n)` of a landed window as float32: a dynamic sublane
    rotate by the residue `u` (one code path for every residue)."""
    m = n + self._unit
    w = self._bufs[name][slot, pl.ds(0, m), :].astype(F32)
    return pltpu.roll(w, jax.lax.rem(m - u, m), 0)[:n]

  def rows(self, name, start, n, u, g=None):
    """Rows `[start, start + n)` (`start - u` aligned, `u` static), waited."""
    extra = self._unit if u else 0
    copy = self._copy(name, pl.multiple_of(start - u, self._unit), n + extra, g, 0)
    copy.start()
    copy.wait()
    return self._bufs[name][0, pl.ds(u, n), :]

  def rows_f32(self, name, start, n, g=None):
    """Rows `[start, start + n)` of frame `name` as float32, for any (traced)
    `start`: one DMA of the aligned `n + unit` rows from `start` rounded down,
    then a dynamic sublane rotate by the residue. `g`: the group member of a
    `"group"` frame, as in `rows`."""
    base, u = self._window(start)
    copy = self._copy(name, base, n + self._unit, g, 0)
    copy.start()
    copy.wait()
    return self._read_f32(name, u, n, 0)

  def stripe_loop(self, lo, hi, reads, body, carry):
    """`carry = body(j, rows, carry)` for `j` in `[lo, hi)`, `rows` the
    float32 windows `reads(j)` (a tuple of `(name, start, n, g)`, one per
    frame), with `DEPTH` stripes' DMAs in flight: the windows of stripe `j`
    land in slot `(j - lo) mod DEPTH`; the prologue starts stripes `lo ..
    lo + DEPTH - 2`, step `j` starts stripe `j + DEPTH - 1` (into the slot
    step `j - 1` has read) and then waits for its own. Only stripes below
    `hi` are started (`pl.when`), so no table entry or window past the
    loop is read, and every started DMA is waited for inside the loop.
    A window that leaves its frame is moved inside it (`_inside`): its rows
    are then not the requested ones, so callers mask every row by its true
    position, and frames hold every window with a row they keep."""
    d = self._depth
    clamped = lambda j: tuple((nm, self._inside(nm, st, n), n, g)  # noqa: E731
                              for nm, st, n, g in reads(j))

    def start(j, slot):
      for name, st, n, g in clamped(j):
        base, _ = self._window(st)
        self._copy(name, base, n + self._unit, g, slot).start()

    for s in range(d - 1):
      pl.when(lo + s < hi)(lambda s=s: start(lo + s, s))

    def step(j, c):
      slot = jax.lax.rem(j - lo, d)
      nxt = j + (d - 1)
      pl.when(nxt < hi)(lambda: start(nxt, jax.lax.rem(nxt - lo, d)))
      rows = []
      for name, st, n, g in clamped(j):
        base, u = self._window(st)
        self._copy(name, base, n + self._unit, g, slot).wait()
        rows.append(self._read_f32(name, u, n, slot))
      return body(j, tuple(rows), c)

    return jax.lax.fori_loop(lo, jnp.maximum(lo, hi), step, carry)

  def store_cols(self, ref, cols, fill):
    """Columns `[G * bq, 1]` (`G` folded query heads) into the lane-dense
    block `ref [G, K, bq]`: row `k` of head `h` is column `k`'s rows `h bq ..
    h bq + bq - 1`; rows `k >= len(cols)` get `fill`. Values go through
    float32 (int32 anchors: exact below 2^24)."""
    g, kk, bq = ref.shape
    sub = jax.lax.broadcasted_iota(jnp.int32, (kk, bq), 0)
    for h in range(g):
      tile = jnp.full((kk, bq), fill, F32)
      for k, c in enumerate(cols):
        row = to_row(c[h * bq:(h + 1) * bq].astype(F32))
        tile = jnp.where(sub == k, row, tile)
      ref[h] = tile.astype(ref.dtype)



def _block_spec(shape, rows, kind, group, skip=0):
  """Block of `(b, h, i)`: `[B, H, L, W]` arrays in `(rows, W)` blocks
  (block `i + skip`: a frame read from row `skip * rows`); lane-dense
  `[B, H, nq, K, rows]` arrays in `(K, rows)` blocks."""
  lead = group if kind == "heads" else None
  hb = (lambda h: h) if kind == "heads" else _head_block(kind, group)
  if len(shape) == 5:
    return pl.BlockSpec((None, lead, None, shape[3], rows),
                        lambda b, h, i, *_: (b, hb(h), i, 0, 0))
  return pl.BlockSpec((None, lead, rows, shape[-1]),
                      lambda b, h, i, *_: (b, hb(h), i + skip, 0))


def launch_tpu(body, *, grid, tables, blocks, frames, outs, group, unit, buf_rows,
               interpret, cost=None, depth=None):
  """Runs `body(ctx, *table_refs, *block_refs, *out_refs)` as a Mosaic kernel;
  `depth`: stripe windows in flight (`_TpuCtx.stripe_loop`; None: `DEPTH`)."""
  depth = DEPTH if depth is None else depth
  names = list(frames)
  kinds = {k: frames[k][1] for k in names}
  nt, nb, nf, no = len(tables), len(blocks), len(names), len(outs)

  in_specs = [_block_spec(a.shape, r, kind, group, *skip) for a, r, kind, *skip in blocks]
  in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in names]
  out_specs = [_block_spec(o[0].shape, o[1], o[2] if len(o) > 2 else "same", group)
               for o in outs]
  scratch = [pltpu.VMEM((depth, buf_rows + unit, frames[k][0].shape[-1]),
                        frames[k][0].dtype) for k in names]
  scratch.append(pltpu.SemaphoreType.DMA((depth, max(nf, 1))))

  def kernel(*refs):
    t = refs[:nt]
    bl = refs[nt:nt + nb]
    fr = dict(zip(names, refs[nt + nb:nt + nb + nf]))
    o = refs[nt + nb + nf:nt + nb + nf + no]
    bufs = dict(zip(names, refs[nt + nb + nf + no:nt + nb + nf + no + nf]))
    sems = refs[-1]
    body(_TpuCtx(fr, bufs, sems, kinds, group, unit, depth), *t, *bl, *o)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=nt, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch)
  return pallas_call(
      kernel, out_shape=[o[0] for o in outs], grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret, cost_estimate=cost,
  )(*tables, *(blk[0] for blk in blocks), *(frames[k][0] for k in names))
