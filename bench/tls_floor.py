"""The floor under S3: what one TLS round trip costs between two processes, without the mesh.

``python bench/tls_floor.py [--work-kb 32,256,4096] [--calls N] [--rounds R]`` starts a server
process and runs a serial closed loop from this one over loopback TCP, three ways per round:

* ``plain`` — no TLS;
* ``bio`` — TLS 1.2 on ``ssl.SSLObject`` over memory BIOs, as the mesh runs it on both sides
  (``agentmesh/sidecar/http1.py``, ``agentmesh/inbound/tls.py``);
* ``socket`` — TLS on ``ssl.SSLSocket`` (OpenSSL reads and writes the socket itself).

Both sides use the mesh's own contexts (``agentmesh.security.pki``; certificates of a throwaway
mesh CA) and send a request and an answer of the sizes S3 sends. Between two messages each side
touches ``--work-kb`` KiB of memory, standing in for what a real caller and agent do between
two records (parsing, the capability, telemetry): the more, the colder OpenSSL's code and state
when the next record comes. It prints the p50 of each way and the difference TLS makes; no
agentmesh call path runs, so whatever difference this prints is out of reach for the mesh on
this machine with CPython's ``ssl`` (docs/benchmarks.md, "mTLS (M2 against M1)").
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.queues
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agentmesh.control.ca import CertificateAuthority, write_root_ca
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import client_context, new_key, server_context

_TRUST_DOMAIN = "agentmesh.local"
_MODES = ("plain", "bio", "socket")
_REQUEST = b"POST /v1/invoke/echo HTTP/1.1\r\n" + b"x-header: value\r\n" * 10 + b"\r\n" + b"a" * 256
_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n" + b"b" * 300
_READ = 65536
_WARM_UP = 300
_WIDTHS = (9, 7, 7, 7, 12, 11)


class _Work:
    """Touches one byte per cache line of ``kib`` KiB: a fixed amount of memory traffic."""

    def __init__(self, kib: int) -> None:
        self._buffer = bytearray(kib * 1024)
        self._line = b"\x01" * (len(self._buffer) // 64)

    def __call__(self) -> None:
        if self._buffer:
            self._buffer[::64] = self._line


def _contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = write_root_ca(directory, _TRUST_DOMAIN)
    ca = CertificateAuthority.from_files(cert, key, _TRUST_DOMAIN, ttl=3600.0)

    def leaf(name: str) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        private = new_key()
        return private, [ca.issue(private.public_key(), SpiffeId.agent(_TRUST_DOMAIN, name))]

    server_key, server_certs = leaf("floor-server")
    client_key, client_certs = leaf("floor-client")
    return (
        server_context(server_key, server_certs, ca.roots),
        client_context(client_key, client_certs, ca.roots),
    )


# ---- the server process ---------------------------------------------------------------------


class _PlainServer(asyncio.Protocol):
    def __init__(self, work: _Work) -> None:
        self._work = work
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._work()
        self._transport.write(_ANSWER)


class _BioServer(_PlainServer):
    def __init__(self, work: _Work, context: ssl.SSLContext) -> None:
        super().__init__(work)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._ready = False

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._incoming.write(data)
        if not self._ready:
            try:
                self._tls.do_handshake()
                self._ready = True
            except ssl.SSLWantReadError:
                pass
            self._transport.write(self._outgoing.read())
            return
        while self._incoming.pending or self._tls.pending():
            try:
                self._tls.read(_READ)
            except ssl.SSLWantReadError:
                break
        self._work()
        self._tls.write(_ANSWER)
        self._transport.write(self._outgoing.read())


async def _serve(
    mode: str, kib: int, context: ssl.SSLContext, port: multiprocessing.Queue[int]
) -> None:
    loop = asyncio.get_running_loop()
    work = _Work(kib)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port.put(listener.getsockname()[1])
    conn, _ = await loop.sock_accept(listener)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "plain":
        await loop.connect_accepted_socket(lambda: _PlainServer(work), conn)
    elif mode == "bio":
        await loop.connect_accepted_socket(lambda: _BioServer(work, context), conn)
    else:
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        loop.add_reader(tls.fileno(), _socket_ready, tls, work, [False])
    await asyncio.Event().wait()


def _socket_ready(tls: ssl.SSLSocket, work: _Work, ready: list[bool]) -> None:
    if not ready[0]:
        try:
            tls.do_handshake()
            ready[0] = True
        except ssl.SSLWantReadError:
            pass
        return
    while True:
        try:
            if not tls.recv(_READ):
                return
        except ssl.SSLWantReadError:
            return
        work()
        tls.sendall(_ANSWER)


def _server_main(
    mode: str, kib: int, context: ssl.SSLContext, port: multiprocessing.Queue[int]
) -> None:
    asyncio.run(_serve(mode, kib, context, port))


# ---- the caller -----------------------------------------------------------------------------


class _Caller(asyncio.Protocol):
    """Plain or memory-BIO TLS; ``answer`` resolves with each whole answer's first bytes."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = None if context is None else context.wrap_bio(self._incoming, self._outgoing)
        self.handshaking = self.tls is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self._resolve(data)
            return
        self._incoming.write(data)
        if self.handshaking:
            self._resolve(b"")
            return
        try:
            self._resolve(self.tls.read(_READ))
        except ssl.SSLWantReadError:
            return

    def _resolve(self, data: bytes) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tls is None:
            self.transport.write(data)
        else:
            self.tls.write(data)
            self.transport.write(self._outgoing.read())

    async def handshake(self) -> None:
        assert self.tls is not None
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.answer = loop.create_future()
                self.transport.write(self._outgoing.read())
                async with asyncio.timeout(5):
                    await self.answer
                continue
            self.transport.write(self._outgoing.read())
            self.handshaking = False
            return


async def _call_loop(
    mode: str, port: int, context: ssl.SSLContext, calls: int, kib: int
) -> list[int]:
    loop = asyncio.get_running_loop()
    work = _Work(kib)
    latencies: list[int] = []
    if mode == "socket":
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context.wrap_socket(raw, do_handshake_on_connect=False)
        tls.do_handshake()  # blocking: once, before the socket turns non-blocking
        tls.setblocking(False)
        answers: asyncio.Queue[None] = asyncio.Queue(maxsize=1)

        def readable() -> None:
            try:
                if tls.recv(_READ):
                    answers.put_nowait(None)
            except ssl.SSLWantReadError:
                return

        loop.add_reader(tls.fileno(), readable)
        try:
            for _ in range(calls):
                start = time.perf_counter_ns()
                tls.sendall(_REQUEST)
                await answers.get()
                latencies.append(time.perf_counter_ns() - start)
                work()
        finally:
            loop.remove_reader(tls.fileno())
            tls.close()
        return latencies
    transport, caller = await loop.create_connection(
        lambda: _Caller(context if mode == "bio" else None), "127.0.0.1", port
    )
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if caller.tls is not None:
            await caller.handshake()
        for _ in range(calls):
            caller.answer = loop.create_future()
            start = time.perf_counter_ns()
            caller.send(_REQUEST)
            await caller.answer
            latencies.append(time.perf_counter_ns() - start)
            work()
    finally:
        transport.close()
    return latencies


def _p50_us(
    mode: str, kib: int, calls: int, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> float:
    port: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(
        target=_server_main, args=(mode, kib, contexts[0], port), daemon=True
    )
    server.start()
    try:
        latencies = asyncio.run(_call_loop(mode, port.get(timeout=30), contexts[1], calls, kib))
    finally:
        server.kill()
        server.join(5)
    return statistics.median(latencies[_WARM_UP:]) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-kb", default="32,256,4096", help="KiB touched per turn, per side")
    parser.add_argument("--calls", type=int, default=4000, help="calls per way and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.work_kb.split(",")]
    if args.calls <= _WARM_UP or args.rounds < 1 or min(sizes) < 0:
        parser.error(f"need --calls > {_WARM_UP}, --rounds >= 1 and sizes >= 0")
    multiprocessing.set_start_method("fork")
    with tempfile.TemporaryDirectory(prefix="agentmesh-tls-floor-") as directory:
        contexts = _contexts(Path(directory))
    print(f"tls floor: {args.calls} serial calls per way, {args.rounds} rounds, p50 µs")
    header = ("work KiB", "plain", "bio", "socket", "bio - plain", "bio / plain")
    print("  ".join(f"{name:>{width}}" for name, width in zip(header, _WIDTHS, strict=True)))
    for kib in sizes:
        runs: dict[str, list[float]] = {mode: [] for mode in _MODES}
        for _ in range(args.rounds):
            for mode in _MODES:
                runs[mode].append(_p50_us(mode, kib, args.calls, contexts))
        p50 = {mode: statistics.median(values) for mode, values in runs.items()}
        print(
            f"{kib:>9}  {p50['plain']:>7.1f}  {p50['bio']:>7.1f}  {p50['socket']:>7.1f}  "
            f"{p50['bio'] - p50['plain']:>+12.1f}  {p50['bio'] / p50['plain']:>10.2f}×"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
