"""Run the agentmesh benchmarks: ``agentmesh bench [SCENARIO ...] [--quick] [--json FILE]``.

Also ``python bench/run.py ...`` in a checkout (same options). The registries below are the one
place to extend: a mesh target is one ``TARGETS`` entry (a zero-argument factory returning a
:class:`bench.targets.Target`), and every scenario whose ``targets`` name it then measures it
next to the baselines in the same interleaved run. ``SCENARIOS`` holds every scenario of the
issue with its goals: s1–s3 and s8 compare targets (ratios or differences of medians measured in
the same run), s4–s7 measure the registry and agent start-up (``registry.py``'s functions).
:func:`run_benchmarks` is what ``agentmesh bench`` calls; :func:`main` parses the same options
for the script.

This module imports its siblings relatively so that the suite works as ``bench`` in a checkout
and as ``agentmesh._bench`` in an installed wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: import the siblings as the ``bench`` package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from rich.console import Console

from . import registry
from .baselines import AiohttpRawAsgi, HttpxFastAPI, NatsRequestReply
from .harness import planned_seconds, run_suite
from .mesh_targets import MeshCall, TracedMeshCall, tracing_unavailable
from .scenarios import Goal, Measurement, Scenario
from .sidecar_targets import HttpxMeshCall, SidecarMeshCall
from .targets import TargetFactory
from .workloads import FULL, QUICK, ClosedLoop, OpenLoop, Timing, make_payload

__all__ = ["OPEN_LOOP_RATE", "SCENARIOS", "TARGETS", "main", "run_benchmarks", "scenario_help"]

TARGETS: dict[str, TargetFactory] = {
    "B0": AiohttpRawAsgi,
    "B1": HttpxFastAPI,
    "B2": NatsRequestReply,
    "M1": MeshCall,
    "M2": functools.partial(MeshCall, mtls=True),
    "M3": TracedMeshCall,
    "M4": SidecarMeshCall,
    "M5": HttpxMeshCall,
}
"""Every target, in table order. Add a mesh target with one line, e.g.
``TARGETS["M1"] = MeshCall`` (a :class:`bench.targets.Target` subclass)."""

TARGET_SUMMARY = (
    "B0 aiohttp → raw ASGI echo on uvicorn (floor for HTTP); B1 httpx → FastAPI + pydantic (no "
    "mesh); B2 nats-py request/reply (floor for NATS); M1 Mesh.call → agent, mTLS off; M2 M1 with "
    "mTLS; M3 M1 with every call traced (100 % sampling, spans exported over OTLP); M4 Mesh.call → "
    "`agentmesh sidecar` → app process (the out-of-process hop); M5 M1 through the httpx face "
    "(mesh.http)"
)
"""One line per target for ``--help`` (the tables' legend has the full descriptions)."""

OPEN_LOOP_RATE = 200.0
"""Modest on purpose: every target must sustain it with room to spare on 2 shared cores,
so the open-loop table shows latency at a realistic load, not saturation."""


def _sized(timing: Timing, quick: int, full: int) -> int:
    return quick if timing.quick else full


@contextlib.contextmanager
def _prints_to_stderr() -> Iterator[None]:
    """``registry.py`` prints its own summary lines: here they are progress, the table is on
    stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


async def _s4(timing: Timing) -> dict[str, Any]:
    with _prints_to_stderr():
        return registry.s4(10_000, _sized(timing, 20_000, 200_000))


async def _s5(timing: Timing) -> dict[str, Any]:
    with _prints_to_stderr():
        return await registry.s5(50, _sized(timing, 5, 20))


async def _s6(timing: Timing) -> dict[str, Any]:
    with _prints_to_stderr():
        return await registry.s6(10_000)


async def _s7(timing: Timing) -> dict[str, Any]:
    with _prints_to_stderr():
        return await registry.s7(_sized(timing, 3, 5))


SCENARIOS: dict[str, Scenario | Measurement] = {
    "s1": Scenario(
        name="s1",
        title="serial latency: 1 call in flight, then a fixed-rate open loop",
        workloads=(ClosedLoop(concurrency=1, primary="p50_ms"), OpenLoop(rate=OPEN_LOOP_RATE)),
        targets=("B0", "B1", "B2", "M1", "M3"),
        goals=(
            Goal("M1", "p50_ms", "≤", 0.6, "B1", "closed"),
            Goal("M1", "p50_ms", "≤", 1.5, "B0", "closed"),
            Goal("M1", "p99_ms", "≤", 1.5, "B0", "closed"),
            Goal("M1", "p99_ms", "≤", 1.5, "B0", "open"),
            Goal("M3", "p50_ms", "≤", 1.8, "B0", "closed"),
        ),
    ),
    "s2": Scenario(
        name="s2",
        title="throughput: 32 calls in flight",
        workloads=(ClosedLoop(concurrency=32, primary="calls_per_s"),),
        targets=("B0", "B1", "B2", "M1", "M2"),
        goals=(
            Goal("M1", "calls_per_s", "≥", 3, "B1", "closed"),
            Goal("M1", "calls_per_s", "≥", 0.7, "B0", "closed"),
        ),
    ),
    "s3": Scenario(
        name="s3",
        title="mTLS: serial latency, 1 call in flight, mesh with (M2) and without (M1) mTLS",
        workloads=(ClosedLoop(concurrency=1, primary="p50_ms"),),
        baselines=("B0", "M1"),
        targets=("B0", "M1", "M2"),
        goals=(Goal("M2", "p50_ms", "≤", 1.15, "M1", "closed"),),
    ),
    "s4": Measurement(
        name="s4",
        title="resolve from the local index, 10,000 registered agents (no I/O)",
        run=_s4,
        goals=(Goal("resolve", "p99_us", "<", 5), Goal("resolve + choose", "p99_us", "<", 5)),
    ),
    "s5": Measurement(
        name="s5",
        title="a registration, then its deregistration, seen by 50 watching sidecars",
        run=_s5,
        goals=(Goal("registration", "p99_ms", "<", 50), Goal("deregistration", "p99_ms", "<", 50)),
    ),
    "s6": Measurement(
        name="s6",
        title="a new sidecar's initial sync of 10,000 signed agent records (until it routes a "
        "call; and until every record is verified), and its memory",
        run=_s6,
        goals=(Goal("new sidecar", "sync_s", "<", 2), Goal("new sidecar", "peak_rss_mb", "<", 150)),
    ),
    "s7": Measurement(
        name="s7",
        title="agent process start → first successful call from another process",
        run=_s7,
        goals=(Goal("start → first call", "median_ms", "≤", 250),),
    ),
    "s8": Scenario(
        name="s8",
        title="the standalone sidecar's out-of-process hop (M4) and the httpx face (M5) against "
        "the in-process agent (M1)",
        workloads=(
            ClosedLoop(concurrency=1, primary="p50_ms"),
            ClosedLoop(concurrency=32, primary="calls_per_s"),
        ),
        baselines=("M1",),
        targets=("M1", "M4", "M5"),
        goals=(
            Goal("M4", "p50_ms", "≤", 0.5, "M1", "closed", in_flight=1, added=True),
            Goal("M4", "calls_per_s", "≥", 0.5, "M1", "closed", in_flight=32),
        ),
    ),
}
"""Every scenario of the issue with its goals, in run order: the target comparisons first
(their servers stay up across them), then the measurements (with the servers stopped)."""


def scenario_help() -> list[tuple[str, str, list[str]]]:
    """(name, title, goals) of every scenario, for ``agentmesh bench --help``."""
    out = []
    for name, sc in SCENARIOS.items():
        title = sc.title
        if isinstance(sc, Scenario) and sc.targets is not None:
            title += f" [{', '.join(sc.targets)}]"
        out.append((name, title, [g.text for g in sc.goals]))
    return out


_T = TypeVar("_T")


async def _stoppable(work: Awaitable[_T]) -> _T:
    """Await ``work``, cancelling it on SIGTERM so that ``finally`` blocks stop the servers.

    (asyncio.run already turns SIGINT into a cancellation; a CI job's timeout sends
    SIGTERM, whose default action would skip every ``finally``.)
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark agentmesh against baselines measured in the same run "
        "(the same as `agentmesh bench`).",
        epilog="Failover is measured apart, with its own processes and tables: "
        "`python bench/failover.py [--quick] [--rate R] [--duration S]` kills one of two agents "
        "under a constant-rate stream of mesh calls and reports failed calls, ejection and "
        "lease-expiry times, retries and latency. It is no SCENARIO here because it is not a "
        "comparison with baselines; its --quick takes < 20 s.",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"scenarios to run (default: all of {', '.join(SCENARIOS)})",
    )
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (CI; < 90 s)")
    p.add_argument("--rounds", type=int, help="rounds per workload (median is taken)")
    p.add_argument("--targets", help=f"comma-separated subset of {', '.join(TARGETS)}")
    p.add_argument("--payload-bytes", type=int, default=1024, help="JSON body size (default 1024)")
    p.add_argument("--rate", type=float, help=f"open-loop rate (default {OPEN_LOOP_RATE:g}/s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write all results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the script's options) and :func:`run_benchmarks`."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: report, do not exit the caller
        return exc.code if isinstance(exc.code, int) else 2
    return run_benchmarks(
        args.scenarios,
        quick=args.quick,
        rounds=args.rounds,
        targets=args.targets,
        payload_bytes=args.payload_bytes,
        rate=args.rate,
        json_path=args.json,
    )


def _usage_error(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def run_benchmarks(
    names: Sequence[str] = (),
    *,
    quick: bool = False,
    rounds: int | None = None,
    targets: str | None = None,
    payload_bytes: int = 1024,
    rate: float | None = None,
    json_path: Path | None = None,
) -> int:
    """Run the scenarios ``names`` (default: all) and print their tables and goals.

    Returns the exit status: 0, 1 if any call or measurement failed, 2 on usage errors,
    130/143 when interrupted. Missed goals are reported, not an error. A hard timeout
    (faulthandler) ends the process if a run is stuck far beyond its plan; the server
    children die with it through their parent-death signal.
    """
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        return _usage_error(
            f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    wanted_names = [n for n in SCENARIOS if not names or n in names]
    notes: list[str] = []
    factories = dict(TARGETS)
    if targets:
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        missing = [t for t in wanted if t not in TARGETS]
        if missing:
            return _usage_error(
                f"unknown target(s) {', '.join(missing)}; known: {', '.join(TARGETS)}"
            )
        factories = {name: TARGETS[name] for name in TARGETS if name in wanted}
    uses_m3 = any(
        isinstance(sc, Scenario) and (sc.targets is None or "M3" in sc.targets)
        for sc in (SCENARIOS[n] for n in wanted_names)
    )
    reason = tracing_unavailable() if uses_m3 and "M3" in factories else None
    if reason is not None:
        if targets:
            return _usage_error(reason)
        del factories["M3"]
        notes.append(f"M3 left out: {reason}")
    timing = QUICK if quick else FULL
    if rounds is not None:
        if rounds < 1:
            return _usage_error("--rounds must be at least 1")
        timing = dataclasses.replace(timing, rounds=rounds)
    try:
        payload = make_payload(payload_bytes)
    except ValueError as exc:
        return _usage_error(f"--payload-bytes: {exc}")
    scenarios: list[Scenario] = []
    for sc in (SCENARIOS[n] for n in wanted_names):
        if not isinstance(sc, Scenario):
            continue
        if sc.targets is not None:
            sc = dataclasses.replace(sc, targets=tuple(t for t in sc.targets if t in factories))
            if not sc.targets:
                notes.append(f"{sc.name} left out: none of its targets was selected")
                continue
        if rate is not None:
            sc = dataclasses.replace(
                sc,
                workloads=tuple(
                    dataclasses.replace(w, rate=rate) if isinstance(w, OpenLoop) else w
                    for w in sc.workloads
                ),
            )
        scenarios.append(sc)
    measurements = [sc for n in wanted_names if isinstance(sc := SCENARIOS[n], Measurement)]

    # Not a terminal (CI log, file): wide enough that no table wraps.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "180"))
    console = Console(width=width)
    err = Console(stderr=True, width=width)
    for note in notes:
        err.print(note, style="yellow", markup=False)
    hard_timeout = (
        120 + 3 * planned_seconds(scenarios, len(factories), timing) + 120 * len(measurements)
    )
    faulthandler.dump_traceback_later(hard_timeout, exit=True)
    t0 = time.monotonic()
    try:
        report: dict[str, Any] = asyncio.run(
            _stoppable(
                run_suite(
                    scenarios,
                    factories,
                    timing=timing,
                    payload=payload,
                    console=console,
                    progress=lambda msg: err.print(f"[dim]… {msg}[/dim]"),
                    measurements=measurements,
                )
            )
        )
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except asyncio.CancelledError:
        err.print("terminated")
        return 143
    except Exception as exc:
        err.print(f"benchmark failed: {exc}", style="red", markup=False)
        return 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    wall = time.monotonic() - t0
    report["wall_s"] = round(wall, 1)
    verdicts = [g["met"] for g in report["goals"]]
    console.print(
        f"goals: {verdicts.count(True)} met, {verdicts.count(False)} missed, "
        f"{verdicts.count(None)} not measured; wall time {wall:.1f} s"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    errors = sum(t["errors"] for r in report["results"] for t in r["targets"].values())
    failed = [name for name, m in report["measurements"].items() if "error" in m]
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
