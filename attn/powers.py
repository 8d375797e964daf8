"""The integer power-law offsets `floor(j ** (1/p))`, exact (host side, numpy).

The stripe table of superlinear attention (`stripe_offsets`) and the
coverage criterion of a `SuperlinearConfig` (`first_hole`). `attn.config`
validates with these and `attn.masks` builds every other table on them, so
neither imports the other.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from attn import _checks


def int_root_power(s: np.ndarray, inv_p: float) -> np.ndarray:
  """`floor(s ** inv_p)` for int64 `s >= 1`, exact up to float64 rounding.

  The float64 estimate is corrected so that `r ** (1/inv_p) <= s` holds
  within a relative 1e-12 (integer results such as `16 ** 0.75 = 8` are
  kept rather than lost to `7.999...`).
  """
  s = np.asarray(s, dtype=np.int64)
  r = np.floor(s.astype(np.float64) ** inv_p * (1 + 1e-13) + 1e-9).astype(np.int64)
  p = 1.0 / inv_p
  # r is floor(s**inv_p) iff r**p <= s < (r+1)**p (checked with a tolerance).
  too_big = (r.astype(np.float64) ** p) > s * (1 + 1e-12)
  r = np.where(too_big, r - 1, r)
  too_small = ((r + 1).astype(np.float64) ** p) <= s * (1 + 1e-12)
  return np.where(too_small, r + 1, r)


# Stripe offsets at or above this are beyond every int32 position: they are
# returned saturated (equal to it) instead of overflowing int64 (or wrapping
# to small, *future* anchors) for tiny `p`. Below it every value is exact.
STRIPE_BEYOND = 2 ** 31 - 1


@functools.lru_cache(maxsize=64)
def _stripe_offsets_cached(n: int, p: float) -> np.ndarray:
  if p == 1.0:
    return np.minimum(np.arange(1, n + 1, dtype=np.int64), STRIPE_BEYOND)
  j = np.arange(1, n + 1, dtype=np.int64)
  inv_p = 1.0 / p
  # log2 of the value decides saturation without computing huge powers.
  big = np.log2(np.maximum(j, 1).astype(np.float64)) * inv_p >= 31.0
  safe = np.where(big, 1, j)
  out = int_root_power(safe, inv_p)
  return np.where(big | (out >= STRIPE_BEYOND), STRIPE_BEYOND, out).astype(np.int64)


def stripe_offsets(n: int, p: float) -> np.ndarray:
  """`f(j) = floor(j ** (1/p))` for `j = 1..n`: int64 `[n]` (entry `j - 1`).

  The one integer stripe table of superlinear attention (anchor
  `a_j = q + 1 - f(j)`), computed once on the host. Exact below
  `STRIPE_BEYOND = 2**31 - 1`; larger values (tiny `p`) are returned as
  `STRIPE_BEYOND`, a stripe beyond every int32 position (never valid).

  Args:
    n: number of stripes, an int >= 0.
    p: the search power, in `(0, 1]`.
  """
  n = _checks.check_seq_len(n, "n")
  if not _checks.is_real(p) or not 0.0 < float(p) <= 1.0:
    raise ValueError(f"p={p!r}: the search power must be a number in (0, 1] "
                     f"(f(j) = floor(j ** (1/p))).{_checks.traced_hint(p)}")
  out = _stripe_offsets_cached(n, float(p))
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=256)
def first_hole(max_len: int, *, search_power: float, sw_index: int, span_power: float,
               backward_factor: float) -> int | None:
  """Smallest `t <= max_len` at which some key `< t` is in no candidate span.

  Exact criterion (see docs/superlinear.md): stripe `j` anchors at `t - f(j)`;
  consecutive spans overlap whenever the farthest reachable region is covered,
  so coverage holds for all `t <= max_len` iff, for every `J > sw_index`
  with `f(J + 1) - 1 <= max_len`, the keys left of the farthest anchor at
  `t = f(J + 1) - 1` fit in its backward extension:
  `t - f(J) <= ceil(backward_factor * t**span_power)`. Returns None if so.
  """
  p = search_power
  if p == 1.0:
    return None  # every key is an anchor.
  n = int(math.ceil((max_len + 1) ** p)) + 2
  f = stripe_offsets(n, p)                    # f[j - 1] = f(j)
  j = np.arange(sw_index + 1, n)              # J; needs f(J + 1) = f[J]
  t = f[j] - 1
  ok_range = t <= max_len
  j, t = j[ok_range], t[ok_range]
  back = np.ceil(backward_factor * t.astype(np.float64) ** span_power - 1e-9)
  bad = (t - f[j - 1]) > back
  # Interior gaps are no wider than the leftmost one (f is convex), and the
  # window covers everything for t <= W.
  return int(t[bad][0]) if bad.any() else None
