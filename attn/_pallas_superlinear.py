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

from attn import _pallas_search, masks
from attn.config import SuperlinearConfig
from pallas_kernels import span as span_kernels

F32 = jnp.float32


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, variant=None,
                          block_q=None, block_k=None):
  """Superlinear attention with Pallas kernels; see `attn.superlinear_attention`.

  Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32, gates
  [B, Lq, Hq, K] float32)`.
  """
  lq, lk = q.shape[1], k.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  anchors, _ = _pallas_search.search(jax.lax.stop_gradient(q_search),
                                     jax.lax.stop_gradient(k_search), q_offset,
                                     config=config, variant=variant)
  anchors = jax.lax.stop_gradient(anchors)
  logits = _pallas_search.gate_logits(q_search, k_search, anchors, variant=variant)
  gates = jax.nn.softmax(jnp.where(anchors >= 0, logits, -1e9), axis=-1)
  span_table = jnp.asarray(masks.superlinear_span_table(lk, config))
  out = span_kernels.span_attention(
      q, k, v, anchors, gates, span_table=span_table, window=config.window, scale=scale,
      q_offset=q_offset, block_q=block_q, block_k=block_k, variant=variant)
  return out, anchors.astype(jnp.int32), gates.astype(F32)
