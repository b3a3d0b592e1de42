"""The inbound TLS layer: uvicorn that knows who is calling.

uvicorn does not put the TLS peer certificate into the ASGI scope, so agents run
uvicorn with :class:`MeshHttpProtocol`, a subclass of its ``HttpToolsProtocol`` that does TLS
itself, per connection:

1. the first bytes decide: a TLS ClientHello starts a handshake (through memory BIOs, see
   :class:`_TlsTransport`) with the sidecar's *current* server context (so a renewed
   certificate or trust bundle applies to every new connection, while connections already
   open keep theirs); plaintext is served in ``permissive`` mode and refused with a 401 in
   ``strict`` mode;
2. OpenSSL verifies the client's chain against the trust bundle (a presented certificate must
   verify, or the handshake fails); then, once per connection, :func:`check_leaf` checks what
   OpenSSL does not (one URI SAN, not a CA, our trust domain) and parses the SPIFFE ID. A
   refusal aborts the connection before the server's ``Finished`` is sent (TLS 1.2), so the
   caller sees a failed handshake, never a half-done request;
3. every request on the connection carries the result in ``scope["extensions"]["tls"]`` (the
   ASGI TLS extension: ``client_cert_chain`` etc.) plus the parsed :class:`Caller` under
   :data:`PEER_KEY`. :func:`caller_identity` reads it back.

Bounds (:class:`InboundLimits`, from settings), so that no peer — authenticated or not — can make
a server hold unbounded memory or connections: a TLS handshake must finish within
``tls_handshake_timeout``; a connection must send a complete request head within
``header_timeout`` of connecting (or of the first byte of its next request), else it is closed
(slowloris, idle connections that never send); a request head larger than ``max_header_bytes``
or with more than ``max_header_count`` fields gets 431 and the connection closes, after at most
one read past the limit was buffered (header floods).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agentmesh.errors import AuthenticationFailed
from agentmesh.models import Problem
from agentmesh.security.bio import close_notify, read_plaintext
from agentmesh.security.identity import Caller, LeafRefused, check_leaf

if TYPE_CHECKING:
    from agentmesh.settings import Settings

__all__ = [
    "PEER_KEY",
    "InboundLimits",
    "MeshHttpProtocol",
    "ServerTLS",
    "caller_identity",
    "protocol_for",
]

_log = logging.getLogger("agentmesh.security")

#: Where the verified peer sits in the ASGI TLS extension dict.
PEER_KEY = "agentmesh.peer"
_TLS_HANDSHAKE = 0x16
#: A turn's writes leave at once past this (uvicorn's and asyncio's high-water mark).
_COALESCE_LIMIT = 65536


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


@dataclass(frozen=True, slots=True)
class InboundLimits:
    """The bounds of one server's connections (see the module docstring; settings explain the
    numbers)."""

    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    handshake_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> InboundLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout=settings.header_timeout,
            handshake_timeout=settings.tls_handshake_timeout,
        )


def protocol_for(
    tls: ServerTLS,
    owner: str,
    limits: InboundLimits | None = None,
    *,
    plaintext_refusal: str | None = None,
) -> type[MeshHttpProtocol]:
    """A protocol class bound to one server's identity: ``uvicorn.Config(http=...)``.

    ``limits``: default, the settings' (``AGENTMESH_*``); ``plaintext_refusal``: the message a
    plaintext request gets in ``strict`` mode."""
    if limits is None:
        from agentmesh.settings import Settings

        limits = InboundLimits.of(Settings())
    attrs: dict[str, Any] = {"mesh_tls": tls, "owner": owner, "limits": limits}
    if plaintext_refusal is not None:
        attrs["plaintext_refusal"] = plaintext_refusal
    return type("MeshHttpProtocol", (MeshHttpProtocol,), attrs)


class _HeadRefused(Exception):
    """Raised from a parser callback: the request head broke a limit (431)."""


_REASONS = {401: "Unauthorized", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def _problem_bytes(problem: Problem) -> bytes:
    body = problem.model_dump_json(exclude_none=True).encode()
    head = (
        f"HTTP/1.1 {problem.status} {_REASONS[problem.status]}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


def _refusal(status: int, code: str, detail: str) -> Problem:
    return Problem(
        type=f"https://agentmesh.dev/errors/{code}",
        title=_REASONS[status],
        status=status,
        detail=detail,
        code=code,
    )


class MeshHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus TLS with per-connection peer identity."""

    mesh_tls: ClassVar[ServerTLS]
    owner: ClassVar[str] = "agent"
    limits: ClassVar[InboundLimits]
    plaintext_refusal: ClassVar[str] = (
        "agent {owner} accepts only mutual TLS (AGENTMESH_MTLS=strict); plaintext refused: "
        "call its https:// endpoint with a mesh certificate"
    )

    #: 0 new, 1 waiting for the first bytes, 2 handshaking, 3 serving HTTP, 4 refused.
    _phase: int = 0
    #: uvicorn's side of the connection was made: its ``connection_lost`` must run too (it
    #: forgets the connection), also after a refusal while serving HTTP (408, 431).
    _http: bool = False
    _raw: asyncio.Transport | None = None
    _tls: dict[str, Any] | None = None
    _tls_transport: _TlsTransport | None = None
    _handshake_timer: asyncio.TimerHandle | None = None
    _head_timer: asyncio.TimerHandle | None = None
    #: When the request head being read must be complete (None: not reading a head).
    _head_deadline: float | None = None
    #: Bytes of the current request head received so far (None: not reading a head).
    _head_bytes: int | None = 0
    _head_fields = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._phase = 1
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._phase == 3:
            tls = self._tls_transport
            if tls is None:
                self._feed(data)
                return
            if (plain := tls.decrypt(data)) is not None:
                self._feed(plain)
            if tls.peer_closed:
                # The caller's close_notify: end the connection as uvicorn does at EOF, with
                # ours (a TLS client may wait for it before its TCP close).
                tls.close()
        elif self._phase == 2:
            self._handshake(data)
        elif self._phase == 1:
            self._first_bytes(data)

    def eof_received(self) -> None:
        if self._phase == 3:
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._http:
            super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._head_bytes = 0
            self._head_fields = 0
            self._arm_head_timer()
        if self._tls is not None:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]
            scope["extensions"] = {"tls": self._tls}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_header_count:
            raise _HeadRefused(f"more than {self.limits.max_header_count} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        self._head_bytes = None
        super().on_headers_complete()

    # ---- bounds ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, with the request head's size and field count bounded."""
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse_head(str(exc.__context__))
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # No WebSocket or other upgrade is served here.
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._head_bytes is not None and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head(f"a request head larger than {self.limits.max_header_bytes} bytes")

    def _refuse_head(self, what: str) -> None:
        _log.warning("%s: refused %s from %s (431)", self.owner, what, self._peer())
        detail = f"{self.owner}: {what} (AGENTMESH_MAX_HEADER_BYTES, AGENTMESH_MAX_HEADER_COUNT)"
        self._send_and_close(_refusal(431, "header_too_large", detail))

    def _send_and_close(self, problem: Problem) -> None:
        self._head_deadline = None
        self._head_bytes = None
        self._phase = 4
        self.transport.write(_problem_bytes(problem))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        """A request head starts: it must be complete within ``header_timeout``.

        One timer per connection rather than one armed and cancelled per request (a handle, a
        heap push and a cancellation on every call's path): the deadline moves with each
        request, and the timer, when it fires, follows it (or lapses if no head is being read;
        the next request arms it again), so a busy connection arms about one timer per
        ``header_timeout``.
        """
        deadline = self._head_deadline = self.loop.time() + self.limits.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(deadline, self._head_due)

    def _head_due(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self._head_timer = self.loop.call_at(deadline, self._head_due)
            return
        self._head_expired()

    def _head_expired(self) -> None:
        self._head_deadline = None
        if self._phase == 4 or self._raw is None or self._raw.is_closing():
            return
        _log.info(
            "%s: closed a connection from %s that sent no complete request head within %gs",
            self.owner,
            self._peer(),
            self.limits.header_timeout,
        )
        if self._phase == 3:
            detail = (
                f"{self.owner}: no complete request head within "
                f"{self.limits.header_timeout:g}s (AGENTMESH_HEADER_TIMEOUT)"
            )
            self._send_and_close(_refusal(408, "request_timeout", detail))
            return
        self._phase = 4  # silent, or still in the TLS handshake: nothing to answer
        self._raw.abort()

    # ---- before HTTP ----------------------------------------------------------------------

    def _peer(self) -> str:
        assert self._raw is not None
        addr = self._raw.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)

    def _first_bytes(self, data: bytes) -> None:
        raw = self._raw
        assert raw is not None
        if data[0] == _TLS_HANDSHAKE and self.mesh_tls.mode != "off":
            self._start_tls(raw, data)
        elif self.mesh_tls.mode != "strict":
            self._phase = 3
            self._http = True
            super().connection_made(_Transport(raw, self.loop))
            self._feed(data)
        else:
            self._phase = 4
            _log.warning(
                "%s: refused a plaintext connection from %s (mTLS is strict)",
                self.owner,
                self._peer(),
            )
            error = AuthenticationFailed(self.plaintext_refusal.format(owner=self.owner))
            raw.write(_problem_bytes(error.to_problem()))
            raw.close()

    def _start_tls(self, raw: asyncio.Transport, data: bytes) -> None:
        self._phase = 2
        self._tls_transport = _TlsTransport(raw, self.loop, self.mesh_tls.server_context())
        self._handshake_timer = self.loop.call_later(
            self.limits.handshake_timeout, self._handshake_expired
        )
        self._handshake(data)

    def _handshake_expired(self) -> None:
        if self._phase == 2 and self._raw is not None:
            _log.debug("%s: TLS handshake from %s timed out", self.owner, self._peer())
            self._phase = 4
            self._raw.abort()

    def _handshake(self, data: bytes) -> None:
        tls = self._tls_transport
        assert tls is not None
        try:
            done = tls.handshake(data)
        except ssl.SSLError as exc:
            self._phase = 4
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"client certificate refused: {exc.verify_message}"
            else:
                reason = f"TLS handshake failed: {exc.reason or exc}"
            _log.warning(
                "%s: refused a TLS connection from %s: %s", self.owner, self._peer(), reason
            )
            tls.flush()  # the alert that tells the caller why
            tls.raw.close()
            return
        if done:
            self._handshake_complete(tls)

    def _handshake_complete(self, transport: _TlsTransport) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        ssl_object = transport.ssl_object
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
                transport.raw.abort()
                return
        transport.flush()  # our Finished
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
        self._http = True
        super().connection_made(transport)
        if (early := transport.decrypt(b"")) is not None:
            self._feed(early)


class _Transport(asyncio.Transport):
    """The connection's transport as uvicorn sees it: the writes of one event-loop turn leave
    as one.

    uvicorn writes a response's head and body separately, two system calls (and, with TLS, two
    records) where one does, and under load those writes were a large share of the agent's CPU
    (docs/benchmarks.md). Deferring to the end of the turn (``call_soon``) costs no latency: both
    writes happen in the same turn. Flow control stays the raw transport's (it pauses the protocol):
    so that it sees an app that writes a lot without yielding, a turn's writes leave as soon as they
    reach :data:`_COALESCE_LIMIT`.
    """

    def __init__(self, raw: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.raw = raw
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            if self.raw.is_closing():
                return
            self._loop.call_soon(self._send_pending)
        self._pending.append(data if isinstance(data, bytes) else bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= _COALESCE_LIMIT:
            self._send_pending()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _send_pending(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            if not self.raw.is_closing():
                self._send(data)

    def _send(self, data: bytes) -> None:
        self.raw.write(data)

    def close(self) -> None:
        self._send_pending()
        self.raw.close()

    def abort(self) -> None:
        self._pending.clear()
        self._pending_size = 0
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() + self._pending_size

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.raw.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.raw.get_protocol()


class _TlsTransport(_Transport):
    """TLS over the connection's own transport, through memory BIOs.

    Why not asyncio's TLS transport (``SSLProtocol``): it puts a layer of Python buffering, state
    machine and flow control under every read and write, which in the profile of an mTLS call
    cost more than the encryption itself. Requests on a connection come one at a time, so this
    needs none of it: a turn's writes are one ``SSLObject.write`` (one record) and one raw write,
    a read one ``SSLObject.read`` loop.
    """

    def __init__(
        self, raw: asyncio.Transport, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext
    ) -> None:
        super().__init__(raw, loop)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.peer_closed = False
        """The caller sent its close_notify."""

    def handshake(self, data: bytes) -> bool:
        """Feed handshake bytes; True once done. Our ``Finished`` stays unsent until
        :meth:`flush`, so the caller's certificate can still be refused."""
        self._incoming.write(data)
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return False
        return True

    def decrypt(self, data: bytes) -> bytes | None:
        """The plaintext in ``data`` (None: nothing yet, or the connection was closed)."""
        if data:
            self._incoming.write(data)
        try:
            plain, closed = read_plaintext(self.ssl_object, self._incoming)
        except ssl.SSLError as exc:
            _log.debug("TLS error on an inbound connection: %s", exc)
            self.raw.abort()
            return None
        if closed:
            self.peer_closed = True
        self.flush()
        return plain or None

    def flush(self) -> None:
        if self._outgoing.pending:
            self.raw.write(self._outgoing.read())

    def _send(self, data: bytes) -> None:
        self.ssl_object.write(data)
        self.flush()

    def close(self) -> None:
        self._send_pending()
        if not self.raw.is_closing():
            self.raw.write(close_notify(self.ssl_object, self._outgoing))
            self.raw.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        if name == "sslcontext":
            return self.ssl_object.context
        if name == "peercert":
            return self.ssl_object.getpeercert()
        if name == "cipher":
            return self.ssl_object.cipher()
        return self.raw.get_extra_info(name, default)
