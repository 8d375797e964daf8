"""Attention ops beyond the shared suite (tests/test_op_suite.py): `xla`
against `reference` for the configs the suite does not run (PPA p = 0.75,
cubic superlinear) and with many small xla blocks, exact loop oracles at
non-integer inverse powers, identities, composability and input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import reference, xla
from tests import attn_oracles
from tests import op_cases
from tests.op_cases import (BF16_ERROR_RATIO, CUBIC_CFG, NO_WINDOW_CFG, SL_055, SMALL_CFG,
                            rel_err as _rel_err)
from tests.op_cases import inputs as _inputs

_F32 = op_cases.TOL[jnp.float32]
TOL = dict(atol=_F32["atol"], rtol=_F32["rtol"])
GRAD_TOL = dict(atol=_F32["grad_atol"], rtol=_F32["grad_rtol"])
SL_03 = attn.SuperlinearConfig(sw_index=1, num_spans=2, search_power=0.3,
                               span_power=0.75, backward_factor=3.0)       # W = 9


def _layout(L):
  return attn.BlockLayout.sliding_window(L, window=13, block_q=16, block_k=8)


# name -> (fn(inputs, implementation), differentiable argument names)
OPS = {
    "dense": (lambda x, impl: attn.dense_attention(x["q"], x["k"], x["v"],
                                                   implementation=impl), "qkv"),
    "sliding": (lambda x, impl: attn.sliding_window_attention(
        x["q"], x["k"], x["v"], window=11, implementation=impl), "qkv"),
    "ppa_0.5": (lambda x, impl: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.5, window=4, implementation=impl), "qkv"),
    "ppa_0.75": (lambda x, impl: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.75, window=8, implementation=impl), "qkv"),
    "block_sparse": (lambda x, impl: attn.block_sparse_attention(
        x["q"], x["k"], x["v"], _layout(x["q"].shape[1]), implementation=impl), "qkv"),
    "superlinear": (lambda x, impl: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=SMALL_CFG,
        implementation=impl), "qkv+search"),
    "superlinear_k_as_search_key": (lambda x, impl: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["q"], None, config=NO_WINDOW_CFG,
        implementation=impl), "qkv"),
    "superlinear_cubic": (lambda x, impl: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=CUBIC_CFG,
        implementation=impl), "qkv+search"),
}


def _grad_args(x, which):
  names = ["q", "k", "v"] + (["q_search", "k_search"] if which == "qkv+search" else [])
  return names


def _vjp(fn, x, names, impl, cot):
  def f(*args):
    y = dict(x, **dict(zip(names, args)))
    return fn(y, impl).astype(jnp.float32)
  out, pull = jax.vjp(f, *[x[n] for n in names])
  return out, pull(cot)


@pytest.mark.parametrize("heads,dtype", [((4, 2), jnp.float32), ((3, 3), jnp.float32),
                                         ((4, 1), jnp.bfloat16)],
                         ids=["gqa-f32", "mha-f32", "gqa-bf16"])
@pytest.mark.parametrize("op", ["ppa_0.75", "superlinear_cubic"])   # the rest: test_op_suite
def test_xla_matches_reference_values_and_grads(op, heads, dtype):
  fn, which = OPS[op]
  x = _inputs(jax.random.PRNGKey(list(OPS).index(op)), hq=heads[0], hk=heads[1], dtype=dtype)
  names = _grad_args(x, which)
  cot = jax.random.normal(jax.random.PRNGKey(7), x["q"].shape, jnp.float32)
  ref, ref_grads = _vjp(fn, x, names, "reference", cot)
  out, grads = _vjp(fn, x, names, "xla", cot)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, ref)
  chex.assert_tree_all_finite((out, grads))
  if dtype == jnp.float32:
    chex.assert_trees_all_close(out, ref, **TOL)
    for name, g, rg in zip(names, grads, ref_grads):
      chex.assert_trees_all_close(g, rg, **GRAD_TOL, custom_message=f"d{name}")
    return
  # bfloat16: both against float32 on the same rounded inputs.
  x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
  want, want_grads = _vjp(fn, x32, names, "reference", cot)
  for name, g, rg, wg in zip(["out"] + names, [out, *grads], [ref, *ref_grads],
                             [want, *want_grads]):
    err, ref_err = _rel_err(g, wg), _rel_err(rg, wg)
    assert err <= BF16_ERROR_RATIO * ref_err, (name, err, ref_err)


# CI runs superlinear (the op with the most xla glue); the others in `-m full`.
@pytest.mark.parametrize("op", [pytest.param(o, marks=pytest.mark.full)
                                for o in ("dense", "sliding", "ppa_0.5")] + ["superlinear"])
def test_default_implementation_is_xla_and_deterministic_across_compilations(op):
  """`implementation=None` is the xla path: bitwise equal to a separate
  compilation of it inside a user's `jax.jit(jax.grad(...))`, and close to
  the dense reference (which differs in the last bits)."""
  fn, _ = OPS[op]
  x = _inputs(jax.random.PRNGKey(3), q_len=33)
  loss = lambda impl: lambda q: jnp.sum(fn(dict(x, q=q), impl) ** 2)  # noqa: E731
  got = (fn(x, None), jax.grad(loss(None))(x["q"]))
  jax.clear_caches()
  again = (jax.jit(lambda y: fn(y, "xla"))(x), jax.jit(jax.grad(loss("xla")))(x["q"]))
  chex.assert_trees_all_equal(got, again)
  ref = (fn(x, "reference"), jax.grad(loss("reference"))(x["q"]))
  chex.assert_trees_all_close(got, ref, atol=5e-5, rtol=5e-4)


# Ops called on `attn.xla` / `attn.reference` directly (no jit cache), so that
# a patched block budget takes effect: many 8-query blocks, PPA chunks and
# superlinear segments on a short sequence.
SMALL_BLOCK_CASES = {
    "dense": (xla.dense_attention, reference.dense_attention, {}),
    "sliding": (xla.sliding_window_attention, reference.sliding_window_attention,
                dict(window=6)),
    "ppa_0.5": (xla.ppa_attention, reference.ppa_attention, dict(p=0.5, window=4)),
    "ppa_0.75": (xla.ppa_attention, reference.ppa_attention, dict(p=0.75, window=16)),
    "ppa_1": (xla.ppa_attention, reference.ppa_attention, dict(p=1.0, window=4)),
    "superlinear_p0.55_k1": (xla.superlinear_attention, reference.superlinear_attention,
                             dict(config=attn.SuperlinearConfig(
                                 sw_index=2, num_spans=1, search_power=0.55,
                                 span_power=0.55, backward_factor=3.0))),
    "superlinear_k3": (xla.superlinear_attention, reference.superlinear_attention,
                       dict(config=attn.SuperlinearConfig(sw_index=1, num_spans=3))),
}


# CI runs every case at a chunk offset (the harder bookkeeping); prefill in
# `-m full`.
@pytest.mark.parametrize("q_offset", [pytest.param(None, id="prefill", marks=pytest.mark.full),
                                      pytest.param(7, id="chunk")])
@pytest.mark.parametrize("case", list(SMALL_BLOCK_CASES))
def test_xla_with_many_small_blocks_matches_reference(case, q_offset, monkeypatch):
  monkeypatch.setattr(xla.blocks, "BLOCK_BUDGET", 1)         # 8-query blocks and chunks
  monkeypatch.setattr(xla.superlinear, "_SEGMENT_ALIGN", 8)  # several superlinear segments
  fx, fr, kw = SMALL_BLOCK_CASES[case]
  q_len = 45 if q_offset is None else 29
  x = _inputs(jax.random.PRNGKey(51), q_len=q_len, kv_len=45, hq=4, hk=2, d=8, ds=8)
  kw = dict(kw, scale=8 ** -0.5)
  search = "superlinear" in case
  names = ["q", "k", "v"] + (["q_search", "k_search"] if search else [])

  def run(fn):
    def f(*args):
      y = dict(zip(names, args))
      extra = (y["q_search"], y["k_search"]) if search else ()
      out = fn(y["q"], y["k"], y["v"], *extra, q_offset, **kw)
      return (out[0], out[1:]) if search else (out, ())
    out, pull, aux = jax.vjp(f, *[x[n] for n in names], has_aux=True)
    return out, aux, pull(jax.random.normal(jax.random.PRNGKey(8), out.shape))

  (got, got_aux, grads), (want, want_aux, want_grads) = run(fx), run(fr)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  if search:
    chex.assert_trees_all_equal(got_aux[0], want_aux[0])              # anchors
    chex.assert_trees_all_close(got_aux[1], want_aux[1], atol=1e-5)   # gates
  chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("q_offset", [0, 9, 16])
def test_superlinear_one_query_blocks_at_a_promised_offset_match_reference(q_offset):
  """The per-shard call of context parallelism (`attn.context_parallel`):
  `block_budget=1` (one-query blocks) and a traced `q_offset` promised in
  range (`offset_in_range=True`: no row shift), values and VJPs."""
  cfg = attn.SuperlinearConfig(sw_index=2, num_spans=2)
  x = _inputs(jax.random.PRNGKey(52), q_len=29, kv_len=45, hq=4, hk=2, d=8, ds=8)
  names = ["q", "k", "v", "q_search", "k_search"]
  ct = jax.random.normal(jax.random.PRNGKey(9), x["q"].shape)

  def run(fn, **extra):
    @jax.jit
    def go(off, *args):
      def f(*a):
        out = fn(*a, off, config=cfg, scale=8 ** -0.5, **extra)
        return out[0], out[1:]
      out, pull, aux = jax.vjp(f, *args, has_aux=True)
      return out, aux, pull(ct)
    return go(jnp.int32(q_offset), *[x[n] for n in names])

  got, got_aux, grads = run(xla.superlinear_attention, block_budget=1, offset_in_range=True)
  want, want_aux, want_grads = run(reference.superlinear_attention)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_equal(got_aux[0], want_aux[0])              # anchors
  chex.assert_trees_all_close(got_aux[1], want_aux[1], atol=1e-5)   # gates
  chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=5e-4)


# ------------------------------------------------------ numpy loop oracles


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_cubic_superlinear_matches_numpy_loop(impl):  # other configs: test_op_suite
  cfg = CUBIC_CFG
  x = _inputs(jax.random.PRNGKey(13), batch=1, q_len=40, hq=2, hk=1, d=8, ds=4)
  want, want_anchors = attn_oracles.superlinear_loop(
      x["q"], x["k"], x["v"], x["q_search"], x["k_search"], **vars(cfg))
  got = attn.superlinear_attention_with_anchors(
      x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=cfg,
      implementation=impl)
  np.testing.assert_array_equal(np.asarray(got.anchors), want_anchors)
  np.testing.assert_allclose(np.asarray(got.out), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.gates).sum(-1), 1.0, atol=1e-6)


# Non-integer 1/p: the oracles compute offsets with exact rational powers
# (0.55 = 11/20, 0.3 = 3/10), independently of `attn.masks`. (0.55, 20) has a
# band (the window bin) and stripes in the xla path; the others only stripes.
@pytest.mark.parametrize("p,window,L", [(0.55, 3, 23), (0.55, 20, 101), (0.3, 2, 41),
                                        (0.3, 4, 77)])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_ppa_matches_exact_loop_oracle_at_non_integer_inverse_power(p, window, L, impl):
  x = _inputs(jax.random.PRNGKey(16), batch=1, q_len=L, hq=2, hk=1, d=8)
  want = attn_oracles.attention_loop(x["q"], x["k"], x["v"],
                                     attn_oracles.ppa_keep(p, window, L))
  got = attn.ppa_attention(x["q"], x["k"], x["v"], p=p, window=window, implementation=impl)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg,L", [(SL_055, 37), (SL_055, 90), (SL_03, 64)],
                         ids=["p0.55-L37", "p0.55-L90", "p0.3-L64"])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_superlinear_matches_exact_loop_oracle_at_non_integer_inverse_power(cfg, L, impl):
  x = _inputs(jax.random.PRNGKey(17), batch=1, q_len=L, hq=2, hk=1, d=8, ds=4)
  want, want_anchors = attn_oracles.superlinear_loop(
      x["q"], x["k"], x["v"], x["q_search"], x["k_search"], **vars(cfg))
  got = attn.superlinear_attention_with_anchors(
      x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=cfg,
      implementation=impl)
  np.testing.assert_array_equal(np.asarray(got.anchors), want_anchors)
  np.testing.assert_allclose(np.asarray(got.out), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_decode_steps_match_loop_oracles(impl):
  """q_len 1 at a traced `q_offset` in a 50-slot cache, against the loops."""
  L = 50
  x = _inputs(jax.random.PRNGKey(18), batch=1, q_len=L, hq=2, hk=1, d=8, ds=4)
  ppa = jax.jit(lambda q1, t: attn.ppa_attention(
      q1, x["k"], x["v"], p=0.55, window=3, q_offset=t, implementation=impl))
  sl = jax.jit(lambda q1, qs1, t: attn.superlinear_attention_with_anchors(
      q1, x["k"], x["v"], qs1, x["k_search"], config=SL_055, q_offset=t,
      implementation=impl))
  keep = attn_oracles.ppa_keep(0.55, 3, L)
  for t in (0, 7, 8, 31, L - 1):
    q1, qs1 = x["q"][:, t:t + 1], x["q_search"][:, t:t + 1]
    want = attn_oracles.attention_loop(q1, x["k"], x["v"], keep, q_offset=t)
    np.testing.assert_allclose(np.asarray(ppa(q1, jnp.int32(t))), want, atol=1e-5,
                               rtol=1e-5, err_msg=f"ppa t={t}")
    want, want_anchors = attn_oracles.superlinear_loop(
        q1, x["k"], x["v"], qs1, x["k_search"], **vars(SL_055), q_offset=t)
    got = sl(q1, qs1, jnp.int32(t))
    np.testing.assert_array_equal(np.asarray(got.anchors), want_anchors)
    np.testing.assert_allclose(np.asarray(got.out), want, atol=1e-5, rtol=1e-5,
                               err_msg=f"superlinear t={t}")


def test_superlinear_ties_keep_the_farther_stripe():
  # Constant search keys: every anchor scores the same; the farthest wins.
  x = _inputs(jax.random.PRNGKey(14), batch=1, q_len=30, hq=1, hk=1, d=4, ds=4)
  ks = jnp.ones_like(x["k_search"])
  cfg = attn.SuperlinearConfig(sw_index=1, num_spans=2)
  for impl in ("reference", "xla"):
    got = attn.superlinear_attention_with_anchors(
        x["q"], x["k"], x["v"], x["q_search"], ks, config=cfg, implementation=impl)
    # query 29: t = 30, stripes j = 2..5 give anchors 26, 21, 14, 5.
    np.testing.assert_array_equal(np.asarray(got.anchors[0, 29, 0]), [5, 14])


def test_superlinear_routing_learns_through_the_gate():
  x = _inputs(jax.random.PRNGKey(15), q_len=40)
  loss = lambda qs, ks: jnp.sum(attn.superlinear_attention(  # noqa: E731
      x["q"], x["k"], x["v"], qs, ks, config=SMALL_CFG) ** 2)
  gq, gk = jax.grad(loss, argnums=(0, 1))(x["q_search"], x["k_search"])
  assert float(jnp.abs(gq).max()) > 0 and float(jnp.abs(gk).max()) > 0
  # Queries with no valid anchor (position < W + 1) have a constant gate.
  np.testing.assert_array_equal(np.asarray(gq[:, :SMALL_CFG.window]), 0.0)


# ------------------------------------------------------------ identities


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_ppa_p0_is_sliding_window_and_p1_is_dense(impl):
  # Against the *reference* of the other op: the xla PPA path dispatches p=0
  # and p=1 to the xla window and dense code, so comparing with those would
  # compare a function with itself.
  x = _inputs(jax.random.PRNGKey(21), q_len=70)
  q, k, v = x["q"], x["k"], x["v"]
  chex.assert_trees_all_close(
      attn.ppa_attention(q, k, v, p=0.0, window=9, implementation=impl),
      attn.sliding_window_attention(q, k, v, window=9, implementation="reference"),
      atol=2e-6, rtol=2e-6)
  chex.assert_trees_all_close(
      attn.ppa_attention(q, k, v, p=1.0, window=9, implementation=impl),
      attn.dense_attention(q, k, v, implementation="reference"), atol=2e-6, rtol=2e-6)


def test_superlinear_is_dense_within_the_window():
  x = _inputs(jax.random.PRNGKey(22), q_len=8)     # every query has t <= W = 8
  for impl in ("reference", "xla"):
    chex.assert_trees_all_close(
        attn.superlinear_attention(x["q"], x["k"], x["v"], x["q_search"], x["k_search"],
                                   config=SMALL_CFG, implementation=impl),
        attn.dense_attention(x["q"], x["k"], x["v"], implementation="reference"),
        atol=2e-6, rtol=2e-6)


# --------------------------------------------------------- composability


def test_jit_vmap_grad_checkpoint_compose():
  x = _inputs(jax.random.PRNGKey(31), batch=1, q_len=21)
  stack = lambda a: jnp.stack([a, 2 * a])  # noqa: E731
  for op in ("dense", "sliding", "ppa_0.5", "block_sparse", "superlinear"):
    fn, _ = OPS[op]
    f = lambda q: fn(dict(x, q=q), "xla").sum()  # noqa: E731
    g1 = jax.grad(f)(x["q"])
    g2 = jax.jit(jax.grad(jax.checkpoint(f)))(x["q"])
    chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)
    batched = jax.vmap(lambda q: fn(dict(x, q=q), "xla"))(stack(x["q"]))
    chex.assert_trees_all_close(batched[1], fn(dict(x, q=2 * x["q"]), "xla"),
                                atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ validation


def test_bad_inputs_raise_value_errors_naming_the_argument():
  x = _inputs(jax.random.PRNGKey(41), q_len=16)
  q, k, v = x["q"], x["k"], x["v"]
  cases = [
      (lambda: attn.dense_attention(q[0], k, v), "q must have rank 4"),
      (lambda: attn.dense_attention(q, k[..., 0], v), "k must have rank 4"),
      (lambda: attn.dense_attention(q[:, :, :3], k, v), "num_q_heads=3"),
      (lambda: attn.dense_attention(q, k.astype(jnp.bfloat16), v), "dtype mismatch"),
      (lambda: attn.dense_attention(q.astype(jnp.int32), k, v), "q.dtype"),
      (lambda: attn.dense_attention(q, k[:1], v[:1]), "batch mismatch"),
      (lambda: attn.dense_attention(q, k, v[..., :8]), "v.shape"),
      (lambda: attn.dense_attention(q, k[:, :8], v[:, :8]), "q_len=16 > kv_len=8"),
      (lambda: attn.dense_attention(q, k, v, q_offset=3), "q_offset=3"),
      (lambda: attn.dense_attention(q, k, v, q_offset=np.int32(-1)), "q_offset=-1"),
      (lambda: attn.dense_attention(q, k, v, q_offset=2.5), "q_offset=2.5"),
      (lambda: attn.dense_attention(q, k[:, :, :0], v[:, :, :0]), "empty input"),
      (lambda: attn.dense_attention(q, k, v, scale=True), "scale=True"),
      (lambda: attn.ppa_attention(q, k, v, p=True), "p=True"),
      (lambda: attn.ppa_mask(-1, p=0.5, window=4), "seq_len=-1"),
      (lambda: attn.dense_attention(q, k, v, scale=-1.0), "scale=-1.0"),
      (lambda: attn.dense_attention(q, k, v, implementation="cuda"), "implementation='cuda'"),
      (lambda: attn.sliding_window_attention(q, k, v, window=0), "window=0"),
      (lambda: attn.sliding_window_attention(q, k, v, window=2.5), "window=2.5"),
      (lambda: attn.ppa_attention(q, k, v, p=1.01), "p=1.01"),
      (lambda: attn.ppa_attention(q, k, v, p=-0.5), "p=-0.5"),
      (lambda: attn.ppa_attention(q, k, v, p=0.5, window=-3), "window=-3"),
      (lambda: attn.block_sparse_attention(q, k, v, _layout(20)), "layout was built"),
      (lambda: attn.block_sparse_attention(q, k, v, np.ones((16, 16), bool)), "layout must"),
      (lambda: attn.superlinear_attention(q, k, v, x["q_search"][:, :8]), "q_search.shape"),
      (lambda: attn.superlinear_attention(q, k, v, x["q_search"], k), "search_dim"),
      (lambda: attn.superlinear_attention(q, k, v, q, config={"num_spans": 2}), "config"),
      (lambda: attn.SuperlinearConfig(num_spans=0), "num_spans=0"),
      (lambda: attn.SuperlinearConfig(search_power=1.5), "search_power=1.5"),
      (lambda: attn.SuperlinearConfig(sw_index=-1), "sw_index=-1"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
      call()


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_block_sparse_any_mask_matches_reference(density):
  """Random (non-causal) masks, rows with no key, uneven key-block counts."""
  L = 60
  mask = np.random.default_rng(int(density * 100)).random((L, L)) < density
  mask[:, 40:] &= np.tril(np.ones((L, L), bool))[:, 40:]  # uneven rows
  mask[5] = False                                   # a query that sees nothing
  layout = attn.BlockLayout.from_mask(mask, block_q=8, block_k=8)
  assert len(set(layout.num_kv_blocks.tolist())) > 1
  x = _inputs(jax.random.PRNGKey(61), q_len=L, hq=4, hk=2, d=8)
  fn = lambda impl: lambda q, k, v: attn.block_sparse_attention(  # noqa: E731
      q, k, v, layout, implementation=impl)
  cot = jax.random.normal(jax.random.PRNGKey(62), x["q"].shape)
  got, pull = jax.vjp(fn("xla"), x["q"], x["k"], x["v"])
  want, pull_ref = jax.vjp(fn("reference"), x["q"], x["k"], x["v"])
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(got[:, 5]), 0.0)
  chex.assert_trees_all_close(pull(cot), pull_ref(cot), atol=5e-5, rtol=5e-4)
