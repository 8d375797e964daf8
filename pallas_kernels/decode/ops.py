"""Public entries of the decode kernels: platform dispatch per kernel.

Four forward kernels; each has a TPU variant (`tpu.py`) and a GPU variant
(`gpu.py`) taking the same arrays and returning the same arrays, chosen at
lowering time by `pallas_kernels.platform.dispatch`. Gradients: none here
(decode); the `attn` glue decides what differentiation means.

Shapes (`B` batch, `Hk` kv heads, `R = G * lq` rows per kv head with
`r = g * lq + i`, see `common.py`; `Lk` cache rows, `D` head_dim):

  * the cache `k, v, ks: [B, Lk, Hk, D]` in the model's layout, never copied
    (except the GPU variant's head_dim padding, see `gpu.py`); rows past the
    last query position may hold anything, NaN included;
  * `q, qs: [B, Hk, R, D]`, the queries of each kv head's group, as rows;
  * partial softmax states `(m, l, o)`: float32, `m, l: [B, Hk, R(, K)]`,
    `o: [B, Hk, R(, K), D]` (`m = -inf, l = 0, o = 0` where no key is seen).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.decode import common, gpu, tpu

# Hardware runs of these kernels (compiled tests + benchmark). Empty: they
# have run only in the CPU interpreters and been lowered by `jax.export`, so
# `implementation=None` keeps choosing `xla`. A `HardwareCheck("gpu", ...)`
# record here, written after `pytest -m gpu tests/test_pallas_decode.py`
# passes on a GPU, is what would let None pick them on that backend.
HARDWARE_CHECKS: tuple[platform.HardwareCheck, ...] = ()


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def search(q_offset, first, f_desc, qs, ks, *, lq: int, num: int, variant=None,
           num_splits: int | None = None):
  """Superlinear span-search for `lq` queries at `q_offset + i`.

  For every stripe `j >= first` of the far-to-near table `f_desc` (int32
  `[S]`), the anchors `q_offset + i + 1 - f_desc[j]` of the `lq` queries
  are `lq` consecutive cache rows (one contiguous read); their unscaled
  float32 scores `<qs_r, ks[anchor]>` (`-inf` for a negative anchor) feed a
  running top-`num` per row, ties keeping the farther stripe.

  The table is cut into `num_splits` contiguous chunks (None: the rule
  `common.split_count`), one program each per (batch, kv head); their
  top-`num` lists are merged by `common.merge_topk` (same tie rule).

  Returns `(scores f32 [B, Hk, R, num], anchors int32 [B, Hk, R, num])`,
  best first, `(-inf, -1)` in slots without a valid anchor.
  """
  scal = _i32(jnp.stack([_i32(q_offset), _i32(first)]))
  fn = lambda v_: lambda *a, interpret: v_.search(  # noqa: E731
      *a, lq=lq, num=num, interpret=interpret, num_splits=num_splits)
  s, a = platform.dispatch((scal, _i32(f_desc), qs, ks), tpu=fn(tpu), gpu=fn(gpu),
                           variant=variant)
  return common.merge_topk(s, a, num)


def _merged(parts):
  """Per-split states `[B, Hk, S, R(, D)]` -> merged `[B, Hk, R(, D)]`."""
  return common.merge_split_states(*parts, axis=2)


def band(q_offset, q, k, v, *, lq: int, width: int, scale: float, variant=None,
         num_splits: int | None = None):
  """Partial softmax of every row over the keys at offsets `[0, width)`.

  Reads the `width + lq - 1` keys `[q_offset - width + 1, q_offset + lq)`
  in tiles, cut into `num_splits` chunks of tiles (None: `common.split_count`)
  whose states are merged. Returns `(m, l, o)` over `[B, Hk, R]`.
  """
  scal = _i32(q_offset)[None]
  fn = lambda v_: lambda *a, interpret: v_.band(  # noqa: E731
      *a, lq=lq, width=width, scale=scale, interpret=interpret, num_splits=num_splits)
  return _merged(platform.dispatch((scal, q, k, v), tpu=fn(tpu), gpu=fn(gpu),
                                   variant=variant))


def stripes(q_offset, count, d_asc, q, k, v, *, lq: int, scale: float, variant=None,
            num_splits: int | None = None):
  """Partial softmax of every row over the keys at the stripe offsets.

  `d_asc`: int32 `[S]` ascending offsets `>= 1`; the first `count` of them
  are visited (those `<= q_offset + lq - 1`), each one contiguous read of
  `lq` rows, cut into `num_splits` chunks (None: `common.split_count`) whose
  states are merged. Returns `(m, l, o)` over `[B, Hk, R]`.
  """
  scal = _i32(jnp.stack([_i32(q_offset), _i32(count)]))
  fn = lambda v_: lambda *a, interpret: v_.stripes(  # noqa: E731
      *a, lq=lq, scale=scale, interpret=interpret, num_splits=num_splits)
  return _merged(platform.dispatch((scal, _i32(d_asc), q, k, v), tpu=fn(tpu),
                                   gpu=fn(gpu), variant=variant))


def ranges(lo, hi, q, k, v, *, scale: float, variant=None, max_len: int | None = None,
           num_splits: int | None = None):
  """Partial softmax of row `r` over the keys `[lo, hi]` of each of its slots.

  lo, hi: int32 `[B, Hk, R, K]` (inclusive; `hi < lo` is empty). Cost is
  the summed range lengths. Each range is cut into `num_splits` equal parts,
  one program each (None: `common.range_splits` from `max_len`, the longest
  range possible, a static int; no split when it is None), merged here.
  Returns `(m, l, o)` over `[B, Hk, R, K]`.
  """
  fn = lambda v_: lambda *a, interpret: v_.ranges(  # noqa: E731
      *a, scale=scale, interpret=interpret, max_len=max_len, num_splits=num_splits)
  parts = platform.dispatch((_i32(lo), _i32(hi), q, k, v), tpu=fn(tpu), gpu=fn(gpu),
                            variant=variant)
  return common.merge_split_states(*parts, axis=4)
