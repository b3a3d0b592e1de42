"""Running an ASGI app on uvicorn the way both agents and the control plane need it.

We bind the socket ourselves (a busy port becomes one clear error, and the real port of
``port=0`` is known before anything registers) and keep signal handling for ourselves (an agent
must drain and deregister before uvicorn stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from agentmesh._tasks import stop_task
from agentmesh.errors import ConfigurationError
from agentmesh.inbound.tls import InboundLimits, ServerTLS, protocol_for

__all__ = ["HttpServer", "bind", "signals"]


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (0 = an ephemeral port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says so; without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port"
        ) from exc
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """One uvicorn server on a socket we bound, started and stopped as a task."""

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        graceful: float = 5.0,
        tls: ServerTLS | None = None,
        owner: str = "agent",
        limits: InboundLimits | None = None,
        plaintext_refusal: str | None = None,
    ) -> None:
        """``tls``: serve (mutual) TLS with the identity's current context (see
        ``agentmesh.inbound.tls``, which also applies ``limits``); ``owner`` names the
        server in its log lines."""
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._graceful = max(1, round(graceful))
        self.tls = tls is not None and tls.mode != "off"
        # Agents and the control plane get the mesh protocol: TLS by first byte, bounded heads,
        # one write per response.
        http: Any = (
            protocol_for(tls, owner, limits, plaintext_refusal=plaintext_refusal)
            if tls is not None
            else "auto"
        )
        self._server = _Server(
            uvicorn.Config(
                app,
                http=http,
                lifespan="off",
                # No WebSocket is served (upgrades are refused): without this, uvicorn imports a
                # WebSocket library at start whenever one is installed (uvicorn[standard] has
                # websockets), on an agent's way to its first call (goal S7).
                ws="none",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=max(1, round(graceful)),
                # Longer than the sidecar client's 30 s keep-alive: the client must be the one
                # to close idle connections, or a call can race the server's close and fail.
                timeout_keep_alive=75,
                server_header=False,
                date_header=False,
                # Callers are who their certificate says, never what a header claims; and a
                # middleware less on every request.
                proxy_headers=False,
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                raise ConfigurationError(f"HTTP server on port {self.port} failed: {exc}")
            # uvicorn listens within a few loop turns; a coarser poll only delays registration.
            await asyncio.sleep(0.001)

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None, "start() first"
        return self._task

    async def stop(self) -> None:
        """Graceful stop, bounded: uvicorn waits for open connections (a caller's idle
        keep-alive one among them) to close, so past the grace period they are closed here."""
        self._server.should_exit = True
        if self._task is not None:
            try:
                async with asyncio.timeout(self._graceful + 1.0):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._server.force_exit = True
                for connection in list(self._server.server_state.connections):
                    transport = getattr(connection, "transport", None)
                    if transport is not None:
                        transport.close()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self._task  # the timeout cancels it
            except Exception:
                pass
            await stop_task(self._task, f"HTTP server on port {self.port}")
            self._task = None
        self.sock.close()


@contextlib.contextmanager
def signals(handler: Callable[[], None], *, enabled: bool = True) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``handler`` while inside the block (main thread only)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if enabled:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
