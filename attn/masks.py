"""Host-side (numpy) index tables and masks, shared by every implementation.

All integer tables are computed here once, in float64 with an exact integer
correction, so prefill, decode, the reference, the `xla` path and the Pallas
kernels agree on every offset (float32 `pow` does not, by up to tens of
positions at `p = 0.55`).

Conventions: `d = query_position - key_position >= 0` is the offset of a key
from its query, `t = query_position + 1` the number of visible keys.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from attn import _checks, powers
from attn.powers import stripe_offsets
from attn.config import SuperlinearConfig
from pallas_kernels import common


def ppa_offsets(max_offset: int, *, p: float, window: int) -> np.ndarray:
  """Kept key offsets of PPA in `[0, max_offset]`, ascending, int64.

  The rule (our choice, documented in docs/ppa.md): offset `d` is kept iff
  `d < window` or `d = ceil(s ** (1/p))` for some integer `s >= 1`;
  equivalently `floor(d**p) > floor((d-1)**p)` for `d >= 1`. So exactly
  `floor(n**p)` power offsets lie in `[1, n]`; `p = 1/2` keeps the perfect
  squares, `p = 3/4` keeps 1, 3, 5, 7, 9, 11, 14, 16, 19, 22, ...; `p = 1`
  keeps every offset and `p = 0` none beyond the window.
  """
  return _ppa_offsets_cached(_checks.check_seq_len(max_offset, "max_offset"),
                             _checks.check_p(p), _checks.check_window(window))


@functools.lru_cache(maxsize=64)
def _ppa_offsets_cached(max_offset: int, p: float, window: int) -> np.ndarray:
  local = np.arange(min(window, max_offset + 1), dtype=np.int64)
  if p == 0.0 or max_offset < 1:
    far = np.zeros((0,), np.int64)
  elif p == 1.0:
    far = np.arange(1, max_offset + 1, dtype=np.int64)
  else:
    # ceil(s**(1/p)) = floor((s-1)**(1/p)) + 1 unless s**(1/p) is an integer;
    # work with counts instead: floor(d**p) steps at the kept d.
    d = np.arange(1, max_offset + 1, dtype=np.int64)
    count = powers.int_root_power(d, p)                # floor(d ** p)
    prev = np.concatenate([[0], count[:-1]])     # floor((d - 1) ** p), 0 at d=1
    far = d[count > prev]
  out = np.union1d(local, far).astype(np.int64)
  out.flags.writeable = False
  return out


# A run of at least this many consecutive kept PPA offsets is computed as
# matmul tiles by the Pallas kernels; shorter runs are stripes (row-wise dots).
PPA_MIN_RUN = 16


def ppa_dense_runs(offsets: np.ndarray, min_run: int = PPA_MIN_RUN):
  """Kept PPA offsets -> `(dense_runs ((lo, hi), ...), far_offsets int64 [S])`.

  A run of at least `min_run` consecutive offsets, and the run holding offset
  0 (the window), is a dense run; every other offset is a far offset. The
  Pallas prefill kernels use `min_run = PPA_MIN_RUN`; the decode kernels
  `min_run > offsets.size` (only the run at 0 is a band).
  """
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


# The `xla` path's rule: offsets are cut into bins of `PPA_BIN` keys; a bin
# dense enough that one masked matmul over it beats row-wise dots (a row-wise
# dot costs about `PPA_ROWWISE_COST` matmul score entries on CPU, measured)
# becomes (part of) a band.
PPA_BIN = 64
PPA_ROWWISE_COST = 16


def ppa_masked_bands(offsets: np.ndarray, block_q: int = 128):
  """Kept PPA offsets -> `(bands, far_offsets)` for masked banded matmuls.

  The `xla` path's split (the Pallas kernels use `ppa_dense_runs`, exact runs
  without masks). `bands` is a list of `(lo, hi, keep)` with `keep` a bool
  `[hi - lo + 1]` (None when every offset of the band is kept), one masked
  matmul per query block of `block_q` rows; `far_offsets` the remaining
  offsets, one row-wise slice each.
  """
  offsets = np.asarray(offsets)
  bins = offsets // PPA_BIN
  dense = np.bincount(bins) * PPA_ROWWISE_COST >= block_q + PPA_BIN
  in_band = dense[bins]
  bands = []
  for b in np.nonzero(dense)[0]:
    lo, hi = int(offsets[bins == b].min()), int(offsets[bins == b].max())
    if bands and b > 0 and dense[b - 1]:   # extend the previous band
      lo = bands.pop()[0]
    bands.append((lo, hi))
  kept = set(offsets[in_band].tolist())
  out = []
  for lo, hi in bands:
    keep = np.array([d in kept for d in range(lo, hi + 1)])
    out.append((lo, hi, None if keep.all() else keep))
  return out, offsets[~in_band]


def causal_mask(q_len: int, kv_len: int | None = None, *, q_offset: int | None = None):
  """`[q_len, kv_len]` bool: key `k` visible to query `i` iff `k <= q_offset + i`.

  `kv_len >= q_len` (default `q_len`); `q_offset` in `[0, kv_len - q_len]`
  (default `kv_len - q_len`), as for the ops.
  """
  q_len = _checks.check_seq_len(q_len, "q_len")
  kv_len = q_len if kv_len is None else _checks.check_seq_len(kv_len, "kv_len")
  if kv_len < q_len:
    raise ValueError(f"kv_len={kv_len} < q_len={q_len}: the queries must be the "
                     "positions of some of the keys.")
  _checks.check_q_offset(q_offset, q_len, kv_len)
  q_offset = kv_len - q_len if q_offset is None else int(q_offset)
  qpos = q_offset + np.arange(q_len)[:, None]
  return np.arange(kv_len)[None, :] <= qpos


def ppa_mask(seq_len: int, *, p: float, window: int = 64) -> np.ndarray:
  """The exact PPA key set of each query: bool `[seq_len, seq_len]`.

  `mask[i, k]` is True iff query `i` attends key `k` (see `ppa_offsets` for the
  rule). Host-side, for tests and plots; the ops never build it.
  """
  seq_len = _checks.check_seq_len(seq_len)
  if seq_len == 0:
    return np.zeros((0, 0), bool)
  offs = ppa_offsets(max(seq_len - 1, 0), p=p, window=window)
  keep = np.zeros((seq_len,), bool)
  keep[offs] = True
  d = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
  return (d >= 0) & keep[np.clip(d, 0, None)]


def sliding_window_mask(seq_len: int, *, window: int) -> np.ndarray:
  """bool `[seq_len, seq_len]`: query `i` sees keys `[i - window + 1, i]`."""
  seq_len = _checks.check_seq_len(seq_len)
  window = _checks.check_window(window)
  d = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
  return (d >= 0) & (d < window)


# ---------------------------------------------------------------- superlinear


def superlinear_num_stripes(max_len: int, config: SuperlinearConfig) -> int:
  """Number of stripes `j = s+1 .. J` with `f(J) <= max_len`.

  At least `num_spans`, so that top-k always has enough candidates (extra
  stripes lie beyond the sequence and are never valid).
  """
  p = config.search_power
  # J = #{j : f(j) <= max_len}; f(j) <= L  <=>  j < (L + 1)**p.
  guess = int(math.ceil((max_len + 1) ** p)) + 2
  j_max = int(np.sum(stripe_offsets(guess, p) <= max_len))
  return max(j_max - config.sw_index, config.num_spans)


def superlinear_stripe_table(max_len: int, config: SuperlinearConfig) -> np.ndarray:
  """int32 `[num_stripes]`: `f(j)` for `j = J, J-1, ..., s+1` (far to near).

  Ordered far-to-near so that `jax.lax.top_k`, which keeps the lower index
  on ties, keeps the farther stripe as the reference does.
  """
  n = superlinear_num_stripes(max_len, config)
  f = stripe_offsets(config.sw_index + n, config.search_power)[config.sw_index:]
  return f[::-1].astype(np.int32)


def superlinear_span_table(max_len: int, config: SuperlinearConfig) -> np.ndarray:
  """int32 `[max_len + 1, 2]`: `(ceil(bb * t**sigma), ceil(bf * t**sigma))` per `t`.

  Row `t` is indexed by the number of visible keys; row 0 is unused. Entries
  are capped at `max_len` (a span never reaches further than `t` keys; huge
  factors would otherwise overflow int32 and wrap negative).
  """
  t = np.arange(max_len + 1, dtype=np.float64)
  grow = t ** config.span_power
  back = np.ceil(config.backward_factor * grow - 1e-9)
  fwd = np.ceil(config.forward_factor * grow - 1e-9)
  table = np.minimum(np.stack([back, fwd], axis=-1), float(max_len))
  return table.astype(np.int32)


def superlinear_max_span(max_len: int, config: SuperlinearConfig) -> int:
  """Longest span (keys) any query of a `max_len` sequence can select."""
  spans = superlinear_span_table(max_len, config)
  return int(spans.sum(axis=-1).max()) + 1


def superlinear_spans(q_pos: np.ndarray, anchors: np.ndarray, max_len: int,
                      config: SuperlinearConfig):
  """Host-side `[start, end]` (inclusive) of the span of each anchor.

  `q_pos` broadcasts against `anchors`; an anchor `< 0` or an empty range
  gives `(0, -1)` (`pallas_kernels.common.span_bounds`).
  """
  back, fwd = common.span_lengths(superlinear_span_table(max_len, config), q_pos)
  start, end = common.span_bounds(anchors, q_pos, back, fwd, config.window)
  return np.asarray(start), np.asarray(end)


def superlinear_first_hole(config: SuperlinearConfig, max_len: int) -> int | None:
  """Smallest `t <= max_len` at which some key `< t` is in no candidate span
  (None if there is none); see `attn.powers.first_hole`."""
  return powers.first_hole(max_len, search_power=config.search_power,
                           sw_index=config.sw_index, span_power=config.span_power,
                           backward_factor=config.backward_factor)


def superlinear_candidate_mask(seq_len: int, *, config: SuperlinearConfig) -> np.ndarray:
  """bool `[seq_len, seq_len]`: the union of the window and all candidate spans.

  Random context access means this equals the causal mask for every valid
  config; `tests/test_masks.py` checks it over lengths and configs.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
  missing = [f for f in ("window", "num_spans", "span_power", "backward_factor",
                         "forward_factor", "search_power", "sw_index") if not hasattr(config, f)]
  if missing:
    raise ValueError(f"config must be an attn.SuperlinearConfig (missing {', '.join(missing)}), "
                     f"got {type(config).__name__}.")
  w = config.window
  f = superlinear_stripe_table(seq_len, config)               # [S]
  q = np.arange(seq_len)
  anchors = q[:, None] + 1 - f[None, :]                       # [L, S]
  start, end = superlinear_spans(q[:, None], anchors, seq_len, config)
  # Interval union via a difference array: +1 at start, -1 after end.
  diff = np.zeros((seq_len, seq_len + 1), np.int32)
  rows = np.broadcast_to(q[:, None], anchors.shape)
  ok = end >= start
  np.add.at(diff, (rows[ok], start[ok]), 1)
  np.add.at(diff, (rows[ok], end[ok] + 1), -1)
  covered = np.cumsum(diff, axis=1)[:, :seq_len] > 0
  d = q[:, None] - np.arange(seq_len)[None, :]
  window = (d >= 0) & (d < w)
  return covered | window
