"""Context parallelism: an op over a sequence sharded across a mesh axis.

Runs inside a shard_map whose manual axes include `seq_axis` (the ops'
`seq_axis=` keyword sets one up, or the user's own). With `n` shards:

  * `seq_order="contiguous"` (default): shard `s` holds queries
    `[s * Lq/n, (s+1) * Lq/n)` and keys `[s * Lk/n, (s+1) * Lk/n)`. Causal
    attention makes the last shard do the most work.
  * `seq_order="zigzag"` (balanced): the sequence is cut into `2n` chunks and
    shard `s` holds chunks `s` and `2n-1-s` (in that order), so every shard
    holds one early and one late chunk. Arrays are passed and returned in
    this order (`zigzag_order` gives the permutation); positions (the causal
    mask, `q_offset`, superlinear anchors) are those of the natural order.
  * decode: q not sharded over the axis (replicated, e.g. a few new tokens)
    against a sequence-sharded cache: every shard gathers the cache and
    computes the same output, replicated over the axis.

Each shard fetches the keys its queries may see and calls the single-device
implementation with its own `q_offset`:

  * dense, PPA, superlinear, block sparse (and sliding window outside the
    two cases below): all-gather of k, v (and k_search) over the axis, so
    every earlier shard's keys are candidates (superlinear's random context
    access reaches shard 0 from the last). Its autodiff is a reduce-scatter
    of dK, dV. PPA's far offsets reach across the whole prefix, so it
    gathers the whole prefix too.
  * sliding window, contiguous order, `Lq == Lk`, the default `q_offset` and
    `window - 1 <= Lk/n`: a neighbour exchange (`jax.lax.ppermute`) of the
    previous shard's last `window - 1` keys, no all-gather.
  * sliding window, zigzag order, `Lq == Lk`, the default `q_offset` and
    `window - 1 <= Lk/2n` (one chunk): two neighbour exchanges of
    `window - 1` keys (chunk `s` needs the end of chunk `s-1`, held by shard
    `s-1`; chunk `2n-1-s` the end of chunk `2n-2-s`, held by shard `s+1`, or
    by itself on the last shard), no all-gather.

On the xla path, self-attention with the default `q_offset`, two ops keep
float32 copies of the whole sequence off every device (memory that shrinks
with `n`; docs/training.md has the measurements):

  * PPA (`attn.cp_ppa`): a shard's queries attend one key chunk at a time
    and merge the softmax states. Contiguous order: key chunk `s - j` comes
    by a `jax.lax.ppermute` (shift `j`), no all-gather; zigzag: slices of
    the all-gathered keys.
  * superlinear (contiguous order, `W - 1 <= Lk/n`): the spans read the
    all-gathered keys (gathered bit-exact as unsigned integers, which no
    backend widens to float32), the local window the neighbour exchange;
    the shard's query blocks are sized by `1/n` of the block budget.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn import cp_ppa, xla
from attn.sharding import KV, Q, SCALAR

SEQ_ORDERS = ("contiguous", "zigzag")


def zigzag_order(length: int, num_shards: int) -> np.ndarray:
  """Token indices in zigzag order: `x[:, zigzag_order(L, n)]` puts chunks
  `s` and `2n-1-s` (chunks of `L / 2n` tokens) on shard `s` when the result is
  sharded contiguously over `n` shards. `np.argsort` of it restores the
  natural order. `length` must be a multiple of `2 * num_shards`."""
  if length % (2 * num_shards):
    raise ValueError(f"seq_order='zigzag': the sequence length {length} must be a "
                     f"multiple of 2 * axis size = {2 * num_shards}; pad the sequence.")
  c = length // (2 * num_shards)
  chunks = [j for s in range(num_shards) for j in (s, 2 * num_shards - 1 - s)]
  return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def _gather(x, axis, to="varying"):
  return jax.lax.all_gather(x, axis, axis=1, tiled=True, to=to)


def _natural(x, n):
  """Gathered `[B, L, ...]` in zigzag order -> natural order (static)."""
  b, length = x.shape[:2]
  c = length // (2 * n)
  y = x.reshape((b, n, 2, c) + x.shape[2:])
  first, second = y[:, :, 0], y[:, ::-1, 1]          # chunks 0..n-1, n..2n-1
  return jnp.concatenate([first, second], axis=1).reshape(x.shape)


def _neighbour_keys(x, axis, w, n, s):
  """`[prev shard's last w keys, x]` on shards > 0; `[x, zeros]` on shard 0
  (the trailing keys lie after every query there: causally invisible)."""
  prev = jax.lax.ppermute(x[:, -w:], axis, [(i, i + 1) for i in range(n - 1)])
  return jnp.where(s == 0, jnp.concatenate([x, prev], axis=1),
                   jnp.concatenate([prev, x], axis=1))


def _zigzag_neighbour_keys(x, axis, w, n, s):
  """Keys for the two zigzag chunks of shard `s` of `n`, sliding window.

  x: `[B, 2c, ...]` this shard's chunks `s` and `2n-1-s` (zigzag order),
  `1 <= w <= c`. Returns `(first, second)`, each `[B, c + w, ...]`:
    first:  `[last w keys of chunk s-1, chunk s]`; on shard 0 `[chunk 0,
            zeros]` (trailing keys lie after every query: causally invisible).
            Chunk s-1 is shard s-1's first chunk.
    second: `[last w keys of chunk 2n-2-s, chunk 2n-1-s]`. Chunk 2n-2-s is
            shard s+1's second chunk, or on shard n-1 chunk n-1: its own first.
  Two `ppermute`s of `w` keys each (one per direction), no all-gather; the
  queries of both chunks sit at `q_offset = w` (shard 0's first: 0).
  """
  c = x.shape[1] // 2
  head, tail = x[:, :c], x[:, c:]
  up = jax.lax.ppermute(head[:, -w:], axis, [(i, i + 1) for i in range(n - 1)])
  down = jax.lax.ppermute(tail[:, -w:], axis, [(i + 1, i) for i in range(n - 1)])
  first = jnp.where(s == 0, jnp.concatenate([head, up], axis=1),
                    jnp.concatenate([up, head], axis=1))
  second = jnp.concatenate([jnp.where(s == n - 1, head[:, -w:], down), tail], axis=1)
  return first, second


def _sliding_zigzag(fn, args, roles, seq_axis, statics, n, s, w):
  """Sliding window in the zigzag order by neighbour exchange: the
  single-device op once per chunk (q `[B, c, ...]` against `c + w` keys,
  `_zigzag_neighbour_keys`), outputs concatenated back to `[B, 2c, ...]`."""
  if w == 0:
    return fn(*args, **statics)           # every query sees only itself
  pairs = [_zigzag_neighbour_keys(a, seq_axis, w, n, s) if r == KV else None
           for a, r in zip(args, roles)]
  c = args[roles.index(Q)].shape[1] // 2
  offsets = (jnp.where(s == 0, 0, w).astype(jnp.int32), jnp.int32(w))
  halves = []
  for h in (0, 1):
    part = [a[:, h * c:(h + 1) * c] if r == Q else
            pairs[i][h] if r == KV else a for i, (a, r) in enumerate(zip(args, roles))]
    part[roles.index(SCALAR)] = offsets[h]
    halves.append(fn(*part, **statics))
  return _concat_outputs(*halves)


def _concat_outputs(a, b):
  if isinstance(a, tuple):
    return tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a, b))
  return jnp.concatenate([a, b], axis=1)


def local_fn(op: str, fn, roles: tuple, seq_axis: str, statics: dict,
             seq_order: str = "contiguous", q_sharded: bool = True):
  """The per-shard function of `fn(*args, **statics)` (args in `roles`; the
  last SCALAR is `q_offset`, absent for block sparse). `q_sharded=False`:
  decode against a sequence-sharded cache (q replicated over the axis)."""

  def run(*args):
    n = jax.lax.axis_size(seq_axis)
    s = jax.lax.axis_index(seq_axis)
    args = list(args)
    iq, ik = roles.index(Q), roles.index(KV)
    lq_loc, lk_loc = args[iq].shape[1], args[ik].shape[1]
    lq, lk = (lq_loc * n if q_sharded else lq_loc), lk_loc * n
    zig = seq_order == "zigzag"
    if op == "block_sparse_attention":
      return _block_sparse(fn, args, roles, seq_axis, statics, n, s, lq_loc, zig)
    i_off = roles.index(SCALAR)
    given = args[i_off]
    off = (lk - lq) if given is None else given
    if (op == "ppa_attention" and fn is xla.ppa_attention and given is None and lq == lk
        and q_sharded and cp_ppa.applies(lk, p=statics["p"], window=statics["window"])):
      return _ppa_by_key_chunks(args, seq_axis, statics, n, s, zig)
    if (op == "superlinear_attention" and fn is xla.superlinear_attention and given is None
        and lq == lk and not zig and q_sharded
        and 0 < statics["config"].window <= lk_loc + 1):
      return _superlinear_local_window(fn, args, roles, seq_axis, statics, n, s)
    w = statics.get("window", 0) - 1
    if (op == "sliding_window_attention" and given is None and lq == lk and not zig
        and q_sharded and 0 <= w <= lk_loc):
      if w == 0:
        return fn(*args, **statics)       # every query sees only itself
      args = [_neighbour_keys(a, seq_axis, w, n, s) if r == KV else a
              for a, r in zip(args, roles)]
      args[i_off] = jnp.where(s == 0, 0, w).astype(jnp.int32)
      return fn(*args, **statics)
    if (op == "sliding_window_attention" and given is None and lq == lk and zig
        and q_sharded and 0 <= w <= lk_loc // 2):
      return _sliding_zigzag(fn, args, roles, seq_axis, statics, n, s, w)
    # Decode (q replicated): gather keys typed invariant over the axis, so
    # the output is replicated and dK, dV are this shard's slice.
    to = "varying" if q_sharded else "invarying"
    args = [_gather(a, seq_axis, to) if (r == KV and a is not None) else a
            for a, r in zip(args, roles)]
    if zig:
      args = [_natural(a, n) if (r == KV and a is not None) else a
              for a, r in zip(args, roles)]
    off = jnp.asarray(off, jnp.int32)
    if not q_sharded:
      args[i_off] = off
      return fn(*args, **statics)
    if not zig:
      args[i_off] = (off + s * lq_loc).astype(jnp.int32)
      return fn(*args, **statics)
    c = lq_loc // 2
    halves = []
    for h, chunk in enumerate((s, 2 * n - 1 - s)):
      part = [a[:, h * c:(h + 1) * c] if (r == Q and a is not None) else a
              for a, r in zip(args, roles)]
      part[i_off] = (off + chunk * c).astype(jnp.int32)
      halves.append(fn(*part, **statics))
    return _concat_outputs(*halves)

  return run


def _ppa_by_key_chunks(args, seq_axis, statics, n, s, zig):
  """PPA on the xla path (self-attention, default `q_offset`): each chunk of
  a shard's queries against the keys one key chunk at a time
  (`attn.cp_ppa`), so no device builds float32 copies of the whole
  sequence. Contiguous order: key chunk `s - j` arrives by a
  `jax.lax.ppermute` (shift `j`), no all-gather. Zigzag: the all-gathered
  keys in natural order, sliced. `args`: `(q, k, v, None)`, local blocks."""
  q, k, v = args[:3]
  kw = dict(p=statics["p"], window=statics["window"], scale=statics["scale"])
  if not zig:
    def shifted(j, *kv):
      if j == 0:
        return kv
      return tuple(jax.lax.ppermute(x, seq_axis, [(i, i + j) for i in range(n - j)])
                   for x in kv)
    return cp_ppa.ppa_chunk(q, (k, v), shifted, n, s, **kw)
  k, v = (_natural(_gather(x, seq_axis), n) for x in (k, v))
  c = q.shape[1] // 2
  outs = []
  for h, chunk in enumerate((s, 2 * n - 1 - s)):
    def sliced(j, *kv, chunk=chunk):
      start = jnp.maximum(chunk - j, 0) * c
      return tuple(jax.lax.dynamic_slice_in_dim(x, start, c, axis=1) for x in kv)
    outs.append(cp_ppa.ppa_chunk(q[:, h * c:(h + 1) * c], (k, v), sliced, 2 * n, chunk, **kw))
  return jnp.concatenate(outs, axis=1)


def _superlinear_local_window(fn, args, roles, seq_axis, statics, n, s):
  """Superlinear on the xla path (self-attention, contiguous order, default
  `q_offset`, `0 < W <= Lk/n + 1`): the spans read the all-gathered keys,
  the local window the shard's own keys after the previous shard's last
  `W - 1` (`_neighbour_keys`), so no device holds float32 window copies of
  the whole sequence. The shard holds `1/n` of the queries: its query
  blocks get `1/n` of the block budget (smaller span-row working set), and
  its offset `s * Lq/n` is in range (no shifted row copies).
  `args`: `(q, k, v, q_search, k_search, None)`."""
  w = statics["config"].window
  lq_loc = args[0].shape[1]
  if w == 1:                        # every query's window is itself
    k_win, v_win, base = args[1], args[2], (s * lq_loc).astype(jnp.int32)
  else:
    k_win, v_win = (_neighbour_keys(a, seq_axis, w - 1, n, s) for a in args[1:3])
    # Shard 0 holds `[own keys, zeros]` (the zeros lie after every query).
    base = jnp.where(s == 0, 0, s * lq_loc - (w - 1)).astype(jnp.int32)
  args = [_gather_bits(a, seq_axis) if (r == KV and a is not None) else a
          for a, r in zip(args, roles)]
  args[-1] = (s * lq_loc).astype(jnp.int32)
  return fn(*args, **statics, window_keys=(k_win, v_win, base),
            block_budget=xla.blocks.BLOCK_BUDGET // n, offset_in_range=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_bits(x, axis):
  """All-gather of `x: [B, n, ...]` over `axis` along the sequence, moved as
  unsigned integers of the same width (bit-exact), so that no backend
  widens a bf16 collective to float32. VJP: reduce-scatter of the
  cotangent (the all-gather's transpose)."""
  bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  y = _gather(jax.lax.bitcast_convert_type(x, bits), axis)
  return jax.lax.bitcast_convert_type(y, x.dtype)


def _gather_bits_fwd(x, axis):
  return _gather_bits(x, axis), None


def _gather_bits_bwd(axis, _, ct):
  return (jax.lax.psum_scatter(ct, axis, scatter_dimension=1, tiled=True),)


_gather_bits.defvjp(_gather_bits_fwd, _gather_bits_bwd)


def _block_sparse(fn, args, roles, seq_axis, statics, n, s, lq_loc, zig):
  """Block sparse: every shard runs its own rows of the global layout
  (`lax.switch` over the `n` static row slices) against the gathered keys."""
  layout = statics["layout"]
  rest = {k: v for k, v in statics.items() if k != "layout"}
  args = [_gather(a, seq_axis) if r == KV else a for a, r in zip(args, roles)]
  if zig:
    args = [_natural(a, n) if r == KV else a for a, r in zip(args, roles)]

  def rows(i):
    if not zig:
      lay = row_slice(layout, i * lq_loc, lq_loc)
      return lambda *a: fn(*a, layout=lay, **rest)
    c = lq_loc // 2
    lays = [row_slice(layout, j * c, c) for j in (i, 2 * n - 1 - i)]

    def two(*a):
      outs = [fn(*[x[:, h * c:(h + 1) * c] if r == Q else x for x, r in zip(a, roles)],
                 layout=lay, **rest) for h, lay in enumerate(lays)]
      return _concat_outputs(*outs)
    return two

  return jax.lax.switch(s, [rows(i) for i in range(n)], *args)


def row_slice(layout, start: int, size: int):
  """The layout of query rows `[start, start + size)` of `layout` (all keys)."""
  from attn.layout import BlockLayout
  mask = layout_mask(layout)[start:start + size]
  return BlockLayout.from_mask(mask, block_q=min(layout.block_q, size),
                               block_k=layout.block_k)


def layout_mask(layout):
  """The dense bool `[q_len, kv_len]` mask of a `BlockLayout` (host numpy)."""
  mask = np.zeros((layout.q_len, layout.kv_len), bool)
  qi = np.arange(layout.q_len)[:, None]
  ki = np.arange(layout.kv_len)[None, :]
  if layout.band is not None:
    return np.broadcast_to(layout.band.visible(qi, ki), mask.shape).copy()
  kvb, ids, tiles = layout.kv_blocks, layout.mask_ids, layout.block_masks
  bq, bk = layout.block_q, layout.block_k
  for r in range(kvb.shape[0]):
    for c in range(int(layout.num_kv_blocks[r])):
      tile = tiles[ids[r, c]]
      rows = slice(r * bq, min((r + 1) * bq, layout.q_len))
      cols = slice(kvb[r, c] * bk, min((kvb[r, c] + 1) * bk, layout.kv_len))
      mask[rows, cols] = tile[:rows.stop - rows.start, :cols.stop - cols.start]
  return mask
