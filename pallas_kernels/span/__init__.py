"""Superlinear span attention kernels (forward and backward), TPU and GPU.

`interval_attention`: rows attend one contiguous key range each (the
kernels, with a `jax.custom_vjp`); `span_attention`: the superlinear
window + gated spans built on it. See `docs/kernels_span.md`.
"""

from pallas_kernels.span.ops import HARDWARE_CHECKS, interval_attention, span_attention

__all__ = ["HARDWARE_CHECKS", "interval_attention", "span_attention"]
