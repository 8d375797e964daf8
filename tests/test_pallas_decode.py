"""Decode kernels (pallas_kernels/decode) against the `reference` ops.

Interpret mode on CPU: the TPU variant (default on CPU, and bounds-checked
under `tpu_checked`) and the GPU variant (`gpu_interpret`). Each case jits
the decode once with a traced `q_offset` and runs it at several offsets.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import masks
from attn.pallas import decode as pd
from pallas_kernels.decode import common
from tests import pallas_harness as ph

SL_RELEASED = dict(sw_index=1, num_spans=3, search_power=0.55, span_power=0.55,
                   backward_factor=3.0, forward_factor=1.0)


def _inputs(key, *, b, lq, lk, hq, hk, d, dtype):
  ks = jax.random.split(key, 5)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)  # noqa: E731
  return (n(ks[0], (b, lq, hq, d)), n(ks[1], (b, lk, hk, d)), n(ks[2], (b, lk, hk, d)),
          n(ks[3], (b, lq, hq, d)), n(ks[4], (b, lk, hk, d)))


def _poison(x, last):
  """Rows past `last` (the last query position) set to NaN: cache garbage."""
  rows = jnp.arange(x.shape[1])[None, :, None, None]
  return jnp.where(rows > last, jnp.nan, x)


def _clean(x, last):
  rows = jnp.arange(x.shape[1])[None, :, None, None]
  return jnp.where(rows > last, 0, x)


def _tol(dtype):
  return dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- superlinear

SL_CASES = [
    # (id, lq, lk, hq, hk, d, dtype, config kwargs, offsets, variant)
    ("mha_f32_d40_default", 1, 211, 2, 2, 40, jnp.float32, {}, (62, 63, 210), None),
    ("gqa_bf16_16q_released", 16, 150, 8, 2, 16, jnp.bfloat16, SL_RELEASED, (0, 134),
     "gpu_interpret"),
    ("gqa_f32_d128_k5_sw0", 1, 120, 4, 1, 128, jnp.float32, dict(sw_index=0, num_spans=5),
     (5, 119), None),
    ("mha_f32_k1_checked", 3, 64, 1, 1, 16, jnp.float32, dict(sw_index=2, num_spans=1),
     (10, 61), "tpu_checked"),
    ("gqa_f32_p055_k2_gpu", 2, 97, 4, 1, 8, jnp.float32,
     dict(sw_index=3, num_spans=2, search_power=0.55, span_power=0.5, backward_factor=2.0),
     (20, 95), "gpu_interpret"),
]


@pytest.mark.parametrize("case", SL_CASES, ids=[c[0] for c in SL_CASES])
def test_superlinear_decode_matches_reference(case):
  _check_superlinear(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", SL_CASES, ids=[c[0] for c in SL_CASES])
def test_superlinear_decode_compiled_gpu(case):
  _check_superlinear(*case[:-1], "gpu")


def _check_superlinear(_, lq, lk, hq, hk, d, dtype, cfg_kw, offsets, variant):
  config = attn.SuperlinearConfig(**cfg_kw)
  q, k, v, qs, ks = _inputs(jax.random.key(lk), b=2, lq=lq, lk=lk, hq=hq, hk=hk, d=d,
                            dtype=dtype)
  scale = d ** -0.5
  run = jax.jit(functools.partial(pd.superlinear_attention, config=config, scale=scale,
                                  variant=variant))
  for off in offsets:
    out, anchors, gates = run(q, k, v, qs, ks, jnp.int32(off))
    ref = attn.superlinear_attention_with_anchors(
        q, k, v, qs, ks, config=config, q_offset=off, implementation="reference")
    chex.assert_trees_all_equal(anchors, ref.anchors)
    chex.assert_trees_all_close(gates, ref.gates, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.out.astype(jnp.float32),
                                **_tol(dtype))
    chex.assert_type(out, dtype)


@pytest.mark.parametrize("variant", [None, "gpu_interpret"])
def test_superlinear_decode_ignores_nan_garbage_past_the_cache(variant):
  lq, lk, off = 2, 100, 70
  config = attn.SuperlinearConfig(sw_index=1, num_spans=2)
  q, k, v, qs, ks = _inputs(jax.random.key(7), b=1, lq=lq, lk=lk, hq=4, hk=2, d=16,
                            dtype=jnp.float32)
  last = off + lq - 1
  out, anchors, gates = pd.superlinear_attention(
      q, _poison(k, last), _poison(v, last), qs, _poison(ks, last), off, config=config,
      scale=0.25, variant=variant)
  ref = attn.superlinear_attention_with_anchors(
      q, _clean(k, last), _clean(v, last), qs, _clean(ks, last), config=config,
      scale=0.25, q_offset=off, implementation="reference")
  chex.assert_trees_all_equal(anchors, ref.anchors)
  chex.assert_trees_all_close(gates, ref.gates, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(out, ref.out, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------- PPA

PPA_CASES = [(p, w) for p in (0.0, 0.3, 0.5, 0.75, 1.0) for w in (1, 64)]


@pytest.mark.parametrize("p,window", PPA_CASES)
def test_ppa_decode_matches_reference(p, window):
  _check_ppa(p, window, None)


@pytest.mark.gpu
@pytest.mark.parametrize("p,window", PPA_CASES)
def test_ppa_decode_compiled_gpu(p, window):
  _check_ppa(p, window, "gpu")


def _check_ppa(p, window, variant):
  lq = 1 if window == 1 else 4
  hq, hk = (4, 1) if window == 1 else (2, 2)
  q, k, v, _, _ = _inputs(jax.random.key(3), b=1, lq=lq, lk=131, hq=hq, hk=hk, d=8,
                          dtype=jnp.float32)
  run = jax.jit(functools.partial(pd.ppa_attention, p=p, window=window, scale=0.3,
                                  variant=variant))
  for off in (0, 70, 131 - lq):
    ref = attn.ppa_attention(q, k, v, p=p, window=window, scale=0.3, q_offset=off,
                             implementation="reference")
    chex.assert_trees_all_close(run(q, k, v, jnp.int32(off)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpu_interpret", "tpu_checked"])
def test_ppa_decode_bf16_16_queries_and_nan_garbage(variant):
  lq, lk, off, p, window = 16, 90, 50, 0.5, 5
  q, k, v, _, _ = _inputs(jax.random.key(5), b=1, lq=lq, lk=lk, hq=4, hk=1, d=16,
                          dtype=jnp.bfloat16)
  last = off + lq - 1
  out = pd.ppa_attention(q, _poison(k, last), _poison(v, last), off, p=p, window=window,
                      scale=0.25, variant=variant)
  ref = attn.ppa_attention(q, _clean(k, last), _clean(v, last), p=p, window=window,
                           scale=0.25, q_offset=off, implementation="reference")
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32),
                              atol=2e-2, rtol=2e-2)


# ------------------------------------------------------- split (flash-decoding)


@pytest.mark.parametrize("variant", [None, "gpu_interpret"])
def test_split_decode_matches_reference(variant):
  """Forced split counts (more splits than the rule picks at this size):
  per-split states and top-k lists merge to the reference's numbers."""
  config = attn.SuperlinearConfig(sw_index=1, num_spans=3)
  lq, lk = 3, 211
  q, k, v, qs, ks = _inputs(jax.random.key(21), b=1, lq=lq, lk=lk, hq=4, hk=2, d=16,
                            dtype=jnp.float32)
  run = jax.jit(functools.partial(pd.superlinear_attention, config=config, scale=0.25,
                                  variant=variant, num_splits=3))
  for off in (60, lk - lq):
    out, anchors, gates = run(q, k, v, qs, ks, jnp.int32(off))
    ref = attn.superlinear_attention_with_anchors(
        q, k, v, qs, ks, config=config, scale=0.25, q_offset=off,
        implementation="reference")
    chex.assert_trees_all_equal(anchors, ref.anchors)
    chex.assert_trees_all_close(gates, ref.gates, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out, ref.out, atol=1e-5, rtol=1e-5)
  lq = 2
  q, k, v, _, _ = _inputs(jax.random.key(22), b=1, lq=lq, lk=lk, hq=2, hk=1, d=8,
                          dtype=jnp.float32)
  run = jax.jit(functools.partial(pd.ppa_attention, p=0.5, window=140, scale=0.3,
                                  variant=variant, num_splits=3))
  for off in (40, lk - lq):
    ref = attn.ppa_attention(q, k, v, p=0.5, window=140, scale=0.3, q_offset=off,
                             implementation="reference")
    chex.assert_trees_all_close(run(q, k, v, jnp.int32(off)), ref, atol=1e-5, rtol=1e-5)


def _plain_search(f_desc, qs, ks, q_offset, lq, num):
  """Oracle: every stripe far to near, scored by a plain dot, sorted stably
  by descending score (ties keep the farther stripe), top `num`."""
  b, hk, r, _ = qs.shape
  scores = np.full((b, hk, r, num), -np.inf, np.float32)
  anchors = np.full((b, hk, r, num), -1, np.int32)
  for bi in range(b):
    for h in range(hk):
      for row in range(r):
        cand = []
        for f in f_desc.tolist():
          a = q_offset + row % lq + 1 - f
          if a >= 0:
            cand.append((float(np.dot(qs[bi, h, row], ks[bi, a, h])), a))
        cand = sorted(cand, key=lambda c: -c[0])[:num]
        for slot, (sc, a) in enumerate(cand):
          scores[bi, h, row, slot], anchors[bi, h, row, slot] = sc, a
  return scores, anchors


@pytest.mark.parametrize("variant", [None, "gpu_interpret"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_split_search_ties_keep_the_farther_stripe(variant, num_splits):
  """Scores in {-1, 0, 1}: ties everywhere, inside and across splits; the
  merged top-k equals a plain stable sort over the far-to-near stripes."""
  from pallas_kernels.decode import ops as dec_ops
  lk, lq, num = 160, 2, 3
  config = attn.SuperlinearConfig(sw_index=1, num_spans=num)
  f_desc = np.asarray(masks.superlinear_stripe_table(lk, config))
  rng = np.random.default_rng(4)
  ks = rng.integers(-1, 2, size=(1, lk, 2, 16)).astype(np.float32)
  qs = np.zeros((1, 2, 2 * lq, 16), np.float32)
  qs[..., 0] = 1.0                                        # score = ks[..., 0]
  for off in (30, lk - lq):
    first = common.first_stripe(jnp.asarray(f_desc), off, lq=lq)
    s, a = dec_ops.search(off, first, jnp.asarray(f_desc), jnp.asarray(qs),
                          jnp.asarray(ks), lq=lq, num=num, variant=variant,
                          num_splits=num_splits)
    want_s, want_a = _plain_search(f_desc, qs, ks, off, lq, num)
    chex.assert_trees_all_equal(a, jnp.asarray(want_a))
    chex.assert_trees_all_equal(s, jnp.asarray(want_s))


def test_merge_topk_keeps_the_lower_position_among_ties():
  rng = np.random.default_rng(1)
  scores = rng.integers(-2, 3, size=(32, 12)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.2] = -np.inf
  pos = np.broadcast_to(np.arange(12, dtype=np.int32), scores.shape)
  s, a = common.merge_topk(jnp.asarray(scores), jnp.asarray(pos), 4)
  for row in range(32):
    want = sorted(range(12), key=lambda j: -scores[row, j])[:4]   # stable
    np.testing.assert_array_equal(np.asarray(a[row]), want)
    np.testing.assert_array_equal(np.asarray(s[row]), scores[row, want])


@pytest.mark.parametrize("kv_len", [1 << 18, 1 << 20])
def test_decode_grids_fill_the_device(kv_len):
  """Batch 1, 8 kv heads: the search (superlinear) and far-offset (PPA p =
  0.5) grids launch >= 132 programs, and every split gets stripes."""
  programs = 8
  tables = [masks.superlinear_stripe_table(kv_len, cfg).size
            for cfg in (attn.SuperlinearConfig(),
                        attn.SuperlinearConfig(**{**SL_RELEASED, "sw_index": 65}))]
  tables.append(pd.ppa_tables(kv_len, p=0.5, window=64)[1].size)
  for n in tables:
    splits = common.stripe_splits(n, programs=programs)
    assert programs * splits >= common.TARGET_PROGRAMS
    sizes = [hi - lo for lo, hi in (common.split_range(s, splits, n) for s in range(splits))]
    assert sum(sizes) == n and min(sizes) >= common.MIN_STRIPES_PER_SPLIT


# -------------------------------------------------------- structure and cost


def test_topk_insert_matches_lax_top_k_with_ties():
  """Running insertion over a far-to-near stream == lax.top_k (lower index
  wins ties), including -inf entries (slots stay empty)."""
  rng = np.random.default_rng(0)
  scores = rng.integers(-3, 4, size=(64, 12)).astype(np.float32)   # many ties
  scores[rng.random(scores.shape) < 0.2] = -np.inf
  for num in (1, 2, 3, 5):
    s = tuple(jnp.full((64,), -jnp.inf) for _ in range(num))
    a = tuple(jnp.full((64,), -1, jnp.int32) for _ in range(num))
    for j in range(scores.shape[1]):
      s, a = common.topk_insert(s, a, jnp.asarray(scores[:, j]), jnp.full((64,), j, jnp.int32))
    top, idx = jax.lax.top_k(jnp.asarray(scores), num)
    idx = jnp.where(jnp.isfinite(top), idx, -1)
    chex.assert_trees_all_equal(jnp.stack(s, 1), top)
    chex.assert_trees_all_equal(jnp.stack(a, 1), idx.astype(jnp.int32))


def _superlinear_rows(kv_len, config, t):
  """Cache rows one decode token at position t - 1 reads (per batch row and
  kv head, TPU windows), from the tables the kernels consume, with every
  selected span at its longest."""
  from pallas_kernels.decode import tpu
  f_desc, spans = pd.superlinear_tables(kv_len, config)
  q_offset = t - 1
  first = int(common.first_stripe(f_desc, q_offset, lq=1))
  _, _, search_buf = tpu.dma_window(1, jnp.bfloat16, kv_len, aligned=False)
  n, _, n_buf = tpu.dma_window(tpu.BLOCK_K, jnp.bfloat16, kv_len)
  lo, hi = common.band_bounds(q_offset, lq=1, width=config.window)
  band = int(common.num_tiles(lo, hi, n)) * n_buf
  span_len = int(spans[t].sum()) + 1
  per_span = int(common.num_tiles(0, span_len, n)) * n_buf
  return (f_desc.size - first) * search_buf, band, config.num_spans * per_span


def test_superlinear_decode_reads_sqrt_t_rows():
  """Search ~t^p rows, spans ~t^sigma, window W: O(sqrt(t)), not O(t)."""
  from pallas_kernels.decode import tpu
  kv_len = 1 << 20
  n, _, n_buf = tpu.dma_window(tpu.BLOCK_K, jnp.bfloat16, kv_len)
  _, _, search_buf = tpu.dma_window(1, jnp.bfloat16, kv_len, aligned=False)
  for cfg in (attn.SuperlinearConfig(), attn.SuperlinearConfig(**{**SL_RELEASED,
                                                                 "sw_index": 65})):
    grow = cfg.backward_factor + cfg.forward_factor
    for t in (4096, 65536, 1 << 20):
      search, band, span = _superlinear_rows(kv_len, cfg, t)
      assert search <= (t ** cfg.search_power + 1) * search_buf
      assert span <= cfg.num_spans * (-(-int(grow * t ** cfg.span_power + 3) // n) + 1) * n_buf
      assert band <= (-(-cfg.window // n) + 1) * n_buf
    total = sum(_superlinear_rows(kv_len, cfg, 1 << 20))
    assert total < (1 << 20) / 20, total                       # far from reading it all
  # Rows grow like sqrt(t): 16x the context costs ~4x the rows.
  cfg = attn.SuperlinearConfig()
  small, big = (sum(_superlinear_rows(kv_len, cfg, t)) for t in (1 << 16, 1 << 20))
  assert 3 * small < big < 5 * small


def test_ppa_decode_reads_w_plus_t_to_the_p_rows():
  """Band (the window plus the dense run right after it) + one row per kept
  far offset `<= t - 1`: about w + t^p rows per token."""
  kv_len = 1 << 20
  for p in (0.5, 0.75):
    width, far = pd.ppa_tables(kv_len, p=p, window=64)
    assert 64 <= width <= 80
    assert far.min() > width and np.all(np.diff(far) > 0)
    for t in (4096, 1 << 20):
      count = int(common.num_near_offsets(far, t - 1, lq=1))
      power = int(np.floor((t - 1) ** p + 1e-9))    # kept power offsets in [1, t-1]
      assert power - width <= count <= power
      assert width + count < 80 + (t - 1) ** p
    assert width + count < (1 << 20) / 25


# ----------------------------------------------------------------- lowering


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_kernels_lower(platform):
  b, lk, hq, hk, d = 1, 256, 8, 2, 128
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
  cfg = attn.SuperlinearConfig()

  def sl(q, k, v, qs, off):
    return pd.superlinear_attention(q, k, v, qs, k, off, config=cfg, scale=0.1)

  def ppa(q, k, v, off):
    return pd.ppa_attention(q, k, v, off, p=0.5, window=16, scale=0.1)

  text = ph.export_text(sl, platform, spec(b, 1, hq, d), spec(b, lk, hk, d),
                        spec(b, lk, hk, d), spec(b, 1, hq, d), spec(dt=jnp.int32))
  ph.assert_kernel_in(text, platform, at_least=3)              # search, spans, window
  text = ph.export_text(ppa, platform, spec(b, 16, hq, 40, dt=jnp.float32),
                        spec(b, lk, hk, 40, dt=jnp.float32), spec(b, lk, hk, 40, dt=jnp.float32),
                        spec(dt=jnp.int32))
  ph.assert_kernel_in(text, platform, at_least=2)              # band, stripes


# ------------------------------------------------------- gradients and errors


@pytest.mark.parametrize("max_gathered", [None, 1])
def test_decode_gradients_match_the_reference(max_gathered, monkeypatch):
  """Differentiating a decode op gives correct gradients (superlinear, PPA:
  VJPs of plain gathers at the forward's anchors / kept offsets; PPA with
  `max_gathered=1`: the xla path's VJP), checked against the reference op."""
  if max_gathered is not None:
    monkeypatch.setattr(pd, "MAX_GATHERED_OFFSETS", max_gathered)
  q, k, v, qs, ks = _inputs(jax.random.key(11), b=1, lq=2, lk=40, hq=2, hk=1, d=8,
                            dtype=jnp.float32)
  cfg = attn.SuperlinearConfig(sw_index=1)
  off = 30
  ph.vjp_check(
      jax.jit(lambda *a: pd.superlinear_attention(*a, off, config=cfg, scale=0.3)[0]),
      lambda *a: attn.superlinear_attention(*a, config=cfg, scale=0.3, q_offset=off,
                                            implementation="reference"),
      (q, k, v, qs, ks), jax.random.key(1), argnums=(0, 1, 2, 3, 4), atol=1e-5, rtol=1e-4)
  ph.vjp_check(
      jax.jit(lambda *a: pd.ppa_attention(*a, off, p=0.5, window=3, scale=0.3)),
      lambda *a: attn.ppa_attention(*a, p=0.5, window=3, scale=0.3, q_offset=off,
                                    implementation="reference"),
      (q, k, v), jax.random.key(2), argnums=(0, 1, 2), atol=1e-5, rtol=1e-4)


def test_too_many_queries_is_rejected():
  q = jnp.zeros((1, pd.MAX_QUERIES + 1, 1, 8))
  k = jnp.zeros((1, 40, 1, 8))
  with pytest.raises(ValueError, match="q_len"):
    pd.ppa_attention(q, k, k, 0, p=0.5, window=4, scale=1.0)


# ---------------------------------------------------------------- generation


@pytest.mark.slow  # ~15 s CPU: two models' prefill + step compiled, kernels interpreted
def test_generate_with_pallas_decode_equals_xla():
  """A PPA + superlinear model generates the same tokens with the decode
  kernels as with the xla path (sharpened attention: position-sensitive)."""
  from tests.test_generate import prompt_tokens, sharpen, tiny_model
  from train.decode import generate
  model = sharpen(tiny_model(tie_embeddings=False, layer_pattern=("ppa", "superlinear"),
                             window=4, ppa_p=0.5, search_key="accumulated",
                             superlinear=attn.SuperlinearConfig(sw_index=1)))
  prompt = prompt_tokens(4)
  kw = dict(max_new_tokens=10, rng=jax.random.key(0), max_len=20)
  xla_out = generate(model, prompt, implementation="xla", **kw)
  pallas_out = generate(model, prompt, implementation="pallas", **kw)
  chex.assert_trees_all_equal(pallas_out, xla_out)
