"""HTTP/1.1 keep-alive connections for the transport: one request shape, on asyncio directly.

Why not aiohttp or httpx here: a mesh call is always one small POST to a peer we resolved
ourselves, and general clients spend most of a caller's CPU on generality. Profiling the caller
at 32 calls in flight (``python bench/profile_mesh.py record --side client --concurrency 32``)
put 42 % of its CPU in aiohttp (request and response objects, header multidicts, URL parsing,
cookie and tracing hooks); httpx's pool is slower still (DESIGN §7). Here a request is one byte
string, prebuilt up to its per-call headers and written once, and the response is parsed in C by
httptools (uvicorn's parser, already a dependency). A connection carries one request at a time;
idle ones are pooled per (host, port, TLS context, server name), so a connection checked for
one identity is never reused for another and a renewed certificate (a new context) is used by
new connections while open ones finish their work.

Only what the transport needs: no redirects, cookies, proxies, compression or 1xx handling.
Failures are this module's two exceptions, split by whether the request can have left:
:class:`ConnectFailed` (it cannot) and :class:`Disconnected` (it may have).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Generic, TypeVar

import httptools

from agentmesh.security.bio import read_plaintext

__all__ = ["ConnectFailed", "ConnectionPool", "Disconnected", "Response"]

_Peer = TypeVar("_Peer")
_Key = tuple[str, int, ssl.SSLContext | None, str | None]


class ConnectFailed(Exception):
    """No connection: nothing of the request was sent. ``certificate``: verification failed."""

    def __init__(self, reason: str, *, certificate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate


class Disconnected(Exception):
    """The connection ended (or broke the protocol) before the response was complete."""


class Response(Generic[_Peer]):
    """A response whose head has arrived; the body is read with :meth:`read` or :meth:`readline`.

    Reading the whole body returns the connection to its pool; :meth:`close` gives it up.
    """

    __slots__ = (
        "_buffer",
        "_complete",
        "_conn",
        "_error",
        "_released",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: _Connection[_Peer]) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        """Lower-cased names; a repeated header keeps its last value."""
        self.keep_alive = False
        self._buffer = bytearray()
        self._complete = False
        self._error: Disconnected | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    @property
    def content_type(self) -> bytes:
        """The media type without parameters (``b""`` if none)."""
        return self.headers.get(b"content-type", b"").partition(b";")[0].strip().lower()

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None

    async def read(self) -> bytes:
        """The whole body; then the connection goes back to the pool."""
        while not self._complete:
            await self._wait()
        body = bytes(self._buffer)
        self._buffer.clear()
        self.release()
        return body

    async def readline(self) -> bytes:
        """The next line including ``\\n``; ``b""`` when the body has ended."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if self._complete:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            await self._wait()

    def release(self) -> None:
        """Done with this response: a complete one frees its connection for the next request."""
        if not self._released:
            self._released = True
            self._conn.finished(self, reusable=self._complete and self.keep_alive)

    def close(self) -> None:
        """Give the connection up (an unread or half-read body cannot be skipped safely)."""
        if not self._released:
            self._released = True
            self._conn.finished(self, reusable=False)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        except asyncio.CancelledError:
            self.close()  # a request still in flight: this connection is of no further use
            raise
        finally:
            self._waiter = None
        if self._error is not None and not self._complete:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol, Generic[_Peer]):
    """One keep-alive connection and its response parser (httptools calls the ``on_*``)."""

    def __init__(self, pool: ConnectionPool[_Peer], key: _Key) -> None:
        self._pool = pool
        self.generation = pool.generation
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: Response[_Peer] | None = None
        self._head: asyncio.Future[None] | None = None
        self.closed = False
        self.retire = False
        """Close after the current response instead of pooling it (the peer was revoked, or
        sent its TLS close_notify)."""
        self.idle_since = 0.0
        self.peer: _Peer | None = None
        self.tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._handshake: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """TLS on this connection, through memory BIOs: asyncio's TLS transport would put a
        layer of Python buffering and flow control under every read and write (~16 % of the
        caller's CPU per mTLS call in its profile); one request at a time needs none of it."""
        self.tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._handshake = asyncio.get_running_loop().create_future()
        self._handshake_step()
        await self._handshake

    def _handshake_step(self) -> None:
        assert self.tls is not None
        assert self._handshake is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except ssl.SSLError as exc:
            self._flush_tls()  # the alert that tells the agent why
            self._handshake.set_exception(exc)
            return
        self._flush_tls()
        self._handshake.set_result(None)

    def _flush_tls(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _decrypt(self, data: bytes) -> bytes | None:
        """The plaintext in ``data`` (None: nothing for the HTTP parser yet)."""
        assert self.tls is not None
        self._incoming.write(data)
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            self._handshake_step()
            if not handshake.done() or handshake.cancelled() or handshake.exception():
                return None
        try:
            plain, closed = read_plaintext(self.tls, self._incoming)
        except ssl.SSLError as exc:
            self._broken(f"TLS error ({exc.reason or exc})")
            return None
        if closed:
            # close_notify: the agent sends nothing more, so no request may go out here; its TCP
            # close can come much later (asyncio's TLS first waits for our close_notify).
            self._peer_done()
        self._flush_tls()  # e.g. a key update's answer
        return plain or None

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            plain = self._decrypt(data)
            if plain is None:
                return
            data = plain
        if self.response is None:
            self._broken("the agent sent data nobody asked for")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(f"invalid HTTP response ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(
                ConnectFailed(
                    "TLS handshake failed: the agent closed the connection (it refused this "
                    "sidecar's certificate or has no mesh identity in our trust domain; its log "
                    "says why)"
                )
            )
        response = self.response
        if response is not None and not response._complete:
            reason = (
                "connection closed by the agent before it replied"
                if not response.status
                else "connection closed by the agent mid-response"
            )
            self._fail(Disconnected(f"{reason}: {exc}" if exc else reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self._parser.get_status_code()
        response.keep_alive = self._parser.should_keep_alive()
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._buffer += body
        self.response._wake()

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._complete = True
        self.response._wake()

    async def send(self, data: bytes) -> Response[_Peer]:
        """Write one request and wait for the head of its response."""
        assert self.transport is not None
        response = self.response = Response(self)
        head = self._head = asyncio.get_running_loop().create_future()
        if self.tls is not None:
            self.tls.write(data)
            data = self._outgoing.read()
        self.transport.write(data)
        try:
            await head
        except BaseException:
            self._head = None
            response.close()
            raise
        self._head = None
        return response

    def finished(self, response: Response[_Peer], *, reusable: bool) -> None:
        if response is not self.response:
            return
        self.response = None
        if reusable and not self.retire and not self.closed:
            self._pool.checkin(self)
        else:
            self.close()

    def _peer_done(self) -> None:
        self.retire = True
        if self.response is None:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
        self._pool.forget(self)

    def _broken(self, reason: str) -> None:
        self._fail(Disconnected(reason))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Disconnected) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._error = error
            self.response._wake()


class ConnectionPool(Generic[_Peer]):
    """Keep-alive connections by (host, port, TLS context, server name).

    ``verify``, for TLS connections, runs once the handshake is done and before a byte of a
    request is written: it returns what the connection knows of its peer (kept as
    ``connection.peer``) or raises to refuse it.
    """

    def __init__(
        self,
        *,
        keepalive: float = 30.0,
        verify: Callable[[ssl.SSLObject | None, str | None], _Peer] | None = None,
    ) -> None:
        self.keepalive = keepalive
        self._verify = verify
        self._idle: dict[_Key, list[_Connection[_Peer]]] = {}
        self._open: set[_Connection[_Peer]] = set()
        self.generation = 0
        """Bumped by :meth:`close`: a connection from before (one that was still connecting
        then) serves its request and closes instead of joining the pool."""

    @property
    def connections(self) -> frozenset[_Connection[_Peer]]:
        """Every open connection, idle or carrying a request."""
        return frozenset(self._open)

    async def request(
        self,
        host: str,
        port: int,
        data: bytes,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Response[_Peer]:
        """Send ``data`` (a whole HTTP/1.1 request) and return the response once its head is in."""
        key: _Key = (host, port, ssl_context, server_hostname)
        conn = self._checkout(key)
        if conn is None:
            conn = await self._connect(key)
        return await conn.send(data)

    def _checkout(self, key: _Key) -> _Connection[_Peer] | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self.keepalive
        while idle:
            conn = idle.pop()
            if not idle:
                del self._idle[key]  # no empty lists: keys (and old TLS contexts) never pile up
            # A closing transport (the agent's EOF arrived; connection_lost runs a turn later)
            # would drop the request, then report it as a disconnect: "it may have run".
            transport = conn.transport
            if (
                not conn.closed
                and transport is not None
                and not transport.is_closing()
                and conn.idle_since > oldest
            ):
                return conn
            conn.close()
        return None

    def checkin(self, conn: _Connection[_Peer]) -> None:
        if conn.generation != self.generation:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection[_Peer]) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    async def _connect(self, key: _Key) -> _Connection[_Peer]:
        host, port, context, server_hostname = key
        loop = asyncio.get_running_loop()
        conn = _Connection(self, key)
        try:
            await loop.create_connection(lambda: conn, host, port)
        except ConnectionRefusedError as exc:
            raise ConnectFailed(f"connection refused ({exc.strerror or exc})") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect ({exc.strerror or exc})") from exc
        try:
            if context is not None:
                await conn.start_tls(context, server_hostname)
                if self._verify is not None:
                    conn.peer = self._verify(conn.tls, server_hostname)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise ConnectFailed(exc.verify_message or str(exc), certificate=True) from exc
            if isinstance(exc, ssl.SSLError):
                raise ConnectFailed(f"TLS handshake failed: {exc.reason or exc}") from exc
            raise
        if conn.closed:
            raise ConnectFailed("connection closed by the agent right after it was opened")
        self._open.add(conn)
        return conn

    def close_where(self, doomed: Callable[[_Peer | None], bool]) -> int:
        """Stop using connections whose peer is ``doomed``; returns how many.

        Idle ones close at once; one carrying a request finishes it (it was sent before we
        knew) and closes instead of going back to the pool.
        """
        count = 0
        for conn in list(self._open):
            if doomed(conn.peer):
                count += 1
                if conn.response is None:
                    conn.close()
                else:
                    conn.retire = True
        return count

    def close(self) -> None:
        self.generation += 1
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
