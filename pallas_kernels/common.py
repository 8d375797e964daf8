"""Arithmetic shared by every kernel family and by `attn`'s xla path.

  * tile sizes: `cdiv`, `round_up`, `next_pow2`, `pad_head_dim` (static ints);
  * softmax states: `SoftmaxState` `(m, l, o)` (flash-attention form),
    `merge_states`, `finish_state`; and `merge_softmax` for two normalised
    parts given by their log-sum-exp;
  * superlinear span bounds: `span_lengths` (a row of the span table),
    `span_bounds` (the key range of each anchor). `attn.masks`, `attn.xla`,
    `attn.reference`, `attn.pallas` and the span kernels all use these;
  * per-row vectors inside a TPU kernel: `to_column` / `to_row` turn a
    lane-dense `[1, n]` row into the `[n, 1]` column tile math broadcasts
    over keys and back (`flip_vector`);
  * GPU launch order: `block_first` / `block_first_id` (below).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
LANES = 128           # TPU lane width: head_dim inside a TPU kernel is a multiple
MIN_TRITON_DIM = 16   # smallest Triton block dim


def cdiv(a, b):
  """`ceil(a / b)` for ints (static or traced)."""
  return (a + b - 1) // b


def round_up(x: int, m: int) -> int:
  """Smallest multiple of `m` that is `>= x`."""
  return -(-int(x) // m) * m


def next_pow2(n: int, minimum: int = 1) -> int:
  """Smallest power of two `>= max(n, minimum)`."""
  return 1 << max(0, max(int(n), minimum) - 1).bit_length()


def pad_head_dim(d: int, platform: str) -> int:
  """head_dim inside a kernel: TPU a multiple of 128 (lanes), GPU a power of
  two >= 16 (Triton block dims)."""
  if platform == "tpu":
    return round_up(d, LANES)
  return next_pow2(d, MIN_TRITON_DIM)


class SoftmaxState(NamedTuple):
  """Unnormalised softmax state of a set of keys (flash-attention form).

  m: running max `[...]`; l: sum of `exp(s - m)`; o: `sum exp(s - m) v`
  `[..., D]`. An empty set has `m = -inf, l = 0, o = 0`.
  """
  m: jax.Array
  l: jax.Array
  o: jax.Array


def merge_states(a, b) -> SoftmaxState:
  """The state of the union of two disjoint key sets (any matching shapes)."""
  ma, la, oa = a
  mb, lb, ob = b
  m = jnp.maximum(ma, mb)
  safe = jnp.where(jnp.isfinite(m), m, 0.0)
  wa = jnp.where(jnp.isfinite(ma), jnp.exp(ma - safe), 0.0)
  wb = jnp.where(jnp.isfinite(mb), jnp.exp(mb - safe), 0.0)
  return SoftmaxState(m, wa * la + wb * lb, wa[..., None] * oa + wb[..., None] * ob)


def finish_state(state):
  """`(out [..., D], lse [...])`: the normalised output (0 where no key was
  visible) and its log-sum-exp (-inf there)."""
  m, l, o = state
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  out = jnp.where(ok[..., None], o / l_safe[..., None], 0.0)
  return out, jnp.where(ok, jnp.log(l_safe) + m, -jnp.inf)


def merge_softmax(o_a, lse_a, o_b, lse_b):
  """Softmax over the union of two disjoint key sets from their parts.

  `o_*`: `[..., D]` normalised outputs, `lse_*`: `[...]` (-inf = empty).
  Returns `(o, lse)`; both empty gives `(0, -inf)`. Differentiable (no NaN
  for empty parts).
  """
  m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  tot = wa + wb
  ok = tot > 0
  tot_safe = jnp.where(ok, tot, 1.0)
  o = (wa[..., None] * o_a + wb[..., None] * o_b) / tot_safe[..., None]
  lse = jnp.where(ok, m + jnp.log(tot_safe), -jnp.inf)
  return o, lse


def span_lengths(span_table, pos):
  """`(back, fwd)`: row `t = pos + 1` of the span table (clipped into it).

  span_table: int32 `[max_len + 1, 2]` (`attn.masks.superlinear_span_table`);
  pos: int32 absolute query positions, any shape.
  """
  t = jnp.clip(pos + 1, 0, span_table.shape[0] - 1)
  if isinstance(span_table, np.ndarray):
    # Two 1-D constants: one `[L + 1, 2]` constant is padded to 128 lanes on
    # TPU (512 MiB at 1M).
    back, fwd = (jnp.asarray(np.ascontiguousarray(span_table[:, i])) for i in (0, 1))
  else:
    back, fwd = span_table[:, 0], span_table[:, 1]
  return back[t], fwd[t]


def span_bounds(anchors, pos, back, fwd, window: int):
  """Inclusive key range `[lo, hi]` of the span of each anchor.

  `[max(a - back, 0), min(a + fwd, pos - W)]`; an anchor `< 0` (invalid
  slot) or an empty range gives `(0, -1)`. `anchors` int32 `[..., K]`;
  `pos`, `back`, `fwd` int32 broadcastable to `anchors` (`span_lengths`).
  """
  lo = jnp.maximum(anchors - back, 0)
  hi = jnp.minimum(anchors + fwd, pos - window)
  empty = (anchors < 0) | (hi < lo)
  return (jnp.where(empty, 0, lo).astype(jnp.int32),
          jnp.where(empty, -1, hi).astype(jnp.int32))


def flip_vector(vec, axis: int):
  """`[1, n] <-> [n, 1]` (`axis=1`: row to column, `axis=0`: column to row),
  inside a kernel.

  The vector broadcast to `[n, n]`, masked to the diagonal and summed over
  `axis`: exact (one value and zeros; `-inf` stays `-inf`; int32 stays
  int32), where a reshape would be cheaper but Mosaic lowers that shape cast
  to a sublane gather, which TPU v4 does not have (its kernels then fail to
  compile for v4). `O(n^2)` VPU work, once per vector and tile.
  """
  n = max(vec.shape)
  i = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  diag = i == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  full = jnp.broadcast_to(vec, (n, n))
  return jnp.sum(jnp.where(diag, full, jnp.zeros((), vec.dtype)), axis=axis,
                 keepdims=True)


def to_column(row):
  """`[1, n] -> [n, 1]` (`flip_vector`)."""
  return flip_vector(row, 1)


def to_row(col):
  """`[n, 1] -> [1, n]` (`flip_vector`)."""
  return flip_vector(col, 0)


def pallas_call(kernel, *, out_shape, **kwargs):
  """`pl.pallas_call` whose outputs are typed as varying over every manual
  mesh axis any input varies over.

  Inside a `jax.shard_map` with `check_vma=True`, `pl.pallas_call` needs each
  `out_shape` to state its `manual_axis_type`; a kernel's output depends on
  all of its inputs, so it varies over the union of their axes. Outside a
  shard_map (or with `check_vma=False`) every input's set is empty and this
  is `pl.pallas_call` itself.
  """
  from jax.experimental import pallas as pl

  def varying(x) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()

  def call(*args):
    axes = frozenset().union(*(varying(a) for a in jax.tree.leaves(args)))
    mat = jax.sharding.ManualAxisType(varying=axes)
    shapes = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat)
        if isinstance(s, jax.ShapeDtypeStruct) else s, out_shape)
    return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)

  return call


# ------------------------------------------------------------ GPU launch order

# Grids are written `(batch, head, block[, ...])`: axis 2 walks the query
# (or key, or pair-tile) blocks of one (batch, head). Pallas Triton launches
# the first grid axis as CUDA's fastest-varying one, and the GPU dispatches
# programs in that order, so a `(batch, head, block)` launch keeps every head
# in flight at once (`batch * heads * a few blocks`): concurrent programs
# share no K/V rows. `block_first` launches axis 2 first instead, as flash
# attention kernels order their grids: the programs in flight are
# neighbouring blocks of one head, which read the same K/V (stripe, span)
# rows at nearly the same time, so re-reads can hit L2 instead of HBM.
BLOCK_AXIS = 2


def _launch_axis(axis: int) -> int:
  """Launch position of logical grid axis `axis` under `block_first`."""
  if axis == BLOCK_AXIS:
    return 0
  return axis + 1 if axis < BLOCK_AXIS else axis


def block_first(grid, *specs):
  """`(launch_grid, *specs)` with logical axis 2 of `grid` launched first.

  `grid`: `(batch, head, blocks, ...)`; `specs`: BlockSpecs (or lists of
  them, or None) whose index maps take the logical ids; they are rewrapped
  to take the launch ids. Bodies read logical ids with `block_first_id`.
  """
  from jax.experimental import pallas as pl

  n = len(grid)
  launch = [None] * n
  for a, size in enumerate(grid):
    launch[_launch_axis(a)] = size

  def wrap(spec):
    fn = spec.index_map
    def index_map(*ids):
      return fn(*(ids[_launch_axis(a)] for a in range(n)))
    return dataclasses.replace(spec, index_map=index_map)

  is_spec = lambda x: isinstance(x, pl.BlockSpec)  # noqa: E731
  return (tuple(launch),) + tuple(jax.tree.map(wrap, s, is_leaf=is_spec) for s in specs)


def block_first_id(axis: int):
  """`pl.program_id` of logical grid axis `axis` inside a kernel launched
  through `block_first`."""
  from jax.experimental import pallas as pl
  return pl.program_id(_launch_axis(axis))


def block_first_call(kernel, *, grid, in_specs, out_specs, **kwargs):
  """`pallas_call` launched `block_first` (GPU kernels): `grid`, `in_specs`
  and `out_specs` in logical order, the body reading `block_first_id`."""
  grid, in_specs, out_specs = block_first(grid, in_specs, out_specs)
  return pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, **kwargs)
