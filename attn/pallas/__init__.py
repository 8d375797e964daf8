"""The `implementation="pallas"` entries of `attn.ops.IMPLEMENTATIONS`.

One module per op group, each with functions of the same signatures as
`attn.xla` (plus a keyword `variant`, see `pallas_kernels.platform`), its
`OPS`, and `supported(backend, q_len=None)`: whether the kernels a call runs
carry a hardware record (`pallas_kernels.platform.HardwareCheck`) for that
backend, which is what lets `implementation=None` choose them.

  * `block_sparse`: dense, sliding-window and block-sparse attention
    (`pallas_kernels.block_sparse`);
  * `ppa`: PPA (`pallas_kernels.stripe`);
  * `superlinear`: superlinear attention (`pallas_kernels.stripe` search and
    gate logits, `pallas_kernels.span` span attention);
  * `decode`: PPA and superlinear attention for at most `decode.MAX_QUERIES`
    queries (`pallas_kernels.decode`).

Decode rule: `ppa.ppa_attention` and `superlinear.superlinear_attention`
run the decode kernels when `q_len <= decode.MAX_QUERIES`, the prefill
kernels otherwise; `supported` follows the same rule.
"""

from attn.pallas import block_sparse, decode, ppa, superlinear
from attn.pallas.block_sparse import (block_sparse_attention, dense_attention,
                                      sliding_window_attention)
from attn.pallas.ppa import ppa_attention
from attn.pallas.superlinear import superlinear_attention

FAMILIES = (block_sparse, ppa, superlinear)


def supported(op: str, backend: str, q_len: int | None = None) -> bool:
  """Whether `op`'s Pallas path for `q_len` queries has a record for `backend`."""
  return any(m.supported(backend, q_len) for m in FAMILIES if op in m.OPS)


__all__ = ["block_sparse", "block_sparse_attention", "decode", "dense_attention",
           "ppa", "ppa_attention", "sliding_window_attention", "superlinear",
           "superlinear_attention", "supported"]
