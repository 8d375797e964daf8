"""Pieces shared by the `xla` paths (`attn.xla`): query blocks under a
rematerialised `lax.map`, contiguous key slices (bands, stripes), float32
softmax states.

Shapes: `q: [B, Lq, Hq, D]`, `k, v: [B, Lk, Hk, D]`, `G = Hq // Hk`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn._offsets import any_offset
from pallas_kernels.common import F32, SoftmaxState, finish_state

# Elements of the largest per-block temporary (scores or gathered keys).
BLOCK_BUDGET = 1 << 21


def pad_seq(x, before, after):
  """Zero-pads axis 1 (the sequence axis)."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (before, after)
  return jnp.pad(x, widths)


def group(x, num_kv_heads):
  b, l, hq, d = x.shape
  return x.reshape(b, l, num_kv_heads, hq // num_kv_heads, d)


def block_size(q_len: int, cols: int, heads: int, head_dim: int, batch: int,
               budget: int | None = None, min_block: int = 8) -> int:
  """Largest query block (power of two <= 128, >= `min_block`) whose
  temporaries (`bq * cols * heads * head_dim * batch` elements) fit `budget`
  (default `BLOCK_BUDGET`)."""
  budget = BLOCK_BUDGET if budget is None else budget
  bq = 128
  while bq > min_block and bq * cols * heads * max(head_dim, 1) * batch > budget:
    bq //= 2
  return min(bq, q_len)


def partial(s, v, contract):
  """Softmax state of masked scores `s` (-inf = masked) against values `v`.

  `contract` is an einsum spec from (`exp(s)`, `v`) to `o`, or a function
  of them; the key axis of `s` is its last axis.
  """
  m = jnp.max(s, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m_safe[..., None])
  o = (jnp.einsum(contract, e, v.astype(F32)) if isinstance(contract, str)
       else contract(e, v))
  return SoftmaxState(m, jnp.sum(e, axis=-1), o)


def rowwise_qk(q, keys, scale=None):
  """`q: [..., D]`, `keys: [..., n, D]` -> `[..., n]` float32 row-wise dots.

  Written as multiply-and-reduce rather than a batched `einsum`: XLA fuses
  it with the slicing of `keys` (no gathered copy), while a batched dot
  with one query row per batch entry runs far slower on CPU.
  """
  s = jnp.sum(q[..., None, :].astype(F32) * keys.astype(F32), axis=-1)
  return s if scale is None else s * scale


def rowwise_pv(e, values):
  """`e: [..., n]`, `values: [..., n, D]` -> `[..., D]` float32."""
  return jnp.sum(e[..., None] * values.astype(F32), axis=-2)


def qk(qg, keys, spec, scale=None):
  s = jnp.einsum(spec, qg, keys, preferred_element_type=F32)
  return s if scale is None else s * scale


def map_query_blocks(body, bq: int, q_offset, bounds, *xs):
  """Runs `body(qpos [bq], row_ok [bq], *blocks)` over query blocks of `xs`.

  `xs` are `[B, Lq, ...]`; `bounds = (lo, hi)`: a row is valid (`row_ok`)
  iff its position lies in `[lo, hi]` (padding rows of the last block never
  are). The body's outputs must be `[B, bq, ...]`; they are stitched back to
  `[B, Lq, ...]`. The body is rematerialised in the backward pass.
  """
  lo, hi = bounds
  q_len = xs[0].shape[1]
  nb = -(-q_len // bq)
  pad = nb * bq - q_len

  def split(x):
    x = pad_seq(x, 0, pad)
    return jnp.moveaxis(x.reshape(x.shape[0], nb, bq, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def step(args):
    i, *blocks = args
    qpos = q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)
    return body(qpos, (qpos >= lo) & (qpos <= hi), *blocks)

  outs = jax.lax.map(step, (jnp.arange(nb, dtype=jnp.int32), *map(split, xs)))

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], nb * bq, *y.shape[3:])[:, :q_len]

  return jax.tree.map(join, outs)


def zero_unseen(x, seen):
  """Zeroes the rows of `x: [B, n, H, D]` whose `seen: [n]` is False."""
  return jnp.where(seen[None, :, None, None], x, jnp.zeros((), x.dtype))


# ------------------------------------------------------------------ pieces


def band_partial(qg, k_pad, v_pad, qpos, row_ok, *, lo, hi, pad_left, kv_len,
                  scale, keep=None):
  """State of the keys at offsets `lo <= d <= hi` from each query of a block.

  One contiguous slice of `bq + hi - lo` keys serves the whole block (a
  matmul, masked to the band). qg: `[B, bq, Hk, G, D]`; k_pad, v_pad: float32
  keys padded by `pad_left >= hi` on the left and `bq` on the right; row_ok:
  bool `[bq]`; keep: optional bool `[hi - lo + 1]`, the offsets of the band
  that are kept. Returns a `SoftmaxState` over `[B, Hk, G, bq]`.
  """
  bq = qg.shape[1]
  n = bq + hi - lo
  # The slice actually read (dynamic_slice clamps its start): key positions
  # follow the clamped start, so a row never scores a key it did not get.
  start = jnp.clip(qpos[0] - hi + pad_left, 0, k_pad.shape[1] - n)
  kpos = start - pad_left + jnp.arange(n, dtype=jnp.int32)
  d = qpos[:, None] - kpos[None, :]
  ok = (d >= lo) & (d <= hi) & (kpos >= 0) & (kpos < kv_len) & row_ok[:, None]
  if keep is not None:
    ok &= jnp.asarray(keep)[jnp.clip(d - lo, 0, hi - lo)]
  seen = jnp.any(ok, axis=0)
  kw = zero_unseen(jax.lax.dynamic_slice_in_dim(k_pad, start, n, axis=1), seen)
  vw = zero_unseen(jax.lax.dynamic_slice_in_dim(v_pad, start, n, axis=1), seen)
  s = jnp.where(ok, qk(qg, kw.astype(qg.dtype), "bqhgd,bkhd->bhgqk", scale), -jnp.inf)
  return partial(s, vw, "bhgqk,bkhd->bhgqd")


def window_partial(qg, k_pad, v_pad, qpos, row_ok, *, window, kv_len, scale):
  """Local-window state of one query block (keys padded by `window - 1`)."""
  return band_partial(qg, k_pad, v_pad, qpos, row_ok, lo=0, hi=window - 1,
                       pad_left=window - 1, kv_len=kv_len, scale=scale)


def window_only(q, k, v, *, window, scale, q_offset):
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  bq = block_size(lq, 128 + window, hq, d, b)
  k_pad = pad_seq(k.astype(F32), window - 1, bq)
  v_pad = pad_seq(v.astype(F32), window - 1, bq)

  def run(xs, offset, bounds):
    def body(qpos, row_ok, qb):
      part = window_partial(group(qb, hk), k_pad, v_pad, qpos, row_ok,
                             window=window, kv_len=lk, scale=scale)
      out, _ = finish_state(part)                                 # [B, Hk, G, bq, D]
      return jnp.moveaxis(out, 3, 1).reshape(b, -1, hq, d)
    return map_query_blocks(body, bq, offset, bounds, *xs)

  return any_offset(run, [q], q_offset, lq, lk, (0,)).astype(q.dtype)

