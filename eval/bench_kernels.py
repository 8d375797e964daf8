"""Benchmark of the attention kernels on one device: time, TFLOP/s, memory.

    python -m eval.bench_kernels --preset h100 --out docs       # forward targets, one 8-min GPU command
    python -m eval.bench_kernels --preset h100_bwd --out docs   # forward + backward, the second one
    python -m eval.bench_kernels --preset h100 --dry-run        # the plan and its estimated time
    python -m eval.bench_kernels [--lengths 4096,...] [--decode-lengths 32768,...]
                                 [--cases a,b | --families f,g] [--repeats 3]
                                 [--budget-s 540] [--cell-cap-s 8] [--out docs]
    python -m eval.bench_kernels --quick --out /tmp/kb   # tiny, CPU interpret
    python -m eval.bench_kernels --report-only           # section from the JSON

Modules: `bench_plan.py` (shapes, `Case`, presets, cell order, estimates),
`bench_cells.py` (the block-sparse / baseline cases and the `Runner`),
`bench_report.py` (targets, markdown); this one collects the cases and runs.

Cases are pluggable: this package's `bench_cells.CASES` plus `CASES` of
every module `eval/kernel_cases_<family>.py` (a module that fails to
import, or an entry that is not a case, is reported as a warning and
skipped). A `Case` builder `make(L, dtype, key, config) -> Built(fwd,
fwd_bwd, args, attended, entry_flops, tokens)`: `fwd(*args)` returns the
attention output (decode: `tokens` generated tokens in one jitted loop),
`fwd_bwd(*args)` the gradients w.r.t. every argument (None for forward-only
cases), `attended` counts the attended (query, key) entries summed over
batch and query heads (per token for decode).

A preset runs its own target-first list of cells (forward first; the
backward is the second preset), within a wall-clock budget; without a
preset every case runs at every length of the config. `--dry-run` prints
the plan with each cell's estimated time (roofline model plus a compile
allowance, `bench_plan.estimate_s`) and the total. Every finished cell
prints a progress line with the elapsed time and an ETA, and rewrites the
JSON and the markdown section, so a killed run keeps what it measured. A
failing cell is recorded and the run continues. Targets print PASS / FAIL
/ NOT MEASURED; they are defined on an NVIDIA GPU at the full sizes and are
NOT MEASURED anywhere else (quick mode included).

Results: `<out>/bench_kernels.json` and a section of `<out>/benchmarks.md`
between the markers `<!-- bench_kernels:begin -->` / `<!-- bench_kernels:end -->`
(the rest of the file is kept), both written by this command with the date
and the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pkgutil
import sys

from eval.bench_cells import (CASES, Runner, built, causal_entries, device_info,  # noqa: F401
                              device_memory_bytes, grad_of, qkv, random_block_layout)
from eval.bench_plan import (BWD_FACTOR, LONG_CALL_S, MEMORY_FRACTION,  # noqa: F401
                             MODES, PRESETS, QUICK, Built, Case, Config, Preset,
                             case_max_len, estimate_s, extrapolate, fmt_bytes, fmt_len,
                             fmt_time, mode_lengths, plan, preset_plan)
from eval.bench_report import (BEGIN, END, SUPERLINEAR_CONFIGS, TARGET_NAMES,  # noqa: F401
                               markdown, superlinear_target_names, targets, write_section)

# Cases the targets read: run first (without a preset), so that a run cut
# short by its budget loses the others.
PRIORITY = ("pallas_dense_causal", "cudnn_dense_causal", "pallas_window", "pallas_sparse90",
            "pallas_full", "decode_superlinear_default", "decode_superlinear_released",
            "decode_dense_cudnn", "decode_dense_xla", "superlinear_default",
            "superlinear_released")


def _as_case(obj):
  """A driver `Case` from `obj` (a `Case`, or anything with the same
  attributes), else None."""
  if isinstance(obj, Case):
    return obj
  try:
    return Case(str(obj.name), str(obj.label), str(obj.family), obj.make,
                tuple(getattr(obj, "modes", ("fwd", "fwdbwd"))), getattr(obj, "max_len", None))
  except AttributeError:
    return None


def collect_cases(modules) -> tuple[list[Case], list[str]]:
  """`(cases, warnings)` from `(module_name, module-or-exception)` pairs:
  this module's `CASES` first, then each module's; bad entries are skipped
  with a warning (the run goes on)."""
  cases, warnings, seen = [], [], set()
  for mod_name, mod in [("eval.bench_kernels", sys.modules[__name__])] + list(modules):
    if isinstance(mod, BaseException):
      warnings.append(f"{mod_name}: not imported ({type(mod).__name__}: {mod})"[:300])
      continue
    entries = getattr(mod, "CASES", None)
    if entries is None:
      warnings.append(f"{mod_name}: has no CASES")
      continue
    for obj in entries:
      case = _as_case(obj)
      if case is None:
        warnings.append(f"{mod_name}: entry {type(obj).__name__} "
                        f"{getattr(obj, 'name', '?')!r} is not a Case (needs name, label, "
                        "family, make)")
      elif case.name in seen:
        warnings.append(f"{mod_name}: duplicate case name {case.name!r} skipped")
      elif bad := [m for m in case.modes if m not in MODES]:
        warnings.append(f"{mod_name}: case {case.name!r} has unknown modes {bad}")
      else:
        seen.add(case.name)
        cases.append(case)
  return cases, warnings


def all_cases() -> tuple[list[Case], list[str]]:
  """This module's cases plus `CASES` of every `eval/kernel_cases_*.py`."""
  import eval as eval_pkg
  modules = []
  for info in sorted(pkgutil.iter_modules(eval_pkg.__path__), key=lambda m: m.name):
    if info.name.startswith("kernel_cases_"):
      name = f"eval.{info.name}"
      try:
        modules.append((name, importlib.import_module(name)))
      except Exception as e:  # noqa: BLE001 - reported, the run goes on
        modules.append((name, e))
  return collect_cases(modules)


def order_cases(cases: list[Case]) -> list[Case]:
  """Cases in `PRIORITY` first (in that order), then the rest as found."""
  rank = {n: i for i, n in enumerate(PRIORITY)}
  return sorted(cases, key=lambda c: rank.get(c.name, len(rank)))


# ---------------------------------------------------------------- planning


# --------------------------------------------------------------------- main


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.bench_kernels", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                  help="lengths/repeats/budget sized for one device command")
  ap.add_argument("--lengths", default=None, help="comma-separated forward lengths")
  ap.add_argument("--decode-lengths", default=None, help="comma-separated cache lengths")
  ap.add_argument("--max-backward-len", type=int, default=None)
  ap.add_argument("--cases", default=None, help="comma-separated case names (default all)")
  ap.add_argument("--families", default=None, help="comma-separated case families")
  ap.add_argument("--out", default="docs", help="folder for benchmarks.md and the JSON")
  ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5, quick 1)")
  ap.add_argument("--quick", action="store_true",
                  help=f"tiny shapes {QUICK.lengths} (CPU: Pallas interpret mode)")
  ap.add_argument("--modes", default=",".join(MODES), help="subset of fwd,fwdbwd,decode")
  ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the run")
  ap.add_argument("--cell-cap-s", type=float, default=None,
                  help="skip a cell whose extrapolated time per call exceeds this")
  ap.add_argument("--memory-limit-gb", type=float, default=None,
                  help="device memory to plan against (default: the device's own figure)")
  ap.add_argument("--dry-run", action="store_true",
                  help="print the planned cells (case, L, modes) and exit")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the benchmarks.md section from <out>/bench_kernels.json")
  return ap.parse_args(argv)


def _ints(text):
  return tuple(int(x) for x in text.split(",") if x)


def _select(cases, args):
  by_name = {c.name: c for c in cases}
  if args.cases:
    names = args.cases.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
      raise SystemExit(f"unknown cases {unknown}; choose from {list(by_name)}")
    cases = [by_name[n] for n in names]
  if args.families:
    fams = set(args.families.split(","))
    unknown = fams - {c.family for c in by_name.values()}
    if unknown:
      raise SystemExit(f"unknown families {sorted(unknown)}; choose from "
                       f"{sorted({c.family for c in by_name.values()})}")
    cases = [c for c in cases if c.family in fams]
  return cases


def _write(data, json_path, md_path):
  data["targets"] = targets(data)
  os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
  with open(json_path, "w") as fh:
    json.dump(data, fh, indent=1)
  write_section(md_path, markdown(data))


def _estimate(case, seq_len, modes, config, repeats):
  """`bench_plan.estimate_s`, or the defaults when the model cannot size the
  cell (e.g. tiny quick shapes it does not cover)."""
  try:
    return estimate_s(case, seq_len, modes, config, repeats)
  except Exception:  # noqa: BLE001 - an estimate never stops a run
    return {m: {"call_s": 0.0, "model": False, "compile_s": 0.0, "total_s": 0.0}
            for m in modes}


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse(argv)
  json_path = os.path.join(args.out, "bench_kernels.json")
  md_path = os.path.join(args.out, "benchmarks.md")
  if args.report_only:
    with open(json_path) as fh:
      data = json.load(fh)
    write_section(md_path, markdown(data))
    return {"json": json_path, "markdown": md_path, "data": data}
  preset = PRESETS[args.preset] if args.preset else None
  config = QUICK if args.quick else (preset.config if preset else Config())
  if args.lengths:
    config = dataclasses.replace(config, lengths=_ints(args.lengths))
  if args.decode_lengths:
    config = dataclasses.replace(config, decode_lengths=_ints(args.decode_lengths))
  if args.max_backward_len is not None:
    config = dataclasses.replace(config, max_backward_len=args.max_backward_len)
  all_found, warnings = all_cases()
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  cases = order_cases(_select(all_found, args))
  modes = tuple(m for m in args.modes.split(",") if m)
  repeats = args.repeats or (1 if args.quick else (preset.repeats if preset else 5))
  budget = args.budget_s if args.budget_s is not None else (preset.budget_s if preset else None)
  cap = args.cell_cap_s if args.cell_cap_s is not None else (
      preset.cell_cap_s if preset else None)
  memory = (int(args.memory_limit_gb * 1e9) if args.memory_limit_gb is not None
            else device_memory_bytes())
  runner = Runner(config, repeats, budget_s=budget, cell_cap_s=cap, memory_limit=memory)
  custom = args.cases or args.families or args.lengths or args.decode_lengths
  if preset is not None and not custom:
    cells_plan, plan_warn = preset_plan(preset, cases)
    cells_plan = [(c, l, tuple(m for m in at if m in modes)) for c, l, at in cells_plan]
    cells_plan = [(c, l, at) for c, l, at in cells_plan if at]
    warnings = warnings + plan_warn
  else:
    cells_plan = plan(cases, config, modes)
  estimates = [_estimate(c, l, at, config, repeats) for c, l, at in cells_plan]
  est_total = sum(e["total_s"] for est in estimates for e in est.values())
  if args.dry_run:
    for (case, seq_len, at), est in zip(cells_plan, estimates):
      for mode in at:
        e = est[mode]
        call = fmt_time(e["call_s"]) + ("" if e["model"] else " (no model: assumed)")
        print(f"{case.name} L={fmt_len(seq_len)} {mode}: est {e['total_s']:.1f} s "
              f"(compile {e['compile_s']:.0f} s + calls of {call})")
    print(f"{sum(len(at) for _, _, at in cells_plan)} cells, {len(cells_plan)} builds, "
          f"estimated {est_total:.0f} s (roofline model + compile allowance, not a "
          f"measurement); budget {budget} s")
    if not args.quick:
      from eval import roofline
      print("\nRoofline model at the target cells (H100, a model, not a measurement):")
      print("\n".join(roofline.today_table()))
    return {"plan": [(c.name, l, at) for c, l, at in cells_plan], "estimate_s": est_total}
  data = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv,
          "device": device_info(), "config": dataclasses.asdict(config), "quick": args.quick,
          "repeats": repeats, "limits": {"budget_s": budget, "cell_cap_s": cap,
                                         "memory_limit_bytes": memory},
          "cases": [c.name for c in cases], "labels": {c.name: c.label for c in cases},
          "case_meta": {c.name: {"family": c.family, "modes": list(c.modes),
                                 "max_len": case_max_len(c, config)} for c in cases},
          "warnings": warnings, "cells": {}, "complete": False, "wall_s": 0.0,
          "plan": [{"case": c.name, "L": l, "modes": list(at),
                    "estimate_s": {m: e[m]["total_s"] for m in at}}
                   for (c, l, at), e in zip(cells_plan, estimates)],
          "plan_estimate_s": est_total}
  total = sum(len(at) for _, _, at in cells_plan)
  left = [e[m]["total_s"] for (_, _, at), e in zip(cells_plan, estimates) for m in at]
  done = [0]
  for case, seq_len, at in cells_plan:
    def on_cell(mode, cell, case=case, seq_len=seq_len):
      done[0] += 1
      data["cells"].setdefault(case.name, {}).setdefault(str(seq_len), {})[mode] = cell
      data["wall_s"] = runner.elapsed()
      _write(data, json_path, md_path)
      if cell["status"] == "ok":
        what = (f"{fmt_time(cell['time_s'])}, {cell['tflops']:.3g} TFLOP/s, "
                f"{fmt_bytes(cell['mem_bytes'])}")
      else:
        what = f"{cell['status']}: {cell['reason']}"
      eta = sum(left[done[0]:])
      if budget is not None:
        eta = min(eta, max(0.0, budget - runner.elapsed()))
      runner.log(f"[{done[0]}/{total}] {case.name} L={fmt_len(seq_len)} {mode}: {what} | "
                 f"{runner.elapsed():.0f} s elapsed, ETA ~{eta:.0f} s (plan estimate)")
    try:
      runner.measure(case, seq_len, at, on_cell)
    except Exception as e:  # noqa: BLE001 - a broken cell never ends the run
      for mode in at:
        if mode not in data["cells"].get(case.name, {}).get(str(seq_len), {}):
          on_cell(mode, {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]})
  data["complete"] = True
  data["wall_s"] = runner.elapsed()
  _write(data, json_path, md_path)
  for name, verdict, why in data["targets"]:
    print(f"{verdict}: {name} ({why})")
  return {"json": json_path, "markdown": md_path, "data": data}


if __name__ == "__main__":
  # Run the imported module's main, so that `eval/kernel_cases_*.py` (which
  # import `eval.bench_kernels`) and this run share one set of classes.
  from eval import bench_kernels
  bench_kernels.main()
