"""GPU (Pallas Triton) launcher of the stripe kernels; see `common.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.stripe.common import head_block as _head_block
from pallas_kernels.common import block_first_call, block_first_id


def _wide_f32(dtype, dp: int) -> bool:
  return jnp.dtype(dtype).itemsize >= 4 and dp > 64


def ppa_rows(plat: str, dtype, dp: int) -> int | None:
  """Default rows of the PPA band key tiles (forward, dq) and dk/dv key
  blocks when none is requested: GPU float32 at padded head_dim `dp > 64`,
  and any dtype at `dp > 128`, 32; else None (`ops._block`'s default, GPU
  64). float32 tiles hold twice the registers of 16-bit ones: at 64 rows the
  PPA kernels spilled at head_dim 128, and 16 rows left 16 B of spills in
  dk/dv; 32 rows with the dq kernel's `reload_q` spill nothing
  (docs/kernels_stripe.md)."""
  wide = _wide_f32(dtype, dp) or dp > 128
  return 32 if plat != "tpu" and wide else None


def ppa_chunk_rows(plat: str) -> int | None:
  """Default query rows of a dk/dv band chunk: GPU 32 (at 64 the bf16 dk/dv
  kernel sat at 255 registers and spilled 48 B at L = 1M; the chunk's rows
  are loaded once either way), else None (`ops._block`'s default)."""
  return 32 if plat != "tpu" else None


def ppa_fwd_warps(dtype, dp: int) -> int:
  """Warps of the PPA forward kernel: float32 at `dp > 64` and any dtype at
  `dp > 128` 8 (4 spilled 304 B at head_dim 128 float32, 1372 B at 256),
  else 4."""
  return 8 if _wide_f32(dtype, dp) or dp > 128 else 4


class _GpuCtx:
  def __init__(self, frames, kinds):
    self._frames, self._kinds = frames, kinds

  def scalar(self, ref, j):
    return ref[j]

  def block(self):
    """This program's query (or key) block: logical grid axis 2, launched
    first (`common.block_first`)."""
    return block_first_id(2)

  def rows(self, name, start, n, u, g=None):
    del u
    ref = self._frames[name]
    if self._kinds[name] == "group":   # one indexer (Triton takes no chains)
      return pltriton.load(ref.at[g, pl.ds(start, n), :])
    return pltriton.load(ref.at[pl.ds(start, n), :])

  def rows_f32(self, name, start, n, g=None):
    """Rows `[start, start + n)` of frame `name` as float32 (any start)."""
    return self.rows(name, start, n, 0, g).astype(jnp.float32)

  def _inside(self, name, start, n):
    """A stripe window's `start` moved into the frame (`stripe_loop`)."""
    return jnp.clip(start, 0, self._frames[name].shape[-2] - n)

  def stripe_loop(self, lo, hi, reads, body, carry):
    """`carry = body(j, rows, carry)` for `j` in `[lo, hi)`, `rows` the
    float32 windows `reads(j)` (`(name, start, n, g)` each), loaded at the
    exact rows (the TPU context overlaps these loads with the loop). A
    window that leaves its frame is moved inside it, as on the TPU
    (`tpu._TpuCtx.stripe_loop`): callers mask rows by their true position."""
    def step(j, c):
      return body(j, tuple(self.rows_f32(nm, self._inside(nm, st, n), n, g)
                           for nm, st, n, g in reads(j)), c)

    return jax.lax.fori_loop(lo, jnp.maximum(lo, hi), step, carry)

  def store_cols(self, ref, cols, fill):
    """Columns `[G * bq, 1]` into the lane-dense block `ref [G, K, bq]`
    (as `tpu._TpuCtx.store_cols`; here a register reshape)."""
    g, kk, bq = ref.shape
    sub = jax.lax.broadcasted_iota(jnp.int32, (g, kk, bq), 1)
    out = jnp.full((g, kk, bq), fill, ref.dtype)
    for k, c in enumerate(cols):
      out = jnp.where(sub == k, c.astype(ref.dtype).reshape(g, 1, bq), out)
    ref[...] = out



def launch_gpu(body, *, grid, tables, blocks, frames, outs, group, unit, buf_rows,
               interpret, num_warps=4, cost=None):
  """Runs `body(ctx, *table_refs, *block_refs, *out_refs)` as a Triton kernel."""
  del unit, buf_rows
  names = list(frames)
  kinds = {k: frames[k][1] for k in names}
  nt, nb, nf = len(tables), len(blocks), len(names)

  def block_spec(shape, rows, kind, skip=0):
    """`[B, H, L, W]` in `(rows, W)` blocks (block `i + skip`); lane-dense
    `[B, H, nq, K, rows]` in `(K, rows)` blocks (as `tpu._block_spec`)."""
    lead = group if kind == "heads" else None
    hb = (lambda h: h) if kind == "heads" else _head_block(kind, group)
    if len(shape) == 5:
      return pl.BlockSpec((None, lead, None, shape[3], rows),
                          lambda b, h, i: (b, hb(h), i, 0, 0))
    return pl.BlockSpec((None, lead, rows, shape[-1]), lambda b, h, i: (b, hb(h), i + skip, 0))

  def frame_spec(arr, kind):
    _, _, rows, w = arr.shape
    if kind == "group":
      return pl.BlockSpec((None, group, rows, w), lambda b, h, i: (b, h, 0, 0))
    hb = _head_block(kind, group)
    return pl.BlockSpec((None, None, rows, w), lambda b, h, i: (b, hb(h), 0, 0))

  in_specs = [pl.BlockSpec(t.shape, lambda b, h, i: (0,)) for t in tables]
  in_specs += [block_spec(a.shape, r, kind, *skip) for a, r, kind, *skip in blocks]
  in_specs += [frame_spec(frames[k][0], kinds[k]) for k in names]
  out_specs = [block_spec(o[0].shape, o[1], o[2] if len(o) > 2 else "same")
               for o in outs]

  def kernel(*refs):
    t = refs[:nt]
    bl = refs[nt:nt + nb]
    fr = dict(zip(names, refs[nt + nb:nt + nb + nf]))
    o = refs[nt + nb + nf:]
    body(_GpuCtx(fr, kinds), *t, *bl, *o)

  return block_first_call(
      kernel, out_shape=[o[0] for o in outs], grid=grid, in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, cost_estimate=cost,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
  )(*tables, *(blk[0] for blk in blocks), *(frames[k][0] for k in names))


