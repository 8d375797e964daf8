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
        if "no_user_shard_map" not in groups:
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
        if "no_user_shard_map" not in groups:
          report(f"{impl}/{op}/seq-shard_map", seq_shmap)
  if "extra" in groups:
    extra_checks()


def extra_checks():
  """Needle across shards and bad input (xla path)."""
  mesh = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  sq = P(None, "seq", None, None)

  def needle():
    # One key in shard 0 (position 2) whose search key matches the last
    # query's routing query far better than any other; its value is large.
    b, n, h, d = 1, 64, 1, 8
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
    k = rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
    v = rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
    qs = rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
    ks = rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
    qs[0, -1, 0] = ks[0, 2, 0] = 10.0
    q[0, -1, 0] = k[0, 2, 0] = 3.0
    v[0, 2, 0] = 5.0
    cfg = attn.SuperlinearConfig(sw_index=2, num_spans=2, backward_factor=2.0,
                                 forward_factor=1.0)
    args = [jnp.asarray(a) for a in (q, k, v, qs, ks)]
    want = attn.superlinear_attention_with_anchors(*args, config=cfg, implementation="xla")
    with jax.set_mesh(mesh):
      got = jax.jit(lambda *a: tuple(attn.superlinear_attention_with_anchors(
          *a, config=cfg, implementation="xla", seq_axis="seq")))(*put(mesh, args, sq))
    anchors = np.asarray(got[1])[0, -1, 0]
    span = [a for a in anchors if a >= 0 and abs(int(a) - 2) <= 4]
    assert span, f"the last shard's last query picked no anchor near the needle: {anchors}"
    assert float(np.asarray(got[0])[0, -1, 0].mean()) > 2.0, "needle value not read"
    close(got, tuple(want)[:3], "needle")

  def bad_input():
    x = oc.inputs(batch=1, q_len=L, hq=2, hk=2, d=8, ds=8)
    with jax.set_mesh(mesh):
      qs = put(mesh, [x["q"], x["k"], x["v"]], sq)
      for kw, word in (({"seq_axis": "sequence"}, "'sequence'"),):
        try:
          attn.dense_attention(*qs, implementation="xla", **kw)
          raise AssertionError("no error for an axis not in the mesh")
        except ValueError as e:
          assert word in str(e) and "not an axis of the mesh" in str(e), str(e)
      un = put(mesh, [x["q"], x["k"], x["v"]], P())
      try:
        attn.dense_attention(*un, implementation="xla", seq_axis="seq")
        raise AssertionError("no error for unsharded inputs")
      except ValueError as e:
        assert "seq_axis='seq'" in str(e) and "sharded" in str(e), str(e)
    auto = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(auto):
      y = oc.inputs(batch=1, q_len=L + 2, hq=2, hk=2, d=8, ds=8)
      odd = [y["q"], y["k"], y["v"]]
      try:
        jax.jit(lambda *a: attn.dense_attention(*a, implementation="xla",
                                                seq_axis="seq"))(*odd)
        raise AssertionError("no error for a sequence not divisible by the axis")
      except ValueError as e:
        assert "not divisible" in str(e) and "seq_axis='seq'" in str(e), str(e)

  report("xla/superlinear/seq-needle", needle)
  report("xla/bad-input", bad_input)


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
