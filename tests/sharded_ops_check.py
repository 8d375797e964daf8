"""Run by tests/test_sharded_ops.py in ONE subprocess with 8 forced CPU devices.

For every op (dense, sliding window, PPA, block sparse, superlinear with and
without k_search, PPA and superlinear decode calls with a traced q_offset)
and every implementation named on the command line (reference, xla, pallas
in interpret mode), compares out and the gradients (q, k, v, q_search,
k_search) of sharded calls with the same op on unsharded inputs:

  * batch/heads (axes data, model of one 2 x 2 x 2 mesh): jit on an Explicit
    and on an Auto mesh under `jax.set_mesh` (Auto: the op is partitioned at
    XLA partitioning time, `attn.auto_partition`); the compiled
    forward+backward HLO of both holds no all-gather, all-to-all or
    reduce-scatter. Inside `jax.shard_map` with the default `check_vma=True`.
  * seq (axes data, seq, model; `seq_axis="seq"`): Explicit, Auto (its HLO
    holds the Explicit HLO's reduce-scatters and at most twice its
    all-gathers: batch and heads stay sharded) and inside a user's shard_map; `seq_order="zigzag"` (inputs permuted, outputs and
    gradients un-permuted before comparing) on Explicit and in shard_map;
    decode calls against a sequence-sharded cache (q replicated). Sliding
    window on Explicit (contiguous and zigzag): a neighbour exchange, so its
    HLO holds no all-gather, all-to-all or reduce-scatter.
  * Pallas block sparse in the zigzag order at L = 64 (the 8-row chunks of
    L = 32 are below the kernels' 16-row blocks).
  * Pallas on CPU inside a user's shard_map (batch, heads and sequence
    mapped): every kernel reads a table that varies over a manual axis, so
    it runs in the TPU interpreter (`pltpu.InterpretParams`), which
    `pallas_kernels.platform.dispatch` picks there (JAX's HLO interpreter
    fails on such tables, docs/training.md).
  * MQA (one kv head) with q heads sharded, on Explicit and Auto meshes
    (collective-free but for the all-reduce of dK, dV over the head axis);
    `jax.vmap` of an op on an Auto mesh.

Every sharded call of one (op, implementation) is compared with one
unsharded call; each jitted function is compiled once (`lower().compile()`,
whose executable both runs and gives the HLO). Prints one JSON line per
case: {"case", "ok", "err", "s"} (s: seconds, for the record).
"""

import json
import re
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
B, L, HQ, HK, D, DS = 2, 32, 4, 2, 16, 8
DECODE_Q, DECODE_OFF = 2, 19          # decode: 2 queries at positions 19, 20
COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter")
AXES = ("data", "model", "seq")       # one 2 x 2 x 2 mesh for every case
BH = P("data", None, "model", None)
BSH = P("data", "seq", "model", None)
NAMES = ("q", "k", "v", "q_search", "k_search")


def block_layout(length):
  """Causal: a 6-key local band plus every 7th key; 16 x 16 blocks."""
  return attn.BlockLayout.from_fn(lambda qi, ki: (ki <= qi) & ((qi - ki < 6) | (ki % 7 == 0)),
                                  length, length, block_q=16, block_k=16)


def ops(impl, **kw):
  """name -> (number of arrays, decode?, f(arrays, q_offset) -> out | tuple)."""
  kw = dict(implementation=impl, **kw)
  layout = block_layout(L)
  sl = lambda a, off: tuple(attn.superlinear_attention_with_anchors(  # noqa: E731
      *a, config=CFG, q_offset=off, **kw))[:2]
  table = {
      "dense": (3, False, lambda a, off: attn.dense_attention(*a, **kw)),
      "sliding": (3, False, lambda a, off: attn.sliding_window_attention(*a, window=6, **kw)),
      "ppa": (3, False, lambda a, off: attn.ppa_attention(*a, p=0.5, window=3, **kw)),
      "block_sparse": (3, False, lambda a, off: attn.block_sparse_attention(*a, layout, **kw)),
      "superlinear": (5, False, sl),
      "ppa_decode": (3, True, lambda a, off: attn.ppa_attention(
          *a, p=0.5, window=3, q_offset=off, **kw)),
      "superlinear_decode": (5, True, sl),
  }
  if impl == "xla":     # k_search=None (search against k): one path, once
    table["superlinear_k_as_search"] = (3, False, lambda a, off: attn.superlinear_attention(
        a[0], a[1], a[2], a[0], None, config=CFG, **kw))
  return table


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


def put(mesh, arrays, specs):
  return [a if a is None else jax.device_put(a, NamedSharding(mesh, s))
          for a, s in zip(arrays, specs)]


def collective_counts(hlo: str) -> dict:
  """Number of all-gather and reduce-scatter ops in compiled HLO text."""
  return {c: len(re.findall(rf"= \S+ {c}(-start)?\(", hlo))
          for c in ("all-gather", "reduce-scatter")}


def compile_and_run(fn, args, check_hlo, counts=None):
  """One compile: the executable both runs and gives the HLO (`counts`, a
  dict: filled with its `collective_counts`)."""
  compiled = jax.jit(fn).lower(*args).compile()
  if check_hlo or counts is not None:
    hlo = compiled.as_text()
    found = [c for c in COLLECTIVES if c in hlo]
    assert not (check_hlo and found), f"collectives in the compiled HLO: {found}"
    if counts is not None:
      counts.update(collective_counts(hlo))
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


def mesh_of(axis_type):
  return jax.make_mesh((2, 2, 2), AXES, axis_types=(axis_type,) * 3)


def call_specs(n, spec, q_spec=None):
  """Specs of `(*arrays, q_offset, cot)`: q-like arrays (q, q_search, cot)
  get `q_spec`, k-like ones `spec`."""
  q_spec = spec if q_spec is None else q_spec
  return tuple(q_spec if i in (0, 3) else spec for i in range(n)) + (P(), q_spec)


# Sharding modes per implementation in the CI tier (`tier="ci"`): xla runs
# every mode (its plumbing is what the other two share); reference and
# pallas run the sequence-sharded jit and, for pallas, the user's shard_map
# (the TPU-interpreter path). `tier="full"` runs every mode everywhere.
CI_MODES = {"reference": {"bh", "seq"}, "xla": {"bh", "seq", "auto_seq", "shard_map"},
            "pallas": {"seq", "shard_map"}}
ALL_MODES = {"bh", "seq", "auto", "auto_seq", "shard_map"}


def modes_for(impl, tier):
  return ALL_MODES if tier == "full" else CI_MODES.get(impl, ALL_MODES)


def cases(impl, op, n, decode, args, off, cot, want, modes=ALL_MODES):
  """The sharding `modes` of one (impl, op); each a single compile."""
  call = list(args) + [off, cot]
  g = value_and_grads(ops(impl)[op][2], n)
  gs = value_and_grads(ops(impl, seq_axis="seq")[op][2], n)
  seq_specs = call_specs(n, BSH, BH if decode else BSH)   # decode: q replicated over seq
  seq = "decode-cache" if decode else "seq"

  def explicit_batch_heads():
    mesh = mesh_of(AxisType.Explicit)
    with jax.set_mesh(mesh):
      close(compile_and_run(g, put(mesh, call, call_specs(n, BH)), True), want, "bh")
  if "bh" in modes:
    report(f"{impl}/{op}/jit-Explicit-batch-heads", explicit_batch_heads)

  explicit_counts = {}

  def explicit_seq():
    mesh = mesh_of(AxisType.Explicit)
    with jax.set_mesh(mesh):
      close(compile_and_run(gs, put(mesh, call, seq_specs), op == "sliding",
                            explicit_counts), want, "seq")
  if "seq" in modes:
    report(f"{impl}/{op}/jit-Explicit-batch-heads-{seq}", explicit_seq)

  def auto_batch_heads():
    # The op reads the shardings at XLA partitioning time (custom_partitioning).
    mesh = mesh_of(AxisType.Auto)
    with jax.set_mesh(mesh):
      close(compile_and_run(g, put(mesh, call, call_specs(n, BH)), True), want, "auto")
  if "auto" in modes:
    report(f"{impl}/{op}/jit-Auto-batch-heads", auto_batch_heads)

  def auto_seq():
    # Batch and heads stay sharded: the sequence's own collectives only, the
    # key gathers twice (the backward recomputes the forward on its block).
    mesh = mesh_of(AxisType.Auto)
    counts = {}
    with jax.set_mesh(mesh):
      close(compile_and_run(gs, put(mesh, call, seq_specs), False, counts), want, "auto-seq")
    assert explicit_counts, "the Explicit seq case did not compile"
    assert counts["reduce-scatter"] == explicit_counts["reduce-scatter"], (
        counts, explicit_counts)
    assert counts["all-gather"] <= 2 * explicit_counts["all-gather"], (counts, explicit_counts)
  if not decode and "auto_seq" in modes:   # Auto types carry no spec: a replicated q is not visible
    report(f"{impl}/{op}/jit-Auto-batch-heads-seq", auto_seq)

  def user_shard_map():
    # Pallas on CPU: the tables vary over the manual axes, so the kernels run
    # in the TPU interpreter (`pallas_kernels.platform.dispatch`).
    mesh = mesh_of(AxisType.Explicit)
    out = (seq_specs[0], seq_specs[:n])
    sm = jax.shard_map(gs, mesh=mesh, in_specs=seq_specs, out_specs=out)
    close(jax.jit(sm)(*put(mesh, call, seq_specs)), want, "shard_map")
  if "shard_map" in modes:
    report(f"{impl}/{op}/shard_map-batch-heads-{seq}", user_shard_map)


def zigzag_case(impl, op, n, args, cot, want, in_shard_map):
  perm = zigzag_order(L, 2)
  inv = np.argsort(perm)
  gz = value_and_grads(ops(impl, seq_axis="seq", seq_order="zigzag")[op][2], n)
  call = [a[:, perm] for a in args] + [None, cot[:, perm]]
  specs = call_specs(n, BSH)

  def run():
    mesh = mesh_of(AxisType.Explicit)
    if in_shard_map:
      sm = jax.shard_map(gz, mesh=mesh, in_specs=specs, out_specs=(BSH, specs[:n]))
      got = jax.jit(sm)(*put(mesh, call, specs))
    else:
      with jax.set_mesh(mesh):   # sliding: a neighbour exchange, no all-gather
        got = compile_and_run(gz, put(mesh, call, specs), op == "sliding")
    close(jax.tree.map(lambda x: np.asarray(x)[:, inv], got), want, "zigzag")
  report(f"{impl}/{op}/zigzag-" + ("shard_map" if in_shard_map else "Explicit"), run)


def block_sparse_zigzag_16_row_chunks(impl):
  """Block sparse in the zigzag order at L = 2 * 2 * 16 (16-row chunks, the
  Pallas kernels' block) against the unsharded reference call."""
  length = 2 * 2 * 16
  layout = block_layout(length)
  x = oc.inputs(batch=B, q_len=length, hq=HQ, hk=HK, d=D)
  args = [x[k] for k in NAMES[:3]]
  cot = jax.random.normal(jax.random.PRNGKey(8), args[0].shape, jnp.float32)
  f = lambda kw: lambda a, off: attn.block_sparse_attention(*a, layout, **kw)  # noqa: E731
  want = jax.jit(value_and_grads(f(dict(implementation="reference")), 3))(*args, None, cot)
  gz = value_and_grads(f(dict(implementation=impl, seq_axis="seq", seq_order="zigzag")), 3)
  perm = zigzag_order(length, 2)
  call = [a[:, perm] for a in args] + [None, cot[:, perm]]

  def run():
    mesh = mesh_of(AxisType.Explicit)
    with jax.set_mesh(mesh):
      got = compile_and_run(gz, put(mesh, call, call_specs(3, BSH)), False)
    close(jax.tree.map(lambda y: np.asarray(y)[:, np.argsort(perm)], got), want, "zigzag-64")
  report(f"{impl}/block_sparse/zigzag-Explicit-L{length}", run)


def main(impls, tier="full"):
  assert jax.device_count() == 8
  for op, (n, decode, f_ref) in ops("reference").items():
    args, cot = inputs(n, decode)
    off = jnp.int32(DECODE_OFF) if decode else None
    # The oracle: the unsharded reference call (dense masked; tested against
    # its own oracles in tests/test_op_suite.py).
    want = jax.jit(value_and_grads(f_ref, n))(*args, off, cot)
    for impl in impls:
      if op not in ops(impl):
        continue
      cases(impl, op, n, decode, args, off, cot, want, modes_for(impl, tier))
      if decode or (impl == "pallas" and op == "block_sparse"):
        continue    # pallas block sparse: block_sparse_zigzag_16_row_chunks
      if tier != "full" and impl != "xla":
        continue    # CI tier: the zigzag order through xla (and pallas block sparse)
      zigzag_case(impl, op, n, args, cot, want, False)
      if impl == "xla" and tier == "full":
        zigzag_case(impl, op, n, args, cot, want, True)
  if "pallas" in impls:
    block_sparse_zigzag_16_row_chunks("pallas")
  if "xla" in impls:
    args, cot = inputs(3, False)
    ref = lambda a, off: attn.superlinear_attention(  # noqa: E731
        a[0], a[1], a[2], a[0], None, config=CFG, implementation="reference")
    want = jax.jit(value_and_grads(ref, 3))(*args, None, cot)
    cases("xla", "superlinear_k_as_search", 3, False, args, None, cot, want,
          modes_for("xla", tier))
    extra_checks()


def extra_checks():
  """MQA with heads sharded, needle across shards and bad input (xla path)."""
  mesh = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  sq = P(None, "seq", None, None)

  def mqa():
    x = oc.inputs(batch=B, q_len=L, hq=HQ, hk=1, d=D, ds=DS)
    a = [x["q"], x["k"], x["v"]]
    f = lambda a: attn.ppa_attention(*a, p=0.5, window=3, implementation="xla")  # noqa: E731
    g = lambda *a: jax.grad(lambda *a: jnp.sum(f(a) ** 2), argnums=(0, 1, 2))(*a)  # noqa: E731
    want = jax.jit(g)(*a)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      m = mesh_of(axis_type)
      with jax.set_mesh(m):
        sh = put(m, a, (BH,) + (P("data", None, None, None),) * 2)
        close(compile_and_run(g, sh, True), want, f"mqa {axis_type}")

  def vmapped():
    # jax.vmap of an op on an Auto mesh (custom_partitioning has no batching
    # rule: the op runs unpartitioned there).
    x = oc.inputs(batch=B, q_len=L, hq=HQ, hk=HK, d=D, ds=DS)
    a = [jnp.stack([x[n], x[n][::-1]]) for n in ("q", "k", "v")]
    f = lambda impl: lambda *a: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(jax.vmap(lambda *b: attn.dense_attention(
            *b, implementation=impl))(*a) ** 2), argnums=(0, 1, 2))(*a)
    want = jax.jit(f("reference"))(*a)
    m = mesh_of(AxisType.Auto)
    with jax.set_mesh(m):
      close(jax.jit(f("xla"))(*put(m, a, (P(None, "data", None, "model"),) * 3)), want,
            "vmap")

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
          *a, config=cfg, implementation="xla", seq_axis="seq")))(*put(mesh, args, (sq,) * 5))
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
      sh = put(mesh, qkv, (sq,) * 3)
      expect(lambda: dense(*sh, seq_axis="sequence"), "seq_axis='sequence'",
             "not an axis of the mesh")
      expect(lambda: dense(*put(mesh, qkv, (P(),) * 3), seq_axis="seq"), "seq_axis='seq'",
             "sharded")
      expect(lambda: dense(*sh, seq_axis="seq", seq_order="spiral"), "seq_order")
      odd = put(mesh, [oc.inputs(batch=1, q_len=L + 4, hq=2, hk=2, d=8)[k]
                       for k in ("q", "k", "v")], (sq,) * 3)
      expect(lambda: dense(*odd, seq_axis="seq", seq_order="zigzag"), "not divisible",
             "2 * axis size")
    auto = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(auto):
      y = oc.inputs(batch=1, q_len=L + 2, hq=2, hk=2, d=8, ds=8)
      odd = [y["q"], y["k"], y["v"]]
      expect(lambda: jax.jit(lambda *a: dense(*a, seq_axis="seq"))(*odd), "not divisible",
             "seq_axis='seq'")
    # Inside a user's shard_map (check_vma): k not mapped over the axis.
    sm = jax.shard_map(lambda q, k, v: dense(q, k, v, seq_axis="seq"), mesh=mesh,
                       in_specs=(sq, P(), P()), out_specs=sq)
    expect(lambda: jax.jit(sm)(*put(mesh, qkv, (sq, P(), P()))),
           "seq_axis='seq'", "k is not sharded")

  report("xla/mqa-heads", mqa)
  report("xla/vmap-Auto", vmapped)
  report("xla/superlinear/seq-needle", needle)
  report("xla/bad-input", bad_input)


if __name__ == "__main__":
  main(sys.argv[1].split(","), *sys.argv[2:3])
