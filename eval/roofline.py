"""Roofline model of the attention ops on an H100 (a model, not a measurement).

    python -m eval.roofline                      # print the target table
    python -m eval.roofline --out docs/kernels.md  # also (re)write its section there

Sums, per op and shape, the kernels the op launches (`pallas_kernels.cost`)
plus the XLA glue around them (layout copies, frames, gathers), with the
table sizes taken from the public builders (`attn.BlockLayout`,
`attn.masks` stripe / span / PPA tables, `attn.SuperlinearConfig`). A
kernel's time is `max(bytes / HBM bandwidth, matmul FLOPs / peak + row-wise
FLOPs / vector peak)`, divided by the share of the SMs its grid can fill
(`min(1, programs / SMs)`); an op's time is the sum of its kernels'.
Transcendentals, caches, latency and launch overhead are left out, for ours
and the baselines alike.

Baselines: dense causal flash attention (cuDNN) at `4 B Hq L^2 D / 2`
forward FLOPs reading q, k, v and writing o once; dense decode reading the
whole cache once with the device full.

`Changes` switches on the planned kernel changes of issue 15 one at a time
(or all together); every default is today's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import numpy as np

import attn
from attn import masks
from pallas_kernels import cost

BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str = "H100 SXM"
  peak_flops: float = 989e12      # dense bf16 tensor-core FLOP/s
  vector_flops: float = 67e12     # float32 non-tensor FLOP/s (row-wise dots)
  hbm_bw: float = 3.35e12         # bytes/s
  num_sms: int = 132


H100 = Hardware()


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 1
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  itemsize: int = 2               # bf16
  platform: str = "gpu"

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads

  def kw(self):
    return dict(batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads,
                head_dim=self.head_dim, itemsize=self.itemsize, platform=self.platform)


@dataclasses.dataclass(frozen=True)
class Changes:
  """Planned kernel changes (issue 15), off = today's kernels."""

  search_once: bool = False       # 1: gate logits from the search, no second stripe pass
  gqa_shared_reads: bool = False  # 2: stripe kernels serve a kv head's G query heads
  split_decode: bool = False      # 4: decode split over >= SMs programs, 1 row per stripe,
                                  #    dense decode reads only attended keys
  ppa_routing: bool = False       # 3: dense-ish PPA query blocks go to block-sparse tiles

  def label(self) -> str:
    on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
    return "today" if not on else " + ".join(on)


ALL = Changes(True, True, True, True)
SCENARIOS = (Changes(), Changes(search_once=True), Changes(gqa_shared_reads=True),
             Changes(split_decode=True), ALL)
RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0, forward_factor=1.0)
CONFIGS = {"default": attn.SuperlinearConfig(), "released": RELEASED}


def kernel_time(c: cost.KernelCost, hw: Hardware = H100) -> float:
  """Roofline seconds of one kernel (see the module docstring)."""
  occ = min(1.0, c.programs / hw.num_sms) if c.programs else 1.0
  compute = c.flops / hw.peak_flops + c.vector_flops / hw.vector_flops
  return max(c.bytes_accessed / hw.hbm_bw, compute) / occ


@dataclasses.dataclass(frozen=True)
class OpCost:
  parts: tuple   # ((name, KernelCost), ...)

  @property
  def total(self) -> cost.KernelCost:
    out = cost.KernelCost()
    for _, c in self.parts:
      out = out + c
    return out

  def time(self, hw: Hardware = H100) -> float:
    return sum(kernel_time(c, hw) for _, c in self.parts)


def _glue(nbytes) -> cost.KernelCost:
  """XLA copies (transposes, pads, gathers): bandwidth only, device full."""
  return cost.KernelCost(bytes_accessed=int(nbytes), programs=1 << 20)


# ------------------------------------------------------------------ baselines


def dense_cudnn(seq_len: int, shape: Shape, backward: bool = False) -> OpCost:
  """Flash-attention causal: `4 B Hq L^2 D / 2` FLOPs, q, k, v, o once."""
  s = shape
  fl = 4 * s.batch * s.q_heads * seq_len ** 2 * s.head_dim // 2
  q = s.batch * seq_len * s.q_heads * s.head_dim * s.itemsize
  kv = s.batch * seq_len * s.kv_heads * s.head_dim * s.itemsize
  parts = [("flash fwd", cost.KernelCost(flops=fl, bytes_accessed=2 * q + 2 * kv,
                                         programs=1 << 20))]
  if backward:
    parts.append(("flash bwd", cost.KernelCost(flops=int(2.5 * fl),
                                               bytes_accessed=4 * q + 4 * kv,
                                               programs=1 << 20)))
  return OpCost(tuple(parts))


def dense_decode_baseline(cache_len: int, shape: Shape) -> OpCost:
  """One token against the whole cache, read once, device full (split-K)."""
  s = shape
  kv = 2 * s.batch * cache_len * s.kv_heads * s.head_dim * s.itemsize
  fl = 4 * s.batch * s.q_heads * cache_len * s.head_dim
  return OpCost((("dense decode", cost.KernelCost(flops=fl, bytes_accessed=kv,
                                                  programs=1 << 20)),))


# ------------------------------------------------------------- block-sparse


def block_sparse(layout: attn.BlockLayout, shape: Shape, backward: bool = False,
                 changes: Changes = Changes()) -> OpCost:
  """The block-sparse kernels over `layout` (tiles = its non-empty tiles)."""
  s = shape
  kw = dict(s.kw(), tiles=layout.num_active_blocks, block_q=layout.block_q,
            block_k=layout.block_k)
  lq, lk = layout.q_len, layout.kv_len
  q_b = s.batch * lq * s.q_heads * s.head_dim * s.itemsize
  kv_b = s.batch * lk * s.kv_heads * s.head_dim * s.itemsize
  parts = [("layout copies", _glue(2 * (2 * q_b + 2 * kv_b))),
           ("block_sparse_fwd", cost.block_sparse_fwd(num_q_blocks=layout.num_q_blocks,
                                                      detail=True, **kw))]
  if backward:
    parts += [("block_sparse_dq", cost.block_sparse_dq(num_q_blocks=layout.num_q_blocks,
                                                       detail=True, **kw)),
              ("block_sparse_dkv", cost.block_sparse_dkv(
                  num_k_blocks=layout.num_k_blocks, detail=True,
                  **{k: v for k, v in kw.items()})),
              ("bwd copies", _glue(2 * (3 * q_b + 4 * kv_b)))]
  return OpCost(tuple(parts))


def dense_pallas(seq_len, shape, backward=False, changes=Changes()):
  return block_sparse(attn.BlockLayout.causal(seq_len), shape, backward, changes)


def window_pallas(seq_len, window, shape, backward=False, changes=Changes()):
  return block_sparse(attn.BlockLayout.sliding_window(seq_len, window=window), shape,
                      backward, changes)


def sparse_layout(seq_len: int, density: float = 0.1, block: int = 128, seed: int = 0,
                  full: bool = False) -> attn.BlockLayout:
  """The benchmark's random layout (`density` of all tiles, one per row at
  least) or every tile."""
  n = -(-seq_len // block)
  if full:
    mask = np.ones((n, n), bool)
  else:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n)) < density
    mask[np.arange(n), rng.integers(0, n, n)] = True
  return attn.BlockLayout.from_block_mask(mask, seq_len, seq_len, block_q=block,
                                          block_k=block)


# --------------------------------------------------------------- superlinear


def window_key_blocks(seq_len: int, window: int, group: int, block_q: int = 64,
                      block_k: int = 64) -> int:
  """Key blocks the span forward visits for the window call, per (batch,
  kv head): rows are query-major with `group` heads interleaved, so a tile
  holds `block_q / group` consecutive queries."""
  if window <= 0:
    return 0
  per = max(1, block_q // group)
  p0 = np.arange(0, seq_len, per, dtype=np.int64)
  p1 = np.minimum(p0 + per, seq_len) - 1
  lo = np.maximum(p0 - window + 1, 0)
  return int((p1 // block_k - lo // block_k + 1).sum())


def span_lengths(seq_len: int, config: attn.SuperlinearConfig) -> np.ndarray:
  """Upper bound of a span's keys per query position (`back + fwd + 1`,
  at most the `t - W` keys before the window)."""
  table = masks.superlinear_span_table(seq_len, config).astype(np.int64)
  t = np.arange(1, seq_len + 1)
  return np.clip(table[t, 0] + table[t, 1] + 1, 0, np.maximum(t - config.window, 0))


def span_key_blocks(seq_len: int, config: attn.SuperlinearConfig, group: int,
                    block_q: int = 64, block_k: int = 64) -> tuple[int, int]:
  """`(rows, key blocks)` of the span call per (batch, kv head).

  Rows: `L G K` (query, head, slot) pairs sorted by start; a tile of
  `block_q` rows visits about one span's blocks plus one, and the spreads
  of all tiles add at most the key blocks (`pallas_kernels/span/blocks.py`).
  """
  lens = span_lengths(seq_len, config)
  rows = seq_len * group * config.num_spans
  tiles = -(-rows // block_q)
  blocks = (group * config.num_spans * lens.sum()) / (block_q * block_k)
  return rows, int(math.ceil(blocks)) + tiles + -(-seq_len // block_k)


def superlinear(seq_len: int, config: attn.SuperlinearConfig, shape: Shape,
                backward: bool = False, changes: Changes = Changes()) -> OpCost:
  """`superlinear_attention(implementation="pallas")` at `L` queries = keys."""
  s = shape
  sk = dict(s.kw(), gqa_shared_reads=changes.gqa_shared_reads)
  stripes = masks.superlinear_num_stripes(seq_len, config)
  num = config.num_spans
  dp = cost.padded_head_dim(s.head_dim, s.platform)
  q_rows = s.batch * s.q_heads * seq_len
  frame = 2 * s.batch * s.kv_heads * seq_len * dp * s.itemsize + 2 * q_rows * dp * s.itemsize
  parts = [("search frames", _glue(frame)),
           ("stripe_search", cost.stripe_search(q_len=seq_len, stripes=stripes,
                                                num_spans=num, detail=True, **sk)),
           ("selected_scores_fwd", cost.selected_scores_fwd(
               q_len=seq_len, offsets=stripes, num_spans=num, search_once=changes.search_once,
               detail=True, **sk))]
  if not changes.search_once:
    parts.append(("selected frames", _glue(frame)))
  heads = s.batch * s.kv_heads           # span grid: (batch, kv head) pairs
  w_blocks = heads * window_key_blocks(seq_len, config.window, s.group)
  rows, sp_blocks = span_key_blocks(seq_len, config, s.group)
  sp_blocks *= heads
  hk = dict(batch=s.batch, heads=s.kv_heads, head_dim=s.head_dim, itemsize=s.itemsize,
            platform=s.platform)
  pairs = s.batch * s.kv_heads * rows
  kv_b = s.batch * seq_len * s.kv_heads * s.head_dim * s.itemsize
  span_glue = (4 * kv_b + 2 * q_rows * s.head_dim * s.itemsize      # kt, vt, qr
               + 2 * pairs * dp * s.itemsize                           # q_pairs gather
               + pairs * dp * 4 * 5)                                   # inverse, merge, gate
  parts += [("span window fwd", cost.span_fwd(rows=seq_len * s.group, key_blocks=w_blocks,
                                              detail=True, **hk)),
            ("span spans fwd", cost.span_fwd(rows=rows, key_blocks=sp_blocks, detail=True,
                                             **hk)),
            ("span glue", _glue(span_glue))]
  if backward:
    parts += [("span window bwd", cost.span_bwd(rows=seq_len * s.group, kv_len=seq_len,
                                                key_blocks=w_blocks, detail=True, **hk)),
              ("span spans bwd", cost.span_bwd(rows=rows, kv_len=seq_len, key_blocks=sp_blocks,
                                               detail=True, **hk)),
              ("span bwd glue", _glue(2 * span_glue)),
              ("selected_scores_bwd", cost.selected_scores_bwd(
                  q_len=seq_len, kv_len=seq_len, offsets=stripes, num_spans=num,
                  search_once=changes.search_once, detail=True, **sk))]
  return OpCost(tuple(parts))


# -------------------------------------------------------------------- decode


def _splits(shape: Shape, changes: Changes, hw: Hardware = H100) -> int:
  return max(1, -(-hw.num_sms // (shape.batch * shape.kv_heads))) if changes.split_decode else 1


def superlinear_decode(cache_len: int, config: attn.SuperlinearConfig, shape: Shape,
                       changes: Changes = Changes()) -> OpCost:
  """One token at the end of a `cache_len` cache (Pallas decode kernels)."""
  s = shape
  f = masks.superlinear_stripe_table(cache_len, config).astype(np.int64)
  stripes = int((f <= cache_len).sum())       # first_stripe: f(j) <= q_offset + lq
  splits = _splits(s, changes)
  rows = 1 if changes.split_decode else None
  lens = span_lengths(cache_len, config)[-1]
  range_tiles = (s.batch * s.q_heads * config.num_spans
                 * -(-int(lens) // cost.DECODE_TILE))
  range_programs = s.batch * s.kv_heads * s.group * config.num_spans
  range_splits = -(-H100.num_sms // range_programs) if changes.split_decode else 1
  return OpCost((
      ("decode_search", cost.decode_search(q_len=1, stripes=stripes, num_spans=config.num_spans,
                                           rows_per_stripe=rows, num_splits=splits,
                                           detail=True, **s.kw())),
      ("decode_ranges", cost.decode_ranges(q_len=1, num_spans=config.num_spans,
                                           range_tiles=range_tiles, num_splits=range_splits,
                                           detail=True, **s.kw())),
      ("decode_band", cost.decode_band(q_len=1, width=config.window, num_splits=1,
                                       detail=True, **s.kw()))))


def dense_decode_pallas(cache_len: int, shape: Shape, changes: Changes = Changes()) -> OpCost:
  """Ours: `dense_attention(implementation="pallas")` with a traced offset.

  Today: `with_any_offset` zeroes every key/value row past the query (a
  read and write of the cache) and the band kernel's grid `(B, Hq, 1)`
  walks the whole cache per query head. Planned: only the attended keys,
  read once per kv head, split over the SMs.
  """
  s = shape
  kv_b = s.batch * cache_len * s.kv_heads * s.head_dim * s.itemsize
  if changes.split_decode:
    return dense_decode_baseline(cache_len, shape)
  layout = attn.BlockLayout.causal(1, kv_len=cache_len, block_q=16, block_k=128)
  bs = block_sparse(layout, shape)
  return OpCost((("zero rows past the query", _glue(4 * kv_b)),) + bs.parts)


# ------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of the model table: ours vs its baseline."""

  target: str
  op: str
  length: int
  ours: OpCost
  base: OpCost | None
  need: float          # speed-up over the baseline the target asks (ratio base/ours)


def _len(n: int) -> str:
  return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def cells(changes: Changes = Changes(), shape: Shape = Shape(), window: int = 4096):
  """The issue's target cells under `changes` (forward unless stated)."""
  out = []
  for l in (4096, 16384, 32768, 131072):
    out.append(Cell("dense causal >= 50% of cuDNN", "dense causal (Pallas)", l,
                    dense_pallas(l, shape, changes=changes), dense_cudnn(l, shape), 0.5))
  for l in (16384, 32768, 131072):
    out.append(Cell("window time/token flat in L", f"sliding window {window} (Pallas)", l,
                    window_pallas(l, window, shape, changes=changes), None, 0.0))
  out.append(Cell("90%-sparse >= 5x faster than every tile", "block-sparse 10% tiles",
                  32768, block_sparse(sparse_layout(32768), shape, changes=changes),
                  block_sparse(sparse_layout(32768, full=True), shape, changes=changes), 5.0))
  for name, cfg in CONFIGS.items():
    for l, need in ((32768, 1.0), (131072, 5.0), (1 << 20, 0.0)):
      out.append(Cell(f"superlinear {name} vs cuDNN" + (" (runs)" if not need else ""),
                      f"superlinear {name}", l, superlinear(l, cfg, shape, changes=changes),
                      dense_cudnn(l, shape), need))
    for l, need in ((131072, 0.0), (1 << 20, 10.0)):
      out.append(Cell(f"decode {name} vs dense decode", f"decode superlinear {name}", l,
                      superlinear_decode(l, cfg, shape, changes), dense_decode_baseline(l, shape),
                      need))
  for l in (131072, 1 << 20):
    out.append(Cell("dense decode, ours (info)", "decode dense (Pallas)", l,
                    dense_decode_pallas(l, shape, changes), dense_decode_baseline(l, shape),
                    0.0))
  return out


def verdict(cell: Cell, hw: Hardware = H100) -> tuple[float | None, str]:
  """`(base time / ours time, MET | MISSED | -)` for one cell."""
  if cell.base is None:
    return None, "-"
  ratio = cell.base.time(hw) / cell.ours.time(hw)
  if not cell.need:
    return ratio, "-"
  return ratio, "MET" if ratio >= cell.need else "MISSED"


def target_verdicts(changes: Changes = Changes(), hw: Hardware = H100):
  """`[(target, MET | MISSED | not modelled, evidence)]` from the model, with
  the benchmark's target definitions (`eval/bench_targets.py`)."""
  cs = cells(changes)
  by = {(c.op, c.length): c for c in cs}
  out = []
  dense = [(c.length, verdict(c, hw)[0]) for c in cs if c.op.startswith("dense causal")]
  out.append(("dense causal forward >= 50% of cuDNN", all(r >= 0.5 for _, r in dense),
              ", ".join(f"{_len(l)} {r:.0%}" for l, r in dense)))
  win = [(c.length, c.ours.time(hw) / c.length) for c in cs if c.op.startswith("sliding")]
  spread = max(t for _, t in win) / min(t for _, t in win)
  out.append(("sliding window time per token flat in L (max/min <= 1.25)", spread <= 1.25,
              f"max/min {spread:.2f}"))
  sp = verdict(by[("block-sparse 10% tiles", 32768)], hw)[0]
  out.append(("90%-sparse >= 5x faster than every tile at 32K", sp >= 5, f"{sp:.1f}x"))
  for name in CONFIGS:
    sl = [(l, verdict(by[(f"superlinear {name}", l)], hw)[0]) for l in (32768, 131072, 1 << 20)]
    out.append((f"superlinear {name} forward faster than cuDNN from 32K",
                all(r > 1 for _, r in sl), ", ".join(f"{_len(l)} {r:.2f}x" for l, r in sl)))
    out.append((f"superlinear {name} forward >= 5x cuDNN at 128K", sl[1][1] >= 5,
                f"{sl[1][1]:.2f}x"))
    out.append((f"superlinear {name} forward runs at 1M", None,
                "memory (item 7) is not modelled here"))
    dec = verdict(by[(f"decode superlinear {name}", 1 << 20)], hw)[0]
    out.append((f"superlinear {name} decode at 1M >= 10x dense decode", dec >= 10,
                f"{dec:.1f}x"))
  word = {True: "MET", False: "MISSED", None: "not modelled"}
  return [(t, word[ok], ev) for t, ok, ev in out]


def verdict_table(hw: Hardware = H100) -> list[str]:
  names = [ch.label() for ch in SCENARIOS]
  rows = ["| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  per = [target_verdicts(ch, hw) for ch in SCENARIOS]
  for i, (t, _, _) in enumerate(per[0]):
    rows.append(f"| {t} | " + " | ".join(f"{col[i][1]} ({col[i][2]})" for col in per) + " |")
  return rows


def _fmt_b(n: float) -> str:
  for unit, sc in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n >= sc:
      return f"{n / sc:.3g} {unit}"
  return f"{n:.0f} B"


def _fmt_t(t: float) -> str:
  return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_f(n: float) -> str:
  return f"{n / 1e12:.3g} T" if n >= 1e9 else f"{n / 1e9:.3g} G"


def today_table(hw: Hardware = H100) -> list[str]:
  rows = ["| target | op | L | HBM bytes | FLOPs (matmul + row-wise) | time (model) | "
          "baseline bytes | baseline FLOPs | baseline time | baseline / ours | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in cells():
    t, r = c.ours.total, verdict(c, hw)
    base = c.base.total if c.base else None
    rows.append(
        f"| {c.target} | {c.op} | {_len(c.length)} | {_fmt_b(t.bytes_accessed)} | "
        f"{_fmt_f(t.flops + t.vector_flops)} | {_fmt_t(c.ours.time(hw))} | "
        + (f"{_fmt_b(base.bytes_accessed)} | {_fmt_f(base.flops)} | {_fmt_t(c.base.time(hw))} | "
           if base else "- | - | - | ")
        + (f"{r[0]:.2f}x | {r[1]} |" if r[0] is not None else
           f"{c.ours.time(hw) / c.length * 1e9:.3g} ns/token | - |"))
  return rows


def scenario_table(hw: Hardware = H100) -> list[str]:
  names = [ch.label() for ch in SCENARIOS]
  rows = ["| target | op | L | " + " | ".join(names) + " |",
          "|---|---|---|" + "---|" * len(names)]
  per = [cells(ch) for ch in SCENARIOS]
  for i, c in enumerate(per[0]):
    out = []
    for col in per:
      r = verdict(col[i], hw)
      if r[0] is None:
        out.append(f"{_fmt_t(col[i].ours.time(hw))}")
      else:
        out.append(f"{_fmt_t(col[i].ours.time(hw))}, {r[0]:.2f}x" +
                   (f" {r[1]}" if r[1] != "-" else ""))
    rows.append(f"| {c.target} | {c.op} | {_len(c.length)} | " + " | ".join(out) + " |")
  return rows


def breakdown(op: OpCost, hw: Hardware = H100) -> list[str]:
  rows = ["| kernel | HBM bytes | matmul FLOPs | row-wise FLOPs | programs | time (model) |",
          "|---|---|---|---|---|---|"]
  for name, c in op.parts:
    rows.append(f"| {name} | {_fmt_b(c.bytes_accessed)} | {_fmt_f(c.flops)} | "
                f"{_fmt_f(c.vector_flops)} | {c.programs if c.programs < 1 << 20 else 'XLA'} "
                f"| {_fmt_t(kernel_time(c, hw))} |")
  return rows


def markdown(hw: Hardware = H100) -> str:
  s = Shape()
  out = [BEGIN, "", "## Roofline model (model, not measurement)", "",
         f"Generated by `python -m eval.roofline --out docs/kernels.md` (no GPU involved). "
         f"Predicted times on an {hw.name} ({hw.peak_flops / 1e12:g} TFLOP/s dense bf16, "
         f"{hw.vector_flops / 1e12:g} TFLOP/s float32 vector, {hw.hbm_bw / 1e12:g} TB/s, "
         f"{hw.num_sms} SMs) for batch {s.batch}, {s.q_heads} query / {s.kv_heads} kv heads, "
         f"head_dim {s.head_dim}, bf16, forward. **These are model predictions from "
         "`pallas_kernels/cost.py` and `eval/roofline.py`, not measurements**: bytes "
         "count every tile / stripe row a kernel loads with no cache reuse, time is "
         "`max(bytes / bandwidth, FLOPs / peak)` scaled by the share of SMs the grid fills, "
         "summed over the op's kernels and XLA glue; masking overhead, latency, "
         "transcendentals and spills are not modelled. Verdicts compare the model's "
         "baseline time with ours against the issue's targets.", "",
         "### Today's kernels", ""] + today_table(hw) + [
         "", "### With each planned change (time, baseline / ours)", "",
         "Columns switch on one change of issue 15 at a time, then all together: "
         "`search_once` (item 1), `gqa_shared_reads` (item 2: stripe kernels per kv head), "
         "`split_decode` (item 4: decode split over >= 132 programs, one row per stripe, "
         "dense decode reading only the attended keys), `ppa_routing` (item 3; no target "
         "cell uses PPA, so it changes nothing here). Item 5 (unmasked interior loops) "
         "and item 6 change compute efficiency, which this model does not see.", ""]
  out += scenario_table(hw)
  out += ["", "### Targets judged by the model", ""] + verdict_table(hw)
  for title, op in (("superlinear default, 128K, today", superlinear(131072, CONFIGS["default"], s)),
                    ("superlinear default, 128K, all changes",
                     superlinear(131072, CONFIGS["default"], s, changes=ALL)),
                    ("decode superlinear default, 1M cache, today",
                     superlinear_decode(1 << 20, CONFIGS["default"], s))):
    out += ["", f"### Breakdown: {title}", ""] + breakdown(op, hw)
  out += ["", END]
  return "\n".join(out) + "\n"


def write_section(path: str, section: str):
  """Replaces the marked section of `path` (appends it if absent)."""
  text = open(path).read() if os.path.exists(path) else ""
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + section.rstrip("\n") + rest.split(END, 1)[1]
  else:
    text = (text.rstrip("\n") + "\n\n" if text else "") + section
  with open(path, "w") as fh:
    fh.write(text)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m eval.roofline", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="markdown file whose roofline section to write")
  args = ap.parse_args(argv)
  md = markdown()
  print(md)
  if args.out:
    write_section(args.out, md)


if __name__ == "__main__":
  main(sys.argv[1:])
