"""PPA on the `xla` path (`attn.xla.ppa_attention`).

Near the query the kept offsets are dense (the window, and for large p
much more): they are cut into bands, one contiguous key slice and a masked
matmul per query block (`attn.xla.blocks.band_partial`). Far offsets are sparse:
each is a stripe, one contiguous key slice per chunk of queries scored
row-wise. `ppa_chunk_state` (one query chunk's softmax state over a set of
bands and stripes) also serves the sequence-sharded path (`attn.cp_ppa`).
Shapes as in `attn.xla`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import masks
from attn.xla import blocks
from attn.xla.blocks import (any_offset, band_partial, block_size, group,
                             map_query_blocks, pad_seq, window_only, zero_unseen)
from attn.xla.dense import dense_attention
from pallas_kernels.common import F32, SoftmaxState, finish_state, merge_states


def _stripes_partial(qg, k_pad, v_pad, qpos, row_ok, stripes, *, pad_left, kv_len, scale):
  """State of the sparse far offsets `stripes` for a chunk of queries.

  For a fixed offset `d`, the keys of consecutive queries are consecutive:
  each stripe is one contiguous slice, scored row-wise. Scans over the
  stripes (scores first, then the values weighted by the exponentials), so
  work and memory in both passes are proportional to `len(stripes)`.

  qg: `[B, C, Hk, G, D]`; qpos, row_ok: `[C]`; stripes: int32 `[S]`; k_pad,
  v_pad: float32 keys at positions `[0, kv_len)`, padded by `pad_left >= C`
  on the left and `C` on the right (a slice partly before or after the keys
  stays exact; one wholly outside is clamped, but none of its rows is
  valid). Returns a `SoftmaxState` over `[B, Hk, G, C]`.
  """
  c = qg.shape[1]
  qg = qg.astype(F32)   # (its cotangent then sums over the stripes in float32)
  ok_rows = lambda d: (qpos - d >= 0) & (qpos - d < kv_len) & row_ok  # noqa: E731

  @jax.checkpoint
  def score(d):
    ks = jax.lax.dynamic_slice_in_dim(k_pad, qpos[0] - d + pad_left, c, axis=1)
    ks = zero_unseen(ks, ok_rows(d))
    s = jnp.sum(qg * ks[:, :, :, None], axis=-1) * scale
    return jnp.where(ok_rows(d)[None, :, None, None], s, -jnp.inf)

  s = jax.lax.map(score, stripes)                            # [S, B, C, Hk, G]
  m = jnp.max(s, axis=0)
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[None])

  @jax.checkpoint
  def accumulate(o, args):
    d, e_d = args
    vs = jax.lax.dynamic_slice_in_dim(v_pad, qpos[0] - d + pad_left, c, axis=1)
    return o + e_d[..., None] * zero_unseen(vs, ok_rows(d))[:, :, :, None], None

  o, _ = jax.lax.scan(accumulate, jnp.zeros_like(qg), (stripes, e))  # (vma of qg)
  to_heads = lambda x: jnp.moveaxis(x, 1, 3)  # noqa: E731
  return SoftmaxState(to_heads(m), to_heads(jnp.sum(e, axis=0)), to_heads(o))


# Largest query chunk of the stripe scans (keeps a chunk's rows in cache).
_PPA_MAX_CHUNK = 2048


def ppa_split(offsets, q_len: int, heads: int, batch: int):
  """`(bands, stripes, bq, chunk)` of the kept PPA `offsets`: the masked
  bands and far stripes (`masks.ppa_masked_bands`), the query block of the
  bands and the query chunk of the stripe scans."""
  bands, stripes = masks.ppa_masked_bands(offsets)
  band_cols = sum(128 + hi - lo for lo, hi, _ in bands)
  bq = block_size(q_len, max(band_cols, 1), heads, 1, batch)
  # Query chunk of the stripe scans: scores [S, B, C, Hq] (no head_dim) may
  # take 8 blocks' budget; large chunks keep the scans' iteration count low.
  chunk = bq * max(1, 8 * blocks.BLOCK_BUDGET // max(bq * stripes.size * heads * batch, 1))
  return bands, stripes, bq, min(chunk, _PPA_MAX_CHUNK, -(-q_len // bq) * bq)


def ppa_chunk_state(qc, qpos, bounds, k_pad, v_pad, *, bands, stripes, bq, pad_left,
                    kv_len, scale):
  """PPA state of a chunk of queries over the kept offsets `bands` + `stripes`.

  qc: `[B, C, Hq, D]` at positions `qpos: [C]` (a row is valid iff its
  position lies in `bounds = (lo, hi)`); k_pad, v_pad: float32 `[B, n, Hk,
  D]`, the keys at positions `[0, kv_len)` padded by `pad_left` on the left
  (`pad_left >= C` and `C` on the right where there are stripes). Returns a
  `SoftmaxState` over `[B, Hk, G, C]`.
  """
  hk = k_pad.shape[2]

  def block_body(bpos, brow_ok, qb):
    parts = [band_partial(group(qb, hk), k_pad, v_pad, bpos, brow_ok, lo=lo, hi=hi,
                           keep=keep, pad_left=pad_left, kv_len=kv_len, scale=scale)
             for lo, hi, keep in bands]
    return jax.tree.map(lambda x: jnp.moveaxis(x, 3, 1),
                        functools.reduce(merge_states, parts))  # [B, bq, Hk, G, ...]

  parts = []
  if bands:
    band = map_query_blocks(block_body, bq, qpos[0], bounds, qc)
    parts.append(jax.tree.map(lambda x: jnp.moveaxis(x, 1, 3), band))
  if len(stripes):
    row_ok = (qpos >= bounds[0]) & (qpos <= bounds[1])
    parts.append(_stripes_partial(group(qc, hk), k_pad, v_pad, qpos, row_ok,
                                  jnp.asarray(stripes, jnp.int32), pad_left=pad_left,
                                  kv_len=kv_len, scale=scale))
  return functools.reduce(merge_states, parts)


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale):
  """PPA: dense runs of kept offsets as banded slices, sparse ones as stripes.

  Near the query the kept offsets are dense (the window, and for large p
  much more): they are cut into bands, one contiguous key slice and a masked
  matmul per query block. Far offsets are sparse: each is a stripe, one
  contiguous key slice per chunk of queries scored row-wise.
  """
  b, lq, hq, d = q.shape
  lk = k.shape[1]
  window = min(window, lk)
  offsets = masks.ppa_offsets(lk - 1, p=p, window=window)
  if offsets[-1] < window:  # p = 0 or a sequence within the window.
    return window_only(q, k, v, window=window, scale=scale, q_offset=q_offset)
  if offsets.size == lk:  # every offset kept (p = 1): plain causal attention.
    return dense_attention(q, k, v, q_offset, scale=scale)
  bands, stripes, bq, chunk = ppa_split(offsets, lq, hq, b)
  pad_left = int(offsets[-1])
  k_pad = pad_seq(k.astype(F32), pad_left, chunk)
  v_pad = pad_seq(v.astype(F32), pad_left, chunk)

  def run(xs, offset, bounds):
    def chunk_body(qpos, row_ok, qc):
      state = ppa_chunk_state(qc, qpos, bounds, k_pad, v_pad, bands=bands, stripes=stripes,
                              bq=bq, pad_left=pad_left, kv_len=lk, scale=scale)
      out, _ = finish_state(state)                                 # [B, Hk, G, C, D]
      return jnp.moveaxis(out, 3, 1).reshape(b, -1, hq, d)
    return map_query_blocks(chunk_body, chunk, offset, bounds, *xs)

  return any_offset(run, [q], q_offset, lq, lk, (0,)).astype(q.dtype)
