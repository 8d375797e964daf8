"""Glue of `superlinear_attention(..., implementation="pallas")`.

Builds the shared integer tables from the `SuperlinearConfig` (stripe and
span tables of `attn.masks`) and calls the kernels:

1. search (stripe kernel, `attn._pallas_search.search`): anchors, best first;
2. gate logits of the chosen anchors (`attn._pallas_search.gate_logits`,
   differentiable: the only path into q_search / k_search), softmax over the
   valid slots (invalid slots -1e9, as the reference);
3. span attention (`pallas_kernels.span.span_attention`): window + spans,
   merged by log-sum-exp, mixed by the gates; gradients to q, k, v, gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import masks
from attn.config import SuperlinearConfig
from pallas_kernels import span as span_kernels

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


# TODO(stripe kernel): temporary jnp stand-in for `attn._pallas_search`
# (`pallas_kernels.stripe.search_topk` / `selected_scores`), used only while
# that module is absent; the lead removes it at merge.
def _standin_search(q_search, k_search, q_offset, *, config, variant=None):
  """Anchors `[B, Lq, Hq, K]` int32 (best first, -1 invalid) and scores."""
  del variant
  b, lq, hq, ds = q_search.shape
  lk, hk = k_search.shape[1], k_search.shape[2]
  g = hq // hk
  f = jnp.asarray(masks.superlinear_stripe_table(lk, config))      # far -> near
  pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(lq, dtype=jnp.int32)
  anchors = pos[:, None] + 1 - f[None, :]                           # [Lq, S]
  valid = anchors >= 0
  ks = jnp.take(k_search.astype(F32), jnp.clip(anchors, 0, lk - 1), axis=1)  # [B,Lq,S,Hk,Ds]
  qs = q_search.astype(F32).reshape(b, lq, hk, g, ds)
  scores = jnp.einsum("bqhgd,bqshd->bqhgs", qs, ks, precision=HIGHEST)
  scores = jnp.where(valid[None, :, None, None, :], scores, -jnp.inf)
  top, sel = jax.lax.top_k(jax.lax.stop_gradient(scores), config.num_spans)
  chosen = jnp.take_along_axis(jnp.broadcast_to(anchors[None, :, None, None, :],
                                                scores.shape), sel, axis=-1)
  chosen = jnp.where(jnp.isfinite(top), chosen, -1)
  return chosen.reshape(b, lq, hq, -1).astype(jnp.int32), top.reshape(b, lq, hq, -1)


def _standin_gate_logits(q_search, k_search, anchors, variant=None):
  """Differentiable `<q_search_i, k_search[a]>` (float32) of the chosen anchors."""
  del variant
  b, hq = q_search.shape[0], q_search.shape[2]
  lk, hk = k_search.shape[1], k_search.shape[2]
  a = jnp.clip(anchors, 0, lk - 1)                                  # [B, Lq, Hq, K]
  kv_head = (jnp.arange(hq) // (hq // hk))[None, None, :, None]
  ks = k_search.astype(F32)[jnp.arange(b)[:, None, None, None], a, kv_head]  # [B,Lq,Hq,K,Ds]
  return jnp.einsum("bqhd,bqhkd->bqhk", q_search.astype(F32), ks, precision=HIGHEST)


def _search_module():
  """`attn._pallas_search` (stripe kernels) or the temporary stand-in."""
  try:
    from attn import _pallas_search  # noqa: PLC0415 (written in parallel)
    return _pallas_search.search, _pallas_search.gate_logits
  except ImportError:
    return _standin_search, _standin_gate_logits


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, variant=None,
                          block_q=None, block_k=None):
  """Superlinear attention with Pallas kernels; see `attn.superlinear_attention`.

  Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32, gates
  [B, Lq, Hq, K] float32)`.
  """
  lq, lk = q.shape[1], k.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  search, gate_logits = _search_module()
  found = search(jax.lax.stop_gradient(q_search), jax.lax.stop_gradient(k_search),
                 q_offset, config=config, variant=variant)
  anchors = jax.lax.stop_gradient(found[0] if isinstance(found, tuple) else found)
  logits = gate_logits(q_search, k_search, anchors, variant=variant)
  gates = jax.nn.softmax(jnp.where(anchors >= 0, logits, -1e9), axis=-1)
  span_table = jnp.asarray(masks.superlinear_span_table(lk, config))
  out = span_kernels.span_attention(
      q, k, v, anchors, gates, span_table=span_table, window=config.window, scale=scale,
      q_offset=q_offset, block_q=block_q, block_k=block_k, variant=variant)
  return out, anchors.astype(jnp.int32), gates.astype(F32)
