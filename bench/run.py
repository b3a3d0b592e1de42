"""Run the agentmesh benchmarks: ``python bench/run.py [SCENARIO ...] [--quick] [--json FILE]``.

The registries below are the one place to extend: a mesh target is one ``TARGETS``
entry (a zero-argument factory returning a :class:`bench.harness.Target`), and every
scenario then measures it next to the baselines in the same interleaved run, with
ratios against ``B0`` and ``B1``. ``main`` is what ``agentmesh bench`` calls.
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
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console

from bench.baselines import AiohttpRawAsgi, HttpxFastAPI, NatsRequestReply
from bench.harness import (
    FULL,
    QUICK,
    ClosedLoop,
    OpenLoop,
    Scenario,
    TargetFactory,
    make_payload,
    planned_seconds,
    run_suite,
)
from bench.mesh_targets import MeshCall

__all__ = ["OPEN_LOOP_RATE", "SCENARIOS", "TARGETS", "main"]

TARGETS: dict[str, TargetFactory] = {
    "B0": AiohttpRawAsgi,
    "B1": HttpxFastAPI,
    "B2": NatsRequestReply,
    "M1": MeshCall,
    "M2": functools.partial(MeshCall, mtls=True),
}
"""Every target, in table order. Add a mesh target with one line, e.g.
``TARGETS["M1"] = MeshCall`` (a :class:`bench.harness.Target` subclass)."""

OPEN_LOOP_RATE = 200.0
"""Modest on purpose: every target must sustain it with room to spare on 2 shared cores,
so the open-loop table shows latency at a realistic load, not saturation."""

SCENARIOS: dict[str, Scenario] = {
    "s1": Scenario(
        name="s1",
        title="serial latency: 1 call in flight, then a fixed-rate open loop",
        workloads=(ClosedLoop(concurrency=1, primary="p50_ms"), OpenLoop(rate=OPEN_LOOP_RATE)),
    ),
    "s2": Scenario(
        name="s2",
        title="throughput: 32 calls in flight",
        workloads=(ClosedLoop(concurrency=32, primary="calls_per_s"),),
    ),
}
"""Scenarios by name; ``targets=None`` means every entry of ``TARGETS``."""


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
        description="Benchmark agentmesh targets against the B0/B1/B2 baselines.",
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
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (CI; < 60 s)")
    p.add_argument("--rounds", type=int, help="rounds per workload (median is taken)")
    p.add_argument("--targets", help=f"comma-separated subset of {', '.join(TARGETS)}")
    p.add_argument("--payload-bytes", type=int, default=1024, help="JSON body size (default 1024)")
    p.add_argument("--rate", type=float, help=f"open-loop rate (default {OPEN_LOOP_RATE:g}/s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write all results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the scenarios, print the tables; 0 on success, 1 on errors.

    A hard timeout (faulthandler) ends the process if a run is stuck far beyond its
    plan; the server children die with it through their parent-death signal.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: report, do not exit the caller
        return exc.code if isinstance(exc.code, int) else 2
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    factories = dict(TARGETS)
    if args.targets:
        wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
        missing = [t for t in wanted if t not in TARGETS]
        if missing:
            print(
                f"unknown target(s) {', '.join(missing)}; known: {', '.join(TARGETS)}",
                file=sys.stderr,
            )
            return 2
        factories = {name: TARGETS[name] for name in TARGETS if name in wanted}
    timing = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            print("--rounds must be at least 1", file=sys.stderr)
            return 2
        timing = dataclasses.replace(timing, rounds=args.rounds)
    scenarios = [
        sc
        if sc.targets is None
        else dataclasses.replace(sc, targets=tuple(t for t in sc.targets if t in factories))
        for sc in (SCENARIOS[n] for n in names)
    ]
    if args.rate is not None:
        scenarios = [
            dataclasses.replace(
                sc,
                workloads=tuple(
                    dataclasses.replace(w, rate=args.rate) if isinstance(w, OpenLoop) else w
                    for w in sc.workloads
                ),
            )
            for sc in scenarios
        ]
    payload = make_payload(args.payload_bytes)

    # Not a terminal (CI log, file): wide enough that no table wraps.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "180"))
    console = Console(width=width)
    err = Console(stderr=True, width=width)
    hard_timeout = 120 + 3 * planned_seconds(scenarios, len(factories), timing)
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
        err.print(f"[red]benchmark failed: {exc}[/red]")
        return 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    wall = time.monotonic() - t0
    report["wall_s"] = round(wall, 1)
    console.print(f"wall time {wall:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    errors = sum(t["errors"] for r in report["results"] for t in r["targets"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
