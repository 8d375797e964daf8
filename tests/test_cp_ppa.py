"""`attn.cp_ppa`: the PPA of one query chunk, visited key chunk by key chunk
(the xla path of sequence-sharded PPA), equals dense attention under the PPA
mask built by the loop oracle (`tests/attn_oracles.py`), values and
gradients. One device: `fetch` slices the whole sequence, as the zigzag
order does; the sharded calls themselves are in tests/sharded_ops_check.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import cp_ppa
from tests import attn_oracles as oracles
from tests import op_cases as oc

L, CHUNKS = 128, 4


def _chunked(p, window, rows):
  """`f(q_chunk, k, v, chunk_index) -> out` with the chunk index traced."""
  c = L // CHUNKS

  def f(q_c, k, v, ci):
    def fetch(j, k_, v_):
      start = jnp.maximum(ci - j, 0) * c
      return tuple(jax.lax.dynamic_slice_in_dim(x, start, c, axis=1) for x in (k_, v_))
    return cp_ppa.ppa_chunk(q_c, (k, v), fetch, CHUNKS, ci, p=p, window=window,
                            scale=q_c.shape[-1] ** -0.5, rows=rows)
  return f


@pytest.mark.parametrize("p, window, rows", [(0.5, 5, None), (0.8, 3, 24)])
def test_ppa_chunk_matches_the_masked_oracle(p, window, rows):
  """rows=24: query chunks that do not divide the 32-row chunk (padded rows)."""
  assert cp_ppa.applies(L, p=p, window=window)
  x = oc.inputs(batch=1, q_len=L, hq=4, hk=2, d=16)
  q, k, v = x["q"], x["k"], x["v"]
  c = L // CHUNKS
  mask = oracles.keep_mask(oracles.ppa_keep(p, window, L - 1), L, L)
  cot = jax.random.normal(jax.random.PRNGKey(3), (1, c, 4, 16), jnp.float32)
  f = _chunked(p, window, rows)

  def loss(q_c, k_, v_, ci):
    out = f(q_c, k_, v_, ci)
    return jnp.sum(out * cot), out
  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  for ci in range(CHUNKS):
    rows_ci = slice(ci * c, (ci + 1) * c)
    want_fn = functools.partial(oracles.masked_attention, mask=mask[rows_ci])
    (_, got), grads = run(q[:, rows_ci], k, v, jnp.int32(ci))
    np.testing.assert_allclose(got, want_fn(q[:, rows_ci], k, v), atol=2e-5, rtol=2e-5)
    if ci not in (1, CHUNKS - 1):      # gradients: a partial and the full diagonal
      continue
    want_grads = jax.grad(lambda *a: jnp.sum(want_fn(*a) * cot), argnums=(0, 1, 2))(
        q[:, rows_ci], k, v)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_applies_only_to_the_band_and_stripe_path():
  assert not cp_ppa.applies(L, p=0.0, window=8)      # window only
  assert not cp_ppa.applies(L, p=1.0, window=8)      # every offset: dense
  assert not cp_ppa.applies(8, p=0.5, window=64)     # sequence within the window
