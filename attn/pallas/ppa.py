"""PPA on the stripe kernels (prefill) and the decode kernels (a few queries).

`ppa_attention` has the signature of `attn.xla.ppa_attention` (plus
`variant`, see `pallas_kernels.platform`). Decode rule: a call with
`q_len <= decode.MAX_QUERIES` runs `attn.pallas.decode.ppa_attention`; a
longer one runs the stripe kernels, with the kept offsets of
`attn.masks.ppa_offsets` split into dense runs (matmul tiles: the window,
and everything at `p = 1`) and sparse far offsets (one stripe each).
"""

from __future__ import annotations

import numpy as np

from attn import masks
from attn._offsets import call_any_offset
from attn.pallas import decode
from pallas_kernels import platform, stripe

OPS = ("ppa_attention",)

# A run of at least this many consecutive kept offsets is computed as
# matmul tiles; shorter runs are stripes (row-wise dots). The run holding
# offset 0 (the window) is always a band.
MIN_RUN = 16


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the kernels a call with `q_len` queries runs have a record for `backend`."""
  if q_len is not None and q_len <= decode.MAX_QUERIES:
    return decode.supported(backend)
  return platform.verified_on(stripe.HARDWARE_CHECKS, backend)


def split_offsets(offsets: np.ndarray, min_run: int = MIN_RUN):
  """Kept offsets -> `(dense_runs [(lo, hi)], far_offsets int64 [S])` (host side)."""
  offsets = np.asarray(offsets, np.int64)
  if offsets.size == 0:
    return (), offsets
  breaks = np.nonzero(np.diff(offsets) != 1)[0]
  starts = np.concatenate([[0], breaks + 1])
  ends = np.concatenate([breaks, [offsets.size - 1]])
  runs, far = [], []
  for s, e in zip(starts, ends):
    if e - s + 1 >= min_run or offsets[s] == 0:
      runs.append((int(offsets[s]), int(offsets[e])))
    else:
      far.append(offsets[s:e + 1])
  far = np.concatenate(far) if far else np.zeros((0,), np.int64)
  return tuple(runs), far


def _prefill(q, k, v, q_offset, *, p, window, scale, variant):
  lq, lk = q.shape[1], k.shape[1]
  offsets = masks.ppa_offsets(lk - 1, p=p, window=min(window, lk))
  runs, far = split_offsets(offsets)
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
