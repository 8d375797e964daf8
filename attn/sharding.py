"""Running an op's implementation per shard of a mesh.

Attention is independent per batch row and per head, so an op whose inputs
are sharded over batch and/or heads runs its implementation on each shard's
block through `jax.shard_map` over exactly those mesh axes: the
implementation never sees a sharded array and the compiled program holds no
collective. GQA: kv heads are sharded with their q-head groups; if the kv
heads do not divide over the head axes (e.g. one kv head), each shard keeps
the whole kv head axis and slices the kv heads its q heads read.

With `seq_axis` (context parallelism, `attn.context_parallel`) the sequence
dimension of every array is sharded over that axis too and the per-shard
function exchanges keys over it.

Where the sharding comes from (the "plan"):
  * inside a user's `jax.shard_map` (the context mesh has manual axes): the
    arrays already are local blocks; the op runs on them (with `seq_axis`,
    the collectives run over the user's manual axis);
  * concrete arrays with a `NamedSharding` (an eager call): their specs;
  * traced arrays on an Explicit-axis mesh: the specs of their types;
  * traced arrays on an Auto-axis mesh (`jax.set_mesh`) carry no spec while
    tracing: the op becomes a `custom_partitioning` call
    (`attn.auto_partition`) that reads the sharding XLA gives q at
    partitioning time and runs the implementation per batch/head shard (with
    `seq_axis`, the per-shard function of `attn.context_parallel` with the
    sequence over that axis of the context mesh).

Inside a user's shard_map with `check_vma=True` the Pallas implementations
run through `vma_typed` (their kernels' outputs and custom VJPs need the
inputs and cotangents to vary over the same manual axes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

Q, KV, SCALAR = "q", "kv", "scalar"   # roles of an op's positional arguments


@dataclasses.dataclass(frozen=True)
class Plan:
  """How an op call is split over a mesh.

  mesh: the mesh (`Mesh` or `AbstractMesh`), or None inside a user's
    shard_map (`manual`) where the arrays already are local.
  batch, heads, seq: mesh axis names over which the batch, head and sequence
    dimensions are sharded (seq: `()` or `(seq_axis,)`).
  kv_heads_sharded: False when q heads are sharded but kv heads are not
    (each shard then slices the kv heads of its q-head groups).
  manual: True inside a user's shard_map.
  q_seq: False when only k, v (a cache) are sharded along the sequence and q
    is replicated over `seq` (decode; `attn.context_parallel`).
  seq_order: `"contiguous"` or `"zigzag"` (`attn.context_parallel`).
  gather_seq: decode against a sequence-sharded cache outside shard_map:
    k, v are resharded to whole sequences (an all-gather XLA inserts, whose
    transpose hands each shard its slice of dK, dV) and `seq` is empty.
  explicit: the mesh axes are Explicit (inputs are resharded to the plan's
    specs with `jax.sharding.reshard` before the shard_map).
  auto: traced arrays on an Auto-axis mesh: the batch/head plan is made at
    XLA partitioning time (`attn.auto_partition`).
  """
  mesh: object
  batch: tuple = ()
  heads: tuple = ()
  seq: tuple = ()
  kv_heads_sharded: bool = True
  manual: bool = False
  explicit: bool = False
  q_seq: bool = True
  seq_order: str = "contiguous"
  gather_seq: bool = False
  auto: bool = False

  def spec(self, role):
    if role == SCALAR:
      return P()
    heads = self.heads if (role == Q or self.kv_heads_sharded) else ()
    seq = self.seq if (role == KV or self.q_seq) else ()
    return P(self.batch or None, seq or None, heads or None, None)

  @property
  def axes(self) -> tuple:
    return self.batch + self.heads + self.seq


def _axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _named_sharding(x):
  """`(mesh, spec)` of `x` when it has a visible NamedSharding, else None."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sh = x.sharding
  else:
    sh = getattr(jax.typeof(x), "sharding", None)
    if isinstance(sh, NamedSharding) and not all(
        t == AxisType.Explicit for t in sh.mesh.axis_types):
      return None                 # Auto axes: the spec is not known while tracing
  if not isinstance(sh, NamedSharding) or sh.mesh.empty:
    return None
  spec = tuple(sh.spec) + (None,) * (x.ndim - len(sh.spec))
  return sh.mesh, spec


def _mesh_size(mesh, axes) -> int:
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def context_mesh():
  """The mesh of `jax.set_mesh` / the enclosing shard_map, or None."""
  m = jax.sharding.get_abstract_mesh()
  return None if m.empty else m


def inside_shard_map() -> bool:
  m = context_mesh()
  return m is not None and any(t == AxisType.Manual for t in m.axis_types)


def plan(q, k, seq_axis=None, seq_order="contiguous") -> Plan | None:
  """The plan of a call on `q: [B, Lq, Hq, D]`, `k: [B, Lk, Hk, D]`; None:
  run the implementation as is (nothing sharded, or Auto-axis tracers)."""
  if seq_order not in ("contiguous", "zigzag"):
    raise ValueError(f"seq_order must be 'contiguous' or 'zigzag', got {seq_order!r}.")
  if seq_axis is None and seq_order != "contiguous":
    raise ValueError(f"seq_order={seq_order!r} needs seq_axis (the mesh axis the "
                     "sequence is sharded over).")
  if inside_shard_map():
    m = context_mesh()
    q_seq = True
    if seq_axis is not None:
      _check_axis(seq_axis, m)
      if m.axis_types[m.axis_names.index(seq_axis)] != AxisType.Manual:
        raise ValueError(f"seq_axis={seq_axis!r} is not a manual axis of the enclosing "
                         "shard_map; map the sequence dimension over it (in_specs "
                         f"P(None, {seq_axis!r}, ...)) or call the op outside shard_map.")
      if varying_axes(q) or varying_axes(k):        # check_vma=True: the types say what varies
        if seq_axis not in varying_axes(k):
          raise ValueError(f"seq_axis={seq_axis!r} but k is not sharded over it (its "
                           f"type varies over {sorted(varying_axes(k))}): map k, v along the "
                           f"sequence with P(None, {seq_axis!r}, ...) or drop seq_axis.")
        q_seq = seq_axis in varying_axes(q)
    return Plan(None, seq=(seq_axis,) if seq_axis else (), manual=True, q_seq=q_seq,
                seq_order=seq_order)
  found, found_k = _named_sharding(q), _named_sharding(k)
  if found is None:
    m = context_mesh()
    if seq_axis is None:
      auto = m is not None and AxisType.Auto in m.axis_types and m.size > 1
      return Plan(m, auto=True) if auto else None
    if m is None:
      raise ValueError(f"seq_axis={seq_axis!r} needs a mesh: call the op under "
                       "jax.set_mesh(mesh) (or inside shard_map) with inputs sharded "
                       "along the sequence over that axis.")
    _check_axis(seq_axis, m)
    return Plan(m, seq=(seq_axis,), seq_order=seq_order, auto=AxisType.Auto in m.axis_types)
  mesh, spec = found
  explicit = all(t == AxisType.Explicit for t in mesh.axis_types)
  batch, heads, seq_spec = _axes(spec[0]), _axes(spec[2]), _axes(spec[1])
  seq, q_seq = (), True
  if seq_axis is not None:
    _check_axis(seq_axis, mesh)
    k_seq = _axes(found_k[1][1]) if found_k is not None else ()
    if k_seq != (seq_axis,):
      raise ValueError(f"seq_axis={seq_axis!r} but k's sequence dimension is sharded as "
                       f"{k_seq or None!r}: shard q, k, v along the sequence with "
                       f"P(None, {seq_axis!r}, None, None) or drop seq_axis.")
    if seq_spec not in ((seq_axis,), ()):
      raise ValueError(f"seq_axis={seq_axis!r} but q's sequence dimension is sharded as "
                       f"{spec[1]!r}: shard it over {seq_axis!r} (or replicate q to "
                       "decode against a sharded cache).")
    seq, q_seq = (seq_axis,), seq_spec == (seq_axis,)
    if not q_seq and seq_order != "contiguous":
      raise ValueError(f"seq_order={seq_order!r} with q not sharded over {seq_axis!r} "
                       "(decode against a sharded cache): keep the cache in the "
                       "contiguous order.")
  heads, kv_sharded = _head_split(mesh, heads, q.shape[2], k.shape[2])
  if not (batch or heads or seq):
    return None
  if seq and not q_seq:           # decode: whole cache per shard, no seq plan
    return Plan(mesh, batch, heads, (), kv_sharded, explicit=explicit, gather_seq=True)
  return Plan(mesh, batch, heads, seq, kv_sharded, explicit=explicit, q_seq=q_seq,
              seq_order=seq_order)


def _head_split(mesh, heads, hq, hk):
  """`(heads, kv_heads_sharded)` for q heads sharded over the mesh axes
  `heads`: kv heads are sharded with their q-head groups where they divide;
  where a q-head shard straddles kv groups the heads stay whole (`()`)."""
  n_heads = _mesh_size(mesh, heads)
  if hk % n_heads == 0:
    return heads, True
  if (hq // n_heads) and (hq // hk) % (hq // n_heads):
    return (), True
  return heads, False


def _check_axis(seq_axis, mesh):
  if not isinstance(seq_axis, str) or seq_axis not in mesh.axis_names:
    raise ValueError(f"seq_axis={seq_axis!r} is not an axis of the mesh (axes "
                     f"{tuple(mesh.axis_names)}); pass one of them or None.")


def _local_kv_heads(plan: Plan, args, roles, hq_global, hk_global):
  """Inside the shard_map: slices the kv heads of this shard's q heads when
  the kv heads are replicated over the head axes."""
  if plan.kv_heads_sharded or not plan.heads:
    return args
  n = 1
  for a in plan.heads:
    n *= jax.lax.axis_size(a)
  hq_loc, group = hq_global // n, hq_global // hk_global
  size = max(hq_loc // group, 1)
  start = jax.lax.axis_index(plan.heads) * hq_loc // group
  return [jax.lax.dynamic_slice_in_dim(a, start, size, axis=2) if r == KV else a
          for a, r in zip(args, roles)]


def varying_axes(x) -> frozenset:
  """The manual mesh axes `x` varies over (empty outside a check_vma shard_map)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None) if x is not None else None
  return frozenset(mat.varying) if mat is not None else frozenset()


def vma_typed(fn):
  """`fn(*args)` for a kernel implementation inside a `jax.shard_map` with
  `check_vma=True`: every floating argument is cast to vary over the union of
  the axes any argument varies over (`jax.lax.pcast`; its transpose sums the
  gradient of an invariant input over those axes), and the cotangent reaching
  the kernels' custom VJP rules is cast the same way (a cotangent may arrive
  invariant, e.g. from `jnp.sum`). Outside such a shard_map this is `fn`.

  Integer arguments (`q_offset`, index tables) keep their own type: they have
  no cotangent, and an invariant one stays usable as a scalar-prefetch table
  in JAX's Pallas HLO interpreter (`interpret=True`), which fails on a table
  that varies ("dynamic_slice requires varying manual axes to match"; a JAX
  bug, docs/training.md). Kernels whose tables do vary run, on a CPU mesh,
  in the TPU interpreter instead (`pallas_kernels.platform.dispatch`).
  """

  def call(*args, **statics):
    axes = frozenset().union(*(varying_axes(a) for a in jax.tree.leaves(args)))
    if not axes:
      return fn(*args, **statics)
    order = tuple(sorted(axes))

    def vary(x):
      if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
      missing = tuple(a for a in order if a not in varying_axes(x))
      return jax.lax.pcast(x, missing, to="varying") if missing else x

    args = [None if a is None else jax.tree.map(vary, a) for a in args]
    live = [i for i, a in enumerate(args) if a is not None]
    diff = [jnp.issubdtype(args[i].dtype, jnp.floating) for i in live]

    def full(xs):
      out = list(args)
      for i, x in zip(live, xs):
        out[i] = x
      return out

    @jax.custom_vjp
    def kernel(*xs):
      return fn(*full(xs), **statics)

    def kernel_fwd(*xs):
      floats = [x for x, d in zip(xs, diff) if d]
      ints = [x for x, d in zip(xs, diff) if not d]

      def on_floats(*fs):
        it_f, it_i = iter(fs), iter(ints)
        return fn(*full([next(it_f) if d else next(it_i) for d in diff]), **statics)

      return jax.vjp(on_floats, *floats)

    def kernel_bwd(pull, ct):
      ct = jax.tree.map(lambda c: vary(c) if jnp.issubdtype(c.dtype, jnp.floating)
                        else c, ct)
      grads = iter(pull(ct))
      return tuple(next(grads) if d else None for d in diff)

    kernel.defvjp(kernel_fwd, kernel_bwd)
    return kernel(*[args[i] for i in live])

  return call


def run(fn, args, roles, plan_: Plan | None, n_out: int):
  """`fn(*args)` per shard of `plan_` (None: as is). `roles[i]` in
  (`Q`, `KV`, `SCALAR`); the `n_out` outputs are q-shaped in their first
  three dimensions."""
  if plan_ is None or plan_.manual:
    return fn(*args)
  hq, hk = args[roles.index(Q)].shape[2], args[roles.index(KV)].shape[2]
  specs = tuple(None if a is None else plan_.spec(r) for a, r in zip(args, roles))
  if plan_.explicit:
    args = [a if s is None else jax.sharding.reshard(a, s) for a, s in zip(args, specs)]
  elif plan_.gather_seq:
    args = [a if s is None else jax.lax.with_sharding_constraint(
        a, NamedSharding(plan_.mesh, s)) for a, s in zip(args, specs)]
  if not plan_.axes:
    return fn(*args)

  def local(*a):
    return fn(*_local_kv_heads(plan_, list(a), roles, hq, hk))

  out_spec = plan_.spec(Q)
  return jax.shard_map(local, mesh=plan_.mesh, in_specs=specs,
                       out_specs=out_spec if n_out == 1 else (out_spec,) * n_out,
                       # Manual over every mesh axis (replicated over the unused
                       # ones): a Pallas kernel in interpret mode cannot lower
                       # with axes left Explicit inside the shard_map.
                       axis_names=set(plan_.mesh.axis_names), check_vma=False)(*args)
