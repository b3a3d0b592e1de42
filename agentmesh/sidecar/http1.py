"""HTTP/1.1 keep-alive connections for the transport: one request shape, on asyncio directly.

Why not aiohttp or httpx here: a mesh call is always one small POST to a peer we resolved ourselves,
and general clients spend most of a caller's CPU on generality: profiling the caller under load
(``python bench/profile_mesh.py record --side client``; the numbers are in docs/benchmarks.md) put
much of its CPU in aiohttp's request and response objects, header multidicts, URL parsing, cookie
and tracing hooks, and httpx's pool is slower still. Here a request is one byte string, prebuilt up
to its per-call headers and written once, and the response is parsed in C by httptools (uvicorn's
parser, already a dependency). A connection carries one request at a time; idle ones are pooled per
(host, port, TLS context, server name), so a connection checked for one identity is never reused for
another and a renewed certificate (a new context) is used by new connections while open ones finish
their work.

Only what the transport needs: no redirects, cookies, proxies or compression. As strict as h11
where it matters, because the peer is another process we do not control: a byte after a
complete reply (or on an idle connection) is a protocol error and the connection is dropped,
never read as the next answer; 1xx replies are skipped and a 101 nobody asked for is refused;
reply heads, bodies and stream lines are bounded, and a stream's slow consumer pauses the socket.
Every bound is a setting (:class:`Limits`). Failures are this module's exceptions, split by
whether the request can have left: :class:`ConnectFailed` (it cannot) and :class:`Disconnected`
(it may have; :class:`TooLarge` is the reply that was too big).
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httptools

from agentmesh.security.bio import close_notify, read_plaintext
from agentmesh.settings import Settings

__all__ = ["ConnectFailed", "ConnectionPool", "Disconnected", "Limits", "Response", "TooLarge"]

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


class TooLarge(Disconnected):
    """The reply's body, or one line of a stream, is over its limit (the connection is dropped)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The pool's bounds, each one setting (``agentmesh/settings.py`` says why each number)."""

    connect_timeout: float
    idle_timeout: float
    max_connections: int
    max_waiting: int
    max_head_bytes: int
    max_headers: int
    max_body_bytes: int
    max_line_bytes: int
    stream_buffer_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.pool_idle_timeout,
            max_connections=settings.pool_max_connections,
            max_waiting=settings.pool_max_waiting,
            max_head_bytes=settings.max_response_head_bytes,
            max_headers=settings.max_response_headers,
            max_body_bytes=settings.max_response_bytes,
            max_line_bytes=settings.max_event_line_bytes,
            stream_buffer_bytes=settings.stream_buffer_bytes,
        )


_DEFAULT_LIMITS = Limits.from_settings(Settings.model_construct())  # defaults, no environment


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
        """0 until the final (non-1xx) head has arrived."""
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
        if self._error is not None:  # complete, then more bytes than this reply
            raise self._error
        body = bytes(self._buffer)
        self._buffer.clear()
        self.release()
        return body

    async def readline(self) -> bytes:
        """The next line including ``\\n``; ``b""`` when the body has ended."""
        limit = self._conn.limits.max_line_bytes
        while True:
            buffer = self._buffer
            end = buffer.find(b"\n")
            if 0 <= end < limit:
                line = bytes(buffer[: end + 1])
                del buffer[: end + 1]
                return line
            if end >= limit or len(buffer) >= limit:
                self.close()
                raise TooLarge(
                    f"a line of the stream is over {limit} bytes (AGENTMESH_MAX_EVENT_LINE_BYTES)"
                )
            if self._error is not None:
                raise self._error
            if self._complete:
                line = bytes(buffer)
                buffer.clear()
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
        conn = self._conn
        if conn.paused:
            conn.resume()  # the consumer caught up
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
    """One keep-alive connection and its response parser (httptools calls the ``on_*``).

    A callback that finds the reply breaking a rule raises (:meth:`_refuse`): httptools stops
    parsing and raises its own error, which :meth:`data_received` turns into a dropped
    connection, failing the reply with the rule's error.
    """

    def __init__(self, pool: ConnectionPool[_Peer], key: _Key) -> None:
        self._pool = pool
        self.limits = pool.limits
        self.generation = pool.generation
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: Response[_Peer] | None = None
        self._head: asyncio.Future[None] | None = None
        self.closed = False
        self.counted = False
        """It holds one of its endpoint's connection slots (given back by ``forget``)."""
        self.retire = False
        """Close after the current response instead of pooling it (the peer was revoked, or
        sent its TLS close_notify)."""
        self.idle_since = 0.0
        self.paused = False
        """Reading is paused: a stream's consumer is behind (``stream_buffer_bytes``)."""
        self.peer: _Peer | None = None
        self.tls: ssl.SSLObject | None = None
        self._secure = False
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._handshake: asyncio.Future[None] | None = None
        self._refused: Disconnected | None = None
        self._poll: select.poll | None = None
        # Per reply: bytes the parser holds without handing anything over (a field still being
        # read), and the header fields (and their bytes) seen so far.
        self._held = 0
        self._fields = 0
        self._field_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def readable(self) -> bool:
        """Bytes or an EOF wait in the socket that the loop has not read yet (one ``poll``)."""
        return self._poll is not None and bool(self._poll.poll(0))

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """TLS on this connection, through memory BIOs: asyncio's TLS transport would put a
        layer of Python buffering and flow control under every read and write (a large share of the
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
        self._secure = True
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
            self._broken(Disconnected(f"TLS error ({exc.reason or exc})"))
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
            self._broken(Disconnected("the agent sent data nobody asked for"))
            return
        self._held += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._broken(self._refused or Disconnected(f"invalid HTTP response ({exc})"))
            return
        if self._held > self.limits.max_head_bytes:  # one field that never ends
            self._broken(self._head_too_large())

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

    def _refuse(self, error: Disconnected) -> Disconnected:
        """Keep why a callback stops the parser: httptools raises an error of its own."""
        self._refused = error
        return error

    def _head_too_large(self) -> Disconnected:
        limit = self.limits.max_head_bytes
        return Disconnected(f"reply head over {limit} bytes (AGENTMESH_MAX_RESPONSE_HEAD_BYTES)")

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._complete:
            raise self._refuse(
                Disconnected("the agent sent bytes after its response (a protocol error)")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._held = 0
        self._fields += 1
        self._field_bytes += len(name) + len(value)
        if self._fields > self.limits.max_headers:
            raise self._refuse(
                Disconnected(
                    f"reply head with over {self.limits.max_headers} header fields "
                    "(AGENTMESH_MAX_RESPONSE_HEADERS)"
                )
            )
        if self._field_bytes > self.limits.max_head_bytes:
            raise self._refuse(self._head_too_large())
        response = self.response
        assert response is not None
        if not response.status:  # trailers (after the body) are bounded, never kept
            response.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._held = 0
        response = self.response
        assert response is not None
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise self._refuse(
                    Disconnected("the agent switched protocols (101), which nobody asked for")
                )
            response.headers.clear()  # an interim reply (100, 103): the final one follows
            return
        response.status = status
        response.keep_alive = self._parser.should_keep_alive()
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._held = 0
        response = self.response
        assert response is not None
        buffer = response._buffer
        buffer += body
        if len(buffer) > self.limits.max_body_bytes:
            raise self._refuse(
                TooLarge(
                    f"the reply is over {self.limits.max_body_bytes} bytes "
                    "(AGENTMESH_MAX_RESPONSE_BYTES)"
                )
            )
        if response._waiter is not None:
            response._wake()
        elif len(buffer) >= self.limits.stream_buffer_bytes and not self.paused:
            # Nobody is reading: hold off until the consumer asks for more (Response._wait).
            assert self.transport is not None
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self._held = 0
        response = self.response
        assert response is not None
        if not response.status:
            return  # the end of an interim reply
        response._complete = True
        response._wake()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    async def send(self, data: bytes) -> Response[_Peer]:
        """Write one request and wait for the head of its response."""
        assert self.transport is not None
        response = self.response = Response(self)
        self._held = self._fields = self._field_bytes = 0
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
            if self.paused:
                self.resume()  # idle, it must see the agent's EOF (or stray bytes) at once
            self._pool.checkin(self)
        else:
            self.close()

    def _peer_done(self) -> None:
        self.retire = True
        if self.response is None:
            self.close()

    def close(self) -> None:
        transport = self.transport
        if not self.closed and transport is not None:
            self.closed = True
            if self._secure and not transport.is_closing():
                assert self.tls is not None
                transport.write(close_notify(self.tls, self._outgoing))
            transport.close()
        self._pool.forget(self)

    def _broken(self, error: Disconnected) -> None:
        """A protocol error: fail the reply in progress and drop the connection at once."""
        self._fail(error)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._pool.forget(self)

    def _fail(self, error: Disconnected) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._error = error
            self.response._wake()


class ConnectionPool(Generic[_Peer]):
    """Keep-alive connections by (host, port, TLS context, server name).

    At most ``limits.max_connections`` per key (one endpoint as one identity); a request beyond
    waits for one to be given back or closed, up to ``limits.connect_timeout``, with at most
    ``limits.max_waiting`` waiting. ``verify``, for TLS connections, runs once the handshake is
    done and before a byte of a request is written: it returns what the connection knows of its
    peer (kept as ``connection.peer``) or raises to refuse it.
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        verify: Callable[[ssl.SSLObject | None, str | None], _Peer] | None = None,
    ) -> None:
        self.limits = limits or _DEFAULT_LIMITS
        self._verify = verify
        self._idle: dict[_Key, list[_Connection[_Peer]]] = {}
        self._open: set[_Connection[_Peer]] = set()
        self._counts: dict[_Key, int] = {}
        """Connections per key, open or opening."""
        self._waiting: dict[_Key, deque[asyncio.Future[_Connection[_Peer] | None]]] = {}
        """Per key, the requests waiting for a connection: each gets one given back, or None
        (a slot became free: open one)."""
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
            conn = await self._acquire(key)
        return await conn.send(data)

    def _checkout(self, key: _Key) -> _Connection[_Peer] | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self.limits.idle_timeout
        while idle:
            conn = idle.pop()
            if not idle:
                del self._idle[key]  # no empty lists: keys (and old TLS contexts) never pile up
            if conn.idle_since > oldest and _usable(conn):
                return conn
            conn.close()
        return None

    async def _acquire(self, key: _Key) -> _Connection[_Peer]:
        """A new connection or, at the key's limit, one another request gives back."""
        deadline = None
        while True:
            if self._counts.get(key, 0) < self.limits.max_connections:
                return await self._connect(key)
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.limits.connect_timeout
            conn = await self._wait_turn(key, deadline)
            if conn is not None:
                if _usable(conn):
                    return conn
                conn.close()

    async def _wait_turn(self, key: _Key, deadline: float) -> _Connection[_Peer] | None:
        limits = self.limits
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = deque()
        if len(queue) >= limits.max_waiting:
            if not queue:
                del self._waiting[key]
            raise ConnectFailed(
                f"{limits.max_connections} connections busy and {len(queue)} requests waiting "
                "(AGENTMESH_POOL_MAX_CONNECTIONS, AGENTMESH_POOL_MAX_WAITING)"
            )
        turn: asyncio.Future[_Connection[_Peer] | None]
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            async with asyncio.timeout_at(deadline):
                return await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._pass_on(key, turn.result())  # given to us just as we gave up
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(
                    f"no connection free within {limits.connect_timeout:g}s: "
                    f"{limits.max_connections} busy (AGENTMESH_POOL_MAX_CONNECTIONS)"
                ) from exc
            raise
        finally:
            if turn.cancelled() and turn in queue:
                queue.remove(turn)
            if not queue and self._waiting.get(key) is queue:
                del self._waiting[key]

    def _pass_on(self, key: _Key, conn: _Connection[_Peer] | None) -> None:
        if conn is not None:
            self.checkin(conn)
        else:
            self._hand_over(key, None)

    def _hand_over(self, key: _Key, conn: _Connection[_Peer] | None) -> bool:
        """Give ``conn`` (or a free slot: None) to the first request waiting on ``key``."""
        queue = self._waiting.get(key)
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(conn)
                return True
        return False

    def checkin(self, conn: _Connection[_Peer]) -> None:
        if conn.generation != self.generation:
            conn.close()
            return
        if self._waiting and self._hand_over(conn.key, conn):
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection[_Peer]) -> None:
        self._open.discard(conn)
        key = conn.key
        if conn.counted:
            conn.counted = False
            left = self._counts[key] - 1
            if left:
                self._counts[key] = left
            else:
                del self._counts[key]
            if self._waiting:
                self._hand_over(key, None)
        idle = self._idle.get(key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[key]

    async def _connect(self, key: _Key) -> _Connection[_Peer]:
        conn = _Connection(self, key)
        conn.counted = True
        self._counts[key] = self._counts.get(key, 0) + 1
        timeout = self.limits.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._establish(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(
                    f"no connection within {timeout:g}s (TCP connect and TLS handshake, "
                    "AGENTMESH_CONNECT_TIMEOUT)"
                ) from exc
            raise
        self._open.add(conn)
        return conn

    async def _establish(self, conn: _Connection[_Peer]) -> None:
        host, port, context, server_hostname = conn.key
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, host, port)
        except ConnectionRefusedError as exc:
            raise ConnectFailed(f"connection refused ({exc.strerror or exc})") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect ({exc.strerror or exc})") from exc
        if context is not None:
            try:
                await conn.start_tls(context, server_hostname)
            except ssl.SSLCertVerificationError as exc:
                raise ConnectFailed(exc.verify_message or str(exc), certificate=True) from exc
            except ssl.SSLError as exc:
                raise ConnectFailed(f"TLS handshake failed: {exc.reason or exc}") from exc
            if self._verify is not None:
                conn.peer = self._verify(conn.tls, server_hostname)
        if conn.closed:
            raise ConnectFailed("connection closed by the agent right after it was opened")

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


def _usable(conn: _Connection[Any]) -> bool:
    """Whether a request may go out on ``conn``, which carries none now.

    Not if its transport is closing (the agent's EOF arrived; ``connection_lost`` runs a turn
    later), nor if the socket holds bytes the loop has not read (a reply to nobody, an EOF):
    the request would be lost and reported as "may have run", or answered by a stale reply.
    """
    transport = conn.transport
    return (
        not conn.closed
        and transport is not None
        and not transport.is_closing()
        and not conn.readable()
    )
