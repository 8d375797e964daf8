"""Shared checks for Pallas kernels: lowering for real hardware on a CPU
machine, and forward/VJP comparison against an oracle.

`export_text(fn, "tpu", *specs)` exports `fn` with `jax.export` for a TPU or
CUDA target under an abstract device of that platform (so the Triton
lowering knows the GPU it compiles for) and returns the StableHLO text;
`assert_kernel_in(text, platform)` then proves the module holds the Pallas
custom call of that platform, so a kernel that silently fell back to XLA
fails.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

TRITON_CALL = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON_CALL}
_ABSTRACT_DEVICE = {
    "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
    "cuda": AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu"),
}


def export_text(fn, platform: str, *specs) -> str:
  """StableHLO text of `jax.jit(fn)` exported for `platform` ("tpu"/"cuda")."""
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                      abstract_device=_ABSTRACT_DEVICE[platform])
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*specs)
  return exported.mlir_module()


def custom_calls(text: str) -> list[str]:
  """Targets of every `stablehlo.custom_call` in a module's text."""
  return re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)


def assert_kernel_in(text: str, platform: str, *, at_least: int = 1):
  """The exported module holds >= `at_least` Pallas kernels of `platform`,
  and no kernel of the other platform."""
  calls = custom_calls(text)
  mine = calls.count(CUSTOM_CALL[platform])
  other = {"tpu": "cuda", "cuda": "tpu"}[platform]
  assert mine >= at_least, (
      f"expected >= {at_least} {CUSTOM_CALL[platform]} calls for {platform}, "
      f"found custom calls {calls}")
  assert CUSTOM_CALL[other] not in calls, f"{platform} module holds {other} kernels"


def spec(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def vjp_check(fn, ref_fn, args: tuple, key, *, argnums: tuple[int, ...],
              atol: float, rtol: float, grad_atol=None, grad_rtol=None,
              zero_rows=None):
  """Forward values and VJP (random cotangent) of `fn` against `ref_fn`.

  Both take `*args` and return one array. Gradients are compared for the
  positional arguments in `argnums`. `zero_rows`, a bool array broadcastable
  to the output, marks rows whose output both sides must set to zero (e.g.
  queries with no visible key); they are asserted zero, not just close.
  Returns `(out, grads)` of `fn`.
  """
  grad_atol = atol if grad_atol is None else grad_atol
  grad_rtol = rtol if grad_rtol is None else grad_rtol

  def split(f):
    def g(*diff):
      full = list(args)
      for i, a in zip(argnums, diff):
        full[i] = a
      return f(*full)
    return g

  diff = tuple(args[i] for i in argnums)
  out, pull = jax.vjp(split(fn), *diff)
  ref, ref_pull = jax.vjp(split(ref_fn), *diff)
  f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
  chex.assert_trees_all_close(f32(out), f32(ref), atol=atol, rtol=rtol)
  if zero_rows is not None:
    np.testing.assert_array_equal(np.where(zero_rows, np.asarray(out, np.float32), 0), 0)
  ct = jax.random.normal(key, out.shape, jnp.float32).astype(out.dtype)
  grads, ref_grads = pull(ct), ref_pull(ct)
  for i, (g, r) in enumerate(zip(grads, ref_grads)):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"non-finite grad of arg {argnums[i]}"
    chex.assert_trees_all_close(f32(g), f32(r), atol=grad_atol, rtol=grad_rtol,
                                custom_message=f"grad of arg {argnums[i]}")
  return out, grads
