"""The control plane's embedded nats-server: a kept port, a clear error when it is taken, restarts
with a limit (a real nats-server throughout)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agentmesh.control.nats_supervisor import EmbeddedNats, kept_port
from agentmesh.errors import ConfigurationError
from agentmesh.settings import Settings


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path, **extra)  # type: ignore[arg-type]


def test_the_port_chosen_once_is_kept_across_runs(tmp_path: Path) -> None:
    first = EmbeddedNats(_settings(tmp_path))
    first.start()
    port = first.server.port
    first.stop()
    assert kept_port(tmp_path / "nats") == port

    second = EmbeddedNats(_settings(tmp_path))
    second.start()
    try:
        assert second.server.port == port
        assert second.status()["state"] == "running"
    finally:
        second.stop()


def test_the_port_is_chosen_where_no_outgoing_connection_can_take_it(tmp_path: Path) -> None:
    """A kept port from the kernel's ephemeral range may be the local port of any outgoing
    connection while the server is down, and then the restart fails ("address already in use"):
    the port is chosen below that range, where the kernel never hands one out."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # The fault: an outgoing connection holding a port blocks a listener on it.
    with socket.socket() as server, socket.socket() as outgoing:
        server.bind(("127.0.0.1", 0))
        server.listen()
        outgoing.connect(server.getsockname())
        taken = outgoing.getsockname()[1]
        assert taken >= low
        with socket.socket() as listener, pytest.raises(OSError, match="in use"):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", taken))
    nats = EmbeddedNats(_settings(tmp_path))
    nats.start()
    try:
        assert 0 < nats.server.port < low
        assert kept_port(tmp_path / "nats") == nats.server.port
    finally:
        nats.stop()


def test_a_taken_kept_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        (tmp_path / "nats").mkdir()
        (tmp_path / "nats" / "port").write_text(f"{port}\n")
        nats = EmbeddedNats(_settings(tmp_path))
        with pytest.raises(ConfigurationError) as caught:
            nats.start()
    message = str(caught.value)
    assert f"embedded NATS port {port}" in message
    assert str(tmp_path / "nats" / "port") in message
    assert "in use by another process" in message


async def test_a_server_that_keeps_dying_is_given_up_after_the_limit(
    tmp_path: Path, wait_until: Callable[..., Awaitable[float]]
) -> None:
    nats = EmbeddedNats(
        _settings(tmp_path, embedded_nats_max_restarts=1, embedded_nats_restart_window=600)
    )
    nats.start()
    supervising = asyncio.create_task(nats.supervise())
    try:
        first = nats.server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: nats.state == "running" and nats.restarts == 1, timeout=20)
        second = nats.server.pid
        assert second is not None
        assert second != first
        os.kill(second, signal.SIGKILL)
        await wait_until(lambda: nats.state == "failed", timeout=20)
        assert nats.restarts == 1
        assert nats.status()["last_exit"] == "signal 9"
        assert supervising.done()
    finally:
        supervising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervising
        nats.stop()
