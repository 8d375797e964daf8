"""Gradients of the superlinear decode (`attn.pallas.decode_grad`, the
hand-written backward) against `jax.vjp` of the `reference` op.

Interpret mode on CPU. The decode is jitted with a traced `q_offset`; the
cotangent covers both the output and the gates (the anchors are integers).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.pallas import decode as pd
from tests import pallas_harness as ph

GRAD_CASES = [
    # (id, b, lq, lk, hq, hk, d, config kwargs, offsets)
    ("gqa_released_k3", 2, 3, 96, 4, 2, 8,
     dict(sw_index=1, num_spans=3, search_power=0.55, span_power=0.55,
          backward_factor=3.0, forward_factor=1.0), (4, 40, 93)),
    ("mha_default_k2", 1, 2, 80, 2, 2, 16, dict(sw_index=2, num_spans=2), (6, 78)),
    ("gqa_no_window_k4", 1, 2, 64, 2, 1, 8, dict(sw_index=0, num_spans=4), (3, 62)),
]


def _inputs(key, *, b, lq, lk, hq, hk, d):
  ks = jax.random.split(key, 5)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32)  # noqa: E731
  return (n(ks[0], (b, lq, hq, d)), n(ks[1], (b, lk, hk, d)), n(ks[2], (b, lk, hk, d)),
          n(ks[3], (b, lq, hq, d)), n(ks[4], (b, lk, hk, d)))


def _out_and_gates(res):
  """`[B, Lq, Hq, D + K]`: the output and the gates side by side."""
  return jnp.concatenate([res[0].astype(jnp.float32), res[2]], axis=-1)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_superlinear_decode_grad_matches_reference(case):
  _, b, lq, lk, hq, hk, d, cfg_kw, offsets = case
  config = attn.SuperlinearConfig(**cfg_kw)
  args = _inputs(jax.random.key(lk + d), b=b, lq=lq, lk=lk, hq=hq, hk=hk, d=d)
  scale = d ** -0.5
  run = jax.jit(lambda *a: _out_and_gates(pd.superlinear_attention(
      *a, config=config, scale=scale)))
  saw_empty = False
  for off in offsets:
    anchors = pd.superlinear_attention(*args, off, config=config, scale=scale)[1]
    saw_empty |= bool(np.any(np.asarray(anchors) < 0))
    ref = lambda *a, off=off: _out_and_gates(  # noqa: E731
        attn.superlinear_attention_with_anchors(*a, config=config, scale=scale,
                                                q_offset=off, implementation="reference"))
    ph.vjp_check(lambda *a: run(*a, jnp.int32(off)), ref, args, jax.random.key(off),
                 argnums=(0, 1, 2, 3, 4), atol=1e-5, rtol=1e-4)
  assert saw_empty, "no offset left a slot empty; pick a smaller one"


def test_superlinear_decode_grad_ignores_nan_garbage():
  """NaN cache rows past the last query reach no gradient; the others equal
  the gradients of the cleaned cache."""
  lq, lk, off = 2, 90, 60
  last = off + lq - 1
  config = attn.SuperlinearConfig(sw_index=1, num_spans=3)
  q, k, v, qs, ks = _inputs(jax.random.key(5), b=1, lq=lq, lk=lk, hq=4, hk=2, d=8)
  rows = jnp.arange(lk)[None, :, None, None]
  poison = lambda x: jnp.where(rows > last, jnp.nan, x)  # noqa: E731
  clean = lambda x: jnp.where(rows > last, 0.0, x)  # noqa: E731
  ct = jax.random.normal(jax.random.key(9), q.shape[:3] + (q.shape[3] + 3,))

  def grads(prep):
    f = lambda *a: _out_and_gates(pd.superlinear_attention(  # noqa: E731
        a[0], prep(a[1]), prep(a[2]), a[3], prep(a[4]), off, config=config, scale=0.3))
    out, pull = jax.vjp(f, q, k, v, qs, ks)
    return out, pull(ct)

  out_p, g_p = grads(poison)
  out_c, g_c = grads(clean)
  chex.assert_tree_all_finite((out_p, g_p))
  chex.assert_trees_all_close((out_p, g_p), (out_c, g_c), atol=1e-6, rtol=1e-6)
  for g in (g_p[1], g_p[2], g_p[4]):
    np.testing.assert_array_equal(np.asarray(g)[:, last + 1:], 0)
