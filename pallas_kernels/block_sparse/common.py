"""Block logic shared by every platform variant of block-sparse flash attention.

Everything here is plain `jnp`/scalar arithmetic usable inside a TPU
(Mosaic) kernel, a GPU (Triton) kernel and outside kernels: the static
`Spec`, the device-side tables, which key block a grid step / loop step
visits, whether its tile needs a mask, the tile mask itself and the per-tile
online-softmax and gradient math.

Two table modes (`Spec.mode`):

  * `"band"`: query at absolute position `p = q_offset + r` sees key `c` iff
    `0 <= p - c < window` (`window = CAUSAL`: causal). The key blocks of
    query block `i` are the contiguous run `lo[i] .. lo[i] + count[i] - 1`,
    computed on the device from a possibly traced `q_offset`; partial tiles
    are masked from iota positions. Tables are O(number of blocks).
  * `"table"`: per query block a padded list of key blocks and per slot a
    mask id (`FULL = 1`, partial >= 2) into deduplicated `[bq, bk]` tiles,
    or (`Spec.diag_masks`) into diagonal vectors: when every mask is
    constant along its diagonals (causal edges, sliding windows, PPA), mask
    `m` is one int32 `[1, n]` row with entry `j - i + bq - 1` for tile entry
    `(i, j)` (`diagonal_masks`); the kernels expand it to the tile (a gather
    on GPU, a strided lane roll on TPU), so a masked tile reads `4 n` bytes
    of mask instead of `4 bq bk`.

Tables are flat int32 vectors (`[rows * width]`: SMEM-friendly on TPU);
padding slots repeat the last valid key block (TPU then skips the DMA) and
are skipped by the kernels (`slot < count`).

Layouts (all variants): `q: [B, Hq, Lq_pad, Dp]`, `k, v: [B, Hk, Lk_pad, Dp]`
with `Lq_pad = nq * bq`, `Lk_pad = nk * bk`, `Dp >= head_dim` zero padded;
`lse, delta: [B, Hq, Lq_pad]` float32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import F32, LANES

CAUSAL = 1 << 30          # band window meaning "no lower limit"
FULL = 1                  # mask id of a tile without masking
NEG = -0.7 * float(np.finfo(np.float32).max)   # finite "minus infinity"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one block-sparse attention call."""

  mode: str          # "band" | "table"
  q_len: int         # real (unpadded) lengths
  kv_len: int
  block_q: int
  block_k: int
  num_q_blocks: int
  num_k_blocks: int
  width: int         # key-block slots per query block (forward, dq)
  width_t: int       # query-block slots per key block (dkv)
  groups: int        # query heads per kv head
  scale: float
  window: int = CAUSAL
  count_visits: bool = False
  sub_q: int = 1     # table mode, GPU: kernel query blocks per layout query block
  sub_k: int = 1     # table mode, GPU: kernel key blocks per layout key block
  gpu_blocks: object = None   # GPU: `gpu.GpuBlocks` per pass (None: `gpu.default_blocks`)
  # Cost estimates only: table mode, the layout's non-empty tiles; band mode,
  # the q_offset to count tiles at (the real one when static).
  tiles: int = 0
  offset_hint: int = 0
  diag_masks: bool = False   # table mode: `block_masks` are `[M, 1, n]` diagonal rows
  fold: int = 1      # band mode: query rows per position (`fold` heads of a kv head
                     # folded into the rows: row r sits at position q_offset + r // fold)


class Tables(NamedTuple):
  """Device tables of one call (int32), named as in `attn.BlockLayout`; `_t`:
  the same per key block (transposed). Band mode: `kv_blocks`/`kv_blocks_t`
  hold one first block per row and `mask_ids`/`mask_ids_t`/`block_masks` are
  unused dummies."""

  kv_blocks: jax.Array        # band: [nq] first key block; table: [nq * width]
  num_kv_blocks: jax.Array    # [nq] non-empty tiles per query block
  mask_ids: jax.Array         # table: [nq * width] ids into block_masks; band: [1]
  kv_blocks_t: jax.Array      # band: [nk]; table: [nk * width_t] query blocks per key block
  num_kv_blocks_t: jax.Array  # [nk]
  mask_ids_t: jax.Array       # table: [nk * width_t]; band: [1]
  block_masks: jax.Array      # table: [num_masks, bq, bk] 0/1, or with
                              # `Spec.diag_masks` [num_masks, 1, n]; band: [1, 1, 1]
  q_offset: jax.Array   # [2]: absolute position of query row 0, and the key
                        # limit (keys at or past it are never visible; band)
  # Slots needing no mask per row: `full_start[i] .. full_start[i] + num_full[i] - 1`
  # (table layouts list full tiles first, so `full_start` is 0 there).
  full_start: jax.Array       # [nq]
  num_full: jax.Array         # [nq]
  full_start_t: jax.Array     # [nk]
  num_full_t: jax.Array       # [nk]


# ------------------------------------------------------------ static choices


def band_width(q_len, kv_len, window, block_q, block_k) -> int:
  """Static bound on key blocks per query block for a band mask."""
  nk = -(-kv_len // block_k)
  if window >= CAUSAL:
    return nk
  # keys of one query block span at most block_q + window - 1 positions
  return max(1, min(nk, (block_q + window - 3) // block_k + 2))


def band_width_t(q_len, kv_len, window, block_q, block_k, fold: int = 1) -> int:
  """Static bound on query blocks per key block for a band mask (`q_len`
  rows, `fold` rows per position)."""
  nq = -(-q_len // block_q)
  if window >= CAUSAL:
    return nq
  return max(1, min(nq, ((block_k + window - 1) * fold - 2) // block_q + 2))


def pad_last(x, size: int):
  """Zero pads the last dim of `x` to `size` (no copy when already there)."""
  extra = size - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def tile_count(spec: Spec) -> int:
  """Static non-empty (sub-)tiles per (batch, head) of `spec`, for cost
  estimates: band mode counted at `spec.offset_hint` (host arithmetic)."""
  if spec.mode == "table":
    return spec.tiles * spec.sub_q * spec.sub_k
  bq, bk, w, qo = spec.block_q, spec.block_k, spec.window, spec.offset_hint
  r0 = np.arange(-(-spec.q_len // bq)) * bq
  r1 = np.minimum(r0 + bq, spec.q_len) - 1
  p0, p1 = qo + r0 // spec.fold, qo + r1 // spec.fold
  kmin = np.maximum(p0 - (w - 1), 0) if w < CAUSAL else np.zeros_like(r0)
  kmax = np.minimum(p1, spec.kv_len - 1)
  n = np.where(kmin <= kmax, np.maximum(kmax, 0) // bk - kmin // bk + 1, 0)
  return int(np.minimum(n, spec.width).sum())


# ------------------------------------------------------- diagonal masks


def diag_width(block_q: int, block_k: int) -> int:
  """Lanes `n` of a diagonal mask row: `block_q + block_k - 1` rounded up to
  a multiple of 128 (a whole number of TPU lane tiles)."""
  return -(-(block_q + block_k - 1) // LANES) * LANES


def diagonal_masks(block_masks: np.ndarray, rows: np.ndarray, cols: np.ndarray):
  """Host: the masks as diagonal rows, or None when one is not diagonal.

  Args:
    block_masks: `[M, bq, bk]` 0/1 tile masks.
    rows, cols: int `[M]`: the real rows / columns of the tiles each mask
      is used at (the most over its uses; the kernels mask rows `>= q_len`
      and keys `>= kv_len` from positions, so entries past them are free).

  Returns int32 `[M, 1, n]` (`n = diag_width(bq, bk)`) with entry
  `j - i + bq - 1` equal to mask entry `(i, j)` for every real `(i, j)`
  (0 on diagonals with no real entry), or None when some mask has two
  different values on one diagonal.
  """
  masks = np.asarray(block_masks).astype(bool)
  num, bq, bk = masks.shape
  n = diag_width(bq, bk)
  i = np.arange(bq)[:, None]
  j = np.arange(bk)[None, :]
  diag = np.broadcast_to(j - i + bq - 1, (bq, bk))
  real = (i[None] < np.asarray(rows)[:, None, None]) & (j[None] < np.asarray(cols)[:, None, None])
  # Skew: entry (i, j) moves to column j - i + bq - 1, so a diagonal is a column.
  hi = np.zeros((num, bq, n), bool)     # any real entry set on the diagonal
  lo = np.ones((num, bq, n), bool)      # every real entry set on the diagonal
  rr = np.broadcast_to(i, (bq, bk))
  hi[:, rr, diag] = masks & real
  lo[:, rr, diag] = masks | ~real
  hi, lo = hi.any(axis=1), lo.all(axis=1)
  if np.any(hi & ~lo):
    return None
  return hi.astype(np.int32)[:, None, :]


# ------------------------------------------------------ device band tables


def _limit(spec: Spec, kv_limit):
  """Keys `>= limit` are never visible: `kv_len`, or a traced smaller bound."""
  return spec.kv_len if kv_limit is None else jnp.minimum(kv_limit, spec.kv_len)


def band_tables(q_offset, spec: Spec, kv_limit=None) -> Tables:
  """Band tables from a (possibly traced) int32 `q_offset`, on the device.

  `kv_limit` (int32 scalar, may be traced): keys at or past it are seen by no
  query (a decode frame's last valid position + 1); default `kv_len`.
  """
  bq, bk, w = spec.block_q, spec.block_k, spec.window
  qo = jnp.asarray(q_offset, jnp.int32).reshape(())
  lim = jnp.asarray(_limit(spec, kv_limit), jnp.int32).reshape(())
  # Query block i: rows [r0, r1] at positions [p0, p1] ->
  # keys [max(p0 - w + 1, 0), min(p1, kv_len - 1)].
  f = spec.fold
  r0 = jnp.arange(spec.num_q_blocks, dtype=jnp.int32) * bq
  r1 = jnp.minimum(r0 + bq, spec.q_len) - 1
  p0, p1 = qo + _positions(r0, f), qo + _positions(r1, f)
  kmin = jnp.maximum(p0 - (w - 1), 0) if w < CAUSAL else jnp.zeros_like(r0)
  kmax = jnp.minimum(p1, lim - 1)
  lo, counts = _run(kmin, kmax, bk, spec.width)
  counts = jnp.where(r0 < spec.q_len, counts, 0)       # blocks of padding rows only
  # Full key blocks: every real row sees every key (and no key is past kv_len).
  fmin = ((p1 - w) // bk + 1) if w < CAUSAL else jnp.zeros_like(r0)
  fmax = jnp.minimum((p0 + 1) // bk - 1, lim // bk - 1)
  fs, nf = _clip_run(fmin, fmax, lo, counts)
  # Key block j: keys [c0, c1] -> positions [c0, c1 + w - 1] -> rows
  # [(c0 - qo) f, (c1 + w - qo) f - 1] within [0, q_len - 1].
  c0 = jnp.arange(spec.num_k_blocks, dtype=jnp.int32) * bk
  c1 = jnp.minimum(c0 + bk, spec.kv_len) - 1
  rmin = jnp.maximum(c0 - qo, 0) * f
  rmax = jnp.minimum((c1 + w - qo) * f - 1, spec.q_len - 1) if w < CAUSAL else jnp.full_like(
      c0, spec.q_len - 1)
  lo_t, counts_t = _run(rmin, rmax, bq, spec.width_t)
  counts_t = jnp.where(c0 < lim, counts_t, 0)          # blocks of padding keys only
  # Full query blocks of key block j (rows bounded by the padded block end):
  # every row at a position >= c0 + bk - 1, and (window) <= c0 + w - 1.
  tmin = -(((c0 + bk - 1 - qo) * f) // -bq)
  tmax = (((c0 + w - qo) * f - bq) // bq) if w < CAUSAL else jnp.full_like(
      c0, spec.num_q_blocks)
  tmax = jnp.where(c0 + bk <= lim, tmax, -1)
  fs_t, nf_t = _clip_run(tmin, tmax, lo_t, counts_t)
  dummy = jnp.zeros((1,), jnp.int32)
  return Tables(lo, counts, dummy, lo_t, counts_t, dummy,
                jnp.zeros((1, 1, 1), jnp.int32), jnp.stack([qo, lim]), fs, nf, fs_t, nf_t)


def _clip_run(first, last, lo, count):
  """`(start slot, length)` of blocks `[first, last]` within the run
  `lo .. lo + count - 1` (length 0 and start 0 when they do not meet)."""
  a = jnp.maximum(first, lo)
  b = jnp.minimum(last, lo + count - 1)
  n = jnp.maximum(b - a + 1, 0)
  return jnp.where(n > 0, a - lo, 0).astype(jnp.int32), n.astype(jnp.int32)


def _run(first, last, block, width):
  """Blocks covering positions `[first, last]` (empty if first > last)."""
  lo = jnp.maximum(first, 0) // block
  hi = jnp.maximum(last, 0) // block
  n = jnp.where(first <= last, jnp.minimum(hi - lo + 1, width), 0)
  return jnp.where(n > 0, lo, 0).astype(jnp.int32), n.astype(jnp.int32)


# ------------------------------------------------ per grid step / loop step


def _positions(rows, fold: int):
  """Offsets from `q_offset` of query rows `>= 0` (`fold` rows per
  position): the rows themselves at `fold == 1`, a shift for a power of two,
  else a truncating division (jnp's sign-fixing floor division costs
  registers in the Triton kernels)."""
  if fold == 1:
    return rows
  if isinstance(rows, int):
    return rows // fold
  if fold & (fold - 1) == 0:
    return jax.lax.shift_right_logical(rows, jnp.asarray(fold.bit_length() - 1, rows.dtype))
  return jax.lax.div(rows, jnp.asarray(fold, rows.dtype))


def slot_block(spec: Spec, blocks, counts, row, slot, width):
  """Block index visited at `slot` of `row` (padding repeats the last one)."""
  if spec.mode == "band":
    return blocks[row] + jnp.minimum(slot, jnp.maximum(counts[row] - 1, 0))
  return blocks[row * width + slot]


def slot_mask_id(spec: Spec, masks, row, slot, width):
  if spec.mode == "band":
    return jnp.int32(0)
  return masks[row * width + slot]


def needs_mask(spec: Spec, qb, kb, q_offset, mask_id, kv_limit=None):
  """Scalar: whether tile (query block `qb`, key block `kb`) must be masked.

  False only when every entry of the tile whose query row is real
  (`< q_len`) is visible and the key block has no padding past `kv_len`.
  """
  bq, bk = spec.block_q, spec.block_k
  edge = (kb + 1) * bk > _limit(spec, kv_limit)
  if spec.mode == "table":
    return (mask_id != FULL) | edge
  r0 = qb * bq
  r1 = jnp.minimum(r0 + bq, spec.q_len) - 1
  dmin = q_offset + _positions(r0, spec.fold) - (kb * bk + bk - 1)
  dmax = q_offset + _positions(r1, spec.fold) - kb * bk
  return (dmin < 0) | (dmax >= spec.window) | edge


def tile_visible(spec: Spec, qb, kb, q_offset, tile=None, kv_limit=None):
  """Bool `[bq, bk]`: which entries of the tile are visible."""
  bq, bk = spec.block_q, spec.block_k
  r = qb * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  c = kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  ok = (r < spec.q_len) & (c < _limit(spec, kv_limit))
  if spec.mode == "table":
    return ok & (tile != 0)
  d = q_offset + _positions(r, spec.fold) - c
  ok = ok & (d >= 0)
  if spec.window < CAUSAL:
    ok = ok & (d < spec.window)
  return ok


def keys_seen(spec: Spec, kb, q_offset, shape, kv_limit=None):
  """Bool `shape = [bk, Dp]`: key rows of block `kb` that some query sees.

  Band mode only (table layouts zero unseen keys before the kernel). Rows no
  query may see are zeroed before use, so NaN/Inf there never reaches an
  output or gradient (0 * NaN is NaN).
  """
  c = kb * spec.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  last = q_offset + _positions(spec.q_len - 1, spec.fold)
  ok = (c <= last) & (c < _limit(spec, kv_limit))
  if spec.window < CAUSAL:
    ok = ok & (c > q_offset - spec.window)
  return ok


def zero_unseen(spec: Spec, kb, q_offset, *tiles, kv_limit=None):
  """`tiles` (key-aligned `[bk, Dp]` blocks of key block `kb`) with the rows
  no query may see zeroed (`keys_seen`); table layouts are returned as they
  are (their unseen keys are zeroed before the kernel)."""
  if spec.mode != "band":
    return tiles
  seen = keys_seen(spec, kb, q_offset, tiles[0].shape, kv_limit)
  return tuple(jnp.where(seen, x, 0) for x in tiles)


# ---------------------------------------------------------------- tile math


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dot(a, b, contract=(1, 0)):
  """`a . b` contracting `a`'s dim `contract[0]` with `b`'s `contract[1]`, f32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=F32, precision=_precision(a.dtype))


def online_step(s, visible, m_prev, l_prev, exp=jnp.exp):
  """One key tile of the online softmax.

  Args:
    s: f32 `[bq, bk]` scaled scores; visible: bool `[bq, bk]` or None (all).
    m_prev, l_prev: f32 `[bq, 1]` running max / normaliser.

  Returns `(m_new, l_new, p, alpha)`: `p [bq, bk]` unnormalised
  probabilities (exactly 0 where not visible), `alpha` rescales the old sum.
  `exp=jnp.exp2` runs the same step on scores in base-2 units (`s * log2(e)`).
  """
  if visible is not None:
    s_max = jnp.where(visible, s, NEG)
  else:
    s_max = s
  m_new = jnp.maximum(m_prev, jnp.max(s_max, axis=1, keepdims=True))
  p = exp(s - m_new)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  alpha = exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  return m_new, l_new, p, alpha


def finish(acc, m, l, base2: bool = False):
  """`(out, lse)`: `acc / l` (0 where nothing is visible) and `m + log l`
  (`+inf` where nothing is visible, so the backward's `exp(s - lse)` is 0).
  `base2`: `m` is in base-2 units; `lse` is returned in natural units."""
  seen = l > 0
  out = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0)
  safe_l = jnp.where(seen, l, 1.0)
  lse = (m + jnp.log2(safe_l)) * LN2 if base2 else m + jnp.log(safe_l)
  return out, jnp.where(seen, lse, jnp.inf)


def bwd_probs(s, visible, lse, dp, delta):
  """`(p, ds)` of a tile: `p = exp(s - lse)` (0 where not visible) and
  `ds = p * (dp - delta)`; `s, dp: [bq, bk]`, `lse, delta: [bq, 1]`."""
  p = jnp.exp(s - lse)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return p, p * (dp - delta)


def bwd_tile(spec: Spec, kb, q_offset, q, k, v, do, lse, delta, visible=None, kv_limit=None):
  """One backward tile: `(k, p, ds)` for `q, do: [bq, D]`, `k, v: [bk, D]`,
  `lse, delta: [bq, 1]`. `visible` (`[bq, bk]` bool) marks a masked tile:
  its keys no query may see are zeroed first (`zero_unseen`) and the returned
  `k` is the zeroed one; None is an interior tile, used as it is."""
  if visible is not None:
    k, v = zero_unseen(spec, kb, q_offset, k, v, kv_limit=kv_limit)
  s = dot(q, k, (1, 1)) * spec.scale
  p, ds = bwd_probs(s, visible, lse, dot(do, v, (1, 1)), delta)
  return k, p, ds
