"""The ``agentmesh`` command line (typer + rich), one module per command group."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from agentmesh._version import __version__
from agentmesh.cli import (
    bench,
    check,
    control,
    demo,
    nats,
    policies,
    query,
    run,
    security,
    sidecar,
    stat,
    tap,
)
from agentmesh.cli._common import err_console
from agentmesh.errors import MeshError

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentmesh",
    help="A service mesh for AI agents: discovery, reliable calls, identity and telemetry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"agentmesh {__version__}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """A service mesh for AI agents: discovery, reliable calls, identity and telemetry."""


control.register(app)
run.register(app)
query.register(app)
demo.register(app)
stat.register(app)
tap.register(app)
check.register(app)
policies.register(app)
security.register(app)
nats.register(app)
bench.register(app)
sidecar.register(app)


def main() -> None:
    """Console entry point: a user error is one readable line and exit code 1."""
    try:
        app()
    except MeshError as exc:
        err_console.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
