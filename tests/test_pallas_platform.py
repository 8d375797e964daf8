"""The kernel calling convention: variants chosen at lowering time, and the
export harness proves which kernel a module holds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

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
