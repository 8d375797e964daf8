"""The report of `eval.bench_ops`: fitted exponents, targets, markdown.

`analyse(data)` turns the benchmark's JSON into fitted log-log exponents,
PPA time per attended key and PASS / FAIL / NOT MEASURED verdicts;
`write_markdown(data, path)` writes `docs/benchmarks.md` from it (keeping the
section `eval.bench_kernels` owns in the same file).
"""

from __future__ import annotations

import os

import numpy as np

from eval.bench_ops_cases import (FIT_MIN_LEN, MODES, OPS, OPS_BY_NAME, cannot_run,
                                  cell_key, fmt_bytes, fmt_time, mem_is_compiled,
                                  ppa_attended_keys, ppa_attended_keys_approx,
                                  skip_kind)

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
                    f"{speed:.1f}x faster ({fmt_time(c_sl['time_s'])} vs "
                    f"{fmt_time(c_dn['time_s'])}); memory {fmt_bytes(c_sl['mem_bytes'])} "
                    f"vs {fmt_bytes(c_dn['mem_bytes'])}"))
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
    return f"ran ({fmt_time(c['time_s'])}, {fmt_bytes(c.get('mem_bytes'))})"
  if c["status"] == "error":
    return f"failed ({c.get('reason', '')[:120]})"
  mem = (f"compiled temporaries {fmt_bytes(c['mem_bytes'])}" if mem_is_compiled(c)
         else f"predicted memory {fmt_bytes(c.get('est_mem_bytes'))}")
  if skip_kind(c) == "memory":
    return f"not run: {mem} above the memory cap" + (
        "" if mem_is_compiled(c) else " (a prediction, not compiled)")
  return (f"not run: over the time budget (est. {fmt_time(c.get('est_time_s'))}); "
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
    return fmt_time(c["time_s"]) if kind == "time" else fmt_bytes(c["mem_bytes"])
  if c["status"] == "error":
    if kind == "mem" and c.get("mem_bytes"):
      return fmt_bytes(c["mem_bytes"]) + " (run failed)"
    return "failed"
  mem = (fmt_bytes(c["mem_bytes"]) if mem_is_compiled(c)
         else f"est. {fmt_bytes(c.get('est_mem_bytes'))}")
  if skip_kind(c) == "memory" and mem_is_compiled(c):
    return f"too big ({mem})"
  if kind == "mem":
    return f"{mem} (not run)"
  if skip_kind(c) == "memory":
    return f"not run (est. {mem.removeprefix('est. ')} memory)"
  return (f"over budget (est. {fmt_time(c['est_time_s'])})" if c.get("est_time_s")
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


