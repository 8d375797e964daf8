"""Run by tests/test_sharded_ops.py in a subprocess with 8 forced CPU devices.

For every op and implementation named on the command line, compares values
and gradients (q, k, v, q_search, k_search) of sharded calls with the same
call on unsharded inputs:
  * batch/head sharding: jit on an Explicit and an Auto mesh (`jax.set_mesh`),
    and inside `jax.shard_map` (default check_vma); plus MQA (one kv head)
    with heads sharded. The compiled forward+backward HLO of the
    Explicit-mesh call must hold no all-gather, all-to-all or reduce-scatter.
  * `seq_axis=` (context parallelism): sequence sharded 4 ways on Explicit
    and Auto meshes and inside a user's shard_map.
Prints one JSON line per case: {"case": ..., "ok": bool, "err": ...}.
"""

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import attn
from tests import op_cases as oc

CFG = oc.SMALL_CFG
L = 32
COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter")


def ops(impl, seq_axis=None):
  kw = dict(implementation=impl, seq_axis=seq_axis)
  layout = attn.BlockLayout.from_fn(lambda qi, ki: (ki <= qi) & ((qi - ki < 6) | (ki % 7 == 0)),
                                    L, L, block_q=16, block_k=16)
  return {
      "dense": (3, lambda a: attn.dense_attention(*a, **kw)),
      "sliding": (3, lambda a: attn.sliding_window_attention(*a, window=6, **kw)),
      "ppa": (3, lambda a: attn.ppa_attention(*a, p=0.5, window=3, **kw)),
      "block_sparse": (3, lambda a: attn.block_sparse_attention(*a, layout, **kw)),
      "superlinear": (5, lambda a: tuple(attn.superlinear_attention_with_anchors(
          *a, config=CFG, **kw))[:2]),
      "superlinear_k_as_search": (3, lambda a: attn.superlinear_attention(
          a[0], a[1], a[2], a[0], None, config=CFG, **kw)),
  }


def value_and_grads(f, args, cot):
  def loss(*a):
    out = f(list(a))
    o = out[0] if isinstance(out, tuple) else out
    return jnp.sum(o.astype(jnp.float32) * cot), out
  (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                       has_aux=True)(*args)
  return out, grads


def close(got, want, name):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want), name
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    if g.dtype.kind in "iu":
      np.testing.assert_array_equal(g, w, err_msg=name)
    else:
      np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-4, err_msg=name)


def put(mesh, arrays, spec):
  return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def report(case, fn):
  try:
    fn()
    print(json.dumps({"case": case, "ok": True}), flush=True)
  except Exception as e:  # noqa: BLE001 - reported to the test
    print(json.dumps({"case": case, "ok": False,
                      "err": "".join(traceback.format_exception(e))[-3000:]}), flush=True)


def main(impls, groups):
  assert jax.device_count() == 8
  x = oc.inputs(batch=4, q_len=L, hq=4, hk=2, d=16, ds=8)
  x1 = oc.inputs(batch=4, q_len=L, hq=4, hk=1, d=16, ds=8)   # MQA
  names = ["q", "k", "v", "q_search", "k_search"]
  cot = jax.random.normal(jax.random.PRNGKey(7), x["q"].shape, jnp.float32)
  bh = P("data", None, "model", None)
  for impl in impls:
    for op, (n, f) in ops(impl).items():
      args = [x[k] for k in names[:n]]
      want = jax.jit(lambda *a, f=f: value_and_grads(f, a, cot))(*args)
      if "batch_heads" in groups:
        for at in (AxisType.Explicit, AxisType.Auto):
          def jit_case(at=at, f=f, args=args, want=want):
            mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(at, at))
            with jax.set_mesh(mesh):
              run = jax.jit(lambda *a: value_and_grads(f, a, cot))
              sharded = put(mesh, args, bh)
              close(run(*sharded), want, "values/grads")
              if at == AxisType.Explicit:
                hlo = run.lower(*sharded).compile().as_text()
                found = [c for c in COLLECTIVES if c in hlo]
                assert not found, f"collectives in the compiled HLO: {found}"
          report(f"{impl}/{op}/jit-{at.name}", jit_case)

        def shmap_case(f=f, args=args, want=want):
          mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
          sm = jax.shard_map(lambda *a: value_and_grads(f, a, cot_local(a)), mesh=mesh,
                             in_specs=bh, out_specs=bh)
          close(jax.jit(sm)(*put(mesh, args, bh)), want, "shard_map")
        report(f"{impl}/{op}/shard_map", shmap_case)

        def mqa_case(f=f, n=n):
          a1 = [x1[k] for k in names[:n]]
          want1 = jax.jit(lambda *a: value_and_grads(f, a, cot))(*a1)
          mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
          with jax.set_mesh(mesh):
            sh = [jax.device_put(a, NamedSharding(mesh, bh if a.shape[2] == 4 else
                                                  P("data", None, None, None))) for a in a1]
            close(jax.jit(lambda *a: value_and_grads(f, a, cot))(*sh), want1, "mqa")
        report(f"{impl}/{op}/mqa-heads", mqa_case)
      if "seq" in groups:
        _, fs = ops(impl, "seq")[op]
        sq = P("data", "seq", None, None)
        for at in (AxisType.Explicit, AxisType.Auto):
          def seq_case(at=at, fs=fs, args=args, want=want):
            mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(at, at))
            with jax.set_mesh(mesh):
              got = jax.jit(lambda *a: value_and_grads(fs, a, cot))(*put(mesh, args, sq))
            close(got, want, "seq")
          report(f"{impl}/{op}/seq-{at.name}", seq_case)

        def seq_shmap(fs=fs, args=args, want=want):
          mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
          sm = jax.shard_map(lambda *a: value_and_grads(fs, a, cot_local(a, sq)), mesh=mesh,
                             in_specs=sq, out_specs=sq)
          close(jax.jit(sm)(*put(mesh, args, sq)), want, "seq shard_map")
        report(f"{impl}/{op}/seq-shard_map", seq_shmap)


def cot_local(a, spec=P("data", None, "model", None)):
  """The block of the global cotangent this shard holds (same `cot` as main)."""
  cot = jax.random.normal(jax.random.PRNGKey(7), (4, L, 4, 16), jnp.float32)
  idx = []
  for dim, axis in enumerate(spec):
    if axis is None:
      idx.append(0)
    else:
      idx.append(jax.lax.axis_index(axis) * a[0].shape[dim])
  return jax.lax.dynamic_slice(cot, idx, a[0].shape)


if __name__ == "__main__":
  main(sys.argv[1].split(","), sys.argv[2].split(","))
