"""Dense-masked O(L^2) reference implementations: the oracles of the tests.

Each builds the full `[q_len, kv_len]` key mask of its mechanism and runs a
plain masked softmax in float32 with `precision=HIGHEST`. Obvious rather than
fast; never use them at long lengths.

Shapes: `q: [batch, q_len, num_q_heads, head_dim]`,
`k, v: [batch, kv_len, num_kv_heads, head_dim]`; the output is like `q`.
Query `i` sits at absolute position `q_offset + i`; a query whose position
lies outside `[0, kv_len)` (possible with a traced `q_offset`) has no key of
its own and gets a zero row. Keys no query may see contribute exactly nothing,
even when they hold NaN or Inf (an uninitialised cache slot): they are zeroed
before any arithmetic, so values and gradients stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn.config import SuperlinearConfig
from pallas_kernels.common import span_bounds, span_lengths

HIGHEST = jax.lax.Precision.HIGHEST


def positions(q_len: int, kv_len: int, q_offset):
  """Query positions `[q_len]`, key positions `[kv_len]` (int32) and the
  bool `[q_len]` rows whose position lies in `[0, kv_len)`."""
  q_offset = kv_len - q_len if q_offset is None else q_offset
  qpos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)
  return qpos, jnp.arange(kv_len, dtype=jnp.int32), (qpos >= 0) & (qpos < kv_len)


def _zero_unseen_keys(x, seen):
  """`x: [B, Lk, Hk, D]` with the keys where `seen: [B, Hk, Lk]` is False zeroed."""
  return jnp.where(jnp.moveaxis(seen, 1, 2)[..., None], x, jnp.zeros((), x.dtype))


def _group(q, num_kv_heads):
  """`[B, L, Hq, D] -> [B, L, Hkv, G, D]` (query heads grouped by kv head)."""
  b, l, hq, d = q.shape
  return q.reshape(b, l, num_kv_heads, hq // num_kv_heads, d)


def masked_attention(q, k, v, mask, *, scale):
  """Softmax attention under an explicit key mask.

  Args:
    q: `[B, Lq, Hq, D]`; k, v: `[B, Lk, Hk, D]`.
    mask: bool, broadcastable to `[B, Hk, G, Lq, Lk]` (`G = Hq // Hk`).
    scale: multiplies the scores.

  Returns:
    `(out [B, Lq, Hq, D] float32, lse [B, Hk, G, Lq] float32)`; a query with
    no visible key gets a zero output and `lse = -inf`. Keys no query sees are
    zeroed first (NaN there cannot leak through `0 * NaN`).
  """
  b, lq, hq, _ = q.shape
  lk, hk = k.shape[1], k.shape[2]
  mask = jnp.broadcast_to(mask, (b, hk, hq // hk, lq, lk))
  seen = jnp.any(mask, axis=(2, 3))                                   # [B, Hk, Lk]
  k, v = _zero_unseen_keys(k, seen), _zero_unseen_keys(v, seen)
  qg = _group(q.astype(jnp.float32), hk)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32),
                 precision=HIGHEST) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=HIGHEST)
  lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m[..., 0], -jnp.inf)
  return o.reshape(q.shape[:3] + (v.shape[-1],)), lse


def dense_attention(q, k, v, q_offset=None, *, scale):
  """Causal attention: key `k` visible iff `k <= query position`."""
  qpos, kpos, row_ok = positions(q.shape[1], k.shape[1], q_offset)
  mask = (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
  return masked_attention(q, k, v, mask, scale=scale)[0].astype(q.dtype)


def sliding_window_attention(q, k, v, q_offset=None, *, window, scale):
  """Query at position `i` sees keys `[i - window + 1, i]`."""
  qpos, kpos, row_ok = positions(q.shape[1], k.shape[1], q_offset)
  d = qpos[:, None] - kpos[None, :]
  mask = (d >= 0) & (d < window) & row_ok[:, None]
  return masked_attention(q, k, v, mask, scale=scale)[0].astype(q.dtype)


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale):
  """PPA: keys at offsets `d < window` or `d = ceil(s**(1/p))`, s >= 1."""
  kv_len = k.shape[1]
  keep = np.zeros((kv_len,), bool)
  keep[masks.ppa_offsets(kv_len - 1, p=p, window=window)] = True
  qpos, kpos, row_ok = positions(q.shape[1], kv_len, q_offset)
  d = qpos[:, None] - kpos[None, :]
  mask = (d >= 0) & jnp.asarray(keep)[jnp.clip(d, 0, kv_len - 1)] & row_ok[:, None]
  return masked_attention(q, k, v, mask, scale=scale)[0].astype(q.dtype)


def block_sparse_attention(q, k, v, *, layout, scale):
  """Attention under the dense mask that `layout` describes."""
  mask = jnp.asarray(layout.to_mask())
  return masked_attention(q, k, v, mask, scale=scale)[0].astype(q.dtype)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale):
  """Superlinear attention (N = 2) with dense masks.

  Scores every stripe anchor from the full `q_search @ k_search^T` matrix,
  keeps the top `num_spans` per query head, and for each selected anchor runs
  one dense masked softmax over (its span | the window); the outputs are
  mixed by a softmax over the selected (unscaled) search scores.

  Returns:
    `(out [B, Lq, Hq, D] in q.dtype, anchors [B, Lq, Hq, K] int32 (-1 where
    a slot has no valid anchor), gates [B, Lq, Hq, K] float32)`.
  """
  b, lq, hq, _ = q.shape
  lk, hk = k.shape[1], k.shape[2]
  w = config.window
  qpos, kpos, row_ok = positions(lq, lk, q_offset)
  sg = jax.lax.stop_gradient

  # Search scores for every key: [B, Hk, G, Lq, Lk], float32, unscaled; only
  # used to choose anchors (not differentiated).
  full = jnp.einsum("bqhgd,bkhd->bhgqk", _group(sg(q_search).astype(jnp.float32), hk),
                    sg(k_search).astype(jnp.float32), precision=HIGHEST)
  f = jnp.asarray(masks.superlinear_stripe_table(lk, config))        # far->near
  anchors = qpos[:, None] + 1 - f[None, :]                            # [Lq, S]
  valid = (anchors >= 0) & row_ok[:, None]
  idx = jnp.broadcast_to(jnp.clip(anchors, 0, lk - 1), full.shape[:3] + anchors.shape)
  search = jnp.where(valid, jnp.take_along_axis(full, idx, axis=-1), -jnp.inf)

  num = config.num_spans
  top, sel = jax.lax.top_k(search, num)                               # [B,Hk,G,Lq,K]
  sel_valid = jnp.isfinite(top)
  sel_anchor = jnp.where(sel_valid, jnp.take_along_axis(
      jnp.broadcast_to(anchors, search.shape), sel, axis=-1), -1)
  # Differentiable gate logits: <q_search, k_search[anchor]> of the chosen
  # anchors (rows of an invalid slot zeroed, so junk there cannot leak).
  ks_t = jnp.moveaxis(k_search.astype(jnp.float32), 2, 1)            # [B, Hk, Lk, Ds]
  ks_sel = jax.vmap(jax.vmap(lambda x, i: x[i]))(ks_t, jnp.clip(sel_anchor, 0, lk - 1))
  ks_sel = jnp.where(sel_valid[..., None], ks_sel, 0.0)              # [B,Hk,G,Lq,K,Ds]
  qs_t = jnp.moveaxis(_group(q_search.astype(jnp.float32), hk), 1, 3)  # [B,Hk,G,Lq,Ds]
  logits = jnp.einsum("bhgqd,bhgqkd->bhgqk", qs_t, ks_sel, precision=HIGHEST)
  gates = jax.nn.softmax(jnp.where(sel_valid, logits, -1e9), axis=-1)
  gates = jnp.where(row_ok[:, None], gates, 0.0)     # a row with no position: no gate

  back, fwd = span_lengths(masks.superlinear_span_table(lk, config), qpos[:, None])
  start, end = span_bounds(sel_anchor, qpos[:, None], back, fwd, w)
  d = qpos[:, None] - kpos[None, :]
  window = (d >= 0) & (d < w) & row_ok[:, None]                      # [Lq, Lk]
  outs = []
  for slot in range(num):
    in_span = ((kpos >= start[..., slot, None]) & (kpos <= end[..., slot, None])
               & sel_valid[..., slot, None])                          # [B,Hk,G,Lq,Lk]
    o, _ = masked_attention(q, k, v, window | in_span, scale=scale)
    outs.append(o)
  o = jnp.stack(outs, axis=-2)                                        # [B,Lq,Hq,K,D]
  to_q = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, lq, hq, num)     # noqa: E731
  gates_q = to_q(gates)
  out = jnp.sum(gates_q[..., None] * o, axis=-2)
  return out.astype(q.dtype), to_q(sel_anchor), gates_q
