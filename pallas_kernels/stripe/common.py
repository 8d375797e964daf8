"""Logic and kernel bodies shared by the TPU and GPU stripe kernels.

A *stripe* is a fixed offset `delta` between a key row and a query row: for a
block of queries `i0 .. i0 + n - 1` its keys `i0 + delta .. i0 + delta + n - 1`
are one contiguous slice, so a stripe is scored row-wise (no gather). The
same holds transposed: for a block of keys, the queries of a stripe are one
contiguous slice.

**Frames.** Kernels never see negative or out-of-range rows: every sequence
is copied into a zero-padded *frame*, `[B, H, rows, Dp]`, where sequence
position `x` sits at row `front + x` with a static `front` that is a multiple
of the alignment unit. A stripe's key rows for query row `i0` start at
`front + i0 + delta`. The search's frame reaches its farthest stripe. PPA's
frames reach one block (plus the TPU unit) beyond the sequence on both
sides: a stripe window that would leave its frame holds no row the kernel
keeps, and `ctx.stripe_loop` moves it inside (its rows are masked by their
true positions either way); band tiles stay within the sequence. (The same
cut for the search's frame raised the v5e superlinear grad's temporaries
at 1M, 37.85 -> 38.29 GB, so it was left out.)

**Alignment (TPU).** Mosaic DMA windows must start at multiples of 8 rows
(f32) or 16 (bf16/f16), and export does not check that. Query and key blocks
start at multiples of the unit, so a stripe window is misaligned by the
residue `delta mod unit`. Every kernel runs one loop over all its stripes
(`ctx.stripe_loop`) and reads each window as float32 (TPU: the aligned
window one unit longer, rotated by the traced residue), which keeps its Mosaic
compile about `unit` times smaller than one loop per static residue (the
PPA kernels had that: 47K and 42K LLO lines for the forward and dq kernels
at L = 128K, docs/kernels_stripe.md). The tables still list the stripes
in residue groups (`group_by_residue`); a PPA loop visits, group by group,
the run of each group's stripes that reaches a row the block keeps
(`ppa._stripe_loops`). Bands (dense runs of offsets, scored as masked matmul tiles) start
at aligned rows, read through `ctx.rows` with residue 0, and mask the
extra rows. The GPU variant runs the same loops and loads at the exact row.

**Tables** are int32 vectors computed in XLA by the entry functions
(dynamic: they may depend on a traced `q_offset` or on data such as
anchors); kernels read them as scalars.

**Kernel bodies** are written once for both platforms. Each body receives a
context (`ctx.scalar`, `ctx.rows`, below) and its refs. Layout conventions:

  * query-block kernels: grid `(B, Hk, q_blocks)`, folded row `r` of the
    tile is query head `r // block_q` of the group, query row `i = i0 + r mod block_q`;
    a stripe `delta` puts the key of row `i` at key position `i + delta`,
    i.e. at key-frame row `front + i + delta`;
  * key-block kernels: grid `(B, Hk, k_blocks)`, key position `x = x0 + c`;
    the query of stripe `delta` is row `x - delta`, at query-frame row
    `front_q + x - delta`.

Columns are `[n, 1]` arrays (per-row statistics), tiles `[n, W]`. Scores and
softmax statistics are float32; rows a query may not see are zeroed before
use so NaN/Inf junk in them cannot reach an output or a gradient.

**Launchers** (`tpu.launch_tpu`, `gpu.launch_gpu`, thin) give a body its
context:

  * `ctx.scalar(ref, j)`: entry `j` of an int32 table;
  * `ctx.block()`: the program's query / key block (grid axis 2; the GPU
    launches that axis first, `pallas_kernels.common.block_first`);
  * `ctx.rows(name, start, n, u, g=None)`: rows `[start, start + n)` of the
    framed array `name` (`[B, H, rows, W]`) for this program's batch row and
    head (`g`: the query head within the group, for key-block kernels);
    `start - u` is a multiple of the alignment unit, `u` a Python int.
  * `ctx.rows_f32(name, start, n, g=None)`: the same rows as float32 for
    any traced `start`;
  * `ctx.stripe_loop(lo, hi, reads, body, carry)`: `carry = body(j, rows,
    carry)` for `j` in `[lo, hi)`, `rows` the float32 windows `reads(j)`
    (a tuple of `(name, start, n, g)`, as `rows_f32`). TPU keeps
    `tpu.DEPTH` stripes' DMAs in flight (double/triple buffering), starting
    only stripes below `hi`; GPU loads each window in the step. A window
    that leaves its frame is moved inside it, so its rows are not the
    requested ones: bodies mask every stripe row by its true position, and a
    frame needs room only for the windows with a row the body keeps (PPA:
    about `L` rows, not the `L` + farthest offset of an unclamped frame);
  * `ctx.store_cols(ref, cols, fill)`: `K` columns `[G * bq, 1]` into a
    lane-dense output block `[G, K', bq]` (rows past `K` get `fill`; TPU:
    a diagonal sum per head, not a reshape).

`tpu.launch_tpu` serves `rows` by a DMA of the aligned window that starts `u`
rows early (frames stay in HBM, `memory_space=ANY`; tables are scalar-
prefetched into SMEM) and a static slice of the VMEM buffer. `gpu.launch_gpu`
passes frames as whole per-head blocks and loads the exact rows with
`pltriton.load`; tables are ordinary int32 inputs.

Both take the same description of a kernel:
  grid: `(B, H, n)` (H = kv heads, except the gate-logit query-block
    kernels: query heads);
  tables: 1-D int32 arrays (power-of-two length);
  blocks: `(array [B, H', L, W], block_rows, kind)` read as the block
    `[block_rows, W]` at grid position `(b, head, i)` (a 5-D lane-dense
    `[B, H', L / block_rows, K, block_rows]` array: the block `[K,
    block_rows]`);
  frames: `{name: (array [B, H', rows, W], kind)}` read through `ctx.rows`;
  outs: `(ShapeDtypeStruct [B, H', L, W], block_rows[, kind])`, block
    `(b, h, i)` (kind `"same"` unless given), or 5-D lane-dense as in
    `blocks` (search anchors / scores);
  cost: optional `pl.CostEstimate` (from `pallas_kernels.cost`).
`kind` maps the grid's head index to the array's head: `"same"`, `"kv"`
(query head `h` reads kv head `h // group`), `"heads"` (blocks and outs: kv
head `h` reads/writes the block `[group, block_rows, W]` of its `group` query
heads `h * group .. h * group + group - 1`; bodies fold it into `group *
block_rows` rows with `load_heads` / `store_heads`) or `"group"` (kv head
`h` reads the `group` query heads `h * group + g`; frames only).

**GQA sharing.** The search and the PPA forward / dq kernels run one
program per kv head (grid `(B, Hk, q_blocks)`) and fold its `G` query heads
into the rows of the tile: a stripe's `block_q` key rows (or a band's key
tile) are loaded once and serve `G * block_q` query rows, so K/V reads are
`G` times fewer than with one program per query head. The PPA dk/dv kernel
is per kv head already (it loops over the group's query heads, loading
their query rows, which differ per head).
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


def group_by_residue_host(deltas, unit: int, *, sign: int = 1):
  """`group_by_residue` of static deltas (every entry live), on the host.

  Same tables as `group_by_residue(deltas, deltas.size, unit, sign=sign)`
  (stable order), but as program constants: built on the device, the sort,
  gathers and searches compile for XLA:TPU into code linear in the number
  of stripes (docs/kernels_stripe.md, compile time).

  Args:
    deltas: int `[S]` numpy (values in int32 range).
    unit, sign: as in `group_by_residue`.

  Returns:
    `(sorted int32 [S_pad], bounds int32 [unit + 1])` as jnp arrays.
  """
  deltas = np.asarray(deltas, np.int64).reshape(-1).astype(np.int32)
  s = deltas.shape[0]
  key = np.mod(sign * deltas.astype(np.int64), unit)
  order = np.argsort(key, kind="stable")
  bounds = np.searchsorted(key[order], np.arange(unit + 1), side="left").astype(np.int32)
  out = np.pad(deltas[order], (0, next_pow2(max(s, 1)) - s))
  return jnp.asarray(out, jnp.int32), jnp.asarray(bounds, jnp.int32)


def pad_table(x):
  """Pads a 1-D int32 table to a power-of-two length (GPU block shapes)."""
  x = jnp.asarray(x, jnp.int32)
  return jnp.pad(x, (0, next_pow2(max(x.shape[0], 1)) - x.shape[0]))


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


def head_block(kind: str, group: int):
  """Grid head index -> block head index of an array of that `kind`."""
  return {"same": lambda h: h, "kv": lambda h: h // group}[kind]


def load_heads(ref):
  """A `"heads"` block `[G, n, W]` (the group's query heads) -> rows `[G * n, W]`."""
  x = ref[...]
  return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def store_heads(ref, x):
  """Inverse of `load_heads`: rows `[G * n, W]` into the block `[G, n, W]`."""
  ref[...] = x.reshape(ref.shape).astype(ref.dtype)


def repeat_rows(x, group: int):
  """`[n, W]` -> `[group * n, W]`, `x` once per query head of the group."""
  if group == 1:
    return x
  n, w = x.shape
  return jnp.broadcast_to(x[None], (group, n, w)).reshape(group * n, w)


def fold_col(rows: int, block: int, offset=0):
  """Query position of each folded row: `offset + (row mod block)`, `[rows, 1]`."""
  r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  if rows == block:
    return offset + r
  return offset + jax.lax.rem(r, jnp.int32(block))


# ------------------------------------------------------------- kernel bodies


NT = (((1,), (1,)), ((), ()))   # a @ b.T
NN = (((1,), (0,)), ((), ()))   # a @ b
TN = (((0,), (0,)), ((), ()))   # a.T @ b


def col(n, offset=0):
  return offset + jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def row(n, offset=0):
  return offset + jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)


def dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def rowdot(a, b):
  return jnp.sum(a.astype(F32) * b.astype(F32), axis=1, keepdims=True)


# ----------------------------------------------------------------- search


def first_at_least(ctx, ref, count: int, x):
  """Smallest `j` in `[0, count]` with `ref[j] >= x`, for `ref[:count]`
  ascending: a binary search of `count.bit_length()` scalar reads."""
  return first_at_least_in(ctx, ref, jnp.int32(0), jnp.int32(count), x,
                           max(count, 1).bit_length())


def first_at_least_in(ctx, ref, lo, hi, x, steps: int):
  """Smallest `j` in `[lo, hi]` with `ref[j] >= x` (`hi` if none), for
  `ref[lo:hi]` ascending: `steps` halvings (`steps >= (hi - lo).bit_length()`),
  one scalar read each."""
  def step(_, bounds):
    a, c = bounds
    mid = (a + c) // 2                    # < c <= hi while a < c
    below = ctx.scalar(ref, jnp.maximum(jnp.minimum(mid, hi - 1), 0)) < x
    more = a < c
    return (jnp.where(more & below, mid + 1, a), jnp.where(more & ~below, mid, c))

  a, _ = jax.lax.fori_loop(0, steps, step, (lo, hi))
  return a


def search_body(ctx, deltas_ref, q_ref, anc_ref, sc_ref, *, bq, group, num, count, lk,
                front):
  """Running top-`num` over the stripes `deltas` (anchor = row + delta).

  One program serves the `group` query heads of a kv head: their query
  blocks are folded into `group * bq` rows (`load_heads`), and each stripe's
  `bq` key rows are loaded once and repeated for every head. `deltas[:count]`
  is ascending, so the stripes with an anchor in `[0, lk)` for some row of
  the block are one run `[lo, hi)`, found by binary search: the program
  visits only those (a causal prefill skips about a third of the stripes,
  those whose anchors are all before key 0)."""
  i0 = ctx.block() * bq
  q = load_heads(q_ref).astype(F32)
  n = q.shape[0]
  r = fold_col(n, bq, i0)
  state = tuple((jnp.full((n, 1), -jnp.inf, F32), jnp.full((n, 1), INT_MAX, jnp.int32))
                for _ in range(num))

  def reads(j):
    return (("ks", front + i0 + ctx.scalar(deltas_ref, j), bq, None),)

  def body(j, rows, st):
    dl = ctx.scalar(deltas_ref, j)
    kw = repeat_rows(rows[0], group)
    a = r + dl
    ok = (a >= 0) & (a < lk)
    s = jnp.where(ok, rowdot(q, jnp.where(ok, kw, 0.0)), -jnp.inf)
    return topk_insert(st, s, a)

  # One loop over the stripes (any residue: float32 windows), not one per
  # residue: the Mosaic compile of this kernel is then ~`unit` times smaller.
  # Only stripes in [lo, hi) are read (TPU: `DEPTH` windows in flight).
  lo = first_at_least(ctx, deltas_ref, count, -(i0 + bq - 1))   # an anchor >= 0
  hi = first_at_least(ctx, deltas_ref, count, lk - i0)          # every anchor >= lk
  state = ctx.stripe_loop(lo, hi, reads, body, state)
  ctx.store_cols(sc_ref, [s for s, _ in state], -jnp.inf)
  ctx.store_cols(anc_ref, [jnp.where(jnp.isfinite(s), a, -1) for s, a in state], -1)
