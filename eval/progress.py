"""A progress bar with an ETA over tasks of unequal cost (stderr).

Shared by the eval commands (`eval.niah`, `eval.ppa_sweep`, `eval.lm`).
Each task comes with an estimated cost in any unit (a model of its work,
e.g. tokens x keys attended, not a measurement) and a `kind` (e.g. the model
variant). The ETA converts the cost left into seconds with measured rates:

- a kind with a finished task: its own seconds per cost unit (so a variant
  that runs slower than its cost model says is extrapolated at its own rate);
- otherwise the rate measured over all the work done so far.

The bar shows the cost-weighted fraction done. On a terminal it redraws one
line; otherwise it prints one line per update.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Sequence

__all__ = ["Progress", "eprint", "fmt_seconds"]


def eprint(*args):
  """print to stderr, flushed."""
  print(*args, file=sys.stderr, flush=True)


def fmt_seconds(seconds: float) -> str:
  """`125.4` -> `"2m05s"`; `"--"` when not finite."""
  if not math.isfinite(seconds):
    return "--"
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """Progress over `costs[i]`-weighted tasks done one after another.

  Args:
    costs: estimated cost of each task (> 0; any unit).
    kinds: a kind per task (default: all the same) whose measured rate
      extrapolates the tasks of that kind still to do.
    stream: where to draw (default stderr).
    clock: seconds (default `time.monotonic`; tests pass a fake one).
  """

  def __init__(self, costs: Sequence[float], kinds: Sequence[str] | None = None, *,
               stream=None, clock: Callable[[], float] = time.monotonic):
    self.costs = [float(c) for c in costs]
    if any(not math.isfinite(c) or c <= 0 for c in self.costs):
      raise ValueError(f"costs={costs!r}: every cost must be a finite number > 0")
    self.kinds = list(kinds) if kinds is not None else [""] * len(self.costs)
    if len(self.kinds) != len(self.costs):
      raise ValueError("kinds must have one entry per cost")
    self.stream = stream if stream is not None else sys.stderr
    self.clock = clock
    self.t0 = clock()
    self.finished: set[int] = set()
    self.current: int | None = None
    self.fraction = 0.0              # of the current task
    self.task_start = self._end = self.t0   # _end: when the last task finished
    self.kind_seconds: dict[str, float] = {}
    self.kind_cost: dict[str, float] = {}

  # -- bookkeeping ----------------------------------------------------------
  def _enter(self, task: int):
    if self.current != task:
      self.current, self.fraction, self.task_start = task, 0.0, self._end

  def update(self, task: int, fraction: float, text: str = ""):
    """Task `task` is `fraction` (0..1) done; redraws the bar."""
    self._enter(task)
    self.fraction = min(1.0, max(0.0, float(fraction)))
    self._draw(text)

  def finish(self, task: int, text: str = ""):
    """Task `task` is done (its measured time calibrates its kind)."""
    self._enter(task)
    now = self.clock()
    kind = self.kinds[task]
    self.kind_seconds[kind] = self.kind_seconds.get(kind, 0.0) + now - self.task_start
    self.kind_cost[kind] = self.kind_cost.get(kind, 0.0) + self.costs[task]
    self.finished.add(task)
    self.current, self.fraction, self._end = None, 0.0, now
    self._draw(text, final=True)

  # -- estimates -------------------------------------------------------------
  def done_cost(self) -> float:
    cur = self.costs[self.current] * self.fraction if self.current is not None else 0.0
    return sum(self.costs[i] for i in self.finished) + cur

  def fraction_done(self) -> float:
    return self.done_cost() / sum(self.costs) if self.costs else 1.0

  def elapsed(self) -> float:
    return self.clock() - self.t0

  def eta(self) -> float:
    """Seconds left (NaN before any measured work)."""
    done = self.done_cost()
    if done <= 0:
      return float("nan")
    overall = self.elapsed() / done

    def rate(kind):
      if kind in self.kind_cost:
        return self.kind_seconds[kind] / self.kind_cost[kind]
      return overall

    left = 0.0
    for i, cost in enumerate(self.costs):
      if i in self.finished:
        continue
      if i == self.current:
        kind = self.kinds[i]
        if kind in self.kind_cost or self.fraction <= 0:
          r = rate(kind)
        else:                        # its own rate so far
          r = (self.clock() - self.task_start) / (cost * self.fraction)
        left += cost * (1.0 - self.fraction) * r
      else:
        left += cost * rate(self.kinds[i])
    return left

  # -- drawing ---------------------------------------------------------------
  def line(self, text: str = "") -> str:
    frac = self.fraction_done()
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    return (f"[{bar}] {100 * frac:5.1f}% | {text} | elapsed {fmt_seconds(self.elapsed())} "
            f"ETA {fmt_seconds(self.eta())}")

  def _draw(self, text: str, final: bool = False):
    line = self.line(text)
    if getattr(self.stream, "isatty", lambda: False)():
      self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
