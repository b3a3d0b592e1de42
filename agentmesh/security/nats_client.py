"""How a process authenticates to NATS and checks that it talks to the right server.

In order, the first that applies (settings are for an operator-run NATS with its own users):

1. ``AGENTMESH_NATS_CREDS_FILE``: a ``.creds`` file (user JWT + NKEY seed);
2. ``AGENTMESH_NATS_NKEY_SEED_FILE``: an NKEY user (nats-py's own support; needs ``nkeys``);
3. ``AGENTMESH_NATS_USER`` / ``AGENTMESH_NATS_PASSWORD``;
4. the user JWT this workload got with its certificate at enrolment, signed over the server's
   nonce with a key that never leaves the process (the default: zero configuration).

TLS: the server is verified against ``AGENTMESH_NATS_TLS_CA_FILE``, else against the mesh's
trust bundle (the embedded NATS has a certificate from the mesh CA for the address it listens
on), with the host name checked, so no agent's certificate can stand in for the server.
Whether TLS is used at all is the server's call (its INFO says ``tls_required``).
"""

from __future__ import annotations

import base64
import contextlib
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentmesh.errors import ConfigurationError
from agentmesh.registry.connection import Credentials, NatsConnection
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from agentmesh.security.natsjwt import NKey
    from agentmesh.security.workload import WorkloadIdentity

__all__ = ["client_connection", "nats_credentials", "signed_by"]


def signed_by(user_jwt: str, key: NKey) -> dict[str, Any]:
    """nats-py options that present ``user_jwt`` and sign the server's nonce with ``key``."""

    def jwt() -> bytes:
        return user_jwt.encode("ascii")

    def sign(nonce: str) -> bytes:
        return base64.b64encode(key.sign(nonce.encode("ascii")))

    return {"user_jwt_cb": jwt, "signature_cb": sign}


def _enrolled(identity: WorkloadIdentity) -> dict[str, Any]:
    """The identity's user JWT *at each connect*: nats-py calls these again on reconnects, and
    the server closes a connection when its JWT expires, so a renewed one is picked up."""

    def current() -> tuple[str, NKey]:
        user = identity.nats_user
        assert user is not None
        return user[0], user[1]

    def jwt() -> bytes:
        return current()[0].encode("ascii")

    def sign(nonce: str) -> bytes:
        return base64.b64encode(current()[1].sign(nonce.encode("ascii")))

    user = identity.nats_user
    assert user is not None
    return {"user_jwt_cb": jwt, "signature_cb": sign, "inbox_prefix": user[2]}


def _creds_file(path: Path) -> dict[str, Any]:
    """The file's JWT and key; a JWT the mesh signed names a SPIFFE ID, whose reply subjects
    are the only ones its permissions allow, so the inbox prefix follows from it."""
    from agentmesh.security.identity import SpiffeId
    from agentmesh.security.nats_auth import inbox_prefix
    from agentmesh.security.natsjwt import decode_jwt_claims, parse_creds

    try:
        user_jwt, key = parse_creds(path.read_text())
        name = decode_jwt_claims(user_jwt).get("name", "")
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"AGENTMESH_NATS_CREDS_FILE {path}: {exc}") from exc
    options = signed_by(user_jwt, key)
    with contextlib.suppress(ValueError):  # else an operator's own user: the default inbox
        options["inbox_prefix"] = inbox_prefix(SpiffeId.parse(str(name)))
    return options


def _nkey_seed(path: Path) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("nkeys") is None:  # nats-py signs with it
        raise ConfigurationError(
            f"AGENTMESH_NATS_NKEY_SEED_FILE {path}: nats-py needs the nkeys package for NKEY "
            "users (pip install nkeys), or use a .creds file (AGENTMESH_NATS_CREDS_FILE)"
        )
    if not path.is_file():
        raise ConfigurationError(f"AGENTMESH_NATS_NKEY_SEED_FILE {path}: no such file")
    return {"nkeys_seed": str(path)}


def _tls(settings: Settings, identity: WorkloadIdentity | None) -> ssl.SSLContext | None:
    ca = settings.nats_tls_ca_file
    try:
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
        else:
            roots = identity.roots_pem() if identity is not None else ""
            if not roots or identity is None:
                return None
            ctx = ssl.create_default_context(cadata=roots)
            # nats-py reconnects with this same context: a root added by a rotation is added
            # here too, so a server certificate under the new root is trusted on reconnect.
            identity.on_roots(lambda pem: ctx.load_verify_locations(cadata=pem))
        if settings.nats_tls_cert_file is not None and settings.nats_tls_key_file is not None:
            ctx.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"NATS TLS files: {exc}") from exc
    return ctx


def nats_credentials(settings: Settings, identity: WorkloadIdentity | None) -> Credentials:
    """The connect options for this process, computed at each (re)connect."""

    def options() -> dict[str, Any]:
        found: dict[str, Any] = {}
        tls = _tls(settings, identity)
        if tls is not None:
            found["tls"] = tls
        if settings.nats_creds_file is not None:
            found.update(_creds_file(settings.nats_creds_file))
        elif settings.nats_nkey_seed_file is not None:
            found.update(_nkey_seed(settings.nats_nkey_seed_file))
        elif settings.nats_user is not None and settings.nats_password is not None:
            found["user"] = settings.nats_user
            found["password"] = settings.nats_password.get_secret_value()
        elif identity is not None and identity.nats_user is not None:
            found.update(_enrolled(identity))
        return found

    return options


async def client_connection(
    settings: Settings,
    url: str,
    bucket: str,
    *,
    name: str,
    timeout: float = 5.0,
    **connection: Any,
) -> NatsConnection:
    """A NATS connection as a mesh *client* (CLI commands that speak NATS directly): enrols
    first when the server wants credentials, as a sidecar does; ``connection``: more
    :class:`NatsConnection` arguments."""
    from agentmesh.security.workload import WorkloadIdentity

    identity = WorkloadIdentity.for_caller(settings, "client")
    credentials = nats_credentials(settings, identity)
    timings = {
        "ping_interval": settings.nats_ping_interval,
        "reconnect_wait": settings.nats_reconnect_wait,
        "server_timeout": settings.nats_connect_timeout,
        "refused_wait_max": settings.nats_refused_wait_max,
    }
    conn = NatsConnection(url, name=name, credentials=credentials, **{**timings, **connection})
    if (await conn.probe(timeout)).get("auth_required"):
        await identity.prepare(bucket)
    await conn.connect(timeout)
    return conn
