"""``agentmesh nats-config``: what an operator-run nats-server needs to trust the mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agentmesh.cli._common import console, err_console, settings_from


def register(app: typer.Typer) -> None:
    app.command("nats-config")(nats_config)


def nats_config(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="The control plane's state directory (env AGENTMESH_DATA_DIR)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write it to this file (0600) instead of stdout."),
    ] = None,
) -> None:
    """Print the nats-server configuration that trusts this mesh's NATS operator and account.

    ``include`` it in the server's configuration (examples/deploy/nats-auth.conf): the server
    then admits only workloads with a user JWT the control plane signed at enrolment, each
    with its own permissions. The keys are the control plane's, in <data dir>/nats-auth/
    (created here if missing); run the control plane with the same data dir.
    """
    from agentmesh.security.files import write_private
    from agentmesh.security.nats_auth import AUTH_DIR, NatsAuthority

    settings = settings_from(data_dir=data_dir)
    text = NatsAuthority.open(settings.data_dir).resolver_config()
    if output is None:
        console.print(text, end="", highlight=False, markup=False, soft_wrap=True)
        return
    write_private(output, text.encode())
    err_console.print(
        f"wrote {output}; keys in {settings.data_dir / AUTH_DIR}", highlight=False, soft_wrap=True
    )
