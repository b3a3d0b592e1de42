"""The measuring engine: interleaved rounds over the targets, workloads and the whole suite.

Why it is built this way (see ``bench/README.md`` for the method in prose):

* A benchmark here is a *comparison*: a mesh call against plain HTTP and NATS calls on the
  same machine in the same run. So every target is measured round by round, interleaved
  (A B C, B C A, C A B, ...), and each number is the median of the rounds: a burst of
  noise from a neighbour on a shared machine hits one round of every target instead of
  every round of one target.
* Closed loop (N calls in flight) measures capacity and serial latency; open loop
  (sends scheduled at a fixed rate, latency counted from the *scheduled* time) measures
  latency the way a user sees it, without coordinated omission: a slow call does not
  delay the next send, and a send that happens late is charged for its lateness.
* Server-side CPU and peak RSS come from /proc (no psutil), for the processes a target
  names; client-side CPU is this process's CPU time, which matters because an
  in-process sidecar spends its CPU on the client side.

* A scenario states its goals (:class:`Goal`): each is checked against the numbers measured in
  the same run (a ratio of two targets' medians, or a measured value), never typed in.
* Scenarios that measure one system rather than compare it with baselines (the registry ones)
  are :class:`Measurement` scenarios: an async function returning a dict, shown as a table.

The parts: ``targets`` (what is measured), ``processes`` and ``procfs`` (its servers and their
accounting), ``workloads`` (what it is asked to do), ``loops`` (how calls are driven),
``results`` (what was measured), ``scenarios`` (goals and their checks), ``report`` (the
console), ``machine`` (what it ran on). This module runs them: rounds, workloads, the suite.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console

from .loops import closed_loop, open_loop
from .machine import machine_info
from .procfs import (
    machine_cpu_seconds,
    pids_cpu_seconds,
    pids_peak_rss_kb,
    proc_name,
    reset_peak_rss,
)
from .report import render_goals, render_header, render_measurement, render_workload
from .results import RoundResult, WorkloadResult, jsonable, percentile, report_json, summarize
from .scenarios import (
    GoalCheck,
    Measurement,
    Scenario,
    check_measurement_goals,
    check_workload_goals,
)
from .targets import Target, TargetFactory
from .workloads import ClosedLoop, OpenLoop, Timing, Workload

__all__ = ["planned_seconds", "run_suite", "run_workload"]


async def _measure(
    label: str,
    target: Target,
    workload: Workload,
    timing: Timing,
    payload: bytes,
    round_no: int,
) -> RoundResult:
    """Run one round for one target, with CPU read right around it."""
    pids = target.server_pids()
    offpath = target.offpath_pids()
    gc.collect()  # the previous target's garbage must not be collected on this one's time
    busy0, steal0 = machine_cpu_seconds()
    off0 = pids_cpu_seconds(offpath)
    srv0 = pids_cpu_seconds(pids)
    cli0 = time.process_time()
    wall0 = time.perf_counter()
    if isinstance(workload, ClosedLoop):
        by_count = workload.count is not None and workload.duration_s is None
        raw = await closed_loop(
            target.call,
            payload,
            workload.concurrency,
            None if by_count else workload.seconds(timing),
            workload.count,
            timing.drain_s,
        )
    else:
        raw = await open_loop(
            target.call, payload, workload.rate, workload.seconds(timing), timing.drain_s
        )
    wall = time.perf_counter() - wall0
    cli1 = time.process_time()
    srv1 = pids_cpu_seconds(pids)
    off1 = pids_cpu_seconds(offpath)
    busy1, steal1 = machine_cpu_seconds()
    capacity = wall * (os.cpu_count() or 1)
    rss_mb = pids_peak_rss_kb(pids) / 1024
    lat = sorted(raw.latencies_ns)
    calls = len(lat)
    per_1k = 1000 / calls if calls else math.nan
    result = RoundResult(
        target=label,
        round=round_no,
        calls=calls,
        errors=raw.errors,
        elapsed_s=raw.elapsed_s,
        calls_per_s=calls / raw.elapsed_s if raw.elapsed_s > 0 else math.nan,
        p50_ms=percentile(lat, 0.50) / 1e6,
        p90_ms=percentile(lat, 0.90) / 1e6,
        p99_ms=percentile(lat, 0.99) / 1e6,
        server_cpu_s_per_1k=(srv1 - srv0) * per_1k,
        client_cpu_s_per_1k=(cli1 - cli0) * per_1k,
        server_peak_rss_mb=rss_mb,
        server_cpu_s=srv1 - srv0,
        client_cpu_s=cli1 - cli0,
        offpath_cpu_s=off1 - off0,
        offpath_rss_mb=pids_peak_rss_kb(offpath) / 1024,
        offpath=", ".join(proc_name(pid) for pid in offpath),
        other_cpu_pct=max(0.0, 100 * ((busy1 - busy0) - (srv1 - srv0) - (cli1 - cli0)) / capacity),
        steal_pct=100 * (steal1 - steal0) / capacity,
        first_error=raw.first_error,
    )
    if isinstance(workload, OpenLoop):
        slack_ns = workload.slack_ms * 1e6
        result.scheduled = max(1, round(workload.rate * workload.seconds(timing)))
        result.missed = sum(1 for lag in raw.lags_ns if lag > slack_ns)
        lags = sorted(raw.lags_ns)
        result.send_lag_p50_ms = percentile(lags, 0.50) / 1e6
        result.send_lag_p99_ms = percentile(lags, 0.99) / 1e6
    return result


async def _check_echo(name: str, target: Target, payload: bytes) -> None:
    """Fail loudly if an echo target does not echo: it would be measuring something else."""
    if not target.echoes:
        return
    body = await target.call(payload)
    if json.loads(body) != json.loads(payload):
        raise RuntimeError(f"target {name} did not echo the payload: {body[:200]!r}")


async def run_workload(
    scenario: str,
    workload: Workload,
    targets: Mapping[str, Target],
    timing: Timing,
    payload: bytes,
    progress: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """Warm every target up, then interleave ``timing.rounds`` rounds across them.

    The order rotates each round (A B C, B C A, C A B, ...) so that no target always
    runs right after the same neighbour. Peak RSS is reset after warm-up.
    """
    names = list(targets)
    label = workload.label(timing)
    warm = (
        ClosedLoop(workload.concurrency, duration_s=timing.warmup_s)
        if isinstance(workload, ClosedLoop)
        else ClosedLoop(1, duration_s=timing.warmup_s)
    )
    for name in names:
        await _check_echo(name, targets[name], payload)
        await _measure(name, targets[name], warm, timing, payload, 0)
    rss_reset = all(reset_peak_rss(pid) for t in targets.values() for pid in t.server_pids())
    per_target: dict[str, list[RoundResult]] = {name: [] for name in names}
    for r in range(timing.rounds):
        if progress is not None:
            progress(f"{scenario} · {label} · round {r + 1}/{timing.rounds}")
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            per_target[name].append(
                await _measure(name, targets[name], workload, timing, payload, r + 1)
            )
    summaries = {
        name: summarize(name, rounds, workload.primary) for name, rounds in per_target.items()
    }
    return WorkloadResult(scenario, workload, label, summaries, rss_reset)


async def run_suite(
    scenarios: Sequence[Scenario],
    factories: Mapping[str, TargetFactory],
    *,
    timing: Timing,
    payload: bytes,
    console: Console,
    progress: Callable[[str], None] | None = None,
    measurements: Sequence[Measurement] = (),
) -> dict[str, Any]:
    """Start every target the scenarios need once, run them all, stop every target; then
    run the measurements (with every target stopped, so that they have the machine).

    Targets are shared by the scenarios (starting servers is the slow part). They are
    stopped in ``finally``, whatever happens; the children also carry a parent-death
    signal, so even a SIGKILL of this process leaves no server behind. A measurement that
    fails is reported (``"error"`` in its JSON entry) and the others still run.
    """
    wanted: list[str] = []
    for sc in scenarios:
        for name in sc.targets if sc.targets is not None else factories:
            if name not in factories:
                raise KeyError(f"scenario {sc.name}: unknown target {name!r}")
            if name not in wanted:
                wanted.append(name)
    ordered = [name for name in factories if name in wanted]
    targets: dict[str, Target] = {}
    checks: list[GoalCheck] = []
    try:
        for name in ordered:
            targets[name] = factories[name]()
        if progress is not None and ordered:
            progress(f"starting {', '.join(ordered)}")
        outcomes = await asyncio.gather(
            *(t.start() for t in targets.values()), return_exceptions=True
        )
        for name, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"target {name} failed to start: {outcome}") from outcome
        info = machine_info()
        render_header(console, info, targets, timing, payload)
        results: list[WorkloadResult] = []
        for sc in scenarios:
            names = sc.targets if sc.targets is not None else ordered
            subset = {name: targets[name] for name in ordered if name in names}
            console.print(f"[bold]{sc.name}[/bold] — {sc.title}")
            first = len(results)
            for wl in sc.workloads:
                res = await run_workload(sc.name, wl, subset, timing, payload, progress)
                results.append(res)
                render_workload(console, res, sc.baselines)
            own = check_workload_goals(sc, results[first:])
            render_goals(console, sc.name, own)
            checks += own
        report = report_json(
            info, timing, payload, targets, results, {sc.name: sc.baselines for sc in scenarios}
        )
    finally:
        for name, target in targets.items():
            try:
                await target.stop()
            except Exception as exc:  # keep stopping the others
                console.print(f"stopping {name} failed: {exc!r}", style="red", markup=False)
    measured: dict[str, Any] = {}
    for m in measurements:
        console.print(f"[bold]{m.name}[/bold] — {m.title}")
        if progress is not None:
            progress(f"{m.name} · {m.title}")
        try:
            result = await m.run(timing)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            console.print(f"{m.name} failed: {error}", style="red", markup=False)
            measured[m.name] = {"title": m.title, "error": error}
            checks += [GoalCheck(m.name, g, math.nan, missing="failed") for g in m.goals]
            continue
        render_measurement(console, m, result)
        own = check_measurement_goals(m, result)
        render_goals(console, m.name, own)
        checks += own
        measured[m.name] = {"title": m.title, "result": result}
    report["measurements"] = jsonable(measured)
    report["goals"] = [
        jsonable(
            {
                "scenario": c.scenario,
                "goal": c.goal.text,
                **asdict(c.goal),
                "value": c.value,
                "detail": c.detail,
                "met": c.met,
                "missing": c.missing,
            }
        )
        for c in checks
    ]
    return report


def planned_seconds(scenarios: Sequence[Scenario], n_targets: int, timing: Timing) -> float:
    """Nominal measuring time of a run, to size a hard timeout that ends a stuck run."""
    total = 0.0
    for sc in scenarios:
        n = len(sc.targets) if sc.targets is not None else n_targets
        for wl in sc.workloads:
            total += n * (timing.warmup_s + timing.rounds * wl.seconds(timing))
    return total
