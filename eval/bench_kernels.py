"""Benchmark of the attention kernels on one device: time, TFLOP/s, memory.

    python -m eval.bench_kernels --preset h100 --out docs   # one 10-minute GPU command
    python -m eval.bench_kernels [--lengths 4096,...] [--decode-lengths 32768,...]
                                 [--cases a,b | --families f,g] [--repeats 3]
                                 [--budget-s 540] [--cell-cap-s 8] [--out docs]
    python -m eval.bench_kernels --quick --out /tmp/kb   # tiny, CPU interpret
    python -m eval.bench_kernels --report-only           # section from the JSON

Cases are pluggable: a `Case` has a name, a label, a family, the modes it
runs (`fwd`, `fwdbwd`, `decode`), an optional longest length, and a builder
`make(L, dtype, key, config) -> Built(fwd, fwd_bwd, args, attended,
entry_flops)`, where `fwd(*args)` returns the attention output (for a decode
case: the output of one generated token against a cache of `L` tokens),
`fwd_bwd(*args)` the gradients w.r.t. every argument (None for forward-only
cases), and `attended` counts the attended (query, key) entries summed over
batch and query heads. This module defines the block-sparse and baseline
cases; every module `eval/kernel_cases_<family>.py` that exposes `CASES` is
picked up too (a module that fails to import, or an entry that is not a
case, is reported as a warning in the output and skipped).

For each case and length, in one run on one device: forward time at
`lengths`, forward+backward time at the lengths `<= max_backward_len`,
decode latency per token at `decode_lengths`. Time: median of `--repeats`
calls of the AOT-compiled function after a warm-up (`block_until_ready`;
a call over 1 s is timed once). TFLOP/s counted on the attended entries only
(forward `entry_flops * head_dim` FLOPs per entry, 4 for attention, forward
+ backward 3.5x that: the backward's five matmuls). Memory: the compiled
figure (`memory_analysis()`: arguments + outputs + temporaries).

A cell is not run, and recorded as `skipped` with the reason, when
  * its compiled memory exceeds 90% of the device's memory ("needs X GB"),
    or a shorter length of the same case and mode already did;
  * its time per call, extrapolated from the case's shorter lengths (local
    log-log slope, at least 1; slope 2 from a single point), exceeds
    `--cell-cap-s`;
  * the run's wall-clock budget `--budget-s` would be exceeded.
A cell that fails to build, compile or run (cuDNN on a CPU, an op without a
Pallas path yet, out of memory) is recorded as `failed` with its reason.
Every finished cell prints a progress line with the elapsed time and an ETA
and rewrites the JSON and the markdown section, so a killed run keeps what
it measured. Targets (below) print PASS / FAIL / NOT MEASURED; they are
defined on an NVIDIA GPU at the full sizes and are NOT MEASURED anywhere
else (quick mode included).

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
import math
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
MODES = ("fwd", "fwdbwd", "decode")
BWD_FACTOR = 3.5
MEMORY_FRACTION = 0.9      # a cell may use this share of the device memory
LONG_CALL_S = 1.0          # calls longer than this are timed once


@dataclasses.dataclass(frozen=True)
class Config:
  """Shapes of one benchmark run."""

  lengths: tuple[int, ...] = tuple(1 << n for n in range(12, 21))   # 4K .. 1M
  max_backward_len: int = 131072
  decode_lengths: tuple[int, ...] = tuple(1 << n for n in range(15, 21))   # 32K .. 1M
  batch: int = 1
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  dtype: str = "bfloat16"
  window: int = 4096
  sparse_block: int = 128
  sparse_density: float = 0.1
  ppa_window: int = 64
  block_sparse_max_len: int = 131072   # issue-7 cases stop here


QUICK = Config(lengths=(64, 128), max_backward_len=128, decode_lengths=(64, 128), q_heads=4,
               kv_heads=2, head_dim=32, window=32, sparse_block=16, ppa_window=8,
               block_sparse_max_len=128)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A full run sized for one device command (see docs/kernels.md, Benchmark)."""

  config: Config
  repeats: int
  budget_s: float
  cell_cap_s: float


# H100 (80 GB): 178 cells (114 builds), estimated (not measured: no GPU was
# available to this work) at about 380 s plus process start; docs/kernels.md,
# "Benchmark", has the arithmetic. The budget stops starting cells at 500 s, so the command ends
# inside a 10-minute device call (startup + the last cell, <= 2 calls of the
# 8 s cap, on top); cells not reached are recorded as skipped.
PRESETS = {
    "h100": Preset(Config(lengths=(4096, 16384, 32768, 131072, 524288, 1048576),
                          decode_lengths=(32768, 131072, 1048576)),
                   repeats=3, budget_s=500.0, cell_cap_s=8.0),
}


class Built(NamedTuple):
  fwd: Callable
  fwd_bwd: Callable | None
  args: tuple
  attended: int
  entry_flops: int = 4     # forward FLOPs per attended entry and head_dim element


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  label: str
  family: str
  make: Callable   # (L, dtype, key, config) -> Built
  modes: tuple[str, ...] = ("fwd", "fwdbwd")
  max_len: int | None = None   # None: every length of the run; a str names a Config field


# ------------------------------------------------------------------ helpers


def qkv(key, seq_len, dtype, config: Config):
  """Standard-normal q `[B, L, Hq, D]`, k, v `[B, L, Hk, D]`."""
  kq, kk, kv = jax.random.split(key, 3)
  b, hq, hk, d = config.batch, config.q_heads, config.kv_heads, config.head_dim
  return (jax.random.normal(kq, (b, seq_len, hq, d), dtype),
          jax.random.normal(kk, (b, seq_len, hk, d), dtype),
          jax.random.normal(kv, (b, seq_len, hk, d), dtype))


def grad_of(fn):
  """`(*args) -> grads w.r.t. every arg` of `fn`, with the output as cotangent
  (a non-trivial cotangent that costs no extra array in the timed function)."""
  def fwd_bwd(*args):
    out, pull = jax.vjp(fn, *args)
    return pull(out)
  return fwd_bwd


def built(fn, args, attended, entry_flops=4):
  return Built(fn, grad_of(fn), args, int(attended), entry_flops)


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


_BS = "block_sparse_max_len"
CASES = [
    Case("pallas_dense_causal", "dense causal, ours (Pallas block-sparse)", "dense",
         _dense("pallas"), max_len=_BS),
    Case("cudnn_dense_causal", "dense causal, jax.nn cuDNN (the dense baseline of every "
         "family)", "dense", _dense("cudnn")),
    Case("xla_dense_causal", "dense causal, jax.nn xla", "dense", _dense("xla")),
    Case("pallas_window", "sliding window, ours", "window", _window("pallas"), max_len=_BS),
    Case("cudnn_window", "sliding window, jax.nn cuDNN local_window_size", "window",
         _window("cudnn"), max_len=_BS),
    Case("xla_window", "sliding window, jax.nn xla local_window_size", "window",
         _window("xla"), max_len=_BS),
    Case("pallas_sparse90", "random layout, 10% of all tiles, ours", "sparse", _sparse(False),
         max_len=_BS),
    Case("pallas_full", "every tile (non-causal dense) through the same kernel", "sparse",
         _sparse(True), max_len=_BS),
]

# Cases the targets read: run first, so that a run cut short by its budget
# loses the others.
PRIORITY = ("pallas_dense_causal", "cudnn_dense_causal", "superlinear_default",
            "superlinear_released", "decode_superlinear_default",
            "decode_superlinear_released", "decode_dense_cudnn", "decode_dense_xla",
            "pallas_window", "pallas_sparse90", "pallas_full")


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


def case_max_len(case: Case, config: Config):
  m = case.max_len
  return getattr(config, m) if isinstance(m, str) else m


def mode_lengths(case: Case, mode: str, config: Config) -> tuple[int, ...]:
  """Lengths at which `case` runs `mode` in this config."""
  if mode not in case.modes:
    return ()
  if mode == "decode":
    lengths = config.decode_lengths
  elif mode == "fwdbwd":
    lengths = tuple(l for l in config.lengths if l <= config.max_backward_len)
  else:
    lengths = config.lengths
  cap = case_max_len(case, config)
  return tuple(l for l in lengths if cap is None or l <= cap)


def plan(cases, config: Config, modes) -> list[tuple[Case, int, tuple[str, ...]]]:
  """`(case, L, modes at L)` in run order: case by case, shortest L first."""
  out = []
  for case in cases:
    lengths = sorted({l for m in modes for l in mode_lengths(case, m, config)})
    for l in lengths:
      at = tuple(m for m in modes if l in mode_lengths(case, m, config))
      out.append((case, l, at))
  return out


def extrapolate(points: list[tuple[int, float]], seq_len: int) -> float | None:
  """Time at `seq_len` from earlier `(L, t)` points: the last two give the
  local log-log slope (at least 1); a single point assumes slope 2."""
  if not points:
    return None
  (l1, t1) = points[-1]
  slope = 2.0
  if len(points) >= 2:
    l0, t0 = points[-2]
    if t0 > 0 and t1 > 0 and l1 != l0:
      slope = max(1.0, math.log(t1 / t0) / math.log(l1 / l0))
  return t1 * (seq_len / l1) ** slope


def device_memory_bytes() -> int | None:
  """The device's usable memory (`memory_stats()["bytes_limit"]`), None where
  the backend does not say (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ---------------------------------------------------------------- measuring


def _time_call(compiled, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - t0


def _reason(e: BaseException, prefix="") -> str:
  return f"{prefix}{type(e).__name__}: {e}"[:300]


@dataclasses.dataclass
class Runner:
  """Runs the cells of one benchmark, enforcing the skips described above."""

  config: Config
  repeats: int
  budget_s: float | None = None
  cell_cap_s: float | None = None
  memory_limit: int | None = None
  log: Callable = lambda s: print(s, file=sys.stderr, flush=True)
  t_start: float = dataclasses.field(default_factory=time.perf_counter)
  history: dict = dataclasses.field(default_factory=dict)   # (case, mode) -> [(L, t)]
  compile_s: dict = dataclasses.field(default_factory=dict)  # (case, mode) -> s
  mem_skip: dict = dataclasses.field(default_factory=dict)   # (case, mode) -> (L, bytes)
  walls: list = dataclasses.field(default_factory=list)      # wall s of measured cells

  def elapsed(self) -> float:
    return time.perf_counter() - self.t_start

  def pre_skip(self, name: str, mode: str, seq_len: int) -> str | None:
    """Why the cell is not run, or None."""
    if (prev := self.mem_skip.get((name, mode))) is not None:
      return f"needs > {_fmt_bytes(prev[1])} (that at {_fmt_len(prev[0])})"
    est = extrapolate(self.history.get((name, mode), []), seq_len)
    if self.cell_cap_s is not None and est is not None and est > self.cell_cap_s:
      return f"est. {_fmt_time(est)} per call > cap {_fmt_time(self.cell_cap_s)}"
    if self.budget_s is not None:
      cost = self.compile_s.get((name, mode), 0.0) + (1 + self.repeats) * (est or 0.0)
      if self.elapsed() + cost > self.budget_s:
        return f"run budget {self.budget_s:.0f} s (at {self.elapsed():.0f} s)"
    return None

  def run_cell(self, name: str, mode: str, seq_len: int, fn, b: Built) -> dict:
    """One timed cell; failures and skips are recorded, not raised."""
    if (why := self.pre_skip(name, mode, seq_len)) is not None:
      return {"status": "skipped", "reason": why}
    t_cell = time.perf_counter()
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(*b.args).compile()
      compile_s = time.perf_counter() - t0
      self.compile_s[(name, mode)] = compile_s
      mem = compiled.memory_analysis()
      mem_bytes = None if mem is None else int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
      if (self.memory_limit is not None and mem_bytes is not None
          and mem_bytes > MEMORY_FRACTION * self.memory_limit):
        self.mem_skip[(name, mode)] = (seq_len, mem_bytes)
        return {"status": "skipped", "mem_bytes": mem_bytes,
                "reason": f"needs {_fmt_bytes(mem_bytes)} (device "
                          f"{_fmt_bytes(self.memory_limit)})"}
      warm = _time_call(compiled, b.args)
      n = 1 if warm > LONG_CALL_S else self.repeats
      times = [_time_call(compiled, b.args) for _ in range(n)]
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN unavailable, out of memory
      return {"status": "failed", "reason": _reason(e)}
    t = statistics.median(times)
    self.history.setdefault((name, mode), []).append((seq_len, t))
    self.walls.append(time.perf_counter() - t_cell)
    flops = b.entry_flops * b.args[0].shape[-1] * b.attended
    flops *= BWD_FACTOR if mode == "fwdbwd" else 1.0
    return {"status": "ok", "time_s": t, "times_s": times, "warmup_s": warm,
            "compile_s": compile_s, "tflops": flops / t / 1e12, "mem_bytes": mem_bytes,
            "attended": b.attended}

  def measure(self, case: Case, seq_len: int, modes, on_cell=None) -> dict:
    """The cells of one (case, L) for `modes`; `on_cell(mode, cell)` after each."""
    out = {}
    pending = [m for m in modes if self.pre_skip(case.name, m, seq_len) is None]
    b = None
    if pending:
      try:
        b = case.make(seq_len, jnp.dtype(self.config.dtype), jax.random.key(seq_len),
                      self.config)
      except Exception as e:  # noqa: BLE001 - recorded in the report
        build_error = _reason(e, "build: ")
    for mode in modes:
      if mode in pending and b is None:
        cell = {"status": "failed", "reason": build_error}
      elif mode not in pending:
        cell = {"status": "skipped", "reason": self.pre_skip(case.name, mode, seq_len)}
      else:
        fn = b.fwd_bwd if mode == "fwdbwd" else b.fwd
        cell = (self.run_cell(case.name, mode, seq_len, fn, b) if fn is not None
                else {"status": "failed", "reason": "case has no function for this mode"})
      out[mode] = cell
      if on_cell is not None:
        on_cell(mode, cell)
    return out

  def eta(self, cells_left: int) -> float:
    """Rough seconds left: cells left x mean wall time of measured cells,
    at most the budget left."""
    mean = statistics.mean(self.walls) if self.walls else 0.0
    est = cells_left * mean
    if self.budget_s is not None:
      est = min(est, max(0.0, self.budget_s - self.elapsed()))
    return est


def device_info() -> dict:
  dev = jax.devices()[0]
  mem = device_memory_bytes()
  return {"platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
          "python": platform.python_version(), "host_cores": os.cpu_count(),
          "memory_bytes": mem}


# ------------------------------------------------------------------ targets


def _cell(cells, name, seq_len, mode="fwd"):
  c = cells.get(name, {}).get(str(seq_len), {}).get(mode)
  return c if c and c.get("status") == "ok" else None


TARGET_NAMES = (
    "dense causal forward >= 50% of cuDNN TFLOP/s (every L >= 4K)",
    "sliding-window time per token flat in L (max/min over L >= 8K <= 1.25)",
    "90%-sparse layout >= 5x faster than every tile at 32K (forward)",
)
SUPERLINEAR_CONFIGS = ("default", "released")


def superlinear_target_names(config_name: str) -> tuple[str, ...]:
  return (f"superlinear ({config_name}) forward faster than cuDNN dense at every L >= 32K",
          f"superlinear ({config_name}) forward >= 5x faster than cuDNN dense at 128K",
          f"superlinear ({config_name}) forward runs at 1M",
          f"superlinear ({config_name}) decode at a 1M cache >= 10x faster than dense decode")


def _all_target_names():
  names = list(TARGET_NAMES)
  for c in SUPERLINEAR_CONFIGS:
    names += superlinear_target_names(c)
  return names


def _block_sparse_targets(cells, lengths):
  res = []
  ratios = []
  for seq_len in lengths:
    ours, ref = _cell(cells, "pallas_dense_causal", seq_len), _cell(cells, "cudnn_dense_causal", seq_len)
    if seq_len >= 4096 and ours and ref:
      ratios.append((seq_len, ours["tflops"] / ref["tflops"]))
  if ratios:
    ok = all(r >= 0.5 for _, r in ratios)
    res.append((TARGET_NAMES[0], "PASS" if ok else "FAIL",
                ", ".join(f"{_fmt_len(l)}: {r:.0%}" for l, r in ratios)))
  else:
    res.append((TARGET_NAMES[0], "NOT MEASURED", "no pair of measured cells"))
  per_token = [(l, c["time_s"] / l) for l in lengths
               if l >= 8192 and (c := _cell(cells, "pallas_window", l))]
  if len(per_token) >= 2:
    vals = [t for _, t in per_token]
    spread = max(vals) / min(vals)
    res.append((TARGET_NAMES[1], "PASS" if spread <= 1.25 else "FAIL",
                f"max/min = {spread:.2f} over {', '.join(_fmt_len(l) for l, _ in per_token)}"))
  else:
    res.append((TARGET_NAMES[1], "NOT MEASURED", "fewer than two lengths >= 8K measured"))
  sparse, full = _cell(cells, "pallas_sparse90", 32768), _cell(cells, "pallas_full", 32768)
  if sparse and full:
    speed = full["time_s"] / sparse["time_s"]
    res.append((TARGET_NAMES[2], "PASS" if speed >= 5 else "FAIL", f"{speed:.1f}x"))
  else:
    res.append((TARGET_NAMES[2], "NOT MEASURED", "32K cells not measured"))
  return res


def _superlinear_targets(cells, lengths, decode_lengths, config_name):
  names = superlinear_target_names(config_name)
  ours_name = f"superlinear_{config_name}"
  res = []
  speed = {l: r["time_s"] / o["time_s"] for l in lengths
           if l >= 32768 and (o := _cell(cells, ours_name, l))
           and (r := _cell(cells, "cudnn_dense_causal", l))}
  if 32768 in speed:
    ok = all(s > 1 for s in speed.values())
    res.append((names[0], "PASS" if ok else "FAIL",
                ", ".join(f"{_fmt_len(l)}: {s:.2f}x" for l, s in sorted(speed.items()))))
  else:
    res.append((names[0], "NOT MEASURED", "32K pair (ours, cuDNN) not measured"))
  if 131072 in speed:
    res.append((names[1], "PASS" if speed[131072] >= 5 else "FAIL", f"{speed[131072]:.2f}x"))
  else:
    res.append((names[1], "NOT MEASURED", "128K pair (ours, cuDNN) not measured"))
  c = cells.get(ours_name, {}).get(str(1 << 20), {}).get("fwd")
  if c and c.get("status") == "ok":
    res.append((names[2], "PASS", f"{_fmt_time(c['time_s'])}"))
  elif c and c.get("status") == "failed":
    res.append((names[2], "FAIL", c.get("reason", "failed")[:120]))
  else:
    res.append((names[2], "NOT MEASURED",
                (c or {}).get("reason", "1M forward not part of this run")[:120]))
  dec = _cell(cells, f"decode_superlinear_{config_name}", 1 << 20, "decode")
  dense = [(n, d["time_s"]) for n in ("decode_dense_cudnn", "decode_dense_xla")
           if (d := _cell(cells, n, 1 << 20, "decode"))]
  if dec and dense:
    base, t = min(dense, key=lambda x: x[1])   # the faster dense decode is the baseline
    s = t / dec["time_s"]
    res.append((names[3], "PASS" if s >= 10 else "FAIL", f"{s:.1f}x vs `{base}`"))
  else:
    res.append((names[3], "NOT MEASURED", "1M decode pair not measured"))
  return res


def targets(data) -> list[tuple[str, str, str]]:
  """`(target, PASS | FAIL | NOT MEASURED, evidence)` computed from the cells."""
  info, cells, quick = data["device"], data["cells"], data["quick"]
  if info["platform"] != "gpu" or quick:
    why = ("quick mode: tiny shapes in interpret mode" if quick
           else f"targets are defined on an NVIDIA GPU; this run is on {info['platform']}")
    return [(n, "NOT MEASURED", why) for n in _all_target_names()]
  cfg = data["config"]
  lengths = cfg["lengths"]
  res = _block_sparse_targets(cells, lengths)
  for c in SUPERLINEAR_CONFIGS:
    res += _superlinear_targets(cells, lengths, cfg.get("decode_lengths", ()), c)
  return res


# ------------------------------------------------------------------- report


def _fmt_len(n: int) -> str:
  if n >= 1 << 20 and n % (1 << 20) == 0:
    return f"{n >> 20}M"
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


def _config_of(data) -> Config:
  fields = {f.name for f in dataclasses.fields(Config)}
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()
         if k in fields}
  return Config(**cfg)


def _table(data, mode, key, fmt, by_name):
  config = _config_of(data)
  names = [n for n in data["cases"] if n in by_name and mode_lengths(by_name[n], mode, config)]
  lengths = sorted({l for n in names for l in mode_lengths(by_name[n], mode, config)})
  if not names:
    return []
  rows = ["| case | " + " | ".join(_fmt_len(l) for l in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
  for name in names:
    cells = []
    for l in lengths:
      c = data["cells"].get(name, {}).get(str(l), {}).get(mode, {})
      if c.get("status") == "ok":
        cells.append(fmt(c[key]))
      elif c.get("status") == "skipped":
        cells.append(f"skipped: {c['reason']}")
      else:
        cells.append("failed" if c else "-")
    rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return rows


def _case_stub(name, data) -> Case:
  """A Case carrying the modes/max_len recorded in the JSON (for tables)."""
  meta = data.get("case_meta", {}).get(name, {})
  return Case(name, data["labels"].get(name, name), meta.get("family", "?"), None,
              tuple(meta.get("modes", ("fwd", "fwdbwd"))), meta.get("max_len"))


def markdown(data) -> str:
  cfg, info = data["config"], data["device"]
  by_name = {n: _case_stub(n, data) for n in data["cases"]}
  out = [BEGIN, "", "# Kernel benchmarks (`python -m eval.bench_kernels`)", ""]
  status = "" if data.get("complete", True) else " **The run did not finish (partial results).**"
  out.append(f"Generated by `python -m eval.bench_kernels {' '.join(data['argv'])}` on "
             f"{data['date']}; wall time {data.get('wall_s', 0):.0f} s.{status}")
  out.append("")
  mem = info.get("memory_bytes")
  out.append(f"- Device: {info['device_kind']} (platform `{info['platform']}`"
             + (f", {_fmt_bytes(mem)} usable" if mem else "") + f"), jax "
             f"{info['jax']}, Python {info['python']}."
             + (" **Quick mode: tiny shapes, kernels in Pallas interpret mode on CPU; the "
                "numbers say nothing about kernel speed.**" if data["quick"] else ""))
  out.append(f"- Shapes: batch {cfg['batch']}, {cfg['q_heads']} query heads : "
             f"{cfg['kv_heads']} kv heads, head_dim {cfg['head_dim']}, {cfg['dtype']}; "
             f"window {cfg['window']}; sparse layout: {cfg['sparse_block']}-blocks, "
             f"{cfg['sparse_density']:.0%} of all tiles; PPA window {cfg.get('ppa_window')}. "
             f"Forward+backward up to L = {_fmt_len(cfg.get('max_backward_len', 0))}; "
             "decode: one query token at the end of a cache of L tokens.")
  limits = data.get("limits", {})
  out.append(f"- Time: median of {data['repeats']} call(s) of the AOT-compiled function "
             f"after a warm-up (`block_until_ready`; calls over {LONG_CALL_S:g} s timed once). "
             "TFLOP/s on attended entries only: "
             f"forward `4 * head_dim` per entry (span-search: `2 * head_dim` per scored "
             f"anchor), forward+backward {BWD_FACTOR}x that. Memory: compiled arguments + "
             "outputs + temporaries. `failed`: did not build, compile or run here (reason in "
             "the JSON); `skipped`: not run, for the reason given (compiled memory over "
             f"{MEMORY_FRACTION:.0%} of the device, time per call extrapolated over the cap "
             f"{limits.get('cell_cap_s')} s, run budget {limits.get('budget_s')} s); "
             "`-`: not reached.")
  out.append("")
  out.append("Cases:")
  out.append("")
  for name in data["cases"]:
    out.append(f"- `{name}`: {data['labels'][name]}")
  for title, mode, key, fmt in (
      ("Forward time", "fwd", "time_s", _fmt_time),
      ("Forward TFLOP/s (attended entries)", "fwd", "tflops", lambda x: f"{x:.3g}"),
      ("Memory, forward", "fwd", "mem_bytes", _fmt_bytes),
      ("Forward + backward time", "fwdbwd", "time_s", _fmt_time),
      ("Forward + backward TFLOP/s (attended entries)", "fwdbwd", "tflops", lambda x: f"{x:.3g}"),
      ("Memory, forward + backward", "fwdbwd", "mem_bytes", _fmt_bytes),
      ("Decode latency per token (cache length L)", "decode", "time_s", _fmt_time),
      ("Memory, decode", "decode", "mem_bytes", _fmt_bytes)):
    rows = _table(data, mode, key, fmt, by_name)
    if rows:
      out += ["", f"## {title}", ""] + rows
  out += ["", "## Targets", "", "| target | result | evidence |", "|---|---|---|"]
  for name, verdict, why in data["targets"]:
    out.append(f"| {name} | {verdict} | {why} |")
  if data.get("warnings"):
    out += ["", "## Warnings", ""] + [f"- {w}" for w in data["warnings"]]
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
  cells_plan = plan(cases, config, modes)
  if args.dry_run:
    for case, seq_len, at in cells_plan:
      print(f"{case.name} L={_fmt_len(seq_len)} {','.join(at)}")
    print(f"{sum(len(at) for _, _, at in cells_plan)} cells, {len(cells_plan)} builds")
    return {"plan": [(c.name, l, at) for c, l, at in cells_plan]}
  data = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv,
          "device": device_info(), "config": dataclasses.asdict(config), "quick": args.quick,
          "repeats": repeats, "limits": {"budget_s": budget, "cell_cap_s": cap,
                                         "memory_limit_bytes": memory},
          "cases": [c.name for c in cases], "labels": {c.name: c.label for c in cases},
          "case_meta": {c.name: {"family": c.family, "modes": list(c.modes),
                                 "max_len": case_max_len(c, config)} for c in cases},
          "warnings": warnings, "cells": {}, "complete": False, "wall_s": 0.0}
  total = sum(len(at) for _, _, at in cells_plan)
  done = [0]
  for case, seq_len, at in cells_plan:
    def on_cell(mode, cell, case=case, seq_len=seq_len):
      done[0] += 1
      data["cells"].setdefault(case.name, {}).setdefault(str(seq_len), {})[mode] = cell
      data["wall_s"] = runner.elapsed()
      _write(data, json_path, md_path)
      if cell["status"] == "ok":
        what = (f"{_fmt_time(cell['time_s'])}, {cell['tflops']:.3g} TFLOP/s, "
                f"{_fmt_bytes(cell['mem_bytes'])}")
      else:
        what = f"{cell['status']}: {cell['reason']}"
      runner.log(f"[{done[0]}/{total}] {case.name} L={_fmt_len(seq_len)} {mode}: {what} | "
                 f"{runner.elapsed():.0f} s elapsed, ETA ~{runner.eta(total - done[0]):.0f} s")
    runner.measure(case, seq_len, at, on_cell)
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
