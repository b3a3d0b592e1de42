"""``agentmesh bench``: the benchmark suite of ``bench/``, from a checkout or an installed wheel.

The suite lives in the repository's ``bench/`` package; the wheel ships it as
``agentmesh._bench`` (``pyproject.toml`` force-includes it). It imports aiohttp, httpx, FastAPI
and the whole mesh, so it is imported only when this command runs (or prints its help), never
by ``agentmesh --help`` or ``agentmesh run``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

import agentmesh
from agentmesh.errors import ConfigurationError


def register(app: typer.Typer) -> None:
    app.command("bench", cls=_BenchCommand)(bench)


def bench_module() -> ModuleType:
    """The suite's ``run`` module: shipped inside the wheel, or the checkout's ``bench/``."""
    package = Path(agentmesh.__file__).parent
    if (package / "_bench" / "run.py").is_file():
        return importlib.import_module("agentmesh._bench.run")
    checkout = package.parent / "bench"
    if not (checkout / "run.py").is_file():
        raise ConfigurationError(f"the benchmark suite is missing (looked in {package})")
    if str(checkout.parent) not in sys.path:
        sys.path.insert(0, str(checkout.parent))
    module = importlib.import_module("bench.run")
    found = Path(module.__file__ or "").resolve().parent
    if found != checkout.resolve():
        raise ConfigurationError(f"`import bench` found {found}, not the checkout's {checkout}")
    return module


class _BenchCommand(TyperCommand):
    """Ends ``--help`` with the scenarios and their goals, read from the suite's registry.

    The epilog is computed when help is shown, so the suite is imported only then. Markdown,
    so that paragraphs are reflowed and the goals render as a list.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = "markdown"

    @property
    def epilog(self) -> str:
        """Targets, then every scenario with its goals."""
        try:
            suite = bench_module()
        except ConfigurationError as exc:
            return f"(scenarios unavailable: {exc})"
        lines = [f"Targets: {suite.TARGET_SUMMARY}.", "", "Scenarios and their goals:", ""]
        for name, title, goals in suite.scenario_help():
            lines.append(f"- **{name}** {title}")
            lines += [f"    - {goal}" for goal in goals]
        return "\n".join(lines)

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        """Ignored: click's constructor sets it; the suite's registry is the source."""


def bench(
    scenarios: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SCENARIO",
            help="Scenarios to run, s1 to s8 (listed below); default: all.",
            show_default=False,
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Smoke run for CI: 3 short rounds, small parameters."),
    ] = False,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Rounds per workload of s1-s3 (the median is taken); default 5."),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of the targets of s1-s3, e.g. B0,M1."),
    ] = None,
    payload_bytes: Annotated[int, typer.Option(help="JSON body size of s1-s3.")] = 1024,
    rate: Annotated[
        float | None, typer.Option(help="Open-loop rate of s1 in calls/s; default 200.")
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Also write every result as JSON."),
    ] = None,
) -> None:
    """Benchmark the mesh against baselines measured in the same run, scenario by scenario.

    Each scenario prints a table of absolute numbers (median of interleaved rounds after
    warm-up; CPU-seconds and peak RSS per 1000 calls) and ratios, then its goals, each checked
    against the measured numbers. The header describes the machine. Exit status: 0; 1 if a call
    or a measurement failed; 2 on usage errors; 130/143 when interrupted. Missed goals are
    reported, not an error. Failover (python bench/failover.py) and profiling are checkout-only
    tools of bench/, documented in bench/README.md.
    """
    code = bench_module().run_benchmarks(
        scenarios or [],
        quick=quick,
        rounds=rounds,
        targets=targets,
        payload_bytes=payload_bytes,
        rate=rate,
        json_path=json_file,
    )
    if code:
        raise typer.Exit(code)
