"""``agentmesh stat`` and ``top``: golden metrics of agents, capabilities and edges.

Both read ``GET /v1/stats`` of the control plane: the numbers merged from every sidecar's
reports, like linkerd viz stat and top."""

from __future__ import annotations

import enum
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ConfigDict, TypeAdapter
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agentmesh.cli._common import (
    ControlUrl,
    Output,
    OutputOpt,
    console,
    millis,
    print_json,
    settings_from,
)
from agentmesh.cli.query import _get
from agentmesh.errors import MeshError
from agentmesh.models import (
    StatRow,
)
from agentmesh.settings import Settings

if TYPE_CHECKING:
    pass

__all__ = ["register", "stat", "top"]

#: Built on first use (defer_build), not when every other command starts.
_ROWS = TypeAdapter(list[StatRow], config=ConfigDict(defer_build=True))


def register(app: typer.Typer) -> None:
    app.command("stat")(stat)
    app.command("top")(top)


class StatGroupArg(enum.StrEnum):
    agents = "agents"
    capabilities = "capabilities"
    edges = "edges"


def _stats(settings: Settings, group: str, window: float) -> list[StatRow]:
    return _ROWS.validate_json(_get(settings, "/v1/stats", {"group": group, "window": window}))


def _success(rate: float | None) -> str:
    if rate is None:
        return "-"
    colour = "green" if rate >= 0.99 else "yellow" if rate >= 0.9 else "red"
    return f"[{colour}]{rate * 100:.2f}%[/]"


def _rps(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _stat_table(rows: list[StatRow], title: str, first: str = "NAME") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for column in ("REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            escape(r.name),
            str(r.requests),
            _rps(r.rps),
            _success(r.success_rate),
            millis(r.p50_ms),
            millis(r.p95_ms),
            millis(r.p99_ms),
        )
    return table


def stat(
    group: Annotated[
        StatGroupArg,
        typer.Argument(
            help="agents: what each agent served; capabilities: what callers asked for; "
            "edges: calls per caller -> callee."
        ),
    ] = StatGroupArg.agents,
    window: Annotated[
        float, typer.Option(min=1, max=300, help="Seconds to look back (1-300).")
    ] = 60.0,
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Golden metrics: requests, rate, success rate and latency percentiles (like linkerd viz stat).

    Numbers come from every sidecar's reports (sent every 2 s) merged by the control plane.
    """
    settings = settings_from(control_url=control_url)
    rows = _stats(settings, group.value, window)
    if output is Output.json:
        print_json(rows)
        return
    if not rows:
        console.print(
            f"no calls in the last {window:g}s (sidecars report every few seconds; "
            f"try `agentmesh stat {group.value} --window 300`)"
        )
        return
    covered = rows[0].window
    console.print(_stat_table(rows, f"{len(rows)} {group.value} · last {covered:.0f}s"))


def top(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    window: Annotated[
        float, typer.Option(min=1, max=300, help="Seconds each refresh looks back.")
    ] = 10.0,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 20,
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit (for scripts).")] = False,
    control_url: ControlUrl = None,
) -> None:
    """A live view of the busiest capabilities, refreshed until Ctrl-C."""
    settings = settings_from(control_url=control_url)
    if once:
        console.print(_top_view(settings, window, limit, fail=True))
        return
    from rich.live import Live

    with Live(_top_view(settings, window, limit), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(_top_view(settings, window, limit), refresh=True)


def _top_view(settings: Settings, window: float, limit: int, *, fail: bool = False) -> Any:
    now = datetime.now().strftime("%H:%M:%S")
    try:
        rows = _stats(settings, "capabilities", window)
    except MeshError as exc:
        if fail:
            raise
        return Text(f"{now}  {exc} (retrying)", style="red")
    rows.sort(key=lambda r: (-r.rps, r.name))
    title = f"busiest capabilities · last {window:g}s · {now}"
    if not rows:
        title += " · no calls yet"
    return _stat_table(rows[:limit], title, first="CAPABILITY")
