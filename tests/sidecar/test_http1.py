"""The transport's HTTP/1.1 connections against real sockets on 127.0.0.1.

Each server here is a plain ``asyncio`` server that answers with hand-written bytes, so every
case (keep-alive, a close before or during a reply, garbage, a chunked stream, TLS) is exactly
what the wire carries; the mesh-level behaviour of the same faults is in test_calls.py and the
e2e suite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpcore
import pytest

from agentmesh.settings import Settings
from agentmesh.sidecar import http1
from agentmesh.sidecar.http1 import ConnectFailed, ConnectionPool, Disconnected
from tests.conftest import WaitUntil
from tests.mesh_ca import mesh_ca

REQUEST = b"POST /v1/invoke/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(
    handler: Handler, context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on an ephemeral port; yields (port, connections accepted so far)."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield srv.sockets[0].getsockname()[1], accepted
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()


async def test_a_connection_is_kept_alive_and_reused() -> None:
    pool: ConnectionPool[None] = ConnectionPool()
    async with server(answer_each) as (port, accepted):
        for _ in range(3):
            resp = await pool.request("127.0.0.1", port, REQUEST)
            assert (resp.status, resp.content_type) == (200, b"application/json")
            assert await resp.read() == b"{}"
        assert len(accepted) == 1
        assert len(pool.connections) == 1
    pool.close()


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close: keep-alive ends on the server's side

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(once) as (port, accepted):
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        for _ in range(100):  # until the close has reached the pool
            if not pool.connections:
                break
            await asyncio.sleep(0.01)
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


async def test_a_close_before_the_reply_and_one_mid_body_are_disconnects() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def half_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}")
        await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(hang_up) as (port, _):
        with pytest.raises(Disconnected, match="before it replied"):
            await pool.request("127.0.0.1", port, REQUEST)
    async with server(half_body) as (port, _):
        resp = await pool.request("127.0.0.1", port, REQUEST)
        with pytest.raises(Disconnected, match="mid-response"):
            await resp.read()
    assert not pool.connections


async def test_garbage_is_a_disconnect_and_the_connection_is_dropped() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(garbage) as (port, _):
        with pytest.raises(Disconnected, match="invalid HTTP response"):
            await pool.request("127.0.0.1", port, REQUEST)
        assert not pool.connections


async def test_nobody_listening_is_a_connect_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        pool: ConnectionPool[None] = ConnectionPool()
        with pytest.raises(ConnectFailed, match="connection refused"):
            await pool.request("127.0.0.1", port, REQUEST)


async def test_a_cancelled_request_never_returns_its_connection_to_the_pool() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.3)
            writer.write(OK)
            await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(slow) as (port, accepted):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pool.request("127.0.0.1", port, REQUEST)
        # The late reply must not be read as the answer to the next request.
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


async def test_a_chunked_event_stream_is_read_line_by_line() -> None:
    async def events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for part in (b"event: chunk\ndata: 1\n\n", b"event: end\ndata: {}\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # the connection is reusable
        writer.write(OK)
        await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(events) as (port, accepted):
        resp = await pool.request("127.0.0.1", port, REQUEST)
        assert resp.content_type == b"text/event-stream"
        lines = []
        while line := await resp.readline():
            lines.append(line)
        events = [b"event: chunk\n", b"data: 1\n", b"\n", b"event: end\n", b"data: {}\n", b"\n"]
        assert lines == events
        resp.release()
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 1
    pool.close()


async def test_tls_verifies_the_server_and_keeps_what_the_check_returned() -> None:
    ca = mesh_ca()
    server_context = ca.server_tls("echoer").server_context()
    seen: list[str | None] = []

    def verify(ssl_object: ssl.SSLObject | None, server_hostname: str | None) -> str:
        assert ssl_object is not None
        assert ssl_object.getpeercert(binary_form=True)
        seen.append(server_hostname)
        return "checked"

    pool: ConnectionPool[str] = ConnectionPool(verify=verify)
    client_context = ca.client_context()  # connections are pooled per context
    async with server(answer_each, server_context) as (port, accepted):
        for _ in range(2):
            resp = await pool.request(
                "127.0.0.1",
                port,
                REQUEST,
                ssl_context=client_context,
                server_hostname="echoer.agent.test",
            )
            assert await resp.read() == b"{}"
        assert len(accepted) == 1
        assert seen == ["echoer.agent.test"]
        assert [c.peer for c in pool.connections] == ["checked"]

        # A client that does not trust the server's CA: a certificate failure, nothing sent.
        stranger = ssl.create_default_context()
        stranger.check_hostname = False
        with pytest.raises(ConnectFailed) as failed:
            await pool.request("127.0.0.1", port, REQUEST, ssl_context=stranger)
        assert failed.value.certificate
    pool.close()


async def test_a_refused_peer_check_closes_the_connection() -> None:
    ca = mesh_ca()

    def refuse(ssl_object: ssl.SSLObject | None, server_hostname: str | None) -> str:
        raise PermissionError("not the agent we resolved")

    pool: ConnectionPool[str] = ConnectionPool(verify=refuse)
    async with server(answer_each, ca.server_tls("echoer").server_context()) as (port, _):
        with pytest.raises(PermissionError):
            await pool.request("127.0.0.1", port, REQUEST, ssl_context=ca.client_context())
        assert not pool.connections


async def test_a_connection_the_server_closed_is_not_reused_before_its_close_completes() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(once) as (port, accepted):
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        # The first loop turn after the server's EOF arrived: asyncio has closed the transport,
        # the protocol's connection_lost runs a turn later. A request now must not go out on it
        # (it would be dropped, then reported as a disconnect: "may have run").
        deadline = asyncio.get_running_loop().time() + 5
        while not all(c.transport and c.transport.is_closing() for c in pool.connections):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


async def test_a_tls_close_notify_retires_the_connection() -> None:
    # asyncio's TLS server sends close_notify, then waits (up to 30 s) for ours before its TCP
    # close: in between, the connection must not look reusable.
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    ca = mesh_ca()
    pool: ConnectionPool[None] = ConnectionPool()
    context = ca.client_context()
    async with server(once, ca.server_tls("echoer").server_context()) as (port, accepted):
        for _ in range(2):
            async with asyncio.timeout(5):
                resp = await pool.request("127.0.0.1", port, REQUEST, ssl_context=context)
                assert await resp.read() == b"{}"
            for _ in range(200):  # until the close_notify has reached the pool
                if not pool.connections:
                    break
                await asyncio.sleep(0.01)
            assert not pool.connections
        assert len(accepted) == 2
    pool.close()


async def test_connection_close_ends_reuse_and_the_pool_keeps_nothing_of_closed_connections() -> (
    None
):
    replies = iter([OK, OK.replace(b"OK\r\n", b"OK\r\nconnection: close\r\n")])

    async def two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
        await reader.read()  # the client closes, not us

    ca = mesh_ca()
    pool: ConnectionPool[None] = ConnectionPool()
    context = ca.client_context()
    context_ref = weakref.ref(context)
    async with server(two, ca.server_tls("echoer").server_context()) as (port, accepted):
        for _ in range(2):
            resp = await pool.request("127.0.0.1", port, REQUEST, ssl_context=context)
            assert await resp.read() == b"{}"
        del resp
        assert not pool.connections  # "connection: close": given up, not pooled
        assert len(accepted) == 1
        # A renewed certificate is a new context: the pool must not keep old ones (nor keys of
        # endpoints long gone) alive once their connections are closed.
        del context
        for _ in range(200):  # until the transport has let go of the connection
            gc.collect()
            if context_ref() is None:
                break
            await asyncio.sleep(0.01)
        assert context_ref() is None
    pool.close()


async def test_a_connection_still_opening_when_the_pool_closes_is_not_pooled() -> None:
    pool: ConnectionPool[None] = ConnectionPool()
    async with server(answer_each) as (port, _):
        opening = asyncio.create_task(pool.request("127.0.0.1", port, REQUEST))
        await asyncio.sleep(0)  # the connect has started
        pool.close()
        resp = await opening  # the request still gets its answer ...
        assert await resp.read() == b"{}"
        assert not pool.connections  # ... and its connection is closed, not pooled
        # The pool stays usable: a new request opens a new connection.
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(pool.connections) == 1
    pool.close()


# --------------------------------------------------------------------------------------
# Strictness: what h11 refuses, this client refuses too (and a few things h11 lets through).
# --------------------------------------------------------------------------------------


def limits(**changes: object) -> http1.Limits:
    """The default limits (the settings' defaults) with ``changes``."""
    return dataclasses.replace(http1.Limits.from_settings(Settings.model_construct()), **changes)


def waiting(pool: ConnectionPool[None]) -> int:
    """Requests waiting for a connection, over every endpoint."""
    return sum(len(queue) for queue in pool._waiting.values())


async def test_bytes_after_a_complete_response_are_a_protocol_error_and_drop_the_connection() -> (
    None
):
    # httpcore's pool (the oracle) reads "second" as the reply to the *next* request on this
    # connection; here nothing after a reply is ever read as an answer.
    seen: list[int] = []

    async def two_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        if len(seen) == 1:  # only the first connection misbehaves
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 6\r\n\r\nsecond"
            )
        await answer_each(reader, writer)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(two_replies) as (port, accepted):
        resp = await pool.request("127.0.0.1", port, REQUEST)
        assert resp.status == 200
        with pytest.raises(Disconnected, match="bytes after its response"):
            await resp.read()
        assert not pool.connections
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


@pytest.mark.parametrize("how", ["stray bytes", "EOF"])
async def test_an_idle_connection_that_became_readable_is_never_reused(how: str) -> None:
    # The bytes (or the FIN) are in the socket before the request goes out, but the loop has not
    # read them yet: a stale reply read as the next answer, or a request lost to a closed socket.
    written = asyncio.Event()

    async def then_stale(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has read the reply and pooled the connection
        if how == "EOF":
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
        written.set()
        await answer_each(reader, writer)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(then_stale) as (port, accepted):
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        await written.wait()  # resumes before the loop's next read of the client's socket
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


async def test_interim_1xx_responses_are_skipped() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n" + OK)
            await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(interim) as (port, accepted):
        for _ in range(2):
            resp = await pool.request("127.0.0.1", port, REQUEST)
            assert (resp.status, resp.content_type) == (200, b"application/json")
            assert b"link" not in resp.headers
            assert await resp.read() == b"{}"
        assert len(accepted) == 1  # skipping them left the connection reusable
    pool.close()


async def test_a_101_nobody_asked_for_is_a_protocol_error() -> None:
    async def switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(1)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(switch) as (port, _):
        with pytest.raises(Disconnected, match="101"):
            await pool.request("127.0.0.1", port, REQUEST)
        assert not pool.connections


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"".join(b"x-h%d: 1\r\n" % i for i in range(101)), "over 100 header fields"),
        (b"x-big: " + b"a" * 16 * 1024 + b"\r\n", "head over 16384 bytes"),
    ],
    ids=["101 fields", "a 16 KiB field"],
)
async def test_a_response_head_over_its_limits_is_refused(head: bytes, error: str) -> None:
    async def big_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"content-length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(1)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(big_head) as (port, _):
        with pytest.raises(Disconnected, match=error):
            await pool.request("127.0.0.1", port, REQUEST)
        assert not pool.connections


async def test_an_endless_header_line_is_refused_before_it_ends() -> None:
    # httptools keeps a field until its line ends: without a bound, the agent decides how much
    # of this process's memory one reply takes.
    sent: list[int] = []

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(512):  # 32 MiB if nobody stops it
            writer.write(b"a" * 65536)
            await writer.drain()
            sent.append(1)

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(endless) as (port, _):
        async with asyncio.timeout(10):
            with pytest.raises(Disconnected, match="AGENTMESH_MAX_RESPONSE_HEAD_BYTES"):
                await pool.request("127.0.0.1", port, REQUEST)
        assert len(sent) < 64


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_response_limit_is_refused(framing: str) -> None:
    def reply(body: bytes) -> bytes:
        if framing == "chunked":
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100])
                for i in range(0, len(body), 100)
            )
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for size in (1000, 1001):
            await read_request(reader)
            writer.write(reply(b"x" * size))
            await writer.drain()
        await asyncio.sleep(1)

    pool: ConnectionPool[None] = ConnectionPool(limits=limits(max_body_bytes=1000))
    async with server(sized) as (port, _):
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"x" * 1000
        resp = await pool.request("127.0.0.1", port, REQUEST)
        with pytest.raises(http1.TooLarge, match="over 1000 bytes.*AGENTMESH_MAX_RESPONSE_BYTES"):
            await resp.read()
        assert not pool.connections


async def test_an_event_stream_line_over_its_limit_is_refused() -> None:
    async def lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for size in (99, 100):  # with its "\n": 100 bytes (the limit), then 101
            part = b"d" * size + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        await asyncio.sleep(1)

    pool: ConnectionPool[None] = ConnectionPool(limits=limits(max_line_bytes=100))
    async with server(lines) as (port, _):
        resp = await pool.request("127.0.0.1", port, REQUEST)
        assert await resp.readline() == b"d" * 99 + b"\n"
        with pytest.raises(http1.TooLarge, match="AGENTMESH_MAX_EVENT_LINE_BYTES"):
            await resp.readline()
        resp.close()
    assert not pool.connections


async def test_a_slow_stream_consumer_pauses_reading_until_it_reads_again() -> None:
    # The agent writes as fast as it can; the caller reads nothing for a while. The caller must
    # stop reading (TCP then pushes back on the agent) instead of buffering the whole stream.
    pushed_back = asyncio.Event()
    event = b"event: chunk\ndata: " + b"z" * 1000 + b"\n\n"
    count = 32 * 1024  # 32 MiB of events in all

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.set_write_buffer_limits(high=64 << 20)  # drain() never waits
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        frame = b"%x\r\n%s\r\n" % (len(event) * 64, event * 64)
        for _ in range(count // 64):
            writer.write(frame)
            if writer.transport.get_write_buffer_size() > 1 << 20:
                pushed_back.set()  # the kernel's buffers are full: the caller stopped reading
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(firehose) as (port, _):
        resp = await pool.request("127.0.0.1", port, REQUEST)
        async with asyncio.timeout(20):
            await pushed_back.wait()
        held = len(resp._buffer)
        assert held <= limits().stream_buffer_bytes + 256 * 1024, held  # + at most one read
        received = 0
        async with asyncio.timeout(20):
            while line := await resp.readline():
                received += line.startswith(b"data: ")
        assert received == count
        resp.release()
    pool.close()


async def test_a_connect_that_never_completes_its_tls_handshake_times_out() -> None:
    # A frozen agent: the kernel completes TCP handshakes for its listening socket, nothing
    # answers the ClientHello. Nothing was sent, so this is "never reached" (retried elsewhere).
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        port = frozen.getsockname()[1]
        pool: ConnectionPool[None] = ConnectionPool(limits=limits(connect_timeout=0.3))
        async with asyncio.timeout(10):
            with pytest.raises(ConnectFailed, match="no connection within 0.3s"):
                await pool.request(
                    "127.0.0.1", port, REQUEST, ssl_context=mesh_ca().client_context()
                )
        assert not pool.connections


async def test_connections_per_endpoint_are_limited_and_requests_wait_in_a_bounded_queue(
    wait_until: WaitUntil,
) -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    pool: ConnectionPool[None] = ConnectionPool(
        limits=limits(max_connections=2, max_waiting=2, connect_timeout=10)
    )

    async def call() -> bytes:
        return await (await pool.request("127.0.0.1", port, REQUEST)).read()

    async with server(held) as (port, accepted):
        calls = [asyncio.create_task(call()) for _ in range(4)]
        await wait_until(lambda: len(accepted) == 2 and waiting(pool) == 2)
        with pytest.raises(ConnectFailed, match="2 connections busy and 2 requests waiting"):
            await call()  # the queue is full: refused at once, nothing sent
        release.set()
        assert await asyncio.gather(*calls) == [b"{}"] * 4
        assert len(accepted) == 2  # the waiting requests went out on the first two connections
    pool.close()


async def test_a_request_waits_for_a_connection_no_longer_than_the_connect_timeout() -> None:
    busy = asyncio.Event()

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        busy.set()
        await asyncio.sleep(5)

    pool: ConnectionPool[None] = ConnectionPool(
        limits=limits(max_connections=1, connect_timeout=0.2)
    )
    async with server(stuck) as (port, _):
        first = asyncio.create_task(pool.request("127.0.0.1", port, REQUEST))
        await busy.wait()
        with pytest.raises(ConnectFailed, match="no connection free within 0.2s"):
            await pool.request("127.0.0.1", port, REQUEST)
        # A waiter that gives up (cancelled by its deadline) leaves no trace in the queue.
        waiter = asyncio.create_task(pool.request("127.0.0.1", port, REQUEST))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert waiting(pool) == 0
        first.cancel()
    pool.close()


async def test_a_connection_given_to_a_waiter_that_gave_up_goes_to_the_next_user(
    wait_until: WaitUntil,
) -> None:
    pool: ConnectionPool[None] = ConnectionPool(limits=limits(max_connections=1))
    async with server(answer_each) as (port, accepted):
        first = await pool.request("127.0.0.1", port, REQUEST)
        waiter = asyncio.create_task(pool.request("127.0.0.1", port, REQUEST))
        await wait_until(lambda: waiting(pool) == 1)
        assert await first.read() == b"{}"  # released: handed to the waiter, which has not run
        waiter.cancel()  # ... and now never will
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert waiting(pool) == 0
        assert await (await pool.request("127.0.0.1", port, REQUEST)).read() == b"{}"
        assert len(accepted) == 1  # the connection was kept, not leaked or closed
    pool.close()


async def test_a_closed_connection_frees_its_slot_for_a_waiting_request(
    wait_until: WaitUntil,
) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK.replace(b"OK\r\n", b"OK\r\nconnection: close\r\n"))
        await writer.drain()
        await reader.read()  # the client closes, not us

    pool: ConnectionPool[None] = ConnectionPool(limits=limits(max_connections=1))
    async with server(closing) as (port, accepted):
        first = await pool.request("127.0.0.1", port, REQUEST)
        second = asyncio.create_task(pool.request("127.0.0.1", port, REQUEST))
        await wait_until(lambda: waiting(pool) == 1)
        assert await first.read() == b"{}"  # "connection: close": closed, its slot given on
        assert await (await second).read() == b"{}"
        assert len(accepted) == 2
    pool.close()


async def test_closing_a_tls_connection_sends_close_notify() -> None:
    # Without it the agent cannot tell our close from a truncation attack (RFC 8446 §6.1).
    ca = mesh_ca()
    context = ca.server_tls("echoer").server_context()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def tls_then_watch_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)

        async def until_done(step: Callable[[], bytes | None]) -> bytes | None:
            while True:
                try:
                    return step()
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    data = await reader.read(65536)
                    if not data:
                        raise EOFError from None
                    incoming.write(data)

        await until_done(tls.do_handshake)
        writer.write(outgoing.read())
        request = b""
        while len(request) < len(REQUEST):
            request += await until_done(lambda: tls.read(65536)) or b""
        tls.write(OK)
        writer.write(outgoing.read())
        try:
            while await until_done(lambda: tls.read(65536)):
                pass
            outcome.set_result("close_notify")
        except ssl.SSLZeroReturnError:
            outcome.set_result("close_notify")
        except EOFError:
            outcome.set_result("TCP close without close_notify")

    pool: ConnectionPool[None] = ConnectionPool()
    async with server(tls_then_watch_close) as (port, _):
        resp = await pool.request("127.0.0.1", port, REQUEST, ssl_context=ca.client_context())
        assert await resp.read() == b"{}"
        pool.close()
        async with asyncio.timeout(5):
            assert await outcome == "close_notify"


# Wire replies and what httpcore (h11) reads in them: the oracle. Where h11 accepts a reply we
# must read the same status and body; where it refuses one, so must we. STRICTER lists what we
# refuse although h11 accepts it, each for a reason.
AGREE = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    "chunked, extensions": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\n\r\n",
    "chunked, trailers": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    "100, then 200": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "103, then 201": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "HTTP/1.0": b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "no reason phrase": b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok",
    "whitespace around a value": b"HTTP/1.1 200 OK\r\nx-a:   v  \r\ncontent-length: 2\r\n\r\nok",
    "not HTTP": b"SMTP ready\r\n\r\n",
    "two content-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
    "negative content-length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nok",
    "bad chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "space in a name": b"HTTP/1.1 200 OK\r\nbad name: x\r\ncontent-length: 2\r\n\r\nok",
    "no colon": b"HTTP/1.1 200 OK\r\nnocolon\r\ncontent-length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 2\r\n\r\nok",
    "4-digit status": b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok",
    "unknown transfer-coding": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
    "101 nobody asked for": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
    b"connection: upgrade\r\n\r\n",
}
STRICTER = {
    # h11 reads the first; httpcore then reads the second as the reply to the next request.
    "a second reply after the first": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    b"HTTP/1.1 500 Oops\r\ncontent-length: 2\r\n\r\nno",
    # RFC 9112 §6.3: "ought to be handled as an error" (request smuggling, response splitting).
    "content-length and chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
    b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    # httptools (llhttp) refuses these obsolete forms; agents never send them.
    "obs-fold": b"HTTP/1.1 200 OK\r\nx-a: 1\r\n  2\r\ncontent-length: 2\r\n\r\nok",
    "bare LF line ends": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
}


@pytest.mark.parametrize("case", [*AGREE, *STRICTER])
async def test_replies_are_read_as_h11_reads_them_or_more_strictly(case: str) -> None:
    reply = AGREE.get(case) or STRICTER[case]

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    Outcome = tuple[int, bytes] | str
    async with server(once) as (port, _):
        oracle: Outcome
        try:
            async with httpcore.AsyncConnectionPool() as client:
                url = f"http://127.0.0.1:{port}/v1/invoke/echo"
                answer = await client.request("POST", url, content=b"{}")
                oracle = (answer.status, answer.content)
        except httpcore.RemoteProtocolError:
            oracle = "refused"
        pool: ConnectionPool[None] = ConnectionPool()
        ours: Outcome
        try:
            resp = await pool.request("127.0.0.1", port, REQUEST)
            ours = (resp.status, await resp.read())
        except Disconnected:
            ours = "refused"
        pool.close()
    if case in STRICTER:
        assert isinstance(oracle, tuple), oracle  # h11 reads it ...
        assert ours == "refused"  # ... and we do not
    else:
        assert ours == oracle
