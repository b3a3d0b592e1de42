"""Calls that survive failure: ``python bench/failover.py [--quick] [--rate R] [--duration S]``.

Two agent processes serve the idempotent ``echo`` capability (``bench/_echo_agent.py``) behind
an embedded nats-server; this process holds a client ``Mesh`` and sends a constant-rate open
loop of ``Mesh.invoke`` calls (send times on a fixed schedule, latency counted from the
scheduled time, the harness's ``open_loop``). After a steady period one of the two agents is
SIGKILLed, with no chance to drain or deregister, and the stream goes on. What it measures:

* calls sent, failed calls and the failed-call rate (goal: < 0.1 %);
* from the client side, how the dead instance is dropped: the client's sidecar state for the
  dead endpoint (``mesh.sidecar.outbound.endpoints.states[id]``: ``calls`` counts attempts
  sent to it, ``failures`` the failed ones, ``breaker.state``) is sampled every 10 ms, giving
  the first failed attempt, the passive ejection (breaker open; goal: < 1 s), the half-open
  probes sent while it stays dead, the last attempt, and when the lease expiry removes it from
  the client's registry index;
* retries spent (``mesh.sidecar.outbound.retry.retries``) and which instance served each call
  (``CallResult.instance_id``, ``CallResult.attempts``);
* p50/p99 latency before the kill, between the kill and the index update, and after it.

The agents run with ``AGENTMESH_HEARTBEAT_INTERVAL=0.5`` and ``AGENTMESH_LEASE_TTL=2`` unless
``--default-lease`` asks for the defaults (1 s / 3 s); the header says which. Exit status: 0,
1 if the failed-call rate misses its goal or the run broke, 2 on usage errors, 130/143 when
interrupted (every process is stopped either way).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich import box
from rich.console import Console
from rich.table import Table

import agentmesh
from bench.loops import open_loop
from bench.machine import machine_info
from bench.mesh_targets import CAPABILITY, MeshCall
from bench.results import percentile
from bench.run import _stoppable
from bench.workloads import make_payload

__all__ = ["FailoverConfig", "main", "run_failover"]

FAILED_RATE_GOAL = 0.001
"""Failed calls / calls sent: < 0.1 %."""
EJECTION_GOAL_S = 1.0
"""Kill → the client's breaker ejects the dead endpoint: < 1 s."""
SAMPLE_S = 0.010
"""How often the client's view of the dead endpoint is sampled."""
SHORT_LEASE = {"AGENTMESH_HEARTBEAT_INTERVAL": "0.5", "AGENTMESH_LEASE_TTL": "2"}
DEFAULT_LEASE = (1.0, 3)
"""``Settings`` defaults of heartbeat interval and lease TTL (seconds)."""


@dataclass(frozen=True)
class FailoverConfig:
    """One run: the open loop's rate and length, and when the victim dies."""

    rate: float = 200.0
    duration_s: float = 15.0
    kill_at_s: float = 5.0
    warmup_s: float = 0.5
    short_lease: bool = True
    payload_bytes: int = 1024
    drain_s: float = 10.0

    @property
    def lease(self) -> tuple[float, int]:
        """(heartbeat interval, lease TTL) of the agents, in seconds."""
        if self.short_lease:
            return (
                float(SHORT_LEASE["AGENTMESH_HEARTBEAT_INTERVAL"]),
                int(SHORT_LEASE["AGENTMESH_LEASE_TTL"]),
            )
        return DEFAULT_LEASE


@dataclass
class _Sample:
    t_ns: int
    calls: int
    failures: int
    state: str
    in_index: bool
    ejections: int = 0
    """The breaker's own count of ejections (each opening, re-openings after a failed probe
    included): exact, where counting "open" samples would miss a half-open phase shorter than
    the sampling interval."""


@dataclass
class _Call:
    slot_ns: int
    end_ns: int
    ok: bool
    instance_id: str = ""
    attempts: int = 0
    error: str = ""


@dataclass
class FailoverResult:
    """Everything one run measured; ``report`` turns it into JSON."""

    config: FailoverConfig
    victim: str
    survivor: str
    kill_ns: int = 0
    calls: list[_Call] = field(default_factory=list)
    samples: list[_Sample] = field(default_factory=list)
    retries_at_kill: int = 0
    retries_total: int = 0
    budget_refused: int = 0
    open_loop_missed: int = 0
    send_lag_p99_ms: float = math.nan


def _ms(ns: float) -> float:
    return ns / 1e6


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def run_failover(config: FailoverConfig, progress: Console) -> FailoverResult:
    """Start NATS and two agents, stream calls, kill one agent, stop everything."""
    target = MeshCall(replicas=2, agent_env=SHORT_LEASE if config.short_lease else {})
    try:
        progress.print("[dim]… starting nats-server, 2 agents and the client mesh[/dim]")
        await target.start()
        mesh = target.mesh
        assert mesh is not None
        payload = make_payload(config.payload_bytes)
        victim, survivor = target.agents[0], target.agents[1]
        result = FailoverResult(config, victim.instance_id, survivor.instance_id)

        # Warm-up: open keep-alive connections to both agents, as steady traffic would.
        warmed: set[str] = set()
        deadline = time.monotonic() + config.warmup_s
        while time.monotonic() < deadline or len(warmed) < 2:
            if time.monotonic() > deadline + 5:
                raise RuntimeError(f"warm-up reached only {sorted(warmed)}")
            served = await asyncio.gather(*(target.invoke(payload) for _ in range(2)))
            warmed.update(r.instance_id for r in served)
        outbound = mesh.sidecar.outbound
        index = mesh.sidecar.index
        states = outbound.endpoints.states
        perf = time.perf_counter_ns
        kill_ns = 0

        def on_done(slot_ns: int, end_ns: int, outcome: object) -> None:
            if isinstance(outcome, agentmesh.CallResult):
                result.calls.append(
                    _Call(slot_ns, end_ns, True, outcome.instance_id, outcome.attempts)
                )
            else:
                error = _describe(outcome) if isinstance(outcome, BaseException) else "?"
                result.calls.append(_Call(slot_ns, end_ns, False, error=error))

        def sample() -> None:
            state = states.get(victim.instance_id)
            in_index = any(t.instance_id == victim.instance_id for t in index.targets(CAPABILITY))
            if state is None:  # pruned once it left the index: keep the last counts
                last = result.samples[-1] if result.samples else None
                result.samples.append(
                    _Sample(
                        perf(),
                        last.calls if last else 0,
                        last.failures if last else 0,
                        "gone",
                        in_index,
                        last.ejections if last else 0,
                    )
                )
            else:
                breaker = state.breaker
                result.samples.append(
                    _Sample(
                        perf(),
                        state.calls,
                        state.failures,
                        breaker.state,
                        in_index,
                        breaker.ejections,
                    )
                )

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(SAMPLE_S)

        async def killer(start_ns: int) -> None:
            nonlocal kill_ns
            await asyncio.sleep(max(0.0, config.kill_at_s - _ms(perf() - start_ns) / 1000))
            result.retries_at_kill = outbound.retry.retries
            sample()
            os.kill(victim.pid, signal.SIGKILL)
            kill_ns = perf()
            result.kill_ns = kill_ns
            sample()
            progress.print(f"[dim]… SIGKILL {victim.instance_id} (pid {victim.pid})[/dim]")

        progress.print(
            f"[dim]… open loop {config.rate:g} calls/s for {config.duration_s:g} s, "
            f"kill at {config.kill_at_s:g} s[/dim]"
        )
        start_ns = perf()
        sampling = asyncio.create_task(sampler())
        killing = asyncio.create_task(killer(start_ns))
        try:
            raw = await open_loop(
                target.invoke, payload, config.rate, config.duration_s, config.drain_s, on_done
            )
            await killing
        finally:
            for task in (sampling, killing):
                task.cancel()
            await asyncio.gather(sampling, killing, return_exceptions=True)
        sample()
        result.retries_total = outbound.retry.retries
        budget = outbound.retry.budgets.get(CAPABILITY)
        result.budget_refused = budget.refused if budget is not None else 0
        slack_ns = 1_000_000
        result.open_loop_missed = sum(1 for lag in raw.lags_ns if lag > slack_ns)
        result.send_lag_p99_ms = _ms(percentile(sorted(raw.lags_ns), 0.99))
        # Calls still in flight after the drain are errors the open loop counted itself.
        stuck = raw.errors - sum(1 for c in result.calls if not c.ok)
        for _ in range(max(0, stuck)):
            result.calls.append(_Call(0, 0, False, error="still in flight after drain"))
        return result
    finally:
        await target.stop()


# --------------------------------------------------------------------------- analysis


@dataclass
class _Window:
    name: str
    calls: int
    failed: int
    retried: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def _window(name: str, calls: Sequence[_Call]) -> _Window:
    lat = sorted(c.end_ns - c.slot_ns for c in calls if c.ok)
    return _Window(
        name=name,
        calls=len(calls),
        failed=sum(1 for c in calls if not c.ok),
        retried=sum(1 for c in calls if c.attempts > 1),
        p50_ms=_ms(percentile(lat, 0.50)),
        p90_ms=_ms(percentile(lat, 0.90)),
        p99_ms=_ms(percentile(lat, 0.99)),
        max_ms=_ms(lat[-1]) if lat else math.nan,
    )


def analyse(result: FailoverResult) -> dict[str, Any]:
    """Reduce the per-call records and the 10 ms samples to the reported numbers."""
    kill = result.kill_ns
    after = [s for s in result.samples if s.t_ns >= kill]
    at_kill = next((s for s in reversed(result.samples) if s.t_ns <= kill), None)
    base_calls = at_kill.calls if at_kill else 0
    base_failures = at_kill.failures if at_kill else 0

    def first(pred: Callable[[_Sample], bool]) -> _Sample | None:
        return next((s for s in after if pred(s)), None)

    first_failure = first(lambda s: s.failures > base_failures)
    ejected = first(lambda s: s.state == "open")
    left_index = first(lambda s: not s.in_index)
    final = after[-1] if after else None
    final_calls = final.calls if final else base_calls
    last_attempt = first(lambda s: s.calls == final_calls) if final_calls > base_calls else None
    to_dead = final_calls - base_calls
    before_ejection = (ejected.calls - base_calls) if ejected else to_dead
    probes = to_dead - before_ejection
    opened = (final.ejections if final else 0) - (at_kill.ejections if at_kill else 0)

    def since_kill(s: _Sample | None) -> float:
        return _ms(s.t_ns - kill) if s is not None else math.nan

    calls = result.calls
    index_ns = left_index.t_ns if left_index else math.inf
    windows = [
        _window("before kill", [c for c in calls if 0 < c.end_ns < kill]),
        _window(
            "kill → index update", [c for c in calls if c.end_ns >= kill and c.slot_ns < index_ns]
        ),
        _window("after index update", [c for c in calls if c.slot_ns >= index_ns]),
        _window("all after kill", [c for c in calls if c.end_ns >= kill]),
    ]
    failed = [c for c in calls if not c.ok]
    errors: dict[str, int] = {}
    for c in failed:
        errors[c.error] = errors.get(c.error, 0) + 1
    served_before: dict[str, int] = {}
    served_after: dict[str, int] = {}
    for c in calls:
        if c.ok:
            served = served_before if c.end_ns < kill else served_after
            served[c.instance_id] = served.get(c.instance_id, 0) + 1
    heartbeat, ttl = result.config.lease
    return {
        "victim": result.victim,
        "survivor": result.survivor,
        "lease": {"heartbeat_interval_s": heartbeat, "ttl_s": ttl},
        "calls_sent": len(calls),
        "failed_calls": len(failed),
        "failed_rate": len(failed) / len(calls) if calls else math.nan,
        "failed_rate_goal": FAILED_RATE_GOAL,
        "errors": errors,
        "retries_total": result.retries_total,
        "retries_after_kill": result.retries_total - result.retries_at_kill,
        "retry_budget_refused": result.budget_refused,
        "attempts_to_dead_after_kill": to_dead,
        "failed_attempts_to_dead_after_kill": (final.failures if final else 0) - base_failures,
        "attempts_to_dead_before_ejection": before_ejection,
        "half_open_probes_to_dead": probes,
        "ejections": opened,
        "first_failure_ms": since_kill(first_failure),
        "ejected_ms": since_kill(ejected),
        "ejection_goal_ms": EJECTION_GOAL_S * 1000,
        "last_attempt_to_dead_ms": since_kill(last_attempt),
        "left_index_ms": since_kill(left_index),
        "sample_interval_ms": SAMPLE_S * 1000,
        "served_before_kill": served_before,
        "served_after_kill": served_after,
        "open_loop_missed": result.open_loop_missed,
        "send_lag_p99_ms": result.send_lag_p99_ms,
        "windows": [asdict(w) for w in windows],
    }


# --------------------------------------------------------------------------- report


def _fmt_ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:,.0f} ms"


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "—"
    return f"{value / base:.2f}×"


def render(console: Console, config: FailoverConfig, out: dict[str, Any]) -> None:
    """Print the summary and the latency windows."""
    heartbeat, ttl = config.lease
    which = "set short for this run" if config.short_lease else "agentmesh defaults"
    console.print(
        f"[bold]failover[/bold] — 2 agents, SIGKILL one at {config.kill_at_s:g} s of a "
        f"{config.duration_s:g} s open loop at {config.rate:g} calls/s; lease: heartbeat "
        f"{heartbeat:g} s, TTL {ttl} s ({which}); client defaults (retry 3 attempts, breaker "
        f"5 consecutive failures, base ejection 1 s)"
    )
    rate = out["failed_rate"]
    ok_rate = not math.isnan(rate) and rate < FAILED_RATE_GOAL
    ejected = out["ejected_ms"]
    ok_eject = not math.isnan(ejected) and ejected < EJECTION_GOAL_S * 1000
    summary = Table(
        box=box.SIMPLE_HEAD, title="failover · what the client saw", title_justify="left"
    )
    summary.add_column("measure", style="bold")
    summary.add_column("value", justify="right")
    summary.add_column("goal / note")
    verdict = "[green]met[/green]" if ok_rate else "[red]missed[/red]"
    summary.add_row("calls sent", f"{out['calls_sent']:,}", "")
    summary.add_row(
        "failed calls",
        f"{out['failed_calls']} ({100 * rate:.3f} %)" if not math.isnan(rate) else "—",
        f"< {100 * FAILED_RATE_GOAL:g} %: {verdict}",
    )
    summary.add_row(
        "retries spent",
        f"{out['retries_total']} ({out['retries_after_kill']} after the kill)",
        f"budget refused {out['retry_budget_refused']}",
    )
    summary.add_row(
        "attempts to the dead agent",
        f"{out['attempts_to_dead_after_kill']} sent, "
        f"{out['failed_attempts_to_dead_after_kill']} failed",
        f"{out['attempts_to_dead_before_ejection']} sent before ejection, "
        f"{out['half_open_probes_to_dead']} half-open probes after; failures include "
        "attempts in flight at the kill",
    )
    summary.add_row("first failed attempt", _fmt_ms(out["first_failure_ms"]), "after the kill")
    verdict = "[green]met[/green]" if ok_eject else "[red]missed[/red]"
    summary.add_row(
        "passive ejection (breaker open)",
        _fmt_ms(ejected),
        f"< {EJECTION_GOAL_S * 1000:.0f} ms: {verdict}; ejections {out['ejections']}",
    )
    summary.add_row(
        "last attempt to the dead agent",
        _fmt_ms(out["last_attempt_to_dead_ms"]),
        "probes included",
    )
    summary.add_row(
        "left the registry index",
        _fmt_ms(out["left_index_ms"]),
        f"lease expiry (TTL {ttl} s) seen by the client's watch",
    )
    before = out["served_before_kill"]
    after = out["served_after_kill"]

    def share(counts: dict[str, int]) -> str:
        total = sum(counts.values()) or 1
        return ", ".join(f"{k}: {100 * v / total:.0f} %" for k, v in sorted(counts.items()))

    summary.add_row("served before the kill", share(before), f"victim {out['victim']}")
    summary.add_row("served after the kill", share(after), "")
    summary.add_row(
        "open loop",
        f"{out['open_loop_missed']} sends > 1 ms late",
        f"send lag p99 {out['send_lag_p99_ms']:.3f} ms",
    )
    summary.caption = (
        f"times are from the SIGKILL, read from the client's sidecar state sampled every "
        f"{out['sample_interval_ms']:g} ms"
    )
    summary.caption_justify = "left"
    console.print(summary)

    lat = Table(box=box.SIMPLE_HEAD, title="failover · latency by window", title_justify="left")
    for head in ("window", "calls", "failed", "retried", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        lat.add_column(head, justify="left" if head == "window" else "right")
    lat.add_column("p50 vs before", justify="right")
    lat.add_column("p99 vs before", justify="right")
    base = out["windows"][0]
    for w in out["windows"]:
        lat.add_row(
            w["name"],
            f"{w['calls']:,}",
            str(w["failed"]),
            str(w["retried"]),
            *(_fmt(w[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
            _ratio(w["p50_ms"], base["p50_ms"]),
            _ratio(w["p99_ms"], base["p99_ms"]),
        )
    lat.caption = (
        'latency from the scheduled send time (open loop); "before kill": calls that ended '
        'before the SIGKILL; "kill → index update": calls that ended after it and were sent '
        "before the dead agent left the client's index; retried = served after more than one "
        "attempt"
    )
    lat.caption_justify = "left"
    console.print(lat)
    for error, count in out["errors"].items():
        console.print(f"[red]{count} × {error}[/red]")


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/failover.py",
        description="Kill one of two agents under a constant-rate stream of mesh calls; "
        "report failed calls, ejection and lease-expiry times, retries and latency.",
    )
    p.add_argument("--quick", action="store_true", help="8 s stream, kill at 3 s (CI; < 20 s)")
    p.add_argument("--rate", type=float, default=200.0, help="calls per second (default 200)")
    p.add_argument("--duration", type=float, help="stream length in s (default 15; --quick 8)")
    p.add_argument("--kill-at", type=float, help="SIGKILL after this many s (default: a third)")
    p.add_argument(
        "--default-lease",
        action="store_true",
        help="agents keep agentmesh's lease defaults (heartbeat 1 s, TTL 3 s) instead of 0.5/2",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return p


def _config(args: argparse.Namespace) -> FailoverConfig:
    duration = args.duration if args.duration is not None else (8.0 if args.quick else 15.0)
    default_kill = 3.0 if args.quick and args.duration is None else round(duration / 3, 1)
    kill_at = args.kill_at if args.kill_at is not None else default_kill
    if args.rate <= 0 or duration <= 0 or not 0 < kill_at < duration:
        raise ValueError("need --rate > 0, --duration > 0 and 0 < --kill-at < --duration")
    return FailoverConfig(
        rate=args.rate,
        duration_s=duration,
        kill_at_s=kill_at,
        short_lease=not args.default_lease,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run once, print the tables; see the module docstring for exit codes."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = _config(args)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
    console = Console(width=width)
    err = Console(stderr=True, width=width)
    faulthandler.dump_traceback_later(90 + 3 * config.duration_s, exit=True)
    t0 = time.monotonic()
    try:
        info = machine_info()
        result = asyncio.run(_stoppable(run_failover(config, err)))
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except asyncio.CancelledError:
        err.print("terminated")
        return 143
    except Exception as exc:
        err.print(f"[red]failover benchmark failed: {exc}[/red]")
        return 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    out = analyse(result)
    console.print(
        f"[dim]{info['cpu_model']}, {info['cpus']} CPUs, load "
        f"{'/'.join(str(x) for x in info['loadavg_1_5_15'])}, {info['python']}, "
        f"nats-server {info['nats_server']}; agentmesh {info['agentmesh']}[/dim]"
    )
    render(console, config, out)
    wall = time.monotonic() - t0
    console.print(f"wall time {wall:.1f} s")
    if args.json is not None:
        doc = {"machine": info, "config": asdict(config), "wall_s": round(wall, 1), **out}
        args.json.write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
        console.print(f"wrote {args.json}")
    rate = out["failed_rate"]
    return 0 if not math.isnan(rate) and rate < FAILED_RATE_GOAL else 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
