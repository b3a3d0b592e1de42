"""NATS as an attacker (or a careful member) sees it: raw nats-py with chosen credentials.

Credentials are obtained the way a workload obtains them: enrolment at the control plane with a
join token (``enrol``), which answers with a certificate *and* a NATS user JWT for the key we
made. A permission violation is what nats-server itself reports to the offending client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from nats.aio.client import Client

from agentmesh.models import CertificateRequest
from agentmesh.security.enrol import RemoteIssuer
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority, inbox_prefix
from agentmesh.security.natsjwt import USER, NKey
from agentmesh.security.pki import new_csr, new_key
from tests.control.control_process import ControlProcess, cli_env, control_tls

#: How long a test waits for the server's verdict on one publish (generous: shared machine).
VERDICT = 5.0


@dataclass(frozen=True)
class ControlPlane:
    url: str
    nats_url: str
    data_dir: Path
    bucket: str
    log: Path


@contextlib.contextmanager
def embedded_control(
    tmp_path: Path, bucket: str, env: dict[str, str] | None = None
) -> Iterator[ControlPlane]:
    """``agentmesh control`` with its embedded NATS and nothing configured but the data dir
    (and ``env``)."""
    env = {"AGENTMESH_REGISTRY_BUCKET": bucket, **(env or {})}
    control = ControlProcess(tmp_path, env)
    try:
        info = control.start(timeout=60).info
        yield ControlPlane(info["control_url"], info["nats_url"], tmp_path, bucket, control.log)
    finally:
        control.close()


def control_cli_env(control: ControlPlane) -> dict[str, str]:
    """The CLI of ``control``'s machine (its data dir: the admin token and roots)."""
    return cli_env(
        {
            "AGENTMESH_CONTROL_URL": control.url,
            "AGENTMESH_DATA_DIR": str(control.data_dir),
            "AGENTMESH_REGISTRY_BUCKET": control.bucket,
        }
    )


@dataclass
class NatsUser:
    """What a workload connects to NATS with."""

    jwt: str
    key: NKey
    inbox: str
    roots: str

    def options(self) -> dict[str, Any]:
        jwt, key = self.jwt, self.key
        return {
            "tls": mesh_tls(self.roots),
            "user_jwt_cb": lambda: jwt.encode(),
            "signature_cb": lambda nonce: base64.b64encode(key.sign(nonce.encode())),
            "inbox_prefix": self.inbox,
        }


def mesh_tls(roots: str) -> ssl.SSLContext:
    """Trust the mesh's roots, check the host name: what every workload does."""
    return ssl.create_default_context(cadata=roots)


async def enrol(control: ControlPlane, identity: SpiffeId, token: str | None = None) -> NatsUser:
    """Enrol ``identity`` with ``token`` (else the data dir's join token), asking for NATS
    credentials too."""
    token = token or (control.data_dir / "join-token").read_text().strip()
    issuer = RemoteIssuer(control.url, token, verify=control_tls(control.data_dir))
    bundle = await issuer.trust_bundle()
    user = NKey.generate(USER)
    csr = new_csr(new_key(), identity.uri).public_bytes(serialization.Encoding.PEM).decode()
    issued = await issuer.issue(CertificateRequest(csr=csr, nats_key=user.public))
    assert issued.nats_jwt is not None
    return NatsUser(issued.nats_jwt, user, inbox_prefix(identity), "".join(bundle.roots))


def control_user(control: ControlPlane) -> NatsUser:
    """The control plane's own NATS user, made from its keys (as the control plane does)."""
    authority = NatsAuthority.open(control.data_dir)
    identity = SpiffeId("agentmesh.local", "control")
    jwt, key = authority.own_user(identity, bucket=control.bucket)
    roots = "".join(p.read_text() for p in sorted((control.data_dir / "ca").glob("*.pem")))
    return NatsUser(jwt, key, inbox_prefix(identity), roots)


class Connection:
    """A raw nats-py client that keeps what the server tells it asynchronously."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: list[str] = []
        #: Set when the connection is closed (by the server: it never reconnects).
        self.closed = asyncio.Event()

    async def connect(self, url: str, **options: Any) -> Connection:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        async def on_closed() -> None:
            self.closed.set()

        await self.nc.connect(
            url,
            allow_reconnect=False,
            connect_timeout=VERDICT,
            error_cb=on_error,
            closed_cb=on_closed,
            **options,
        )
        return self

    async def violation(self, subject: str, data: bytes = b"x", **headers: str) -> str:
        """Publish; the server's permission violation for ``subject`` (fails if none comes).

        A ``ping`` after the publish proves the server has processed it: a violation is sent
        before the pong, so none by then means the publish was allowed.
        """
        seen = len(self.errors)
        await self.nc.publish(subject, data, headers=headers or None)
        await self.nc.flush(timeout=VERDICT)
        deadline = time.monotonic() + VERDICT
        while time.monotonic() < deadline:
            for error in self.errors[seen:]:
                if "permissions violation" in error and subject.lower() in error.lower():
                    return error
            await asyncio.sleep(0.02)
        raise AssertionError(f"publishing to {subject} was allowed; errors: {self.errors}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


class Partition:
    """A TCP path to NATS that a test cuts and restores (one workload away from NATS while
    the others stay), counting the connections made through it while it is whole."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.whole = True
        #: Connections made through it (each a connect attempt of the client behind it).
        self.connections = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._join, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Close every connection through it; new ones are closed at once until restored."""
        self.whole = False
        for writer in list(self._open):
            writer.close()

    def restore(self) -> None:
        self.whole = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.whole:
            writer.close()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}
            writer.close()
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def connect(url: str, user: NatsUser) -> Connection:
    return await Connection().connect(url, **user.options())


async def closed_by_server(conn: Connection) -> bool:
    """Whether the server closes ``conn`` (it does not reconnect) within a verdict's time."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.closed.wait(), VERDICT)
    return conn.closed.is_set()


async def dashboard_says_open(control_url: str, data_dir: Path) -> bool:
    """Whether the dashboard's pages carry the "NATS is open" alarm (signed in as admin)."""
    import httpx

    token = (data_dir / "admin-token").read_text().strip()
    async with httpx.AsyncClient(verify=control_tls(data_dir), timeout=VERDICT) as http:
        signed = await http.post(f"{control_url}/ui/login", data={"token": token})
        assert signed.status_code == 303, signed.text  # a session cookie, then the page
        page = await http.get(f"{control_url}/ui/")
    assert page.status_code == 200, page.text
    return "NATS is open" in page.text
