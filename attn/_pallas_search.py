"""Glue from superlinear attention to the stripe search kernels.

`search` scores the stripe anchors of the shared host table
`attn.masks.superlinear_stripe_table` (far to near) and keeps the top
`num_spans` per query head; `gate_logits` recomputes the selected scores
differentiably (the only path by which `q_search` and `k_search` learn).
"""

from __future__ import annotations

from attn import masks
from attn.config import SuperlinearConfig
from pallas_kernels import stripe


def search(q_search, k_search, q_offset, *, config: SuperlinearConfig, variant=None):
  """Top-`num_spans` anchors and scores per query head.

  q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]`; q_offset: None
  (`Lk - Lq`), an int or a traced int32 scalar. Returns `(anchors int32
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
