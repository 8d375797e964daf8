"""A scan over chunks whose backward recomputes each chunk.

`remat_scan(fn, consts, xs, ints)` is `lax.scan` of `fn(consts, x, i)` over
the leading axis of `xs` and `ints`, with its own VJP: the forward keeps
nothing but its inputs, and the backward walks the chunks again, runs each
chunk's forward once more under `jax.vjp` and sums the cotangents of
`consts` over the chunks in float32 carries. Against `jax.checkpoint` on
the step of a plain scan, the shared `consts` (span attention's k and v)
need no float32 copy for their cotangents to sum in float32: a scan sums a
constant's cotangent in the constant's own dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def remat_scan(fn, consts, xs, ints):
  """Stacked `fn(consts, x, i)` over the chunks (leading axis of `xs`, `ints`).

  Args:
    fn: `(consts, x, i) -> pytree of arrays`, pure; `x` one chunk of `xs`
      (differentiable), `i` one chunk of `ints` (integers, not
      differentiated).
    consts: pytree of float arrays shared by every chunk (differentiable;
      their cotangents are summed over the chunks in float32 and returned in
      their own dtypes).
    xs, ints: pytrees whose leaves have the chunk count as leading axis.

  Returns:
    `fn`'s outputs stacked along a new leading chunk axis.
  """
  return jax.lax.scan(lambda c, x: (c, fn(consts, *x)), None, (xs, ints))[1]


def _fwd(fn, consts, xs, ints):
  return remat_scan(fn, consts, xs, ints), (consts, xs, ints)


def _bwd(fn, res, cts):
  consts, xs, ints = res

  def step(acc, chunk):
    x, i, ct = chunk
    _, vjp = jax.vjp(lambda c, xx: fn(c, xx, i), consts, x)
    d_consts, d_x = vjp(ct)
    return jax.tree.map(lambda a, g: a + g.astype(F32), acc, d_consts), d_x

  zeros = jax.tree.map(lambda c: jnp.zeros(c.shape, F32), consts)
  acc, d_xs = jax.lax.scan(step, zeros, (xs, ints, cts))
  d_ints = jax.tree.map(lambda a: None, ints)
  return jax.tree.map(lambda a, c: a.astype(c.dtype), acc, consts), d_xs, d_ints


remat_scan.defvjp(_fwd, _bwd)
