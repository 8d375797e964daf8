"""eval.progress: the ETA weighs tasks by cost and by measured rates."""

from __future__ import annotations

import io

import pytest

from eval.progress import Progress, fmt_seconds


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_eta_weighs_tasks_by_cost_and_calibrates_each_kind():
  clock, out = Clock(), io.StringIO()
  # Two kinds; kind "b" costs 3x "a" per the model. Plan: a, b, a, b.
  bar = Progress([1, 3, 1, 3], kinds=["a", "b", "a", "b"], stream=out, clock=clock)
  assert bar.eta() != bar.eta()                              # NaN before any work
  clock.t = 10.0
  bar.update(0, 0.5)                                        # half of a: 10 s
  # Overall rate 10 s / 0.5 units = 20 s/unit; left 0.5 + 3 + 1 + 3 units.
  assert bar.eta() == pytest.approx(20 * 7.5)
  clock.t = 20.0
  bar.finish(0)                                             # a: 20 s per unit
  assert bar.fraction_done() == pytest.approx(1 / 8)
  # a measured at 20 s/unit; b unmeasured -> overall 20 s/unit.
  assert bar.eta() == pytest.approx(20 * (3 + 1 + 3))
  clock.t = 140.0
  bar.update(1, 0.5)                                        # b runs slower: 120 s for 1.5 units
  # The running b task at its own rate (80 s/unit), the rest at the overall
  # rate for b (140 s / 2.5 units = 56 s/unit) and a's own rate for a.
  assert bar.eta() == pytest.approx(1.5 * 80 + 1 * 20 + 3 * 56)
  clock.t = 260.0
  bar.finish(1)                                             # b: 240 s / 3 units = 80
  assert bar.eta() == pytest.approx(1 * 20 + 3 * 80)
  assert "ETA" in out.getvalue() and "50.0%" in out.getvalue()


def test_bad_costs_and_formatting():
  with pytest.raises(ValueError, match="costs"):
    Progress([1, 0])
  with pytest.raises(ValueError, match="kinds"):
    Progress([1, 2], kinds=["a"])
  assert fmt_seconds(125.4) == "2m05s" and fmt_seconds(float("nan")) == "--"
