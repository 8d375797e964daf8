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
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn

BATCH, HEADS, HEAD_DIM = 1, 4, 64
DTYPE = "float32"
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [512, 1024, 2048]
MODES = ("fwd", "fwdbwd")
FIT_MIN_LEN = 2048
PPA_WINDOW = 64


@dataclasses.dataclass(frozen=True)
class Op:
  name: str           # row key (stable, used in the JSON)
  label: str          # human-readable description
  fn: Callable        # (q, k, v, q_search) -> out
  family: str         # "dense", "window", "ppa", "superlinear"
  p: float | None = None
  window: int | None = None


def _ops() -> list[Op]:
  ops = [
      Op("dense_reference", "dense, reference (baseline, L x L mask)",
         lambda q, k, v, qs: attn.dense_attention(q, k, v, implementation="reference"),
         "dense"),
      Op("dense_xla", "dense, xla (blocked)",
         lambda q, k, v, qs: attn.dense_attention(q, k, v, implementation="xla"),
         "dense"),
      Op("sliding_window_w64", "sliding window w=64, xla",
         lambda q, k, v, qs: attn.sliding_window_attention(
             q, k, v, window=64, implementation="xla"),
         "window", window=64),
  ]
  for p in (0.0, 0.25, 0.5, 0.75, 1.0):
    ops.append(Op(f"ppa_p{p:g}_w{PPA_WINDOW}", f"PPA p={p:g} w={PPA_WINDOW}, xla",
                  (lambda p: lambda q, k, v, qs: attn.ppa_attention(
                      q, k, v, p=p, window=PPA_WINDOW, implementation="xla"))(p),
                  "ppa", p=p, window=PPA_WINDOW))
  ops.append(Op("ppa_p0.5_w8", "PPA p=0.5 w=8, xla (exposes the 1+p slope)",
                lambda q, k, v, qs: attn.ppa_attention(q, k, v, p=0.5, window=8,
                                                       implementation="xla"),
                "ppa", p=0.5, window=8))
  ops.append(Op("superlinear", "superlinear, default config, k_search=None, xla",
                lambda q, k, v, qs: attn.superlinear_attention(
                    q, k, v, qs, None, config=attn.SuperlinearConfig(),
                    implementation="xla"),
                "superlinear"))
  return ops


OPS = _ops()
OPS_BY_NAME = {op.name: op for op in OPS}


def ppa_attended_keys(seq_len: int, p: float, window: int) -> int:
  """Sum over the queries of the number of kept keys (exact, from ppa_offsets)."""
  offs = attn.ppa_offsets(seq_len - 1, p=p, window=window)
  return int(np.sum(seq_len - offs))


def ppa_attended_keys_approx(seq_len: int, p: float, window: int) -> float:
  """`w L + L^(1+p) / (1+p)`, the asymptotic count."""
  return window * seq_len + seq_len ** (1 + p) / (1 + p)


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
            "reason": f"compiled temporaries {_fmt_bytes(mem)} > cap {_fmt_bytes(max_mem)}"}
  if est_time is not None and est_time > budget:
    return {**cell, "status": "skipped", "skip": "time",
            "reason": f"predicted {_fmt_time(est_time)} > budget {budget:g} s"}
  if shorter_over_budget:
    return {**cell, "status": "skipped", "skip": "time",
            "reason": "a shorter length was already over the time budget"}
  try:
    return {**cell, **_measure(compiled, call_args, repeats=repeats, budget=budget)}
  except Exception as e:  # noqa: BLE001  (an OOM must not lose the sweep)
    return {**cell, "status": "error", "reason": f"run failed: {type(e).__name__}: {e}"[:500]}


def skip_kind(c) -> str | None:
  """"time" or "memory" for a skipped cell (older JSON: from its reason)."""
  if c.get("status") != "skipped":
    return None
  if c.get("skip"):
    return c["skip"]
  return "memory" if "memory" in c.get("reason", "") else "time"


def mem_is_compiled(c) -> bool:
  return c.get("mem_bytes") is not None and c.get("mem_source", "compiled") == "compiled"


def cannot_run(c) -> bool:
  """The cell failed, or its compiled temporaries exceed the memory cap."""
  return c.get("status") == "error" or (skip_kind(c) == "memory" and mem_is_compiled(c))


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


def cell_key(name, seq_len, mode):
  return f"{name}|{seq_len}|{mode}"


# ------------------------------------------------------------------ output


def _fmt_bytes(b):
  if b is None:
    return "-"
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if b >= size:
      return f"{b / size:.3g} {unit}"
  return f"{int(b)} B"


def _fmt_time(t):
  if t is None:
    return "-"
  if t >= 1:
    return f"{t:.3g} s"
  return f"{t * 1e3:.3g} ms"


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


def fit_exponent(points, min_len=FIT_MIN_LEN):
  """Least-squares log-log slope of `[(L, t)]` over `L >= min_len`.

  None when fewer than 2 lengths `>= min_len` are given: the fit is then not
  measurable (shorter lengths are never used in its place).
  """
  pts = [(l, t) for l, t in points if l >= min_len and t]
  if len(pts) < 2:
    return None
  x = np.log([l for l, _ in pts])
  y = np.log([t for _, t in pts])
  return float(np.polyfit(x, y, 1)[0])


def analyse(data) -> dict:
  """Fitted exponents, PPA time per attended key and the project's targets.

  A target is `(text, verdict, detail)` with verdict True (PASS), False
  (FAIL) or None (not measured on this sweep; the detail says why).
  """
  cells = data["cells"]
  lengths = sorted({c["L"] for c in cells.values()})
  res = {"exponents": {}, "exponent_lengths": {}, "ppa_per_key": {}, "targets": []}

  def measured(name, mode):
    return sorted((c["L"], c["time_s"]) for c in cells.values()
                  if c["op"] == name and c["mode"] == mode and c["status"] == "ok")

  for op in OPS:
    res["exponents"][op.name] = {m: fit_exponent(measured(op.name, m)) for m in MODES}
    res["exponent_lengths"][op.name] = {
        m: [l for l, _ in measured(op.name, m) if l >= FIT_MIN_LEN] for m in MODES}
  for op in OPS:
    if op.family != "ppa":
      continue
    row = {}
    for mode in MODES:
      per = {l: t / ppa_attended_keys(l, op.p, op.window) for l, t in measured(op.name, mode)}
      ratio = max(per.values()) / min(per.values()) if len(per) >= 2 else None
      per2 = {l: x for l, x in per.items() if l >= FIT_MIN_LEN}
      ratio2 = max(per2.values()) / min(per2.values()) if len(per2) >= 2 else None
      row[mode] = {"per_key_s": per, "ratio": ratio, "ratio_ge_2k": ratio2}
    res["ppa_per_key"][op.name] = row

  targets = res["targets"]
  sl = res["exponents"]["superlinear"]["fwd"]
  fit_lens = res["exponent_lengths"]["superlinear"]["fwd"]
  all_lens = [l for l, _ in measured("superlinear", "fwd")]
  targets.append((f"superlinear fitted forward exponent <= 1.6 (least squares over the "
                  f"measured L >= {_len_label(FIT_MIN_LEN)})",
                  None if sl is None else sl <= 1.6,
                  f"not measurable on this sweep: the fit needs forward times at 2 or more "
                  f"lengths >= {_len_label(FIT_MIN_LEN)}, measured at "
                  f"{_lens(all_lens) or 'none'}" if sl is None else
                  f"{sl:.2f} over {_lens(fit_lens)}"))
  ratios = {n: r["fwd"]["ratio"] for n, r in res["ppa_per_key"].items()}
  known = {n: r for n, r in ratios.items() if r is not None}
  worst = max(known, key=known.get) if known else None
  targets.append(("PPA forward time per attended key within 2x across the sweep "
                  "(max/min, every p and window)",
                  None if not known else all(r <= 2.0 for r in known.values()),
                  "not measurable on this sweep: needs 2 or more measured lengths"
                  if not known else f"over {_lens(lengths)}: " +
                  f"worst {known[worst]:.2f}x ({worst}); " +
                  ", ".join(f"{n}: {r:.2f}x" for n, r in known.items())))
  c_sl = cells.get(cell_key("superlinear", 16384, "fwd"), {})
  c_dn = cells.get(cell_key("dense_reference", 16384, "fwd"), {})
  if c_sl.get("status") == "ok" and c_dn.get("status") == "ok":
    speed = c_dn["time_s"] / c_sl["time_s"]
    less_mem = c_sl["mem_bytes"] < c_dn["mem_bytes"]
    targets.append(("superlinear xla forward at 16K >= 5x faster than dense reference, "
                    "with less peak memory", speed >= 5 and less_mem,
                    f"{speed:.1f}x faster ({_fmt_time(c_sl['time_s'])} vs "
                    f"{_fmt_time(c_dn['time_s'])}); memory {_fmt_bytes(c_sl['mem_bytes'])} "
                    f"vs {_fmt_bytes(c_dn['mem_bytes'])}"))
  else:
    targets.append(("superlinear xla forward at 16K >= 5x faster than dense reference, "
                    "with less peak memory", None,
                    "not measured on this sweep: 16K forward was not measured for both "
                    f"(superlinear: {_cell_state(c_sl)}, dense reference: "
                    f"{_cell_state(c_dn)})"))
  targets.append(_target_64k(cells, data["meta"]))
  return res


def _lens(ls):
  return ", ".join(_len_label(l) for l in sorted(ls))


def _cell_state(c) -> str:
  """Short words for what happened to a cell."""
  if not c:
    return "not in the sweep"
  if c["status"] == "ok":
    return f"ran ({_fmt_time(c['time_s'])}, {_fmt_bytes(c.get('mem_bytes'))})"
  if c["status"] == "error":
    return f"failed ({c.get('reason', '')[:120]})"
  mem = (f"compiled temporaries {_fmt_bytes(c['mem_bytes'])}" if mem_is_compiled(c)
         else f"predicted memory {_fmt_bytes(c.get('est_mem_bytes'))}")
  if skip_kind(c) == "memory":
    return f"not run: {mem} above the memory cap" + (
        "" if mem_is_compiled(c) else " (a prediction, not compiled)")
  return (f"not run: over the time budget (est. {_fmt_time(c.get('est_time_s'))}); "
          f"{mem}")


def _target_64k(cells, meta):
  """At 64K superlinear runs and dense cannot (fails or does not fit in memory)."""
  text = ("at 64K superlinear runs where dense attention cannot (dense fails or its "
          f"compiled temporaries exceed the {meta.get('max_mem_gb', 12):g} GB cap)")
  sl = cells.get(cell_key("superlinear", 65536, "fwd"))
  dense = {n: cells.get(cell_key(n, 65536, "fwd")) for n in ("dense_reference", "dense_xla")}
  detail = f"superlinear: {_cell_state(sl)}; " + "; ".join(
      f"{n}: {_cell_state(c)}" for n, c in dense.items())
  if sl is None and all(c is None for c in dense.values()):
    return text, None, "not measured on this sweep: 64K is not one of its lengths"
  if sl is None or sl.get("status") != "ok" or any(
      c is not None and c.get("status") == "ok" for c in dense.values()):
    return text, False, detail
  if all(c is not None and cannot_run(c) for c in dense.values()):
    return text, True, detail
  return text, None, ("not shown by this sweep (a dense cell was not run only because "
                      "of the time budget, or is missing): " + detail)


def _cell_text(c, kind):
  if not c:
    return ""
  if c["status"] == "ok":
    return _fmt_time(c["time_s"]) if kind == "time" else _fmt_bytes(c["mem_bytes"])
  if c["status"] == "error":
    if kind == "mem" and c.get("mem_bytes"):
      return _fmt_bytes(c["mem_bytes"]) + " (run failed)"
    return "failed"
  mem = (_fmt_bytes(c["mem_bytes"]) if mem_is_compiled(c)
         else f"est. {_fmt_bytes(c.get('est_mem_bytes'))}")
  if skip_kind(c) == "memory" and mem_is_compiled(c):
    return f"too big ({mem})"
  if kind == "mem":
    return f"{mem} (not run)"
  if skip_kind(c) == "memory":
    return f"not run (est. {mem.removeprefix('est. ')} memory)"
  return (f"over budget (est. {_fmt_time(c['est_time_s'])})" if c.get("est_time_s")
          else "over budget")


def write_markdown(data, path):
  cells = data["cells"]
  meta = data["meta"]
  lengths = sorted({c["L"] for c in cells.values()})
  names = [op.name for op in OPS if any(c["op"] == op.name for c in cells.values())]
  an = analyse(data)
  lines = []
  add = lines.append
  add("# Benchmarks of the attention ops (CPU)")
  add("")
  add(f"Generated by `python -m eval.bench_ops {' '.join(meta.get('argv', []))}`"
      .rstrip() + f" on {meta['date']} (finished {meta.get('finished', 'not yet')})"
      + (f"; report text rebuilt from its JSON by `python -m eval.bench_ops "
         f"--report-only` on {meta['report_rebuilt']}" if meta.get("report_rebuilt") else "")
      + ".")
  add("")
  mi = meta["machine"]
  add(f"- Machine: {mi['cpu']}, {mi['cores']} cores, backend `{mi['backend']}`, "
      f"jax {mi['jax']}, Python {mi['python']}; 1-minute load average at start "
      f"{mi.get('load_avg_1min_at_start')}. Other jobs share this machine, so "
      "timings are noisy (median of repeats).")
  add(f"- Shapes: batch {meta['batch']}, {meta['heads']} heads, head_dim "
      f"{meta['head_dim']}, {meta['dtype']}; q, k, v (and the superlinear "
      "routing query) standard normal.")
  add("- Forward = the jitted op; forward+backward = `jax.grad` of "
      "`sum(out * cotangent)` w.r.t. q, k, v (fixed random cotangent). Time: "
      "median of up to "
      f"{meta['repeats']} calls after a warm-up call of the AOT-compiled function "
      "(`block_until_ready`); long calls get fewer repeats.")
  add("- Memory: `jax.jit(f).lower(...).compile().memory_analysis()"
      ".temp_size_in_bytes` (temporaries; inputs and outputs excluded).")
  add(f"- Cells not run: `too big (M)`: compiled temporaries M exceed the "
      f"{meta['max_mem_gb']:g} GB cap, it would not fit; `over budget (est. T)`: "
      f"the predicted time per call T (the op's previous lengths extrapolated with "
      f"their local log-log slope) exceeds the {meta['budget_s']:g} s budget of "
      "this sweep, the cell fits in memory and was not run; `failed`: compiling "
      "or running raised. In the memory tables `M (not run)` is the compiled "
      "figure of a cell that was not run, `est. M` a prediction (not compiled).")
  add("")
  add("Ops:")
  add("")
  for n in names:
    add(f"- `{n}`: {OPS_BY_NAME[n].label}")
  add("")

  def table(mode, kind, title):
    add(f"## {title}")
    add("")
    add("| op | " + " | ".join(_len_label(l) for l in lengths) + " |")
    add("|---|" + "---|" * len(lengths))
    for n in names:
      row = [_cell_text(cells.get(cell_key(n, l, mode)), kind) for l in lengths]
      add(f"| `{n}` | " + " | ".join(row) + " |")
    add("")

  table("fwd", "time", "Forward time")
  table("fwdbwd", "time", "Forward + backward time")
  table("fwd", "mem", "Peak temporary memory, forward")
  table("fwdbwd", "mem", "Peak temporary memory, forward + backward")

  add(f"## Fitted cost exponents (log-log least squares of time vs L, L >= "
      f"{FIT_MIN_LEN // 1024}K, measured cells only)")
  add("")
  add(f"`-`: fewer than 2 lengths >= {_len_label(FIT_MIN_LEN)} measured (not "
      "measurable on this sweep; shorter lengths are not used instead).")
  add("")
  add("| op | forward | forward + backward | asymptotic |")
  add("|---|---|---|---|")
  for n in names:
    op = OPS_BY_NAME[n]
    e = an["exponents"][n]
    asym = {"dense": "2", "window": "1", "superlinear": "1.5"}.get(op.family)
    if op.family == "ppa":
      asym = f"{1 + op.p:g}"
    add(f"| `{n}` | " + " | ".join("-" if e[m] is None else f"{e[m]:.2f}" for m in MODES)
        + f" | {asym} |")
  add("")
  add("PPA's asymptotic slope 1 + p only shows once L^p is well above the window: "
      "with w = 64 the window's w L term dominates at these "
      "lengths, so its fitted slope sits between 1 and 1 + p. The w = 8 row "
      "exposes more of the power-law term.")
  add("")

  add("## PPA: time per attended key")
  add("")
  add("Attended keys = sum over queries of the kept keys (exact, from "
      "`attn.ppa_offsets`; ~ w L + L^(1+p)/(1+p)). Forward ns per attended key:")
  add("")
  add("| op | " + " | ".join(_len_label(l) for l in lengths)
      + " | max/min | max/min (L >= 2K) | fwd+bwd max/min |")
  add("|---|" + "---|" * (len(lengths) + 3))
  for n, row in an["ppa_per_key"].items():
    per = row["fwd"]["per_key_s"]
    vals = [f"{per[l] * 1e9:.3g}" if l in per else "-" for l in lengths]
    r = row["fwd"]["ratio"]
    r2 = row["fwd"]["ratio_ge_2k"]
    rb = row["fwdbwd"]["ratio"]
    add(f"| `{n}` | " + " | ".join(vals) + " | "
        + " | ".join("-" if x is None else f"{x:.2f}x" for x in (r, r2, rb)) + " |")
  add("")
  add("Attended keys per sequence (exact / asymptotic formula):")
  add("")
  add("| op | " + " | ".join(_len_label(l) for l in lengths) + " |")
  add("|---|" + "---|" * len(lengths))
  for op in OPS:
    if op.family == "ppa" and op.name in names:
      add(f"| `{op.name}` | " + " | ".join(
          f"{ppa_attended_keys(l, op.p, op.window):.3g} / "
          f"{ppa_attended_keys_approx(l, op.p, op.window):.3g}" for l in lengths) + " |")
  add("")

  add("## Targets, computed from the data above")
  add("")
  for text, ok, detail in an["targets"]:
    add(f"- **{verdict_word(ok)}**: {text}: {detail}")
  add("")
  not_run = sorted((c for c in cells.values() if c["status"] != "ok"),
                   key=lambda c: (c["op"], c["mode"], c["L"]))
  if not_run:
    add("## Cells not run")
    add("")
    for c in not_run:
      add(f"- `{c['op']}` L = {_len_label(c['L'])} {c['mode']}: {_cell_state(c)}.")
    add("")
  notes = [c for c in cells.values() if c.get("note")]
  for c in sorted(notes, key=lambda c: (c["op"], c["L"], c["mode"])):
    add(f"Note: `{c['op']}` L = {_len_label(c['L'])} {c['mode']}: {c['note']}.")
    add("")
  add("![time and memory vs L](bench_ops.png)")
  add("")
  kept = _kernel_section(path)
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + (("\n" + kept + "\n") if kept else ""))
  return an


_KERNELS_BEGIN, _KERNELS_END = "<!-- bench_kernels:begin -->", "<!-- bench_kernels:end -->"


def _kernel_section(path) -> str:
  """The section `eval.bench_kernels` keeps in the same file (between its
  markers), so rewriting the op report never deletes the kernel report."""
  if not os.path.exists(path):
    return ""
  with open(path) as fh:
    text = fh.read()
  if _KERNELS_BEGIN not in text or _KERNELS_END not in text:
    return ""
  body = text.split(_KERNELS_BEGIN, 1)[1].split(_KERNELS_END, 1)[0]
  return _KERNELS_BEGIN + body + _KERNELS_END


def verdict_word(ok) -> str:
  return "NOT MEASURED" if ok is None else ("PASS" if ok else "FAIL")


def _len_label(l):
  return f"{l // 1024}K" if l % 1024 == 0 else str(l)


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
         f"est. {_fmt_time(est_t)}, {_fmt_bytes(est_m)}; elapsed "
         f"{time.perf_counter() - start:.0f} s, ETA ~{eta:.0f} s")
    shorter_over = any(c["op"] == name and c["mode"] == mode and c["L"] < seq_len
                       and skip_kind(c) == "time" for c in cells.values())
    cell = {**base, "est_mem_bytes": est_m,
            **run_cell(op, mode, _get_inputs(seq_len), est_time=est_t,
                       shorter_over_budget=shorter_over, repeats=repeats,
                       budget=args.budget, max_mem=max_mem)}
    cells[key] = cell
    _log(f"    -> {cell['status']}: "
         + (f"{_fmt_time(cell['time_s'])}, {_fmt_bytes(cell['mem_bytes'])}"
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
    plots.plot_bench(data, an, png_path)
  for text, ok, detail in an["targets"]:
    _log(f"{verdict_word(ok)}: {text}: {detail}")
  _log(f"wrote {md_path}" + ("" if args.no_plot else f", {png_path}"))
  return {"data": data, "analysis": an, "markdown": md_path,
          "png": None if args.no_plot else png_path}


if __name__ == "__main__":
  main()
