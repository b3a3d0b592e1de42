"""Scenarios and their goals: what a run measures and what it must reach, each goal checked
against the numbers measured in the same run (a ratio of two targets' medians, or a measured
value), never typed in."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from .results import WorkloadResult
from .workloads import ClosedLoop, OpenLoop, Timing, Workload

__all__ = [
    "Goal",
    "GoalCheck",
    "Measurement",
    "Scenario",
    "check_measurement_goals",
    "check_workload_goals",
    "fmt",
    "metric_label",
]


_UNITS: Final = {"us": "µs", "ms": "ms", "s": "s", "mb": "MB"}


def metric_label(metric: str) -> tuple[str, str]:
    """``("p99", "µs")`` for ``p99_us``: the words and unit of a metric key, for headings."""
    if metric == "calls_per_s":
        return "calls/s", ""
    stem, _, unit = metric.rpartition("_")
    if stem and unit in _UNITS:
        return stem.replace("_", " ").replace("rss", "RSS"), _UNITS[unit]
    return metric.replace("_", " "), ""


_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": lambda value, limit: value < limit,
    "≤": lambda value, limit: value <= limit,
    "≥": lambda value, limit: value >= limit,
}


@dataclass(frozen=True)
class Goal:
    """A goal from the issue: ``metric`` of ``target`` (÷ that of ``reference``) ``op`` ``limit``.

    In a :class:`Scenario`, ``target`` and ``reference`` are target names, the values are their
    medians over rounds in the workload of kind ``loop``, and the goal is a ratio. In a
    :class:`Measurement`, ``target`` names a row of the result and there is no reference.
    The text is derived from these fields, so what is printed is what is checked.
    """

    target: str
    metric: str
    op: Literal["<", "≤", "≥"]
    limit: float
    reference: str | None = None
    loop: Literal["closed", "open"] | None = None
    in_flight: int | None = None
    """Which closed loop, when a scenario has several (None: its first)."""
    added: bool = False
    """The goal bounds the difference ``target − reference`` (in the metric's unit), not the
    ratio: what a hop adds, e.g. ``M4 p50 − M1 p50 ≤ 0.5 ms``."""

    @property
    def text(self) -> str:
        """E.g. ``M1 p50 ≤ 0.6 × B1 p50 (closed loop)`` or ``resolve p99 < 5 µs``."""
        words, unit = metric_label(self.metric)
        if self.reference is None:
            return f"{self.target} {words} {self.op} {self.limit:g} {unit}".rstrip()
        if self.added:
            text = f"{self.target} {words} − {self.reference} {words} {self.op} {self.limit:g}"
            text += f" {unit}".rstrip()
        else:
            text = f"{self.target} {words} {self.op} {self.limit:g} × {self.reference} {words}"
        if self.in_flight is not None:
            return text + f" ({self.in_flight} in flight)"
        return text + (f" ({self.loop} loop)" if self.loop else "")

    def met(self, value: float) -> bool:
        """Whether ``value`` (the ratio, or the measured value) meets the goal."""
        return _OPS[self.op](value, self.limit)


@dataclass(frozen=True)
class GoalCheck:
    """A goal against a run: the value found (NaN and ``missing`` when it was not measured)."""

    scenario: str
    goal: Goal
    value: float
    detail: str = ""
    """For a ratio: the two measured values it divides."""
    missing: str = ""

    @property
    def met(self) -> bool | None:
        """True/False, or None when the goal could not be checked in this run."""
        return None if self.missing or math.isnan(self.value) else self.goal.met(self.value)


@dataclass(frozen=True)
class Scenario:
    """A named set of workloads, run over ``targets`` (None: every registered target).

    ``baselines`` are the reference targets of the ratio columns: any target names, e.g.
    ``("B0", "M1")`` for "mTLS against the plaintext mesh".
    """

    name: str
    title: str
    workloads: tuple[Workload, ...]
    baselines: tuple[str, ...] = ("B0", "B1")
    targets: tuple[str, ...] | None = None
    goals: tuple[Goal, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """A scenario that measures one system instead of comparing targets (registry, start-up).

    ``run(timing)`` returns a dict: nested dicts are the rows of its table (label → metric →
    value; metric keys end in their unit, e.g. ``p99_us``), other entries its parameters.
    """

    name: str
    title: str
    run: Callable[[Timing], Awaitable[dict[str, Any]]]
    goals: tuple[Goal, ...] = ()


def fmt(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def check_workload_goals(sc: Scenario, results: Sequence[WorkloadResult]) -> list[GoalCheck]:
    """Each of ``sc``'s goals against the medians of its workloads in this run."""
    checks = []
    for goal in sc.goals:
        kind = OpenLoop if goal.loop == "open" else ClosedLoop
        res = next(
            (
                r
                for r in results
                if isinstance(r.workload, kind)
                and (
                    goal.in_flight is None
                    or getattr(r.workload, "concurrency", None) == goal.in_flight
                )
            ),
            None,
        )
        wanted = [n for n in (goal.target, goal.reference) if n is not None]
        absent = [n for n in wanted if res is None or n not in res.summaries]
        if res is None or absent:
            missing = f"{', '.join(absent)} not run"
            checks.append(GoalCheck(sc.name, goal, math.nan, missing=missing))
            continue
        value = res.summaries[goal.target].median[goal.metric]
        if goal.reference is None:
            checks.append(GoalCheck(sc.name, goal, value))
            continue
        base = res.summaries[goal.reference].median[goal.metric]
        unit = metric_label(goal.metric)[1]
        digits = 3 if goal.metric.endswith("_ms") else 0
        if goal.added:
            detail = f"{fmt(value, digits)} − {fmt(base, digits)} {unit}".rstrip()
            checks.append(GoalCheck(sc.name, goal, value - base, detail))
            continue
        ratio = value / base if base and not math.isnan(base) else math.nan
        detail = f"{fmt(value, digits)} / {fmt(base, digits)} {unit}".rstrip()
        checks.append(GoalCheck(sc.name, goal, ratio, detail))
    return checks


def check_measurement_goals(m: Measurement, result: Mapping[str, Any]) -> list[GoalCheck]:
    """Each of ``m``'s goals against the row it names in ``result``."""
    checks = []
    for goal in m.goals:
        row = result.get(goal.target)
        if not isinstance(row, Mapping) or goal.metric not in row:
            missing = f"no {goal.metric} of {goal.target!r} in the result"
            checks.append(GoalCheck(m.name, goal, math.nan, missing=missing))
        else:
            checks.append(GoalCheck(m.name, goal, float(row[goal.metric])))
    return checks
