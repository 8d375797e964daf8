"""Attention ops on the inputs a demanding user sends: NaN/Inf junk in cache
slots no query may see, traced `q_offset` outside `[0, kv_len - q_len]`,
extreme configs and scalar arguments given as arrays.

Oracles: the numpy loops of `tests/attn_oracles.py` (own offset arithmetic)
and the same op on clean inputs.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import masks
from tests import attn_oracles, op_cases

LQ, LK, OFF = 6, 40, 21          # queries at positions 21..26 of a 40-slot cache
SL_CFG, SL_CFG_055 = op_cases.SMALL_CFG, op_cases.SL_055                # W = 8, 7
_inputs = functools.partial(op_cases.inputs, batch=1, q_len=LQ, kv_len=LK, hq=2, hk=1, d=8,
                            ds=4)


def _block_layout():
  """Query i (position OFF + i) sees keys (OFF + i - 9, OFF + i]: a cache layout."""
  pos = OFF + np.arange(LQ)[:, None]
  kpos = np.arange(LK)[None, :]
  mask = (kpos <= pos) & (kpos > pos - 9)
  return attn.BlockLayout.from_mask(mask, block_q=4, block_k=8)


# name -> (call(x, impl, q_offset), keep(pos, j) of the oracle or None)
CASES = {
    "dense": (lambda x, impl, off: attn.dense_attention(
        x["q"], x["k"], x["v"], q_offset=off, implementation=impl),
        lambda pos, j: True),
    "sliding": (lambda x, impl, off: attn.sliding_window_attention(
        x["q"], x["k"], x["v"], window=5, q_offset=off, implementation=impl),
        lambda pos, j: pos - j < 5),
    "ppa_0.55": (lambda x, impl, off: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.55, window=3, q_offset=off, implementation=impl),
        attn_oracles.ppa_keep(0.55, 3, LK)),
    "ppa_0.75": (lambda x, impl, off: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.75, window=2, q_offset=off, implementation=impl),
        attn_oracles.ppa_keep(0.75, 2, LK)),
    "superlinear": (lambda x, impl, off: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=SL_CFG,
        q_offset=off, implementation=impl), None),
    "superlinear_0.55": (lambda x, impl, off: attn.superlinear_attention(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=SL_CFG_055,
        q_offset=off, implementation=impl), None),
}


def _invisible_keys(case):
  """bool [LK]: key positions that no query of the call may see."""
  if case == "block_sparse":
    return ~_block_layout().to_mask().any(axis=0)
  keep = CASES[case][1]
  if keep is None:          # superlinear: every earlier key is a candidate
    keep = lambda pos, j: True  # noqa: E731
  seen = np.zeros(LK, bool)
  for pos in range(OFF, OFF + LQ):
    for j in range(pos + 1):
      seen[j] |= keep(pos, j)
  return ~seen


def _call(case, x, impl):
  if case == "block_sparse":
    return attn.block_sparse_attention(x["q"], x["k"], x["v"], _block_layout(),
                                       implementation=impl)
  return CASES[case][0](x, impl, OFF)


def _with_junk(x, bad):
  """NaN and +-Inf in k, v and k_search at the positions `bad`."""
  idx = np.nonzero(bad)[0]
  junk = np.where(np.arange(idx.size) % 2 == 0, np.nan, np.inf)[None, :, None, None]
  y = dict(x)
  y["k"] = x["k"].at[:, idx].set(junk.astype(np.float32))
  y["v"] = x["v"].at[:, idx].set(-junk.astype(np.float32))
  y["k_search"] = x["k_search"].at[:, idx].set(junk[..., ::-1].astype(np.float32))
  return y


# Junk inside the cache (keys before a query's window or between PPA offsets).
# Junk past the last query, for every op and implementation: test_op_suite.
@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", ["sliding", "ppa_0.55", "ppa_0.75", "block_sparse"])
def test_junk_in_invisible_cache_slots_contributes_nothing(case, impl):
  x = _inputs(jax.random.PRNGKey(1))
  bad = _invisible_keys(case)
  assert bad.any() and not bad.all()
  names = ["q", "k", "v"] + (["q_search", "k_search"] if "superlinear" in case else [])
  cot = jax.random.normal(jax.random.PRNGKey(2), x["q"].shape)

  def run(inputs):
    f = lambda *a: _call(case, dict(inputs, **dict(zip(names, a))), impl)  # noqa: E731
    out, pull = jax.vjp(f, *[inputs[n] for n in names])
    return out, dict(zip(names, pull(cot)))

  clean_out, clean_grads = run(x)
  out, grads = run(_with_junk(x, bad))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, clean_out, atol=1e-6, rtol=1e-6)
  for name in ("k", "v", "k_search"):
    if name in grads:
      np.testing.assert_array_equal(np.asarray(grads[name])[:, bad], 0.0, err_msg=name)
  chex.assert_trees_all_close(grads, clean_grads, atol=1e-5, rtol=1e-5)


OFFSETS = [-9, -3, -1, 0, LK - LQ, LK - LQ + 2, LK - 1, LK + 4, 2 ** 31 - 1, -2 ** 31]


@pytest.mark.parametrize("case", list(CASES))
def test_traced_q_offset_out_of_range_matches_reference_and_oracle(case):
  """Rows at positions in [0, kv_len) are attention as usual, other rows are 0."""
  fn, keep = CASES[case]
  x = _inputs(jax.random.PRNGKey(3))
  names = ["q", "k", "v"] + (["q_search", "k_search"] if "superlinear" in case else [])
  cot = jax.random.normal(jax.random.PRNGKey(4), x["q"].shape)

  def vjp(impl):
    def f(args, off):
      y = dict(x, **dict(zip(names, args)))
      if "superlinear" in case:
        cfg = SL_CFG if case == "superlinear" else SL_CFG_055
        r = attn.superlinear_attention_with_anchors(
            y["q"], y["k"], y["v"], y["q_search"], y["k_search"], config=cfg,
            q_offset=off, implementation=impl)
        return r.out, (r.anchors, r.gates)
      return fn(y, impl, off), ()
    return jax.jit(lambda args, off: (lambda o, pull, aux: (o, aux, pull(cot)))(
        *jax.vjp(lambda a: f(a, off), args, has_aux=True)))

  got_fn, want_fn = vjp("xla"), vjp("reference")
  args = [x[n] for n in names]
  for off in OFFSETS:
    off32 = jnp.int32(off)
    got, got_aux, got_grads = got_fn(args, off32)
    want, want_aux, want_grads = want_fn(args, off32)
    chex.assert_tree_all_finite((got, got_grads, want, want_grads))
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5,
                                custom_message=f"q_offset={off}")
    chex.assert_trees_all_close(got_grads, want_grads, atol=5e-5, rtol=5e-4,
                                custom_message=f"q_offset={off}")
    rows = off + np.arange(LQ)                     # int64: no wrap-around
    invalid = (rows < 0) | (rows >= LK)
    np.testing.assert_array_equal(np.asarray(want)[:, invalid], 0.0)
    if "superlinear" in case:
      chex.assert_trees_all_equal(got_aux[0], want_aux[0])            # anchors
      chex.assert_trees_all_close(got_aux[1], want_aux[1], atol=1e-6)  # gates
      cfg = SL_CFG if case == "superlinear" else SL_CFG_055
      oracle, anchors = attn_oracles.superlinear_loop(
          x["q"], x["k"], x["v"], x["q_search"], x["k_search"], **vars(cfg), q_offset=off)
      np.testing.assert_array_equal(np.asarray(want_aux[0]), anchors)
    else:
      oracle = attn_oracles.attention_loop(x["q"], x["k"], x["v"], keep, q_offset=off)
    np.testing.assert_allclose(np.asarray(want), oracle, atol=1e-5, rtol=1e-5,
                               err_msg=f"q_offset={off}")


# ----------------------------------------------------- configs and scalars


@pytest.mark.parametrize("kwargs", [
    dict(search_power=0.02, span_power=1.0, sw_index=0),
    dict(search_power=0.01, span_power=1.0, sw_index=1),
    dict(search_power=0.02, span_power=1.0),
])
def test_superlinear_config_whose_tables_overflow_is_rejected(kwargs):
  with pytest.raises(ValueError, match=r"search_power=0\.0[12].*search_power >"):
    attn.SuperlinearConfig(**kwargs)


def test_tiny_search_power_tables_are_exact_and_causal():
  # Smallest accepted p for sw_index=0, num_spans=2 is just above log(2)/log(2**31 - 1).
  cfg = attn.SuperlinearConfig(search_power=0.04, span_power=1.0, sw_index=0,
                               backward_factor=1.0, num_spans=2)
  f = masks.stripe_offsets(6, 0.04)
  assert f.tolist()[:2] == [1, 2 ** 25]
  assert np.all(f[2:] == f[2])                  # beyond int32: saturated, never valid
  assert np.all(np.diff(f) >= 0) and f.min() >= 1
  table = masks.superlinear_stripe_table(1000, cfg)
  assert table.dtype == np.int32 and table.min() >= 1
  x = _inputs(jax.random.PRNGKey(5), q_len=20, kv_len=20)
  for impl in ("reference", "xla"):
    r = attn.superlinear_attention_with_anchors(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=cfg,
        implementation=impl)
    assert np.all(np.asarray(r.anchors) <= np.arange(20)[None, :, None, None])


def test_stripe_offsets_reject_bad_p_and_length():
  with pytest.raises(ValueError, match="p=0.0"):
    attn.stripe_offsets(5, 0.0)
  with pytest.raises(ValueError, match="n=-1"):
    attn.stripe_offsets(-1, 0.5)
  np.testing.assert_array_equal(attn.stripe_offsets(5, jnp.float32(0.5)), [1, 4, 9, 16, 25])


def test_masks_reject_negative_lengths_alike():
  for call, name in [(lambda: attn.sliding_window_mask(-1, window=3), "seq_len=-1"),
                     (lambda: attn.ppa_mask(-1, p=0.5, window=3), "seq_len=-1"),
                     (lambda: attn.causal_mask(-1), "q_len=-1"),
                     (lambda: attn.causal_mask(4, 3), "kv_len=3")]:
    with pytest.raises(ValueError, match=name):
      call()
  assert attn.sliding_window_mask(0, window=3).shape == (0, 0)


def test_scale_must_be_finite_and_array_scalars_are_accepted():
  x = _inputs(jax.random.PRNGKey(6), q_len=12, kv_len=12)
  q, k, v = x["q"], x["k"], x["v"]
  for bad in (float("inf"), float("nan"), np.float32(np.inf), jnp.float32(-0.5)):
    with pytest.raises(ValueError, match="scale="):
      attn.dense_attention(q, k, v, scale=bad)
  want = attn.ppa_attention(q, k, v, p=0.5, window=3, scale=0.1)
  got = attn.ppa_attention(q, k, v, p=jnp.float32(0.5), window=jnp.int32(3),
                           scale=jnp.float32(0.1))
  chex.assert_trees_all_close(got, want, atol=1e-6)
  np.testing.assert_array_equal(attn.ppa_offsets(30, p=jnp.float32(0.5), window=np.int64(2)),
                                attn.ppa_offsets(30, p=0.5, window=2))
  with pytest.raises(ValueError, match="p="):
    jax.jit(lambda p: attn.ppa_attention(q, k, v, p=p))(0.5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_float16_matches_a_float32_oracle(impl):
  x = _inputs(jax.random.PRNGKey(7), q_len=24, kv_len=24)
  h = {n: a.astype(jnp.float16) for n, a in x.items()}
  for case in ("dense", "ppa_0.55", "superlinear"):
    got = CASES[case][0](h, impl, None)
    want = CASES[case][0](x, "reference", None)
    assert got.dtype == jnp.float16
    chex.assert_trees_all_close(got.astype(jnp.float32), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_huge_span_factors_cover_everything_instead_of_overflowing(impl):
  # ceil(1e12 * t**0.5) does not fit the int32 span table: it must saturate
  # (a span then reaches back to key 0 and forward to the window), so every
  # selected span together with the window is all earlier keys: dense.
  cfg = attn.SuperlinearConfig(backward_factor=1e12, forward_factor=1e12, sw_index=1)
  table = masks.superlinear_span_table(30, cfg)
  assert table.min() >= 0 and np.all(table[1:] >= np.arange(1, 31)[:, None])
  x = _inputs(jax.random.PRNGKey(8), q_len=30, kv_len=30)
  got = attn.superlinear_attention(x["q"], x["k"], x["v"], x["q_search"], x["k_search"],
                                   config=cfg, implementation=impl)
  want = attn_oracles.attention_loop(x["q"], x["k"], x["v"], lambda pos, j: True)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def _count_pallas_calls(fn, *args) -> int:
  """`pallas_call` equations in `fn`'s jaxpr, sub-jaxprs (scan bodies,
  custom VJPs) included: the printed jaxpr shows them inline."""
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call[")


def test_superlinear_remat_recomputes_query_chunks_with_the_same_result(monkeypatch):
  """`remat=True` on a Pallas prefill that runs span attention in query
  chunks (the chunk size lowered to 32 queries so that 80 queries make 3
  chunks): values and gradients wrt q, k, v, q_search, k_search equal the
  reference's, and the gradient's program holds more kernel calls than with
  `remat=False` (each chunk's span forward again in the backward)."""
  from attn.pallas import superlinear as pallas_superlinear
  monkeypatch.setattr(pallas_superlinear, "SCAN_ABOVE", 32)
  monkeypatch.setattr(pallas_superlinear, "QUERY_CHUNK", 32)
  config = attn.SuperlinearConfig(sw_index=3, num_spans=2, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0)
  keys = jax.random.split(jax.random.PRNGKey(11), 6)
  b, lq, hq, hk, d = 1, 80, 4, 2, 16
  q = jax.random.normal(keys[0], (b, lq, hq, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, lq, hk, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, lq, hk, d), jnp.float32)
  qs = jax.random.normal(keys[3], (b, lq, hq, 8), jnp.float32)
  ks = jax.random.normal(keys[4], (b, lq, hk, 8), jnp.float32)
  cot = jax.random.normal(keys[5], q.shape, jnp.float32)

  def vjp(impl, remat):
    f = lambda *a: attn.superlinear_attention(*a, config=config,  # noqa: E731
                                              implementation=impl, remat=remat)
    out, pull = jax.vjp(f, q, k, v, qs, ks)
    return out, pull(cot)

  # remat=False's values are the op suite's (tests/test_op_suite.py).
  chex.assert_trees_all_close(vjp("pallas", True), vjp("reference", False), atol=2e-4,
                              rtol=2e-4)
  calls = [_count_pallas_calls(lambda: vjp("pallas", r)[1]) for r in (False, True)]
  assert calls[1] > calls[0] > 0, calls


def test_superlinear_remat_must_be_a_bool():
  x = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(ValueError, match="remat='yes'"):
    attn.superlinear_attention(x, x, x, x, remat="yes")
