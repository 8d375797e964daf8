"""Stripe kernels: one contiguous key slice per key offset for a block of queries.

* `search_topk`: superlinear span-search (unscaled float32 stripe scores,
  running top-k in the kernel, ties to the farther stripe);
* `selected_scores`: the differentiable gate logits at chosen anchors
  (dq and dk kernels; dk as transposed stripes, no atomics);
* `ppa_attention`: attention over a static offset set (dense runs as matmul
  tiles, sparse far offsets as stripes), forward, dq and dk/dv kernels.

Design notes: docs/kernels_stripe.md.
"""

from pallas_kernels.stripe.ops import (HARDWARE_CHECKS, ppa_attention, search_topk,
                                       selected_scores)

__all__ = ["HARDWARE_CHECKS", "ppa_attention", "search_topk", "selected_scores"]
