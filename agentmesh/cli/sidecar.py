"""``agentmesh sidecar``: the mesh's proxy beside an app in any language (docs/sidecar.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agentmesh.cli._common import console, parse_labels, settings_from, setup_logging
from agentmesh.errors import ConfigurationError

if TYPE_CHECKING:
    from agentmesh.proxy.runner import SidecarProxy


def register(app: typer.Typer) -> None:
    app.command(
        "sidecar",
        context_settings={"allow_interspersed_args": False},
    )(sidecar)


def sidecar(
    command: Annotated[
        list[str] | None,
        typer.Argument(help="The app to start and supervise, after '--' (e.g. -- node app.js)."),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest", "-f", help="The app's kind: Agent manifest (default agent.yaml)."
        ),
    ] = None,
    card: Annotated[
        str | None,
        typer.Option(
            help="Build the capabilities from the app's A2A agent card at this URL instead "
            "(skills served at POST /v1/invoke/<id>, any JSON object as input)."
        ),
    ] = None,
    app_url: Annotated[
        str | None,
        typer.Option("--app", help="Where the app listens (http://127.0.0.1:PORT)."),
    ] = None,
    app_health: Annotated[
        str | None,
        typer.Option(help="The app's health path (e.g. /healthz); default: a TCP connect."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface of the mesh port.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Mesh port (0 picks a free one; it is registered).")
    ] = 0,
    egress_port: Annotated[
        int | None,
        typer.Option(help="Loopback egress port (default 15001, AGENTMESH_EGRESS_PORT; 0: any)."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Extra label key=value (repeatable).")
    ] = None,
    control_url: Annotated[
        str | None, typer.Option(help="Control plane URL (env AGENTMESH_CONTROL_URL).")
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option(help="NATS URL; skips the control plane (AGENTMESH_NATS_URL).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """Serve an app's capabilities on the mesh and give it an egress; SIGTERM drains and exits.

    agentmesh sidecar --manifest agent.yaml --app http://127.0.0.1:8080

    agentmesh sidecar --manifest agent.yaml -- node app.js   (the app gets AGENTMESH_APP_PORT
    and AGENTMESH_EGRESS_URL)

    agentmesh sidecar --card http://127.0.0.1:8080/.well-known/agent-card.json
    """
    # Imported here: `agentmesh run` shares this package and must not pay for the proxy's
    # modules (JSON Schema, httpx) on its start path (tests/test_startup.py).
    from agentmesh.proxy.card import card_origin, fetch_card
    from agentmesh.proxy.manifest import load_agent_manifest, manifest_from_card
    from agentmesh.proxy.runner import SidecarProxy
    from agentmesh.telemetry.access import setup_access_log
    from agentmesh.telemetry.tracing import setup_tracing

    setup_logging(log_level)
    settings = settings_from(control_url=control_url, nats_url=nats_url)
    if card is not None:
        if manifest is not None or command:
            raise ConfigurationError(
                "sidecar: --card reads the card of a running app: give it with --app (or alone, "
                "the app being where the card is), not with --manifest or an app command"
            )
        declared = manifest_from_card(fetch_card(card), card)
        app_url = app_url or card_origin(card)
    else:
        declared = load_agent_manifest(str(manifest or "agent.yaml"))
    proxy = SidecarProxy(
        declared,
        settings=settings,
        app_url=app_url,
        command=command or (),
        app_health=app_health,
        host=host,
        port=port,
        egress_port=egress_port,
    )
    proxy.agent.labels.update(parse_labels(label))
    setup_tracing(proxy.agent.name)
    setup_access_log(settings.access_log)

    def ready(p: SidecarProxy) -> None:
        a = p.agent
        caps = ", ".join(a.capabilities)
        console.print(
            f"[bold]{a.instance_id}[/] serving {caps} at {a.endpoint} "
            f"(app {p.app.url}, egress {p.egress_url})",
            highlight=False,
            emoji=False,
        )

    asyncio.run(proxy.serve(on_ready=ready))
