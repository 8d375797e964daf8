"""Block logic shared by the TPU and GPU stripe kernels (pure functions).

A *stripe* is a fixed offset `delta` between a key row and a query row: for a
block of queries `i0 .. i0 + n - 1` its keys `i0 + delta .. i0 + delta + n - 1`
are one contiguous slice, so a stripe is scored row-wise (no gather). The
same holds transposed: for a block of keys, the queries of a stripe are one
contiguous slice.

**Frames.** Kernels never see negative or out-of-range rows: every sequence
is copied into a zero-padded *frame*, `[B, H, rows, Dp]`, where sequence
position `x` sits at row `front + x` with a static `front` that is a multiple
of the alignment unit and at least the largest backward reach of any stripe
or band. A stripe's key rows for query row `i0` start at
`front + i0 + delta`.

**Alignment (TPU).** Mosaic DMA windows must start at multiples of 8 rows
(f32) or 16 (bf16/f16), and export does not check that. Query and key blocks
start at multiples of the unit, so a stripe window is misaligned by the
residue `delta mod unit`. Stripes are therefore sorted into `unit` residue
groups (`group_by_residue`), and each group is a loop with a *static*
residue `u`: it DMAs the aligned window that starts `u` rows early (one unit
longer) and reads rows `[u, u + n)` of it with a static slice. Bands (dense
runs of offsets, scored as masked matmul tiles) start at aligned rows and
mask the extra rows instead. The GPU variant runs the same loops and loads
at the exact row.

**Tables** are int32 vectors computed in XLA by the entry functions
(dynamic: they may depend on a traced `q_offset` or on data such as
anchors); kernels read them as scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import F32, next_pow2

# Row-count of "not a valid anchor" in running top-k comparisons.
INT_MAX = np.iinfo(np.int32).max


def align_for(dtype) -> int:
  """Rows of one sublane tile: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def to_frame(x, front: int, rows: int, dp: int):
  """`x: [B, L, H, D]` -> `[B, H, rows, dp]` with row `front + l` = `x[:, l]`.

  Zero elsewhere (rows and the padded head_dim)."""
  b, l, h, d = x.shape
  x = jnp.moveaxis(x, 2, 1)
  return jnp.pad(x, ((0, 0), (0, 0), (front, rows - front - l), (0, dp - d)))


def from_frame(x, front: int, length: int, d: int):
  """Inverse of `to_frame`: `[B, H, rows, dp]` -> `[B, length, H, d]`."""
  return jnp.moveaxis(x[:, :, front:front + length, :d], 1, 2)


def group_by_residue(deltas, count, unit: int, *, sign: int = 1):
  """Sorts stripe offsets into residue groups of `(sign * delta) mod unit`.

  Args:
    deltas: int32 `[S]`; entries at index `>= count` are ignored.
    count: int32 scalar (or int), number of live entries.
    unit: alignment unit (8 or 16).
    sign: +1 to group by the residue of `delta` (query-block loops, key rows
      at `i0 + delta`), -1 by that of `-delta` (key-block loops, query rows at
      `x0 - delta`).

  Returns:
    `(sorted int32 [S_pad], bounds int32 [unit + 1])`: group `u` is
    `sorted[bounds[u]:bounds[u + 1]]`; `S_pad` is `S` rounded up to a power of
    two (GPU blocks), the tail zero.
  """
  deltas = jnp.asarray(deltas, jnp.int32)
  s = deltas.shape[0]
  live = jnp.arange(s, dtype=jnp.int32) < count
  key = jnp.where(live, jnp.mod(sign * deltas, unit), unit)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  bounds = jnp.searchsorted(sorted_key, jnp.arange(unit + 1, dtype=jnp.int32),
                            side="left").astype(jnp.int32)
  out = jnp.pad(deltas[order], (0, next_pow2(max(s, 1)) - s))
  return out, bounds


def pad_table(x):
  """Pads a 1-D int32 table to a power-of-two length (GPU block shapes)."""
  x = jnp.asarray(x, jnp.int32)
  return jnp.pad(x, (0, next_pow2(max(x.shape[0], 1)) - x.shape[0]))


def distinct_offsets(anchors, size: int, lo: int):
  """Distinct values of `anchor - row` over valid anchors (`>= 0`).

  anchors: int32 `[B, L, H, K]` (row = axis 1). The offsets lie in
  `[lo, lo + size)`. Returns `(offsets int32 [size], count)`: the distinct
  offsets first (ascending), then zeros.
  """
  rows = jnp.arange(anchors.shape[1], dtype=jnp.int32)[None, :, None, None]
  off = anchors - rows - lo
  ok = anchors >= 0
  present = jnp.zeros((size,), jnp.bool_).at[jnp.where(ok, off, size)].set(
      True, mode="drop")
  idx = jnp.nonzero(present, size=size, fill_value=0)[0].astype(jnp.int32)
  count = jnp.sum(present).astype(jnp.int32)
  return jnp.where(jnp.arange(size) < count, idx + lo, 0).astype(jnp.int32), count


def topk_insert(state, s, a):
  """Inserts candidate `(score s, anchor a)` (columns `[n, 1]`) into a sorted list.

  `state` is a tuple of `K` `(score, anchor)` column pairs, best first, under
  the order: higher score first, on equal scores the smaller anchor (the
  farther stripe) first; that order is total, so the result does not depend
  on the order in which stripes are visited. Bubble insertion by compare and
  select only (Mosaic TPU has no sort).
  """
  out = []
  for sk, ak in state:
    better = (s > sk) | ((s == sk) & (a < ak))
    out.append((jnp.where(better, s, sk), jnp.where(better, a, ak)))
    s, a = jnp.where(better, sk, s), jnp.where(better, ak, a)
  return tuple(out)


def columns_to_tile(cols, width: int, fill):
  """`K` columns `[n, 1]` -> `[n, width]` (column `k` = `cols[k]`, rest `fill`)."""
  n = cols[0].shape[0]
  lane = jax.lax.broadcasted_iota(jnp.int32, (n, width), 1)
  out = jnp.full((n, width), fill, cols[0].dtype)
  for k, c in enumerate(cols):
    out = jnp.where(lane == k, c, out)
  return out
