"""Context parallelism: an op over a sequence sharded across a mesh axis.

Runs inside a shard_map whose manual axes include `seq_axis` (the ops'
`seq_axis=` keyword sets one up, or the user's own). Shard `s` of `n` holds
queries `[s * Lq/n, (s+1) * Lq/n)` and keys `[s * Lk/n, (s+1) * Lk/n)`
(contiguous order). Each shard fetches the keys its queries may see and calls
the single-device implementation with its own `q_offset`:

  * dense, PPA, superlinear (and block sparse): all-gather of k, v (and
    k_search) over the axis, so every earlier shard's keys are candidates
    (superlinear's random context access reaches shard 0 from the last).
    Its autodiff is a reduce-scatter of dK, dV. PPA's far offsets reach
    across the whole prefix, so it gathers the whole prefix too.
  * sliding window with `Lq == Lk`, the default `q_offset` and
    `window - 1 <= Lk/n`: a neighbour exchange (`jax.lax.ppermute`) of the
    previous shard's last `window - 1` keys, no all-gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.sharding import KV, Q, SCALAR  # noqa: F401  (roles)


def _gather(x, axis):
  return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _neighbour_keys(x, axis, w, n, s):
  """`[prev shard's last w keys, x]` on shards > 0; `[x, zeros]` on shard 0
  (the trailing keys lie after every query there: causally invisible)."""
  prev = jax.lax.ppermute(x[:, -w:], axis, [(i, i + 1) for i in range(n - 1)])
  return jnp.where(s == 0, jnp.concatenate([x, prev], axis=1),
                   jnp.concatenate([prev, x], axis=1))


def local_fn(op: str, fn, roles: tuple, seq_axis: str, statics: dict):
  """The per-shard function of `fn(*args, **statics)` (args in `roles`; the
  last SCALAR is `q_offset`, absent for block sparse)."""

  def run(*args):
    n = jax.lax.axis_size(seq_axis)
    s = jax.lax.axis_index(seq_axis)
    args = list(args)
    iq, ik = roles.index(Q), roles.index(KV)
    lq_loc, lk_loc = args[iq].shape[1], args[ik].shape[1]
    lq, lk = lq_loc * n, lk_loc * n
    if op == "block_sparse_attention":
      return _block_sparse(fn, args, roles, seq_axis, statics, n, s, lq_loc)
    i_off = roles.index(SCALAR)
    given = args[i_off]
    off = (lk - lq) if given is None else given
    w = statics.get("window", 0) - 1
    if (op == "sliding_window_attention" and given is None and lq == lk
        and 0 <= w <= lk_loc):
      if w == 0:
        return fn(*args, **statics)       # every query sees only itself
      args = [_neighbour_keys(a, seq_axis, w, n, s) if r == KV else a
              for a, r in zip(args, roles)]
      args[i_off] = jnp.where(s == 0, 0, w).astype(jnp.int32)
      return fn(*args, **statics)
    args = [_gather(a, seq_axis) if (r == KV and a is not None) else a
            for a, r in zip(args, roles)]
    args[i_off] = (jnp.asarray(off, jnp.int32) + s * lq_loc).astype(jnp.int32)
    return fn(*args, **statics)

  return run


def _block_sparse(fn, args, roles, seq_axis, statics, n, s, lq_loc):
  """Block sparse: every shard runs its own rows of the global layout
  (`lax.switch` over the `n` static row slices) against the gathered keys."""
  layout = statics["layout"]
  rest = {k: v for k, v in statics.items() if k != "layout"}
  args = [_gather(a, seq_axis) if r == KV else a for a, r in zip(args, roles)]
  branches = [
      (lambda lay: lambda *a: fn(*a, layout=lay, **rest))(row_slice(layout, i * lq_loc, lq_loc))
      for i in range(n)]
  return jax.lax.switch(s, branches, *args)


def row_slice(layout, start: int, size: int):
  """The layout of query rows `[start, start + size)` of `layout` (all keys)."""
  from attn.layout import BlockLayout
  mask = layout_mask(layout)[start:start + size]
  return BlockLayout.from_mask(mask, block_q=min(layout.block_q, size),
                               block_k=layout.block_k)


def layout_mask(layout):
  """The dense bool `[q_len, kv_len]` mask of a `BlockLayout` (host numpy)."""
  import numpy as np
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
