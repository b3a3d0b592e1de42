"""The ``agentmesh`` command line (typer + rich), one module per command group.

Each command's module is imported, and its click command built, when that command runs or a
help page lists it: ``agentmesh run`` then imports and builds one command instead of every
command's module and all their parameters (the control plane's clients, rich tables, ...), which
an agent's start-up (goal S7, docs/benchmarks.md) would otherwise pay for.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from agentmesh._version import __version__
from agentmesh.errors import MeshError

__all__ = ["app", "main"]

#: Command name → the module of this package whose ``register(app)`` adds it, in the order
#: ``agentmesh --help`` lists them (typer lists commands before command groups).
#: tests/test_cli.py checks it against what each module registers.
_COMMANDS: dict[str, str] = {
    "control": "control",
    "run": "run",
    "agents": "query",
    "find": "query",
    "call": "query",
    "demo": "demo",
    "stat": "stat",
    "top": "stat",
    "tap": "tap",
    "check": "check",
    "apply": "policies",
    "nats-config": "nats",
    "bench": "bench",
    "sidecar": "sidecar",
    "get": "policies",
    "delete": "policies",
    "token": "security",
    "identity": "security",
    "ca": "security",
}


def _module_group(module: str) -> TyperGroup:
    """The click group of what ``agentmesh.cli.<module>`` registers (its commands, built)."""
    commands = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    importlib.import_module(f"{__name__}.{module}").register(commands)
    return typer.main.get_group(commands)


class _CommandsOnFirstUse(TyperGroup):
    """The top-level group: a command's module is imported when the command is looked up."""

    def list_commands(self, ctx: object) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: object, cmd_name: str) -> TyperCommand | TyperGroup | None:
        if cmd_name not in self.commands:
            # An unknown name (a typo) loads them all, so that typer can suggest the closest.
            wanted = [_COMMANDS[cmd_name]] if cmd_name in _COMMANDS else set(_COMMANDS.values())
            for module in wanted:
                self.commands.update(_module_group(module).commands)
        command = self.commands.get(cmd_name)
        return command if isinstance(command, TyperCommand | TyperGroup) else None


app = typer.Typer(
    name="agentmesh",
    cls=_CommandsOnFirstUse,
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


def main() -> None:
    """Console entry point: a user error is one readable line and exit code 1."""
    try:
        app()
    except MeshError as exc:
        from rich.markup import escape

        from agentmesh.cli._common import err_console

        err_console.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
