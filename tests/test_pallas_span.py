"""Span attention kernels (`pallas_kernels.span`) against dense oracles.

Interpret mode on CPU (the TPU variant, the GPU variant, and the bounds-checked
TPU interpreter), values and VJPs with random cotangents; lowering of forward
and backward for tpu and cuda; a property test that the kernels' own tables
visit every key of every candidate span (random context access holds in the
kernel). Shapes are tiny: interpret-mode compiles dominate the cost.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attn
from attn import masks, reference
from pallas_kernels import common as pk_common
from pallas_kernels.span import common as span_common
from pallas_kernels.span import interval_attention, span_attention
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


@pytest.mark.parametrize("variant,dtype,h,r,lk,block", [
    ("gpu_interpret", jnp.float16, 2, 40, 50, 16), ("tpu_checked", jnp.bfloat16, 2, 40, 50, 16),
    # float32 at the GPU's own default tiles (`span.gpu.default_blocks`: 32 x 16)
    ("gpu_interpret", jnp.float32, 2, 40, 50, None),
    # bfloat16 at the GPU defaults: forward 256 x 32 tiles (3 row tiles), backward 64 x 64
    ("gpu_interpret", jnp.bfloat16, 1, 600, 300, None),
    pytest.param("gpu", jnp.float16, 2, 40, 50, 16, marks=pytest.mark.gpu),
    pytest.param("gpu", jnp.bfloat16, 1, 600, 300, None, marks=pytest.mark.gpu),
    pytest.param("gpu", jnp.float32, 2, 40, 50, None, marks=pytest.mark.gpu),
    # compiled TPU: lane-dense vector blocks, the default tiles
    pytest.param("tpu", jnp.bfloat16, 2, 40, 50, None, marks=pytest.mark.tpu)])
def test_interval_attention_matches_dense(variant, dtype, h, r, lk, block):
  b, d = 1, 24
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v = (_normal(ks[i], s, dtype) for i, s in
             enumerate([(b, h, r, d), (b, h, lk, d), (b, h, lk, d)]))
  if block is None and dtype == jnp.bfloat16:
    from pallas_kernels.span import ops as span_ops
    assert span_ops.default_blocks("gpu", forward=True, dtype=dtype, head_dim=32) == (256, 32)
  lo = jax.random.randint(ks[3], (b, h, r), 0, lk)
  hi = jnp.minimum(lo + jax.random.randint(ks[4], (b, h, r), -3, 20), lk - 1)  # some empty
  ct = jax.random.normal(ks[5], (b, h, r), jnp.float32)
  scale = 0.3
  # Both outputs matter (span attention differentiates through lse).
  fn = jax.jit(lambda q, k, v: _mix(interval_attention(
      q, k, v, lo, hi, scale=scale, block_q=block, block_k=block, variant=variant), ct))
  ref = lambda q, k, v: _mix(interval_oracle(q, k, v, lo, hi, scale), ct)  # noqa: E731
  tol = TOL[dtype]
  ph.vjp_check(fn, ref, (q, k, v), ks[5], argnums=(0, 1, 2), **tol)
  o, lse = interval_attention(q, k, v, lo, hi, scale=scale, block_q=block, block_k=block,
                              variant=variant)
  empty = np.asarray(hi < lo)
  assert empty.any()
  np.testing.assert_array_equal(np.asarray(o)[empty], 0)
  assert np.all(np.asarray(lse)[empty] == -np.inf)


@pytest.mark.parametrize("variant,dtype,block", [
    ("gpu_interpret", jnp.float16, 16), ("tpu_checked", jnp.bfloat16, 16),
    # the GPU's bf16 defaults: forward 256-row tiles gather their rows by index
    ("gpu_interpret", jnp.bfloat16, None),
    pytest.param("gpu", jnp.bfloat16, None, marks=pytest.mark.gpu)])
def test_interval_attention_rows_by_index(variant, dtype, block):
  """`rows=(perm, inv)`: row r is q's row `perm[r] % Rq` of 3 permuted copies
  (span attention's pairs); the GPU kernels gather it by index. Values and
  VJPs (dq summed over the copies) against the oracle on rows copied by
  plain indexing."""
  # 3 x 230 rows: 3 forward tiles of 256 at the bf16 defaults; 3 x 40 with
  # 16-row tiles (the bounds-checked interpreter is slow per grid step).
  b, h, rq, lk, d, copies = 1, 2, 230 if block is None else 40, 90, 24, 3
  r = copies * rq
  ks = jax.random.split(jax.random.PRNGKey(5), 7)
  q = _normal(ks[0], (b, h, rq, d), dtype)
  k, v = (_normal(ks[i], (b, h, lk, d), dtype) for i in (1, 2))
  perm = np.stack([np.asarray(jax.random.permutation(ks[3 + i], r)) for i in range(h)])[None]
  inv = np.argsort(perm, axis=-1)
  lo = jax.random.randint(ks[5], (b, h, r), 0, lk)
  hi = jnp.minimum(lo + jax.random.randint(ks[6], (b, h, r), -3, 30), lk - 1)
  ct = jax.random.normal(ks[6], (b, h, r), jnp.float32)
  src = perm % rq
  fn = jax.jit(lambda q, k, v: _mix(interval_attention(
      q, k, v, lo, hi, scale=0.3, block_q=block, block_k=block, variant=variant,
      rows=(perm, inv)), ct))

  def ref(q, k, v):   # the copies made by plain indexing, then the dense oracle
    rows = jnp.stack([q[0, i][src[0, i]] for i in range(h)])[None]
    return _mix(interval_oracle(rows, k, v, lo, hi, 0.3), ct)

  ph.vjp_check(fn, ref, (q, k, v), ks[4], argnums=(0, 1, 2), **TOL[dtype])


@pytest.mark.parametrize("variant,dtype,h,hk,rows_by_index", [
    ("gpu_interpret", jnp.float16, 4, 2, False),
    ("gpu_interpret", jnp.float16, 4, 1, True),
    # 8 row heads: the TPU dk/dv kernel DMAs an aligned group of 8 heads'
    # vectors; 16: the second group starts at head 8; 12: all 12 heads' vectors
    ("tpu_checked", jnp.bfloat16, 8, 2, False),
    ("tpu_checked", jnp.bfloat16, 16, 4, False),
    ("tpu_interpret", jnp.bfloat16, 12, 3, False),
    ("tpu_interpret", jnp.bfloat16, 4, 2, True),
    pytest.param("gpu", jnp.float16, 4, 2, True, marks=pytest.mark.gpu),
    pytest.param("tpu", jnp.bfloat16, 8, 2, False, marks=pytest.mark.tpu)])
def test_interval_attention_row_heads_share_kv_heads(variant, dtype, h, hk, rows_by_index):
  """`H` row heads over `Hk < H` kv heads: row head `j` attends kv head
  `j // (H / Hk)`, and dk / dv sum over a kv head's row heads. Values and
  VJPs against the dense oracle on k / v repeated per row head."""
  b, rq, lk, d, copies = 1, 32, 48, 24, 2 if rows_by_index else 1
  r = copies * rq
  ks = jax.random.split(jax.random.PRNGKey(11), 8)
  q = _normal(ks[0], (b, h, rq, d), dtype)
  k, v = (_normal(ks[i], (b, hk, lk, d), dtype) for i in (1, 2))
  lo = jax.random.randint(ks[3], (b, h, r), 0, lk)
  hi = jnp.minimum(lo + jax.random.randint(ks[4], (b, h, r), -3, 20), lk - 1)
  ct = jax.random.normal(ks[5], (b, h, r), jnp.float32)
  rows = None
  if rows_by_index:
    perm = np.stack([np.asarray(jax.random.permutation(jax.random.fold_in(ks[6], i), r))
                     for i in range(h)])[None]
    rows = (perm, np.argsort(perm, axis=-1))
  block = None if variant == "tpu" else 16    # compiled TPU: lane-dense vector blocks
  fn = jax.jit(lambda q, k, v: _mix(interval_attention(
      q, k, v, lo, hi, scale=0.3, block_q=block, block_k=block, variant=variant,
      rows=rows), ct))

  def ref(q, k, v):
    if rows is not None:   # the copies made by plain indexing
      q = jnp.stack([q[0, i][rows[0][0, i] % rq] for i in range(h)])[None]
    rep = lambda x: jnp.repeat(x, h // hk, axis=1)  # noqa: E731
    return _mix(interval_oracle(q, rep(k), rep(v), lo, hi, 0.3), ct)

  ph.vjp_check(fn, ref, (q, k, v), ks[7], argnums=(0, 1, 2), **TOL[dtype])


def test_interval_attention_rejects_kv_heads_not_dividing_row_heads():
  q = jnp.zeros((1, 4, 16, 8))
  lo = hi = jnp.zeros((1, 4, 16), jnp.int32)
  for kv in (jnp.zeros((1, 3, 16, 8)), jnp.zeros((1, 8, 16, 8))):
    with pytest.raises(ValueError, match="a multiple of Hk"):
      interval_attention(q, kv, kv, lo, hi, scale=1.0)


@pytest.mark.parametrize("hq,hk,want", [
    (8, 2, 8), (8, 1, 8), (32, 8, 8), (64, 8, 8), (16, 2, 8), (32, 1, 8), (16, 16, 16),
    (24, 3, 24),    # 12 would reach 8 but fill 12 of 16 sublanes
    (12, 3, 12),    # no multiple of 8 divides: the fewest reaching 8
    (4, 1, 4), (6, 2, 6), (2, 2, 2)])   # fewer than 8 query heads: one row head each
def test_row_heads_fill_sublane_tiles_with_whole_groups(hq, hk, want):
  """Span attention's row heads (`[B, hv, rows]` tables): whole groups of a kv
  head's query heads, as few as fill 8-row tiles exactly, else as few as
  reach 8 rows, else one per query head."""
  assert span_common.row_heads(hq, hk) == want


def test_interval_attention_rows_reject_mismatched_tables():
  """`rows=` names the argument and the shapes it needs."""
  q = jnp.zeros((1, 2, 10, 8))
  k = v = jnp.zeros((1, 2, 16, 8))
  lo = hi = jnp.zeros((1, 2, 30), jnp.int32)
  perm = jnp.zeros((1, 2, 30), jnp.int32)
  call = lambda rows, q=q: interval_attention(q, k, v, lo, hi, scale=1.0, rows=rows)  # noqa: E731
  for bad in [(perm,), (perm, perm[..., :29]), (perm[:, :1], perm)]:
    with pytest.raises(ValueError, match=r"rows: expected \(perm, inv\)"):
      call(bad)
  with pytest.raises(ValueError, match="a multiple of q's 7 rows"):
    call((perm, perm), q=jnp.zeros((1, 2, 7, 8)))


def test_tpu_table_blocks_hand_each_grid_step_its_own_entry():
  """The TPU kernels read entry `i` of a `[B, H, 2, N]` table from the SMEM
  block their BlockSpec index map picks: checked past several 128-entry
  blocks against the plain table."""
  from pallas_kernels.span import tpu as span_tpu
  b, h, n = 2, 3, 300
  tbl = jnp.arange(b * h * 2 * n, dtype=jnp.int32).reshape(b, h, 2, n)
  blocks = np.asarray(span_tpu.table_blocks(tbl))
  for tiles_first in (False, True):  # grids (B, H, tiles) and (B, tiles, H)
    spec = span_tpu._table_spec(tiles_first)
    for bb, hh, i in [(0, 0, 0), (1, 2, 127), (0, 1, 128), (1, 0, 255), (1, 2, 299)]:
      idx = spec.index_map(bb, i, hh) if tiles_first else spec.index_map(bb, hh, i)
      lanes = spec.block_shape[-1]
      block = blocks[idx[0], idx[1], :, idx[3] * lanes:(idx[3] + 1) * lanes]
      got = span_tpu._table_entry(block, i)
      assert tuple(map(int, got)) == (int(tbl[bb, hh, 0, i]), int(tbl[bb, hh, 1, i]))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_row_column_flips_are_exact(dtype):
  """`to_column` / `to_row` (the in-kernel row <-> column turn, a diagonal
  sum) give exactly the transposed vector, int32 stays int32, and `-inf`
  entries survive (lse of empty rows)."""
  n = 24
  row = (np.arange(n) * 37 - 200).astype(dtype).reshape(1, n)
  if dtype == jnp.float32:
    row[0, 3] = -np.inf
    row[0, 7] = 1e30
  col = pk_common.to_column(jnp.asarray(row))
  assert col.dtype == dtype and col.shape == (n, 1)
  np.testing.assert_array_equal(np.asarray(col), row.T)
  back = pk_common.to_row(col)
  assert back.shape == (1, n)
  np.testing.assert_array_equal(np.asarray(back), row)


def test_tpu_span_kernels_reject_narrow_vector_blocks():
  """Compiled TPU kernels take per-row vectors in `(H, block_q)` lane blocks:
  `block_q` below 128 is refused unless one tile holds every row."""
  from pallas_kernels.span import tpu as span_tpu
  span_tpu.check_block_q(128, 1024)
  span_tpu.check_block_q(64, 64)
  with pytest.raises(ValueError, match="multiple of 128"):
    span_tpu.check_block_q(64, 128)


def test_interval_attention_composes_with_vmap_checkpoint_grad():
  """custom_vjp wiring: grad of a vmapped, rematerialised call under jit."""
  b, h, r, lk, d = 1, 1, 24, 30, 16
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  q = jax.random.normal(ks[0], (3, b, h, r, d))
  k, v = (jax.random.normal(x, (3, b, h, lk, d)) for x in ks[1:3])
  lo = jax.random.randint(ks[3], (b, h, r), 0, lk)
  hi = jnp.minimum(lo + 9, lk - 1)
  loss = lambda fn: lambda q, k, v: jnp.sum(jax.vmap(jax.checkpoint(fn))(q, k, v) ** 2)  # noqa: E731
  kern = lambda q, k, v: interval_attention(  # noqa: E731
      q, k, v, lo, hi, scale=0.5, block_q=16, block_k=16, variant="gpu_interpret")[0]
  got = jax.jit(jax.grad(loss(kern), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: interval_oracle(q, k, v, lo, hi, 0.5)[0]),
                  argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


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
    # (config, dtype, lq, lk, hq, hk, d, variant): MHA, bf16, three spans,
    # p = 0.55 (non-integer 1/p), head_dim 40, the GPU variant. The TPU
    # variant runs in every end-to-end case below (the CPU default).
    (attn.SuperlinearConfig(sw_index=1, num_spans=3, search_power=0.55, span_power=0.55,
                            backward_factor=3), jnp.bfloat16, 37, 37, 2, 2, 40,
     "gpu_interpret"),
]
SPAN_CASES += [pytest.param(*SPAN_CASES[0][:-1], "gpu", marks=pytest.mark.gpu),
               pytest.param(*SPAN_CASES[0][:-1], "tpu", marks=pytest.mark.tpu),
               # 16:2 heads: 8 row heads of 2 query heads each (`row_heads`), so
               # every table carries g = 2 heads' rows and dk/dv sum 4 row heads
               (attn.SuperlinearConfig(sw_index=1, num_spans=2), jnp.float32, 20, 24, 16,
                2, 16, "tpu_interpret")]


def _heads_first(x):
  """`[B, Lq, Hq, K]` (public) -> `[B, Hq, K, Lq]` (the span kernels' layout)."""
  return jnp.transpose(x, (0, 2, 3, 1))


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
  fn = jax.jit(lambda q, k, v, g: span_attention(   # kernel layout [B, Hq, K, Lq]
      q, k, v, _heads_first(anchors), _heads_first(g), span_table=tbl,
      window=config.window, scale=scale, block_q=16, block_k=16, variant=variant))
  ref = lambda q, k, v, g: span_oracle(q, k, v, anchors, g, config=config,  # noqa: E731
                                       q_offset=lk - lq, scale=scale)
  ph.vjp_check(fn, ref, (q, k, v, gates), jax.random.PRNGKey(2), argnums=(0, 1, 2, 3),
               **TOL[dtype])


@pytest.mark.parametrize("lq,chunk,variant,remat", [
    (37, 16, "tpu_interpret", False),
    (37, 16, "tpu_interpret", True),
    pytest.param(36, 12, "gpu_interpret", False, marks=pytest.mark.full)])
def test_span_attention_in_query_chunks(lq, chunk, variant, remat):
  """`query_chunk`: a scan over chunks of queries (37 = 3 x 16 - 11 padded
  queries; 36 = 3 x 12 exactly) against the dense oracle, values and VJPs
  wrt q, k, v and the gate logits; the weights returned with
  `gates_from_logits` against a plain softmax over the slots. bf16, so k and
  v's gradients are the ones summed over the chunks (in float32). `remat`:
  each chunk's forward recomputed in the backward (`remat_chunks`)."""
  config = SPAN_CASES[0][0]
  hq, hk, d, lk = 4, 2, 24, lq + 5
  q, k, v, qs, kss = _inputs(jax.random.PRNGKey(3), b=1, lq=lq, lk=lk, hq=hq, hk=hk, d=d,
                             ds=8, dtype=jnp.bfloat16)
  res = attn.superlinear_attention_with_anchors(q, k, v, qs, kss, config=config,
                                                implementation="reference")
  anchors = res.anchors
  assert (np.asarray(anchors) < 0).any() and (np.asarray(anchors) >= 0).any()
  logits = jnp.where(anchors >= 0, _normal(jax.random.PRNGKey(4), anchors.shape,
                                           jnp.float32), -1e9)
  scale = d ** -0.5
  tbl = jnp.asarray(masks.superlinear_span_table(lk, config))
  call = lambda q, k, v, lg: span_attention(  # noqa: E731
      q, k, v, _heads_first(anchors), _heads_first(lg), span_table=tbl, window=config.window,
      scale=scale, block_q=16, block_k=16, variant=variant, gates_from_logits=True,
      query_chunk=chunk, remat_chunks=remat)
  softmax = lambda lg: jax.nn.softmax(lg, axis=-1)  # noqa: E731  over the K slots
  _, weights = jax.jit(call)(q, k, v, logits)
  chex.assert_trees_all_close(weights, _heads_first(softmax(logits)), atol=1e-6, rtol=1e-6)
  fn = jax.jit(lambda q, k, v, lg: call(q, k, v, lg)[0])
  ref = lambda q, k, v, lg: span_oracle(q, k, v, anchors, softmax(lg), config=config,  # noqa: E731
                                        q_offset=lk - lq, scale=scale)
  ph.vjp_check(fn, ref, (q, k, v, logits), jax.random.PRNGKey(5), argnums=(0, 1, 2, 3),
               **TOL[jnp.bfloat16])


def test_span_glue_hands_the_kernels_row_head_tables():
  """8:2 heads: every per-row int32 table the interval kernels get is
  `[B, 8, n]` (8 row heads of one query head, `row_heads`), and K/V keep
  their 2 kv heads, as read from the traced program's kernel operands."""
  b, l, hq, hk, d, num = 1, 32, 8, 2, 16, 2
  config = attn.SuperlinearConfig(sw_index=1, num_spans=num)
  q = jnp.zeros((b, l, hq, d))
  kv = jnp.zeros((b, l, hk, d))
  anchors = jnp.zeros((b, hq, num, l), jnp.int32)
  tbl = jnp.asarray(masks.superlinear_span_table(l, config))
  fn = lambda q, k, v, g: span_attention(  # noqa: E731
      q, k, v, anchors, g, span_table=tbl, window=config.window, scale=0.25,
      block_q=16, block_k=16, variant="tpu_interpret")
  jaxpr = jax.make_jaxpr(fn)(q, kv, kv, jnp.ones((b, hq, num, l)))

  def pallas_calls(jx):    # through custom_vjp / pjit sub-programs
    for e in jx.eqns:
      if e.primitive.name == "pallas_call":
        yield e
        continue
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            yield from pallas_calls(inner)

  calls = list(pallas_calls(jaxpr.jaxpr))
  assert len(calls) == 2                                   # window and spans
  for call in calls:
    avals = [v.aval for v in call.invars]
    tables = [a.shape for a in avals if a.dtype == jnp.int32 and a.ndim == 3]
    kv_ops = [a.shape for a in avals if a.dtype == jnp.float32 and a.ndim == 4
              and a.shape[2] >= l]
    assert tables and all(s[:2] == (b, 8) for s in tables), tables
    assert any(s[1] == hk for s in kv_ops), kv_ops


def test_span_attention_rejects_bad_query_chunk():
  q = jnp.zeros((1, 8, 2, 8))
  a = jnp.zeros((1, 2, 1, 8), jnp.int32)
  with pytest.raises(ValueError, match="query_chunk=0"):
    span_attention(q, q, q, a, a.astype(jnp.float32), span_table=jnp.zeros((9, 2), jnp.int32),
                   window=2, scale=1.0, query_chunk=0)


# `implementation="pallas"` end to end (values, anchors, gates, grads to q, k,
# v, q_search, k_search; chunked prefill with NaN past the cache end):
# tests/test_op_suite.py.


# ------------------------------------------------------------------ lowering


def _span_specs(dtype, b=1, l=300, hq=4, hk=2, d=40, num=3):
  f = lambda s, t: jax.ShapeDtypeStruct(s, t)  # noqa: E731
  return [f((b, l, hq, d), dtype), f((b, l, hk, d), dtype), f((b, l, hk, d), dtype),
          f((b, hq, num, l), jnp.int32), f((b, hq, num, l), jnp.float32)]


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


def test_key_block_tiles_hold_every_visiting_tile_in_any_row_order():
  """dk/dv table on unsorted tiles (random bounds, some empty): every tile
  that visits key block c lies in c's range; checked by a plain loop."""
  rng = np.random.default_rng(0)
  nkb, block_k, n_tiles = 9, 16, 23
  lo = rng.integers(0, nkb * block_k, (2, 3, n_tiles))
  hi = np.minimum(lo + rng.integers(-20, 60, lo.shape), nkb * block_k - 1)
  t0, cnt = (np.asarray(x) for x in span_common.key_block_tiles(
      jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), nkb, block_k))
  assert (hi < lo).any()
  for b in range(2):
    for h in range(3):
      for t in range(n_tiles):
        if hi[b, h, t] < lo[b, h, t]:
          continue
        for c in range(lo[b, h, t] // block_k, hi[b, h, t] // block_k + 1):
          assert t0[b, h, c] <= t < t0[b, h, c] + cnt[b, h, c], (b, h, t, c)


@pytest.mark.parametrize("op", ["add", "max", "min"])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_scan_equals_a_plain_running_loop(op, reverse):
  """`span.scan.scan` (chunks of 4, three levels of chunk totals at N = 70)
  against a running accumulator in a Python loop."""
  from pallas_kernels.span.scan import scan
  x = np.random.default_rng(1).integers(-50, 50, (2, 3, 70)).astype(np.int32)
  got = np.asarray(scan(jnp.asarray(x), op, reverse=reverse, chunk=4))
  fold = {"add": lambda a, b: a + b, "max": max, "min": min}[op]
  want = np.empty_like(x)
  for idx in np.ndindex(*x.shape[:-1]):
    order = range(69, -1, -1) if reverse else range(70)
    acc = None
    for i in order:
      acc = x[idx + (i,)] if acc is None else fold(acc, x[idx + (i,)])
      want[idx + (i,)] = acc
  np.testing.assert_array_equal(got, want)


def test_benchmark_random_anchors_are_stripe_anchors():
  """The span benchmark's synthetic anchors are valid stripe anchors of their
  query (or -1 exactly where the query has none), checked by a set lookup."""
  from eval.kernel_cases_span import random_anchors
  config = attn.SuperlinearConfig(sw_index=3, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3)
  seq_len = 200
  a = np.asarray(random_anchors(jax.random.PRNGKey(0), 2, seq_len, 3, config))
  f = masks.superlinear_stripe_table(seq_len, config)
  for i in range(seq_len):
    valid = {i + 1 - int(x) for x in f if i + 1 - int(x) >= 0}
    got = set(a[:, i].reshape(-1).tolist())
    assert got == {-1} if not valid else got <= valid, (i, got, valid)


# ------------------------------------------------------- coverage property


_PROP_LEN = 400                 # longest sequence of the property test
_PROP_ROWS = _PROP_LEN * 40     # >= queries x stripes for every config below


@functools.partial(jax.jit, static_argnums=(2, 3))
def _kernel_visits(lo, hi, block_q, block_k):
  """Per row (`lo`, `hi`: int32 `[_PROP_ROWS]`, empty rows padded at the end):
  the keys its tile visits in the forward / dq kernels, and the keys whose
  key block lists the row's tile in the dk/dv kernel; both bool
  `[_PROP_ROWS, _PROP_LEN]`, from the kernels' own tables."""
  lo, hi = lo[None, None], hi[None, None]
  perm = span_common.sort_rows_by_start(lo, hi)
  lo_s, hi_s = jnp.take_along_axis(lo, perm, -1), jnp.take_along_axis(hi, perm, -1)
  fwd_vis = span_common.visited_keys_mask(lo_s, hi_s, block_q, block_k, _PROP_LEN)[0, 0]
  nkb = pk_common.round_up(_PROP_LEN, block_k) // block_k
  t0, cnt = span_common.key_block_tiles(*span_common.tile_bounds(lo_s, hi_s, block_q), nkb,
                                        block_k)
  tile = jnp.arange(_PROP_ROWS) // block_q
  kb = jnp.arange(_PROP_LEN) // block_k
  t0, cnt = t0[0, 0][kb], cnt[0, 0][kb]
  dkv_vis = (tile[:, None] >= t0[None, :]) & (tile[:, None] < (t0 + cnt)[None, :])
  inv = jnp.argsort(perm[0, 0])
  return fwd_vis[inv], dkv_vis[inv]


@settings(max_examples=10, deadline=None)
@given(seq_len=st.integers(1, _PROP_LEN),
       case=st.sampled_from([(0, 0.5, 0.5, 2.0, 1.0), (7, 0.5, 0.5, 2.0, 1.0),
                             (3, 0.55, 0.55, 3.0, 1.0), (0, 0.6, 0.45, 2.0, 0.0),
                             (2, 0.5, 0.6, 1.5, 2.0)]),
       blocks_qk=st.sampled_from([(16, 16), (32, 64), (128, 16)]),
       chunk=st.integers(0, 3))
def test_kernel_tables_visit_every_key(seq_len, case, blocks_qk, chunk):
  """For every query and every candidate anchor (all stripes), the span and
  window bounds the kernels compute, and the key blocks their tables make
  them visit (forward/dq: per row tile; dk/dv: per key block), cover every
  earlier key: random context access holds in the kernel."""
  s, p, sigma, bb, bf = case
  config = attn.SuperlinearConfig(sw_index=s, search_power=p, span_power=sigma,
                                  backward_factor=bb, forward_factor=bf)
  q_offset = seq_len * chunk // 4                           # a prefill chunk
  pos = np.arange(q_offset, seq_len)
  f = masks.superlinear_stripe_table(seq_len, config)
  anchors = pos[:, None] + 1 - f[None, :]
  anchors = np.where(anchors >= 0, anchors, -1)              # [Lq, S] all candidates
  table = masks.superlinear_span_table(seq_len, config)
  back, fwd = table[pos + 1, 0][:, None], table[pos + 1, 1][:, None]
  slo, shi = pk_common.span_bounds(jnp.asarray(anchors), jnp.asarray(pos[:, None]),
                                jnp.asarray(back), jnp.asarray(fwd), config.window)
  wlo, whi = span_common.window_bounds(jnp.asarray(pos), config.window, seq_len)

  kpos = np.arange(_PROP_LEN)
  covered = np.zeros((pos.size, _PROP_LEN), bool)
  for lo, hi in ((wlo, whi), (slo, shi)):
    lo_n, hi_n = np.asarray(lo).reshape(-1), np.asarray(hi).reshape(-1)
    n = lo_n.size
    assert n <= _PROP_ROWS
    pad = lambda x, val: np.pad(x, (0, _PROP_ROWS - n), constant_values=val)  # noqa: E731
    fwd_vis, dkv_vis = (np.asarray(x)[:n] for x in _kernel_visits(
        jnp.asarray(pad(lo_n, 0), jnp.int32), jnp.asarray(pad(hi_n, -1), jnp.int32),
        *blocks_qk))
    inside = (kpos >= lo_n[:, None]) & (kpos <= hi_n[:, None])       # [rows, Lk]
    assert not (inside & ~fwd_vis).any(), "a tile does not visit all keys of its rows"
    assert not (inside & ~dkv_vis).any(), "a key block does not list a tile that needs it"
    covered |= inside.reshape(pos.size, -1, _PROP_LEN).any(axis=1)
  causal = kpos[None, :] <= pos[:, None]
  np.testing.assert_array_equal(covered, causal)


# ---------------------------------------------------------------- gate logits


def _gate_oracle(qs, ks, anchors):
  """`<qs[b, i, h], ks[b, anchors[b, i, h, k], h // G]>` by a plain loop,
  0 in empty slots; float32 `[B, Lq, Hq, K]` (public layout)."""
  qs, ks, anchors = (np.asarray(x, np.float64) for x in (qs, ks, anchors))
  b, lq, hq, num = anchors.shape
  g = hq // ks.shape[2]
  out = np.zeros(anchors.shape)
  for bi in range(b):
    for i in range(lq):
      for h in range(hq):
        for s in range(num):
          a = int(anchors[bi, i, h, s])
          if a >= 0:
            out[bi, i, h, s] = qs[bi, i, h] @ ks[bi, a, h // g]
  return out.astype(np.float32)


@pytest.mark.parametrize("dtype,heads,gate_rows", [
    (jnp.float32, (4, 1), 192),     # 16 queries a step (192 / (4 heads x 3 slots)): 2 steps, the last padded
    (jnp.float32, (4, 2), None),    # kv head h // G of query head h
    (jnp.bfloat16, (2, 2), None)])
def test_gate_logits_are_the_search_scores_and_differentiate_through_the_anchors(
    dtype, heads, gate_rows, monkeypatch):
  """Search once: the gate logits equal the search's scores (and the plain
  dot-product oracle), and their VJP (gather of K search-key rows into
  dq_search, scatter-add of K query rows into dk_search, `GATE_ROWS` rows
  per loop step) matches autodiff of a plain gather."""
  from attn.pallas import superlinear as pallas_superlinear
  if gate_rows is not None:
    monkeypatch.setattr(pallas_superlinear, "GATE_ROWS", gate_rows)
  hq, hk = heads
  lq = lk = 27
  key = jax.random.split(jax.random.PRNGKey(3), 3)
  qs = _normal(key[0], (1, lq, hq, 8), dtype)
  ks = _normal(key[1], (1, lk, hk, 8), dtype)
  config = attn.SuperlinearConfig(sw_index=1, num_spans=3)
  anchors, scores = pallas_superlinear.search(qs, ks, None, config=config,
                                              variant="gpu_interpret", heads_first=True)
  public = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # noqa: E731
  assert (np.asarray(anchors) < 0).any() and (np.asarray(anchors) >= 0).any()
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  logits = pallas_superlinear.gate_logits(qs, ks, anchors, scores)
  np.testing.assert_allclose(public(logits), _gate_oracle(qs, ks, public(anchors)),
                             atol=tol, rtol=tol)

  def gather_ref(a, b):   # plain autodiff of a gather
    kh = jnp.repeat(b.astype(jnp.float32), hq // hk, axis=2)          # [B, Lk, Hq, D]
    pa = public(anchors)
    rows = kh[0][jnp.maximum(pa[0], 0), jnp.arange(hq)[None, :, None]]  # [Lq, Hq, K, D]
    s = jnp.sum(a.astype(jnp.float32)[0][:, :, None, :] * rows, axis=-1)
    return jnp.transpose(jnp.where(pa[0] >= 0, s, 0.0), (1, 2, 0))[None]

  fn = lambda a, b: pallas_superlinear.gate_logits(a, b, anchors, scores)  # noqa: E731
  ph.vjp_check(fn, gather_ref, (qs, ks), key[2], argnums=(0, 1), atol=tol, rtol=tol,
               zero_rows=anchors < 0)


def test_mix_rows_is_the_plain_gated_merge_values_and_vjps():
  """`span.merge.mix_rows` (its own VJP: gathers by `inv` and `perm`, no
  saved float32 products) against the plain expression it replaces (pair
  outputs put back in slot-major order by indexing, weighted, summed),
  values and VJPs wrt every float input, bf16 outputs."""
  from pallas_kernels.span import merge
  b, h, r, d, num = 1, 2, 12, 8, 3
  ks = jax.random.split(jax.random.PRNGKey(7), 5)
  o_w = _normal(ks[0], (b, h, r, d), jnp.bfloat16)
  o_p = _normal(ks[1], (b, h, num * r, d), jnp.bfloat16)
  c_w = jax.random.uniform(ks[2], (b, h, r))
  c_s = tuple(jax.random.uniform(k, (b, h, r)) for k in jax.random.split(ks[3], num))
  rng = np.random.default_rng(0)
  perm = np.stack([np.stack([rng.permutation(num * r) for _ in range(h)])])   # [1, h, K R]
  inv = np.argsort(perm, axis=-1)
  perm, inv = jnp.asarray(perm, jnp.int32), jnp.asarray(inv, jnp.int32)

  def plain(o_w, o_p, c_w, c_s):
    slot_major = jnp.stack([o_p[bi, hi][inv[bi, hi]] for bi in range(b) for hi in range(h)])
    slot_major = slot_major.reshape(b, h, num, r, d).astype(jnp.float32)
    out = c_w[..., None] * o_w.astype(jnp.float32)
    for k in range(num):
      out = out + c_s[k][..., None] * slot_major[:, :, k]
    return out.astype(o_w.dtype)

  fn = lambda o_w, o_p, c_w, c_s: merge.mix_rows(o_w, o_p, perm, inv, c_w, c_s)  # noqa: E731
  args = (o_w, o_p, c_w, c_s)
  out, vjp = jax.vjp(fn, *args)
  ref, vjp_ref = jax.vjp(plain, *args)
  chex.assert_trees_all_close(out, ref, atol=1e-2, rtol=1e-2)
  ct = _normal(ks[4], out.shape, jnp.bfloat16)
  chex.assert_trees_all_close(vjp(ct), vjp_ref(ct), atol=2e-2, rtol=2e-2)


def test_row_tables_match_plain_reshapes_values_and_vjps():
  """`to_pair_rows` / `from_pair_rows` / `split_rows` / `unstack` and
  `slot_softmax` (slices and concatenations, for XLA:TPU) equal the plain
  transpose-and-reshape / softmax they replace, values and VJPs."""
  b, h, g, num, l = 2, 3, 4, 2, 5
  x = jax.random.normal(jax.random.PRNGKey(0), (b, h, g, num, l))
  ct = jax.random.normal(jax.random.PRNGKey(1), (b, h, num * g * l))
  plain = lambda a: jnp.transpose(a, (0, 1, 3, 2, 4)).reshape(b, h, -1)  # noqa: E731
  y, vjp = jax.vjp(span_common.to_pair_rows, x)
  y_ref, vjp_ref = jax.vjp(plain, x)
  chex.assert_trees_all_equal(y, y_ref)
  chex.assert_trees_all_equal(vjp(ct), vjp_ref(ct))
  chex.assert_trees_all_equal(span_common.from_pair_rows(y, g, num), x)

  parts, vjp = jax.vjp(lambda a: span_common.split_rows(a, num, -1), ct)
  chex.assert_trees_all_equal(parts, tuple(ct.reshape(b, h, num, g * l).transpose(2, 0, 1, 3)))
  chex.assert_trees_all_equal(vjp(parts), (ct,))
  sl, vjp = jax.vjp(lambda a: span_common.unstack(a, 3), x)
  chex.assert_trees_all_equal(sl, tuple(x[:, :, :, j] for j in range(num)))
  chex.assert_trees_all_equal(vjp(sl), (x,))

  z = jax.random.normal(jax.random.PRNGKey(2), (b, h, 3, l)) * 4
  w = jax.random.normal(jax.random.PRNGKey(3), z.shape)
  loss = lambda f: lambda a: jnp.sum(f(a) * w)  # noqa: E731
  slot_softmax = lambda a: jnp.stack(  # noqa: E731
      span_common.slot_softmax(span_common.unstack(a, 2)), axis=2)
  chex.assert_trees_all_close(slot_softmax(z), jax.nn.softmax(z, axis=2), atol=1e-6)
  chex.assert_trees_all_close(jax.grad(loss(slot_softmax))(z),
                              jax.grad(loss(lambda a: jax.nn.softmax(a, axis=2)))(z),
                              atol=1e-6)
