"""Plan of a kernel benchmark run: shapes, cases, presets, cell order and
estimated time.

A `Case` has a name, a label, a family, the modes it runs (`fwd`,
`fwdbwd`, `decode`), an optional longest length, and a builder
`make(L, dtype, key, config) -> Built`. A run is a list of `(case, L,
modes)` builds: for a preset, the preset's own target-first list
(`Preset.cells`: the cells the targets of issue 15 read, forward first);
otherwise every case at every length of the `Config`.

`estimate_s` predicts a cell's wall time before anything runs: a
compile-time allowance per family plus the timed calls at the roofline
model's time per call (`eval/roofline_model.py`; a model, not a measurement).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

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
  decode_tokens: int = 64              # tokens per decode call (one jitted loop)


QUICK = Config(lengths=(64, 128), max_backward_len=128, decode_lengths=(64, 128), q_heads=4,
               kv_heads=2, head_dim=32, window=32, sparse_block=16, ppa_window=8,
               block_sparse_max_len=128, decode_tokens=2)



class Built(NamedTuple):
  fwd: Callable
  fwd_bwd: Callable | None
  args: tuple
  attended: int
  entry_flops: int = 4     # forward FLOPs per attended entry and head_dim element
  tokens: int = 1          # decode: tokens one call generates (time is per token)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  label: str
  family: str
  make: Callable   # (L, dtype, key, config) -> Built
  modes: tuple[str, ...] = ("fwd", "fwdbwd")
  max_len: int | None = None   # None: every length of the run; a str names a Config field



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



# --------------------------------------------------------------- formatting


def fmt_len(n: int) -> str:
  if n >= 1 << 20 and n % (1 << 20) == 0:
    return f"{n >> 20}M"
  return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def fmt_time(t):
  return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def fmt_bytes(n):
  if n is None:
    return "n/a"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n} B"


# ----------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
  """A run sized for one device command: the target cells, in order.

  `cells`: `(case name, L, modes)` builds, run in this order; cells the
  budget does not reach are recorded as skipped (their targets read NOT
  MEASURED).
  """

  config: Config
  repeats: int
  budget_s: float
  cell_cap_s: float
  cells: tuple = ()


K, M = 1024, 1 << 20
_DENSE_L = (4 * K, 16 * K, 32 * K, 128 * K)


def _pairs(names, lengths, modes):
  return tuple((n, l, modes) for l in lengths for n in names)


def forward_cells() -> tuple:
  """The forward targets, cheapest evidence first (issue 15, item 9)."""
  f, d = ("fwd",), ("decode",)
  return (_pairs(("pallas_dense_causal", "cudnn_dense_causal"), _DENSE_L[:3], f)
          + _pairs(("pallas_window",), (16 * K, 32 * K, 128 * K), f)
          + _pairs(("pallas_sparse90", "pallas_full"), (32 * K,), f)
          + _pairs(("decode_superlinear_default", "decode_superlinear_released",
                    "decode_dense_cudnn", "decode_dense_xla"), (128 * K, M), d)
          + _pairs(("superlinear_default", "superlinear_released"), (32 * K, 128 * K), f)
          + _pairs(("pallas_dense_causal", "cudnn_dense_causal"), (128 * K,), f)
          + _pairs(("superlinear_default", "superlinear_released"), (M,), f))


def backward_cells() -> tuple:
  """Forward + backward, the second command: the same comparisons."""
  b = ("fwdbwd",)
  return (_pairs(("pallas_dense_causal", "cudnn_dense_causal"), (4 * K, 16 * K, 32 * K), b)
          + _pairs(("pallas_window",), (16 * K, 32 * K), b)
          + _pairs(("pallas_sparse90", "pallas_full"), (32 * K,), b)
          + _pairs(("superlinear_default", "superlinear_released"), (32 * K, 128 * K), b))


_H100 = Config(lengths=(4 * K, 16 * K, 32 * K, 128 * K, M), max_backward_len=128 * K,
               decode_lengths=(128 * K, M), block_sparse_max_len=M)
# Each preset fits one 8-minute device command including compiles: the
# budget stops starting cells at `budget_s`; `--dry-run` prints the plan and
# its estimate (`estimate_s`).
PRESETS = {
    "h100": Preset(_H100, repeats=3, budget_s=420.0, cell_cap_s=15.0, cells=forward_cells()),
    "h100_bwd": Preset(_H100, repeats=3, budget_s=420.0, cell_cap_s=15.0,
                       cells=backward_cells()),
}


def preset_plan(preset: Preset, cases) -> tuple[list, list[str]]:
  """`([(case, L, modes)], warnings)` of a preset; consecutive entries of
  one (case, L) are merged (one build), unknown cases are warned about."""
  by_name = {c.name: c for c in cases}
  out, warnings = [], []
  for name, seq_len, modes in preset.cells:
    case = by_name.get(name)
    if case is None:
      warnings.append(f"preset cell {name!r}: no such case (skipped)")
      continue
    modes = tuple(m for m in modes if m in case.modes)
    if out and out[-1][0] is case and out[-1][1] == seq_len:
      out[-1] = (case, seq_len, out[-1][2] + modes)
    elif modes:
      out.append((case, seq_len, modes))
  return out, warnings


# -------------------------------------------------------------- estimates


# Compile-time allowance per cell, by family (seconds, an assumption: no GPU
# compile has been timed yet).
COMPILE_S = {"dense": 6.0, "window": 6.0, "sparse": 8.0, "superlinear": 25.0,
             "decode": 15.0}
DEFAULT_COMPILE_S = 10.0
DEFAULT_CALL_S = 1.0


def model_call_s(name: str, seq_len: int, mode: str, config: Config) -> float | None:
  """Roofline seconds of one call of a known case (None for other cases)."""
  from eval import roofline_model as rl
  shape = rl.Shape(config.batch, config.q_heads, config.kv_heads, config.head_dim,
                   2 if config.dtype in ("bfloat16", "float16") else 4)
  bwd = mode == "fwdbwd"
  sparse = name in ("pallas_sparse90", "pallas_full")
  if name in ("pallas_dense_causal",):
    op = rl.dense_pallas(seq_len, shape, bwd)
  elif name in ("cudnn_dense_causal", "xla_dense_causal"):
    op = rl.dense_cudnn(seq_len, shape, bwd)
  elif name == "pallas_window":
    op = rl.window_pallas(seq_len, config.window, shape, bwd)
  elif sparse:
    op = rl.block_sparse(rl.sparse_layout(seq_len, config.sparse_density, config.sparse_block,
                                          full=name == "pallas_full"), shape, bwd)
  elif name.startswith("superlinear_") and name[12:] in rl.CONFIGS:
    op = rl.superlinear(seq_len, rl.CONFIGS[name[12:]], shape, bwd)
  elif name.startswith("decode_superlinear_") and name[19:] in rl.CONFIGS:
    op = rl.superlinear_decode(seq_len, rl.CONFIGS[name[19:]], shape)
    return config.decode_tokens * op.time()
  elif name.startswith("decode_dense_"):
    return config.decode_tokens * rl.dense_decode_baseline(seq_len, shape).time()
  else:
    return None
  return op.time()


def estimate_s(case: Case, seq_len: int, modes, config: Config, repeats: int) -> dict:
  """Predicted wall seconds of one build: per mode a compile allowance plus
  a warm-up and `repeats` calls (one when a call exceeds `LONG_CALL_S`)."""
  out = {}
  for mode in modes:
    call = model_call_s(case.name, seq_len, mode, config)
    known = call is not None
    call = call if known else DEFAULT_CALL_S
    calls = 2 if call > LONG_CALL_S else 1 + repeats
    comp = COMPILE_S.get(case.family, DEFAULT_COMPILE_S) * (2 if mode == "fwdbwd" else 1)
    out[mode] = {"call_s": call, "model": known, "compile_s": comp,
                 "total_s": comp + calls * call}
  return out
