"""Device mesh and logical-axis sharding rules.

The mesh has four axes: `data` (pure data parallelism), `fsdp` (data
parallelism whose parameters and optimizer state are also sharded), `seq`
(context parallelism: the activations' sequence dimension is sharded over
it, `activation_spec`) and `tensor` (model parallelism inside a layer).
`process_block` / `index_block` find the block of a global batch that a
process holds (its rows, and its part of the sequence). Parameters carry
logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the
rules that map each logical name to mesh axes are data:
`train.config.ShardingConfig`, the `sharding` section of the training config
(`--set sharding.kv_heads=...`). A
rule that does not divide a dimension, or names a mesh axis another dimension
of the same array already uses, raises a ValueError naming the parameter, the
mesh axis and the fix, unless the config allows that logical name to fall
back to replication (`sharding.allow_replication`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from train.config import ALL_MESH_AXES, BATCH_AXES, MESH_AXES, ShardingConfig

DEFAULT_RULES = ShardingConfig()


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a -1 entry by what is left of `num_devices`; checks the product."""
  shape = tuple(int(d) for d in shape)
  known = math.prod(d for d in shape if d != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape={shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if d == -1 else d for d in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape={shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def full_mesh_shape(shape: Sequence[int], axes: Sequence[str],
                    num_devices: int) -> tuple[int, ...]:
  """Sizes of `ALL_MESH_AXES` from the sizes `shape` of the named `axes`
  (-1 resolved; axes not named have size 1)."""
  if len(shape) != len(axes) or any(a not in ALL_MESH_AXES for a in axes):
    raise ValueError(f"mesh_shape={tuple(shape)} with mesh_axes={tuple(axes)}: need one "
                     f"size per axis, axes among {ALL_MESH_AXES}")
  sizes = dict(zip(axes, resolve_mesh_shape(shape, num_devices)))
  return tuple(sizes.get(a, 1) for a in ALL_MESH_AXES)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None,
              axes: Sequence[str] = MESH_AXES) -> jax.sharding.Mesh:
  """The ("data", "fsdp", "seq", "tensor") mesh with Auto axes (GSPMD
  propagation) whose `axes` have sizes `shape` (the others size 1)."""
  if devices is None:
    devices = jax.devices()
  full = full_mesh_shape(shape, axes, len(devices))
  return jax.make_mesh(full, ALL_MESH_AXES, axis_types=(AxisType.Auto,) * len(ALL_MESH_AXES),
                       devices=devices)


def _axes_size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _fit_error(param, dim, name, size, axes, mesh, why) -> ValueError:
  axis = "+".join(axes)
  return ValueError(
      f"sharding: {param} dimension {dim} (logical axis {name!r}, size {size}) "
      f"{why} mesh axis {axis!r} (size {_axes_size(mesh, axes)} in mesh "
      f"{dict(mesh.shape)}). Fix: choose a mesh_shape whose {axis!r} size divides "
      f"{size}, map {name!r} to another mesh axis (--set sharding.{name}=<axis> or "
      f"=none), or allow replication (--set sharding.allow_replication={name}).")


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh,
                    rules: ShardingConfig = DEFAULT_RULES, *, param: str = "array") -> P:
  """PartitionSpec of an array of `shape` whose dims have logical `names`.

  Names without a rule (and None) are replicated; mesh axes of size 1 are
  ignored. A rule whose axes do not divide the dimension, or that reuses a
  mesh axis of an earlier dimension, raises a ValueError naming `param`, the
  axis and the fix, unless `rules.replicates(name)`: then the dimension takes
  the longest prefix of its axes that divides it (None if none does).
  """
  if not names:
    return P()
  table = rules.rules()
  used: set[str] = set()
  spec = []
  for dim, (name, size) in enumerate(zip(names, shape)):
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    reused = tuple(a for a in axes if a in used)
    if reused and not rules.replicates(name):
      raise _fit_error(param, dim, name, size, reused, mesh, "reuses (another dimension "
                       "of this array is already sharded over)")
    axes = tuple(a for a in axes if a not in used)
    if axes and size % _axes_size(mesh, axes) and not rules.replicates(name):
      raise _fit_error(param, dim, name, size, axes, mesh, "is not divisible by")
    while axes and size % _axes_size(mesh, axes):
      axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  spec += [None] * (len(shape) - len(spec))
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _names_of(var) -> Any:
  meta = var.get_metadata()
  names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  if isinstance(names, P):
    names = tuple(names)
  return names


def state_shardings(state, mesh, rules: ShardingConfig = DEFAULT_RULES):
  """NamedShardings for an `nnx.State` (abstract or concrete) from the
  variables' logical-axis metadata; same tree structure as `state`. Raises
  ValueError (see `logical_to_spec`) for a rule that does not fit."""
  def one(path, var):
    if _is_variable(var):
      value = var.get_value() if hasattr(var, "get_value") else var[...]
      spec = logical_to_spec(_names_of(var), value.shape, mesh, rules,
                             param="parameter " + jax.tree_util.keystr(path))
      return var.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def seq_axis(mesh, rules: ShardingConfig = DEFAULT_RULES) -> str | None:
  """The mesh axis the activations' sequence is sharded over (the `sequence`
  rule), or None when there is none or it has size 1."""
  axis = rules.sequence
  return axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None


def activation_spec(mesh, seq_len: int, rules: ShardingConfig = DEFAULT_RULES) -> P:
  """PartitionSpec of the hidden states `[batch, seq_len, d_model]` (and of the
  token inputs / targets `[batch, seq_len]`, its first two entries): batch
  over ("data", "fsdp"), the sequence over `seq_axis(mesh, rules)`.

  Raises ValueError naming `seq_len`, the axis and the fix when the axis does
  not divide `seq_len` (never falls back to replication).
  """
  axis = seq_axis(mesh, rules)
  if axis is not None and seq_len % mesh.shape[axis]:
    raise ValueError(
        f"sharding: seq_len={seq_len} (the model's input length) is not divisible by "
        f"mesh axis {axis!r} (size {mesh.shape[axis]} in mesh {dict(mesh.shape)}), which "
        f"shards the sequence (sharding.sequence={axis!r}). Fix: choose a seq_len that "
        f"is a multiple of {mesh.shape[axis]}, a mesh_shape whose {axis!r} size divides "
        f"{seq_len}, or --set sharding.sequence=none (no sequence sharding).")
  return P(BATCH_AXES, axis, None)


def batch_sharding(mesh, ndim: int = 2, seq: str | None = None) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the second over `seq`
  (None: replicated), the rest replicated."""
  rest = [seq] + [None] * (ndim - 2) if ndim > 1 else []
  return NamedSharding(mesh, P(BATCH_AXES, *rest))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_block(sharding: NamedSharding, shape: Sequence[int],
                  process: int | None = None) -> tuple[slice, ...]:
  """The block of a global array of `shape` that `process` (default: this
  one) holds under `sharding`: one slice per dimension (`index_block` of its
  devices' indices)."""
  process = jax.process_index() if process is None else process
  index = [idx for dev, idx in sharding.devices_indices_map(tuple(shape)).items()
           if dev.process_index == process]
  if not index:
    raise ValueError(f"process {process} holds no device of the mesh")
  return index_block(index, shape)


def index_block(index: Sequence[tuple[slice, ...]], shape: Sequence[int]) -> tuple[slice, ...]:
  """The rectangle that the device blocks `index` (one tuple of slices per
  device, as `Sharding.devices_indices_map` gives) of an array of `shape`
  cover. Raises ValueError when they do not tile one rectangle (a mesh whose
  device order interleaves processes along a sharded dimension)."""
  blocks = {tuple(s.indices(n)[:2] for s, n in zip(idx, shape)) for idx in index}
  rect = tuple(slice(min(b[d][0] for b in blocks), max(b[d][1] for b in blocks))
               for d in range(len(shape)))
  volume = sum(math.prod(hi - lo for lo, hi in b) for b in blocks)
  if volume != math.prod(s.stop - s.start for s in rect):
    raise ValueError(f"a process's devices do not hold one contiguous block of the "
                     f"batch {tuple(shape)}: order the mesh devices so that each process's "
                     "devices are adjacent along data/fsdp and seq")
  return rect


def data_shard(sharding: NamedSharding, seq_len: int) -> dict:
  """`{"shard_index", "shard_count"}`: which rows of every global batch this
  process holds under `sharding` (a `batch_sharding`), as a shard of the
  row blocks of the batch axes. Processes that hold the same rows (their
  devices split the sequence, or a replicated axis spans them) get the same
  shard."""
  n = _axes_size(sharding.mesh, BATCH_AXES)
  rows = process_block(sharding, (n, seq_len))[0]
  size = rows.stop - rows.start
  return {"shard_index": rows.start // size, "shard_count": n // size}


def global_inputs(local_tokens: np.ndarray, sharding: NamedSharding,
                  shard_count: int) -> dict:
  """This process's windows `[rows, seq_len + 1]` (its `data_shard` of the
  batch) -> `{"inputs", "targets"}`: global int32 `[rows * shard_count,
  seq_len]` arrays laid out as `sharding`; each device receives only its own
  block (its rows, its part of the sequence)."""
  local_tokens = np.asarray(local_tokens)
  shape = (local_tokens.shape[0] * shard_count, local_tokens.shape[1] - 1)
  cols = process_block(sharding, shape)[1]
  parts = {"inputs": local_tokens[:, :-1], "targets": local_tokens[:, 1:]}
  return {k: jax.make_array_from_process_local_data(
      sharding, np.ascontiguousarray(x[:, cols]), shape) for k, x in parts.items()}


def global_batch(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows of the global batch -> a global sharded jax.Array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
