"""Cells of the kernel benchmark: the block-sparse and baseline cases, and
the `Runner` that compiles, times and records one cell at a time.

Time: median of `repeats` calls of the AOT-compiled function after a
warm-up (`block_until_ready`; a call over `LONG_CALL_S` is timed once),
divided by the tokens a decode call generates (`Built.tokens`). TFLOP/s
count the attended entries only. Memory: the compiled figure
(`memory_analysis()`: arguments + outputs + temporaries).

A cell is not run, and recorded as `skipped` with the reason, when its
compiled memory exceeds `MEMORY_FRACTION` of the device (or a shorter
length of the same case and mode already did), when its time per call
extrapolated from shorter lengths exceeds the cap, or when the run's budget
would be exceeded. A cell that fails to build, compile or run is recorded
as `failed` with its reason; the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn
from eval.bench_plan import (BWD_FACTOR, LONG_CALL_S, MEMORY_FRACTION, Built, Case, Config,
                             extrapolate, fmt_bytes, fmt_len, fmt_time)

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
      return f"needs > {fmt_bytes(prev[1])} (that at {fmt_len(prev[0])})"
    est = extrapolate(self.history.get((name, mode), []), seq_len)
    if self.cell_cap_s is not None and est is not None and est > self.cell_cap_s:
      return f"est. {fmt_time(est)} per call > cap {fmt_time(self.cell_cap_s)}"
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
                "reason": f"needs {fmt_bytes(mem_bytes)} (device "
                          f"{fmt_bytes(self.memory_limit)})"}
      warm = _time_call(compiled, b.args)
      n = 1 if warm > LONG_CALL_S else self.repeats
      times = [_time_call(compiled, b.args) for _ in range(n)]
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN unavailable, out of memory
      return {"status": "failed", "reason": _reason(e)}
    call = statistics.median(times)
    t = call / b.tokens
    self.history.setdefault((name, mode), []).append((seq_len, call))
    self.walls.append(time.perf_counter() - t_cell)
    flops = b.entry_flops * b.args[0].shape[-1] * b.attended
    flops *= BWD_FACTOR if mode == "fwdbwd" else 1.0
    return {"status": "ok", "time_s": t, "times_s": times, "tokens": b.tokens,
            "warmup_s": warm,
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

