"""Glue from `attn.ppa_attention(..., implementation="pallas")` to the stripe kernels.

The kept offsets come from the one host table `attn.masks.ppa_offsets`; they
are split into dense runs (matmul tiles in the kernel: the window, and
everything at `p = 1`) and sparse far offsets (one stripe each).
"""

from __future__ import annotations

import numpy as np

from attn import masks
from pallas_kernels import stripe

# A run of at least this many consecutive kept offsets is computed as
# matmul tiles; shorter runs are stripes (row-wise dots). The run holding
# offset 0 (the window) is always a band.
MIN_RUN = 16


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


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale, variant=None):
  """PPA with the Pallas kernels; arguments as in `attn.reference.ppa_attention`."""
  lq, lk = q.shape[1], k.shape[1]
  offsets = masks.ppa_offsets(lk - 1, p=p, window=min(window, lk))
  runs, far = split_offsets(offsets)
  return stripe.ppa_attention(q, k, v, dense_runs=runs, far_offsets=far, scale=scale,
                              q_offset=lk - lq if q_offset is None else q_offset,
                              variant=variant)
