"""Cost model of every kernel: FLOPs, transcendentals and HBM bytes.

One module per kernel family (`block_sparse`, `stripe`, `span`, `decode`;
`base`: `KernelCost` and shared helpers), every function re-exported here.

Small pure functions of static ints (shapes, block sizes, table sizes), one
per `pallas_call`, so a kernel can pass `cost_estimate=` and a CPU-only
roofline (`eval/roofline_model.py`) can sum the kernels of an op. They count what
each kernel body *really* loads and computes today:

  * every tile / stripe a program visits, at its block size, with head_dim
    padded as the platform pads it (GPU: a power of two >= 16, TPU: a
    multiple of 128; `padded_head_dim`);
  * HBM bytes as if nothing were cached (no L2/VMEM reuse across programs;
    `KernelCost.wave_hits` holds the separate wave model's L2 hits):
    under GQA a query-head program re-reads its kv head's rows, so reads
    scale with the query heads unless `gqa_shared_reads=True` (one program
    per kv head serving its `G` query heads);
  * stripe steps load `block_q` rows per stripe (TPU: one alignment unit
    more when the stripe's residue is not 0, see `stripe/common.py`);
  * decode stripe/search steps (GPU) gather the `lq` rows each stripe uses,
    many stripes per step (TPU: one DMA of the `lq`-row window per stripe).

Switches for the planned changes (issue 15), default = today's code:
`gqa_shared_reads` (stripe kernels per kv head: on by default for the
search and PPA kernels, which share; off for block-sparse), `num_splits`
(decode: the cache split over more programs, partial states merged; the
kernels pass the split count of `decode.common.stripe_splits` /
`band_splits`, also the default when `num_splits=None`; the span ranges
need the span length, default 1 split), `rows_per_stripe` (decode: rows
loaded per stripe; default `q_len`, what the gathers read). Search once
(issue 15 item 1) is in: `gate_logits_bwd` models its backward.

Every public function returns `jax.experimental.pallas.CostEstimate`; with
`detail=True` it returns a `KernelCost` instead, which also says how many
FLOPs are row-wise (vector units, not matmul units) and how many programs
the grid launches (how much of the device it can fill).

Counts that depend on data (the span kernels' key blocks, the decode range
tiles) are traced inside a jitted call, but a `CostEstimate` needs Python
ints: pass the expected count (`window_key_blocks`, `span_key_blocks`
below), not a traced value.

This is a model, not a measurement: it ignores caches, latency, pipelining,
masking overhead and register spills.
"""

from pallas_kernels.cost.base import (F32_BYTES, I32_BYTES, KernelCost, padded_head_dim,
                                      stripe_rows)
from pallas_kernels.cost.block_sparse import (block_sparse_delta, block_sparse_dkv,
                                              block_sparse_dq, block_sparse_fwd)
from pallas_kernels.cost.decode import (DECODE_TILE, decode_band, decode_ranges,
                                        decode_search, decode_stripes)
from pallas_kernels.cost.span import (span_bwd, span_dkv, span_dq, span_fwd,
                                      span_key_blocks, span_wave_key_blocks,
                                      window_key_blocks)
from pallas_kernels.cost.stripe import (band_chunks, gate_logits_bwd, ppa_dkv, ppa_dq,
                                        ppa_fwd, ppa_stripe_visits, search_wave_rows,
                                        stripe_search, stripe_visits)

__all__ = [
    "DECODE_TILE", "F32_BYTES", "I32_BYTES", "KernelCost", "band_chunks",
    "block_sparse_delta", "block_sparse_dkv", "block_sparse_dq", "block_sparse_fwd",
    "decode_band", "decode_ranges", "decode_search", "decode_stripes", "gate_logits_bwd",
    "padded_head_dim", "ppa_dkv", "ppa_dq", "ppa_fwd", "ppa_stripe_visits",
    "search_wave_rows", "span_bwd", "span_dkv", "span_dq", "span_fwd", "span_key_blocks",
    "span_wave_key_blocks", "stripe_rows", "stripe_search", "stripe_visits",
    "window_key_blocks",
]
