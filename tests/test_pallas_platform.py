"""The kernel calling convention: variants chosen at lowering time, and the
export harness proves which kernel a module holds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AxisType, PartitionSpec as P

from pallas_kernels import platform
from tests import pallas_harness as ph


def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def _tpu(x, *, interpret):
  return pl.pallas_call(
      _double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // 8,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=interpret)(x)


def _gpu(x, *, interpret):
  return pl.pallas_call(
      lambda x_ref, o_ref: _double(x_ref, o_ref),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // 16,),
      in_specs=[pl.BlockSpec((16, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((16, 128), lambda i: (i, 0)), interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))(x)


def _op(x, variant=None):
  return platform.dispatch((x,), tpu=_tpu, gpu=_gpu, variant=variant)


@pytest.mark.parametrize("variant", [None, "tpu_interpret", "gpu_interpret", "tpu_checked"])
def test_cpu_variants_run(variant):
  x = jnp.arange(32 * 128, dtype=jnp.float32).reshape(32, 128)
  np.testing.assert_array_equal(jax.jit(functools.partial(_op, variant=variant))(x), 2 * x)


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_export_picks_platform_kernel(target):
  text = ph.export_text(_op, target, jax.ShapeDtypeStruct((32, 128), jnp.float32))
  ph.assert_kernel_in(text, target)


def test_export_check_rejects_xla_fallback():
  text = ph.export_text(lambda x: 2 * x, "tpu", jax.ShapeDtypeStruct((32, 128), jnp.float32))
  with pytest.raises(AssertionError):
    ph.assert_kernel_in(text, "tpu")


def test_bad_variant_is_named():
  with pytest.raises(ValueError, match="variant"):
    _op(jnp.zeros((32, 128)), variant="cuda")


def test_verified_on():
  rec = (platform.HardwareCheck("gpu", "NVIDIA H100", "2026-01-01", "pytest -m gpu"),)
  assert platform.verified_on(rec, "gpu")
  assert not platform.verified_on(rec, "tpu")
  assert not platform.verified_on((), "gpu")


# A kernel reading a scalar-prefetch table: o = x + off[0].
def _add_table(off_ref, x_ref, o_ref):
  o_ref[...] = x_ref[...] + off_ref[0].astype(x_ref.dtype)


def _tpu_table(off, x, *, interpret):
  from jax.experimental.pallas import tpu as pltpu
  spec = pl.BlockSpec((8, 128), lambda i, off: (i, 0))
  mat = jax.typeof(x).manual_axis_type
  return pl.pallas_call(
      _add_table, grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(x.shape[0] // 8,), in_specs=[spec], out_specs=spec),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype, manual_axis_type=mat),
      interpret=interpret)(off, x)


def _table_op(variant, mesh=None):
  """`x + off[0]` per shard, inside a check_vma shard_map over axis "x"
  (off: int32[1] per shard, varying over "x"; x: [8, 128] per shard)."""
  def body(off, x):
    gpu = lambda off, x, interpret: x + off[0].astype(x.dtype)  # noqa: E731 - never run
    return platform.dispatch((off, x), tpu=_tpu_table, gpu=gpu, variant=variant)
  return jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))


def _cpu_mesh():
  return jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))


def test_varying_table_on_cpu_mesh_runs_the_tpu_interpreter():
  x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
  off = jnp.array([3], jnp.int32)
  got = jax.jit(_table_op(None, _cpu_mesh()))(off, x)
  np.testing.assert_array_equal(got, x + 3)


def test_varying_table_fails_in_the_hlo_interpreter():
  """The JAX bug `dispatch` routes around: if this starts passing, the
  TPU-interpreter pick in `dispatch` can go."""
  x, off = jnp.zeros((8, 128)), jnp.array([3], jnp.int32)
  with pytest.raises(ValueError, match="varying manual axes"):
    jax.jit(_table_op("tpu_interpret", _cpu_mesh()))(off, x)


def test_varying_table_exports_the_tpu_kernel():
  """On a TPU mesh the same shard_map lowers to the Mosaic kernel (the pick
  reads the mesh's platform, not the machine's)."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(_table_op(None, mesh)), platforms=["tpu"])(
        jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((8, 128), jnp.float32))
  ph.assert_kernel_in(exported.mlir_module(), "tpu")
