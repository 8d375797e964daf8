"""Run by tests/test_sharded_ops.py in ONE subprocess with 8 forced CPU devices.

For every op (dense, sliding window, PPA, block sparse, superlinear with and
without k_search, PPA and superlinear decode calls with a traced q_offset)
and every implementation named on the command line (reference, xla, pallas
in interpret mode), compares out and the gradients (q, k, v, q_search,
k_search) of sharded calls with the same op on unsharded inputs:

  * batch/heads (mesh data=4 x model=2): jit on an Explicit and on an Auto
    mesh under `jax.set_mesh`, and inside `jax.shard_map` with the default
    `check_vma=True`. The compiled forward+backward HLO of the jit calls
    holds no all-gather, all-to-all or reduce-scatter.
  * seq (mesh data=2 x seq=4, `seq_axis="seq"`): Explicit, Auto and inside a
    user's shard_map; `seq_order="zigzag"` (inputs permuted, outputs and
    gradients un-permuted before comparing) on Explicit and in shard_map;
    decode calls against a sequence-sharded cache (q replicated).

Every sharded call of one (op, implementation) is compared with one
unsharded call; each jitted function is compiled once (`lower().compile()`,
whose executable both runs and gives the HLO). Prints one JSON line per
case: {"case", "ok", "err", "s"} (s: seconds, for the record).
"""

import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import attn
from attn.context_parallel import zigzag_order
from tests import op_cases as oc

CFG = oc.SMALL_CFG
B, L, HQ, HK, D, DS = 4, 32, 4, 2, 16, 8
DECODE_Q, DECODE_OFF = 2, 19          # decode: 2 queries at positions 19, 20
COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter")
BH = P("data", None, "model", None)
SEQ = P("data", "seq", None, None)
SEQ_CACHE_Q = P("data", None, None, None)   # decode: q replicated over seq
NAMES = ("q", "k", "v", "q_search", "k_search")


def ops(impl, **kw):
  """name -> (number of arrays, decode?, f(arrays, q_offset) -> out | tuple)."""
  kw = dict(implementation=impl, **kw)
  layout = attn.BlockLayout.from_fn(lambda qi, ki: (ki <= qi) & ((qi - ki < 6) | (ki % 7 == 0)),
                                    L, L, block_q=16, block_k=16)
  sl = lambda a, off: tuple(attn.superlinear_attention_with_anchors(  # noqa: E731
      *a, config=CFG, q_offset=off, **kw))[:2]
  return {
      "dense": (3, False, lambda a, off: attn.dense_attention(*a, **kw)),
      "sliding": (3, False, lambda a, off: attn.sliding_window_attention(*a, window=6, **kw)),
      "ppa": (3, False, lambda a, off: attn.ppa_attention(*a, p=0.5, window=3, **kw)),
      "block_sparse": (3, False, lambda a, off: attn.block_sparse_attention(*a, layout, **kw)),
      "superlinear": (5, False, sl),
      "superlinear_k_as_search": (3, False, lambda a, off: attn.superlinear_attention(
          a[0], a[1], a[2], a[0], None, config=CFG, **kw)),
      "ppa_decode": (3, True, lambda a, off: attn.ppa_attention(
          *a, p=0.5, window=3, q_offset=off, **kw)),
      "superlinear_decode": (5, True, sl),
  }


def inputs(n, decode):
  x = oc.inputs(batch=B, q_len=L, hq=HQ, hk=HK, d=D, ds=DS)
  arrays = [x[k] for k in NAMES[:n]]
  if decode:      # the queries at DECODE_OFF.. of a cache of L positions
    arrays = [a[:, DECODE_OFF:DECODE_OFF + DECODE_Q] if i in (0, 3) else a
              for i, a in enumerate(arrays)]
  cot = jax.random.normal(jax.random.PRNGKey(7), arrays[0].shape, jnp.float32)
  return arrays, cot


def value_and_grads(f, n_arr):
  """`(out, grads)` of `sum(out[0] * cot)`; args `(*arrays, q_offset, cot)`."""
  def run(*args):
    arrays, off, cot = args[:n_arr], args[n_arr], args[n_arr + 1]

    def loss(*a):
      out = f(list(a), off)
      o = out[0] if isinstance(out, tuple) else out
      return jnp.sum(o.astype(jnp.float32) * cot), out
    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(n_arr)),
                                         has_aux=True)(*arrays)
    return out, grads
  return run


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


def compile_and_run(fn, args, check_hlo):
  compiled = jax.jit(fn).lower(*args).compile()
  if check_hlo:
    hlo = compiled.as_text()
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"collectives in the compiled HLO: {found}"
  return compiled(*args)


def report(case, fn):
  t0 = time.perf_counter()
  try:
    fn()
    row = {"case": case, "ok": True}
  except Exception as e:  # noqa: BLE001 - reported to the test
    row = {"case": case, "ok": False, "err": "".join(traceback.format_exception(e))[-3000:]}
  row["s"] = round(time.perf_counter() - t0, 2)
  print(json.dumps(row), flush=True)


def mesh_of(shape, names, axis_type):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def array_specs(n, spec, q_spec=None):
  """Specs of `(*arrays, q_offset, cot)`: q-like arrays (q, q_search, cot)
  get `q_spec`, the others `spec`."""
  q_spec = spec if q_spec is None else q_spec
  return tuple(q_spec if i in (0, 3) else spec for i in range(n)) + (P(), q_spec)


def batch_head_cases(impl, op, n, decode, f, args, off, cot, want):
  g = value_and_grads(f, n)
  for at in (AxisType.Explicit, AxisType.Auto):
    def jit_case(at=at):
      mesh = mesh_of((4, 2), ("data", "model"), at)
      with jax.set_mesh(mesh):
        got = compile_and_run(g, put(mesh, args, BH) + [off] + put(mesh, [cot], BH), True)
      close(got, want, "values/grads")
    report(f"{impl}/{op}/jit-{at.name}", jit_case)

  def shmap_case():
    mesh = mesh_of((4, 2), ("data", "model"), AxisType.Explicit)
    specs = array_specs(n, BH)
    sm = jax.shard_map(g, mesh=mesh, in_specs=specs, out_specs=BH)
    close(jax.jit(sm)(*put(mesh, args, BH), off, *put(mesh, [cot], BH)), want, "shard_map")
  report(f"{impl}/{op}/shard_map", shmap_case)


def seq_cases(impl, op, n, decode, args, off, cot, want):
  mesh_shape, names = (2, 4), ("data", "seq")
  q_spec = SEQ_CACHE_Q if decode else SEQ
  specs = array_specs(n, SEQ, q_spec)

  def sharded(mesh, arrays, c):
    return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in
            zip(list(arrays) + [off, c], specs)]

  _, _, fs = ops(impl, seq_axis="seq")[op]
  g = value_and_grads(fs, n)
  for at in (AxisType.Explicit, AxisType.Auto):
    if decode and at == AxisType.Auto:
      continue      # Auto types carry no spec: a replicated q is not visible
    def jit_case(at=at):
      mesh = mesh_of(mesh_shape, names, at)
      with jax.set_mesh(mesh):
        got = compile_and_run(g, sharded(mesh, args, cot), False)
      close(got, want, "seq")
    report(f"{impl}/{op}/{'decode-cache' if decode else 'seq'}-{at.name}", jit_case)

  def shmap_case():
    mesh = mesh_of(mesh_shape, names, AxisType.Explicit)
    sm = jax.shard_map(g, mesh=mesh, in_specs=specs, out_specs=(q_spec, specs[:n]))
    close(jax.jit(sm)(*sharded(mesh, args, cot)), want, "seq shard_map")
  report(f"{impl}/{op}/{'decode-cache' if decode else 'seq'}-shard_map", shmap_case)
  if decode:
    return

  perm = zigzag_order(L, 4)
  inv = np.argsort(perm)
  _, _, fz = ops(impl, seq_axis="seq", seq_order="zigzag")[op]
  gz = value_and_grads(fz, n)
  zargs, zcot = [a[:, perm] for a in args], cot[:, perm]

  def natural(got):
    return jax.tree.map(lambda x: np.asarray(x)[:, inv], got)

  def zig_jit():
    mesh = mesh_of(mesh_shape, names, AxisType.Explicit)
    with jax.set_mesh(mesh):
      got = compile_and_run(gz, sharded(mesh, zargs, zcot), False)
    close(natural(got), want, "zigzag")
  report(f"{impl}/{op}/zigzag-Explicit", zig_jit)

  def zig_shmap():
    mesh = mesh_of(mesh_shape, names, AxisType.Explicit)
    sm = jax.shard_map(gz, mesh=mesh, in_specs=specs, out_specs=(SEQ, specs[:n]))
    close(natural(jax.jit(sm)(*sharded(mesh, zargs, zcot))), want, "zigzag shard_map")
  report(f"{impl}/{op}/zigzag-shard_map", zig_shmap)


def main(impls, groups):
  assert jax.device_count() == 8
  for impl in impls:
    for op, (n, decode, f) in ops(impl).items():
      args, cot = inputs(n, decode)
      off = jnp.int32(DECODE_OFF) if decode else None
      want = jax.jit(value_and_grads(f, n))(*args, off, cot)
      if "batch_heads" in groups:
        batch_head_cases(impl, op, n, decode, f, args, off, cot, want)
      if "seq" in groups:
        seq_cases(impl, op, n, decode, args, off, cot, want)
  if "extra" in groups:
    extra_checks()


def extra_checks():
  """MQA with heads sharded, needle across shards and bad input (xla path)."""
  mesh = mesh_of((1, 4), ("data", "seq"), AxisType.Explicit)
  sq = P(None, "seq", None, None)

  def mqa():
    x = oc.inputs(batch=B, q_len=L, hq=HQ, hk=1, d=D, ds=DS)
    a = [x["q"], x["k"], x["v"]]
    f = lambda a: attn.ppa_attention(*a, p=0.5, window=3, implementation="xla")  # noqa: E731
    g = lambda *a: jax.grad(lambda *a: jnp.sum(f(a) ** 2), argnums=(0, 1, 2))(*a)  # noqa: E731
    want = jax.jit(g)(*a)
    m = mesh_of((4, 2), ("data", "model"), AxisType.Explicit)
    with jax.set_mesh(m):
      sh = put(m, a[:1], BH) + put(m, a[1:], P("data", None, None, None))
      close(compile_and_run(g, sh, True), want, "mqa")

  def needle():
    # One key in shard 0 (position 2) whose search key matches the last
    # query's routing query far better than any other; its value is large.
    b, n, h, d = 1, 64, 1, 8
    rng = np.random.default_rng(0)
    q, k, v, qs, ks = (rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.1
                       for _ in range(5))
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

  def expect(fn, *words):
    try:
      fn()
    except ValueError as e:
      assert all(w in str(e) for w in words), str(e)
      return
    raise AssertionError(f"no ValueError naming {words}")

  def bad_input():
    x = oc.inputs(batch=1, q_len=L, hq=2, hk=2, d=8, ds=8)
    qkv = [x["q"], x["k"], x["v"]]
    dense = lambda *a, **kw: attn.dense_attention(*a, implementation="xla", **kw)  # noqa: E731
    with jax.set_mesh(mesh):
      sh = put(mesh, qkv, sq)
      expect(lambda: dense(*sh, seq_axis="sequence"), "seq_axis='sequence'",
             "not an axis of the mesh")
      expect(lambda: dense(*put(mesh, qkv, P()), seq_axis="seq"), "seq_axis='seq'",
             "sharded")
      expect(lambda: dense(*sh, seq_axis="seq", seq_order="spiral"), "seq_order")
      odd = put(mesh, [oc.inputs(batch=1, q_len=L + 4, hq=2, hk=2, d=8)[k]
                       for k in ("q", "k", "v")], sq)
      expect(lambda: dense(*odd, seq_axis="seq", seq_order="zigzag"), "not divisible",
             "2 * axis size")
    auto = mesh_of((1, 4), ("data", "seq"), AxisType.Auto)
    with jax.set_mesh(auto):
      y = oc.inputs(batch=1, q_len=L + 2, hq=2, hk=2, d=8, ds=8)
      odd = [y["q"], y["k"], y["v"]]
      expect(lambda: jax.jit(lambda *a: dense(*a, seq_axis="seq"))(*odd), "not divisible",
             "seq_axis='seq'")
    # Inside a user's shard_map (check_vma): k not mapped over the axis.
    sm = jax.shard_map(lambda q, k, v: dense(q, k, v, seq_axis="seq"), mesh=mesh,
                       in_specs=(sq, P(), P()), out_specs=sq)
    expect(lambda: jax.jit(sm)(*put(mesh, qkv[:1], sq), *put(mesh, qkv[1:], P())),
           "seq_axis='seq'", "k is not sharded")

  report("xla/mqa-heads", mqa)
  report("xla/superlinear/seq-needle", needle)
  report("xla/bad-input", bad_input)


if __name__ == "__main__":
  main(sys.argv[1].split(","), sys.argv[2].split(","))
