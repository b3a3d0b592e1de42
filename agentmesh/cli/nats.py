"""``agentmesh nats-config``: what an operator-run nats-server needs to trust the mesh."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agentmesh.cli._common import console, err_console, settings_from

if TYPE_CHECKING:
    from agentmesh.settings import Settings


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
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Also write TLS for the nodes of a NATS cluster here: nats.pem, nats.key "
            "(from the mesh CA, for clients and routes) and mesh-ca.pem."
        ),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="An address clients or peers dial a node by (repeat: every node's, or one "
            "node's with one --tls-dir per node). Needed with --tls-dir."
        ),
    ] = None,
) -> None:
    """Print the nats-server configuration that trusts this mesh's NATS operator and account.

    ``include`` it in the server's configuration (examples/deploy/nats-auth.conf, or the
    cluster's nats-a.conf ...): the server then admits only workloads with a user JWT the control
    plane signed at enrolment, each with its own permissions. The keys are the control plane's,
    in <data dir>/nats-auth/ (created here if missing); run every control plane with the same.
    The account carries the revocations in force (the list the control plane keeps in its data
    dir): written again after a revocation, a restarted server refuses the revoked workloads
    before the control plane has reconnected to it.
    With --tls-dir, run it where the mesh CA is (the control plane's data dir or
    AGENTMESH_CA_CERT_FILE/KEY_FILE): see docs/deploy.md.
    """
    from agentmesh.control.kept import STATE_DIR
    from agentmesh.control.nats_revocations import kept_account_jwt
    from agentmesh.security.files import ROOTS_FILE, write_private
    from agentmesh.security.nats_auth import AUTH_DIR, NatsAuthority

    settings = settings_from(data_dir=data_dir)
    if tls_dir is not None:
        _node_tls(settings, tls_dir, host or [])
    authority = NatsAuthority.open(settings.data_dir)
    revoked = kept_account_jwt(
        authority,
        settings.data_dir / STATE_DIR,
        settings.data_dir / ROOTS_FILE,
        settings.trust_domain,
    )
    text = authority.resolver_config(revoked)
    if output is None:
        if tls_dir is None:
            console.print(text, end="", highlight=False, markup=False, soft_wrap=True)
        return
    write_private(output, text.encode())
    err_console.print(
        f"wrote {output}; keys in {settings.data_dir / AUTH_DIR}", highlight=False, soft_wrap=True
    )


def _node_tls(settings: Settings, tls_dir: Path, hosts: list[str]) -> None:
    from agentmesh.control.ca import CertificateAuthority
    from agentmesh.nats_config import write_node_tls

    if not hosts:
        raise typer.BadParameter(
            "--tls-dir needs the nodes' addresses (--host 10.0.0.1 --host nats-a.internal ...)"
        )
    ca = CertificateAuthority.open(settings)
    written = write_node_tls(tls_dir, ca, hosts, settings.nats_node_cert_ttl)
    err_console.print(
        f"wrote {', '.join(str(p) for p in written)}", highlight=False, soft_wrap=True
    )
