"""Per-tile arithmetic shared by the TPU and GPU variants.

A tile is `block_q` rows (queries of one head, or (query, head, slot)
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

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32

NT = (((1,), (1,)), ((), ()))      # a @ b.T
TN = (((0,), (0,)), ((), ()))      # a.T @ b
NN = (((1,), (0,)), ((), ()))      # a @ b


def precision_for(dtype):
  """f32 inputs: exact f32 matmuls (the reference is HIGHEST); else default."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, dims, precision):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=F32,
                             precision=precision)


def row_mask(k_start, lo, hi, block_q: int, block_k: int):
  """bool `[bq, bk]`: key `k_start + j` lies in row `i`'s `[lo_i, hi_i]`.

  `lo`, `hi`: int32 `[bq, 1]`.
  """
  kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
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
  """Recomputed probabilities `[bq, bk]` from the saved log-sum-exp."""
  s = dot(q, k, NT, precision) * scale
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_safe), 0.0)


def dscores(p, do, v, delta, mask, *, precision):
  """`dS = P * (dO V^T - delta)`, zero where masked (`[bq, bk]` float32)."""
  dp = dot(do, v, NT, precision)
  return jnp.where(mask, p * (dp - delta), 0.0)


def dq_update(dq, p_ds, k, *, scale, precision):
  return dq + scale * dot(p_ds.astype(k.dtype), k, NN, precision)


def dkv_update(dk, dv, q, do, k, v, lse, delta, mask, *, scale, precision):
  """Adds one row tile's contribution to a key block's `dk`, `dv` `[bk, D]`."""
  p = probs(q, k, lse, mask, scale=scale, precision=precision)
  dv = dv + dot(p.astype(do.dtype), do, TN, precision)
  ds = dscores(p, do, v, delta, mask, precision=precision)
  dk = dk + scale * dot(ds.astype(q.dtype), q, TN, precision)
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
