"""Sub-quadratic pure-jnp (`implementation="xla"`) paths.

One module per op family: `dense` (dense, sliding window, block sparse),
`ppa`, `superlinear`; `blocks` holds the pieces they share.

No op here builds an `[q_len, kv_len]` matrix (except `dense_attention`,
whose scores are quadratic by definition, and even it only holds one query
block at a time). Queries are processed in blocks of `bq` under `lax.map`
with a rematerialised body, so memory is one block's working set in the
forward and in the backward pass. Inside a block every piece of work reads
*contiguous* key slices with `dynamic_slice`:

* a band of offsets `[lo, hi]` (the local window; PPA's dense runs of kept
  offsets): one slice of `bq + hi - lo` keys per query block, a masked matmul;
* a stripe (a fixed offset `d`: PPA's sparse power offsets, superlinear's
  search anchors): one slice of consecutive keys for consecutive queries,
  scored row-wise (`q_i . k_{i-d}`), no gather of single keys;
* a superlinear span: one slice of `max_span` keys per (query, head, span).

Pieces of one softmax are merged through their running max / sum / weighted
values, as in flash attention. Softmax statistics are float32 whatever the
input dtype. Keys and values are sliced from float32 copies (cast back to the
input dtype where a matmul reads them), or, for superlinear spans, read in
the input dtype by a gather whose VJP sums in float32 (`_span_rows`), so in
the backward pass the cotangents of overlapping slices accumulate in
float32, not bfloat16.

Positions: query `i` sits at absolute position `q_offset + i`. A traced
`q_offset` may lie outside `[0, kv_len - q_len]`: `_any_offset` then shifts
the query rows so that the kernels always run at an in-range offset, and a
query whose position lies outside `[0, kv_len)` returns a zero row, as in
`attn.reference`. Inside the kernels every row outside the call's valid
position range `[lo, hi]` (padding rows of the last block included) sees no
key. Keys no valid query may see contribute exactly nothing even if they
hold NaN or Inf: every slice read is zeroed where no row of the block may
see it before any arithmetic (`0 * NaN` would be NaN in values and
gradients).

Shapes: `q: [B, Lq, Hq, D]`, `k, v: [B, Lk, Hk, D]`, `G = Hq // Hk`.
"""

from attn.xla.dense import block_sparse_attention, dense_attention, sliding_window_attention
from attn.xla.ppa import ppa_attention
from attn.xla.superlinear import superlinear_attention

__all__ = ["block_sparse_attention", "dense_attention", "ppa_attention",
           "sliding_window_attention", "superlinear_attention"]
