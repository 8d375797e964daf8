"""Block-sparse flash attention kernels against the dense reference.

Interpret mode (TPU variant under `interpret=True` and the bounds-checked
`InterpretParams`, GPU variant under `interpret=True`) for values and VJPs
with random cotangents; `jax.export` for TPU and CUDA proves forward and
backward lower to the platform's kernel; a visit counter proves the work
follows the layout. `@pytest.mark.gpu` tests compile the same cases on a GPU.
Shapes are tiny: interpret mode costs milliseconds per grid step.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.pallas import block_sparse as glue
from attn import reference
from pallas_kernels import block_sparse as kernels
from tests import pallas_harness as ph

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5, grad_atol=5e-5, grad_rtol=5e-5),
       jnp.bfloat16: dict(atol=2e-2, rtol=2e-2, grad_atol=6e-2, grad_rtol=6e-2),
       jnp.float16: dict(atol=3e-3, rtol=3e-3, grad_atol=1e-2, grad_rtol=1e-2)}


def _qkv(key, b, lq, lk, hq, hk, d, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, lq, hq, d), jnp.float32).astype(dtype),
          jax.random.normal(kk, (b, lk, hk, d), jnp.float32).astype(dtype),
          jax.random.normal(kv, (b, lk, hk, d), jnp.float32).astype(dtype))


def _band_mask(lq, lk, q_offset, window):
  """Oracle mask with its own arithmetic: key c visible to row r iff
  0 <= q_offset + r - c < window."""
  d = q_offset + np.arange(lq)[:, None] - np.arange(lk)[None, :]
  ok = d >= 0
  return ok if window is None else ok & (d < window)


def _oracle(mask, scale):
  def f(q, k, v):
    return reference.masked_attention(q, k, v, jnp.asarray(mask), scale=scale)[0].astype(q.dtype)
  return f


def _check(fn, mask, args, dtype, seed=0, scale=None):
  scale = args[0].shape[-1] ** -0.5 if scale is None else scale
  empty = ~np.asarray(mask).any(axis=1)
  return ph.vjp_check(fn, _oracle(mask, scale), args, jax.random.key(seed + 99),
                      argnums=(0, 1, 2), zero_rows=empty[None, :, None, None], **TOL[dtype])


# -------------------------------------------------------- band (causal, window)


BAND_CASES = [
    # (b, lq, lk, hq, hk, d, q_offset, window, bq, bk, dtype, variant)
    (1, 37, 37, 4, 2, 24, 0, None, 16, 16, jnp.float32, "tpu_interpret"),   # causal, GQA, odd
    (2, 29, 45, 2, 2, 16, 9, 11, 16, 32, jnp.float32, "gpu_interpret"),     # window, MHA, batch 2
    (1, 40, 64, 4, 1, 32, 24, 20, 32, 16, jnp.bfloat16, "tpu_interpret"),   # window, GQA 4:1, bf16
    (1, 33, 48, 2, 1, 8, 15, None, 16, 16, jnp.bfloat16, "gpu_interpret"),  # chunked prefill
    (1, 24, 24, 2, 1, 16, 0, 3, 16, 16, jnp.float16, "gpu_interpret"),      # float16, tiny window
]


def _band_id(c):
  return f"L{c[1]}x{c[2]}w{c[7]}-{c[10].__name__}-{c[11]}"


@pytest.mark.parametrize("case", BAND_CASES, ids=_band_id)
def test_band_matches_reference(case):
  b, lq, lk, hq, hk, d, off, window, bq, bk, dtype, variant = case
  args = _qkv(jax.random.key(lq), b, lq, lk, hq, hk, d, dtype)
  fn = functools.partial(kernels.band_attention, q_offset=off, window=window, scale=d ** -0.5,
                         block_q=bq, block_k=bk, variant=variant)
  _check(jax.jit(lambda q, k, v: fn(q, k, v)), _band_mask(lq, lk, off, window), args, dtype)


def test_band_checked_interpreter_reads_in_bounds():
  """TPU variant under InterpretParams (raises on out-of-bounds block reads)."""
  args = _qkv(jax.random.key(3), 1, 20, 40, 2, 1, 8, jnp.float32)
  fn = functools.partial(kernels.band_attention, q_offset=11, window=9, scale=0.3,
                         block_q=16, block_k=16, variant="tpu_checked")
  _check(fn, _band_mask(20, 40, 11, 9), args, jnp.float32, scale=0.3)


@pytest.mark.parametrize("variant", ["tpu_interpret", "gpu_interpret"])
def test_traced_q_offset_decode_matches_reference(variant):
  """One traced q_offset, queries at positions past or before the valid
  range included: the ops' Pallas paths behave exactly as the reference op
  (rows outside `[0, kv_len)` are zeros)."""
  q, k, v = _qkv(jax.random.key(5), 1, 3, 40, 2, 1, 16, jnp.float32)

  @jax.jit
  def run(q, k, v, off):
    return (glue.sliding_window_attention(q, k, v, off, window=6, scale=0.25, variant=variant),
            glue.dense_attention(q, k, v, off, scale=0.25, variant=variant))

  for off in (0, 17, 37, 39, -2):
    w_out, d_out = run(q, k, v, jnp.int32(off))
    chex.assert_trees_all_close(
        (w_out, d_out),
        (reference.sliding_window_attention(q, k, v, jnp.int32(off), window=6, scale=0.25),
         reference.dense_attention(q, k, v, jnp.int32(off), scale=0.25)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", ["tpu_interpret", "gpu_interpret"])
def test_traced_q_offset_ignores_nan_in_cache_past_the_queries(variant):
  """Cache slots past the last valid query position hold NaN (never written):
  values and gradients equal the reference on a clean cache (no key zeroing
  pass: the kernels mask those keys themselves)."""
  q, k, v = _qkv(jax.random.key(6), 1, 3, 40, 2, 1, 16, jnp.float32)

  def loss(fn, q, k, v, off):
    out = (fn(q, k, v, off, window=6, scale=0.25) if fn.__name__.startswith("sliding")
           else fn(q, k, v, off, scale=0.25))
    return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size)

  for off in (20, -2):
    last = off + q.shape[1] - 1
    dirty = (jnp.arange(40) > last)[None, :, None, None]
    kn, vn = jnp.where(dirty, jnp.nan, k), jnp.where(dirty, jnp.nan, v)
    for name in ("sliding_window_attention", "dense_attention"):
      ours = functools.partial(getattr(glue, name), variant=variant)
      ours.__name__ = name
      ref = getattr(reference, name)
      got = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(
          q, kn, vn, jnp.int32(off))
      want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2))(
          q, k, v, jnp.int32(off))
      want = (want[0], (want[1][0], jnp.where(dirty, 0, want[1][1]),
                        jnp.where(dirty, 0, want[1][2])))
      chex.assert_tree_all_finite(got)
      chex.assert_trees_all_close(got, want, atol=5e-5, rtol=5e-5)


def _pallas_operand_shapes(jaxpr):
  """Shapes of the 4-D operands of every `pallas_call` in `jaxpr` (nested
  jaxprs included): heads-first `[B, H, L, D]` or sequence-major `[B, L, H, D]`."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      shapes += [x.aval.shape for x in eqn.invars if len(x.aval.shape) == 4]
      continue
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(inner, "jaxpr", inner)          # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          shapes += _pallas_operand_shapes(inner)
  return shapes


@pytest.mark.parametrize("variant", ["tpu_interpret", "gpu_interpret"])
def test_window_decode_reads_the_window_not_the_cache(variant):
  """A sliding window against a long cache at a traced offset: the kernels'
  K/V operands hold the window's blocks only (never the 200-row cache), and
  values and gradients match the reference at offsets near the start, in
  the middle and at the end of a cache that is not a whole number of blocks."""
  lq, lk, window, blk = 3, 200, 6, 16
  q, k, v = _qkv(jax.random.key(9), 1, lq, lk, 2, 1, 16, jnp.float32)

  def ours(q, k, v, off):
    return kernels.band_attention(q, k, v, off, window=window, scale=0.25, block_q=blk,
                                  block_k=blk, variant=variant)

  def loss(fn, q, k, v, off):
    out = fn(q, k, v, off)
    return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size)

  ref = lambda q, k, v, off: reference.sliding_window_attention(  # noqa: E731
      q, k, v, off, window=window, scale=0.25)
  grad = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1, 2)))
  rows = [max(s[1:3]) for s in _pallas_operand_shapes(
      jax.make_jaxpr(grad)(q, k, v, jnp.int32(0)).jaxpr)]           # the L axis
  assert rows and max(rows) <= window + lq - 1 + 2 * blk < lk
  for off in (0, 4, 90, 181, lk - lq):
    got = grad(q, k, v, jnp.int32(off))
    want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2))(
        q, k, v, jnp.int32(off))
    chex.assert_trees_all_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("variant,window", [("tpu_interpret", 7), ("gpu_interpret", None)])
def test_gqa_decode_folds_query_heads_into_rows(variant, window):
  """5 queries of 4 query heads per kv head: the kernels see the kv heads
  only (each program reads its kv head's keys once for the 4 query heads),
  and values and gradients match the reference at traced offsets."""
  lq, lk, hq, hk = 5, 90, 8, 2
  q, k, v = _qkv(jax.random.key(12), 1, lq, lk, hq, hk, 16, jnp.float32)

  def ours(q, k, v, off):
    return kernels.band_attention(q, k, v, off, window=window, scale=0.25, block_q=16,
                                  block_k=16, variant=variant)

  def ref(q, k, v, off):
    if window is None:
      return reference.dense_attention(q, k, v, off, scale=0.25)
    return reference.sliding_window_attention(q, k, v, off, window=window, scale=0.25)

  def loss(fn, q, k, v, off):
    out = fn(q, k, v, off)
    return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size)

  grad = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1, 2)))
  heads = [min(s[1:3]) for s in _pallas_operand_shapes(
      jax.make_jaxpr(grad)(q, k, v, jnp.int32(0)).jaxpr)]           # the head axis
  assert heads and set(heads) == {hk}
  for off in (0, 11, lk - lq):
    got = grad(q, k, v, jnp.int32(off))
    want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2))(
        q, k, v, jnp.int32(off))
    chex.assert_trees_all_close(got, want, atol=5e-5, rtol=5e-5)


def test_head_dims_pad_inside_the_op():
  """head_dim 128 and a non-power-of-two value: the op pads, the user does not."""
  for d, variant in ((128, "tpu_interpret"), (40, "gpu_interpret")):
    args = _qkv(jax.random.key(d), 1, 20, 20, 2, 1, d, jnp.float32)
    fn = functools.partial(kernels.band_attention, q_offset=0, window=7, scale=d ** -0.5,
                           block_q=16, block_k=16, variant=variant)
    _check(fn, _band_mask(20, 20, 0, 7), args, jnp.float32)


# ------------------------------------------------------------- table layouts


def _random_mask(rng, lq, lk, bq, bk):
  """Random mask with empty query rows, empty tiles, full tiles, partial tiles."""
  nq, nk = -(-lq // bq), -(-lk // bk)
  tile_state = rng.integers(0, 3, (nq, nk))            # 0 empty, 1 full, 2 random
  dense = np.repeat(np.repeat(tile_state, bq, 0), bk, 1)[:lq, :lk]
  mask = (dense == 1) | ((dense == 2) & (rng.random((lq, lk)) < 0.4))
  mask[rng.integers(0, lq, 3)] = False                 # empty query rows
  return mask


@pytest.mark.parametrize("variant,dtype,heads,seed", [
    ("tpu_interpret", jnp.float32, (4, 2), 0),
    ("gpu_interpret", jnp.float32, (2, 2), 1),
    ("gpu_interpret", jnp.bfloat16, (4, 1), 2),
])
def test_random_layout_matches_reference(variant, dtype, heads, seed):
  rng = np.random.default_rng(seed)
  lq, lk, bq, bk = 45, 51, 16, 16
  mask = _random_mask(rng, lq, lk, bq, bk)
  layout = attn.BlockLayout.from_mask(mask, block_q=bq, block_k=bk)
  assert (layout.num_kv_blocks == 0).any() or layout.num_active_blocks < layout.num_q_blocks * 4
  args = _qkv(jax.random.key(seed), 1, lq, lk, heads[0], heads[1], 16, dtype)
  fn = functools.partial(glue.block_sparse_attention, layout=layout, scale=0.25, variant=variant)
  _check(jax.jit(fn), mask, args, dtype, seed)


def test_random_layout_checked_interpreter():
  rng = np.random.default_rng(7)
  mask = _random_mask(rng, 30, 33, 16, 16)
  layout = attn.BlockLayout.from_mask(mask, block_q=16, block_k=16)
  args = _qkv(jax.random.key(7), 1, 30, 33, 2, 1, 8, jnp.float32)
  fn = functools.partial(glue.block_sparse_attention, layout=layout, scale=0.3, variant="tpu_checked")
  _check(fn, mask, args, jnp.float32, scale=0.3)


def test_from_fn_document_mask_matches_reference():
  """A document x causal mask described by a predicate, never as L x L."""
  lq = 48
  doc = np.repeat(np.arange(4), [5, 20, 16, 7])
  layout = attn.BlockLayout.from_fn(lambda i, j: (doc[i] == doc[j]) & (j <= i), lq, lq,
                                    block_q=16, block_k=16)
  mask = (doc[:, None] == doc[None, :]) & np.tril(np.ones((lq, lq), bool))
  np.testing.assert_array_equal(layout.to_mask(), mask)
  args = _qkv(jax.random.key(11), 1, lq, lq, 2, 1, 16, jnp.float32)
  _check(functools.partial(glue.block_sparse_attention, layout=layout, scale=0.25,
                           variant="gpu_interpret"), mask, args, jnp.float32)


# GPU passes on their own, smaller tiles: band tables recomputed per pass, a
# table layout's 32 x 32 tiles split into sub-tiles (masks sliced per sub-tile).
SUB_BLOCKS = kernels.GpuBlocks(fwd=kernels.PassBlocks(16, 32), dq=kernels.PassBlocks(32, 16),
                               dkv=kernels.PassBlocks(16, 16))


@pytest.mark.parametrize("window,q_offset", [(None, 0), (21, 7)])
def test_gpu_pass_tiles_band_matches_reference(window, q_offset):
  lq, lk = 41, 48
  args = _qkv(jax.random.key(5), 1, lq, lk, 2, 1, 16, jnp.float32)
  fn = functools.partial(kernels.band_attention, q_offset=q_offset, window=window, scale=0.25,
                         block_q=32, block_k=32, variant="gpu_interpret", gpu_blocks=SUB_BLOCKS)
  _check(lambda q, k, v: fn(q, k, v), _band_mask(lq, lk, q_offset, window), args,
         jnp.float32, scale=0.25)


@pytest.mark.parametrize("window", [None, 100])
def test_gpu_decode_splits_the_cache_and_merges(window):
  """q_len <= 16: each row's key blocks are split over several programs
  (`gpu.num_splits` > 1 here) and their softmax states merged."""
  lq, lk, off = 3, 150, 140
  spec = kernels.ops.base_spec(
      jnp.zeros((1, lq, 2, 8)), jnp.zeros((1, lk, 1, 8)), mode="band", block_q=16, block_k=16,
      scale=0.25, window=window or (1 << 30), count_visits=False,
      width=kernels.ops.common.band_width(lq, lk, window or (1 << 30), 16, 16), width_t=1)
  assert kernels.gpu.num_splits(spec, programs=2) > 1
  args = _qkv(jax.random.key(8), 1, lq, lk, 2, 1, 16, jnp.float32)
  fn = functools.partial(kernels.band_attention, q_offset=off, window=window, scale=0.25,
                         block_q=16, block_k=16, variant="gpu_interpret")
  _check(lambda q, k, v: fn(q, k, v), _band_mask(lq, lk, off, window), args, jnp.float32,
         scale=0.25)


def test_gpu_pass_tiles_split_table_layout():
  rng = np.random.default_rng(3)
  lq, lk = 57, 70
  mask = _random_mask(rng, lq, lk, 32, 32)
  mask[:32, 32:64] = True                              # one full layout tile
  layout = attn.BlockLayout.from_mask(mask, block_q=32, block_k=32)
  args = _qkv(jax.random.key(3), 1, lq, lk, 2, 1, 16, jnp.float32)
  fn = functools.partial(kernels.table_attention, tables=glue.host_tables(layout), scale=0.25,
                         variant="gpu_interpret", gpu_blocks=SUB_BLOCKS)
  _check(lambda q, k, v: fn(q, k, v), mask, args, jnp.float32, scale=0.25)


# ------------------------------------------------- diagonal (Toeplitz) masks


def _offset_mask(lq, lk, offsets):
  """Oracle: query r (at position lk - lq + r) sees key c iff its offset is listed."""
  d = (lk - lq) + np.arange(lq)[:, None] - np.arange(lk)[None, :]
  return np.isin(d, offsets)


_OFFSETS = np.array([0, 1, 2, 3, 5, 8, 12, 17, 23, 30, 38, 47, 57])


def test_diagonal_masks_hold_each_tile_on_its_real_entries():
  """Host conversion, checked entry by entry with plain loops; a mask with
  two values on one diagonal (within the real entries) is refused."""
  layout = attn.BlockLayout.from_mask(_offset_mask(40, 70, _OFFSETS), block_q=16, block_k=16)
  tables = glue.host_tables(layout)
  rows, cols = kernels.ops._mask_extents(tables)
  diag = kernels.ops.common.diagonal_masks(tables.block_masks, rows, cols)
  assert diag is not None and diag.shape[1:] == (1, 128)
  checked = 0
  for m in range(tables.block_masks.shape[0]):
    for i in range(int(rows[m])):
      for j in range(int(cols[m])):
        assert diag[m, 0, j - i + 15] == tables.block_masks[m, i, j]
        checked += 1
  assert checked > 16 * 16 * 3
  # Edge tiles: rows past q_len are free. A mask used only on a 5-row tile
  # differs from the diagonal rule below row 5 and still converts.
  tile = np.tril(np.ones((16, 16), np.int32))
  tile[5:] = 0
  masks = np.stack([np.zeros_like(tile), np.ones_like(tile), tile])
  assert kernels.ops.common.diagonal_masks(masks, np.array([16, 16, 5]),
                                           np.array([16, 16, 16])) is not None
  assert kernels.ops.common.diagonal_masks(masks, np.array([16, 16, 6]),
                                           np.array([16, 16, 16])) is None


@pytest.mark.parametrize("variant,blocks,dtype", [
    ("tpu_interpret", 16, jnp.float32),
    ("tpu_checked", 16, jnp.float32),
    ("gpu_interpret", 32, jnp.float32),      # layout tiles split into SUB_BLOCKS
    ("gpu_interpret", 16, jnp.bfloat16),
])
def test_diagonal_masks_match_reference(variant, blocks, dtype):
  """Sparse offsets (a PPA-like mask, chunked prefill at position 30): every
  partial tile is passed as a diagonal row and expanded in the kernel."""
  lq, lk = 40, 70
  mask = _offset_mask(lq, lk, _OFFSETS)
  layout = attn.BlockLayout.from_mask(mask, block_q=blocks, block_k=blocks)
  args = _qkv(jax.random.key(blocks), 1, lq, lk, 4, 2, 16, dtype)
  gpu_blocks = SUB_BLOCKS if blocks == 32 else None
  fn = functools.partial(kernels.table_attention, tables=glue.host_tables(layout), scale=0.25,
                         variant=variant, gpu_blocks=gpu_blocks, diagonal=True)
  _check(lambda q, k, v: fn(q, k, v), mask, args, dtype, scale=0.25)


def test_diagonal_true_refuses_a_layout_with_other_masks():
  rng = np.random.default_rng(4)
  layout = attn.BlockLayout.from_mask(_random_mask(rng, 40, 40, 16, 16), block_q=16, block_k=16)
  args = _qkv(jax.random.key(0), 1, 40, 40, 2, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match="diagonal=True"):
    kernels.table_attention(*args, tables=glue.host_tables(layout), scale=0.25,
                            variant="gpu_interpret", diagonal=True)


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize("kind,variant", [("window", "tpu_interpret"),
                                          ("table", "gpu_interpret")])
def test_nan_in_unseen_keys_never_reaches_outputs_or_grads(kind, variant):
  """NaN/Inf in k/v rows no query may see: outputs and every gradient stay
  finite and equal the reference on clean inputs; those rows get exactly 0."""
  lq, lk, off = 20, 48, 14
  if kind == "window":
    mask = _band_mask(lq, lk, off, 5)    # sees keys [10, 33]
    fn = functools.partial(kernels.band_attention, q_offset=off, window=5, scale=0.25,
                           block_q=16, block_k=16, variant=variant)
  else:
    mask = _band_mask(lq, lk, off, 5)
    mask[:, 20:24] = False               # a hole inside a partial tile
    layout = attn.BlockLayout.from_mask(mask, block_q=16, block_k=16)
    fn = functools.partial(glue.block_sparse_attention, layout=layout, scale=0.25, variant=variant)
  unseen = ~mask.any(axis=0)
  assert unseen[:10].all() and unseen[34:].all()
  q, k, v = _qkv(jax.random.key(2), 1, lq, lk, 2, 1, 16, jnp.float32)
  bad = jnp.asarray(unseen)[None, :, None, None]
  k_bad = jnp.where(bad, jnp.nan, k)
  v_bad = jnp.where(bad, jnp.inf, v)
  out, pull = jax.vjp(fn, q, k_bad, v_bad)
  # The oracle runs on clean inputs (its dense einsum would spread the NaN).
  ref, ref_pull = jax.vjp(_oracle(mask, 0.25), q, k, v)
  chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)
  ct = jax.random.normal(jax.random.key(3), out.shape)
  grads, ref_grads = pull(ct), ref_pull(ct)
  chex.assert_trees_all_close(grads, ref_grads, atol=5e-5, rtol=5e-5)
  for g in grads[1:]:
    np.testing.assert_array_equal(np.asarray(g)[:, unseen], 0.0)


# ------------------------------------------------------- work follows layout


@pytest.mark.parametrize("variant", ["tpu_interpret", "gpu_interpret"])
def test_visited_key_blocks_equal_active_blocks(variant):
  """The kernel computes exactly the layout's non-empty tiles per query block."""
  q, k, v = _qkv(jax.random.key(0), 1, 80, 80, 2, 1, 8, jnp.float32)
  for layout in (attn.BlockLayout.causal(80, block_q=16, block_k=16),
                 attn.BlockLayout.sliding_window(80, window=20, block_q=16, block_k=16)):
    out, visits = glue.block_sparse_attention(q, k, v, layout=layout, scale=0.3, variant=variant,
                                    count_visits=True)
    chex.assert_shape(visits, (1, 2, layout.num_q_blocks))
    np.testing.assert_array_equal(np.asarray(visits[0, 0]), layout.num_kv_blocks)
    assert int(visits.sum()) == 2 * layout.num_active_blocks
    # Oracle count of non-empty tiles with its own arithmetic.
    tiles = np.zeros((5, 5), bool)
    m = layout.to_mask()
    for i in range(5):
      for j in range(5):
        tiles[i, j] = m[16 * i:16 * i + 16, 16 * j:16 * j + 16].any()
    assert layout.num_active_blocks == tiles.sum()


def test_dkv_tables_list_every_active_tile_once():
  layout = attn.BlockLayout.from_mask(_random_mask(np.random.default_rng(4), 64, 80, 16, 16),
                                      block_q=16, block_k=16)
  t = glue.host_tables(layout)
  fwd = {(i, int(t.kv_blocks[i, s]))
         for i in range(len(t.num_kv_blocks)) for s in range(t.num_kv_blocks[i])}
  bwd = {(int(t.kv_blocks_t[j, s]), j)
         for j in range(len(t.num_kv_blocks_t)) for s in range(t.num_kv_blocks_t[j])}
  assert fwd == bwd and len(fwd) == layout.num_active_blocks == int(t.num_kv_blocks_t.sum())
  # Slots past the count repeat the previous block and mask id (no new DMA
  # on TPU), across empty rows too.
  for blocks, masks, counts in ((t.kv_blocks, t.mask_ids, t.num_kv_blocks),
                                (t.kv_blocks_t, t.mask_ids_t, t.num_kv_blocks_t)):
    width = blocks.shape[1]
    flat = list(zip(blocks.reshape(-1).tolist(), masks.reshape(-1).tolist()))
    for n, entry in enumerate(flat):
      if n % width >= counts[n // width] and n > 0:
        assert entry == flat[n - 1], (n, entry, flat[n - 1])


def test_tpu_rejects_tables_that_cannot_fit_in_smem():
  """Full causal 16 x 16 tiles at L = 8192: 512 query blocks x 512 slots of
  key blocks and as many mask ids, 2 MiB of int32 scalar-prefetched per
  pass, over TPU SMEM (1 MiB): the compiled TPU variant is rejected while
  tracing, naming the layout and the fix; the interpreter (no SMEM) and a
  small layout are traced as usual."""
  n, b = 8192, 16
  big = attn.BlockLayout.from_block_mask(np.tril(np.ones((n // b, n // b), bool)), n, n,
                                         block_q=b, block_k=b)
  small = attn.BlockLayout.from_block_mask(np.tril(np.ones((4, 4), bool)), 64, 64,
                                           block_q=b, block_k=b)

  def trace(layout, variant):
    q = jax.ShapeDtypeStruct((1, layout.q_len, 1, 8), jnp.float32)
    fn = functools.partial(glue.block_sparse_attention, layout=layout, scale=1.0,
                           variant=variant)
    return jax.eval_shape(fn, q, q, q)

  with pytest.raises(ValueError, match=r"layout: .*SMEM.*larger block_q / block_k"):
    trace(big, "tpu")
  assert trace(big, "tpu_interpret").shape == (1, n, 1, 8)
  assert trace(small, "tpu").shape == (1, 64, 1, 8)
  # Forward tables: blocks and mask ids 512 x 512 int32 each, counts 512, q_offset 2.
  x = jnp.zeros((1, n, 1, 8))
  spec = kernels.ops.base_spec(x, x, mode="table", block_q=b, block_k=b, scale=1.0,
                               window=1 << 30, width=n // b, width_t=n // b,
                               count_visits=False)
  assert kernels.tpu.prefetch_bytes(spec, False) == 2 * 512 * 512 * 4 + 512 * 4 + 512
  with pytest.raises(ValueError, match="TPU dkv kernel"):   # checked by the backward
    kernels.tpu.check_smem(spec, transposed=True)


# --------------------------------------------------------- through attn.ops


def test_ops_pallas_compose_with_jit_vmap_grad_checkpoint():
  q, k, v = _qkv(jax.random.key(1), 2, 24, 24, 2, 1, 16, jnp.float32)
  layout = attn.BlockLayout.from_mask(_random_mask(np.random.default_rng(1), 24, 24, 16, 16),
                                      block_q=16, block_k=16)
  ops = [
      lambda q, k, v, impl: attn.dense_attention(q, k, v, implementation=impl),
      lambda q, k, v, impl: attn.sliding_window_attention(q, k, v, window=5, implementation=impl),
      lambda q, k, v, impl: attn.block_sparse_attention(q, k, v, layout, implementation=impl),
  ]
  for op in ops:
    def loss(q, k, v, impl):
      per_example = jax.vmap(lambda a, b, c: op(a[None], b[None], c[None], impl)[0])(q, k, v)
      return jnp.sum(per_example * jnp.cos(per_example))
    g = jax.jit(jax.grad(jax.checkpoint(functools.partial(loss, impl="pallas")), (0, 1, 2)))(
        q, k, v)
    g_ref = jax.grad(functools.partial(loss, impl="reference"), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(g, g_ref, atol=5e-5, rtol=5e-5)


def test_ops_reject_unsuitable_table_blocks_and_keep_xla_default():
  q, k, v = _qkv(jax.random.key(1), 1, 24, 24, 2, 1, 16, jnp.float32)
  layout = attn.BlockLayout.from_mask(np.tril(np.ones((24, 24), bool)), block_q=8, block_k=8)
  with pytest.raises(ValueError, match="block_q"):
    attn.block_sparse_attention(q, k, v, layout, implementation="pallas")
  # No hardware record: None keeps the xla path on this backend.
  assert kernels.HARDWARE_CHECKS == () or jax.default_backend() not in {
      r.backend for r in kernels.HARDWARE_CHECKS}
  from attn import ops
  assert ops.resolve_implementation("dense_attention", None) == "xla"


def test_hardware_record_flips_default_to_pallas(monkeypatch):
  """A record for this backend makes None pick pallas for the kernel's ops
  only; a table layout the kernels cannot take stays on xla."""
  from attn import ops
  from pallas_kernels import platform
  rec = (platform.HardwareCheck(jax.default_backend(), "test", "2026-01-01", "pytest"),)
  monkeypatch.setattr(glue, "HARDWARE_CHECKS", rec)
  for op in ("dense_attention", "sliding_window_attention", "block_sparse_attention"):
    assert ops.resolve_implementation(op, None) == "pallas"
  assert ops.resolve_implementation("ppa_attention", None) == "xla"
  q, k, v = _qkv(jax.random.key(1), 1, 24, 24, 2, 1, 16, jnp.float32)
  mask = np.tril(np.ones((24, 24), bool))
  layout = attn.BlockLayout.from_mask(mask, block_q=8, block_k=8)
  chex.assert_trees_all_close(attn.block_sparse_attention(q, k, v, layout),
                              _oracle(mask, 0.25)(q, k, v), atol=2e-5, rtol=2e-5)


# -------------------------------------------------------------------- export


def _specs(lq, lk, hq, hk, d, dtype):
  return (jax.ShapeDtypeStruct((1, lq, hq, d), dtype), jax.ShapeDtypeStruct((1, lk, hk, d), dtype),
          jax.ShapeDtypeStruct((1, lk, hk, d), dtype))


def _fwd_and_bwd(fn):
  def fwd(q, k, v):
    return fn(q, k, v)

  def bwd(q, k, v):
    out, pull = jax.vjp(fn, q, k, v)
    return pull(jnp.ones_like(out))
  return fwd, bwd


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kind", ["causal_traced_offset", "window", "table"])
def test_exports_platform_kernels(kind, platform):
  """Forward (1 kernel) and backward (forward + dq + dkv) lower to the
  platform's Pallas custom calls, bf16, head_dim 64."""
  lq, lk = 40, 64
  specs = _specs(lq, lk, 4, 2, 64, jnp.bfloat16)
  if kind == "causal_traced_offset":
    off = jax.ShapeDtypeStruct((), jnp.int32)
    fn = lambda q, k, v, o: kernels.band_attention(q, k, v, o, window=None, scale=0.125,  # noqa: E731
                                                   block_q=16, block_k=16)
    fwd = fn
    def bwd(q, k, v, o):
      out, pull = jax.vjp(lambda a, b, c: fn(a, b, c, o), q, k, v)
      return pull(jnp.ones_like(out))
    specs = specs + (off,)
  else:
    if kind == "window":
      layout = attn.BlockLayout.sliding_window(lq, kv_len=lk, window=17, block_q=16, block_k=16)
    else:
      layout = attn.BlockLayout.from_mask(_random_mask(np.random.default_rng(0), lq, lk, 16, 16),
                                          block_q=16, block_k=16)
    fwd, bwd = _fwd_and_bwd(functools.partial(glue.block_sparse_attention, layout=layout, scale=0.125))
  ph.assert_kernel_in(ph.export_text(fwd, platform, *specs), platform, at_least=1)
  ph.assert_kernel_in(ph.export_text(bwd, platform, *specs), platform, at_least=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_exports_other_dtypes_and_head_dims(dtype):
  fn = functools.partial(glue.sliding_window_attention, window=9, scale=0.1)
  fwd, bwd = _fwd_and_bwd(fn)
  specs = _specs(24, 24, 2, 1, 256 if dtype == jnp.float32 else 72, dtype)
  for platform in ("tpu", "cuda"):
    ph.assert_kernel_in(ph.export_text(bwd, platform, *specs), platform, at_least=3)


# -------------------------------------------------- compiled on a real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", BAND_CASES, ids=_band_id)
def test_gpu_band_matches_reference(case):
  b, lq, lk, hq, hk, d, off, window, bq, bk, dtype, _ = case
  args = _qkv(jax.random.key(lq), b, lq, lk, hq, hk, d, dtype)
  fn = functools.partial(kernels.band_attention, q_offset=off, window=window, scale=d ** -0.5,
                         block_q=bq, block_k=bk, variant="gpu")
  _check(jax.jit(lambda q, k, v: fn(q, k, v)), _band_mask(lq, lk, off, window), args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_random_layout_and_nan_region(dtype):
  rng = np.random.default_rng(0)
  mask = _random_mask(rng, 45, 51, 16, 16)
  layout = attn.BlockLayout.from_mask(mask, block_q=16, block_k=16)
  args = _qkv(jax.random.key(0), 1, 45, 51, 4, 2, 64, dtype)
  _check(functools.partial(glue.block_sparse_attention, layout=layout, scale=0.125, variant="gpu"),
         mask, args, dtype)
  test_nan_in_unseen_keys_never_reaches_outputs_or_grads("window", "gpu")


@pytest.mark.gpu
def test_gpu_ops_default_variant_runs_compiled():
  q, k, v = _qkv(jax.random.key(0), 1, 200, 200, 4, 2, 128, jnp.bfloat16)
  out = attn.dense_attention(q, k, v, implementation="pallas")
  ref = attn.dense_attention(q, k, v, implementation="reference")
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2,
                              rtol=2e-2)
