"""The kernel benchmark runs end to end on CPU (tiny shapes, interpret mode),
writes only its own marked section of benchmarks.md, records failures and
skips instead of numbers it did not measure, and computes its targets from
the cells."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from eval import bench_kernels as bk
from eval import kernel_cases_decode, kernel_cases_stripe, kernel_cases_superlinear

# One case per family, the cheap ones (each compiles and runs in interpret
# mode in a few seconds on a loaded 2-core CPU).
QUICK_CASES = ("pallas_dense_causal", "cudnn_dense_causal", "superlinear_default",
               "superlinear_default_xla", "search_default", "decode_superlinear_default",
               "decode_dense_xla")


def test_bench_kernels_quick_writes_its_section(tmp_path):
  md_path = os.path.join(tmp_path, "benchmarks.md")
  with open(md_path, "w") as fh:
    fh.write("# Benchmarks of the attention ops (CPU)\n\nkept text\n")
  res = bk.main(["--quick", "--out", str(tmp_path), "--lengths", "64", "--decode-lengths", "64",
                 "--cases", ",".join(QUICK_CASES)])
  with open(md_path) as fh:
    md = fh.read()
  assert md.startswith("# Benchmarks of the attention ops (CPU)\n\nkept text\n")
  assert md.count(bk.BEGIN) == 1 and md.count(bk.END) == 1
  assert "## Decode latency per token" in md
  with open(res["json"]) as fh:
    data = json.load(fh)
  assert data["complete"] is True
  cells = data["cells"]
  for name, mode in (("pallas_dense_causal", "fwd"), ("pallas_dense_causal", "fwdbwd"),
                     ("superlinear_default_xla", "fwd"), ("superlinear_default_xla", "fwdbwd"),
                     ("search_default", "fwd"), ("decode_superlinear_default", "decode"),
                     ("decode_dense_xla", "decode")):
    cell = cells[name]["64"][mode]
    assert cell["status"] == "ok", (name, mode, cell)
    assert cell["time_s"] > 0 and len(cell["times_s"]) == 1
  # Forward-only and decode-only cases run only their modes.
  assert set(cells["search_default"]["64"]) == {"fwd"}
  assert set(cells["decode_dense_xla"]["64"]) == {"decode"}
  # cuDNN does not run on CPU: recorded as failed with its reason, not invented.
  cudnn = cells["cudnn_dense_causal"]["64"]["fwd"]
  assert cudnn["status"] == "failed" and cudnn["reason"]
  # The superlinear Pallas path: measured once it exists, else failed with a reason.
  sl = cells["superlinear_default"]["64"]["fwd"]
  assert sl["status"] == "ok" or (sl["status"] == "failed" and sl["reason"]), sl
  assert len(data["targets"]) == 3 + 4 * len(bk.SUPERLINEAR_CONFIGS)
  assert all(v == "NOT MEASURED" for _, v, _ in data["targets"])
  # Attended entries: causal 64 x 64 lower triangle incl. diagonal, 4 query heads.
  assert cells["pallas_dense_causal"]["64"]["fwd"]["attended"] == 64 * 65 // 2 * 4
  assert cells["decode_dense_xla"]["64"]["decode"]["attended"] == 64 * 4
  # The section can be rebuilt from the JSON alone (after another tool
  # rewrote the file).
  with open(md_path, "w") as fh:
    fh.write("# other\n")
  bk.main(["--report-only", "--out", str(tmp_path)])
  with open(md_path) as fh:
    rebuilt = fh.read()
  assert rebuilt.startswith("# other\n") and "`decode_dense_xla`" in rebuilt
  assert rebuilt.split(bk.BEGIN)[1] == md.split(bk.BEGIN)[1]


def test_memory_and_budget_skips_are_recorded(tmp_path):
  """A cell whose compiled memory exceeds the device is skipped with the
  figure (and longer lengths after it); a spent budget skips the rest."""
  res = bk.main(["--quick", "--out", str(tmp_path), "--lengths", "64,128", "--cases",
                 "xla_dense_causal", "--modes", "fwd", "--memory-limit-gb", "1e-6"])
  cells = res["data"]["cells"]["xla_dense_causal"]
  first, second = cells["64"]["fwd"], cells["128"]["fwd"]
  assert first["status"] == "skipped" and first["reason"].startswith("needs ")
  assert first["mem_bytes"] > 0.9 * 1000     # 1e-6 GB = 1000 bytes
  assert second["status"] == "skipped" and second["reason"].startswith("needs > ")
  res = bk.main(["--quick", "--out", str(tmp_path), "--lengths", "64", "--cases",
                 "xla_dense_causal", "--budget-s", "0"])
  for mode in ("fwd", "fwdbwd"):
    cell = res["data"]["cells"]["xla_dense_causal"]["64"][mode]
    assert cell["status"] == "skipped" and cell["reason"].startswith("run budget"), cell
  with open(res["markdown"]) as fh:
    assert "skipped: run budget" in fh.read()


def test_extrapolation_and_time_cap():
  assert bk.extrapolate([], 10) is None
  assert bk.extrapolate([(1000, 1.0)], 2000) == pytest.approx(4.0)          # slope 2
  assert bk.extrapolate([(1000, 1.0), (2000, 4.0)], 8000) == pytest.approx(64.0)
  assert bk.extrapolate([(1000, 1.0), (2000, 1.5)], 4000) == pytest.approx(3.0)  # slope >= 1
  runner = bk.Runner(bk.QUICK, repeats=1, cell_cap_s=2.0)
  runner.history[("c", "fwd")] = [(64, 1.0)]
  assert runner.pre_skip("c", "fwd", 64) is None
  assert runner.pre_skip("c", "fwd", 128).startswith("est. 4")   # 1 s * (2 ** 2)
  assert runner.pre_skip("c", "fwdbwd", 128) is None


def test_plan_follows_modes_and_length_caps():
  cfg = bk.Config(lengths=(4096, 131072, 1 << 20), max_backward_len=131072,
                  decode_lengths=(32768, 1 << 20), block_sparse_max_len=131072)
  make = lambda *a: None  # noqa: E731
  capped = bk.Case("a", "a", "f", make, max_len="block_sparse_max_len")
  free = bk.Case("b", "b", "f", make)
  fwd_only = bk.Case("c", "c", "f", make, modes=("fwd",))
  dec = bk.Case("d", "d", "f", make, modes=("decode",))
  got = [(c.name, l, at) for c, l, at in bk.plan([capped, free, fwd_only, dec], cfg, bk.MODES)]
  assert got == [("a", 4096, ("fwd", "fwdbwd")), ("a", 131072, ("fwd", "fwdbwd")),
                 ("b", 4096, ("fwd", "fwdbwd")), ("b", 131072, ("fwd", "fwdbwd")),
                 ("b", 1 << 20, ("fwd",)),
                 ("c", 4096, ("fwd",)), ("c", 131072, ("fwd",)), ("c", 1 << 20, ("fwd",)),
                 ("d", 32768, ("decode",)), ("d", 1 << 20, ("decode",))]


def test_collect_cases_survives_bad_modules():
  make = lambda *a: None  # noqa: E731
  good = types.SimpleNamespace(CASES=[bk.Case("x1", "x", "fam", make)])
  duck = types.SimpleNamespace(CASES=[types.SimpleNamespace(name="x2", label="y", family="fam",
                                                            make=make, modes=("decode",))])
  bad = types.SimpleNamespace(CASES=[object(), bk.Case("x1", "dup", "fam", make),
                                     bk.Case("x3", "z", "fam", make, modes=("bogus",))])
  cases, warnings = bk.collect_cases([
      ("eval.kernel_cases_good", good), ("eval.kernel_cases_duck", duck),
      ("eval.kernel_cases_bad", bad), ("eval.kernel_cases_none", types.SimpleNamespace()),
      ("eval.kernel_cases_broken", ImportError("no module named foo"))])
  names = [c.name for c in cases]
  assert names[:len(bk.CASES)] == [c.name for c in bk.CASES]
  assert names[len(bk.CASES):] == ["x1", "x2"]
  assert cases[-1].modes == ("decode",) and isinstance(cases[-1], bk.Case)
  assert len(warnings) == 5
  assert any("kernel_cases_broken" in w and "ImportError" in w for w in warnings)
  assert any("duplicate" in w for w in warnings) and any("bogus" in w for w in warnings)
  assert any("has no CASES" in w for w in warnings)


# ------------------------------------------------------ attended-entry counts


def _ppa_oracle(seq_len, p, window):
  """Count of (query, key) pairs of PPA by a plain loop over the definition:
  offset d kept iff d < window or d = ceil(s ** (1/p)) for an integer s >= 1."""
  far = set()
  s = 1
  while True:
    d = math.ceil(s ** (1 / p) - 1e-9)
    if d >= seq_len:
      break
    far.add(d)
    s += 1
  return sum(1 for i in range(seq_len) for d in range(i + 1) if d < window or d in far)


@pytest.mark.parametrize("p,window", [(0.5, 8), (0.75, 4), (0.5, 64)])
def test_ppa_entries_match_a_loop(p, window):
  got = kernel_cases_stripe.ppa_entries(200, p=p, window=window, batch=2, q_heads=3)
  assert got == 6 * _ppa_oracle(200, p, window)
  t = np.arange(1, 201)
  assert kernel_cases_stripe.ppa_entries_per_query(t, 200, p=p, window=window).sum() == \
      _ppa_oracle(200, p, window)


def _superlinear_oracle(seq_len, cfg):
  """Nominal superlinear entries by a loop: window, then per valid anchor
  (at most num_spans) the span length clipped to the keys before the window."""
  inv = 1.0 / cfg.search_power
  w = math.floor((cfg.sw_index + 1) ** inv + 1e-9) - 1
  total = 0
  for i in range(seq_len):
    t = i + 1
    anchors = 0
    j = cfg.sw_index + 1
    while math.floor(j ** inv + 1e-9) <= t:
      anchors += 1
      j += 1
    g = t ** cfg.span_power
    span = math.ceil(cfg.backward_factor * g - 1e-9) + math.ceil(cfg.forward_factor * g - 1e-9) + 1
    total += min(t, w) + min(anchors, cfg.num_spans) * min(span, max(t - w, 0))
  return total


@pytest.mark.parametrize("cfg", [attn.SuperlinearConfig(),
                                 attn.SuperlinearConfig(sw_index=3, num_spans=3,
                                                        backward_factor=3.0)])
def test_superlinear_entries_match_a_loop(cfg):
  got = kernel_cases_superlinear.superlinear_entries(300, cfg, batch=1, q_heads=2)
  assert got == 2 * _superlinear_oracle(300, cfg)


# ------------------------------------------------------------------ targets


def _ok(t, tflops=1.0, mode="fwd"):
  return {mode: {"status": "ok", "time_s": t, "tflops": tflops}}


def test_targets_are_computed_from_gpu_cells():
  """Target arithmetic on synthetic GPU cells (PASS, FAIL, NOT MEASURED)."""
  m = 1 << 20
  cells = {"pallas_dense_causal": {"4096": _ok(1, 300), "8192": _ok(1, 200)},
           "cudnn_dense_causal": {"4096": _ok(1, 500), "8192": _ok(1, 500),
                                  "32768": _ok(2.0), "131072": _ok(30.0)},
           "pallas_window": {"8192": _ok(1.0), "16384": _ok(2.1), "32768": _ok(4.0)},
           "pallas_sparse90": {"32768": _ok(1.0)}, "pallas_full": {"32768": _ok(6.0)},
           # default: faster from 32K, 6x at 128K, runs at 1M, decode 12.5x.
           "superlinear_default": {"32768": _ok(1.0), "131072": _ok(5.0), str(m): _ok(40.0)},
           "decode_superlinear_default": {str(m): _ok(0.002, mode="decode")},
           # released: slower at 32K, 3x at 128K, failed at 1M, decode 5x.
           "superlinear_released": {"32768": _ok(2.5), "131072": _ok(10.0),
                                    str(m): {"fwd": {"status": "failed", "reason": "OOM"}}},
           "decode_superlinear_released": {str(m): _ok(0.005, mode="decode")},
           "decode_dense_cudnn": {str(m): {"decode": {"status": "failed", "reason": "x"}}},
           "decode_dense_xla": {str(m): _ok(0.025, mode="decode")}}
  data = {"device": {"platform": "gpu"}, "quick": False, "cells": cells,
          "config": {"lengths": [4096, 8192, 16384, 32768, 131072, m],
                     "decode_lengths": [m]}}
  got = {name: v for name, v, _ in bk.targets(data)}
  verdicts = [got[n] for n in bk.TARGET_NAMES]
  assert verdicts == ["FAIL", "PASS", "PASS"]   # 200/500 = 40% < 50% at 8K
  assert [got[n] for n in bk.superlinear_target_names("default")] == ["PASS"] * 4
  assert [got[n] for n in bk.superlinear_target_names("released")] == ["FAIL"] * 4
  # Without the cuDNN 32K cell the crossover target is not measured.
  del cells["cudnn_dense_causal"]["32768"]
  got = {name: v for name, v, _ in bk.targets(data)}
  assert got[bk.superlinear_target_names("default")[0]] == "NOT MEASURED"
  # Off a GPU nothing is measured.
  data["device"]["platform"] = "cpu"
  assert {v for _, v, _ in bk.targets(data)} == {"NOT MEASURED"}


def test_flops_count_uses_entry_flops():
  """TFLOP/s: entry_flops * head_dim * attended / time (x3.5 for fwd+bwd)."""
  runner = bk.Runner(bk.QUICK, repeats=1)
  q = jnp.ones((1, 8, 2, 16), jnp.float32)
  b = bk.Built(lambda x: x * 2.0, None, (q,), attended=1000, entry_flops=2)
  cell = runner.run_cell("toy", "fwd", 8, b.fwd, b)
  assert cell["status"] == "ok"
  assert cell["tflops"] == pytest.approx(2 * 16 * 1000 / cell["time_s"] / 1e12)
  cell = runner.run_cell("toy", "fwdbwd", 8, b.fwd, b)
  assert cell["tflops"] == pytest.approx(3.5 * 2 * 16 * 1000 / cell["time_s"] / 1e12)


# ------------------------------------------------------------------ presets


def test_h100_preset_is_target_first_and_fits_eight_minutes(capsys):
  """The forward preset lists exactly the issue's target cells (forward and
  decode only), the cheap targets before superlinear, 1M last; its dry run
  prints every cell with an estimate and a total under 8 minutes."""
  k, m = 1024, 1 << 20
  cells = bk.PRESETS["h100"].cells
  got = {(n, l, mode) for n, l, modes in cells for mode in modes}
  want = set()
  for l in (4 * k, 16 * k, 32 * k, 128 * k):
    want |= {("pallas_dense_causal", l, "fwd"), ("cudnn_dense_causal", l, "fwd")}
  want |= {("pallas_window", l, "fwd") for l in (16 * k, 32 * k, 128 * k)}
  want |= {("pallas_sparse90", 32 * k, "fwd"), ("pallas_full", 32 * k, "fwd")}
  for c in bk.SUPERLINEAR_CONFIGS:
    want |= {(f"superlinear_{c}", l, "fwd") for l in (32 * k, 128 * k, m)}
    want |= {(f"decode_superlinear_{c}", l, "decode") for l in (128 * k, m)}
  want |= {("decode_dense_cudnn", l, "decode") for l in (128 * k, m)}
  assert want <= got
  assert {mode for _, _, mode in got} == {"fwd", "decode"}
  order = [n for n, _, _ in cells]
  first_superlinear = min(i for i, n in enumerate(order) if n.startswith("superlinear_"))
  for name in ("pallas_window", "pallas_sparse90", "decode_superlinear_default"):
    assert order.index(name) < first_superlinear
  assert all(l == m for n, l, _ in cells[-2:])
  back = {mode for _, _, modes in bk.PRESETS["h100_bwd"].cells for mode in modes}
  assert back == {"fwdbwd"}
  res = bk.main(["--preset", "h100", "--dry-run"])
  out = capsys.readouterr().out
  assert len(res["plan"]) == len(cells)
  assert 0 < res["estimate_s"] < 480
  assert out.count(" est ") == len(got) and "estimated" in out
  assert f"{res['estimate_s']:.0f} s" in out


def test_estimates_follow_the_roofline_model():
  cfg = bk.PRESETS["h100"].config
  case = bk.Case("superlinear_default", "x", "superlinear", None)
  from eval import bench_plan
  from eval import roofline_model as roofline
  timed = set()
  for name, n in (("default", 4096), ("released", 1 << 20)):
    c = dataclasses.replace(case, name=f"superlinear_{name}")
    est = bk.estimate_s(c, n, ("fwd",), cfg, repeats=3)["fwd"]
    call = roofline.superlinear(n, roofline.CONFIGS[name], roofline.Shape()).time()
    assert est["model"] and est["call_s"] == pytest.approx(call)
    # A call over LONG_CALL_S is timed once after the warm-up, else 3 times.
    calls = 2 if call > bench_plan.LONG_CALL_S else 4
    timed.add(calls)
    assert est["total_s"] == pytest.approx(est["compile_s"] + calls * call)
  assert timed == {2, 4}   # both branches exercised
  unknown = bk.estimate_s(bk.Case("new_case", "x", "new", None), 4096, ("fwd",), cfg, 3)
  assert not unknown["fwd"]["model"]


def test_decode_cells_time_many_tokens_in_one_loop():
  """A decode case's call generates `decode_tokens` tokens (one jitted loop);
  the cell reports the time per token."""
  cfg = bk.QUICK
  b = kernel_cases_decode._dense("xla")(64, jnp.float32, jax.random.key(0), cfg)
  assert b.tokens == cfg.decode_tokens == 2
  q, k, v, last = b.args
  got = b.fwd(*b.args)
  want = sum(jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=jnp.array([p + 1], jnp.int32), implementation="xla")
      for p in (62, 63))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  runner = bk.Runner(cfg, repeats=1)
  cell = runner.run_cell("d", "decode", 64, b.fwd, b)
  assert cell["tokens"] == 2
  assert cell["time_s"] == pytest.approx(np.median(cell["times_s"]) / 2)
