"""Device mesh and logical-axis sharding rules.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data
parallelism whose parameters and optimizer state are also sharded) and
`tensor` (model parallelism inside a layer). Parameters carry logical axis
names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the rules that map
each logical name to mesh axes are data: `train.config.ShardingConfig`, the
`sharding` section of the training config (`--set sharding.kv_heads=...`). A
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

from train.config import MESH_AXES, ShardingConfig

BATCH_AXES = ("data", "fsdp")
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


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axes (GSPMD propagation)."""
  if devices is None:
    devices = jax.devices()
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _axes_size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _fit_error(param, dim, name, size, axes, mesh, why) -> ValueError:
  axis = "+".join(axes)
  return ValueError(
      f"sharding: parameter {param} dimension {dim} (logical axis {name!r}, size {size}) "
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
                             param=jax.tree_util.keystr(path))
      return var.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows of the global batch -> a global sharded jax.Array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
