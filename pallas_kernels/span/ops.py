"""Public entries of the span family: interval attention (the kernels, with
their `jax.custom_vjp`) and superlinear span attention built on it.

`interval_attention(q, k, v, lo, hi)`: row `r` of `q` attends keys
`[lo[r], hi[r]]` (one softmax); returns `(o, lse)`. Its VJP takes cotangents
for both outputs (the log-sum-exp one folds into the row's `delta`), which is
what lets span attention merge softmaxes and mix them by gates in plain jnp
and still get exact gradients from the kernels.

`span_attention(q, k, v, anchors, gates, ...)`: superlinear step 2 and 3:
`out_i = sum_k g_ik O_ik`, `O_ik` = softmax attention of `q_i` over
`span_ik U window_i`. Computed as one window call (rows = queries) and one
span call (rows = (slot, head, query) pairs sorted by span start), merged by
log-sum-exp and mixed by the gates (elementwise jnp, `O(L K D)`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

import numpy as np

from pallas_kernels import cost, platform
from pallas_kernels.span import common, gpu, merge, tpu
from pallas_kernels.span.remat import remat_scan
from pallas_kernels.common import (F32, next_pow2, pad_head_dim, round_up, span_bounds,
                                   span_lengths)

# Records of runs compiled and tested on real hardware (`pytest -m gpu` /
# `-m tpu` on tests/test_pallas_span.py plus the benchmark). Empty: none
# recorded, so `implementation=None` keeps choosing xla.
# A record such as
#   platform.HardwareCheck("gpu", "NVIDIA H100 80GB HBM3", "2026-..-..",
#                          "pytest -m gpu tests/test_pallas_span.py")
# is what lets `None` pick the kernels on that backend.
HARDWARE_CHECKS: tuple[platform.HardwareCheck, ...] = ()
_DEFAULT_BLOCKS = {"tpu": (128, 128)}   # GPU: `gpu.default_blocks` (per dtype, pass)
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class _Cfg:
  scale: float
  block_q: int | None
  block_k: int | None
  variant: str | None
  expected_keys: int | None = None   # sum of interval lengths per (batch, head)


def default_blocks(platform_name: str, *, forward: bool, dtype,
                   head_dim: int = 128) -> tuple[int, int]:
  """`(block_q, block_k)` of the span kernels before shrinking for short
  inputs: GPU per dtype, pass and padded head_dim (`gpu.default_blocks`),
  TPU `_DEFAULT_BLOCKS`."""
  if platform_name == "gpu":
    return gpu.default_blocks(dtype, forward=forward, head_dim=head_dim)
  return _DEFAULT_BLOCKS[platform_name]


def block_sizes(cfg: _Cfg, platform_name: str, rows: int, kv_len: int, *,
                forward: bool = False, dtype=jnp.bfloat16, head_dim: int = 128):
  """`(block_q, block_k)`: the configured sizes, or `default_blocks` shrunk
  (to a power of two >= 16) for short inputs."""
  dq_, dk_ = default_blocks(platform_name, forward=forward, dtype=dtype, head_dim=head_dim)
  bq = cfg.block_q or next_pow2(min(rows, dq_), _MIN_BLOCK)
  bk = cfg.block_k or next_pow2(min(kv_len, dk_), _MIN_BLOCK)
  for name, x in (("block_q", bq), ("block_k", bk)):
    if x < _MIN_BLOCK or x & (x - 1):
      raise ValueError(f"{name}={x}: must be a power of two >= {_MIN_BLOCK} (Triton "
                       "block dims; TPU bf16 sublane tiles).")
  return bq, bk


def _pad_axis(x, axis, size, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _prepare(platform_name, cfg, q, k, v, lo, hi, *rows_extra, forward=False, qi=None):
  """Pads rows to `block_q`, keys to `block_k`, head_dim for the platform and
  builds the tile table. `rows_extra`: more `[B, H, R, D]` row tensors.
  `qi` (rows by index): `q` holds source rows (head_dim padded only) and
  `qi` int32 `[B, H, R]` is padded with row 0 (padded rows are empty)."""
  r, d = lo.shape[2], q.shape[3]
  lk = k.shape[2]
  dp = pad_head_dim(d, platform_name)
  bq, bk = block_sizes(cfg, platform_name, r, lk, forward=forward, dtype=q.dtype,
                       head_dim=dp)
  rp, lkp = round_up(r, bq), round_up(lk, bk)
  pad_rd = lambda x: _pad_axis(_pad_axis(x, 2, rp), 3, dp)  # noqa: E731
  q_p = pad_rd(q) if qi is None else _pad_axis(q, 3, dp)
  qi_p = None if qi is None else _pad_axis(qi, 2, rp)
  lo_p = _pad_axis(lo, 2, rp, common.EMPTY_LO)
  hi_p = _pad_axis(hi, 2, rp, common.EMPTY_HI)
  tlo, thi = common.tile_bounds(lo_p, hi_p, bq)
  tile_tbl = jnp.stack([tlo, thi], axis=2)                   # [B, H, 2, T]
  kp = _pad_axis(_pad_axis(k, 2, lkp), 3, dp)
  vp = _pad_axis(_pad_axis(v, 2, lkp), 3, dp)
  return dict(bq=bq, bk=bk, r=r, lk=lk, d=d, q=q_p, qi=qi_p, k=kp, v=vp,
              lo=lo_p, hi=hi_p, tile_tbl=tile_tbl,
              tlo=tlo, thi=thi, extra=[pad_rd(x) for x in rows_extra])


_MODULES = {"tpu": tpu, "gpu": gpu}


def _cost_kw(platform_name, cfg, p):
  """Static arguments of the `pallas_kernels.cost` span functions (`heads`:
  the row heads); key blocks from `cfg.expected_keys` (`cost.span_key_blocks`:
  the tiles' spread plus one block per tile; a lower bound when None)."""
  b, h, rp = p["lo"].shape
  blocks = cost.span_key_blocks(rp, cfg.expected_keys or 0, p["lk"], p["bq"], p["bk"])
  return dict(batch=b, heads=h, head_dim=p["d"], block_q=p["bq"], block_k=p["bk"],
              itemsize=jnp.dtype(p["q"].dtype).itemsize, platform=platform_name), b * h * blocks


def _query_rows(platform_name, q, rows):
  """`(q, qi)` for the kernels: the GPU kernels gather the rows of a
  permuted copy (`rows = (perm, inv)`, `interval_attention`) by index
  themselves (`qi = perm % Rq`); the TPU ones get the rows gathered here."""
  if rows is None:
    return q, None
  perm = rows[0]
  b, h, rq, d = q.shape
  if platform_name == "gpu":
    return q, perm % rq
  copies = perm.shape[2] // rq
  rep = jnp.broadcast_to(q[:, :, None], (b, h, copies, rq, d)).reshape(b, h, copies * rq, d)
  return common.gather_rows(rep, perm, -2), None


def _fwd_variant(platform_name, cfg, q, k, v, lo, hi, rows, *, interpret):
  q, qi = _query_rows(platform_name, q, rows)
  p = _prepare(platform_name, cfg, q, k, v, lo, hi, forward=True, qi=qi)
  kw, blocks = _cost_kw(platform_name, cfg, p)
  extra = {} if qi is None else dict(qi=p["qi"])
  o, lse = _MODULES[platform_name].fwd(
      p["q"], p["k"], p["v"], p["lo"], p["hi"], p["tile_tbl"],
      scale=cfg.scale, block_q=p["bq"], block_k=p["bk"], interpret=interpret,
      cost_estimate=cost.span_fwd(rows=p["lo"].shape[2], key_blocks=blocks, **kw), **extra)
  return o[:, :, :p["r"], :p["d"]], lse[:, :, :p["r"]]


def _bwd_variant(platform_name, cfg, q, k, v, lo, hi, rows, do, lse, delta, *, interpret):
  q, qi = _query_rows(platform_name, q, rows)
  p = _prepare(platform_name, cfg, q, k, v, lo, hi, do, qi=qi)
  (do_p,) = p["extra"]
  rp = p["lo"].shape[2]
  # Padded rows are empty: lse/delta values there are never used.
  lse_p = _pad_axis(lse, 2, rp)
  delta_p = _pad_axis(delta, 2, rp)
  nkb = p["k"].shape[2] // p["bk"]
  t0, cnt = common.key_block_tiles(p["tlo"], p["thi"], nkb, p["bk"])
  kv_tbl = jnp.stack([t0, cnt], axis=2)                       # [B, H, 2, nkb]
  mod = _MODULES[platform_name]
  ckw, blocks = _cost_kw(platform_name, cfg, p)
  kw = dict(scale=cfg.scale, block_q=p["bq"], block_k=p["bk"], interpret=interpret)
  if qi is not None:
    kw["qi"] = p["qi"]
  args = (p["q"], p["k"], p["v"], do_p, lse_p, delta_p, p["lo"], p["hi"],
          p["tile_tbl"])
  dq = mod.dq(*args, **kw, cost_estimate=cost.span_dq(rows=rp, key_blocks=blocks, **ckw))
  # dk/dv: one program per kv head and key block.
  dk, dv = mod.dkv(*args, kv_tbl, **kw, cost_estimate=cost.span_dkv(
      kv_len=p["k"].shape[2], tile_visits_t=blocks, **dict(ckw, heads=p["k"].shape[1])))
  r, lk, d = p["r"], p["lk"], p["d"]
  return dq[:, :, :r, :d], dk[:, :, :lk, :d], dv[:, :, :lk, :d]


def _dispatch(fn, cfg, *args):
  return platform.dispatch(
      args, tpu=functools.partial(fn, "tpu", cfg), gpu=functools.partial(fn, "gpu", cfg),
      variant=cfg.variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _interval(cfg, q, k, v, lo, hi, rows):
  return _dispatch(_fwd_variant, cfg, q, k, v, lo, hi, rows)


def _interval_fwd(cfg, q, k, v, lo, hi, rows):
  o, lse = _dispatch(_fwd_variant, cfg, q, k, v, lo, hi, rows)
  return (o, lse), (q, k, v, lo, hi, rows, o, lse)


def _interval_bwd(cfg, res, cts):
  q, k, v, lo, hi, rows, o, lse = res
  do, dlse = cts
  # d lse_r / d s_rj = P_rj: the lse cotangent joins delta (dS = P (dP - delta)).
  delta = jnp.sum(do.astype(F32) * o, axis=-1) - dlse.astype(F32)
  dq, dk, dv = _dispatch(_bwd_variant, cfg, q, k, v, lo, hi, rows, do.astype(q.dtype), lse,
                         delta)
  if rows is not None:   # per-row dq back to the source rows: sum over the copies
    b, h, rq, d = q.shape
    dq = common.gather_rows(dq, rows[1], -2)
    dq = dq.reshape(b, h, -1, rq, d).astype(F32).sum(axis=2)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None,
          None if rows is None else (None, None))


_interval.defvjp(_interval_fwd, _interval_bwd)


def interval_attention(q, k, v, lo, hi, *, scale: float, block_q: int | None = None,
                       block_k: int | None = None, variant=None,
                       expected_keys: int | None = None, rows=None):
  """Row `r` attends keys `[lo[r], hi[r]]` (inclusive) with one softmax.

  Args:
    q: `[B, H, R, D]` rows (`H` row heads, each any queries of one kv head's
      group, in any order); with `rows`, `[B, H, Rq, D]` source rows.
    k, v: `[B, Hk, Lk, D]` (kv heads, `H % Hk == 0`: row head `h` attends
      kv head `h // (H / Hk)`; float32 / bfloat16 / float16 like q).
    lo, hi: int32 `[B, H, R]`; `hi < lo` is an empty row (output 0,
      lse -inf). Must satisfy `0 <= lo`, `hi < Lk` for non-empty rows.
    scale: score scale.
    block_q, block_k: tile sizes (powers of two >= 16); None: per-platform
      defaults (`default_blocks`: TPU 128 x 128; GPU 64 x 64, the 16-bit
      forward 256 x 32 (head_dim 256: 128 x 64), float32 32 x 16) shrunk
      for short inputs. The
      compiled TPU kernels need `block_q` a multiple of 128 or one tile for
      all rows (`tpu.check_block_q`: lane-dense per-row vectors).
    variant: see `pallas_kernels.platform`.
    expected_keys: the expected sum of the rows' interval lengths per
      (batch, head), a Python int for the kernels' `cost_estimate` only
      (None: a lower bound).
    rows: None, or `(perm, inv)` int32 `[B, H, R]`: the rows are a
      permutation of `R / Rq` copies of q's rows (copy-major): row `r` is
      q's row `perm[r] % Rq`; `inv` is `perm`'s inverse. The GPU kernels
      gather those rows by index (no `[R, D]` copy); TPU gathers them
      before its kernels. dq sums over the copies.

  Returns:
    `(o [B, H, R, D] in q's dtype, lse [B, H, R] float32)`, differentiable
    in q, k, v (both outputs).
  """
  platform.check_variant(variant)
  if k.shape != v.shape or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
    raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)}: both must be "
                     f"[B, Hk, Lk, D] with q's {q.shape[1]} row heads a multiple of Hk.")
  cfg = _Cfg(float(scale), block_q, block_k, variant,
             None if expected_keys is None else int(expected_keys))
  if rows is not None:
    rows = tuple(jnp.asarray(x, jnp.int32) for x in rows)
    if (len(rows) != 2 or any(x.shape != lo.shape for x in rows)
        or q.shape[:2] != lo.shape[:2] or lo.shape[2] % q.shape[2]):
      raise ValueError(
          f"rows: expected (perm, inv), both int32 {tuple(lo.shape)} like lo, with "
          f"R = {lo.shape[2]} a multiple of q's {q.shape[2]} rows and q's [B, H] = "
          f"{tuple(q.shape[:2])} equal to lo's; got shapes "
          f"{[tuple(x.shape) for x in rows]}.")
  return _interval(cfg, q, k, v, lo.astype(jnp.int32), hi.astype(jnp.int32), rows)


# ------------------------------------------------------------ span attention


def span_attention(q, k, v, anchors, gates, *, span_table, window: int, scale: float,
                   q_offset=None, block_q: int | None = None, block_k: int | None = None,
                   variant=None, gates_from_logits: bool = False,
                   query_chunk: int | None = None, remat_chunks: bool = False):
  """Superlinear span attention: gated mix of (span U window) softmaxes.

  Args:
    q: `[B, Lq, Hq, D]`; k, v: `[B, Lk, Hk, D]` (`Hq % Hk == 0`).
    anchors: int32 `[B, Hq, K, Lq]` selected anchors (-1 = invalid slot),
      query axis last (the layout `stripe.search_topk(heads_first=True)`
      returns).
    gates: float32 `[B, Hq, K, Lq]` mixing weights (differentiable).
    span_table: int32 `[Lk + 1, 2]`: `(back, fwd)` span lengths per
      `t = pos + 1` (the shared integer table).
    window: `W` (static); the window is `[pos - W + 1, pos]`, spans end at
      `pos - W` at the latest.
    scale: score scale.
    q_offset: absolute position of `q[:, 0]` (int or traced int32 scalar;
      None: `Lk - Lq`).
    block_q, block_k, variant: as in `interval_attention`.
    gates_from_logits: `gates` holds gate logits (invalid slots already at a
      large negative value); the mixing weights are their softmax over the
      `K` slots, taken here on the pair rows (`common.slot_softmax`), where
      the slots are slices and XLA:TPU needs no relayout.
    query_chunk: None, or queries per step of a `lax.scan` over the query
      axis when `Lq > query_chunk` (the last chunk padded with queries
      whose outputs are dropped). Every query is independent, so the
      result is the same; the pair rows, their sort and the kernels' row
      tables are then sized by the chunk, not by `Lq`: temporaries and
      (on TPU) compile time stop growing with `Lq`. k and v's gradients
      sum over the chunks in float32 (without `remat_chunks`, 16-bit k and
      v enter the scan as float32 copies for that).
    remat_chunks: with `query_chunk`, recompute each chunk in the backward
      (`span.remat.remat_scan`: the forward keeps only the chunks' inputs,
      the backward runs each chunk's forward, kernels included, again under
      `jax.vjp` and sums k and v's cotangents in float32 carries), so the
      temporaries hold one chunk's pair outputs and tables (deviceless, 1M
      tokens, grad: v5p 8:2 21.94 -> 13.67 GiB, v4 released 8:2 31.03 ->
      14.05 GiB, H100 released 32:8 79.04 -> 41.19 GB) at the cost of a
      second span forward.

  Returns:
    `[B, Lq, Hq, D]` in q's dtype; with `gates_from_logits`, `(out, weights
    float32 [B, Hq, K, Lq])`. Gradients flow to q, k, v and gates.

  Layout: every row table is flat with the query axis last (window rows
  ordered head, query; pair rows slot, head, query), built and cut by
  `common.to_pair_rows` / `split_rows` / `tile_rows`: XLA:TPU compiles a
  reshape that merges or splits a tiny axis (G heads, K slots) into or out
  of the query axis into code linear in `Lq`.
  """
  b, lq, hq, _ = q.shape
  num = anchors.shape[2]
  if anchors.shape != (b, hq, num, lq) or gates.shape != anchors.shape:
    raise ValueError(f"anchors {anchors.shape} / gates {gates.shape}: both must be "
                     f"[B, Hq, K, Lq] = [{b}, {hq}, K, {lq}] (query axis last).")
  if query_chunk is not None and (int(query_chunk) != query_chunk or query_chunk < 1):
    raise ValueError(f"query_chunk={query_chunk!r}: must be None or a positive int "
                     "(queries per scan step).")
  kw = dict(window=window, scale=scale, block_q=block_q, block_k=block_k, variant=variant,
            gates_from_logits=gates_from_logits)
  lk = k.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  static_off = q_offset if isinstance(q_offset, int) else lk - lq
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # [B, Hk, Lk, D]
  per_head = hq // common.row_heads(hq, k.shape[2])     # query heads per row head
  if query_chunk is None or lq <= query_chunk:
    pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(lq, dtype=jnp.int32)
    keys = _expected_keys(span_table, static_off, lq, window, per_head, num)
    return _span_rows(q, kt, vt, anchors, gates, pos, span_lengths(span_table, pos),
                      keys=keys, **kw)
  chunk = int(query_chunk)
  # Cost estimates of the last (longest-reaching) chunk.
  keys = _expected_keys(span_table, static_off + lq - chunk, chunk, window, per_head, num)
  return _span_chunks(q, kt, vt, anchors, gates, q_offset, span_table, chunk, keys=keys,
                      remat=bool(remat_chunks), **kw)


def _span_chunks(q, kt, vt, anchors, gates, q_offset, span_table, chunk: int, *,
                 remat: bool, **kw):
  """`span_attention` as a `lax.scan` over chunks of `chunk` queries.

  The query axis is padded to `n * chunk` (padded queries: invalid anchors,
  outputs dropped) and cut before the scan (q by a reshape, the tables by
  stacked slices), so the scan's inputs and outputs are its stacked slices
  (no dynamic slicing, no full-size cotangent accumulated per step for q).
  The span lengths are looked up before the scan (a gather from the span
  table inside the loop body fails to compile for v5p: XLA:TPU offloads it
  to the SparseCore).
  """
  b, lq, hq, d = q.shape
  num = anchors.shape[2]
  n = -(-lq // chunk)
  pad = n * chunk - lq
  pad_q = lambda x, axis, value=0: x if not pad else jnp.pad(  # noqa: E731
      x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)], constant_values=value)
  qs = jnp.moveaxis(pad_q(q, 1).reshape(b, n, chunk, hq, d), 1, 0)       # [n, B, c, Hq, D]
  # [B, Hq, K, Lq] -> [n, B, Hq, K, c] by slices stacked (their VJP: a
  # concatenation): a reshape of the query axis would relayout these tables
  # (tiled on (K, Lq)) on TPU, in code linear in Lq.
  cut = lambda x, value: jnp.stack(  # noqa: E731
      common.split_rows(pad_q(x, 3, value), n, -1), axis=0)
  pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(n * chunk, dtype=jnp.int32)
  per_chunk = lambda x: x.reshape(n, chunk)  # noqa: E731
  back, fwd = span_lengths(span_table, pos)
  xs, ints = (qs, cut(gates, 0)), (cut(anchors, -1), per_chunk(pos), per_chunk(back),
                                    per_chunk(fwd))
  def one(kv, x, i):   # one chunk: x = (q, gates), i = (anchors, pos, back, fwd)
    (qc, gc), (ac, pc, bc, fc) = x, i
    return _span_rows(qc, *kv, ac, gc, pc, (bc, fc), **kw)

  if remat:   # chunks recomputed in the backward; k, v cotangents summed in float32
    res = remat_scan(one, (kt, vt), xs, ints)
  else:
    # Constants of the scan get their cotangents summed over the steps in
    # their own dtype: float32 for 16-bit k and v.
    wide = lambda x: x.astype(F32) if jnp.dtype(x.dtype).itemsize < 4 else x  # noqa: E731
    kf, vf = wide(kt), wide(vt)
    _, res = jax.lax.scan(
        lambda _, c: (None, one((kf.astype(kt.dtype), vf.astype(vt.dtype)), *c)), None,
        (xs, ints))
  out, weights = res if kw["gates_from_logits"] else (res, None)
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, hq, d)[:, :lq]
  if weights is None:
    return out
  return out, jnp.concatenate(common.unstack(weights, 0), axis=-1)[..., :lq]


def _span_rows(q, kt, vt, anchors, gates, pos, lengths, *, keys, window: int, scale: float,
               block_q, block_k, variant, gates_from_logits: bool):
  """`span_attention` on all queries at once: `kt, vt: [B, Hk, Lk, D]`;
  `pos`, `lengths` (span back / fwd) int32 `[Lq]`; `keys`: the cost
  estimates' `(window keys, span keys)` per row head.

  Rows live in `hv = common.row_heads(Hq, Hk)` row heads of `g` query heads
  each (all of one kv head's group): every per-row table is `[B, hv, n]`."""
  b, lq, hq, d = q.shape
  lk = kt.shape[2]
  hv = common.row_heads(hq, kt.shape[1])
  g, num = hq // hv, anchors.shape[2]
  kw = dict(scale=scale, block_q=block_q, block_k=block_k, variant=variant)
  rq = g * lq                                                     # rows per slot
  qh = q.transpose(0, 2, 1, 3).reshape(b, hv, rq, d)             # rows (head, query)
  keys_w, keys_s = keys

  # Window: rows (head, query).
  if window > 0:
    wlo, whi = common.window_bounds(pos, window, lk)
    rows = lambda x: jnp.broadcast_to(common.tile_rows(x, g), (b, hv, rq))  # noqa: E731
    o_w, lse_w = interval_attention(qh, kt, vt, rows(wlo), rows(whi), expected_keys=keys_w,
                                    **kw)
  else:
    o_w = jnp.zeros((b, hv, rq, d), q.dtype)
    lse_w = jnp.full((b, hv, rq), -jnp.inf, F32)

  # Spans: (slot, head, query) rows, sorted by start for the kernel.
  back, fwd = lengths                                             # [Lq]
  per_row = lambda x: common.tile_rows(x, num * g)  # noqa: E731  [Lq] -> [N]
  a = common.to_pair_rows(anchors.astype(jnp.int32).reshape(b, hv, g, num, lq))
  slo, shi = span_bounds(a, per_row(pos), per_row(back), per_row(fwd), window)
  perm = common.sort_rows_by_start(slo, shi)                     # [B, hv, N]
  inv = common.inverse_permutation(perm)
  # q rows per pair: row r is (head, query) row perm[r] % (G Lq) of qh,
  # gathered by index (GPU: inside the kernels); dq sums the slots' rows
  # gathered by `inv` (no scatter-add of [N, D] rows).
  take = lambda x: common.gather_rows(x, perm, -1)  # noqa: E731
  o_p, lse_p = interval_attention(qh, kt, vt, take(slo), take(shi), expected_keys=keys_s,
                                  rows=(perm, inv), **kw)
  lse_s = common.split_rows(common.permute_rows(lse_p, inv, perm, -1), num, -1)

  # Merge-and-gate epilogue on per-row weights: out = sum_k c_k O_k + c_w O_w,
  # so no float32 [pairs, D] array is formed (O_k stay in q's dtype); slots
  # as slices of the slot-major rows, never a slot axis.
  gates_s = common.split_rows(
      common.to_pair_rows(gates.astype(F32).reshape(b, hv, g, num, lq)), num, -1)
  if gates_from_logits:
    gates_s = common.slot_softmax(gates_s)
  c_s, c_w = common.gate_merge_weights(lse_s, lse_w, gates_s)
  out = merge.mix_rows(o_w, o_p, perm, inv, c_w, c_s)           # [B, hv, g Lq, D]
  out = out.reshape(b, hq, lq, d).transpose(0, 2, 1, 3).astype(q.dtype)
  if not gates_from_logits:
    return out
  weights = common.from_pair_rows(jnp.concatenate(gates_s, axis=-1), g, num)
  return out, weights.reshape(b, hq, num, lq)


def _expected_keys(span_table, q_offset: int, lq: int, window: int, group: int, num: int):
  """`(window keys, span keys)` summed over the rows of one (batch, row head)
  (for the kernels' cost estimates only): exact from a concrete span table,
  the span keys None when it is traced."""
  pos = q_offset + np.arange(lq, dtype=np.int64)
  keys_w = group * int(np.minimum(pos + 1, window).sum()) if window > 0 else 0
  try:
    table = np.asarray(span_table, np.int64)
  except (TypeError, jax.errors.TracerArrayConversionError):
    return keys_w, None
  t = np.clip(pos + 1, 0, table.shape[0] - 1)
  per = np.clip(table[t, 0] + table[t, 1] + 1, 0, np.maximum(pos + 1 - window, 0))
  return keys_w, group * num * int(per.sum())
