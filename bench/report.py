"""The run on the console: the machine and legend, a table per workload (absolute numbers and
ratios to the baselines), the goals met or missed, and the measurements' rows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Final

from rich import box
from rich.console import Console
from rich.table import Table

from .results import WorkloadResult
from .scenarios import GoalCheck, Measurement, fmt, metric_label
from .targets import Target
from .workloads import Metric, OpenLoop, Timing

__all__ = ["render_goals", "render_header", "render_measurement", "render_workload"]


_LATENCY_COLS: Final[tuple[tuple[str, Metric], ...]] = (
    ("p50 ms", "p50_ms"),
    ("p90 ms", "p90_ms"),
    ("p99 ms", "p99_ms"),
)


def _ratio(value: float, base: float, metric: Metric) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "—"
    text = f"{value / base:.2f}×"
    if metric.endswith("_ms"):
        text += f" {value - base:+.3f}ms"
    return text


def render_header(
    console: Console,
    info: Mapping[str, Any],
    targets: Mapping[str, Target],
    timing: Timing,
    payload: bytes,
) -> None:
    """Print the machine, the run's parameters and a legend of the targets."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row(
        "machine",
        f"{info['cpu_model']}, {info['cpus']} CPUs "
        f"({info['cpus_usable']} usable), kernel {info['kernel']}, "
        f"load {'/'.join(str(x) for x in info['loadavg_1_5_15'])}",
    )
    grid.add_row("python", f"{info['python']}, client loop {info['client_loop']}")
    grid.add_row("packages", ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    grid.add_row("nats-server", str(info["nats_server"]))
    grid.add_row("agentmesh", str(info["agentmesh"]))
    grid.add_row("servers", f"uvicorn loop {info['server_loop']}, http {info['server_http']}")
    if targets:
        grid.add_row(
            "method",
            f"{timing.rounds} interleaved rounds after {timing.warmup_s:g} s warm-up, "
            f"median of rounds; payload {len(payload)} B JSON",
        )
    for name, target in targets.items():
        extra = ", ".join(f"{k}={v}" for k, v in target.details().items())
        grid.add_row(name, target.description + (f" [dim]({extra})[/dim]" if extra else ""))
    console.print(grid)
    console.print()


def render_workload(console: Console, result: WorkloadResult, baselines: Sequence[str]) -> None:
    """Print one workload's table: absolute numbers, then the primary metric vs baselines."""
    wl = result.workload
    primary = wl.primary
    is_open = isinstance(wl, OpenLoop)
    table = Table(
        title=f"[bold]{result.scenario}[/bold] · {result.label}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    table.add_column("target", style="bold")
    table.add_column("calls/s", justify="right")
    for head, _ in _LATENCY_COLS:
        table.add_column(head, justify="right")
    table.add_column("±", justify="right")
    if is_open:
        table.add_column("missed", justify="right")
        table.add_column("lag p50/p99", justify="right")
    table.add_column("srv CPU s/1k", justify="right")
    table.add_column("cli CPU s/1k", justify="right")
    table.add_column("srv RSS MB", justify="right")
    table.add_column("err", justify="right")
    present = [b for b in baselines if b in result.summaries]
    short = primary.removesuffix("_ms").replace("calls_per_s", "calls/s")
    for base in present:
        table.add_column(f"{short} vs {base}", justify="right", no_wrap=True)
    for name, s in result.summaries.items():
        m = s.median
        row = [
            name,
            fmt(m["calls_per_s"], 0),
            *(fmt(m[metric], 3) for _, metric in _LATENCY_COLS),
            "—" if math.isnan(s.spread) else f"{100 * s.spread:.0f}%",
        ]
        if is_open:
            row.append(f"{s.missed}/{s.scheduled}")
            row.append(f"{fmt(m['send_lag_p50_ms'], 3)}/{fmt(m['send_lag_p99_ms'], 3)}")
        row += [
            fmt(m["server_cpu_s_per_1k"], 3),
            fmt(m["client_cpu_s_per_1k"], 3),
            fmt(m["server_peak_rss_mb"], 1),
            str(s.errors) if not s.errors else f"[red]{s.errors}[/red]",
        ]
        row += [_ratio(m[primary], result.summaries[b].median[primary], primary) for b in present]
        table.add_row(*row)
    notes = [f"± = (max-min)/median of {short} over rounds"]
    if is_open:
        assert isinstance(wl, OpenLoop)
        notes.append(
            "latency from the scheduled send time; lag = ms the send started after its slot"
            f" (harness + client); missed = lag > {wl.slack_ms:g} ms"
        )
    notes.append("CPU = user+sys s per 1000 calls, pooled over rounds")
    notes.append(
        "RSS = peak (VmHWM) of server processes"
        + (" since warm-up" if result.rss_reset else " since process start")
    )
    for name, s in result.summaries.items():
        if s.calls and any(r.offpath_rss_mb for r in s.rounds):
            off_cpu = 1000 * sum(r.offpath_cpu_s for r in s.rounds) / s.calls
            off_rss = statistics.median(r.offpath_rss_mb for r in s.rounds)
            notes.append(
                f"{name}'s srv columns include processes off the request path"
                f" ({s.rounds[0].offpath}): {off_cpu:.3f} s/1k CPU,"
                f" {off_rss:.1f} MB RSS"
            )
    others = [r.other_cpu_pct for s in result.summaries.values() for r in s.rounds]
    steals = [r.steal_pct for s in result.summaries.values() for r in s.rounds]
    others = [x for x in others if not math.isnan(x)]
    steals = [x for x in steals if not math.isnan(x)]
    if others:
        notes.append(
            f"outside load during rounds: other processes median {statistics.median(others):.0f}%"
            f" max {max(others):.0f}% of all CPUs, steal max {max(steals, default=0):.0f}%"
        )
    table.caption = "; ".join(notes)
    table.caption_justify = "left"
    console.print(table)
    for name, s in result.summaries.items():
        if s.first_error:
            text = f"{name}: {s.errors} errors, first: {s.first_error}"
            console.print(text, style="red", markup=False)


def _fmt_auto(value: Any) -> str:
    """A measured value with as many digits as its size deserves (lists joined)."""
    if isinstance(value, list | tuple):
        return ", ".join(_fmt_auto(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "—"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def render_goals(console: Console, scenario: str, checks: Sequence[GoalCheck]) -> None:
    """Print a scenario's goals: each with the measured value (or ratio) and met / missed."""
    if not checks:
        return
    table = Table(
        title=f"[bold]{scenario}[/bold] · goals", box=box.SIMPLE_HEAD, title_justify="left"
    )
    table.add_column("goal")
    table.add_column("measured", justify="right")
    table.add_column("verdict")
    for check in checks:
        goal = check.goal
        if check.met is None:
            measured = "—"
            verdict = f"[yellow]not measured[/yellow] ({check.missing or 'no value'})"
        else:
            if goal.reference is None:
                measured = f"{_fmt_auto(check.value)} {metric_label(goal.metric)[1]}".rstrip()
            elif goal.added:
                unit = metric_label(goal.metric)[1]
                measured = f"{check.value:+.3f} {unit} ({check.detail})"
            else:
                measured = f"{check.value:.2f}× ({check.detail})"
            verdict = "[green]✓ met[/green]" if check.met else "[red]✗ missed[/red]"
        table.add_row(goal.text, measured, verdict)
    console.print(table)


def render_measurement(console: Console, m: Measurement, result: Mapping[str, Any]) -> None:
    """Print a measurement's rows (nested dicts of ``result``) with its parameters as title."""
    rows = {label: row for label, row in result.items() if isinstance(row, Mapping)}
    params = ", ".join(
        " ".join(filter(None, (words, _fmt_auto(value), unit)))
        for key, value in result.items()
        if key not in rows
        for words, unit in [metric_label(key)]
    )
    console.print(f"[bold]{m.name}[/bold] · {params}")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("")
    metrics = list(dict.fromkeys(metric for row in rows.values() for metric in row))
    for metric in metrics:
        words, unit = metric_label(metric)
        table.add_column(f"{words} {unit}".rstrip(), justify="right")
    for label, row in rows.items():
        table.add_row(label, *(_fmt_auto(row.get(metric, math.nan)) for metric in metrics))
    console.print(table)
