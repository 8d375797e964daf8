"""Smoke test of the benchmark (`python -m eval.bench_ops`) on a tiny sweep."""

from __future__ import annotations

import json
import os

from eval import bench_ops


def test_bench_ops_main_writes_every_op(tmp_path):
  out = str(tmp_path)
  # Forward only: compiling every op's gradient too would take a minute on
  # a loaded 2-core CPU; the full sweep measures both.
  res = bench_ops.main(["--lengths", "128,256", "--out", out, "--quick",
                        "--modes", "fwd"])
  md_path = os.path.join(out, "benchmarks.md")
  png_path = os.path.join(out, "bench_ops.png")
  json_path = os.path.join(out, "bench_ops.json")
  for path in (md_path, png_path, json_path):
    assert os.path.getsize(path) > 0, path
  with open(png_path, "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(json_path) as fh:
    data = json.load(fh)
  with open(md_path) as fh:
    md = fh.read()
  assert res["markdown"] == md_path
  for op in bench_ops.OPS:
    for seq_len in (128, 256):
      cell = data["cells"][f"{op.name}|{seq_len}|fwd"]
      assert cell["status"] == "ok", cell
      assert cell["time_s"] > 0 and cell["mem_bytes"] >= 0
    assert f"| `{op.name}` |" in md, op.name
  for heading in ("## Forward time", "## Fitted cost exponents", "## PPA: time per attended key",
                  "## Targets"):
    assert heading in md
  assert "superlinear fitted forward exponent" in md
