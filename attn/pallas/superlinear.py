"""Superlinear attention on the stripe and span kernels, or the decode kernels.

`superlinear_attention` has the signature of `attn.xla.superlinear_attention`
(plus `variant`, see `pallas_kernels.platform`). Decode rule: a call with
`q_len <= decode.MAX_QUERIES` runs `attn.pallas.decode.superlinear_attention`;
a longer one builds the shared integer tables from the `SuperlinearConfig`
(stripe and span tables of `attn.masks`) and runs:

1. `search` (stripe kernel): the top `num_spans` anchors per query head, best
   first;
2. `gate_logits` of the chosen anchors (differentiable: the only path into
   q_search / k_search), softmax over the valid slots (invalid slots -1e9,
   as the reference);
3. span attention (`pallas_kernels.span.span_attention`): window + spans,
   merged by log-sum-exp, mixed by the gates; gradients to q, k, v, gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import masks
from attn._offsets import call_any_offset
from attn.config import SuperlinearConfig
from attn.pallas import decode
from pallas_kernels import platform, span, stripe

OPS = ("superlinear_attention",)


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the kernels a call with `q_len` queries runs have a record for `backend`.

  The prefill path runs the stripe search and the span kernels: a backend
  counts only where both families have a record.
  """
  if q_len is not None and q_len <= decode.MAX_QUERIES:
    return decode.supported(backend)
  return (platform.verified_on(span.HARDWARE_CHECKS, backend)
          and platform.verified_on(stripe.HARDWARE_CHECKS, backend))


def search(q_search, k_search, q_offset, *, config: SuperlinearConfig, variant=None):
  """Top-`num_spans` anchors and scores per query head (stripe kernels).

  Scores the stripe anchors of `attn.masks.superlinear_stripe_table` (far to
  near). q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]`; q_offset:
  None (`Lk - Lq`), an int or a traced int32 scalar. Returns `(anchors int32
  [B, Lq, Hq, K], scores float32 [B, Lq, Hq, K])`, best first, `-1`/`-inf`
  in empty slots; equal to the reference op's anchors.
  """
  lq, lk = q_search.shape[1], k_search.shape[1]
  table = masks.superlinear_stripe_table(lk, config)
  return stripe.search_topk(q_search, k_search, table, num_spans=config.num_spans,
                            q_offset=lk - lq if q_offset is None else q_offset,
                            variant=variant)


def gate_logits(q_search, k_search, anchors, variant=None):
  """float32 `[B, Lq, Hq, K]`: `<q_search, k_search[anchor]>`, 0 in empty slots.

  Differentiable w.r.t. `q_search` and `k_search` (Pallas backward)."""
  return stripe.selected_scores(q_search, k_search, anchors, variant=variant)


def _prefill(q, k, v, q_search, k_search, q_offset, *, config: SuperlinearConfig, scale,
             variant, block_q, block_k):
  lq, lk = q.shape[1], k.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  anchors, _ = search(jax.lax.stop_gradient(q_search), jax.lax.stop_gradient(k_search),
                      q_offset, config=config, variant=variant)
  anchors = jax.lax.stop_gradient(anchors)
  logits = gate_logits(q_search, k_search, anchors, variant=variant)
  gates = jax.nn.softmax(jnp.where(anchors >= 0, logits, -1e9), axis=-1)
  span_table = jnp.asarray(masks.superlinear_span_table(lk, config))
  out = span.span_attention(
      q, k, v, anchors, gates, span_table=span_table, window=config.window, scale=scale,
      q_offset=q_offset, block_q=block_q, block_k=block_k, variant=variant)
  return out, anchors.astype(jnp.int32), gates.astype(jnp.float32)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, variant=None,
                          block_q=None, block_k=None):
  """Superlinear attention with Pallas kernels; see `attn.superlinear_attention`.

  `block_q`, `block_k`: span kernel tiles of the prefill path (None = per
  platform). Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32,
  gates [B, Lq, Hq, K] float32)`.
  """
  if q.shape[1] <= decode.MAX_QUERIES:
    return decode.superlinear_attention(q, k, v, q_search, k_search, q_offset,
                                        config=config, scale=scale, variant=variant)
  return call_any_offset(_prefill, q, k, v, q_search, k_search, q_offset,
                         query_args=(0, 3), fills=(0, -1, 0), config=config, scale=scale,
                         variant=variant, block_q=block_q, block_k=block_k)
