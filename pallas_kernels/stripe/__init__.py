"""Stripe kernels: one contiguous key slice per key offset for a block of queries.

* `search_topk`: superlinear span-search (unscaled float32 stripe scores,
  running top-k in the kernel, ties to the farther stripe); its scores are
  the gate logits (`attn.pallas.superlinear.gate_logits`, search once);
* `ppa_attention`: attention over a static offset set (dense runs as matmul
  tiles, sparse far offsets as stripes), forward, dq and dk/dv kernels.

Design notes: docs/kernels_stripe.md.
"""

from pallas_kernels.stripe.ops import HARDWARE_CHECKS, ppa_attention, search_topk

__all__ = ["HARDWARE_CHECKS", "ppa_attention", "search_topk"]
