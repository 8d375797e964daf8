"""Target cells of issue 15 under the roofline model (a model, not a measurement).

    python -m eval.roofline                        # print the target tables
    python -m eval.roofline --out docs/kernels.md  # also (re)write its section there

`cells(changes)` builds ours-vs-baseline pairs at the target shapes from the
per-op model (`eval/roofline_model.py`), `target_verdicts` judges them with the
benchmark's target definitions, and `markdown` renders the section of
docs/kernels.md (`python -m eval.roofline --out docs/kernels.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from eval.roofline_model import (CONFIGS, H100, SCENARIOS, SEARCH, XLA, Changes, Hardware,
                                 OpCost, Shape, block_sparse, dense_cudnn, dense_decode_baseline,
                                 dense_decode_pallas, dense_pallas, kernel_time, ppa,
                                 sparse_layout, superlinear, superlinear_decode, window_pallas)

BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


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
  for p in (0.5, 0.75):
    for l in (32768, 131072):
      out.append(Cell(f"PPA p={p} vs cuDNN (info)", f"PPA p={p} window 64", l,
                      ppa(l, p, 64, shape, changes), dense_cudnn(l, shape), 0.0))
  for l in (131072, 1 << 20):
    out.append(Cell("dense decode, ours (info)", "decode dense (Pallas)", l,
                    dense_decode_pallas(l, shape, changes), dense_decode_baseline(l, shape),
                    0.0))
  return out


def verdict(cell: Cell, hw: Hardware = H100, reuse: str = "none") -> tuple[float | None, str]:
  """`(base time / ours time, MET | MISSED | -)` for one cell."""
  if cell.base is None:
    return None, "-"
  ratio = cell.base.time(hw) / cell.ours.time(hw, reuse)
  if not cell.need:
    return ratio, "-"
  return ratio, "MET" if ratio >= cell.need else "MISSED"


def target_verdicts(changes: Changes = Changes(), hw: Hardware = H100, reuse: str = "none"):
  """`[(target, MET | MISSED | not modelled, evidence)]` from the model, with
  the benchmark's target definitions (`eval/bench_targets.py`)."""
  cs = cells(changes)
  by = {(c.op, c.length): c for c in cs}
  out = []
  dense = [(c.length, verdict(c, hw, reuse)[0]) for c in cs if c.op.startswith("dense causal")]
  out.append(("dense causal forward >= 50% of cuDNN", all(r >= 0.5 for _, r in dense),
              ", ".join(f"{_len(l)} {r:.0%}" for l, r in dense)))
  win = [(c.length, c.ours.time(hw, reuse) / c.length) for c in cs if c.op.startswith("sliding")]
  spread = max(t for _, t in win) / min(t for _, t in win)
  out.append(("sliding window time per token flat in L (max/min <= 1.25)", spread <= 1.25,
              f"max/min {spread:.2f}"))
  sp = verdict(by[("block-sparse 10% tiles", 32768)], hw, reuse)[0]
  out.append(("90%-sparse >= 5x faster than every tile at 32K", sp >= 5, f"{sp:.1f}x"))
  for name in CONFIGS:
    sl = [(l, verdict(by[(f"superlinear {name}", l)], hw, reuse)[0])
          for l in (32768, 131072, 1 << 20)]
    out.append((f"superlinear {name} forward faster than cuDNN from 32K",
                all(r > 1 for _, r in sl), ", ".join(f"{_len(l)} {r:.2f}x" for l, r in sl)))
    out.append((f"superlinear {name} forward >= 5x cuDNN at 128K", sl[1][1] >= 5,
                f"{sl[1][1]:.2f}x"))
    out.append((f"superlinear {name} forward runs at 1M", None,
                "memory (item 7) is not modelled here"))
    dec = verdict(by[(f"decode superlinear {name}", 1 << 20)], hw, reuse)[0]
    out.append((f"superlinear {name} decode at 1M >= 10x dense decode", dec >= 10,
                f"{dec:.1f}x"))
  word = {True: "MET", False: "MISSED", None: "not modelled"}
  return [(t, word[ok], ev) for t, ok, ev in out]


def verdict_table(hw: Hardware = H100, reuse: str = "none") -> list[str]:
  names = [ch.label() for ch in SCENARIOS]
  rows = ["| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  per = [target_verdicts(ch, hw, reuse) for ch in SCENARIOS]
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
  rows = ["| target | op | L | bytes loaded | FLOPs (matmul + row-wise) | time (model) | "
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


def compute_floor(op: OpCost, hw: Hardware = H100, loads: tuple[str, ...] = ()) -> float:
  """Seconds of the op's Pallas kernels' arithmetic alone: matmul FLOPs at
  the tensor-core peak, row-wise FLOPs at the vector peak, every SM busy, no
  XLA glue. Kernels named in `loads` also pay their loads at L2 bandwidth
  (`reuse="all"`, the model's best case): the span-search's stripe rows are
  one search-key row per (query, stripe, kv head), which no tiling shares,
  so `loads=(SEARCH,)` is the floor of this design, not only of its
  arithmetic."""
  return sum(kernel_time(c, hw, "all") if name in loads
             else c.flops / hw.peak_flops + c.vector_flops / hw.vector_flops
             for name, c in op.parts if c.programs < XLA)


def needed_bandwidth(cell: Cell, hw: Hardware = H100) -> float | None:
  """Bytes per second the op's Pallas kernels would have to load at, fully
  overlapped with their arithmetic, for the cell to meet its target with the
  XLA glue at HBM bandwidth (None: no speed target, or the glue alone
  exceeds the time budget)."""
  if not cell.need or cell.base is None:
    return None
  budget = cell.base.time(hw) / cell.need
  glue = sum(kernel_time(c, hw) for _, c in cell.ours.parts if c.programs >= XLA)
  loads = sum(c.bytes_accessed for _, c in cell.ours.parts if c.programs < XLA)
  return loads / (budget - glue) if budget > glue else None


def floor_table(hw: Hardware = H100) -> list[str]:
  """Superlinear cells: the model's times beside the compute floor and the
  load bandwidth the target needs."""
  rows = ["| op | L | target | cuDNN (model) | ours, HBM model | ours, wave model | "
          "arithmetic floor | design floor (search loads at L2) | Pallas loads | "
          "load bandwidth the target needs |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for c in cells():
    if not c.op.startswith("superlinear"):
      continue
    base = c.base.time(hw)
    floors = [compute_floor(c.ours, hw), compute_floor(c.ours, hw, (SEARCH,))]
    loads = sum(k.bytes_accessed for _, k in c.ours.parts if k.programs < XLA)
    bw = needed_bandwidth(c, hw)
    rows.append(
        f"| {c.op} | {_len(c.length)} | {f'{c.need:g}x' if c.need else 'runs'} | "
        f"{_fmt_t(base)} | {_fmt_t(c.ours.time(hw))} ({base / c.ours.time(hw):.2f}x) | "
        f"{_fmt_t(c.ours.time(hw, 'wave'))} ({base / c.ours.time(hw, 'wave'):.2f}x) | "
        + "".join(f"{_fmt_t(f)} ({base / f:.2f}x) | " for f in floors)
        + f"{_fmt_b(loads)} | " + (f"{bw / 1e12:.3g} TB/s |" if bw else "- |"))
  return rows


def breakdown(op: OpCost, hw: Hardware = H100) -> list[str]:
  rows = ["| kernel | bytes loaded | matmul FLOPs | row-wise FLOPs | programs | time (model) "
          "| HBM bytes (wave model) | time (wave model) |",
          "|---|---|---|---|---|---|---|---|"]
  for name, c in op.parts:
    rows.append(f"| {name} | {_fmt_b(c.bytes_accessed)} | {_fmt_f(c.flops)} | "
                f"{_fmt_f(c.vector_flops)} | {c.programs if c.programs < 1 << 20 else 'XLA'} "
                f"| {_fmt_t(kernel_time(c, hw))} | {_fmt_b(c.bytes_accessed - c.wave_hits)} "
                f"| {_fmt_t(kernel_time(c, hw, 'wave'))} |")
  return rows


def markdown(hw: Hardware = H100) -> str:
  s = Shape()
  out = [BEGIN, "", "## Roofline model (model, not measurement)", "",
         f"Generated by `python -m eval.roofline --out docs/kernels.md` (no GPU involved). "
         f"Predicted times on an {hw.name} ({hw.peak_flops / 1e12:g} TFLOP/s dense bf16, "
         f"{hw.vector_flops / 1e12:g} TFLOP/s float32 vector, {hw.hbm_bw / 1e12:g} TB/s, "
         f"{hw.num_sms} SMs) for batch {s.batch}, {s.q_heads} query / {s.kv_heads} kv heads, "
         f"head_dim {s.head_dim}, bf16, forward. **These are model predictions from "
         "`pallas_kernels/cost/` and `eval/roofline_model.py`, not measurements**: bytes "
         "count every tile / stripe row a kernel loads with no cache reuse, time is "
         "`max(bytes / bandwidth, FLOPs / peak)` scaled by the share of SMs the grid fills, "
         "summed over the op's kernels and XLA glue; masking overhead, latency, "
         "transcendentals and spills are not modelled. Verdicts compare the model's "
         "baseline time with ours against the issue's targets.", "",
         "### Today's kernels", ""] + today_table(hw) + [
         "", "### With each planned change (time, baseline / ours)", "",
         "Columns switch one change of issue 15 at a time (a done change off, a planned "
         "one on); the last column has every change on: "
         "`no gqa_shared_reads` (item 2 is in: the stripe search and "
         "PPA forward/dq serve a kv head's query heads; this column switches it off, "
         "one program per query head as before), "
         "`split_decode` (item 4: decode split over >= 132 programs, one row per stripe, "
         "dense decode reading only the attended keys), `no ppa_routing` (item 3 is in: "
         "each PPA query block runs the stripe kernels or its PPA mask's block-sparse tiles, "
         "whichever loads fewer K/V rows, `attn.ppa_routing`; this column runs stripes "
         "everywhere as before; no target reads PPA, the PPA rows are for information). "
         "Item 5 (unmasked interior loops) "
         "and item 6 change compute efficiency, which this model does not see.", ""]
  out += scenario_table(hw)
  out += ["", "### Targets judged by the model", "",
          "Every load from HBM (the kernels' own loads, no cache reuse):", ""]
  out += verdict_table(hw)
  out += ["", f"Wave model: the GPU kernels of the search, the span calls and the "
          "block-sparse forward launch their block axis first (`pallas_kernels.common."
          "block_first`), so the programs in flight are neighbouring blocks of one (batch, "
          f"head). Assumed: {hw.wave} programs (one per SM) start together and advance in "
          "step, and a row one of them loads stays in L2 until the wave ends; then HBM "
          "carries each distinct row a wave reads once (`cost.search_wave_rows`, "
          "`span_wave_key_blocks`, `roofline_model.wave_key_blocks`) and L2 "
          f"({hw.l2_bw / 1e12:g} TB/s, an assumed figure) serves every load. Other "
          "kernels and XLA glue stay at HBM. Not measured: a GPU run decides.", ""]
  out += verdict_table(hw, reuse="wave")
  out += ["", f"Optimistic bound: every load of a Pallas kernel served at L2 bandwidth "
          f"({hw.l2_bw / 1e12:g} TB/s, an assumed figure), so only compute, XLA glue and "
          "grid occupancy remain. The truth lies between the first and this table; where "
          "they disagree, the verdict depends on cache reuse the model does not measure.",
          ""]
  out += verdict_table(hw, reuse="all")
  out += ["", "### Superlinear: compute floor and the load bandwidth a target needs", "",
          "Arithmetic floor: the op's Pallas kernels' arithmetic alone (matmul FLOPs at "
          f"{hw.peak_flops / 1e12:g} TFLOP/s, the search's row-wise dots at "
          f"{hw.vector_flops / 1e12:g} TFLOP/s), no load, no XLA glue. Design floor: the "
          "same, plus the span-search's loads at L2 bandwidth: the search reads one "
          "search-key row per (query, stripe, kv head), which no tiling of this row-wise "
          "search shares (at this shape consecutive stripes lie further apart than the "
          "search's 16-query block), so "
          "no kernel of this design is faster. Load bandwidth the target needs: the Pallas "
          "kernels' loads divided by the time the target leaves once the XLA glue has "
          f"run at HBM bandwidth, loads and arithmetic fully overlapped; above "
          f"{hw.hbm_bw / 1e12:g} TB/s (HBM) the target needs cache reuse, above "
          f"{hw.l2_bw / 1e12:g} TB/s (the assumed L2 figure) kernels that load less. A "
          "design floor below the target means the target is out of this design's reach "
          "on this hardware model: the search would need narrower or 8-bit search keys "
          "(the search reads `head_dim` bf16 lanes a row; `q_search` / `k_search` may be "
          "narrower than `q` / `k`). Model, not measurement.", ""]
  out += floor_table(hw)
  for title, op in (("superlinear default, 128K, today",
                     superlinear(131072, CONFIGS["default"], s)),
                    ("superlinear released, 128K, today",
                     superlinear(131072, CONFIGS["released"], s)),
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
