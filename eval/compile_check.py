"""Compile every kernel for real GPUs and TPUs on a CPU-only machine.

    python -m eval.compile_check --platform gpu --cases ci
    python -m eval.compile_check --platform tpu --gens v5e,v6e,v5p,v4 --cases sweep
    python -m eval.compile_check --platform all --cases sweep --lengths 4096 --timeout 300
    python -m eval.compile_check --platform gpu --cases sweep --ops superlinear \
        --configs released --base-only --lengths 1048576 --heads 32:8   # memory at 1M
    python -m eval.compile_check --platform tpu --gens v5e --cases sweep --ops superlinear \
        --base-only --modes grad --lengths 1048576 --heads 4:1 --remat

Needs the `aot` extra (`pip install -e '.[aot]'`). Each case is one public op
(`implementation="pallas"`) forward or `jax.value_and_grad`, compiled in a
worker process (`eval/compile/`); a case passes when it compiles, its compiled
HLO holds the platform's kernel custom call and (GPU) every kernel's shared
memory fits the H100. Results go to `--out` (JSON lines, appended as they
arrive; `--resume` skips cases already there, errors excepted) and the report to `--report`.
Exit status 1 when any case did not pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import platform as _platform
import shlex
import sys
from importlib import metadata

from eval.compile import cases as cases_lib
from eval.compile import driver, gpu, report, tpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def versions() -> dict:
  v = {}
  for pkg in ("jax", "jaxlib", "jax-cuda12-pjrt", "libtpu", "nvidia-cuda-nvcc-cu12"):
    try:
      v[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      v[pkg] = "missing"
  v["ptxas"] = gpu.ptxas_version()
  return v


def select(args) -> list[cases_lib.Case]:
  if args.cases == "ci":
    chosen = cases_lib.ci_cases()
  else:
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else \
        cases_lib.SWEEP_LENGTHS
    chosen = [c for c in cases_lib.sweep_cases(lengths) if c.seq_len in lengths]
  if args.ops:
    ops = set(args.ops.split(","))
    chosen = [c for c in chosen if c.op in ops]
  if args.modes:
    chosen = [c for c in chosen if c.mode in args.modes.split(",")]
  if args.head_dims:
    chosen = [c for c in chosen if str(c.head_dim) in args.head_dims.split(",")]
  if args.dtypes:
    chosen = [c for c in chosen if c.dtype in args.dtypes.split(",")]
  if args.configs:
    chosen = [c for c in chosen if not c.op.startswith("superlinear")
              or c.config in args.configs.split(",")]
  if args.base_only:
    chosen = [c for c in chosen if c.head_dim == 128 and c.dtype == "bfloat16"
              and c.heads == (8, 2) and c.q_len in (None, 16)]
  if args.heads:
    layouts = parse_heads_list(args.heads)
    chosen = list({c.key: c for c in (dataclasses.replace(c, heads=heads)
                                      for heads in layouts for c in chosen)}.values())
  if args.remat:
    chosen = [dataclasses.replace(c, remat=True) for c in chosen if c.op == "superlinear"]
  return chosen


def parse_heads(text: str) -> tuple[int, int]:
  """`"32:8"` -> `(32, 8)` (query heads, kv heads; kv heads divide query heads)."""
  try:
    hq, hk = (int(x) for x in text.split(":"))
  except ValueError:
    raise ValueError(f"--heads {text!r}: expected QUERY:KV, e.g. 32:8") from None
  if hq < 1 or hk < 1 or hq % hk:
    raise ValueError(f"--heads {text!r}: kv heads must divide query heads, e.g. 32:8")
  return hq, hk


def parse_heads_list(text: str) -> list[tuple[int, int]]:
  """`"16:8,32:8"` -> `[(16, 8), (32, 8)]` (`parse_heads` each)."""
  return [parse_heads(x) for x in text.split(",")]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--platform", choices=("gpu", "tpu", "all"), default="all")
  ap.add_argument("--gens", default="v5e,v6e,v5p,v4", help="TPU generations")
  ap.add_argument("--cases", choices=("ci", "sweep"), default="ci")
  ap.add_argument("--lengths", default="", help="sweep only: comma-separated L")
  ap.add_argument("--ops", default="", help=f"subset of {','.join(cases_lib.OPS)}")
  ap.add_argument("--modes", default="", help="fwd,grad")
  ap.add_argument("--head-dims", default="")
  ap.add_argument("--dtypes", default="", help="bfloat16,float32")
  ap.add_argument("--configs", default="", help="superlinear configs: default,released")
  ap.add_argument("--heads", default="",
                  help="compile the selected cases at these heads instead, QUERY:KV, "
                  "comma-separated for several (e.g. 32:8 with --base-only: a model's "
                  "real heads, for memory; 16:8,32:8)")
  ap.add_argument("--remat", action="store_true",
                  help="only the superlinear prefill cases, compiled with remat=True "
                  "(query chunks recomputed in the backward: memory at 1M)")
  ap.add_argument("--base-only", action="store_true",
                  help="only head_dim 128, bf16, GQA 8:2 (and q_len 16 for decode)")
  ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
  ap.add_argument("--out", default=str(ROOT / "docs" / "compiled.jsonl"))
  ap.add_argument("--report", default=str(ROOT / "docs" / "compiled.md"))
  ap.add_argument("--slow", action="store_true",
                  help="only cases whose latest result in --out is over the time limit "
                  "(30 s superlinear, 15 s other ops): re-time them")
  ap.add_argument("--resume", action="store_true",
                  help="skip cases with a result in --out (errors and crashes are retried)")
  ap.add_argument("--repeat", type=int, default=1,
                  help="TPU: compile each case this many times (caches cleared) and "
                  "record the fastest; the machine's load makes one compile vary by ~20%%")
  ap.add_argument("--report-only", action="store_true",
                  help="compile nothing: rewrite --report from the results in --out")
  args = ap.parse_args(argv)
  if args.repeat < 1:
    ap.error(f"--repeat {args.repeat}: must be >= 1")
  if args.report_only:
    runs, results = report.load(pathlib.Path(args.out))
    pathlib.Path(args.report).write_text(
        report.render(runs, results, cases_lib.sweep_cases()))
    print(f"report: {args.report} ({len(results)} results)")
    return 0
  if args.heads:
    try:
      parse_heads_list(args.heads)
    except ValueError as exc:
      ap.error(str(exc))

  targets = []
  if args.platform in ("gpu", "all"):
    targets.append("gpu")
  if args.platform in ("tpu", "all"):
    for g in args.gens.split(","):
      if g not in tpu.TOPOLOGIES:
        ap.error(f"--gens: unknown generation {g!r}; use {','.join(tpu.TOPOLOGIES)}")
      targets.append(f"tpu:{g}")
  for t in targets:
    why = driver.missing_packages(t.split(":")[0])
    if why:
      print(f"cannot compile for {t}: {why}", file=sys.stderr)
      return 2
  out, rep = pathlib.Path(args.out), pathlib.Path(args.report)
  chosen = select(args)
  _, done = report.load(out)
  command = "python -m eval.compile_check " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  report.append(out, {"run": {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": command, "cases": len(chosen), "targets": targets,
      "versions": versions(), "machine": f"{_platform.machine()}, "
      f"{__import__('os').cpu_count()} CPUs, CPU only"}})
  failed = []

  def on_result(case, rec):
    report.append(out, rec)
    if rec["status"] != "ok":
      failed.append(rec)
    runs, results = report.load(out)
    rep.write_text(report.render(runs, results, cases_lib.sweep_cases()))

  for t in targets:
    todo = [c for c in chosen if not (args.resume and done.get((t, c.key), {}).get(
        "status") in ("ok", "fail", "timeout"))]
    if args.slow:
      slow = report.slow_results(done)
      todo = [c for c in todo if (t, c.key) in slow]
    print(f"== {t}: {len(todo)} cases (timeout {args.timeout:.0f} s each)", flush=True)
    driver.run([t], todo, timeout_s=args.timeout, on_result=on_result, repeat=args.repeat)
  print(f"{len(failed)} case(s) did not pass; report: {rep}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
