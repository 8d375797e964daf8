"""Sub-quadratic attention for JAX: superlinear multi-step attention and PPA.

Pure-functional ops with a dense reference, a sub-quadratic `xla` path and
Pallas kernels (`attn.pallas`), selected by `implementation=` (one of
`IMPLEMENTATION_CHOICES`).
"""

__version__ = "0.1.0"  # the package version (setup.cfg reads it from here)

from attn._checks import IMPLEMENTATION_CHOICES
from attn.config import SuperlinearConfig
from attn.layout import BlockLayout
from attn.masks import (
    causal_mask,
    ppa_mask,
    ppa_offsets,
    sliding_window_mask,
    stripe_offsets,
    superlinear_candidate_mask,
)
from attn.ops import (
    SuperlinearOutput,
    block_sparse_attention,
    dense_attention,
    ppa_attention,
    sliding_window_attention,
    superlinear_attention,
    superlinear_attention_with_anchors,
)
from attn.layers import Attention

__all__ = [
    "Attention",
    "IMPLEMENTATION_CHOICES",
    "BlockLayout",
    "SuperlinearConfig",
    "SuperlinearOutput",
    "block_sparse_attention",
    "causal_mask",
    "dense_attention",
    "ppa_attention",
    "ppa_mask",
    "ppa_offsets",
    "sliding_window_attention",
    "sliding_window_mask",
    "stripe_offsets",
    "superlinear_attention",
    "superlinear_attention_with_anchors",
    "superlinear_candidate_mask",
]
