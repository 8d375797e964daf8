"""Run by tests/test_layer_seq.py on 4 CPU devices: the accumulated-key scan
and `attn.Attention` with `seq_axis=` against their unsharded selves and a
plain loop. Prints one JSON line per case."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import attn
from attn.scan import gated_linear_scan


def loop_scan(a, x, h0):
  """The recurrence `h_t = a_t h_{t-1} + (1 - a_t) x_t`, one step at a time (numpy, float64)."""
  a, x = np.asarray(a, np.float64), np.asarray(x, np.float64)
  h, out = np.asarray(h0, np.float64), np.zeros(x.shape)
  for t in range(x.shape[1]):
    h = a[:, t, :, None] * h + (1 - a[:, t, :, None]) * x[:, t]
    out[:, t] = h
  return out


def report(case, err, tol):
  print(json.dumps({"case": case, "err": float(err), "ok": bool(err <= tol)}), flush=True)


def check_scan(mesh, name):
  ka, kx, kh = jax.random.split(jax.random.key(0), 3)
  a = jax.nn.sigmoid(jax.random.normal(ka, (2, 32, 3)))
  x = jax.random.normal(kx, (2, 32, 3, 4))
  h0 = jax.random.normal(kh, (2, 3, 4))
  want = loop_scan(a, x, h0)
  with jax.set_mesh(mesh):
    a_s = jax.device_put(a, NamedSharding(mesh, P(None, "seq", None)))
    x_s = jax.device_put(x, NamedSharding(mesh, P(None, "seq", None, None)))
    got = jax.jit(lambda a, x, h: gated_linear_scan(a, x, h, seq_axis="seq"))(a_s, x_s, h0)
    inside = jax.jit(jax.shard_map(
        lambda a, x: gated_linear_scan(a, x, seq_axis="seq"),
        in_specs=(P(None, "seq"), P(None, "seq")), out_specs=P(None, "seq")))(a_s, x_s)
  report(f"scan/{name}/jit", np.abs(np.asarray(got) - want).max(), 1e-5)
  report(f"scan/{name}/shard_map",
         np.abs(np.asarray(inside) - loop_scan(a, x, np.zeros((2, 3, 4)))).max(), 1e-5)


def check_layer(mesh, name, kind, options):
  layer = attn.Attention(32, 4, 2, kind=kind, rngs=nnx.Rngs(0), **options)
  x = jax.random.normal(jax.random.key(1), (2, 64, 32))

  def loss(l, x, seq_axis):
    return jnp.sum(jnp.sin(l(x, seq_axis=seq_axis)))

  def grad(seq_axis):
    return nnx.jit(nnx.value_and_grad(functools.partial(loss, seq_axis=seq_axis),
                                      argnums=(0, 1)))

  (v0, (gl0, gx0)) = grad(None)(layer, x)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "seq", None)))
    (v1, (gl1, gx1)) = grad("seq")(layer, xs)
  err = max(abs(float(v1) - float(v0)) / max(abs(float(v0)), 1.0),
            float(jnp.abs(gx1 - gx0).max()),
            *(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(nnx.state(gl1)),
                                                          jax.tree.leaves(nnx.state(gl0)))))
  report(f"layer/{kind}/{name}", err, 1e-4)


def main():
  for name, t in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(t,))
    check_scan(mesh, name)
  mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))
  check_layer(mesh, "explicit", "superlinear", {"search_key": "accumulated"})
  check_layer(mesh, "explicit", "sliding", {"window": 8})


if __name__ == "__main__":
  main()
