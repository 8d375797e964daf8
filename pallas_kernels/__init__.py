"""Pallas TPU (Mosaic) and GPU (Triton) kernels.

One subpackage per kernel family, with its platform variants side by side:

  * `block_sparse/`: flash attention over the tiles a block layout lists
    (forward, dq and dkv kernels);
  * `stripe/`: one contiguous key slice per key offset for a block of queries
    (PPA attention, superlinear span-search with a running top-k);
  * `span/`: superlinear span attention (data-dependent key ranges merged
    with the window by log-sum-exp, gated);
  * `decode/`: a few queries (1 to 16) against a KV cache of any length,
    superlinear and PPA, reading O(sqrt(t)) / O(w + t^p) keys per token.

Kernels take plain arrays, int32 index tables and static Python ints; they
import nothing from `attn.ops` (the `attn` package builds the tables and calls
them). Every family is `ops.py` (entries, custom_vjp, dispatch,
`HARDWARE_CHECKS`), `common.py` (the arithmetic both platforms share),
`tpu.py` and `gpu.py` (the platform kernels); docs/kernels.md. `common.py`
here holds the arithmetic several families and `attn` share (tile sizes,
softmax-state merge/finish, span bounds). `platform.py` holds the calling
convention every family shares: the variant is chosen at lowering time with
`jax.lax.platform_dependent`, so exporting for `["tpu"]` yields the Mosaic kernel and for `["cuda"]` the Triton
one; on CPU a kernel runs in Pallas interpret mode.
"""
