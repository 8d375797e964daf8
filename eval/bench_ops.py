"""Benchmark of the attention ops on the host backend (CPU): time and memory.

    python -m eval.bench_ops [--lengths 1024,2048,...] [--out docs] [--quick]
                             [--resume] [--budget 60] [--max-mem-gb 12]
    python -m eval.bench_ops --report-only      # rebuild the docs from the JSON

For every op and sequence length it measures, at batch 1, 4 heads, head_dim
64, float32:

* forward time and forward+backward time (`jax.grad` of
  `sum(out * cotangent)` w.r.t. q, k, v with a fixed random cotangent): the
  median of a few calls of the AOT-compiled function after a warm-up call,
  each ended by `block_until_ready`;
* peak temporary memory of the compiled forward and forward+backward
  functions, `compiled.memory_analysis().temp_size_in_bytes`.

Every cell is compiled ahead of time first, so its memory figure is the
compiled one. A cell whose compiled temporaries exceed `--max-mem-gb` is not
run ("too big": it would not fit); a cell whose predicted time (extrapolated
from the op's previous lengths with its local log-log slope) exceeds
`--budget` seconds per call is not run ("over budget": it fits, it was only
too slow for the sweep); a cell whose compile or run raises is "failed". The
report claims that an op cannot run only for "too big" and "failed" cells,
and states a target as not measured when the sweep has no data for it.
Results go to
`<out>/bench_ops.json` after every cell (`--resume` reuses measured cells),
then `<out>/benchmarks.md` and `<out>/bench_ops.png` are written from the
JSON. Progress and an ETA go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from eval.bench_ops_cases import (DEFAULT_LENGTHS, DTYPE, MODES, OPS, OPS_BY_NAME,  # noqa: F401
                                  QUICK_LENGTHS, Op, cell_key, fmt_bytes, fmt_time,
                                  skip_kind)
from eval.bench_ops_report import verdict_word, write_markdown

BATCH, HEADS, HEAD_DIM = 1, 4, 64

# ---------------------------------------------------------------- measuring


def _inputs(seq_len: int):
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 5)
  shape = (BATCH, seq_len, HEADS, HEAD_DIM)
  q, k, v, qs, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
  return q, k, v, qs, ct


def _compiled(op: Op, mode: str, args):
  q, k, v, qs, ct = args
  if mode == "fwd":
    f = jax.jit(op.fn)
    call_args = (q, k, v, qs)
  else:
    def loss(q, k, v, qs, ct):
      return jnp.sum(op.fn(q, k, v, qs).astype(jnp.float32) * ct)
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    call_args = (q, k, v, qs, ct)
  compiled = f.lower(*call_args).compile()
  return compiled, call_args


def _time_call(compiled, call_args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*call_args))
  return time.perf_counter() - t0


def _measure(compiled, call_args, *, repeats: int, budget: float):
  """Times an AOT-compiled call: median of up to `repeats` after a warm-up."""
  warm = _time_call(compiled, call_args)
  # Fewer repeats for long calls: keep a cell near its budget.
  n = repeats if warm < 0.2 * budget / max(repeats, 1) else (2 if warm < budget / 4 else 1)
  times = [_time_call(compiled, call_args) for _ in range(n)]
  return {"status": "ok", "time_s": statistics.median(times), "times_s": times,
          "warmup_s": warm}


def run_cell(op: Op, mode: str, args, *, est_time, shorter_over_budget: bool,
             repeats: int, budget: float, max_mem: float) -> dict:
  """Compiles the cell (exact memory), then runs it unless it cannot or may not.

  Returns the cell's fields: `status` "ok" | "skipped" | "error"; for
  "skipped", `skip` is "memory" (compiled temporaries above `max_mem`: it
  would not fit) or "time" (predicted or shorter lengths over the budget:
  it fits but was not run); `mem_bytes` is the compiled figure whenever
  the compile succeeded.
  """
  t0 = time.perf_counter()
  try:
    compiled, call_args = _compiled(op, mode, args)
    mem = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception as e:  # noqa: BLE001  (a failed compile is a result)
    return {"status": "error", "reason": f"compile failed: {type(e).__name__}: {e}"[:500]}
  cell = {"mem_bytes": mem, "mem_source": "compiled",
          "compile_s": time.perf_counter() - t0, "est_time_s": est_time}
  if mem > max_mem:
    return {**cell, "status": "skipped", "skip": "memory",
            "reason": f"compiled temporaries {fmt_bytes(mem)} > cap {fmt_bytes(max_mem)}"}
  if est_time is not None and est_time > budget:
    return {**cell, "status": "skipped", "skip": "time",
            "reason": f"predicted {fmt_time(est_time)} > budget {budget:g} s"}
  if shorter_over_budget:
    return {**cell, "status": "skipped", "skip": "time",
            "reason": "a shorter length was already over the time budget"}
  try:
    return {**cell, **_measure(compiled, call_args, repeats=repeats, budget=budget)}
  except Exception as e:  # noqa: BLE001  (an OOM must not lose the sweep)
    return {**cell, "status": "error", "reason": f"run failed: {type(e).__name__}: {e}"[:500]}

# -------------------------------------------------------------- prediction


def _history(cells, name, mode, key):
  """[(L, value)] of the op's measured (or estimated) cells, ascending L."""
  out = []
  for c in cells.values():
    if c["op"] == name and c["mode"] == mode:
      val = c.get(key)
      if val is None:
        val = c.get("est_" + key)
      if val:
        out.append((c["L"], float(val)))
  return sorted(out)


def _extrapolate(hist, seq_len, default_slope=2.0, lo=1.0, hi=2.5):
  """Value at `seq_len` from the last point with the local log-log slope."""
  hist = [(l, v) for l, v in hist if l < seq_len]
  if not hist:
    return None
  if len(hist) >= 2:
    (l0, v0), (l1, v1) = hist[-2], hist[-1]
    slope = math.log(v1 / v0) / math.log(l1 / l0) if v0 > 0 and v1 > 0 else default_slope
  else:
    l1, v1 = hist[-1]
    slope = default_slope
  slope = min(max(slope, lo), hi)
  return v1 * (seq_len / l1) ** slope


def _predict(cells, name, mode, seq_len):
  t = _extrapolate(_history(cells, name, mode, "time_s"), seq_len)
  if mode == "fwdbwd":
    # Better: this length's forward time times the previous fwd+bwd/fwd ratio.
    fwd = cells.get(cell_key(name, seq_len, "fwd"), {})
    tf = fwd.get("time_s") or fwd.get("est_time_s")
    h_b = dict(_history(cells, name, "fwdbwd", "time_s"))
    h_f = dict(_history(cells, name, "fwd", "time_s"))
    common = [l for l in h_b if l in h_f and l < seq_len]
    if tf and common:
      l = max(common)
      t = max(t or 0.0, tf * h_b[l] / h_f[l])
  m = _extrapolate(_history(cells, name, mode, "mem_bytes"), seq_len, lo=0.0, hi=2.2)
  return t, m



def _write_json(path, data):
  tmp = path + ".tmp"
  with open(path + ".tmp", "w") as fh:
    json.dump(data, fh, indent=1, sort_keys=True)
  os.replace(tmp, path)


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = None
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "python": platform.python_version(),
          "load_avg_1min_at_start": load}



# -------------------------------------------------------------------- main


def _parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.bench_ops", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lengths", type=str, default=None,
                  help="comma-separated sequence lengths (default 1K..64K, powers of 2)")
  ap.add_argument("--out", default="docs", help="output folder (default docs)")
  ap.add_argument("--quick", action="store_true",
                  help=f"short sweep {QUICK_LENGTHS} (unless --lengths) and 1 repeat")
  ap.add_argument("--resume", action="store_true",
                  help="reuse the measured cells of <out>/bench_ops.json")
  ap.add_argument("--report-only", action="store_true",
                  help="only rebuild the markdown and the PNG from the JSON")
  ap.add_argument("--ops", type=str, default=None,
                  help="comma-separated op names (default: all): " + ", ".join(OPS_BY_NAME))
  ap.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 3)")
  ap.add_argument("--budget", type=float, default=60.0,
                  help="skip a cell whose predicted time per call exceeds this (s)")
  ap.add_argument("--max-mem-gb", type=float, default=12.0,
                  help="skip a cell whose temporary memory exceeds this (GB)")
  ap.add_argument("--modes", type=str, default=",".join(MODES),
                  help="comma-separated subset of fwd,fwdbwd (default both)")
  ap.add_argument("--no-plot", action="store_true", help="do not write the PNG")
  return ap.parse_args(argv)


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _eta(cells, todo, repeats, budget):
  """Seconds left: predicted calls of the remaining cells (skipped ones cost 0)."""
  total = 0.0
  for name, seq_len, mode in todo:
    t, _ = _predict(cells, name, mode, seq_len)
    if t is not None and t <= budget:
      n = repeats if t < 0.2 * budget / max(repeats, 1) else (2 if t < budget / 4 else 1)
      total += t * (1 + n) + 2.0  # + compile
  return total


def main(argv=None) -> dict:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "bench_ops.json")
  md_path = os.path.join(args.out, "benchmarks.md")
  png_path = os.path.join(args.out, "bench_ops.png")

  if args.report_only:
    with open(json_path) as fh:
      data = json.load(fh)
    data["meta"]["report_rebuilt"] = datetime.datetime.now().isoformat(timespec="seconds")
    return _finish(data, md_path, png_path, args)

  if args.lengths:
    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
  else:
    lengths = QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS
  repeats = args.repeats or (1 if args.quick else 3)
  names = [op.name for op in OPS]
  if args.ops:
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS_BY_NAME]
    if unknown:
      raise SystemExit(f"unknown ops {unknown}; choose from {list(OPS_BY_NAME)}")
  max_mem = args.max_mem_gb * 1e9

  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": machine_info(), "batch": BATCH, "heads": HEADS,
          "head_dim": HEAD_DIM, "dtype": DTYPE, "lengths": lengths, "ops": names,
          "repeats": repeats, "budget_s": args.budget, "max_mem_gb": args.max_mem_gb,
          "argv": list(sys.argv[1:] if argv is None else argv)}
  cells = {}
  if args.resume and os.path.exists(json_path):
    with open(json_path) as fh:
      old = json.load(fh)
    same = all(old["meta"].get(k) == meta[k] for k in ("batch", "heads", "head_dim", "dtype"))
    if same:
      cells = {k: c for k, c in old["cells"].items()
               if c["status"] == "ok" and c["op"] in names and c["L"] in lengths}
      _log(f"resume: reusing {len(cells)} measured cells from {json_path}")
  data = {"meta": meta, "cells": cells}

  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if not modes or any(m not in MODES for m in modes):
    raise SystemExit(f"--modes must be a subset of {MODES}, got {args.modes!r}")
  meta["modes"] = modes
  todo = [(n, l, m) for l in lengths for n in names for m in modes]
  start = time.perf_counter()
  for idx, (name, seq_len, mode) in enumerate(todo):
    key = cell_key(name, seq_len, mode)
    if key in cells and cells[key]["status"] == "ok":
      continue
    op = OPS_BY_NAME[name]
    base = {"op": name, "L": seq_len, "mode": mode}
    est_t, est_m = _predict(cells, name, mode, seq_len)
    eta = _eta(cells, todo[idx:], repeats, args.budget)
    _log(f"[{idx + 1}/{len(todo)}] {name} L={seq_len} {mode}: "
         f"est. {fmt_time(est_t)}, {fmt_bytes(est_m)}; elapsed "
         f"{time.perf_counter() - start:.0f} s, ETA ~{eta:.0f} s")
    shorter_over = any(c["op"] == name and c["mode"] == mode and c["L"] < seq_len
                       and skip_kind(c) == "time" for c in cells.values())
    cell = {**base, "est_mem_bytes": est_m,
            **run_cell(op, mode, _get_inputs(seq_len), est_time=est_t,
                       shorter_over_budget=shorter_over, repeats=repeats,
                       budget=args.budget, max_mem=max_mem)}
    cells[key] = cell
    _log(f"    -> {cell['status']}: "
         + (f"{fmt_time(cell['time_s'])}, {fmt_bytes(cell['mem_bytes'])}"
            if cell["status"] == "ok" else cell.get("reason", "")))
    meta["elapsed_s"] = time.perf_counter() - start
    _write_json(json_path, data)
  meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  _write_json(json_path, data)
  return _finish(data, md_path, png_path, args)


_INPUT_CACHE: dict = {}


def _get_inputs(seq_len):
  if seq_len not in _INPUT_CACHE:
    _INPUT_CACHE.clear()
    _INPUT_CACHE[seq_len] = _inputs(seq_len)
  return _INPUT_CACHE[seq_len]


def _finish(data, md_path, png_path, args):
  an = write_markdown(data, md_path)
  if not args.no_plot:
    from eval import plots
    plots.plot_bench(data, an, png_path, [op.name for op in OPS])
  for text, ok, detail in an["targets"]:
    _log(f"{verdict_word(ok)}: {text}: {detail}")
  _log(f"wrote {md_path}" + ("" if args.no_plot else f", {png_path}"))
  return {"data": data, "analysis": an, "markdown": md_path,
          "png": None if args.no_plot else png_path}


if __name__ == "__main__":
  main()
