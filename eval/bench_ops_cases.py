"""The ops, shapes and cell bookkeeping of `eval.bench_ops` (one table).

A cell is one `(op, L, mode)` measurement in the benchmark's JSON; the
helpers here read its status. Shared by the measuring loop (`eval.bench_ops`)
and the report (`eval.bench_ops_report`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

import attn

DTYPE = "float32"
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [512, 1024, 2048]
MODES = ("fwd", "fwdbwd")
FIT_MIN_LEN = 2048
PPA_WINDOW = 64


@dataclasses.dataclass(frozen=True)
class Op:
  name: str           # row key (stable, used in the JSON)
  label: str          # human-readable description
  fn: Callable        # (q, k, v, q_search) -> out
  family: str         # "dense", "window", "ppa", "superlinear"
  p: float | None = None
  window: int | None = None


def _ops() -> list[Op]:
  ops = [
      Op("dense_reference", "dense, reference (baseline, L x L mask)",
         lambda q, k, v, qs: attn.dense_attention(q, k, v, implementation="reference"),
         "dense"),
      Op("dense_xla", "dense, xla (blocked)",
         lambda q, k, v, qs: attn.dense_attention(q, k, v, implementation="xla"),
         "dense"),
      Op("sliding_window_w64", "sliding window w=64, xla",
         lambda q, k, v, qs: attn.sliding_window_attention(
             q, k, v, window=64, implementation="xla"),
         "window", window=64),
  ]
  for p in (0.0, 0.25, 0.5, 0.75, 1.0):
    ops.append(Op(f"ppa_p{p:g}_w{PPA_WINDOW}", f"PPA p={p:g} w={PPA_WINDOW}, xla",
                  (lambda p: lambda q, k, v, qs: attn.ppa_attention(
                      q, k, v, p=p, window=PPA_WINDOW, implementation="xla"))(p),
                  "ppa", p=p, window=PPA_WINDOW))
  ops.append(Op("ppa_p0.5_w8", "PPA p=0.5 w=8, xla (exposes the 1+p slope)",
                lambda q, k, v, qs: attn.ppa_attention(q, k, v, p=0.5, window=8,
                                                       implementation="xla"),
                "ppa", p=0.5, window=8))
  ops.append(Op("superlinear", "superlinear, default config, k_search=None, xla",
                lambda q, k, v, qs: attn.superlinear_attention(
                    q, k, v, qs, None, config=attn.SuperlinearConfig(),
                    implementation="xla"),
                "superlinear"))
  return ops


OPS = _ops()
OPS_BY_NAME = {op.name: op for op in OPS}


def ppa_attended_keys(seq_len: int, p: float, window: int) -> int:
  """Sum over the queries of the number of kept keys (exact, from ppa_offsets)."""
  offs = attn.ppa_offsets(seq_len - 1, p=p, window=window)
  return int(np.sum(seq_len - offs))


def ppa_attended_keys_approx(seq_len: int, p: float, window: int) -> float:
  """`w L + L^(1+p) / (1+p)`, the asymptotic count."""
  return window * seq_len + seq_len ** (1 + p) / (1 + p)




def skip_kind(c) -> str | None:
  """"time" or "memory" for a skipped cell (older JSON: from its reason)."""
  if c.get("status") != "skipped":
    return None
  if c.get("skip"):
    return c["skip"]
  return "memory" if "memory" in c.get("reason", "") else "time"


def mem_is_compiled(c) -> bool:
  return c.get("mem_bytes") is not None and c.get("mem_source", "compiled") == "compiled"


def cannot_run(c) -> bool:
  """The cell failed, or its compiled temporaries exceed the memory cap."""
  return c.get("status") == "error" or (skip_kind(c) == "memory" and mem_is_compiled(c))



def cell_key(name, seq_len, mode):
  return f"{name}|{seq_len}|{mode}"



def fmt_bytes(b):
  if b is None:
    return "-"
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if b >= size:
      return f"{b / size:.3g} {unit}"
  return f"{int(b)} B"


def fmt_time(t):
  if t is None:
    return "-"
  if t >= 1:
    return f"{t:.3g} s"
  return f"{t * 1e3:.3g} ms"


