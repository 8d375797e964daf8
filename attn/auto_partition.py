"""An op on an Auto-axis mesh, run per batch/head shard by the XLA partitioner.

Under `jax.set_mesh(mesh)` with Auto axes a traced array carries no sharding
while the op traces, so `attn.sharding` cannot plan a shard_map. `auto_call`
instead runs the implementation as a `jax.experimental.custom_partitioning`
call:

  * its Shardy sharding rule lets the batch and head dimensions pass
    through (q heads = kv heads x group, a compound factor, so a head
    sharding propagates between q and k, v) and marks every other dimension
    as needing replication (with `seq_axis`: but the sequence);
  * at partitioning time `partition` reads the sharding XLA chose for q,
    makes the batch/head plan an Explicit mesh gets (`attn.sharding.Plan`:
    kv heads sharded with their q-head groups where they divide, else whole
    kv heads per shard, sliced locally) and returns the implementation on
    one shard's block (with `seq_axis`: the sequence sharded over it, the
    per-shard function of `attn.context_parallel`, whose collectives run
    over that axis).

The compiled program of a batch/head-sharded call holds no all-gather,
all-to-all or reduce-scatter (only, where kv heads are whole per shard, an
all-reduce of dK, dV over the head axes in the backward pass); with
`seq_axis`, only the sequence's own collectives.

custom_partitioning has no autodiff rule, so `auto_call` is a custom_vjp
whose forward and backward are each custom-partitioned. Cost: the backward
keeps only the inputs and recomputes the forward on the local block
(`jax.vjp` of the implementation): two forwards and one backward per
training step instead of one and one (with `seq_axis`, the forward's key
exchange runs twice too). Under `jax.vmap` (custom_partitioning has no
batching rule) the call runs unpartitioned, left to the XLA partitioner.
No forward-mode autodiff (`jax.jvp`) on this path.
"""

from __future__ import annotations

import functools

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor,
                                                  SdyShardingRule, custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec as P

from attn import sharding
from attn.sharding import KV, Q, SCALAR

OUT_RANK = 4      # every output: [batch, q_len, num_q_heads, features]


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _as_tuple(out) -> tuple:
  return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _mapping(role, rank: int, name: str, hq: int, hk: int) -> ArrayMapping:
  """Factors of one array: batch `b`, the sequence (`lq` for q-like arrays
  and outputs, `lk` for k-like ones) and the heads are shared; every other
  dimension is a factor of its own (`name_i`)."""
  if role == SCALAR:
    return ArrayMapping()
  if role == KV or hq == hk:
    head = "hk"
  else:
    head = "hq" if hk == 1 else CompoundFactor("hk", "g")
  dims = ["b", "lk" if role == KV else "lq", head] + [f"{name}_{i}" for i in range(3, rank)]
  return ArrayMapping(*dims)


def _rule(in_roles, in_ranks, out_roles, out_ranks, hq, hk, seq) -> SdyShardingRule:
  """Shardy rule for arrays of `in_roles` -> `out_roles` (Q-like outputs):
  every factor but batch, heads (and with `seq`, the sequence) needs
  replication."""
  ins = [_mapping(r, n, f"i{j}", hq, hk) for j, (r, n) in enumerate(zip(in_roles, in_ranks))]
  outs = [_mapping(r, n, f"o{j}", hq, hk) for j, (r, n) in enumerate(zip(out_roles, out_ranks))]
  shared = {"b", "hq", "hk", "g"} | ({"lq", "lk"} if seq else set())
  order = [f for m in ins + outs for d in m for f in (d if isinstance(d, tuple) else (d,))]
  # Shardy wants the special factors in the order of their first use.
  replicated = tuple(dict.fromkeys(f for f in order if f not in shared))
  sizes = {"g": hq // hk} if hk > 1 and hq != hk else {}
  return SdyShardingRule(tuple(ins), tuple(outs), need_replication_factors=replicated,
                         **sizes)


def _plan(mesh, q_sharding, hq: int, hk: int, seq: tuple) -> sharding.Plan:
  """The plan of q's batch/head sharding (replicated: an empty plan), with
  the sequence over `seq`."""
  spec = tuple(getattr(q_sharding, "spec", P())) + (None,) * 4
  batch, heads = (tuple(a for a in sharding._axes(spec[i]) if a not in seq) for i in (0, 2))
  heads, kv_sharded = sharding._head_split(mesh, heads, hq, hk)
  return sharding.Plan(mesh, batch, heads, seq, kv_heads_sharded=kv_sharded)


def _partitioned(local, in_roles, in_ranks, out_roles, out_ranks, iq, hq, hk, seq):
  """`custom_partitioning` of `local(plan, *xs) -> tuple` (plan None: on
  unsharded arrays): arrays of `in_roles` in, arrays of `out_roles` out,
  planned from argument `iq` (q)."""

  @jax.jit    # custom_partitioning takes no constants: they stay inside the jit
  def body(*xs):      # the unpartitioned call (one device, or under vmap)
    return local(None, *xs)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    plan = _plan(mesh, arg_shapes[iq].sharding, hq, hk, seq)
    specs = lambda roles: tuple(NamedSharding(mesh, plan.spec(r)) for r in roles)  # noqa: E731
    return mesh, functools.partial(local, plan), specs(out_roles), specs(in_roles)

  partitioned = custom_partitioning(body)
  partitioned.def_partition(partition=partition,
                            sharding_rule=_rule(in_roles, in_ranks, out_roles, out_ranks,
                                                hq, hk, seq))

  # custom_partitioning has no batching rule: under jax.vmap the call runs
  # unpartitioned (the XLA partitioner shards it as it can).
  @jax.custom_batching.custom_vmap
  def call(*xs):
    return partitioned(*xs)

  @call.def_vmap
  def _vmapped(axis_size, in_batched, *xs):
    del axis_size
    out = jax.vmap(body, in_axes=[0 if b else None for b in in_batched])(*xs)
    return out, tuple(True for _ in out)

  return call


def auto_call(fn, args, roles, n_out: int, seq: tuple = (), whole=None):
  """`fn(*args)` partitioned over batch/heads at XLA partitioning time.

  Args:
    fn: the implementation, `fn(*args) -> array | tuple of n_out arrays`,
      each `[batch, q_len, num_q_heads, features]`.
    args: arrays (or None) in the roles `roles` (`attn.sharding.Q`, `KV`,
      `SCALAR`); q: `[B, Lq, Hq, D]`, k: `[B, Lk, Hk, D]`.
    n_out: the number of outputs.
    seq: `(seq_axis,)`: the sequence dimensions are sharded over it and `fn`
      is the per-shard function of `attn.context_parallel.local_fn`; `()`.
    whole: the function on unsharded arrays (default `fn`; with `seq`, the
      implementation itself), run where nothing is partitioned.

  Returns:
    `fn(*args)`, differentiable in every floating argument.
  """
  live = [i for i, a in enumerate(args) if a is not None]
  xs = [args[i] for i in live]
  in_roles = tuple(roles[i] for i in live)
  in_ranks = tuple(jnp.ndim(x) for x in xs)
  hq, hk = args[roles.index(Q)].shape[2], args[roles.index(KV)].shape[2]
  iq = in_roles.index(Q)
  floats = [_is_float(x) for x in xs]
  out_roles = (Q,) * n_out

  def local(plan, *ys):
    full = [None] * len(args)
    for i, y in zip(live, ys):
      full[i] = y
    if plan is None:
      return _as_tuple((whole or fn)(*full))
    return _as_tuple(fn(*sharding._local_kv_heads(plan, full, roles, hq, hk)))

  def local_grads(plan, *ys_cts):
    """Gradients of the float inputs given the float outputs' cotangents."""
    ys, cts = list(ys_cts[:len(xs)]), iter(ys_cts[len(xs):])
    pos = [i for i, f in enumerate(floats) if f]

    def on_floats(*fs):
      zs = list(ys)
      for i, f in zip(pos, fs):
        zs[i] = f
      return local(plan, *zs)

    outs, pull = jax.vjp(on_floats, *[ys[i] for i in pos])
    grads = pull(tuple(next(cts) if _is_float(o) else np.zeros(o.shape, jax.dtypes.float0)
                       for o in outs))
    if plan is not None and plan.heads and not plan.kv_heads_sharded:
      # Whole kv heads per shard: each shard holds its q heads' share of dK, dV.
      grads = [jax.lax.psum(g, plan.heads) if in_roles[i] == KV else g
               for i, g in zip(pos, grads)]
    return tuple(grads)

  forward = _partitioned(local, in_roles, in_ranks, out_roles, (OUT_RANK,) * n_out,
                         iq, hq, hk, seq)

  @jax.custom_vjp
  def call(*zs):
    return forward(*zs)

  def call_fwd(*zs):
    return forward(*zs), zs

  def call_bwd(zs, cts):
    cts = [c for c in cts if c.dtype != jax.dtypes.float0]
    grad_roles = tuple(r for r, f in zip(in_roles, floats) if f)
    backward = _partitioned(local_grads, in_roles + out_roles[:len(cts)],
                            in_ranks + (OUT_RANK,) * len(cts), grad_roles,
                            tuple(n for n, f in zip(in_ranks, floats) if f), iq, hq, hk,
                            seq)
    grads = iter(backward(*zs, *cts))
    return tuple(next(grads) if f else None for f in floats)

  call.defvjp(call_fwd, call_bwd)
  out = call(*xs)
  return out[0] if n_out == 1 else out
