"""Benchmark of the attention kernels on one device: time, TFLOP/s, memory.

    python -m eval.bench_kernels [--lengths 4096,8192,...] [--cases a,b]
                                 [--out docs] [--repeats 5]
    python -m eval.bench_kernels --quick --out /tmp/kb   # tiny, CPU interpret
    python -m eval.bench_kernels --report-only           # section from the JSON

Cases are pluggable: a `Case` has a name, a label, a family and a builder
`make(L, dtype, key, config) -> Built(fwd, fwd_bwd, args, attended)`, where
`fwd(*args)` returns the attention output, `fwd_bwd(*args)` the gradients
w.r.t. q, k, v, and `attended` counts the attended (query, key) entries
summed over batch and query heads. This module defines the block-sparse and
baseline cases; every module `eval/kernel_cases_<family>.py` that exposes
`CASES` (a list of `Case`) is picked up too.

For each case and length, in one run on one device: forward and
forward+backward time (median of `--repeats` calls of the AOT-compiled
function after a warm-up, `block_until_ready`), achieved TFLOP/s counted on
the attended entries only (forward `4 * head_dim` FLOPs per entry, forward +
backward 3.5x that: the backward's five matmuls), and the compiled memory
(`memory_analysis()`: arguments + outputs + temporaries). A cell that fails
to compile or run (e.g. cuDNN on a CPU, out of memory) is recorded with its
reason. Targets (below) print PASS / FAIL / NOT MEASURED; they are defined on
an NVIDIA GPU at the full sizes and are NOT MEASURED anywhere else.

Results: `<out>/bench_kernels.json` and a section of `<out>/benchmarks.md`
between the markers `<!-- bench_kernels:begin -->` / `<!-- bench_kernels:end -->`
(the rest of the file is kept), both written by this command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import attn

BEGIN, END = "<!-- bench_kernels:begin -->", "<!-- bench_kernels:end -->"
MODES = ("fwd", "fwdbwd")
BWD_FACTOR = 3.5


@dataclasses.dataclass(frozen=True)
class Config:
  """Shapes of one benchmark run."""

  lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
  batch: int = 1
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  dtype: str = "bfloat16"
  window: int = 4096
  sparse_block: int = 128
  sparse_density: float = 0.1


QUICK = Config(lengths=(64, 128), q_heads=4, kv_heads=2, head_dim=32, window=32,
               sparse_block=16)


class Built(NamedTuple):
  fwd: Callable
  fwd_bwd: Callable
  args: tuple
  attended: int


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  label: str
  family: str
  make: Callable   # (L, dtype, key, config) -> Built


# ------------------------------------------------------------------ helpers


def qkv(key, seq_len, dtype, config: Config):
  """Standard-normal q `[B, L, Hq, D]`, k, v `[B, L, Hk, D]`."""
  kq, kk, kv = jax.random.split(key, 3)
  b, hq, hk, d = config.batch, config.q_heads, config.kv_heads, config.head_dim
  return (jax.random.normal(kq, (b, seq_len, hq, d), dtype),
          jax.random.normal(kk, (b, seq_len, hk, d), dtype),
          jax.random.normal(kv, (b, seq_len, hk, d), dtype))


def grad_of(fn):
  """`(q, k, v) -> (dq, dk, dv)` of `sum(fn(q, k, v) * ct)`, ct fixed by `out`."""
  def fwd_bwd(q, k, v):
    out, pull = jax.vjp(fn, q, k, v)
    ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)).astype(out.dtype)
    return pull(ct)
  return fwd_bwd


def built(fn, args, attended):
  return Built(fn, grad_of(fn), args, int(attended))


def causal_entries(seq_len, config: Config, window=None):
  """Attended entries of causal (window=None) or sliding-window attention."""
  n = np.arange(seq_len, dtype=np.int64) + 1
  per_query = n if window is None else np.minimum(n, window)
  return int(per_query.sum()) * config.batch * config.q_heads


def random_block_layout(seq_len, config: Config, seed=0):
  """Random layout with `sparse_density` of all tiles (every query block at
  least one tile), non-causal: 90% sparse at the default density."""
  bs = config.sparse_block
  n = -(-seq_len // bs)
  rng = np.random.default_rng(seed)
  mask = rng.random((n, n)) < config.sparse_density
  mask[np.arange(n), rng.integers(0, n, n)] = True
  return attn.BlockLayout.from_block_mask(mask, seq_len, seq_len, block_q=bs, block_k=bs)


def _jax_nn(impl, *, causal=True, window=None):
  def fn(q, k, v):
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl,
                                        local_window_size=local)
  return fn


# --------------------------------------------------------------------- cases


def _dense(impl):
  def make(seq_len, dtype, key, config):
    args = qkv(key, seq_len, dtype, config)
    if impl == "pallas":
      fn = lambda q, k, v: attn.dense_attention(q, k, v, implementation="pallas")  # noqa: E731
    else:
      fn = _jax_nn(impl)
    return built(fn, args, causal_entries(seq_len, config))
  return make


def _window(impl):
  def make(seq_len, dtype, key, config):
    args = qkv(key, seq_len, dtype, config)
    w = config.window
    if impl == "pallas":
      fn = lambda q, k, v: attn.sliding_window_attention(q, k, v, window=w,  # noqa: E731
                                                         implementation="pallas")
    else:
      fn = _jax_nn(impl, window=w)
    return built(fn, args, causal_entries(seq_len, config, w))
  return make


def _sparse(full: bool):
  def make(seq_len, dtype, key, config):
    args = qkv(key, seq_len, dtype, config)
    if full:
      n = -(-seq_len // config.sparse_block)
      layout = attn.BlockLayout.from_block_mask(np.ones((n, n), bool), seq_len, seq_len,
                                                block_q=config.sparse_block,
                                                block_k=config.sparse_block)
    else:
      layout = random_block_layout(seq_len, config)
    fn = lambda q, k, v: attn.block_sparse_attention(q, k, v, layout,  # noqa: E731
                                                     implementation="pallas")
    entries = min(layout.num_active_blocks * config.sparse_block ** 2,
                  seq_len * seq_len) * config.batch * config.q_heads
    return built(fn, args, entries)
  return make


CASES = [
    Case("pallas_dense_causal", "dense causal, ours (Pallas block-sparse)", "dense", _dense("pallas")),
    Case("cudnn_dense_causal", "dense causal, jax.nn cuDNN", "dense", _dense("cudnn")),
    Case("xla_dense_causal", "dense causal, jax.nn xla", "dense", _dense("xla")),
    Case("pallas_window", "sliding window, ours", "window", _window("pallas")),
    Case("cudnn_window", "sliding window, jax.nn cuDNN local_window_size", "window",
         _window("cudnn")),
    Case("xla_window", "sliding window, jax.nn xla local_window_size", "window", _window("xla")),
    Case("pallas_sparse90", "random layout, 10% of all tiles, ours", "sparse", _sparse(False)),
    Case("pallas_full", "every tile (non-causal dense) through the same kernel", "sparse",
         _sparse(True)),
]


def all_cases() -> list[Case]:
  """This module's cases plus `CASES` of every `eval/kernel_cases_*.py`."""
  cases = list(CASES)
  import eval as eval_pkg
  for mod in pkgutil.iter_modules(eval_pkg.__path__):
    if mod.name.startswith("kernel_cases_"):
      cases += list(importlib.import_module(f"eval.{mod.name}").CASES)
  return cases


# ---------------------------------------------------------------- measuring


def _time_call(compiled, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - t0


def measure(case: Case, seq_len: int, config: Config, repeats: int) -> dict:
  """Both modes of one (case, L) cell; failures are recorded, not raised."""
  dtype = jnp.dtype(config.dtype)
  out = {}
  try:
    b = case.make(seq_len, dtype, jax.random.key(seq_len), config)
  except Exception as e:  # noqa: BLE001 - recorded in the report
    return {m: {"status": "failed", "reason": f"build: {type(e).__name__}: {e}"[:300]}
            for m in MODES}
  head_dim = b.args[0].shape[-1]
  for mode, fn in (("fwd", b.fwd), ("fwdbwd", b.fwd_bwd)):
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(*b.args).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      mem_bytes = None if mem is None else int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
      warm = _time_call(compiled, b.args)
      times = [_time_call(compiled, b.args) for _ in range(repeats)]
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN unavailable, out of memory
      out[mode] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
      continue
    t = statistics.median(times)
    flops = 4.0 * head_dim * b.attended * (1.0 if mode == "fwd" else BWD_FACTOR)
    out[mode] = {"status": "ok", "time_s": t, "times_s": times, "warmup_s": warm,
                 "compile_s": compile_s, "tflops": flops / t / 1e12, "mem_bytes": mem_bytes,
                 "attended": b.attended}
  return out


def device_info() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
          "python": platform.python_version(), "host_cores": os.cpu_count()}


# ------------------------------------------------------------------ targets


def _cell(cells, name, seq_len, mode="fwd"):
  c = cells.get(name, {}).get(str(seq_len), {}).get(mode)
  return c if c and c.get("status") == "ok" else None


def targets(data) -> list[tuple[str, str, str]]:
  """`(target, PASS | FAIL | NOT MEASURED, evidence)` computed from the cells."""
  info, cells, quick = data["device"], data["cells"], data["quick"]
  names = ("dense causal forward >= 50% of cuDNN TFLOP/s (every L >= 4K)",
           "sliding-window time per token flat in L (max/min over L >= 8K <= 1.25)",
           "90%-sparse layout >= 5x faster than every tile at 32K (forward)")
  if info["platform"] != "gpu" or quick:
    why = ("quick mode: tiny shapes in interpret mode" if quick
           else f"targets are defined on an NVIDIA GPU; this run is on {info['platform']}")
    return [(n, "NOT MEASURED", why) for n in names]
  lengths = data["config"]["lengths"]
  res = []
  ratios = []
  for seq_len in lengths:
    ours, ref = _cell(cells, "pallas_dense_causal", seq_len), _cell(cells, "cudnn_dense_causal", seq_len)
    if seq_len >= 4096 and ours and ref:
      ratios.append((seq_len, ours["tflops"] / ref["tflops"]))
  if ratios:
    ok = all(r >= 0.5 for _, r in ratios)
    res.append((names[0], "PASS" if ok else "FAIL",
                ", ".join(f"{_fmt_len(l)}: {r:.0%}" for l, r in ratios)))
  else:
    res.append((names[0], "NOT MEASURED", "no pair of measured cells"))
  per_token = [(l, c["time_s"] / l) for l in lengths
               if l >= 8192 and (c := _cell(cells, "pallas_window", l))]
  if len(per_token) >= 2:
    vals = [t for _, t in per_token]
    spread = max(vals) / min(vals)
    res.append((names[1], "PASS" if spread <= 1.25 else "FAIL",
                f"max/min = {spread:.2f} over {', '.join(_fmt_len(l) for l, _ in per_token)}"))
  else:
    res.append((names[1], "NOT MEASURED", "fewer than two lengths >= 8K measured"))
  sparse, full = _cell(cells, "pallas_sparse90", 32768), _cell(cells, "pallas_full", 32768)
  if sparse and full:
    speed = full["time_s"] / sparse["time_s"]
    res.append((names[2], "PASS" if speed >= 5 else "FAIL", f"{speed:.1f}x"))
  else:
    res.append((names[2], "NOT MEASURED", "32K cells not measured"))
  return res


# ------------------------------------------------------------------- report


def _fmt_len(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def _fmt_time(t):
  return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_bytes(n):
  if n is None:
    return "n/a"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n} B"


def _table(data, mode, key, fmt):
  lengths = data["config"]["lengths"]
  rows = ["| case | " + " | ".join(_fmt_len(l) for l in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
  for name in data["cases"]:
    cells = []
    for l in lengths:
      c = data["cells"].get(name, {}).get(str(l), {}).get(mode, {})
      if c.get("status") == "ok":
        cells.append(fmt(c[key]))
      else:
        cells.append("failed" if c else "-")
    rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return rows


def markdown(data) -> str:
  cfg, info = data["config"], data["device"]
  out = [BEGIN, "", "# Kernel benchmarks (`python -m eval.bench_kernels`)", ""]
  out.append(f"Generated by `python -m eval.bench_kernels {' '.join(data['argv'])}` on "
             f"{data['date']}.")
  out.append("")
  out.append(f"- Device: {info['device_kind']} (platform `{info['platform']}`), jax "
             f"{info['jax']}, Python {info['python']}."
             + (" **Quick mode: tiny shapes, kernels in Pallas interpret mode on CPU; the "
                "numbers say nothing about kernel speed.**" if data["quick"] else ""))
  out.append(f"- Shapes: batch {cfg['batch']}, {cfg['q_heads']} query heads : "
             f"{cfg['kv_heads']} kv heads, head_dim {cfg['head_dim']}, {cfg['dtype']}; "
             f"window {cfg['window']}; sparse layout: {cfg['sparse_block']}-blocks, "
             f"{cfg['sparse_density']:.0%} of all tiles.")
  out.append(f"- Time: median of {data['repeats']} call(s) of the AOT-compiled function "
             "after a warm-up (`block_until_ready`). TFLOP/s on attended entries only: "
             f"forward `4 * head_dim` per entry, forward+backward {BWD_FACTOR}x that. Memory: "
             "compiled arguments + outputs + temporaries. `failed`: did not compile or run "
             "here (reason in the JSON).")
  out.append("")
  out.append("Cases:")
  out.append("")
  for name in data["cases"]:
    out.append(f"- `{name}`: {data['labels'][name]}")
  for title, mode, key, fmt in (
      ("Forward time", "fwd", "time_s", _fmt_time),
      ("Forward + backward time", "fwdbwd", "time_s", _fmt_time),
      ("Forward TFLOP/s (attended entries)", "fwd", "tflops", lambda x: f"{x:.3g}"),
      ("Forward + backward TFLOP/s (attended entries)", "fwdbwd", "tflops", lambda x: f"{x:.3g}"),
      ("Memory, forward + backward", "fwdbwd", "mem_bytes", _fmt_bytes)):
    out += ["", f"## {title}", ""] + _table(data, mode, key, fmt)
  out += ["", "## Targets", "", "| target | result | evidence |", "|---|---|---|"]
  for name, verdict, why in data["targets"]:
    out.append(f"| {name} | {verdict} | {why} |")
  out += ["", END]
  return "\n".join(out) + "\n"


def write_section(md_path: str, section: str):
  """Replaces the marked section of `md_path` (appends it if absent)."""
  text = ""
  if os.path.exists(md_path):
    with open(md_path) as fh:
      text = fh.read()
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    text = head + section.rstrip("\n") + tail
  else:
    text = (text.rstrip("\n") + "\n\n" if text else "") + section
  with open(md_path, "w") as fh:
    fh.write(text)


# --------------------------------------------------------------------- main


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.bench_kernels", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lengths", default=None, help="comma-separated lengths")
  ap.add_argument("--cases", default=None, help="comma-separated case names (default all)")
  ap.add_argument("--out", default="docs", help="folder for benchmarks.md and the JSON")
  ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5, quick 1)")
  ap.add_argument("--quick", action="store_true",
                  help=f"tiny shapes {QUICK.lengths} (CPU: Pallas interpret mode)")
  ap.add_argument("--modes", default=",".join(MODES), help="subset of fwd,fwdbwd")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the benchmarks.md section from <out>/bench_kernels.json")
  return ap.parse_args(argv)


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
  config = QUICK if args.quick else Config()
  if args.lengths:
    config = dataclasses.replace(config, lengths=tuple(int(x) for x in args.lengths.split(",")))
  cases = all_cases()
  by_name = {c.name: c for c in cases}
  names = [c.name for c in cases] if not args.cases else args.cases.split(",")
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; choose from {list(by_name)}")
  modes = tuple(m for m in args.modes.split(",") if m)
  repeats = args.repeats or (1 if args.quick else 5)
  data = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv,
          "device": device_info(), "config": dataclasses.asdict(config), "quick": args.quick,
          "repeats": repeats, "cases": names, "labels": {n: by_name[n].label for n in names},
          "cells": {}}
  for name in names:
    for seq_len in config.lengths:
      cell = measure(by_name[name], seq_len, config, repeats)
      cell = {m: cell[m] for m in modes}
      data["cells"].setdefault(name, {})[str(seq_len)] = cell
      print(f"{name} L={seq_len}: " + ", ".join(
          f"{m} {_fmt_time(c['time_s'])} {c['tflops']:.3g} TFLOP/s" if c["status"] == "ok"
          else f"{m} failed" for m, c in cell.items()), file=sys.stderr, flush=True)
  data["targets"] = targets(data)
  for name, verdict, why in data["targets"]:
    print(f"{verdict}: {name} ({why})")
  os.makedirs(args.out, exist_ok=True)
  with open(json_path, "w") as fh:
    json.dump(data, fh, indent=1)
  write_section(md_path, markdown(data))
  return {"json": json_path, "markdown": md_path, "data": data}


if __name__ == "__main__":
  main()
