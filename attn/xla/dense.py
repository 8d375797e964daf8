"""Dense, sliding-window and block-sparse attention on the `xla` path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn.layout import BlockLayout
from attn.xla.blocks import (F32, any_offset, block_size, finish_state, group, map_query_blocks,
                             pad_seq, partial, qk, window_only, zero_unseen)

def dense_attention(q, k, v, q_offset=None, *, scale):
  """Causal attention, one query block against all keys at a time."""
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq = block_size(lq, lk, hq, 1, b)
  kpos = jnp.arange(lk, dtype=jnp.int32)

  def run(xs, offset, bounds):
    # Keys past the last valid query are seen by no one: zeroed once.
    seen = (kpos <= bounds[1]) & (bounds[0] <= bounds[1])
    k32, v32 = zero_unseen(k.astype(F32), seen), zero_unseen(v.astype(F32), seen)

    def body(qpos, row_ok, qb):
      s = qk(group(qb, hk), k32.astype(k.dtype), "bqhgd,bkhd->bhgqk", scale)
      ok = (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
      out, _ = finish_state(partial(jnp.where(ok, s, -jnp.inf), v32, "bhgqk,bkhd->bhgqd"))
      return jnp.moveaxis(out, 3, 1).reshape(b, -1, hq, d)
    return map_query_blocks(body, bq, offset, bounds, *xs)

  return any_offset(run, [q], q_offset, lq, lk, (0,)).astype(q.dtype)


def sliding_window_attention(q, k, v, q_offset=None, *, window, scale):
  """Banded attention: one contiguous key slice per query block."""
  return window_only(q, k, v, window=min(window, k.shape[1]), scale=scale,
                      q_offset=q_offset)


def block_sparse_attention(q, k, v, *, layout: BlockLayout, scale):
  """Attention restricted to `layout`: each query block gathers its key blocks.

  Query blocks are bucketed by their number of key blocks (rounded up to a
  power of two), and each bucket runs with its own static width, so the work
  is at most twice the number of non-empty tiles (a single padded width
  would make a causal layout cost every tile of the square).
  """
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq, bk = layout.block_q, layout.block_k
  nq, nk = layout.num_q_blocks, -(-lk // bk)
  kr = pad_seq(k.astype(F32), 0, nk * bk - lk).reshape(b, nk, bk, hk, d)
  vr = pad_seq(v.astype(F32), 0, nk * bk - lk).reshape(b, nk, bk, hk, d)
  qr = jnp.moveaxis(pad_seq(q, 0, nq * bq - lq).reshape(b, nq, bq, hq, d), 1, 0)
  tiles = jnp.asarray(layout.block_masks)
  widths = 2 ** np.ceil(np.log2(np.maximum(layout.num_kv_blocks, 1))).astype(int)
  widths = np.minimum(widths, layout.kv_blocks.shape[1])

  def bucket(ids, width):
    """Outputs `[len(ids), B, bq, Hq, D]` of the query blocks `ids`."""
    @jax.checkpoint
    def step(args):
      qb, cols, mids = args                                # [B, bq, Hq, D], [width] x2
      ok = jnp.moveaxis(tiles[mids], 0, 1).reshape(bq, width * bk)
      kpos = (cols[:, None] * bk + jnp.arange(bk)).reshape(-1)
      ok = ok & (kpos < lk)[None, :]
      seen = jnp.any(ok, axis=0)
      kb = zero_unseen(kr[:, cols].reshape(b, width * bk, hk, d), seen)
      vb = zero_unseen(vr[:, cols].reshape(b, width * bk, hk, d), seen)
      s = jnp.where(ok, qk(group(qb, hk), kb.astype(q.dtype), "bqhgd,bkhd->bhgqk",
                            scale), -jnp.inf)
      out, _ = finish_state(partial(s, vb, "bhgqk,bkhd->bhgqd"))
      return jnp.moveaxis(out, 3, 1).reshape(b, bq, hq, d)

    return jax.lax.map(step, (qr[ids], jnp.asarray(layout.kv_blocks[ids, :width]),
                              jnp.asarray(layout.mask_ids[ids, :width])))

  out = jnp.zeros(qr.shape, F32)
  for width in np.unique(widths):
    ids = np.nonzero(widths == width)[0]
    out = out.at[ids].set(bucket(ids, int(width)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, hq, d)[:, :lq]
  return out.astype(q.dtype)

