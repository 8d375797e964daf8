"""Sequence-sharded PPA on the xla path, one key chunk at a time.

With the sequence cut into `m` chunks of `C` tokens, a shard's queries are
one chunk `ci` (contiguous order; zigzag order: two half-size chunks, each
handled alone). Attending the whole all-gathered sequence at once would
build float32 copies of every key on every device (and, in the backward
pass, several float32 cotangents of that size), which does not shrink with
the number of shards. Instead the queries visit the key chunks `ci - j`,
`j = 0 .. m-1`, one at a time: relative to key chunk `ci - j`, a query sits
at `j * C + i` (`0 <= i < C`) and a key at `[0, C)`, so only the kept
offsets `d` in `((j-1) C, (j+1) C)` can connect them, a static subset of
PPA's offsets for each `j` (the bands clipped to it, the stripes in it).
The partial softmax states are merged with `merge_states`; each `(query,
key)` pair lies in exactly one key chunk, so the result is the same
attention. A step's float32 keys are one chunk padded by a query chunk on
each side, whatever the sequence length.

An offset near a chunk boundary belongs to two steps' ranges (each reads
its own keys), so the band and stripe work is at most twice that of the
single-device call for the same queries. A step fetches its key chunk only
after the previous step's state exists (that is what keeps one chunk at a
time), so the fetch is not overlapped with compute; a prefetch of the next
chunk would cost one more chunk of memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import masks
from attn.xla import blocks, ppa as xla_ppa
from pallas_kernels.common import F32, SoftmaxState, finish_state, merge_states


def applies(kv_len: int, *, p: float, window: int) -> bool:
  """Whether `xla.ppa_attention` takes its band + stripe path (not the
  window-only or dense special cases, which have no far offsets)."""
  offsets = masks.ppa_offsets(kv_len - 1, p=p, window=min(window, kv_len))
  return bool(offsets[-1] >= min(window, kv_len) and offsets.size < kv_len)


def _clip_bands(bands, lo: int, hi: int):
  """The bands `(lo, hi, keep)` restricted to the offsets `[lo, hi]`."""
  out = []
  for b_lo, b_hi, keep in bands:
    a, z = max(b_lo, lo), min(b_hi, hi)
    if a > z:
      continue
    k = None if keep is None else keep[a - b_lo:z - b_lo + 1]
    if k is None or k.all():
      out.append((a, z, None))
    elif k.any():
      out.append((a, z, k))
  return out


def _step(qb, k, v, valid, prev, *, j, bands, stripes, bq, scale):
  """One key chunk's state merged into `prev`, query chunk by query chunk.

  qb: `[nb, B, chunk, Hq, D]`, the queries at positions `j*C + i` in chunks
  of `chunk` rows (`C = k.shape[1]`); k, v: `[B, C, Hk, D]` at positions
  `[0, C)` (`valid`: bool scalar, False = no key); prev: a `SoftmaxState`
  over `[nb, B, chunk, Hk, G]` or None. Returns the merged `SoftmaxState`.
  """
  nb, _, chunk = qb.shape[:3]
  c = k.shape[1]
  widths = [bq + hi - lo for lo, hi, _ in bands]
  pad = max([chunk] + widths)       # stripes: `chunk` each side; bands: a slice fits
  k_pad, v_pad = (blocks.pad_seq(x.astype(F32), pad, pad) for x in (k, v))
  offset = j * c
  bounds = (jnp.where(valid, offset, offset + c).astype(jnp.int32), jnp.int32(offset + c - 1))

  @jax.checkpoint
  def block(args):
    i, qc, *before = args
    qpos = offset + i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    state = xla_ppa.ppa_chunk_state(qc, qpos, bounds, k_pad, v_pad, bands=bands,
                                    stripes=stripes, bq=bq, pad_left=pad, kv_len=c,
                                    scale=scale)
    state = jax.tree.map(lambda x: jnp.moveaxis(x, 3, 1), state)   # [B, chunk, Hk, G, ...]
    return merge_states(SoftmaxState(*before), state) if before else state

  return SoftmaxState(*jax.lax.map(block, (jnp.arange(nb, dtype=jnp.int32), qb, *(prev or ()))))


def ppa_chunk(q, keys, fetch, num_chunks: int, chunk_index, *, p, window, scale,
              rows: int | None = None):
  """PPA of the queries of one chunk against all keys, key chunk by key chunk.

  q: `[B, C, Hq, D]`, the queries at positions `chunk_index * C + i`
  (`chunk_index`: int32 scalar, may be traced) of a self-attention sequence
  of `num_chunks * C` tokens. `fetch(j, *keys) -> (k, v)`, each `[B, C, Hk,
  D]`: the keys of chunk `chunk_index - j` (any values where that is
  negative; `keys` are the arrays it reads, e.g. this shard's block or the
  gathered sequence). The call must satisfy `applies(num_chunks * C, p=p,
  window=window)`. `rows`: query rows per scan step (default: at most C/16,
  a multiple of the band block). Returns `[B, C, Hq, D]` like `q`.
  """
  b, c, hq, d = q.shape
  lk = num_chunks * c
  offsets = masks.ppa_offsets(lk - 1, p=p, window=min(window, lk))
  bands, stripes, bq, chunk = xla_ppa.ppa_split(offsets, c, hq, b)
  # A step's float32 keys are its chunk padded by `chunk` rows on each side:
  # query chunks of at most C/16 rows keep them within 1.125 C.
  chunk = max(bq, min(chunk, c // 16 // bq * bq)) if rows is None else rows
  nb = -(-c // chunk)
  qb = jnp.moveaxis(blocks.pad_seq(q, 0, nb * chunk - c).reshape(b, nb, chunk, hq, d), 1, 0)
  state = None
  for j in range(num_chunks):
    lo, hi = max((j - 1) * c + 1, 0), (j + 1) * c - 1
    bands_j = _clip_bands(bands, lo, hi)
    stripes_j = stripes[(stripes >= lo) & (stripes <= hi)]
    if not bands_j and not stripes_j.size:
      continue
    # One step at a time: the barrier makes step j's key chunk depend on the
    # state so far (else XLA may fetch and cast every chunk up front).
    state, keys = jax.lax.optimization_barrier((state, keys))
    k, v = fetch(j, *keys)
    step = functools.partial(_step, j=j, bands=bands_j, stripes=stripes_j, bq=bq,
                             scale=scale)
    state = jax.checkpoint(step)(qb, k, v, chunk_index >= j, state)
  out, _ = finish_state(state)                          # [nb, B, chunk, Hk, G, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, nb * chunk, hq, d)[:, :c]
  return out.astype(q.dtype)
