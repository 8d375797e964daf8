"""Every kernel family compiled for real chips on a CPU-only machine (`aot`).

The CI subset (`eval.compile.cases.ci_cases`): each family forward and
`jax.value_and_grad` once, compiled by XLA + ptxas for an H100 (sm_90a) and
by libtpu for TPU v5e and v6e, through the public ops with
`implementation="pallas"`. A case passes when it compiles, its compiled HLO
holds the platform's kernel custom call (no silent XLA fallback) and, on the
GPU, every kernel's shared memory fits the device and no kernel spills
registers (the GPU subset adds float32 block-sparse and span cases); a grad
case must also compile kernels of its own beyond the forward's (decode calls
excepted: their backward is the xla path). Skipped, naming the package, without the `[aot]`
extra. The full matrix is `python -m eval.compile_check --cases sweep`.

"Compiled for" is not "ran on": no numerics and no speed are checked here.
"""

import dataclasses
import json
import os

import attn
import chex
import pytest

from eval.compile import cases, driver, gpu
from tests.conftest import TEST_XLA_FLAGS

TARGETS = ("gpu", "tpu:v5e", "tpu:v6e")


def _compile_all(target, monkeypatch):
  why = driver.missing_packages(target.split(":")[0])
  if why:
    pytest.skip(f"cannot compile for {target}: {why}")
  # The compile worker inherits the environment: not the test suite's
  # XLA:CPU optimisation level (tests/conftest.py), the compilers' defaults.
  if os.environ.get("XLA_FLAGS") == TEST_XLA_FLAGS:
    monkeypatch.delenv("XLA_FLAGS")
  results = {}
  driver.run_target(target, cases.ci_cases(target), timeout_s=300,
                    on_result=lambda case, rec: results.__setitem__(case, rec))
  return results


@pytest.mark.aot
@pytest.mark.parametrize("target", TARGETS)
def test_ci_subset_compiles_with_kernels(target, monkeypatch):
  results = _compile_all(target, monkeypatch)
  assert len(results) == len(cases.ci_cases(target))
  bad = [f"{c.key}: {driver.summary(r)}" for c, r in results.items() if r["status"] != "ok"]
  assert not bad, "\n".join(bad)
  for case, rec in results.items():
    assert rec["kernel_calls"] >= 1, case.key
    if case.mode == "grad" and case.q_len is None:
      fwd = results[cases.dataclasses.replace(case, mode="fwd")]
      assert rec["kernel_calls"] > fwd["kernel_calls"], (
          f"{case.key}: no backward kernel ({rec['kernel_calls']} custom calls, "
          f"forward alone has {fwd['kernel_calls']})")
    if target == "gpu":
      for k in rec["kernels"]:
        assert 0 < k["registers"] <= 255, (case.key, k)
        assert 0 < k["smem"] <= 232448, (case.key, k)
        assert k["spill_stores"] == 0, (case.key, k)    # issue 15.5: no Triton kernel spills


# The parsers, on hand-written excerpts of the formats (no compiler needed).

_PTXAS_LOG = """\
I1204 17:26:13.454601    5644 subprocess_compilation.cc:349] ptxas warning : Registers are \
spilled to local memory in function 'kernel_b', 1128 bytes spill stores, 1160 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_b' for 'sm_90a'
ptxas info    : Function properties for kernel_b
    664 bytes stack frame, 1128 bytes spill stores, 1160 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 664 bytes cumulative stack size
I1204 17:26:13.468804    5643 subprocess_compilation.cc:313] /x/ptxas /tmp/f -arch=sm_90a -v
I1204 17:26:13.743823    5643 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_a' for 'sm_90a'
ptxas info    : Function properties for kernel_a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_parse_ptxas_reads_each_entry_function():
  got = gpu.parse_ptxas(_PTXAS_LOG)
  assert got == {
      "kernel_b": {"registers": 255, "spill_stores": 1128, "spill_loads": 1160, "stack": 664},
      "kernel_a": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0}}


def test_parse_thunks_reads_grid_threads_and_shared_memory():
  text = ("006: kCustomKernel [prev=004 (2) | next=007 (1)] kernel_b grid: [1, 8, 32] "
          "threads: [256, 1, 1]  shared_memory: 98304 bytes\n"
          "007: kCustomKernel [prev=006 (1) | sink        ] fusion_3 grid: [1024, 1, 1] "
          "threads: [128, 1, 1]  shared_memory: 0 bytes\n")
  assert gpu.parse_thunks(text) == {
      "kernel_b": {"grid": [1, 8, 32], "threads": [256, 1, 1], "smem": 98304},
      "fusion_3": {"grid": [1024, 1, 1], "threads": [128, 1, 1], "smem": 0}}


def test_triton_kernel_names_only_counts_triton_custom_calls():
  hlo = ('%a = f32[2] custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", '
         'backend_config={debug = false, name = "kernel_b", num_stages = 2}\n'
         '%b = f32[2] custom-call(%x), custom_call_target="cublas$gemm"\n'
         '%c = f32[2] custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", '
         'backend_config={name = "kernel_a"}\n')
  assert gpu.triton_kernel_names(hlo) == ["kernel_b", "kernel_a"]


def test_ci_subset_reaches_every_kernel_family_forward_and_grad():
  for target in TARGETS:
    got = {(cases.FAMILY[c.op], c.mode) for c in cases.ci_cases(target)}
    families = set(cases.FAMILY.values()) - {"stripe+span"} | {"span"}
    want = {(f, m) for f in families for m in ("fwd", "grad")}
    have = {(f, m) for fam, m in got for f in fam.split("+")}
    assert want <= have, (target, want - have)


def test_report_lists_failures_and_not_run_cases():
  from eval.compile import report
  matrix = [cases.Case("dense"), cases.Case("dense", mode="grad"),
            cases.Case("dense", seq_len=32768)]
  ok = {"status": "ok", "lower_s": 0.5, "compile_s": 1.5, "kernel_calls": 1, "problems": [],
        "kernels": [{"name": "k_fwd", "registers": 200, "spill_stores": 8, "spill_loads": 8,
                     "stack": 0, "smem": 1000, "grid": [1, 2, 3], "threads": [128, 1, 1]}]}
  bad = {"status": "error", "error": "ValueError: too big", "where": ["pallas_kernels/x.py:7"]}
  results = {("gpu", matrix[0].key): dict(ok, key=matrix[0].key, target="gpu"),
             ("gpu", matrix[1].key): dict(bad, key=matrix[1].key, target="gpu")}
  text = report.render([], results, matrix)
  assert "| gpu | `dense/grad/d128/L4096/bf16/8:2` | error | ValueError: too big | " \
         "pallas_kernels/x.py:7 |" in text
  assert "| ?: k_fwd | 1 | 200 (`dense/fwd/d128/L4096/bf16/8:2`) |" in text
  assert "| dense | fwd | 2.0 / 2.0 |" not in text        # no TPU result: "not run"
  assert "| dense | fwd | not run / 2.0 | not run / not run |" in text
  assert "- gpu: dense/fwd (1: L 32K)" in text


def test_report_sets_hbm_refusals_apart_from_failures():
  from eval.compile import report
  matrix = [cases.Case("dense", mode="grad", seq_len=1 << 20), cases.Case("dense")]
  oom = {"status": "error", "where": [], "error": (
      "JaxRuntimeError: RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory "
      "on HBM, the total memory required for HLO temporaries (21.00G) exceeds available "
      "HBM (15.75G). HLO module: jit_loss.")}
  other = {"status": "error", "where": [], "error": "ValueError: bad block"}
  rec = report.classify(dict(oom, key=matrix[0].key, target="tpu:v5e"))
  chex.assert_trees_all_equal((rec["status"], rec["need_gib"], rec["hbm_gib"]),
                              ("too_big", 21.0, 15.75))
  assert report.classify(other)["status"] == "error"
  results = {("tpu:v5e", matrix[0].key): rec,
             ("tpu:v5e", matrix[1].key): dict(other, key=matrix[1].key, target="tpu:v5e")}
  text = report.render([], results, matrix)
  big = text.split("## Too big for one chip")[1].split("## Failing cases")[0]
  failing = text.split("## Failing cases")[1].split("## Slow compiles")[0]
  assert f"| tpu:v5e | `{matrix[0].key}` | 21 | 15.75 |" in big
  assert matrix[0].key not in failing and matrix[1].key in failing
  assert "too big (21 of 15.75 GiB)" in text


def test_report_compares_superlinear_grad_compiles_across_heads():
  from eval.compile import report
  base = cases.Case("superlinear", mode="grad", seq_len=1 << 17)
  wide = cases.Case("superlinear", mode="grad", seq_len=1 << 17, heads=(16, 8))
  fwd = cases.Case("superlinear", seq_len=1 << 17, heads=(32, 8))
  rec = lambda c, t, s, **kw: dict(  # noqa: E731
      status="ok", lower_s=1.0, compile_s=s, key=c.key, target=t,
      case=json.loads(c.to_json()), **kw)
  results = {("tpu:v5p", base.key): rec(base, "tpu:v5p", 31.0, temp_bytes=5 * 2**30),
             ("tpu:v5p", wide.key): rec(wide, "tpu:v5p", 19.5),
             ("tpu:v5e", wide.key): dict(rec(wide, "tpu:v5e", 0.0), status="too_big",
                                         need_gib=20.5, hbm_gib=15.75),
             ("tpu:v5p", fwd.key): rec(fwd, "tpu:v5p", 9.0)}
  text = report.render([], results, [base, wide])
  part = text.split("## Superlinear forward + backward by heads")[1].split("##")[0]
  assert "| config | L | heads | tpu:v5e | tpu:v5p |" in part
  assert "| default | 128K | 16:8 | too big (20.5 of 15.75 GiB) | 20.5 |" in part
  assert "| default | 128K | 8:2 | - | 32.0 (5.0 GiB) |" in part
  assert "32:8" not in part                          # forward cases stay out
  # One head layout only: no section.
  del results[("tpu:v5p", wide.key)], results[("tpu:v5e", wide.key)]
  assert "by heads" not in report.render([], results, [base])


def test_best_of_keeps_the_fastest_fresh_compile():
  from eval.compile import worker
  times = iter([(1.0, 9.0, "a"), (1.0, 6.5, "b"), (0.5, 8.0, "c")])
  calls = []
  got = worker.best_of(3, lambda: (calls.append("compile"), next(times))[1],
                       clear=lambda: calls.append("clear"))
  chex.assert_trees_all_equal(
      (got["lower_s"], got["compile_s"], got["result"], got["runs_s"]),
      (1.0, 6.5, "b", [10.0, 7.5, 8.5]))
  assert calls == ["compile", "clear", "compile", "clear", "compile"]
  once = worker.best_of(1, lambda: (2.0, 3.0, "x"))
  assert once == {"lower_s": 2.0, "compile_s": 3.0, "result": "x"}   # no runs_s
  with pytest.raises(ValueError, match="repeat=0"):
    worker.best_of(0, lambda: (0.0, 0.0, None))


def test_report_marks_best_of_n_compiles_and_cli_rejects_repeat_0():
  from eval import compile_check
  from eval.compile import report
  case = cases.Case("dense", mode="grad")
  rec = dict(status="ok", lower_s=1.0, compile_s=6.5, runs_s=[10.0, 7.5, 8.5], key=case.key,
             target="tpu:v5e", case=json.loads(case.to_json()), problems=[])
  text = report.render([], {("tpu:v5e", case.key): rec}, [case])
  assert "| dense | grad | 7.5 (best of 3, up to 10.0) / not run |" in text
  with pytest.raises(SystemExit) as exc:
    compile_check.main(["--platform", "tpu", "--repeat", "0"])
  assert exc.value.code == 2


def test_sweep_matrix_covers_the_issue_axes_with_unique_keys():
  sweep = cases.sweep_cases()
  assert len({c.key for c in sweep}) == len(sweep)
  assert {c.head_dim for c in sweep} == {64, 80, 128, 256}
  assert {c.seq_len for c in sweep} == {4096, 32768, 131072, 1 << 20}
  assert {c.dtype for c in sweep} == {"bfloat16", "float32"}
  assert {c.heads for c in sweep} == {(8, 2), (32, 8), (8, 8)}
  assert {c.config for c in sweep if c.op.startswith("superlinear")} == {"default", "released"}
  assert {c.p for c in sweep if c.op == "ppa"} == {0.5, 0.75}
  assert {c.q_len for c in sweep if c.op.endswith("decode")} == {1, 16}
  assert set(cases.OPS) == {c.op for c in sweep}


def test_compiled_entries_follow_xlas_renaming_of_shared_names():
  names = {"kernel", "kernel__1", "kernel__2", "kernel_x", "loop_fusion", "_fwd_kernel"}
  assert gpu.compiled_entries("kernel", names) == ["kernel", "kernel__1", "kernel__2"]
  assert gpu.compiled_entries("_fwd_kernel", names) == ["_fwd_kernel"]
  hlo = ('%a = f32[2] custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", '
         'backend_config={name = "kernel"}, metadata={op_name="jit(loss)/transpose('
         'jvp(jit(op)))/pallas_call" stack_frame_id=3}\n')
  assert gpu.triton_kernels(hlo) == [("kernel", "transpose(jvp(jit(op)))/pallas_call")]


def test_missing_packages_names_the_package_and_version_mismatches(monkeypatch):
  versions = {"jax-cuda12-pjrt": None, "jaxlib": "0.12.0.1", "libtpu": None}
  monkeypatch.setattr(driver, "_version", versions.get)
  assert "jax-cuda12-pjrt is not installed" in driver.missing_packages("gpu")
  assert "libtpu is not installed" in driver.missing_packages("tpu")
  versions.update({"jax-cuda12-pjrt": "0.12.0", "libtpu": "0.0.49.1"})
  assert "does not match jaxlib 0.12.0.1" in driver.missing_packages("gpu")
  monkeypatch.setattr(driver, "_jax_tpu_pin", lambda: "0.0.50.*")
  assert "not the version jax's [tpu] extra pins (0.0.50.*)" in driver.missing_packages("tpu")


def test_heads_option_recompiles_the_selected_cases_at_other_heads():
  import argparse
  from eval import compile_check
  argv = ["--cases", "sweep", "--ops", "superlinear", "--configs", "released",
          "--base-only", "--lengths", "1048576", "--modes", "grad"]
  ns = argparse.Namespace(cases="sweep", lengths="1048576", ops="superlinear", modes="grad",
                          head_dims="", dtypes="", configs="released", base_only=True,
                          heads="", remat=False)
  (base,) = compile_check.select(ns)
  assert base.heads == (8, 2) and base.seq_len == 1 << 20 and base.config == "released"
  ns.heads = "32:8"
  (big,) = compile_check.select(ns)
  assert big.heads == (32, 8) and big.key != base.key and big.seq_len == base.seq_len
  ns.heads = "16:8,32:8"                        # several layouts: each case at each
  assert [c.heads for c in compile_check.select(ns)] == [(16, 8), (32, 8)]
  assert compile_check.parse_heads("32:8") == (32, 8)
  with pytest.raises(ValueError, match="'32:5'"):
    compile_check.parse_heads_list("16:8,32:5")
  for bad in ("32", "32:5", "0:1", "a:b"):
    with pytest.raises(ValueError, match="--heads"):
      compile_check.parse_heads(bad)
  with pytest.raises(SystemExit):
    compile_check.main(argv + ["--heads", "32:5"])
  ns.heads, ns.remat, ns.ops = "", True, "superlinear,dense"
  (rem,) = compile_check.select(ns)           # --remat: superlinear prefill cases only
  assert rem.remat and rem.key == "superlinear(released,remat)/grad/d128/L1048576/bf16/8:2"
  assert rem == dataclasses.replace(base, remat=True)


def test_remat_cases_build_with_remat_and_the_report_sets_them_beside_plain():
  import jax
  from eval.compile import report
  with pytest.raises(ValueError, match="remat=True"):
    cases.Case("dense", remat=True)
  plain = cases.Case("superlinear", mode="grad", seq_len=1 << 20, config="released",
                     heads=(4, 1))
  rem = dataclasses.replace(plain, remat=True)
  assert cases.Case.from_json(rem.to_json()) == rem
  old = json.loads(plain.to_json())
  del old["remat"]                                 # records written before the field
  assert cases.Case.from_json(json.dumps(old)) == plain
  # The built function passes remat=True to the op.
  seen = []
  real = attn.superlinear_attention
  def spy(*a, **kw):
    seen.append(kw.get("remat", False))
    return real(*a, **kw)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(attn, "superlinear_attention", spy)
    for c in (plain, rem):
      fn, args = cases.build(dataclasses.replace(c, seq_len=64), None)
      jax.eval_shape(fn, *args)
  assert seen == [False, True]
  rec = lambda c, t, **kw: dict(key=c.key, target=t,  # noqa: E731
                                case=json.loads(c.to_json()), **kw)
  results = {("tpu:v5e", plain.key): rec(plain, "tpu:v5e", status="too_big", need_gib=16.08,
                                         hbm_gib=15.75),
             ("tpu:v5e", rem.key): rec(rem, "tpu:v5e", status="ok", lower_s=2.0,
                                       compile_s=20.0, temp_bytes=9 * 2**30)}
  text = report.render([], results, [plain])
  part = text.split("## Superlinear forward + backward with `remat=True`")[1].split("##")[0]
  assert ("| released | 1M | 4:1 | tpu:v5e | too big (16.08 of 15.75 GiB) | 22.0 (9.0 GiB) |"
          in part)
  del results[("tpu:v5e", rem.key)]
  assert "remat=True`" not in report.render([], results, [plain])
