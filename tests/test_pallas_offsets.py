"""Pallas prefill paths with a traced `q_offset` anywhere, against the
reference: rows whose position lies outside `[0, kv_len)` are zeros, valid
rows are exact, and NaN in cache slots past the last query reaches neither
outputs nor gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

B, LQ, LK, H, HK, D, DS = 1, 24, 40, 4, 2, 16, 8
CFG = attn.SuperlinearConfig(sw_index=1, num_spans=2)

OPS = {
    "dense": lambda x, o, impl: attn.dense_attention(
        x["q"], x["k"], x["v"], q_offset=o, implementation=impl),
    "sliding": lambda x, o, impl: attn.sliding_window_attention(
        x["q"], x["k"], x["v"], window=5, q_offset=o, implementation=impl),
    "ppa": lambda x, o, impl: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.5, window=4, q_offset=o, implementation=impl),
    "superlinear": lambda x, o, impl: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["qs"], x["ks"], config=CFG, q_offset=o,
        implementation=impl),
}


def _inputs(offset):
  ks = jax.random.split(jax.random.key(offset + 100), 5)
  x = dict(q=jax.random.normal(ks[0], (B, LQ, H, D)),
           k=jax.random.normal(ks[1], (B, LK, HK, D)),
           v=jax.random.normal(ks[2], (B, LK, HK, D)),
           qs=jax.random.normal(ks[3], (B, LQ, H, DS)),
           ks=jax.random.normal(ks[4], (B, LK, HK, DS)))
  last = offset + LQ - 1                      # last query position
  if last + 1 < LK:                           # cache slots no query may see
    for name in ("k", "v", "ks"):
      x[name] = x[name].at[:, last + 1:].set(jnp.nan)
  return x


@pytest.mark.parametrize("name,offset", [("dense", 20), ("sliding", -5), ("ppa", -5),
                                         ("ppa", 30), ("superlinear", -5),
                                         ("superlinear", 30)])
def test_traced_offset_anywhere_matches_reference(name, offset):
  x = _inputs(offset)
  diff = ("q", "k", "v", "qs", "ks") if name == "superlinear" else ("q", "k", "v")

  def run(impl, o, *vals):
    return OPS[name](dict(x, **dict(zip(diff, vals))), o, impl)

  args = tuple(x[n] for n in diff)
  o = jnp.int32(offset)
  out, pull = jax.vjp(jax.jit(functools.partial(run, "pallas")), o, *args)
  ref, ref_pull = jax.vjp(jax.jit(functools.partial(run, "reference")), o, *args)
  chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)
  pos = offset + np.arange(LQ)
  outside = (pos < 0) | (pos >= LK)
  np.testing.assert_array_equal(np.asarray(out)[:, outside], 0)
  ct = jax.random.normal(jax.random.key(7), out.shape)
  grads, ref_grads = pull(ct)[1:], ref_pull(ct)[1:]
  for n, g, r in zip(diff, grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all(), n
    chex.assert_trees_all_close(g, r, atol=1e-4, rtol=1e-4, custom_message=n)
