"""Decode kernels: a few queries (1-16) against a KV cache of any length.

Superlinear attention (stripe span-search with a running top-k, then the
selected spans and the window) and PPA (the dense band of kept offsets and
one row per kept far offset), reading `O(sqrt(t))` / `O(w + t^p)` cache rows
per token instead of `O(t)`. `ops.py` holds the four forward kernels
(`search`, `band`, `stripes`, `ranges`) with their platform dispatch,
`common.py` the block logic both variants share, `tpu.py` / `gpu.py` the
Mosaic and Triton variants. The `attn` entry points are in `attn/pallas/decode.py`;
docs/kernels_decode.md describes the design.
"""

from pallas_kernels.decode.ops import HARDWARE_CHECKS

__all__ = ["HARDWARE_CHECKS"]
