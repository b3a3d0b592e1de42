"""What every CLI command shares: the console, settings from flags, output formats."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from agentmesh.control_planes import live_control_sync
from agentmesh.errors import ConfigurationError, RegistryUnavailable
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

    #: Wide when piped, so tables in logs and CI output are not truncated to 80 columns.
    console: Console
    err_console: Console


def __getattr__(name: str) -> Console:
    """``console`` and ``err_console``, made on first use: ``agentmesh run`` prints without rich,
    and importing it would cost every agent's start-up (goal S7, docs/benchmarks.md)."""
    if name not in ("console", "err_console"):  # also what the import system asks for
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    if name == "console":
        made = Console(width=None if sys.stdout.isatty() else 200)
    else:
        made = Console(stderr=True)
    globals()[name] = made
    return made


class Output(enum.StrEnum):
    table = "table"
    json = "json"


#: The ``--control-url`` option of every command that asks the control plane.
ControlUrl = Annotated[
    str | None, typer.Option(help="Control plane URL (env AGENTMESH_CONTROL_URL).")
]
#: The ``--output`` option of commands that print a table or JSON.
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json.")]


def settings_from(**flags: Any) -> Settings:
    """Environment settings with the command-line flags that were given on top."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ConfigurationError(f"setting {where}: {first['msg']}") from exc
    if "," in settings.control_url:  # several control planes: this command uses one that answers
        with contextlib.suppress(RegistryUnavailable):  # none: the command names the problem
            live = live_control_sync(settings.control_url)
            settings = settings.model_copy(update={"control_url": live})
    return settings


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"label {pair!r} must look like key=value")
        labels[key] = value
    return labels


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    if isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    elif isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    print(json.dumps(data, indent=2, default=str))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def data_dir_option_help() -> str:
    return f"State directory (default {Path.home() / '.agentmesh'}; env AGENTMESH_DATA_DIR)."


def certificate_count(items: list[Any]) -> str:
    """``N certificate(s) of M identit(y/ies)``, as ``identity list`` and ``check`` both say it.

    Certificates and identities differ (each renewal is a new certificate of the same identity):
    one number under two names read as a disagreement.
    """
    names = {str(i.get("spiffe_id")) for i in items if isinstance(i, dict)}
    revoked = sum(1 for i in items if isinstance(i, dict) and i.get("revoked"))
    text = f"{len(items)} certificate(s) of {len(names)} identit{'y' if len(names) == 1 else 'ies'}"
    return text + (f", {revoked} revoked" if revoked else "")


def millis(value: float | None) -> str:
    """A duration in milliseconds as a person reads it (``-`` for none; seconds from 1000)."""
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    if value >= 100:
        return f"{value:.0f}ms"
    if value >= 10:
        return f"{value:.1f}ms"
    return f"{value:.2f}ms"
