"""Public entry of the block-sparse kernels: padding, `custom_vjp`, dispatch.

`band_attention` (causal / sliding window, tables computed on the device
from a possibly traced `q_offset`) and `table_attention` (tables built on the
host from an arbitrary layout) take user-layout arrays
`q: [batch, q_len, num_q_heads, head_dim]`, `k, v: [batch, kv_len,
num_kv_heads, head_dim]` and return an array like `q`. Inside: head_dim is
zero padded by each variant (TPU: multiple of 128, GPU: power of two >= 16),
sequences are padded to whole
blocks, heads are moved before positions, and one `jax.custom_vjp` runs the
forward kernel and the dq / dkv kernels of the platform chosen at lowering
time (`pallas_kernels.platform.dispatch`). jit, vmap, grad and checkpoint
compose with it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform
from pallas_kernels.block_sparse import common, gpu, tpu
from pallas_kernels.block_sparse.common import Spec, Tables
from pallas_kernels.common import next_pow2

# Runs compiled and tested on real hardware (empty: none recorded). `attn`
# selects these kernels for `implementation=None` only on a backend listed
# here, e.g.
#   platform.HardwareCheck("gpu", "NVIDIA H100 80GB HBM3", "2026-..-..",
#                          "pytest -m gpu tests/test_pallas_block_sparse.py; "
#                          "python -m eval.bench_kernels")
HARDWARE_CHECKS: tuple[platform.HardwareCheck, ...] = ()


def check_blocks(block_q: int, block_k: int):
  """Both variants: powers of two >= 16 (Triton), hence multiples of 8 (TPU)."""
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"{name}={val}: the Pallas kernels need a power of two >= 16; "
                       "build the layout with such blocks.")


def _pad_rows(x, rows):
  """`[B, L, H, D] -> [B, rows, H, D]` zero padded (no copy when `L == rows`)."""
  extra = rows - x.shape[1]
  return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))


def _to_kernel(x, rows):
  """`[B, L, H, D] -> [B, H, rows, D]` zero padded (head_dim is padded by
  each platform variant: TPU to a multiple of 128, GPU to a power of two)."""
  return jnp.swapaxes(_pad_rows(x, rows), 1, 2)


def _from_kernel(x, l):
  return jnp.swapaxes(x, 1, 2)[:, :l]


# ----------------------------------------------------------- custom_vjp core


def _fwd_call(q, k, v, tabs, spec, variant):
  return platform.dispatch((q, k, v, tabs), tpu=functools.partial(tpu.fwd, spec=spec),
                           gpu=functools.partial(gpu.fwd, spec=spec), variant=variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, tabs, spec, variant):
  return _fwd_call(q, k, v, tabs, spec, variant)[0]


def _attention_fwd(q, k, v, tabs, spec, variant):
  o, lse = _fwd_call(q, k, v, tabs, spec, variant)
  return o, (q, k, v, tabs, o, lse)


def _attention_bwd(spec, variant, res, do):
  q, k, v, tabs, o, lse = res
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)     # the backward's heads-first K, V
  if platform.targets_tpu(variant):
    tpu.check_smem(spec, transposed=True)
  # Each platform forms delta = rowsum(o * do) in its own layout (TPU: a
  # kernel writing the lane-dense rows its kernels read, `tpu.delta_rows`).
  dq, dk, dv = platform.dispatch(
      (q, k, v, do, lse, o, tabs), tpu=functools.partial(tpu.bwd, spec=spec),
      gpu=functools.partial(gpu.bwd, spec=spec), variant=variant)
  return dq, jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2), jax.tree.map(lambda _: None, tabs)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _run(q, k, v, tabs: Tables, spec: Spec, variant):
  if platform.targets_tpu(variant):
    tpu.check_smem(spec, transposed=False)
  lq = q.shape[1]
  # The forward reads K and V in the caller's [B, Lk, Hk, D] layout (padded
  # only when Lk is not a whole number of blocks): a decode step copies no
  # cache; the backward makes its heads-first copies itself.
  args = (_to_kernel(q, spec.num_q_blocks * spec.block_q),
          _pad_rows(k, spec.num_k_blocks * spec.block_k),
          _pad_rows(v, spec.num_k_blocks * spec.block_k))
  if spec.count_visits:
    o, _, visits = _fwd_call(*args, tabs, spec, variant)
    return _from_kernel(o, lq), visits
  return _from_kernel(_attention(*args, tabs, spec, variant), lq)


def base_spec(q, k, *, mode, block_q, block_k, scale, window, width, width_t, count_visits,
               gpu_blocks=None, tiles=0, offset_hint=0):
  check_blocks(block_q, block_k)
  lq, hq = q.shape[1], q.shape[2]
  lk, hk = k.shape[1], k.shape[2]
  return Spec(mode=mode, q_len=lq, kv_len=lk, block_q=block_q, block_k=block_k,
              num_q_blocks=-(-lq // block_q), num_k_blocks=-(-lk // block_k),
              width=width, width_t=width_t, groups=hq // hk, scale=float(scale),
              window=window, count_visits=count_visits, gpu_blocks=gpu_blocks, tiles=tiles,
              offset_hint=offset_hint)


# -------------------------------------------------------------- entry points


def band_attention(q, k, v, q_offset, *, window: int | None, scale: float,
                   block_q: int = 128, block_k: int = 128, variant=None,
                   count_visits: bool = False, gpu_blocks: gpu.GpuBlocks | None = None,
                   kv_limit=None):
  """Causal (`window=None`) or sliding-window attention.

  Query `i` sits at position `q_offset + i` (int or traced int32 scalar) and
  sees keys `c` with `0 <= q_offset + i - c < window`. Key blocks are
  visited per query block from tables computed on the device from
  `q_offset` (static grid bound); partial tiles are masked from positions.
  `count_visits=True` (forward only, no gradient) also returns int32
  `[B, Hq, nq]`: key blocks each grid row computed. `gpu_blocks`: the GPU
  kernels' own tiles per pass (default `gpu.default_blocks`); each is capped
  at `block_q x block_k`.

  Decode-sized calls read only what they attend: a window's keys are
  sliced out of a longer cache first (`_window_keys`), and with GQA the
  query heads of a kv head share one block's rows (`fold_heads`), so each
  program reads its kv head's keys once.
  """
  if window is not None and q_offset is not None:
    k, v, q_offset, kv_limit = _window_keys(k, v, q_offset, kv_limit, window=int(window),
                                            q_len=q.shape[1], block_k=block_k)
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  fold = (hq // hk if hq > hk and lq <= MAX_FOLD_QUERIES and lq * (hq // hk) <= MAX_FOLD_ROWS
          and not count_visits else 1)
  if fold > 1:
    q = fold_heads(q, hk)
    block_q = max(block_q, next_pow2(lq * fold, 16))
  w = common.CAUSAL if window is None else int(window)
  rows = lq * fold
  spec = base_spec(q, k, mode="band", block_q=block_q, block_k=block_k, scale=scale,
                    window=w, width=common.band_width(rows, lk, w, block_q, block_k),
                    width_t=common.band_width_t(rows, lk, w, block_q, block_k, fold),
                    count_visits=count_visits, gpu_blocks=gpu_blocks,
                    offset_hint=q_offset if isinstance(q_offset, int) else lk - lq)
  spec = dataclasses.replace(spec, fold=fold)
  q_offset = lk - lq if q_offset is None else q_offset
  out = _run(q, k, v, common.band_tables(q_offset, spec, kv_limit), spec, variant)
  return out if fold == 1 else unfold_heads(out, lq)


# Decode-sized calls (at most MAX_FOLD_QUERIES queries, MAX_FOLD_ROWS rows
# once folded) fold a kv head's query heads into the rows of one block: each
# program then reads the kv head's keys once for all of them (`Spec.fold`),
# not once per head.
MAX_FOLD_QUERIES = 16
MAX_FOLD_ROWS = 128


def fold_heads(q, kv_heads: int):
  """`q: [B, Lq, Hq, D]` -> `[B, Lq * G, Hk, D]` with row `t * G + g` = query
  `t` of head `hk * G + g` (`G = Hq // kv_heads`, the heads sharing kv head
  `hk`)."""
  b, lq, hq, d = q.shape
  g = hq // kv_heads
  return q.reshape(b, lq, kv_heads, g, d).transpose(0, 1, 3, 2, 4).reshape(
      b, lq * g, kv_heads, d)


def unfold_heads(x, q_len: int):
  """Inverse of `fold_heads`: `[B, Lq * G, Hk, D]` -> `[B, Lq, Hk * G, D]`."""
  b, rows, hk, d = x.shape
  g = rows // q_len
  return x.reshape(b, q_len, g, hk, d).transpose(0, 1, 3, 2, 4).reshape(b, q_len, hk * g, d)


def _window_keys(k, v, q_offset, kv_limit, *, window: int, q_len: int, block_k: int):
  """`(k, v, q_offset, kv_limit)` cut to the keys a sliding window reaches.

  Queries at `q_offset .. q_offset + q_len - 1` see keys in
  `[q_offset - window + 1, q_offset + q_len - 1]`: `window + q_len - 1`
  positions. When whole blocks holding them (one block of slack for
  alignment) are fewer than `kv_len`, K and V are sliced there (a dynamic
  slice for a traced `q_offset`) and the positions shifted, so a decode
  step against a long cache copies and reads the window, not the cache.
  The slice starts on a block boundary (tiles as in the uncut call) unless
  it is clipped at the end of a cache whose length is not a whole number of
  blocks.
  """
  lk = k.shape[1]
  size = -(-(window + q_len - 1) // block_k) * block_k + block_k
  if size >= lk:
    return k, v, q_offset, kv_limit
  traced = not isinstance(q_offset, int)
  xp = jnp if traced else np
  first = xp.maximum(q_offset - (window - 1), 0) // block_k * block_k
  start = xp.minimum(first, lk - size)
  if traced:
    start = jnp.asarray(start, jnp.int32)
    k, v = (jax.lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (k, v))
  else:
    start = int(start)
    k, v = k[:, start:start + size], v[:, start:start + size]
  return k, v, q_offset - start, None if kv_limit is None else kv_limit - start


@dataclasses.dataclass(frozen=True)
class HostTables:
  """Host (numpy) tables of a table layout, as `table_attention` takes them.

  Named as in `attn.BlockLayout`. `kv_blocks`/`mask_ids`: int32 `[nq, width]`
  key blocks and mask ids per query block (padding slots repeat the last
  valid entry), `num_kv_blocks`: int32 `[nq]`; the `_t` fields the same per
  key block (query blocks, ascending); `block_masks`: int32
  `[num_masks, bq, bk]` 0/1 with id 1 = full; `keys_seen`: bool `[kv_len]`,
  keys some query sees (others are zeroed before the kernels).
  """

  kv_blocks: np.ndarray
  num_kv_blocks: np.ndarray
  mask_ids: np.ndarray
  kv_blocks_t: np.ndarray
  num_kv_blocks_t: np.ndarray
  mask_ids_t: np.ndarray
  block_masks: np.ndarray
  keys_seen: np.ndarray
  q_len: int
  kv_len: int
  block_q: int
  block_k: int


def _full_first(blocks, mids, counts, full):
  """Each row's listed slots reordered full tiles first (stable), padding
  slots repeating the new last entry; returns `(blocks, mids, num_full)`.

  `blocks, mids: [rows, width]`, `counts: [rows]`, `full: [rows, width]`
  bool (the slot's tile needs no mask). Host numpy, O(rows * width).
  """
  active = np.arange(blocks.shape[1])[None, :] < counts[:, None]
  full = full & active
  order = np.argsort(np.where(full, 0, np.where(active, 1, 2)), axis=1, kind="stable")
  blocks, mids = (np.take_along_axis(x, order, 1) for x in (blocks, mids))
  last = np.maximum(counts - 1, 0)[:, None]
  blocks, mids = (np.where(active, x, np.take_along_axis(x, last, 1)) for x in (blocks, mids))
  return blocks, mids, full.sum(axis=1)


def _mask_extents(t: HostTables):
  """int64 `([M], [M])`: per mask id, the most real rows and real columns of
  the tiles listing it (0 for an unused id)."""
  num = t.block_masks.shape[0]
  nq, width = t.kv_blocks.shape
  rows_of = np.minimum(t.block_q, t.q_len - np.arange(nq) * t.block_q)        # [nq]
  cols_of = np.minimum(t.block_k, t.kv_len - t.kv_blocks * t.block_k)         # [nq, width]
  listed = np.arange(width)[None, :] < t.num_kv_blocks[:, None]
  ids = t.mask_ids[listed]
  rows, cols = np.zeros((num,), np.int64), np.zeros((num,), np.int64)
  np.maximum.at(rows, ids, np.broadcast_to(rows_of[:, None], listed.shape)[listed])
  np.maximum.at(cols, ids, cols_of[listed])
  return rows, cols


def table_attention(q, k, v, tables: HostTables, *, scale: float, variant=None,
                    count_visits: bool = False, gpu_blocks: gpu.GpuBlocks | None = None,
                    kv_limit=None, diagonal: bool | None = None):
  """Attention over an arbitrary block layout given as `HostTables`.

  The GPU kernels split each layout tile into their own (smaller) tiles
  (`gpu_blocks`, default `gpu.default_blocks`); the TPU kernels use the
  layout's tiles. `diagonal`: pass the tile masks as diagonal rows
  (`common.diagonal_masks`: 4 (bq + bk - 1) bytes per masked tile instead of
  4 bq bk); None (default) does so whenever every mask is constant along its
  diagonals, False never, True requires it.
  """
  t = tables
  diag = None
  if diagonal is not False and t.block_masks.shape[0] > 2:
    diag = common.diagonal_masks(t.block_masks, *_mask_extents(t))
  if diagonal and diag is None and t.block_masks.shape[0] > 2:
    raise ValueError("diagonal=True: some tile mask of the layout is not constant along its "
                     "diagonals; pass diagonal=None to fall back to tile masks.")
  spec = base_spec(q, k, mode="table", block_q=t.block_q, block_k=t.block_k, scale=scale,
                    window=common.CAUSAL, width=int(t.kv_blocks.shape[1]),
                    width_t=int(t.kv_blocks_t.shape[1]), count_visits=count_visits,
                    gpu_blocks=gpu_blocks, tiles=int(np.sum(t.num_kv_blocks)))
  spec = dataclasses.replace(spec, diag_masks=diag is not None)
  nk = spec.num_k_blocks
  unclipped = (np.arange(nk) + 1) * t.block_k <= t.kv_len          # [nk]: no key past kv_len
  kvb, mids, nf = _full_first(t.kv_blocks, t.mask_ids, t.num_kv_blocks,
                              (t.mask_ids == common.FULL) & unclipped[t.kv_blocks])
  kvb_t, mids_t, nf_t = _full_first(t.kv_blocks_t, t.mask_ids_t, t.num_kv_blocks_t,
                                    (t.mask_ids_t == common.FULL) & unclipped[:, None])
  i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  tabs = Tables(i32(kvb).reshape(-1), i32(t.num_kv_blocks),
                i32(mids).reshape(-1), i32(kvb_t).reshape(-1),
                i32(t.num_kv_blocks_t), i32(mids_t).reshape(-1),
                i32(t.block_masks if diag is None else diag),
                jnp.array([0, t.kv_len], jnp.int32),
                jnp.zeros((spec.num_q_blocks,), jnp.int32), i32(nf),
                jnp.zeros((nk,), jnp.int32), i32(nf_t))
  if not bool(t.keys_seen.all()):
    seen = jnp.asarray(t.keys_seen)[None, :, None, None]
    k = jnp.where(seen, k, jnp.zeros((), k.dtype))
    v = jnp.where(seen, v, jnp.zeros((), v.dtype))
  return _run(q, k, v, tabs, spec, variant)
