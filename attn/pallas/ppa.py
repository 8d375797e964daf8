"""PPA on the stripe kernels (prefill) and the decode kernels (a few queries).

`ppa_attention` has the signature of `attn.xla.ppa_attention` (plus
`variant`, see `pallas_kernels.platform`). Decode rule: a call with
`q_len <= decode.MAX_QUERIES` runs `attn.pallas.decode.ppa_attention`; a
longer one runs the stripe kernels, with the kept offsets of
`attn.masks.ppa_offsets` split by `attn.masks.ppa_dense_runs` into dense
runs (matmul tiles: the window, and everything at `p = 1`) and sparse far
offsets (one stripe each).
"""

from __future__ import annotations

from attn import masks
from attn._offsets import call_any_offset
from attn.pallas import decode
from pallas_kernels import platform, stripe

OPS = ("ppa_attention",)

def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the kernels a call with `q_len` queries runs have a record for `backend`."""
  if q_len is not None and q_len <= decode.MAX_QUERIES:
    return decode.supported(backend)
  return platform.verified_on(stripe.HARDWARE_CHECKS, backend)


def _prefill(q, k, v, q_offset, *, p, window, scale, variant):
  lq, lk = q.shape[1], k.shape[1]
  offsets = masks.ppa_offsets(lk - 1, p=p, window=min(window, lk))
  runs, far = masks.ppa_dense_runs(offsets)
  return stripe.ppa_attention(q, k, v, dense_runs=runs, far_offsets=far, scale=scale,
                              q_offset=lk - lq if q_offset is None else q_offset,
                              variant=variant)


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale, variant=None):
  """PPA with the Pallas kernels; arguments as in `attn.xla.ppa_attention`."""
  if q.shape[1] <= decode.MAX_QUERIES:
    return decode.ppa_attention(q, k, v, q_offset, p=p, window=window, scale=scale,
                                variant=variant)
  return call_any_offset(_prefill, q, k, v, q_offset, query_args=(0,), fills=(0,), p=p,
                         window=window, scale=scale, variant=variant)
