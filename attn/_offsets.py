"""Any traced `q_offset`, computed at an in-range one.

Every op documents query `i` at absolute position `q_offset + i`; a concrete
offset must lie in `[0, kv_len - q_len]`, a traced one may lie anywhere, and
rows whose position falls outside `[0, kv_len)` return zeros. The paths
(xla, Pallas) compute only in-range frames: `any_offset` moves the rows into
the frame at the clamped offset and back, filling rows with no position.
"""

from __future__ import annotations

import jax.numpy as jnp


def shift_rows(x, shift, fill):
  """`out[:, j] = x[:, j - shift]` where `0 <= j - shift < L`, else `fill`."""
  n = x.shape[1]
  src = jnp.arange(n, dtype=jnp.int32) - shift
  ok = (src >= 0) & (src < n)
  y = jnp.take(x, jnp.clip(src, 0, n - 1), axis=1)
  ok = ok.reshape((1, n) + (1,) * (x.ndim - 2))
  return jnp.where(ok, y, jnp.asarray(fill, x.dtype))


def any_offset(run, xs, q_offset, q_len, kv_len, fills):
  """Calls `run(xs, offset, (lo, hi))` at an in-range offset for any `q_offset`.

  `xs`: query-aligned inputs `[B, Lq, ...]`. `run` gets them at positions
  `offset + i`, `offset` in `[0, kv_len - q_len]`, and must give rows outside
  the valid positions `[lo, hi]` no key. A traced `q_offset` out of range is
  handled by shifting the rows: row `i` (position `q_offset + i`) goes to slot
  `i + shift` at the same position; rows whose position lies outside
  `[0, kv_len)` have no slot and get `fills` (one per output of `run`).
  """
  if q_offset is None:
    off = jnp.int32(kv_len - q_len)
    return run(xs, off, (off, jnp.int32(kv_len - 1)))
  off = jnp.asarray(q_offset, jnp.int32)
  off_c = jnp.clip(off, 0, kv_len - q_len)
  shift = jnp.clip(off - off_c, -q_len, q_len)
  lo = off_c + jnp.maximum(shift, 0)
  hi = off_c + jnp.minimum(q_len, q_len + shift) - 1
  outs = run([shift_rows(x, shift, 0) for x in xs], off_c, (lo, hi))
  single = not isinstance(outs, tuple)
  outs = (outs,) if single else outs
  outs = tuple(shift_rows(y, -shift, f) for y, f in zip(outs, fills))
  return outs[0] if single else outs


def call_any_offset(fn, *args, query_args: tuple[int, ...], fills: tuple,
                    key_limit: bool = False, **statics):
  """`fn(*arrays, q_offset, **statics)` for any traced `q_offset`.

  `args` is `(*arrays, q_offset)`: `arrays[0]` is `q: [B, Lq, ...]`,
  `arrays[1]` is `k: [B, Lk, ...]`; the positions in `query_args` are
  query-aligned, the others key-aligned. `fn` then only ever sees an in-range
  offset (the kernels' tables assume one). Key rows past the last valid
  query position are zeroed before `fn` sees them: no valid query may see
  them, and the filler rows of a shifted frame must not read garbage there
  (NaN in a cache slot would reach the gradients). `fills`: one value per
  output for rows with no position. `key_limit=True`: nothing is zeroed;
  `fn` gets `kv_limit=` (int32, the last valid query position + 1) and must
  itself never let a key at or past it reach an output or a gradient (the
  block-sparse kernels mask and zero such keys in their edge tiles), so a
  call costs what its attended keys cost, not a pass over the whole cache.
  """
  *arrays, q_offset = args
  if q_offset is None:
    return fn(*arrays, None, **statics)
  q_len, kv_len = arrays[0].shape[1], arrays[1].shape[1]

  def run(xs, offset, bounds):
    if key_limit:
      full = list(arrays)
      for i in query_args:
        full[i] = xs[query_args.index(i)]
      return fn(*full, offset, kv_limit=bounds[1] + 1, **statics)
    seen = jnp.arange(kv_len, dtype=jnp.int32) <= bounds[1]
    full = list(arrays)
    for i in range(len(full)):
      if i in query_args:
        full[i] = xs[query_args.index(i)]
      else:
        keep = seen.reshape((1, kv_len) + (1,) * (full[i].ndim - 2))
        full[i] = jnp.where(keep, full[i], jnp.zeros((), full[i].dtype))
    return fn(*full, offset, **statics)

  return any_offset(run, [arrays[i] for i in query_args], q_offset, q_len, kv_len, fills)
