"""The gated linear scan behind the accumulated search key, context parallel.

`h_t = a_t * h_{t-1} + (1 - a_t) * x_t` over the sequence. With `seq_axis`
the sequence is sharded over a mesh axis: each shard scans its own block,
the shards exchange one `(A, h)` summary each (an all-gather of
`[batch, heads, head_dim]`, not of the sequence), and each shard applies
the carry of the shards before it. Same plan as the attention ops
(`attn.sharding`): under `jax.set_mesh` with sharded inputs, or inside a
user's shard_map whose manual axes include `seq_axis`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import sharding

__all__ = ["gated_linear_scan"]


def _combine(left, right):
  """Composition of the affine maps `h -> a h + b`: left first, then right."""
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def _shard_carry(a_last, h_last, seq_axis):
  """The composed map `(A, h)` of the shards before this one along `seq_axis`.

  a_last: `[batch, heads, 1]`, h_last: `[batch, heads, dim]`: this shard's
  whole-block map. Returns the same shapes (identity `(1, 0)` on shard 0).
  """
  a_all = jax.lax.all_gather(a_last, seq_axis)            # [n, batch, heads, 1]
  h_all = jax.lax.all_gather(h_last, seq_axis)
  me = jax.lax.axis_index(seq_axis)
  a_acc, h_acc = jnp.ones_like(a_last), jnp.zeros_like(h_last)
  a_before, h_before = a_acc, h_acc
  for i in range(a_all.shape[0]):                         # n is static and small
    a_before = jnp.where(i == me, a_acc, a_before)
    h_before = jnp.where(i == me, h_acc, h_before)
    a_acc, h_acc = _combine((a_acc, h_acc), (a_all[i], h_all[i]))
  return a_before, h_before


def _local_scan(a, b, *, seq_axis):
  """a: `[batch, seq, heads, 1]`, b: `[batch, seq, heads, dim]` (local
  blocks) -> the prefix maps `(A, h)` from the global sequence start."""
  a_cum, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
  if seq_axis is None:
    return a_cum, h
  a_before, h_before = _shard_carry(a_cum[:, -1], h[:, -1], seq_axis)
  return a_cum * a_before[:, None], h + a_cum * h_before[:, None]


def gated_linear_scan(gates, values, initial=None, *, seq_axis=None):
  """Causal gated, decaying average: `h_t = a_t * h_{t-1} + (1 - a_t) * x_t`.

  Computed with `jax.lax.associative_scan` over the sequence axis on the
  affine maps `h -> a h + b` (composition `(a1, b1) then (a2, b2)` =
  `(a1 a2, a2 b1 + b2)`), in float32.

  Args:
    gates: `a`, `[batch, seq, heads]`, values in [0, 1].
    values: `x`, `[batch, seq, heads, dim]`.
    initial: `h_{-1}`, `[batch, heads, dim]`, or None for zeros.
    seq_axis: a mesh axis gates and values are sharded over along `seq`
      (see the module docstring), or None.

  Returns:
    `h`: `[batch, seq, heads, dim]` float32 (`h[:, -1]` is the state to carry).
  """
  a = gates.astype(jnp.float32)[..., None]                        # [b, s, h, 1]
  b = (1.0 - a) * values.astype(jnp.float32)                      # [b, s, h, d]
  plan = sharding.plan(b, b, seq_axis)
  roles = (sharding.Q, sharding.KV)
  a_cum, h = sharding.run(lambda a_, b_: _local_scan(a_, b_, seq_axis=seq_axis),
                          (a, b), roles, plan, n_out=2)
  if initial is not None:                     # h_t += (a_0 ... a_t) h_{-1}
    h = h + a_cum * initial.astype(jnp.float32)[:, None]
  return h
