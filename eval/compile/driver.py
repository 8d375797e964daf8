"""Runs compile cases in worker processes with a time limit per case.

One worker per target (`gpu`, `tpu:v5e`, ...): each compiles its cases in
sequence. A case that errors is recorded and the worker goes on; a case that
runs past the limit or kills its worker is recorded (`timeout` / `crash`)
and a fresh worker resumes with the next case. Results are handed to
`on_result` as they arrive, so nothing is lost on interruption.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

from eval.compile.cases import Case

ROOT = pathlib.Path(__file__).resolve().parents[2]
STARTUP_S = 180.0   # worker import + compile-only device


def _version(pkg: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def _jax_tpu_pin() -> str | None:
  """The libtpu version pattern of jax's own [tpu] extra, e.g. '0.0.50.*'."""
  import re
  from importlib import metadata
  for req in metadata.requires("jax") or []:
    m = re.match(r"libtpu\s*==\s*([\w.*]+)\s*;.*extra == .tpu.", req)
    if m:
      return m.group(1)
  return None


def missing_packages(platform: str) -> str | None:
  """Why `platform` cannot be compiled for here (None: it can)."""
  import fnmatch
  hint = "(pip install -e '.[aot]')"
  if platform == "gpu":
    pjrt, jaxlib = _version("jax-cuda12-pjrt"), _version("jaxlib")
    if pjrt is None:
      return f"jax-cuda12-pjrt is not installed {hint}"
    if pjrt != jaxlib:
      return f"jax-cuda12-pjrt {pjrt} does not match jaxlib {jaxlib}: install equal versions"
    from eval.compile import gpu
    if gpu.ptxas_path() is None:
      return f"nvidia-cuda-nvcc-cu12 (ptxas) is not installed {hint}"
    return None
  have, pin = _version("libtpu"), _jax_tpu_pin()
  if have is None:
    return f"libtpu is not installed {hint}"
  if pin is not None and not fnmatch.fnmatch(have, pin):
    return f"libtpu {have} is not the version jax's [tpu] extra pins ({pin})"
  return None


def _reader(stream, q: queue.Queue) -> None:
  for line in stream:
    if line.startswith("@@"):
      q.put(line.rstrip("\n"))
  q.put(None)


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def run_target(target: str, cases: list[Case], *, timeout_s: float,
               on_result: Callable[[Case, dict], None], repeat: int = 1) -> None:
  """Compiles `cases` for `target` ("gpu" or "tpu:<gen>"), one result per case
  (TPU: the fastest of `repeat` compiles; the time limit is per compile)."""
  if target != "gpu":
    timeout_s *= repeat
  by_key = {c.key: c for c in cases}
  remaining = list(cases)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  while remaining:
    proc = subprocess.Popen([sys.executable, "-m", "eval.compile.worker", target, str(repeat)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    proc.stdin.write("".join(c.to_json() + "\n" for c in remaining))
    proc.stdin.close()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    current, deadline = None, time.monotonic() + STARTUP_S
    while True:
      try:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
      except queue.Empty:
        _kill(proc)
        case = by_key[current] if current else remaining[0]
        what = (f"timeout: no result after {timeout_s:.0f} s" if current
                else f"worker did not start within {STARTUP_S:.0f} s")
        _finish(case, {"status": "timeout" if current else "error", "error": what,
                       "compile_s": timeout_s if current else None}, target,
                remaining, on_result)
        break
      if line is None:
        rc = proc.wait()
        if current:
          _finish(by_key[current], {"status": "crash",
                                    "error": f"worker died (exit code {rc})"},
                  target, remaining, on_result)
        elif remaining:   # died before its first case: do not loop forever
          _finish(remaining[0], {"status": "error",
                                 "error": f"worker exited (code {rc}) before compiling"},
                  target, remaining, on_result)
        break
      tag, _, payload = line.partition(" ")
      if tag == "@@START":
        current, deadline = payload, time.monotonic() + timeout_s
      elif tag == "@@RESULT":
        rec = json.loads(payload)
        current = None
        deadline = time.monotonic() + STARTUP_S
        _finish(by_key[rec["key"]], rec, target, remaining, on_result)


def _finish(case, rec, target, remaining, on_result):
  rec = dict(rec, key=case.key, target=target, case=json.loads(case.to_json()))
  remaining.remove(case)
  on_result(case, rec)


def summary(rec: dict) -> str:
  """One progress-line description of a result."""
  s = f"{rec['status']}"
  if rec.get("compile_s") is not None:
    s += f" {rec['compile_s'] + (rec.get('lower_s') or 0):.1f} s"
  ks = rec.get("kernels") or []
  if ks:
    s += f" ({len(ks)} kernels"
    regs = [k.get("registers", 0) for k in ks]
    if any(regs):
      s += (f"; max {max(regs)} regs, spill {max(k.get('spill_stores', 0) for k in ks)} B, "
            f"smem {max(k.get('smem', 0) for k in ks)} B")
    s += ")"
  if rec.get("problems"):
    s += " PROBLEMS: " + "; ".join(rec["problems"])
  if rec.get("error"):
    s += " -- " + rec["error"].splitlines()[0][:200]
    if rec.get("where"):
      s += f" [{', '.join(rec['where'][:3])}]"
  return s


def run(targets: Iterable[str], cases: list[Case], *, timeout_s: float,
        on_result: Callable[[Case, dict], None], log=print, repeat: int = 1) -> None:
  """All `cases` on every target, with a progress line (and ETA) per case."""
  targets = list(targets)
  total, done, t0 = len(targets) * len(cases), 0, time.monotonic()

  def progress(case, rec):
    nonlocal done
    done += 1
    el = time.monotonic() - t0
    eta = el / done * (total - done)
    log(f"[{done}/{total}] {rec['target']} {case.key}: {summary(rec)} | "
        f"elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
    on_result(case, rec)

  for target in targets:
    run_target(target, cases, timeout_s=timeout_s, on_result=progress, repeat=repeat)
