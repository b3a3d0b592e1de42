"""The transport's HTTP/1.1 connections against real sockets on 127.0.0.1.

Each server here is a plain ``asyncio`` server that answers with hand-written bytes, so every
case (keep-alive, a close before or during a reply, garbage, a chunked stream, TLS) is exactly
what the wire carries; the mesh-level behaviour of the same faults is in test_calls.py and the
e2e suite.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from agentmesh.sidecar.http1 import ConnectFailed, ConnectionPool, Disconnected
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
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-")
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
