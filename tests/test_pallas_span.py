"""Span attention kernels (`pallas_kernels.span`) against dense oracles.

Interpret mode on CPU (the TPU variant, the GPU variant, and the bounds-checked
TPU interpreter), values and VJPs with random cotangents; lowering of forward
and backward for tpu and cuda; a property test that the kernels' own tables
visit every key of every candidate span (random context access holds in the
kernel). Shapes are tiny: interpret-mode compiles dominate the cost.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attn
from attn import masks, reference
from pallas_kernels.span import blocks, interval_attention, span_attention
from tests import pallas_harness as ph

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5),
       jnp.bfloat16: dict(atol=3e-2, rtol=3e-2, grad_atol=6e-2, grad_rtol=6e-2),
       jnp.float16: dict(atol=4e-3, rtol=4e-3, grad_atol=1e-2, grad_rtol=1e-2)}


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ------------------------------------------------------------------ oracles


def interval_oracle(q, k, v, lo, hi, scale):
  """Dense masked softmax: row r sees keys [lo_r, hi_r]. `(o, lse)` float32."""
  s = jnp.einsum("bhrd,bhkd->bhrk", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision="highest") * scale
  kpos = jnp.arange(k.shape[2])
  m = (kpos >= lo[..., None]) & (kpos <= hi[..., None])
  s = jnp.where(m, s, -jnp.inf)
  mx = jnp.max(s, -1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.where(m, jnp.exp(s - mx), 0.0)
  l = e.sum(-1, keepdims=True)
  o = jnp.einsum("bhrk,bhkd->bhrd", e / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32),
                 precision="highest")
  lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + mx[..., 0],
                  -jnp.inf)
  return o, lse


def span_oracle(q, k, v, anchors, gates, *, config, q_offset, scale):
  """`sum_k g_k softmax(q . (span_k | window))`, spans from plain numpy."""
  b, lq, hq, _ = q.shape
  lk, hk = k.shape[1], k.shape[2]
  w = config.window
  pos = q_offset + np.arange(lq)
  table = masks.superlinear_span_table(lk, config)
  a = np.asarray(anchors)                                            # [B, Lq, Hq, K]
  back = table[pos + 1, 0][None, :, None, None]
  fwd = table[pos + 1, 1][None, :, None, None]
  start = np.maximum(a - back, 0)
  end = np.where(a >= 0, np.minimum(a + fwd, pos[None, :, None, None] - w), -1)
  kpos = np.arange(lk)
  d = pos[:, None] - kpos[None, :]
  window = (d >= 0) & (d < w)                                        # [Lq, Lk]
  out = 0.0
  for slot in range(a.shape[-1]):
    span = ((kpos >= start[..., slot, None]) & (kpos <= end[..., slot, None]))  # [B,Lq,Hq,Lk]
    mask = window[None, :, None, :] | span
    mask = mask.reshape(b, lq, hk, hq // hk, lk).transpose(0, 2, 3, 1, 4)
    o, _ = reference.masked_attention(q, k, v, jnp.asarray(mask), scale=scale)
    out = out + gates[..., slot, None] * o
  return out.astype(q.dtype)


# ------------------------------------------------------- interval attention


@pytest.mark.parametrize("variant,dtype", [("tpu_interpret", jnp.float32),
                                           ("gpu_interpret", jnp.float16),
                                           ("tpu_checked", jnp.bfloat16)])
def test_interval_attention_matches_dense(variant, dtype):
  b, h, r, lk, d = 1, 2, 40, 50, 24
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v = (_normal(ks[i], s, dtype) for i, s in
             enumerate([(b, h, r, d), (b, h, lk, d), (b, h, lk, d)]))
  lo = jax.random.randint(ks[3], (b, h, r), 0, lk)
  hi = jnp.minimum(lo + jax.random.randint(ks[4], (b, h, r), -3, 20), lk - 1)  # some empty
  ct = jax.random.normal(ks[5], (b, h, r), jnp.float32)
  scale = 0.3
  # Both outputs matter (span attention differentiates through lse).
  fn = jax.jit(lambda q, k, v: _mix(interval_attention(
      q, k, v, lo, hi, scale=scale, block_q=16, block_k=16, variant=variant), ct))
  ref = lambda q, k, v: _mix(interval_oracle(q, k, v, lo, hi, scale), ct)  # noqa: E731
  tol = TOL[dtype]
  ph.vjp_check(fn, ref, (q, k, v), ks[5], argnums=(0, 1, 2), **tol)
  o, lse = interval_attention(q, k, v, lo, hi, scale=scale, block_q=16, block_k=16,
                              variant=variant)
  empty = np.asarray(hi < lo)
  assert empty.any()
  np.testing.assert_array_equal(np.asarray(o)[empty], 0)
  assert np.all(np.asarray(lse)[empty] == -np.inf)


def _mix(o_lse, ct):
  o, lse = o_lse
  return o + jnp.where(jnp.isfinite(lse), lse * ct, 0.0)[..., None]


# ------------------------------------------------------------ span attention


def _inputs(key, *, b, lq, lk, hq, hk, d, ds, dtype):
  ks = jax.random.split(key, 5)
  return (_normal(ks[0], (b, lq, hq, d), dtype), _normal(ks[1], (b, lk, hk, d), dtype),
          _normal(ks[2], (b, lk, hk, d), dtype), _normal(ks[3], (b, lq, hq, ds), dtype),
          _normal(ks[4], (b, lk, hk, ds), dtype))


SPAN_CASES = [
    # (config, dtype, lq, lk, hq, hk, d, variant)
    (attn.SuperlinearConfig(sw_index=2, num_spans=2), jnp.float32, 45, 45, 4, 1, 16,
     "tpu_interpret"),
    (attn.SuperlinearConfig(sw_index=1, num_spans=3, search_power=0.55, span_power=0.55,
                            backward_factor=3), jnp.bfloat16, 37, 37, 2, 2, 40,
     "gpu_interpret"),
]


@pytest.mark.parametrize("config,dtype,lq,lk,hq,hk,d,variant", SPAN_CASES)
def test_span_kernel_given_reference_anchors(config, dtype, lq, lk, hq, hk, d, variant):
  """The kernel itself: anchors and gates from the reference op; grads to q, k,
  v and the gates against the dense oracle."""
  q, k, v, qs, kss = _inputs(jax.random.PRNGKey(1), b=1, lq=lq, lk=lk, hq=hq, hk=hk, d=d,
                             ds=8, dtype=dtype)
  res = attn.superlinear_attention_with_anchors(q, k, v, qs, kss, config=config,
                                                implementation="reference")
  anchors, gates = res.anchors, res.gates
  assert (np.asarray(anchors) < 0).any()       # early queries have invalid slots
  scale = d ** -0.5
  tbl = jnp.asarray(masks.superlinear_span_table(lk, config))
  fn = jax.jit(lambda q, k, v, g: span_attention(
      q, k, v, anchors, g, span_table=tbl, window=config.window, scale=scale,
      block_q=16, block_k=16, variant=variant))
  ref = lambda q, k, v, g: span_oracle(q, k, v, anchors, g, config=config,  # noqa: E731
                                       q_offset=lk - lq, scale=scale)
  ph.vjp_check(fn, ref, (q, k, v, gates), jax.random.PRNGKey(2), argnums=(0, 1, 2, 3),
               **TOL[dtype])


E2E_CASES = [
    # (config, dtype, lq, lk, q_offset, hq, hk, d)
    # GQA 4:1, odd length, two spans, p = 1/2.
    (attn.SuperlinearConfig(sw_index=2, num_spans=2), jnp.float32, 45, 45, None, 4, 1, 16),
    # MHA, bf16, three spans, p = 0.55 (non-integer 1/p).
    (attn.SuperlinearConfig(sw_index=1, num_spans=3, search_power=0.55, span_power=0.55,
                            backward_factor=3), jnp.bfloat16, 37, 37, None, 2, 2, 40),
    # No window (sw_index 0), five spans, head_dim 128.
    (attn.SuperlinearConfig(sw_index=0, num_spans=5), jnp.float32, 33, 33, None, 2, 2, 128),
    # Chunked prefill: 20 queries at q_offset 24 of a 53-key cache; one span.
    (attn.SuperlinearConfig(sw_index=3, num_spans=1, search_power=0.55, span_power=0.55,
                            backward_factor=3), jnp.float32, 20, 53, 24, 4, 2, 16),
]


@pytest.mark.parametrize("config,dtype,lq,lk,q_offset,hq,hk,d", E2E_CASES)
def test_superlinear_pallas_matches_reference(config, dtype, lq, lk, q_offset, hq, hk, d):
  """`implementation="pallas"` end to end: output, anchors, gates, and grads
  to q, k, v, q_search, k_search against the reference op."""
  q, k, v, qs, kss = _inputs(jax.random.PRNGKey(3), b=1, lq=lq, lk=lk, hq=hq, hk=hk, d=d,
                             ds=8, dtype=dtype)
  op = lambda impl: lambda q, k, v, qs, kss: attn.superlinear_attention_with_anchors(  # noqa: E731
      q, k, v, qs, kss, config=config, q_offset=q_offset, implementation=impl)
  got, want = op("pallas")(q, k, v, qs, kss), op("reference")(q, k, v, qs, kss)
  np.testing.assert_array_equal(got.anchors, want.anchors)
  chex.assert_trees_all_close(got.gates, want.gates, atol=1e-6, rtol=1e-6)
  out = lambda impl: lambda *x: op(impl)(*x).out  # noqa: E731
  ph.vjp_check(out("pallas"), out("reference"), (q, k, v, qs, kss), jax.random.PRNGKey(4),
               argnums=(0, 1, 2, 3, 4), **TOL[dtype])


def test_nan_junk_beyond_cache_end_never_reaches_outputs_or_grads():
  """Chunked prefill into a cache whose tail holds NaN: outputs equal those of
  a clean cache, and every gradient is finite, exactly 0 on the junk rows."""
  config = attn.SuperlinearConfig(sw_index=2, num_spans=2)
  lq, lk, q_offset = 16, 48, 20
  q, k, v, qs, kss = _inputs(jax.random.PRNGKey(5), b=1, lq=lq, lk=lk, hq=2, hk=1, d=16,
                             ds=8, dtype=jnp.float32)
  junk = (jnp.arange(lk) >= q_offset + lq)[None, :, None, None]
  dirty = lambda x: jnp.where(junk, jnp.nan, x)  # noqa: E731
  res = attn.superlinear_attention_with_anchors(q, k, v, qs, kss, config=config,
                                                q_offset=q_offset, implementation="reference")
  tbl = jnp.asarray(masks.superlinear_span_table(lk, config))
  fn = jax.jit(lambda q, k, v, g: span_attention(
      q, k, v, res.anchors, g, span_table=tbl, window=config.window, scale=0.25,
      q_offset=q_offset, block_q=16, block_k=16))
  out, pull = jax.vjp(fn, q, dirty(k), dirty(v), res.gates)
  clean = fn(q, k, v, res.gates)
  chex.assert_trees_all_close(out, clean, atol=1e-6, rtol=1e-6)
  grads = pull(jax.random.normal(jax.random.PRNGKey(6), out.shape))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  for g in grads[1:3]:
    np.testing.assert_array_equal(np.asarray(g)[:, q_offset + lq:], 0)


# ------------------------------------------------------------------ lowering


def _span_specs(dtype, b=1, l=300, hq=4, hk=2, d=40, num=3):
  f = lambda s, t: jax.ShapeDtypeStruct(s, t)  # noqa: E731
  return [f((b, l, hq, d), dtype), f((b, l, hk, d), dtype), f((b, l, hk, d), dtype),
          f((b, l, hq, num), jnp.int32), f((b, l, hq, num), jnp.float32)]


@pytest.mark.parametrize("target", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(target, dtype):
  """Window + span forward (2 kernels) and their backward (dq and dk/dv for
  each: 4 more) export with the platform's Pallas custom calls."""
  config = attn.SuperlinearConfig(sw_index=3, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3)
  tbl = jnp.asarray(masks.superlinear_span_table(300, config))
  f = lambda q, k, v, a, g: span_attention(q, k, v, a, g, span_table=tbl,  # noqa: E731
                                           window=config.window, scale=0.1)
  grad = lambda q, k, v, a, g: jax.grad(  # noqa: E731
      lambda q, k, v, g: f(q, k, v, a, g).astype(jnp.float32).sum(),
      argnums=(0, 1, 2, 3))(q, k, v, g)
  ph.assert_kernel_in(ph.export_text(f, target, *_span_specs(dtype)), target, at_least=2)
  ph.assert_kernel_in(ph.export_text(grad, target, *_span_specs(dtype)), target, at_least=6)


# ------------------------------------------------------- coverage property


@settings(max_examples=12, deadline=None)
@given(seq_len=st.integers(1, 400),
       case=st.sampled_from([(0, 0.5, 0.5, 2.0, 1.0), (7, 0.5, 0.5, 2.0, 1.0),
                             (3, 0.55, 0.55, 3.0, 1.0), (0, 0.6, 0.45, 2.0, 0.0),
                             (2, 0.5, 0.6, 1.5, 2.0)]),
       block_q=st.sampled_from([16, 32, 128]), block_k=st.sampled_from([16, 64]),
       chunk=st.integers(0, 3))
def test_kernel_tables_visit_every_key(seq_len, case, block_q, block_k, chunk):
  """For every query and every candidate anchor (all stripes), the span and
  window bounds the kernels compute, and the key blocks their tables make
  them visit (forward/dq: per row tile; dk/dv: per key block), cover every
  earlier key: random context access holds in the kernel."""
  s, p, sigma, bb, bf = case
  config = attn.SuperlinearConfig(sw_index=s, search_power=p, span_power=sigma,
                                  backward_factor=bb, forward_factor=bf)
  q_offset = seq_len * chunk // 4                           # a prefill chunk
  pos = jnp.arange(q_offset, seq_len, dtype=jnp.int32)
  f = jnp.asarray(masks.superlinear_stripe_table(seq_len, config))
  anchors = pos[:, None] + 1 - f[None, :]
  anchors = jnp.where(anchors >= 0, anchors, -1)             # [Lq, S] all candidates
  table = jnp.asarray(masks.superlinear_span_table(seq_len, config))
  back, fwd = table[pos + 1, 0][:, None], table[pos + 1, 1][:, None]
  slo, shi = blocks.span_bounds(anchors, pos[:, None], back, fwd, config.window)
  wlo, whi = blocks.window_bounds(pos, config.window, seq_len)

  def visited(lo, hi):
    """Per row: keys its tile visits in the forward / dq kernels, and keys of
    its interval whose key block lists the row's tile (dk/dv kernel)."""
    lo, hi = lo.reshape(1, 1, -1), hi.reshape(1, 1, -1)
    perm = blocks.sort_rows_by_start(lo, hi)
    lo_s, hi_s = jnp.take_along_axis(lo, perm, -1), jnp.take_along_axis(hi, perm, -1)
    rp = blocks.round_up(lo.shape[-1], block_q)
    lo_p = jnp.pad(lo_s, ((0, 0), (0, 0), (0, rp - lo.shape[-1])))
    hi_p = jnp.pad(hi_s, ((0, 0), (0, 0), (0, rp - lo.shape[-1])), constant_values=-1)
    fwd_vis = np.asarray(blocks.visited_keys_mask(lo_p, hi_p, block_q, block_k, seq_len))
    nkb = blocks.round_up(seq_len, block_k) // block_k
    t0, cnt = blocks.key_block_tiles(*blocks.tile_bounds(lo_p, hi_p, block_q), nkb, block_k)
    tile = np.arange(rp) // block_q
    kb = np.arange(seq_len) // block_k
    t0, cnt = np.asarray(t0)[0, 0][kb], np.asarray(cnt)[0, 0][kb]
    dkv_vis = (tile[:, None] >= t0[None, :]) & (tile[:, None] < (t0 + cnt)[None, :])
    inv = np.argsort(np.asarray(perm)[0, 0])
    return fwd_vis[0, 0][inv], dkv_vis[inv]

  kpos = np.arange(seq_len)
  covered = np.zeros((pos.size, seq_len), bool)
  for lo, hi in ((wlo, whi), (slo, shi)):
    lo_n, hi_n = np.asarray(lo).reshape(-1), np.asarray(hi).reshape(-1)
    inside = (kpos >= lo_n[:, None]) & (kpos <= hi_n[:, None])       # [rows, Lk]
    fwd_vis, dkv_vis = visited(lo, hi)
    assert not (inside & ~fwd_vis).any(), "a tile does not visit all keys of its rows"
    assert not (inside & ~dkv_vis).any(), "a key block does not list a tile that needs it"
    covered |= inside.reshape(pos.size, -1, seq_len).any(axis=1)
  causal = kpos[None, :] <= np.asarray(pos)[:, None]
  np.testing.assert_array_equal(covered, causal)
