"""The calling convention shared by every kernel family.

A kernel family provides one function per platform variant, each taking the
same arrays and returning the same outputs:

  * `tpu(*args, interpret=...)`: Mosaic TPU (`pltpu.PrefetchScalarGridSpec`);
  * `gpu(*args, interpret=...)`: Pallas Triton.

`dispatch` picks between them when the caller's computation is *lowered*,
not when it is traced (`jax.lax.platform_dependent`): the same jitted
function compiles the TPU kernel on a TPU, the Triton kernel on an NVIDIA
GPU, and runs the CPU default (a variant in `interpret=True` mode) on CPU.
`jax.export(..., platforms=["tpu"])` on a CPU machine therefore holds the
Mosaic custom call, and `platforms=["cuda"]` the Triton one.

`variant` forces one variant for tests and debugging:

  * `None`: per platform as above (CPU: `cpu_default`), except inside a
    `jax.shard_map` over CPU devices when an integer argument varies over a
    manual axis (see "Tables that vary per shard" below): `"tpu_checked"`;
  * `"tpu"`, `"gpu"`: that variant compiled (fails on CPU);
  * `"tpu_interpret"`, `"gpu_interpret"`: that variant in `interpret=True`;
  * `"tpu_checked"`: the TPU variant under `pltpu.InterpretParams()`, which
    raises on out-of-bounds block reads that `interpret=True` clamps silently
    (CPU only).

`"tpu_checked"` cannot sit inside `platform_dependent`: its interpreter runs
ordered `io_callback`s, whose effect the whole `platform_dependent` then
carries, and lowering it for TPU alone fails ("Lowering rule for `cond`
returns incorrect set of output tokens", jax 0.12, `jax.export` with
`platforms=["tpu"]`); so `dispatch` picks it while tracing, never inside
`platform_dependent`.

Tables that vary per shard: inside a `jax.shard_map` with `check_vma=True`,
JAX's Pallas HLO interpreter (`interpret=True`) fails to lower a kernel whose
scalar-prefetch table varies over a manual axis ("dynamic_slice requires
varying manual axes to match"; a JAX bug, repro in docs/training.md); the
TPU interpreter (`InterpretParams`) runs it. With `variant=None`, when an
integer argument of `dispatch` varies over a manual axis and the shard_map's
mesh is on CPU devices (`jax.sharding.get_abstract_mesh().abstract_device`,
known while tracing: the body runs on those devices), `dispatch` runs
`"tpu_checked"` without `platform_dependent`. On a TPU or GPU mesh, or a
mesh without devices, it is `platform_dependent` as above. A CPU-mesh
trace lowered for another platform (`lower(lowering_platforms=...)`)
therefore does not get the compiled kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

VARIANTS = (None, "tpu", "gpu", "tpu_interpret", "gpu_interpret", "tpu_checked")

# The variant that runs on CPU when `variant=None`: the TPU kernel in
# `interpret=True` mode (it exercises the scalar-prefetch index maps, the
# part of a TPU kernel most likely to be wrong).
CPU_DEFAULT = "tpu_interpret"


def check_variant(variant):
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: must be one of {VARIANTS}.")
  return variant


def tpu_interpret_params():
  """`pltpu.InterpretParams()`: bounds-checked TPU interpreter."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams()


def varying_tables(args: tuple) -> bool:
  """Whether an integer leaf of `args` varies over a manual mesh axis (only
  inside a `jax.shard_map` with `check_vma=True`)."""
  def varies(x):
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return mat is not None and bool(mat.varying)
  return any(jnp.issubdtype(x.dtype, jnp.integer) and varies(x)
             for x in jax.tree.leaves(args))


def mesh_platform() -> str | None:
  """The platform of the current abstract mesh's devices (inside a
  `jax.shard_map`: its mesh's), or None where it has none."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return None if device is None else device.platform


def targets_tpu(variant=None) -> bool:
  """Whether a call traced now with `variant` will run the compiled TPU
  kernels: `variant="tpu"`, or `variant=None` while the mesh, default
  device or default backend is a TPU (the platform `jax.jit` lowers for).
  Decided at trace time; interpreters (no SMEM limit) give False."""
  check_variant(variant)
  if variant is not None:
    return variant == "tpu"
  dev = jax.config.jax_default_device
  dev_platform = getattr(dev, "platform", dev) if dev is not None else None
  return (mesh_platform() or dev_platform or jax.default_backend()) == "tpu"


def dispatch(args: tuple, *, tpu: Callable, gpu: Callable, variant=None,
             cpu_default: str = CPU_DEFAULT):
  """Runs `tpu(*args, interpret=...)` or `gpu(*args, interpret=...)`.

  Args:
    args: the positional arrays both variants take (a tuple of pytrees).
    tpu, gpu: the platform variants; keyword `interpret` is `False`, `True`
      or a `pltpu.InterpretParams`.
    variant: see the module docstring (None: per platform, or
      `"tpu_checked"` for tables that vary per shard on a CPU mesh).
    cpu_default: the variant that `variant=None` runs on CPU
      (`"tpu_interpret"` or `"gpu_interpret"`).
  """
  check_variant(variant)
  if variant == "tpu":
    return tpu(*args, interpret=False)
  if variant == "gpu":
    return gpu(*args, interpret=False)
  if variant == "tpu_interpret":
    return tpu(*args, interpret=True)
  if variant == "gpu_interpret":
    return gpu(*args, interpret=True)
  if variant == "tpu_checked" or (variant is None and varying_tables(args)
                                  and mesh_platform() == "cpu"):
    return tpu(*args, interpret=tpu_interpret_params())
  cpu_fn = {"tpu_interpret": functools.partial(tpu, interpret=True),
            "gpu_interpret": functools.partial(gpu, interpret=True)}[cpu_default]
  return jax.lax.platform_dependent(
      *args,
      tpu=functools.partial(tpu, interpret=False),
      cuda=functools.partial(gpu, interpret=False),
      default=cpu_fn)


@dataclasses.dataclass(frozen=True)
class HardwareCheck:
  """A record that a kernel family was compiled and tested on real hardware.

  `implementation=None` in `attn` selects a Pallas kernel only on a backend
  with such a record (`verified_on`); everywhere else it selects `xla`.
  """

  backend: str      # jax.default_backend() value: "gpu" or "tpu"
  device: str       # e.g. "NVIDIA H100 80GB HBM3"
  date: str         # ISO date of the run
  command: str      # what was run (tests compiled + benchmark)


def verified_on(records: tuple[HardwareCheck, ...], backend: str) -> bool:
  """Whether `records` hold a check for `backend` ("gpu", "tpu", "cpu")."""
  return any(r.backend == backend for r in records)
