"""The kernel benchmark runs end to end on CPU (tiny shapes, interpret mode)
and writes only its own marked section of benchmarks.md."""

from __future__ import annotations

import json
import os

from eval import bench_kernels


def test_bench_kernels_quick_writes_its_section(tmp_path):
  md_path = os.path.join(tmp_path, "benchmarks.md")
  with open(md_path, "w") as fh:
    fh.write("# Benchmarks of the attention ops (CPU)\n\nkept text\n")
  res = bench_kernels.main(["--quick", "--out", str(tmp_path), "--lengths", "64",
                            "--cases", "pallas_dense_causal,pallas_sparse90,cudnn_dense_causal"])
  with open(md_path) as fh:
    md = fh.read()
  assert md.startswith("# Benchmarks of the attention ops (CPU)\n\nkept text\n")
  assert md.count(bench_kernels.BEGIN) == 1 and md.count(bench_kernels.END) == 1
  with open(res["json"]) as fh:
    data = json.load(fh)
  for name in ("pallas_dense_causal", "pallas_sparse90"):
    for mode in bench_kernels.MODES:
      cell = data["cells"][name]["64"][mode]
      assert cell["status"] == "ok", cell
      assert cell["time_s"] > 0 and cell["tflops"] > 0
  # cuDNN does not run on CPU: recorded as failed, not invented.
  assert data["cells"]["cudnn_dense_causal"]["64"]["fwd"]["status"] == "failed"
  assert all(v == "NOT MEASURED" for _, v, _ in data["targets"])
  # Attended entries: causal 64 x 64 lower triangle incl. diagonal, 4 query heads.
  assert data["cells"]["pallas_dense_causal"]["64"]["fwd"]["attended"] == 64 * 65 // 2 * 4
  # The section can be rebuilt from the JSON alone (after another tool
  # rewrote the file).
  with open(md_path, "w") as fh:
    fh.write("# other\n")
  bench_kernels.main(["--report-only", "--out", str(tmp_path)])
  with open(md_path) as fh:
    rebuilt = fh.read()
  assert rebuilt.startswith("# other\n") and "`pallas_sparse90`" in rebuilt
  # A second run replaces the section instead of appending one.
  bench_kernels.main(["--quick", "--out", str(tmp_path), "--lengths", "64",
                      "--cases", "pallas_dense_causal", "--modes", "fwd"])
  with open(md_path) as fh:
    md = fh.read()
  assert md.count(bench_kernels.BEGIN) == 1 and md.startswith("# other\n")


def test_targets_are_computed_from_gpu_cells():
  """Target arithmetic on synthetic GPU cells (PASS and FAIL both reachable)."""
  def cell(t, tflops=1.0):
    return {"fwd": {"status": "ok", "time_s": t, "tflops": tflops}}
  cells = {"pallas_dense_causal": {"4096": cell(1, 300), "8192": cell(1, 200)},
           "cudnn_dense_causal": {"4096": cell(1, 500), "8192": cell(1, 500)},
           "pallas_window": {"8192": cell(1.0), "16384": cell(2.1), "32768": cell(4.0)},
           "pallas_sparse90": {"32768": cell(1.0)}, "pallas_full": {"32768": cell(6.0)}}
  data = {"device": {"platform": "gpu"}, "quick": False, "cells": cells,
          "config": {"lengths": [4096, 8192, 16384, 32768]}}
  verdicts = [v for _, v, _ in bench_kernels.targets(data)]
  assert verdicts == ["FAIL", "PASS", "PASS"]   # 200/500 = 40% < 50% at 8K
