"""Bounds of the index against a real nats-server: one agent's keys cannot fill every sidecar."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from agentmesh.registry import LocalIndex, NatsConnection, RegistryStore
from agentmesh.registry.connection import SUBSCRIPTION_PENDING_BYTES
from tests.registry.test_registry import record

CAP = 20
FLOOD = CAP + 300


def over_cap() -> float:
    return REGISTRY.get_sample_value("agentmesh_registry_over_cap_total") or 0.0


def named(index: LocalIndex, name: str) -> set[str]:
    return {r.instance_id for r in index.records() if r.name == name}


async def test_an_agent_writing_many_instances_fills_no_index_past_its_cap(
    nats_url, bucket, wait_until, caplog
):
    conn = NatsConnection(nats_url, name="test-bounds")
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    index = LocalIndex(max_instances_per_agent=CAP)
    index.start(store, conn)
    fresh = LocalIndex(max_instances_per_agent=CAP)
    try:
        await index.wait_synced(10)
        before = over_cap()

        async def put(instance: str) -> None:
            rec = record(instance)
            await store.kv.put(f"{rec.name}.{instance}", store.encode(rec))

        for i in range(FLOOD):
            await put(f"flood-{i}")
        await put("good-0")  # written after the flood: once it is in, the flood was seen
        await wait_until(lambda: "good-0" in named(index, "good"), timeout=30)
        assert len(named(index, "flood")) == CAP
        assert over_cap() - before >= FLOOD - CAP
        warnings = [r for r in caplog.records if "AGENTMESH_REGISTRY_MAX_INSTANCES" in r.message]
        assert len(warnings) == 1  # at the first one; the rest of the flood waits a minute
        assert "good-0" in {t.instance_id for t in index.targets("summarize")}

        # The cap counts what is held, not what was once seen: a freed place is taken again.
        gone = sorted(named(index, "flood"))[0]
        await store.kv.delete(f"flood.{gone}")
        await put("flood-late")
        await put("good-1")
        await wait_until(lambda: "good-1" in named(index, "good"), timeout=30)
        assert "flood-late" in named(index, "flood")
        assert len(named(index, "flood")) == CAP

        # A sidecar starting now reads the whole bucket as one snapshot: the same bound.
        fresh.start(store, conn)
        await fresh.wait_synced(30)
        assert len(named(fresh, "flood")) == CAP
        assert named(fresh, "good") == {"good-0", "good-1"}
    finally:
        await fresh.stop()
        await index.stop()
        await conn.close()


async def test_a_subscription_behind_its_publishers_holds_its_bound_and_drops_the_rest(
    nats_url, bucket, wait_until
):
    conn = NatsConnection(nats_url, name="test-slow-consumer")
    await conn.connect()
    subject = f"bounds.{bucket}"
    release = asyncio.Event()
    received: list[int] = []

    async def slow(msg: Msg) -> None:
        received.append(len(msg.data))
        await release.wait()  # a callback that does not keep up

    def dropped() -> float:
        labels = {"subscription": subject}
        return REGISTRY.get_sample_value("agentmesh_nats_dropped_total", labels) or 0.0

    try:
        sub = await conn.subscribe(subject, cb=slow)
        size = 512 * 1024
        sent = 3 * SUBSCRIPTION_PENDING_BYTES // size
        for _ in range(sent):
            await conn.client.publish(subject, b"x" * size)
        # Every message is back: taken by the callback, pending, or dropped.
        await wait_until(lambda: len(received) + sub.pending_msgs + dropped() == sent, timeout=30)
        assert sub.pending_bytes <= SUBSCRIPTION_PENDING_BYTES
        assert dropped() >= sent - 1 - SUBSCRIPTION_PENDING_BYTES // size
        release.set()
        await conn.client.publish(subject, b"after")
        # Still subscribed, still served.
        await wait_until(lambda: received[-1] == len(b"after"), timeout=30)
        assert len(received) <= 2 + SUBSCRIPTION_PENDING_BYTES // size
    finally:
        release.set()
        await conn.close()
