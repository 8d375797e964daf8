"""Public entries of the stripe kernels: frames, tables, custom_vjp, dispatch.

Shapes follow `attn`: `q: [B, Lq, Hq, D]`, `k, v: [B, Lk, Hk, D]`,
`G = Hq // Hk`; query `i` sits at absolute position `q_offset + i`. Each
entry hands the same arrays to a TPU and a GPU variant
(`pallas_kernels.platform.dispatch`); a variant pads head_dim for its
platform, builds the frames and residue-grouped tables and launches the
kernel bodies (`common.py`: search; `ppa.py`: PPA) through the thin launchers of `tpu.py` /
`gpu.py`.

A traced `q_offset` is clipped to `[0, kv_len - q_len]` so that no window can
leave its frame (the `attn` ops check concrete values).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cost
from pallas_kernels import platform as _platform
from pallas_kernels.stripe import common, gpu, ppa, tpu
from pallas_kernels.common import F32, next_pow2, pad_head_dim, round_up

# Runs of these kernels compiled and tested on real hardware (empty: none
# recorded). One record per backend makes `implementation=None` pick them
# there.
HARDWARE_CHECKS: tuple[_platform.HardwareCheck, ...] = ()


def _unit(plat: str, dtype) -> int:
  """Alignment unit: TPU sublane tile rows; the GPU loads any row (1)."""
  return common.align_for(dtype) if plat == "tpu" else 1


def _block(plat: str, length: int, requested: int | None, unit: int) -> int:
  """Block rows: TPU a multiple of the unit, GPU a power of two >= 16."""
  want = requested or (128 if plat == "tpu" else 64)
  if plat == "tpu":
    return max(unit, min(round_up(want, unit), round_up(length, unit)))
  return max(16, min(next_pow2(want), next_pow2(length)))


def _head_block_q(plat: str, length: int, requested: int | None, unit: int,
                  group: int) -> int:
  """Query rows per head of a GQA-folded kernel (search, PPA forward / dq):
  a program's tile holds `group` times as many rows. Default: TPU 128 per
  head; GPU 64 rows in all (`64 // group` per head, at least 16) so the
  tile's registers do not grow with the group."""
  if requested is None and plat != "tpu":
    requested = max(16, 64 // group)
  return _block(plat, length, requested, unit)


def search_block_q(plat: str, length: int, group: int, dtype=jnp.bfloat16) -> int:
  """Default query rows per head of a span-search program (`search_topk`
  with `block_q=None`) on platform `plat` (`"gpu"` / `"tpu"`)."""
  return _head_block_q(plat, length, None, _unit(plat, dtype), group)


def _clip_offset(q_offset, q_len: int, kv_len: int):
  """None -> `kv_len - q_len`; otherwise clipped into `[0, kv_len - q_len]`."""
  if q_offset is None:
    return jnp.int32(kv_len - q_len)
  return jnp.clip(jnp.asarray(q_offset, jnp.int32), 0, kv_len - q_len)


def _static_offset(q_offset, q_len: int, kv_len: int) -> int | None:
  """`_clip_offset` as a Python int when `q_offset` is None or an int, else
  None (traced)."""
  if q_offset is None:
    return kv_len - q_len
  if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
    return int(min(max(int(q_offset), 0), kv_len - q_len))
  return None


def _heads_first(x, rows: int, dp: int, fill=0):
  """`[B, L, H, W] -> [B, H, rows, dp]` padded at the end with `fill`."""
  x = jnp.moveaxis(x, 2, 1)
  return jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, dp - x.shape[3])),
                 constant_values=fill)


def _launch(plat, body, *, interpret, num_warps=4, **kw):
  """Runs a kernel body on `plat`; `num_warps` (GPU only) per program."""
  if plat == "tpu":
    return tpu.launch_tpu(body, interpret=interpret, **kw)
  return gpu.launch_gpu(body, interpret=interpret, num_warps=num_warps, **kw)


# ----------------------------------------------------------------- search


# Anchors cross float32 inside the TPU search (`tpu._TpuCtx.store_cols`).
_EXACT_F32 = 1 << 24


def _search_variant(plat, qs, ks, f, qoff, *, num, fmax, block_q, heads_first, f_host,
                    qoff_host, interpret):
  b, lq, hq, ds = qs.shape
  lk, hk = ks.shape[1], ks.shape[2]
  grp = hq // hk
  unit = _unit(plat, ks.dtype)
  bq = _head_block_q(plat, lq, block_q, unit, grp)
  dp = pad_head_dim(ds, plat)
  lq_pad = round_up(lq, bq)
  front = round_up(max(fmax - 1, 0), max(unit, 8))
  rows = round_up(front + lk + lq_pad + 2 * max(unit, 8), max(unit, 8))
  kp = next_pow2(num)
  if plat == "tpu" and lk >= _EXACT_F32:
    raise ValueError(f"kv_len={lk}: the TPU search writes anchors through float32 "
                     f"(exact below {_EXACT_F32}).")
  count = int(f.shape[0])
  # Ascending deltas (anchor = row + delta), padded with `lk` (no anchor):
  # each program visits the run of stripes with an anchor in its block.
  deltas = jnp.pad(jnp.sort(qoff + 1 - f), (0, next_pow2(max(count, 1)) - count),
                   constant_values=lk)
  body = functools.partial(common.search_body, num=num, bq=bq, group=grp, lk=lk,
                           front=front, count=count)
  visits = None if f_host is None or qoff_host is None else cost.stripe_visits(
      qoff_host + 1 - f_host, q_blocks=lq_pad // bq, block_q=bq, kv_len=lk)
  est = cost.stripe_search(batch=b, q_heads=hq, kv_heads=hk, head_dim=ds, q_len=lq_pad,
                           stripes=count, num_spans=num, block_q=bq,
                           itemsize=ks.dtype.itemsize, platform=plat, unit=max(unit, 1),
                           visits=visits)
  anc, sc = _launch(
      plat, body, interpret=interpret, grid=(b, hk, lq_pad // bq),
      tables=[deltas],
      blocks=[(_heads_first(qs, lq_pad, dp), bq, "heads")],
      frames={"ks": (common.to_frame(ks, front, rows, dp), "same")},
      outs=[(jax.ShapeDtypeStruct((b, hq, lq_pad // bq, kp, bq), jnp.int32), bq, "heads"),
            (jax.ShapeDtypeStruct((b, hq, lq_pad // bq, kp, bq), F32), bq, "heads")],
      group=grp, unit=unit, buf_rows=bq, cost=est)

  def back(x):   # lane-dense [B, Hq, nq, K, bq] -> [B, Hq, K, Lq]
    x = jnp.swapaxes(x, 2, 3).reshape(b, hq, kp, lq_pad)[:, :, :num, :lq]
    return x if heads_first else jnp.transpose(x, (0, 3, 1, 2))

  return back(anc), back(sc)


def search_topk(q_search, k_search, stripe_offsets, *, num_spans, q_offset, variant=None,
                block_q=None, heads_first=False):
  """Superlinear span-search: top-`num_spans` stripe anchors per query head.

  Args:
    q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]` (any float dtype;
      scores are float32 and unscaled).
    stripe_offsets: int32 `[S]`, the offsets `f(j)` far to near
      (`attn.masks.superlinear_stripe_table`); the anchor of query `i` for
      stripe `s` is `q_offset + i + 1 - f[s]`, valid iff in `[0, Lk - 1]`.
    num_spans: `K >= 1`.
    q_offset: int or traced int32 scalar, absolute position of query 0.
    variant: see `pallas_kernels.platform`.
    block_q: query rows per head in a program (the program serves the `G`
      query heads of a kv head: `G * block_q` rows; default 128 TPU, GPU
      `max(16, 64 // G)`).
    heads_first: return `[B, Hq, K, Lq]` (query axis last) instead, the
      layout the superlinear glue carries to span attention (XLA:TPU
      compiles reshapes of tables whose tiny K axis follows the query axis
      into code linear in `Lq`).

  Returns:
    `(anchors int32 [B, Lq, Hq, K], scores float32 [B, Lq, Hq, K])`, best
    first, ties to the smaller anchor (the farther stripe); `-1` / `-inf` in
    slots without a valid anchor. Not differentiable (stop_gradient).
  """
  if not isinstance(num_spans, int) or num_spans < 1:
    raise ValueError(f"num_spans={num_spans!r}: must be an int >= 1.")
  lq, lk = q_search.shape[1], k_search.shape[1]
  f_np = None
  if isinstance(stripe_offsets, (np.ndarray, list, tuple)):
    f_np = np.clip(np.asarray(stripe_offsets, np.int64), 1, lk + 1)
    fmax = int(f_np.max()) if f_np.size else 1
  else:
    fmax = lk + 1
  f = jnp.clip(jnp.asarray(stripe_offsets, jnp.int32), 1, lk + 1)
  fmax = min(max(fmax, 1), lk + 1)
  qoff = _clip_offset(q_offset, lq, lk)
  qs, ks = jax.lax.stop_gradient(q_search), jax.lax.stop_gradient(k_search)
  run = lambda plat: functools.partial(  # noqa: E731
      _search_variant, plat, num=num_spans, fmax=fmax, block_q=block_q,
      heads_first=heads_first, f_host=f_np, qoff_host=_static_offset(q_offset, lq, lk))
  return _platform.dispatch((qs, ks, f, qoff), tpu=run("tpu"), gpu=run("gpu"),
                            variant=variant)


# -------------------------------------------------------------------- PPA


# GPU warps of the PPA dq and dk/dv kernels: their float32 accumulators
# (dq; dk and dv) and `[bq, bk]` probability tiles spill at 4 warps and
# head_dim 128 (docs/kernels_stripe.md, compile report).
_BWD_WARPS = 8


class _PpaCfg(NamedTuple):
  dense_runs: tuple
  far_offsets: tuple
  scale: float
  variant: object
  block_q: int | None
  block_k: int | None
  static_offset: int | None = None   # q_offset when known at trace time (clipped)


def _ppa_geometry(plat, q, k, cfg):
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  unit = _unit(plat, k.dtype)
  bq = _head_block_q(plat, lq, cfg.block_q, unit, hq // hk)   # forward / dq, per head
  dp = pad_head_dim(d, plat)
  rows = gpu.ppa_rows(plat, q.dtype, dp)                       # float32 GPU: smaller
  bq_t = _block(plat, lq, cfg.block_q or gpu.ppa_chunk_rows(plat), unit)  # dk/dv query chunks
  bk = _block(plat, lk, cfg.block_k or rows, unit)
  al = max(unit, 8)
  # Frames (`common.to_frame`): a stripe window is moved inside its frame
  # when it leaves it (`ctx.stripe_loop`), so a frame holds only the windows
  # with a row the kernel keeps: `front` rows before row 0 for a window
  # reaching back one block (plus the TPU's aligned `unit` rows), and as many
  # after the last row; band tiles stay within the rows.
  reach = max(bq, bk, bq_t) + unit
  # A whole number of dq blocks: the dq pass reads its query rows from the
  # dk/dv query frames (block `i + front // bq`), no second copy of q / do.
  front = round_up(reach, math.lcm(al, bq))
  return dict(b=b, lq=lq, hq=hq, d=d, lk=lk, hk=hk, unit=unit, bq=bq, bq_t=bq_t, bk=bk,
              al=al, dp=dp, lq_pad=round_up(lq, bq),
              lq_pad_t=round_up(lq, bq_t), lk_pad=round_up(lk, bk), front=front,
              rows_k=round_up(front + lk + reach, al),     # key frames (forward, dq)
              rows_q=round_up(front + lq + reach, al))    # query frames (dk/dv)


def _ppa_costs(plat, q, cfg, g):
  """`pl.CostEstimate`s of the forward, dq and dk/dv kernels (the band
  tiles counted for the default `q_offset = kv_len - q_len`)."""
  qoff = g["lk"] - g["lq"]
  kw = dict(batch=g["b"], q_heads=g["hq"], kv_heads=g["hk"], head_dim=g["d"],
            far_offsets=len(cfg.far_offsets), block_k=g["bk"], itemsize=q.dtype.itemsize,
            platform=plat, unit=max(g["unit"], 1))
  band = sum(cost.band_chunks(g["lq"], g["lk"], qoff, lo, hi, g["bk"], g["bq"], g["unit"])
             for lo, hi in cfg.dense_runs)
  band_t = sum(cost.band_chunks(g["lq"], g["lk"], qoff, lo, hi, g["bq_t"], g["bk"],
                                g["unit"], transposed=True) for lo, hi in cfg.dense_runs)
  vis = functools.partial(cost.ppa_stripe_visits, cfg.far_offsets, q_len=g["lq"],
                          kv_len=g["lk"], q_offset=qoff)
  return (cost.ppa_fwd(q_len=g["lq"], band_tiles=band, block_q=g["bq"],
                       visits=vis(block=g["bq"]), **kw),
          cost.ppa_dq(q_len=g["lq"], band_tiles=band, block_q=g["bq"],
                      visits=vis(block=g["bq"]), **kw),
          cost.ppa_dkv(kv_len=g["lk"], band_chunks_t=band_t, block_q=g["bq_t"],
                       visits=vis(block=g["bk"], transposed=True), **kw))


def _ppa_tables(cfg, qoff, unit, sign):
  """Residue-grouped `qoff - far` tables; host constants when the offset
  is static (`cfg.static_offset`), else sorted on the device."""
  # Farthest first: deltas `qoff - far` ascend within each residue group
  # (the sorts are stable), as `ppa._stripe_loops`' searches need.
  far = np.sort(np.asarray(cfg.far_offsets, np.int32).reshape(-1))[::-1]
  if far.size == 0:
    return jnp.zeros((1,), jnp.int32), jnp.zeros((unit + 1,), jnp.int32)
  if cfg.static_offset is not None:
    return common.group_by_residue_host(cfg.static_offset - far.astype(np.int64), unit,
                                        sign=sign)
  return common.group_by_residue(qoff - jnp.asarray(far), far.size, unit, sign=sign)


def _ppa_fwd_variant(plat, q, k, v, qoff, *, cfg, interpret):
  g = _ppa_geometry(plat, q, k, cfg)
  rows = g["rows_k"]
  deltas, bounds = _ppa_tables(cfg, qoff, g["unit"], 1)
  grp = g["hq"] // g["hk"]
  body = functools.partial(
      ppa.ppa_fwd_body, bq=g["bq"], bk=g["bk"], bands=cfg.dense_runs, group=grp,
      lq=g["lq"], lk=g["lk"], front=g["front"], unit=g["unit"], scale=cfg.scale)
  frame = lambda x: common.to_frame(x, g["front"], rows, g["dp"])  # noqa: E731
  o, lse = _launch(
      plat, body, interpret=interpret, grid=(g["b"], g["hk"], g["lq_pad"] // g["bq"]),
      tables=[common.pad_table(qoff[None]), deltas, bounds],
      blocks=[(_heads_first(q, g["lq_pad"], g["dp"]), g["bq"], "heads")],
      frames={"k": (frame(k), "same"), "v": (frame(v), "same")},
      outs=[(jax.ShapeDtypeStruct((g["b"], g["hq"], g["lq_pad"], g["dp"]), q.dtype), g["bq"],
             "heads"),
            # lse stays a [.., 1] column: written lane-dense, the round trip to
            # the dq kernel's column input made XLA:TPU emit a 363K-line
            # relayout fusion on v4 (docs/kernels_stripe.md).
            (jax.ShapeDtypeStruct((g["b"], g["hq"], g["lq_pad"], 1), F32), g["bq"], "heads")],
      group=grp, unit=g["unit"], buf_rows=max(g["bq"], g["bk"]),
      cost=_ppa_costs(plat, q, cfg, g)[0], num_warps=gpu.ppa_fwd_warps(q.dtype, g["dp"]))
  out = jnp.moveaxis(o[:, :, :g["lq"], :g["d"]], 1, 2)
  return out, lse[:, :, :g["lq"], 0]


def _ppa_bwd_variant(plat, q, k, v, do, lse, delta, qoff, *, cfg, interpret):
  g = _ppa_geometry(plat, q, k, cfg)
  grp = g["hq"] // g["hk"]
  meta = common.pad_table(qoff[None])
  # dq: query blocks against the key frame.
  rows = g["rows_k"]
  deltas, bounds = _ppa_tables(cfg, qoff, g["unit"], 1)
  kframe = lambda x: common.to_frame(x, g["front"], rows, g["dp"])  # noqa: E731
  est_fwd, est_dq, est_dkv = _ppa_costs(plat, q, cfg, g)
  del est_fwd
  body = functools.partial(
      ppa.ppa_dq_body, bq=g["bq"], bk=g["bk"], bands=cfg.dense_runs, group=grp,
      lq=g["lq"], lk=g["lk"], front=g["front"], unit=g["unit"], scale=cfg.scale,
      reload_q=plat != "tpu")
  # dk, dv read query rows from frames (row front + i); dq reads its blocks
  # from the same frames (block i + front // bq), so q, do, lse and delta
  # are each laid out once for the whole backward.
  front_q, rows_q = g["front"], g["rows_q"]
  qframe = lambda x, w=g["dp"]: common.to_frame(x, front_q, rows_q, w)  # noqa: E731
  # lse and delta share one frame `[B, Hq, rows, 2]` (one DMA per window;
  # TPU pads the 2-lane minor dim to 128 lanes, so one such frame, not two).
  seq_col = lambda x: jnp.moveaxis(x, 1, 2)[..., None]  # [B, Hq, Lq] -> [B, Lq, Hq, 1]  # noqa: E731
  ld = jnp.concatenate([qframe(seq_col(lse), 1), qframe(seq_col(delta.astype(F32)), 1)], -1)
  qf, dof = qframe(q), qframe(do)
  skip = front_q // g["bq"]
  (dq,) = _launch(
      plat, body, interpret=interpret, grid=(g["b"], g["hk"], g["lq_pad"] // g["bq"]),
      tables=[meta, deltas, bounds],
      blocks=[(qf, g["bq"], "heads", skip), (dof, g["bq"], "heads", skip),
              (ld, g["bq"], "heads", skip)],
      frames={"k": (kframe(k), "same"), "v": (kframe(v), "same")},
      outs=[(jax.ShapeDtypeStruct((g["b"], g["hq"], g["lq_pad"], g["dp"]), q.dtype), g["bq"],
             "heads")],
      group=grp, unit=g["unit"], buf_rows=max(g["bq"], g["bk"]), cost=est_dq,
      num_warps=_BWD_WARPS)
  # dk, dv: key blocks against the query frames (rows front_q + i).
  deltas_t, bounds_t = _ppa_tables(cfg, qoff, g["unit"], -1)
  body = functools.partial(
      ppa.ppa_dkv_body, bq=g["bq_t"], bk=g["bk"], bands=cfg.dense_runs, lq=g["lq"],
      lk=g["lk"], group=grp, front_q=front_q, unit=g["unit"], scale=cfg.scale)
  dk, dv = _launch(
      plat, body, interpret=interpret, grid=(g["b"], g["hk"], g["lk_pad"] // g["bk"]),
      tables=[meta, deltas_t, bounds_t],
      blocks=[(_heads_first(k, g["lk_pad"], g["dp"]), g["bk"], "same"),
              (_heads_first(v, g["lk_pad"], g["dp"]), g["bk"], "same")],
      frames={"q": (qf, "group"), "do": (dof, "group"), "ld": (ld, "group")},
      # Each program owns its output block and writes it once: the float32
      # sums are cast in the kernel (no float32 [B, H, L, D] arrays in HBM).
      outs=[(jax.ShapeDtypeStruct((g["b"], g["hk"], g["lk_pad"], g["dp"]), k.dtype), g["bk"]),
            (jax.ShapeDtypeStruct((g["b"], g["hk"], g["lk_pad"], g["dp"]), v.dtype), g["bk"])],
      group=grp, unit=g["unit"], buf_rows=max(g["bq_t"], g["bk"]), cost=est_dkv,
      num_warps=_BWD_WARPS)
  to_seq = lambda x, n: jnp.moveaxis(x[:, :, :n, :g["d"]], 1, 2)  # noqa: E731
  return (to_seq(dq, g["lq"]).astype(q.dtype), to_seq(dk, g["lk"]).astype(k.dtype),
          to_seq(dv, g["lk"]).astype(v.dtype))


def _ppa_forward(q, k, v, qoff, cfg):
  run = lambda plat: functools.partial(_ppa_fwd_variant, plat, cfg=cfg)  # noqa: E731
  return _platform.dispatch((q, k, v, qoff), tpu=run("tpu"), gpu=run("gpu"),
                            variant=cfg.variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ppa(q, k, v, qoff, cfg):
  return _ppa_forward(q, k, v, qoff, cfg)[0]


def _ppa_fwd(q, k, v, qoff, cfg):
  out, lse = _ppa_forward(q, k, v, qoff, cfg)
  return out, (q, k, v, qoff, out, lse)


def _ppa_bwd(cfg, res, do):
  q, k, v, qoff, out, lse = res
  delta = jnp.moveaxis(jnp.sum(do.astype(F32) * out.astype(F32), axis=-1), 1, 2)
  run = lambda plat: functools.partial(_ppa_bwd_variant, plat, cfg=cfg)  # noqa: E731
  dq, dk, dv = _platform.dispatch((q, k, v, do, lse, delta, qoff), tpu=run("tpu"),
                                  gpu=run("gpu"), variant=cfg.variant)
  return dq, dk, dv, None


_ppa.defvjp(_ppa_fwd, _ppa_bwd)


def ppa_attention(q, k, v, *, dense_runs, far_offsets, scale, q_offset, variant=None,
                  block_q=None, block_k=None):
  """Attention over a static set of key offsets (PPA), forward and backward.

  Query at position `t` attends key `t - d` for every kept offset `d` (and
  `t - d >= 0`); the kept offsets are given split in two:

  Args:
    q: `[B, Lq, Hq, D]`; k, v: `[B, Lk, Hk, D]`; f32/bf16/f16.
    dense_runs: tuple of `(lo, hi)` Python ints, runs of consecutive kept
      offsets, each computed as masked matmul tiles (`block_q x block_k`).
    far_offsets: sequence of the other kept offsets (ints), each one stripe:
      a contiguous key slice per query block, scored row-wise.
    scale: score scale.
    q_offset: int or traced int32 scalar.
    variant: see `pallas_kernels.platform`.

  Returns:
    `[B, Lq, Hq, D]` like `q`; a query with no visible key gets 0.
    Differentiable (dq kernel; dk/dv kernel over key blocks accumulating the
    query heads of each group).
  """
  far = tuple(int(d) for d in np.asarray(far_offsets, np.int64).reshape(-1))
  runs = tuple((int(lo), int(hi)) for lo, hi in dense_runs)
  qoff = _clip_offset(q_offset, q.shape[1], k.shape[1])
  cfg = _PpaCfg(runs, far, float(scale), variant, block_q, block_k,
                _static_offset(q_offset, q.shape[1], k.shape[1]))
  return _ppa(q, k, v, qoff, cfg)
