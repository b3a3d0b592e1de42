"""The inbound TLS layer: uvicorn that knows who is calling.

uvicorn does not put the TLS peer certificate into the ASGI scope (DESIGN §7), so agents run
uvicorn with :class:`MeshHttpProtocol`, a subclass of its ``HttpToolsProtocol`` that does TLS
itself, per connection:

1. the first bytes decide: a TLS ClientHello starts a handshake with the sidecar's *current*
   server context (so a renewed certificate or trust bundle applies to every new connection,
   while connections already open keep theirs); plaintext is served in ``permissive`` mode and
   refused with a 401 in ``strict`` mode;
2. OpenSSL verifies the client's chain against the trust bundle (a presented certificate must
   verify, or the handshake fails); then, once per connection, :func:`check_leaf` checks what
   OpenSSL does not (one URI SAN, not a CA, our trust domain) and parses the SPIFFE ID. A
   refusal aborts the connection before the server's ``Finished`` is sent (TLS 1.2), so the
   caller sees a failed handshake, never a half-done request;
3. every request on the connection carries the result in ``scope["extensions"]["tls"]`` (the
   ASGI TLS extension: ``client_cert_chain`` etc.) plus the parsed :class:`Caller` under
   :data:`PEER_KEY`. :func:`caller_identity` reads it back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agentmesh.errors import AuthenticationFailed
from agentmesh.security.identity import Caller, LeafRefused, check_leaf

__all__ = ["PEER_KEY", "MeshHttpProtocol", "ServerTLS", "caller_identity", "protocol_for"]

_log = logging.getLogger("agentmesh.security")

#: Where the verified peer sits in the ASGI TLS extension dict.
PEER_KEY = "agentmesh.peer"
_TLS_HANDSHAKE = 0x16
_HANDSHAKE_TIMEOUT = 10


class ServerTLS(Protocol):
    """What the inbound needs from the sidecar's identity (``WorkloadIdentity`` provides it)."""

    @property
    def mode(self) -> Literal["strict", "permissive", "off"]: ...

    @property
    def trust_domain(self) -> str: ...

    def server_context(self) -> ssl.SSLContext:
        """The context for the next new connection (swapped on renewal and bundle changes)."""
        ...


def caller_identity(scope: Mapping[str, Any]) -> Caller | None:
    """The verified identity of whoever sent this request, or None.

    For the policy engine (and anything else that authorizes): the identity comes only from the
    TLS session of this hop — the certificate the caller proved it holds the key of, verified
    against the trust bundle and parsed once per connection. Headers are never consulted
    (``agentmesh-caller`` is ignored). None means: a plaintext connection (``permissive`` or
    ``off`` mode) or TLS without a client certificate; in ``strict`` mode the inbound app
    refuses ``/v1/invoke`` for those before any policy runs, and it also refuses callers whose
    certificate was revoked or has expired since the handshake, so a policy engine sees only
    live identities. Cheap: two dictionary lookups.
    """
    extensions = scope.get("extensions")
    if not extensions:
        return None
    tls = extensions.get("tls")
    if tls is None:
        return None
    peer: Caller | None = tls.get(PEER_KEY)
    return peer


def protocol_for(tls: ServerTLS, owner: str) -> type[MeshHttpProtocol]:
    """A protocol class bound to one server's identity: ``uvicorn.Config(http=...)``."""
    return type("MeshHttpProtocol", (MeshHttpProtocol,), {"mesh_tls": tls, "owner": owner})


def _problem_bytes(error: AuthenticationFailed) -> bytes:
    body = error.to_problem().model_dump_json(exclude_none=True).encode()
    head = (
        f"HTTP/1.1 {error.status} Unauthorized\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


class MeshHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus TLS with per-connection peer identity."""

    mesh_tls: ClassVar[ServerTLS]
    owner: ClassVar[str] = "agent"

    #: 0 new, 1 waiting for the first bytes, 2 handshaking, 3 serving HTTP, 4 refused.
    _phase: int = 0
    _raw: asyncio.Transport | None = None
    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._phase == 0:
            self._raw = transport
            self._phase = 1
            return
        self._handshake_complete(transport)

    def data_received(self, data: bytes) -> None:
        if self._phase == 3:
            super().data_received(data)
        elif self._phase == 1:
            self._first_bytes(data)

    def eof_received(self) -> None:
        if self._phase == 3:
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._phase == 3:
            super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]
            scope["extensions"] = {"tls": self._tls}

    # ---- before HTTP ----------------------------------------------------------------------

    def _peer(self) -> str:
        assert self._raw is not None
        addr = self._raw.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)

    def _first_bytes(self, data: bytes) -> None:
        raw = self._raw
        assert raw is not None
        if data[0] == _TLS_HANDSHAKE:
            self._start_tls(raw, data)
        elif self.mesh_tls.mode == "permissive":
            self._phase = 3
            super().connection_made(raw)
            super().data_received(data)
        else:
            self._phase = 4
            _log.warning(
                "%s: refused a plaintext connection from %s (mTLS is strict)",
                self.owner,
                self._peer(),
            )
            error = AuthenticationFailed(
                f"agent {self.owner} accepts only mutual TLS (AGENTMESH_MTLS=strict); "
                "plaintext refused: call its https:// endpoint with a mesh certificate"
            )
            raw.write(_problem_bytes(error))
            raw.close()

    def _start_tls(self, raw: asyncio.Transport, data: bytes) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = SSLProtocol(
            self.loop,
            self,
            self.mesh_tls.server_context(),
            waiter,
            server_side=True,
            call_connection_made=True,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
        )
        self._phase = 2
        raw.set_protocol(tls)
        tls.connection_made(raw)
        buffer = tls.get_buffer(len(data))
        buffer[: len(data)] = data
        tls.buffer_updated(len(data))
        peer = self._peer()
        waiter.add_done_callback(lambda f: self._handshake_failed(f, peer))

    def _handshake_failed(self, waiter: asyncio.Future[None], peer: str) -> None:
        if waiter.cancelled() or (exc := waiter.exception()) is None:
            return
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"client certificate refused: {exc.verify_message}"
        elif isinstance(exc, ssl.SSLError):
            reason = f"TLS handshake failed: {exc.reason or exc}"
        else:
            _log.debug(
                "%s: TLS connection from %s lost during handshake: %s", self.owner, peer, exc
            )
            return
        _log.warning("%s: refused a TLS connection from %s: %s", self.owner, peer, reason)

    def _handshake_complete(self, transport: asyncio.Transport) -> None:
        ssl_object: ssl.SSLObject = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        peer: Caller | None = None
        if der is not None:
            try:
                peer = check_leaf(der, self.mesh_tls.trust_domain)
            except LeafRefused as exc:
                self._phase = 4
                _log.warning(
                    "%s: refused a TLS connection from %s: %s", self.owner, self._peer(), exc
                )
                # Before our Finished leaves: the caller's handshake fails, nothing was sent.
                assert self._raw is not None
                self._raw.abort()
                return
        cipher = ssl_object.cipher()
        self._tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der is not None else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": 0x0303,
            "cipher_suite": None,
            "agentmesh.cipher": cipher[0] if cipher else None,
            PEER_KEY: peer,
        }
        self._phase = 3
        super().connection_made(transport)
