"""The benchmark report states only what was measured (synthetic sweeps, no timing)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from eval import bench_ops, bench_ops_cases, bench_ops_report

META = {"date": "2026-01-01T00:00:00", "batch": 1, "heads": 4, "head_dim": 64,
        "dtype": "float32", "repeats": 3, "budget_s": 60.0, "max_mem_gb": 12.0,
        "argv": ["--quick"],
        "machine": {"cpu": "test cpu", "cores": 2, "backend": "cpu", "jax": "0",
                    "python": "3.12", "load_avg_1min_at_start": 0.0}}


def _ok(op, L, t, mem=1e6, mode="fwd"):
  return {"op": op, "L": L, "mode": mode, "status": "ok", "time_s": t, "mem_bytes": mem,
          "mem_source": "compiled"}


def _data(cells):
  return {"meta": dict(META), "cells": {bench_ops_cases.cell_key(c["op"], c["L"], c["mode"]): c
                                        for c in cells}}


def _target(an, prefix):
  (hit,) = [t for t in an["targets"] if t[0].startswith(prefix)]
  return hit


def test_fit_needs_two_lengths_at_or_above_2k():
  pts = [(512, 1.0), (1024, 2.8), (2048, 8.0)]
  assert bench_ops_report.fit_exponent(pts) is None
  assert bench_ops_report.fit_exponent(pts + [(4096, 8.0 * 2 ** 1.5)]) == pytest.approx(1.5)


def test_quick_sweep_does_not_claim_the_exponent_target(tmp_path):
  # 512-2048 with a slope of 1.3 below 2K: the old fit used it and printed PASS.
  cells = [_ok("superlinear", L, 1e-3 * (L / 512) ** 1.3) for L in (512, 1024, 2048)]
  data = _data(cells)
  an = bench_ops_report.analyse(data)
  text, verdict, detail = _target(an, "superlinear fitted forward exponent")
  assert verdict is None and "not measurable" in detail and "512, 1K, 2K" in detail
  assert an["exponents"]["superlinear"]["fwd"] is None
  md_path = tmp_path / "benchmarks.md"
  bench_ops_report.write_markdown(data, str(md_path))
  md = md_path.read_text()
  assert "**NOT MEASURED**: superlinear fitted forward exponent" in md
  assert "PASS" not in md
  for word in ("shared/papers", "issue", "Issue"):
    assert word not in md, word


def _sweep_64k(dense_xla_cell):
  cells = [_ok("superlinear", L, 0.1 * (L / 2048) ** 1.5) for L in (2048, 65536)]
  cells.append({"op": "dense_reference", "L": 65536, "mode": "fwd", "status": "skipped",
                "skip": "memory", "mem_bytes": 137e9, "mem_source": "compiled",
                "est_time_s": 498.0, "reason": "compiled temporaries 137 GB > cap 12 GB"})
  cells.append({"op": "dense_xla", "L": 65536, "mode": "fwd", **dense_xla_cell})
  return _data(cells)


def test_64k_target_passes_only_when_dense_cannot_run(tmp_path):
  over_budget = {"status": "skipped", "skip": "time", "mem_bytes": 136e6,
                 "mem_source": "compiled", "est_time_s": 227.0,
                 "reason": "predicted 227 s > budget 60 s"}
  data = _sweep_64k(over_budget)
  _, verdict, detail = _target(bench_ops_report.analyse(data), "at 64K")
  assert verdict is None and "time budget" in detail and "136 MB" in detail
  md_path = tmp_path / "benchmarks.md"
  bench_ops_report.write_markdown(data, str(md_path))
  md = md_path.read_text()
  assert "over budget (est. 227 s)" in md and "too big (137 GB)" in md
  assert "136 MB (not run)" in md

  failed = {"status": "error", "reason": "run failed: RuntimeError: out of memory"}
  assert _target(bench_ops_report.analyse(_sweep_64k(failed)), "at 64K")[1] is True
  ran = {"status": "ok", "time_s": 200.0, "mem_bytes": 136e6}
  assert _target(bench_ops_report.analyse(_sweep_64k(ran)), "at 64K")[1] is False
  # A memory skip that was only predicted (never compiled) proves nothing.
  predicted = {"status": "skipped", "reason": "predicted memory 20 GB > 12 GB",
               "est_mem_bytes": 20e9, "est_time_s": 227.0}
  assert _target(bench_ops_report.analyse(_sweep_64k(predicted)), "at 64K")[1] is None


def test_run_cell_records_compiled_memory_and_why_it_did_not_run():
  op = bench_ops_cases.Op("tiny", "tiny", lambda q, k, v, qs: q * k + v, "dense")
  args = tuple(jnp.ones((1, 8, 2, 4)) for _ in range(5))
  common = dict(est_time=None, shorter_over_budget=False, repeats=1, budget=60.0)
  too_big = bench_ops.run_cell(op, "fwd", args, **common, max_mem=-1)
  assert too_big["status"] == "skipped" and too_big["skip"] == "memory"
  assert too_big["mem_source"] == "compiled" and bench_ops_cases.cannot_run(too_big)
  slow = bench_ops.run_cell(op, "fwd", args, **dict(common, est_time=100.0), max_mem=1e9)
  assert slow["status"] == "skipped" and slow["skip"] == "time"
  assert not bench_ops_cases.cannot_run(slow)
  ran = bench_ops.run_cell(op, "fwdbwd", args, **common, max_mem=1e9)
  assert ran["status"] == "ok" and ran["time_s"] > 0
  bad = bench_ops_cases.Op("bad", "bad", lambda q, k, v, qs: q @ jnp.ones((3, 3)), "dense")
  failed = bench_ops.run_cell(bad, "fwd", args, **common, max_mem=1e9)
  assert failed["status"] == "error" and bench_ops_cases.cannot_run(failed)


def test_rewriting_the_op_report_keeps_the_kernel_section(tmp_path):
  """`eval.bench_kernels` keeps its section in the same file between markers;
  regenerating the op report must not delete it."""
  md_path = tmp_path / "benchmarks.md"
  section = "<!-- bench_kernels:begin -->\n# Kernel table\n| a |\n<!-- bench_kernels:end -->"
  md_path.write_text("old op report\n\n" + section + "\n")
  data = _data([_ok("superlinear", L, 1e-3 * (L / 512) ** 1.5) for L in (512, 1024)])
  bench_ops_report.write_markdown(data, str(md_path))
  md = md_path.read_text()
  assert "old op report" not in md
  assert md.count(section) == 1
