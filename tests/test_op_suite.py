"""Every public op x every implementation (`reference`, `xla`, `pallas` in
interpret mode on CPU) x the shared scenarios of `tests/op_cases.py`:
forward values and VJPs (q, k, v; q_search, k_search for superlinear)
against the dense masked float32 oracles of `tests/attn_oracles.py`, with
superlinear anchors against the numpy loop oracle. Scenarios cover GQA and
MHA, float32 and bfloat16, prefill, a traced `q_offset` (chunks, decode
sizes q_len 1 and 16 that route to the pallas decode kernels, offsets before
the cache start) and NaN in cache slots no query may see (outputs and
gradients finite, exactly zero gradient to those slots).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import op_cases as oc


def _vjp(fn, args, cot):
  out, pull, aux = jax.vjp(fn, *args, has_aux=True)
  return out, aux, pull(cot)


@pytest.mark.parametrize("impl", oc.IMPLEMENTATIONS)
@pytest.mark.parametrize("op,scenario", oc.CASES, ids=[f"{o}-{s}" for o, s in oc.CASES])
def test_op_matches_oracle(op, scenario, impl):
  s = oc.SCENARIOS[scenario]
  clean, dirty = oc.scenario_inputs(s)
  names = oc.grad_names(op)
  f = oc.call(op, s, impl)
  off = None if s.q_offset is None else jnp.int32(s.q_offset)
  cot = jax.random.normal(jax.random.PRNGKey(oc.SEED + 1), clean["q"].shape, jnp.float32)

  run = jax.jit(lambda args, off, x: _vjp(
      lambda *a: (lambda o, aux: (o.astype(jnp.float32), aux))(*f(list(a), off, x)),
      args, cot))
  out, anchors, grads = run([dirty[n] for n in names], off, dirty)
  ofn, want_anchors = oc.oracle(op, s, clean)
  want, want_grads = jax.jit(lambda args: (lambda o, pull: (o, pull(cot)))(
      *jax.vjp(ofn, *args)))([clean[n].astype(jnp.float32) for n in names])

  chex.assert_shape(out, clean["q"].shape)
  chex.assert_tree_all_finite((out, grads))
  if anchors is not None:
    np.testing.assert_array_equal(np.asarray(anchors), want_anchors)
  rows = s.offset() + np.arange(s.q_len)
  outside = (rows < 0) | (rows >= s.kv_len)
  np.testing.assert_array_equal(np.asarray(out)[:, outside], 0.0)
  if s.nan_tail:
    tail = np.arange(s.kv_len) > s.offset() + s.q_len - 1
    for name, g in zip(names, grads):
      if name in ("k", "v", "k_search"):
        np.testing.assert_array_equal(np.asarray(g, np.float32)[:, tail], 0.0, err_msg=name)
  tol = oc.TOL[s.dtype]
  for name, got, ref in zip(["out", *names], [out, *grads], [want, *want_grads]):
    got = np.asarray(got, np.float32)
    if s.dtype == jnp.float32:
      atol, rtol = ((tol["atol"], tol["rtol"]) if name == "out"
                    else (tol["grad_atol"], tol["grad_rtol"]))
      chex.assert_trees_all_close(got, ref, atol=atol, rtol=rtol, custom_message=name)
    else:
      bound = tol["rel_l2"] if name == "out" else tol["grad_rel_l2"]
      assert oc.rel_err(got, ref) <= bound, (name, oc.rel_err(got, ref))
