"""NATS as several servers, the parts that need no cluster: seed lists, advertised URLs, the
retry through leader elections not hiding a server without JetStream, control-plane lists."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agentmesh.control_planes import control_urls, live_control, live_control_sync
from agentmesh.errors import ConfigurationError, RegistryUnavailable
from agentmesh.nats_server import NatsServer
from agentmesh.registry import Lease, NatsConnection, RegistryStore
from agentmesh.registry.cluster import advertised_servers, default_replicas, split_urls
from agentmesh.registry.store import record_key
from tests.registry.test_registry import record


def test_seeds_are_split_deduplicated_and_given_a_scheme() -> None:
    assert split_urls(" nats://a:4222, b:4223,nats://a:4222 ,") == [
        "nats://a:4222",
        "nats://b:4223",
    ]
    with pytest.raises(ConfigurationError):
        split_urls(" , ")


def test_control_urls_are_split_without_trailing_slashes() -> None:
    assert control_urls("http://a:7700/, https://b:7700") == ["http://a:7700", "https://b:7700"]
    with pytest.raises(ConfigurationError):
        control_urls("")


async def test_a_single_server_advertises_itself_and_gets_one_replica(nats_url: str) -> None:
    conn = NatsConnection(f"{nats_url},{nats_url}", name="t")
    await conn.connect()
    try:
        assert conn.servers == [nats_url]
        assert advertised_servers(conn.client) == [nats_url]
        assert default_replicas(conn.client) == 1
        assert conn.replicas() == 1
    finally:
        await conn.close()


async def test_a_dead_seed_is_skipped(nats_url: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{closed.getsockname()[1]}"
    conn = NatsConnection(f"{dead},{nats_url}", name="t")
    await conn.connect(timeout=5)
    try:
        assert conn.connected.is_set()
    finally:
        await conn.close()


async def test_jetstream_off_fails_at_once_instead_of_waiting_for_a_leader(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path, jetstream=False)
    server.start()
    conn = NatsConnection(server.url, name="t", jetstream_wait=600)
    try:
        await conn.connect()
        with pytest.raises(RegistryUnavailable, match="registry bucket 'b'"):
            # Retrying for jetstream_wait would hit this bound first.
            await asyncio.wait_for(RegistryStore(conn, "b").open(), 30)
    finally:
        await conn.close()
        server.stop()


async def test_the_first_control_plane_that_accepts_a_connection_is_used() -> None:
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))
        up = f"http://127.0.0.1:{listening.getsockname()[1]}"
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        assert await live_control(f"{down},{up}") == up
        assert live_control_sync(f"{down}, {up}/") == up
        assert await live_control(down) == down  # one URL: its own request names the problem
        with pytest.raises(RegistryUnavailable, match="no control plane answers"):
            await live_control(f"{down},{down}/x")


async def test_release_deletes_a_record_whose_renewal_landed_late(
    nats_url: str, bucket: str
) -> None:
    """A renewal that timed out during a leader election may be written after all: the lease's
    revision is then stale, and release must still delete the record (no ghost)."""
    conn = NatsConnection(nats_url, name="t")
    await conn.connect()
    try:
        store = RegistryStore(conn, bucket)
        await store.open()
        mine = record("late-1")
        lease = Lease(store, mine, interval=60, ttl=30)
        await lease.acquire()
        current = await store.get(record_key(mine))
        assert current is not None
        await store.renew(mine, current[1], 30)  # the late renewal: same record, new revision
        assert await lease.release()
        assert await store.get(record_key(mine)) is None
    finally:
        await conn.close()
