"""Logic shared by the TPU and GPU span kernels: tables and tile arithmetic.

The kernels of this family compute *interval attention*: every row `r` of a
row tensor (a query of one head) attends the contiguous key range
`[lo[r], hi[r]]` (inclusive; empty when `hi < lo`). Superlinear span
attention is two such calls:

  * the **window**: rows are the queries (head-major: the query heads of a
    row head one after another), `[pos - W + 1, pos]`;
  * the **spans**: rows are the (slot, head, query) pairs, sorted by span
    start, `[max(a - back(t), 0), min(a + fwd(t), pos - W)]`.

Rows live in *row heads* (`row_heads`): each holds the rows of some query
heads of one kv head's group (all of them with 8 or more kv heads; one per
row head for 8:2), and reads that kv head's K/V.

Rows are cut into tiles of `block_q` rows. A tile visits the key blocks
(`block_k` keys each) covering the union `[min lo, max hi]` of its non-empty
rows, with per-row masks. Because span rows are sorted by start, the rows of
a tile have nearly equal starts and their spans overlap almost entirely:
a tile visits at most `(max_span + block_k) / block_k + spread` blocks, where
the spreads of all tiles of a head sum to at most the number of key blocks.
The work is therefore bounded by the sum of the span lengths (plus one block
per tile), whatever anchors the search chose, and no span is ever cut short.

Shapes: rows `[B, H, R]` (`R` a multiple of `block_q`), tables per tile
`[B, H, R // block_q]`, per key block `[B, H, Lk // block_k]`.

**Per-tile arithmetic** (`precision_for` onwards) is shared by the TPU and
GPU variants. A tile is `block_q` rows (queries of one head, or (slot, head, query)
pairs) against one block of `block_k` keys starting at key position
`k_start`. Every function here works on loaded values; the platform variants
only differ in how they load and store.

Masking (the NaN rules): scores and probabilities are masked with
`jnp.where`, never by adding `-inf` or multiplying by 0, and the key/value
rows of a block outside the tile's key union `[tile_lo, tile_hi]` are zeroed
before they enter a matmul, so NaN/Inf in keys no row may see (e.g. junk
beyond the end of a KV cache) never reaches an output or a gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32
from pallas_kernels.span.scan import scan

EMPTY_LO, EMPTY_HI = 0, -1
_BIG = jnp.iinfo(jnp.int32).max


ROW_HEADS = 8   # sublanes of a 32-bit TPU tile


def row_heads(q_heads: int, kv_heads: int) -> int:
  """Row heads of span attention's per-row tables `[B, hv, n]`: among the
  counts `kv_heads * m` (`m` dividing the group `q_heads / kv_heads`), the
  fewest that is a multiple of `ROW_HEADS`, else the fewest that is at
  least `ROW_HEADS`, else `q_heads`. Each row head holds the rows of
  `q_heads / hv` query heads of one kv head's group.

  XLA:TPU tiles the two minor axes of `[B, hv, n]` by `(min(hv, 8), 128)`:
  with 2 kv heads, tables per kv head fill a quarter of each tile, and the
  glue's elementwise programs, gathers and relayouts over them compile (and
  run) on four times the tiles. 32:8 heads keep one row head per kv head.
  """
  group = q_heads // kv_heads
  counts = [kv_heads * m for m in range(1, group + 1) if group % m == 0]
  for ok in (lambda n: n % ROW_HEADS == 0, lambda n: n >= ROW_HEADS):
    fits = [n for n in counts if ok(n)]
    if fits:
      return fits[0]
  return q_heads


def tile_bounds(lo, hi, block_q: int):
  """Key range each tile must visit: the union of its non-empty rows.

  Args:
    lo, hi: int32 `[B, H, R]` row bounds (inclusive; `hi < lo` = empty).
    block_q: rows per tile (`R % block_q == 0`).

  Returns:
    `(tile_lo, tile_hi)` int32 `[B, H, R // block_q]`; an all-empty tile
    gets `(0, -1)`.
  """
  b, h, r = lo.shape
  nonempty = hi >= lo
  lo_t = jnp.where(nonempty, lo, _BIG).reshape(b, h, r // block_q, block_q).min(-1)
  hi_t = jnp.where(nonempty, hi, -1).reshape(b, h, r // block_q, block_q).max(-1)
  any_t = hi_t >= 0
  return jnp.where(any_t, lo_t, EMPTY_LO).astype(jnp.int32), hi_t.astype(jnp.int32)


def tile_blocks(tile_lo, tile_hi, block_k: int):
  """First key block and number of key blocks a tile visits (0 if empty)."""
  first = tile_lo // block_k
  count = jnp.where(tile_hi >= tile_lo, tile_hi // block_k - first + 1, 0)
  return first.astype(jnp.int32), count.astype(jnp.int32)


def key_block_tiles(tile_lo, tile_hi, num_key_blocks: int, block_k: int):
  """For each key block, a contiguous range of tiles holding every tile that
  visits it (used by the dk/dv kernel, which loops over tiles per key block).

  A tile visits key block `c` iff `first_t <= c <= last_t`. With the suffix
  minimum of `first` and the prefix maximum of `last` (both monotone) the
  visiting tiles lie in `[t0, t1]`, `t0` = first tile whose prefix-max
  `last >= c`, `t1` = last tile whose suffix-min `first <= c`. That holds for
  any row order; for rows sorted by start the range holds (almost) only
  visiting tiles. Tiles in the range that do not visit `c` contribute zero
  (their row masks exclude the block).

  Returns:
    `(t0, count)` int32 `[B, H, num_key_blocks]`.
  """
  nonempty = tile_hi >= tile_lo
  first = jnp.where(nonempty, tile_lo // block_k, num_key_blocks)
  last = jnp.where(nonempty, tile_hi // block_k, -1)
  suffix_min_first = scan(first, "min", reverse=True)
  prefix_max_last = scan(last, "max")
  c = jnp.arange(num_key_blocks, dtype=jnp.int32)
  search = jax.vmap(jax.vmap(lambda a, v, side: jnp.searchsorted(a, v, side=side),
                             in_axes=(0, None, None)), in_axes=(0, None, None))
  t0 = search(prefix_max_last, c, "left")
  t1 = search(suffix_min_first, c, "right") - 1
  count = jnp.maximum(t1 - t0 + 1, 0)
  return t0.astype(jnp.int32), count.astype(jnp.int32)


def window_bounds(pos, window: int, kv_len: int):
  """Row bounds of the window `[pos - W + 1, pos]` (clipped to the keys).

  `pos`: int32 absolute query positions (any shape); `window = 0`: empty.
  """
  if window <= 0:
    return jnp.full_like(pos, EMPTY_LO), jnp.full_like(pos, EMPTY_HI)
  lo = jnp.maximum(pos - window + 1, 0)
  hi = jnp.minimum(pos, kv_len - 1)
  empty = hi < lo
  return jnp.where(empty, EMPTY_LO, lo), jnp.where(empty, EMPTY_HI, hi)


def sort_rows_by_start(lo, hi):
  """Permutation `[B, H, N]` ordering rows by start, empty rows last.

  Sorting makes the rows of a tile start close together, so a tile's key
  union is about one span long (see the module docstring). Rows with equal
  starts come in an unspecified (deterministic) order: the kernels accept
  any order, and XLA:TPU compiles an unstable two-operand sort in about two
  thirds of the time of `jnp.argsort(stable=True)`.
  """
  key = jnp.where(hi >= lo, lo, _BIG)
  iota = jax.lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
  _, perm = jax.lax.sort((key, iota), dimension=key.ndim - 1, num_keys=1, is_stable=False)
  return perm


def inverse_permutation(perm):
  """int32 `[..., N]` inverse of a permutation along the last axis, by one
  scatter (`inv[perm[i]] = i`, indices declared unique and in bounds), not a
  second sort."""
  n = perm.shape[-1]
  flat = perm.reshape(-1, n)
  idx = jnp.arange(n, dtype=jnp.int32)
  put = lambda p: jnp.zeros_like(p).at[p].set(idx, unique_indices=True,  # noqa: E731
                                              mode="promise_in_bounds")
  return jax.vmap(put)(flat).reshape(perm.shape)


def gate_merge_weights(lse_s, lse_w, gates):
  """Per-row weights of the merged, gated output `sum_k c_k O_k + c_w O_w`.

  Slot `k`'s softmax over `span_k U window` is `(w_k O_k + v_k O_w) /
  (w_k + v_k)` with `w_k = exp(lse_k - m_k)`, `v_k = exp(lse_w - m_k)`, so
  `c_k = g_k w_k / (w_k + v_k)` and `c_w = sum_k g_k v_k / (w_k + v_k)`.

  Slots travel as sequences of same-shape row arrays, not as a slot axis:
  XLA:TPU compiles a broadcast or reduction over a tiny second-minor axis
  into code linear in the row count.

  Args:
    lse_s: `K` float32 `[..., R]` span log-sum-exps (-inf = empty);
    lse_w: float32 `[..., R]` window log-sum-exps;
    gates: `K` float32 `[..., R]`.

  Returns:
    `(c_s, c_w)`: a tuple of `K` float32 `[..., R]` and float32 `[..., R]`;
    both parts empty gives 0 (no NaN in values or gradients).
  """
  c_s, c_w = [], None
  for ls, g in zip(lse_s, gates, strict=True):
    m = jax.lax.stop_gradient(jnp.maximum(ls, lse_w))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    ws, ww = jnp.exp(ls - m), jnp.exp(lse_w - m)
    tot = ws + ww
    tot = jnp.where(tot > 0, tot, 1.0)
    c_s.append(g * ws / tot)
    part = g * ww / tot
    c_w = part if c_w is None else c_w + part
  return tuple(c_s), c_w


def slot_softmax(xs):
  """`jax.nn.softmax` across the `K` slots of `K` same-shape arrays (a
  tuple back): the slots stay separate arrays, never a tiny minor axis."""
  m = jax.lax.stop_gradient(functools.reduce(jnp.maximum, xs))
  es = [jnp.exp(x - m) for x in xs]
  tot = functools.reduce(jnp.add, es)
  return tuple(e / tot for e in es)


# ------------------------------------------------------------ row tables
#
# XLA:TPU tiles the two minor axes of an array (8 x 128 for 32-bit values).
# A reshape that merges a tiny second-minor axis (G heads, K slots) into the
# row axis, or splits one out of it, changes that tiling and compiles to
# straight-line code linear in the number of rows (v5e deviceless, alone:
# flattening int32 `[1, 2, 4, 2, 1M]` to `[1, 2, 8M]` 18.8 s; the same rows
# as a concatenation of slices 0.5 s). These helpers move between
# per-(head, slot) tables and flat rows by slices, concatenations and
# stacks only, and their VJPs are the same kind of op.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split_rows(x, parts: int, axis: int = -1):
  """`x` cut into `parts` equal consecutive pieces along `axis` (a tuple);
  the VJP concatenates (no zero-padded copies summed)."""
  n = x.shape[axis] // parts
  ax = axis % x.ndim
  return tuple(jax.lax.slice_in_dim(x, i * n, (i + 1) * n, axis=ax) for i in range(parts))


def _split_fwd(x, parts, axis):
  return split_rows(x, parts, axis), None


def _split_bwd(parts, axis, _, cts):
  return (jnp.concatenate(cts, axis=axis),)


split_rows.defvjp(_split_fwd, _split_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(x, axis: int):
  """The slices of `x` along `axis` (a tuple, `axis` dropped); the VJP
  stacks (no zero-padded copies summed)."""
  return tuple(jax.lax.index_in_dim(x, j, axis, keepdims=False) for j in range(x.shape[axis]))


def _unstack_fwd(x, axis):
  return unstack(x, axis), None


def _unstack_bwd(axis, _, cts):
  return (jnp.stack(cts, axis=axis),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def tile_rows(x, reps: int):
  """`[..., L] -> [..., reps * L]`: `reps` copies of the rows, one after
  another (a concatenation, not a broadcast and reshape)."""
  return jnp.concatenate([x] * reps, axis=-1) if reps > 1 else x


@jax.custom_vjp
def to_pair_rows(x):
  """`[B, H, G, K, L] -> [B, H, K * G * L]`: rows ordered slot, head,
  position (row `(k * G + g) * L + l`), by a concatenation of slices."""
  _, _, g, num, _ = x.shape
  return jnp.concatenate([x[:, :, i, j] for j in range(num) for i in range(g)], axis=-1)


def from_pair_rows(y, group: int, num: int):
  """The inverse of `to_pair_rows`: `[B, H, K * G * L] -> [B, H, G, K, L]`
  (slices and stacks)."""
  pieces = split_rows(y, num * group, -1)
  return jnp.stack([jnp.stack([pieces[j * group + i] for j in range(num)], axis=2)
                    for i in range(group)], axis=2)


def _to_pairs_fwd(x):
  return to_pair_rows(x), x.shape[2:4]


def _to_pairs_bwd(gk, ct):
  return (from_pair_rows(ct, *gk),)


to_pair_rows.defvjp(_to_pairs_fwd, _to_pairs_bwd)


def gather_rows(x, idx, axis):
  """`x[..., idx[..., r], :]` (`axis=-2`, rows of `[..., N, D]`) or
  `x[..., idx[..., r]]` (`axis=-1`), indices promised in bounds."""
  idx = idx[..., None] if axis == -2 else idx
  return jnp.take_along_axis(x, idx, axis=axis, mode="promise_in_bounds")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute_rows(x, idx, inv, axis=-2):
  """`x[..., idx[r], :]` (rows on axis -2; `axis=-1`: `x[..., idx[r]]`) for a
  permutation `idx [..., N]` with inverse `inv`; the VJP is the gather by
  `inv` (no scatter-add, no float32 copy)."""
  return gather_rows(x, idx, axis)


def _permute_fwd(x, idx, inv, axis):
  return permute_rows(x, idx, inv, axis), (idx, inv)


def _permute_bwd(axis, res, ct):
  idx, inv = res
  return gather_rows(ct, inv, axis), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def visited_keys_mask(lo, hi, block_q: int, block_k: int, kv_len: int):
  """bool `[B, H, R, kv_len]`: the keys the kernels load for each row's tile.

  Host-side/test helper: a row's keys are those of the key blocks its tile
  visits (`tile_blocks`), so a row's interval is attended in full iff it lies
  inside this mask. Quadratic in size; for tests only.
  """
  tlo, thi = tile_bounds(lo, hi, block_q)
  first, count = tile_blocks(tlo, thi, block_k)
  kb = jnp.arange(kv_len, dtype=jnp.int32) // block_k
  vis = (kb >= first[..., None]) & (kb < (first + count)[..., None])   # [B,H,T,Lk]
  return jnp.repeat(vis, block_q, axis=2)


# ------------------------------------------------------------ tile arithmetic


NT = (((1,), (1,)), ((), ()))      # a @ b.T
NN = (((1,), (0,)), ((), ()))      # a @ b


def precision_for(dtype):
  """f32 inputs: exact f32 matmuls (the reference is HIGHEST); else default."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, dims, precision):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=F32,
                             precision=precision)


def row_mask(k_start, lo, hi, block_q: int, block_k: int):
  """bool `[bq, bk]`: key `k_start + j` lies in row `i`'s `[lo_i, hi_i]`.

  `lo`, `hi`: int32 `[bq, 1]` columns.
  """
  kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return (kpos >= lo) & (kpos <= hi)


def row_mask_t(k_start, lo, hi, block_k: int, block_q: int):
  """bool `[bk, bq]`, the transpose of `row_mask`: key `k_start + i` lies in
  row `j`'s `[lo_j, hi_j]`. `lo`, `hi`: int32 `[1, bq]` rows."""
  kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
  return (kpos >= lo) & (kpos <= hi)


def clean_rows(x, k_start, tile_lo, tile_hi):
  """Zeroes the rows of a `[bk, D]` key/value block outside `[tile_lo, tile_hi]`."""
  kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
  ok = (kpos >= tile_lo) & (kpos <= tile_hi)
  return jnp.where(ok, x, jnp.zeros_like(x))


def init_state(block_q: int, head_dim: int):
  """Online-softmax state `(m [bq, 1], l [bq, 1], acc [bq, D])`, float32."""
  return (jnp.full((block_q, 1), -jnp.inf, F32), jnp.zeros((block_q, 1), F32),
          jnp.zeros((block_q, head_dim), F32))


def fwd_update(state, q, k, v, mask, *, scale, precision):
  """One key block of the online softmax (flash-attention form)."""
  m, l, acc = state
  s = dot(q, k, NT, precision) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
  alpha = jnp.exp(m - m_safe)                      # m = -inf -> 0
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + dot(p.astype(v.dtype), v, NN, precision)
  return m_new, l, acc


def fwd_finish(state):
  """`(o [bq, D] float32, lse [bq, 1] float32)`; a row with no key: 0, -inf."""
  m, l, acc = state
  ok = l > 0
  o = acc / jnp.where(ok, l, 1.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
  return o, lse


def probs(q, k, lse, mask, *, scale, precision):
  """Recomputed probabilities `[bq, bk]` from the saved log-sum-exp `[bq, 1]`.

  Also on transposed tiles: `probs(k, q, lse [1, bq], mask_t)` is `P^T`
  `[bk, bq]`.
  """
  s = dot(q, k, NT, precision) * scale
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_safe), 0.0)


def dscores(p, do, v, delta, mask, *, precision):
  """`dS = P * (dO V^T - delta)`, zero where masked (`[bq, bk]` float32).

  Also on transposed tiles: `dscores(p_t, v, do, delta [1, bq], mask_t)` is
  `dS^T` `[bk, bq]`.
  """
  dp = dot(do, v, NT, precision)
  return jnp.where(mask, p * (dp - delta), 0.0)


def dq_update(dq, p_ds, k, *, scale, precision):
  return dq + scale * dot(p_ds.astype(k.dtype), k, NN, precision)


def dkv_update(dk, dv, q, do, k, v, lse, delta, mask_t, *, scale, precision):
  """Adds one row tile's contribution to a key block's `dk`, `dv` `[bk, D]`.

  Computed on transposed tiles (`P^T`, `dS^T` `[bk, bq]`): the row
  statistics `lse`, `delta` (float32 `[1, bq]`) and the mask `mask_t`
  (`row_mask_t`) broadcast over keys as lane-dense rows, so no `[bq, 1]`
  column is loaded or formed, and both updates are plain `A @ B` matmuls.
  """
  p_t = probs(k, q, lse, mask_t, scale=scale, precision=precision)
  dv = dv + dot(p_t.astype(do.dtype), do, NN, precision)
  ds_t = dscores(p_t, v, do, delta, mask_t, precision=precision)
  dk = dk + scale * dot(ds_t.astype(q.dtype), q, NN, precision)
  return dk, dv


def fwd_body(q, lo, hi, *, scale, block_q, block_k):
  """The forward loop body both platform variants run over a row tile's key
  blocks: `body(k_start, k, v, state) -> state` (online softmax, rows masked
  to their `[lo, hi]` key range)."""
  prec = precision_for(q.dtype)

  def body(k_start, k, v, state):
    mask = row_mask(k_start, lo, hi, block_q, block_k)
    return fwd_update(state, q, k, v, mask, scale=scale, precision=prec)

  return body


def dq_body(q, do, lse, delta, lo, hi, *, scale, block_q, block_k):
  """The dq loop body both platform variants run over a row tile's key
  blocks: `body(k_start, k, v, dq) -> dq` (probabilities recomputed from the
  saved `lse`, rows masked to their `[lo, hi]` key range)."""
  prec = precision_for(q.dtype)

  def body(k_start, k, v, dq):
    mask = row_mask(k_start, lo, hi, block_q, block_k)
    p = probs(q, k, lse, mask, scale=scale, precision=prec)
    ds = dscores(p, do, v, delta, mask, precision=prec)
    return dq_update(dq, ds, k, scale=scale, precision=prec)

  return body
