"""``agentmesh control``: run the control plane (and an embedded NATS unless one is given)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agentmesh.cli._common import console, settings_from, setup_logging
from agentmesh.settings import DEFAULT_CONTROL_PORT, Settings
from agentmesh.telemetry.tracing import setup_tracing

if TYPE_CHECKING:
    from agentmesh.control.server import ControlInfo


def register(app: typer.Typer) -> None:
    app.command("control")(control)


def run_hint(control_url: str, settings: Settings) -> str:
    """The command that starts an agent of this mesh, to copy and paste.

    It names the data dir when it is not the default one: agents enrol with the join token in it,
    so a hint without it fails with "no way to get a mesh certificate".
    """
    env = f"AGENTMESH_CONTROL_URL={control_url}"
    if settings.data_dir != Settings.model_fields["data_dir"].default:
        env += f" AGENTMESH_DATA_DIR={shlex.quote(str(settings.data_dir))}"
    return f"{env} agentmesh run my_agent.py"


def control(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port of the API (0 picks a free one).")
    ] = DEFAULT_CONTROL_PORT,
    nats_url: Annotated[
        str | None,
        typer.Option(
            help="Use this NATS instead of starting an embedded one.", envvar="AGENTMESH_NATS_URL"
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="State directory (env AGENTMESH_DATA_DIR; default ~/.agentmesh)."),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(help="Write where the control plane listens, as JSON, once it is ready."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """Run the control plane; agents join it with AGENTMESH_CONTROL_URL."""
    from agentmesh.control.server import run_control  # FastAPI: only this command needs it

    setup_logging(log_level)
    settings = settings_from(nats_url=nats_url, data_dir=data_dir)
    setup_tracing("agentmesh-control")

    def ready(info: ControlInfo) -> None:
        nats_note = f"embedded, data in {info.embedded_nats}" if info.embedded_nats else "external"
        console.print(f"[bold]agentmesh control plane[/] listening on {info.control_url}")
        console.print(f"  API docs    {info.control_url}/docs")
        console.print(f"  NATS        {info.nats_url} ({nats_note})")
        if info.security:
            sec = info.security
            console.print(
                f"  mTLS        {sec['mtls']}, trust domain {sec['trust_domain']}; local agents "
                f"enrol with {sec['join_token_file']}",
                highlight=False,
            )
            console.print(f"  admin token {sec['admin_token_file']}", highlight=False)
        console.print(f"  run agents  {run_hint(info.control_url, settings)}", highlight=False)
        console.print("  stop        Ctrl-C")
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(info.to_json())
            tmp.replace(ready_file)

    run_control(settings, host=host, port=port, on_ready=ready)
