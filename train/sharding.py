"""Device mesh and logical-axis sharding rules.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data
parallelism whose parameters and optimizer state are also sharded) and
`tensor` (model parallelism inside a layer). Parameters carry logical axis
names (`nnx.with_partitioning(init, ("embed", "mlp"))`); `DEFAULT_RULES` maps
each logical name to mesh axes. A rule that does not divide the dimension, or
names a mesh axis another dimension of the same array already uses, falls back
to replication for that dimension, so any model fits any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


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


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec of an array of `shape` whose dims have logical `names`.

  Unknown names and rules that do not divide the dimension (or reuse a mesh
  axis) give `None` (replicated) for that dimension.
  """
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    # Drop size-1 axes (no effect) and axes already used by another dimension.
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    # Use the longest prefix of the axes that divides the dimension.
    while axes and dim % _axes_size(mesh, axes):
      axes = axes[:-1]
    if not axes:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
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


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for an `nnx.State` (abstract or concrete) from the
  variables' logical-axis metadata; same tree structure as `state`."""
  def one(var):
    if _is_variable(var):
      value = var.get_value() if hasattr(var, "get_value") else var[...]
      spec = logical_to_spec(_names_of(var), value.shape, mesh, rules)
      return var.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows of the global batch -> a global sharded jax.Array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
