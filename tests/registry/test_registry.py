"""The registry against a real nats-server: leases, compare-and-set, the watch-fed index."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from agentmesh import AgentRecord, CapabilitySpec, RegistrationError
from agentmesh._tasks import stop_task
from agentmesh.errors import InvalidInput
from agentmesh.models import MAX_RECORD_BYTES
from agentmesh.nats_server import NatsServer
from agentmesh.registry import Lease, LocalIndex, NatsConnection, RecordConflict, RegistryStore
from agentmesh.registry.store import record_key
from tests.freeze import freeze

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}}


def spec(
    name: str = "summarize", version: str = "1.0.0", tags: tuple[str, ...] = ()
) -> CapabilitySpec:
    return CapabilitySpec(
        name=name, version=version, input_schema=SCHEMA, output_schema={}, tags=tags
    )


def record(instance: str, *caps: CapabilitySpec, **fields: object) -> AgentRecord:
    name = instance.rsplit("-", 1)[0]
    return AgentRecord(
        instance_id=instance,
        name=name,
        endpoint=f"http://127.0.0.1:{9000 + len(instance)}",
        capabilities=caps or (spec(),),
        **fields,  # type: ignore[arg-type]
    )


class Registry:
    """A connection, the store and a running index on the test's bucket."""

    def __init__(self, url: str, bucket: str) -> None:
        self.conn = NatsConnection(url, name="test")
        self.store = RegistryStore(self.conn, bucket)
        self.index = LocalIndex()

    async def __aenter__(self) -> Registry:
        await self.conn.connect()
        await self.store.open()
        self.index.start(self.store, self.conn)
        await self.index.wait_synced(5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.index.stop()
        await self.conn.close()


@pytest.fixture
async def registry(nats_url: str, bucket: str) -> AsyncIterator[Registry]:
    async with Registry(nats_url, bucket) as reg:
        yield reg


def ids(index: LocalIndex, capability: str = "summarize") -> set[str]:
    return {t.instance_id for t in index.targets(capability)}


async def dies(lease: Lease) -> None:
    """The lease's process dies: no more renewals, no deregistration."""
    assert await stop_task(lease._task, "renewals")


async def test_registration_reaches_the_index_and_release_removes_it(registry, wait_until):
    # A lease far longer than the wait: only the deregistration can remove the record (with a
    # 1 s lease a loaded machine could not tell the two apart).
    lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=60)
    await lease.acquire()
    await wait_until(lambda: ids(registry.index) == {"sum-a"})
    assert await lease.release()
    await wait_until(lambda: not ids(registry.index), timeout=10)


async def test_heartbeats_keep_a_record_alive_past_its_ttl(registry, caplog):
    """Renewals every 0.25 s keep a 3 s lease alive for 4 s, without a lapse in between (the
    lease logs re-registering a record that expired). 3 s, not 1 s: a stall of the loaded test
    machine up to 2.75 s must not decide the outcome; renewals must."""
    caplog.set_level(logging.INFO, logger="agentmesh.registry")
    lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=3)
    await lease.acquire()
    await asyncio.sleep(4)
    assert ids(registry.index) == {"sum-a"}
    assert lease.renewals >= 5
    assert "had expired" not in caplog.text
    assert _renewals_counted("sum-a") == lease.renewals
    await lease.release()
    assert _renewals_counted("sum-a") is None  # a released instance leaves no label behind


def _renewals_counted(instance_id: str) -> float | None:
    return REGISTRY.get_sample_value("agentmesh_lease_renewals_total", {"instance": instance_id})


async def test_a_lease_that_stops_renewing_expires_within_its_ttl(registry, wait_until):
    """A 1 s lease, so the test is short; the bound leaves 3 s past it for the server's expiry,
    the watch and a stall of the loaded test machine, still far short of a record that outlives
    its lease (what this guards against)."""
    lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=1)
    await lease.acquire()
    await wait_until(lambda: ids(registry.index) == {"sum-a"})
    await dies(lease)
    took = await wait_until(lambda: not ids(registry.index), timeout=10)
    assert took < 1 + 3


async def test_one_instance_cannot_take_over_anothers_live_record(registry):
    first = Lease(registry.store, record("sum-a"), interval=0.25, ttl=1)
    await first.acquire()
    impostor = Lease(registry.store, record("sum-a", labels={"evil": "1"}), interval=0.25, ttl=1)
    with pytest.raises(RecordConflict, match="already registered"):
        await impostor.acquire()
    await first.release()


async def test_renewal_detects_a_foreign_write(registry):
    lease = Lease(registry.store, record("sum-a"), interval=10, ttl=5)
    await lease.acquire()
    assert lease._revision is not None
    await registry.store.renew(record("sum-a", labels={"x": "y"}), lease._revision, 5)
    with pytest.raises(RecordConflict, match="overwritten"):
        await lease.update(record("sum-a", status="draining"))
    await registry.store.delete(record_key(record("sum-a")))
    await lease.release()


async def test_oversized_records_are_refused_and_nothing_is_written(registry):
    big = record("sum-a", spec(), labels={"blob": "x" * (MAX_RECORD_BYTES + 1)})
    lease = Lease(registry.store, big, interval=0.25, ttl=1)
    with pytest.raises(RegistrationError, match="bytes"):
        await lease.acquire()
    assert await registry.store.get(record_key(record("sum-a"))) is None


def test_invalid_records_are_refused_before_reaching_nats():
    with pytest.raises(ValueError, match="agent name"):
        record("Bad_Name-1")
    with pytest.raises(ValueError, match="JSON Schema type"):
        CapabilitySpec(name="x", input_schema={"type": "text"}, output_schema={})
    with pytest.raises(ValueError, match="valid dictionary"):
        CapabilitySpec(name="x", input_schema=["not", "a", "schema"], output_schema={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PEP 440"):
        spec(version="one")


async def test_malformed_values_in_the_bucket_are_ignored(registry, wait_until):
    await registry.store.kv.put("garbage", b"{not json")
    await registry.store.kv.put("liar", record("sum-b").model_dump_json().encode())
    good = Lease(registry.store, record("sum-a"), interval=0.25, ttl=1)
    await good.acquire()
    await wait_until(lambda: ids(registry.index) == {"sum-a"})
    assert {r.instance_id for r in registry.index.records()} == {"sum-a"}
    await good.release()


async def test_find_filters_by_version_tags_and_labels(registry, wait_until):
    leases = [
        Lease(registry.store, r, interval=0.25, ttl=1)
        for r in (
            record("sum-a", spec(version="1.2.0", tags=("nlp", "en")), labels={"zone": "a"}),
            record("sum-b", spec(version="2.0.0", tags=("nlp",)), labels={"zone": "b"}),
        )
    ]
    for lease in leases:
        await lease.acquire()
    await wait_until(lambda: len(ids(registry.index)) == 2)
    find = registry.index.find
    assert {o.instance_id for o in find("summarize", version=">=1.0,<2")} == {"sum-a"}
    assert {o.instance_id for o in find("summarize", version="2.0.0")} == {"sum-b"}
    assert {o.instance_id for o in find("summarize", tags=["en"])} == {"sum-a"}
    assert {o.instance_id for o in find("summarize", labels={"zone": "b"})} == {"sum-b"}
    assert {o.instance_id for o in find(tags=["nlp"])} == {"sum-a", "sum-b"}
    assert find("translate") == []
    with pytest.raises(InvalidInput, match="PEP 440"):
        find("summarize", version="~~1")
    for lease in leases:
        await lease.release()


async def test_draining_status_reaches_watchers(registry, wait_until):
    lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=1)
    await lease.acquire()
    await lease.update(record("sum-a", status="draining"))
    await wait_until(
        lambda: [t.record.status for t in registry.index.targets("summarize")] == ["draining"]
    )
    await lease.release()


async def test_nats_restart_reregisters_and_resynchronises(
    nats_server: NatsServer, nats_url: str, bucket: str, wait_until
):
    async with Registry(nats_url, bucket) as watcher, Registry(nats_url, bucket) as agents:
        alive = Lease(agents.store, record("sum-live"), interval=0.25, ttl=1)
        doomed = Lease(agents.store, record("sum-dead"), interval=0.25, ttl=1)
        await alive.acquire()
        await doomed.acquire()
        await wait_until(lambda: ids(watcher.index) == {"sum-live", "sum-dead"})

        nats_server.stop()
        await dies(doomed)  # while NATS is away: nobody deregisters it
        await asyncio.sleep(1.5)  # longer than the lease
        nats_server.start()

        # The live agent is back (re-created if it expired), the dead one is no ghost, and a
        # registration made after the restart is seen by the watcher.
        newcomer = Lease(agents.store, record("sum-new"), interval=0.25, ttl=1)
        await wait_until(lambda: agents.conn.connected.is_set(), timeout=5)
        await newcomer.acquire()
        await wait_until(lambda: ids(watcher.index) == {"sum-live", "sum-new"}, timeout=8)
        await alive.release()
        await newcomer.release()


async def test_a_lease_that_lapsed_is_taken_back_over_the_servers_expiry_marker(
    registry, wait_until
):
    """A stalled process (event loop blocked past its TTL) must get its record back, not a
    conflict: right after expiry, the key's last message is the server's marker."""
    lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=1)
    await lease.acquire()
    # Seen first: "not in the index" holds before the watch delivers the write, so waiting for
    # the absence alone can end before the record ever expired.
    await wait_until(lambda: ids(registry.index) == {"sum-a"})
    await dies(lease)  # stalls: no renewals
    await wait_until(lambda: not ids(registry.index), timeout=10)  # expired: the marker is there
    assert await registry.store.get(record_key(record("sum-a"))) is None
    await lease.update(record("sum-a", status="draining"))  # the next write recovers
    await wait_until(lambda: ids(registry.index) == {"sum-a"}, timeout=10)
    await lease.release()


class LosesACancellation(RegistryStore):
    """A store whose first renewal gets its reply in the loop turn of its cancellation: on Python
    3.11 nats-py's ``asyncio.wait_for`` then returns the reply and the cancellation is lost. Here
    that renewal parks after its (real) write and loses the first cancellation, on any Python."""

    def __init__(self, conn: NatsConnection, bucket: str) -> None:
        super().__init__(conn, bucket)
        self.renewing = asyncio.Event()
        self.lost = 0

    async def renew(self, record: AgentRecord, revision: int, ttl: int) -> int:
        revision = await super().renew(record, revision, ttl)
        if not self.lost:
            self.renewing.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.lost += 1
        return revision


async def test_release_returns_when_a_renewal_loses_its_cancellation(registry, wait_until):
    store = LosesACancellation(registry.conn, registry.store.bucket)
    await store.open()
    lease = Lease(store, record("sum-a"), interval=0.01, ttl=5)
    await lease.acquire()
    await store.renewing.wait()
    async with asyncio.timeout(10):  # before: the lease renewed on, and release waited for ever
        assert await lease.release()
    assert store.lost == 1
    assert await registry.store.get(record_key(record("sum-a"))) is None
    assert lease.renewals == 1


class CancelsItsWaiter(asyncio.Event):
    """An event that cancels the task waiting on it in the loop turn it is set: a stop that lands
    just as NATS delivers. Python 3.11's ``asyncio.wait_for`` then returned instead of raising
    (python/cpython#86296): the cancelled start-up went on, as if nobody had asked."""

    waiter: asyncio.Task[None] | None = None

    def set(self) -> None:
        super().set()
        assert self.waiter is not None
        self.waiter.cancel()


async def test_waiting_for_the_first_view_honours_a_cancellation_that_lands_with_it(registry):
    index = LocalIndex()
    index.synced = synced = CancelsItsWaiter()
    synced.waiter = waiting = asyncio.create_task(index.wait_synced(30))
    await asyncio.sleep(0)
    index.start(registry.store, registry.conn)  # the first view comes from the real NATS
    try:
        async with asyncio.timeout(30):
            with pytest.raises(asyncio.CancelledError):
                await waiting  # before: returned, the cancellation lost
        assert index.synced.is_set()
    finally:
        await index.stop()


async def test_a_lease_without_nats_warns_once_per_outage_not_at_every_heartbeat(
    nats_url, bucket, caplog, wait_until
):
    """A connection NATS closed for good (as for revoked credentials) fails every renewal at
    once: one warning, not one per heartbeat for ever."""
    async with Registry(nats_url, bucket) as registry:
        lease = Lease(registry.store, record("sum-a"), interval=0.02, ttl=5)
        await lease.acquire()
        await registry.conn.client.close()
        await wait_until(lambda: lease.failures >= 10, timeout=10)
        warnings = [r for r in caplog.records if r.getMessage().startswith("lease renewal failed")]
        assert [r.levelno for r in warnings] == [logging.WARNING]
        await lease.release(timeout=1)


async def test_release_with_a_hung_nats_returns_within_its_bound_and_says_why(
    tmp_path, bucket, caplog
):
    server = NatsServer(tmp_path)
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        async with asyncio.timeout(30):  # every wait below has a bound: none reaches this one
            async with Registry(server.url, bucket) as registry:
                lease = Lease(registry.store, record("sum-a"), interval=0.25, ttl=5)
                await lease.acquire()
                freeze(pid)  # a hung server: connected, nothing ever answers
                assert not await lease.release(timeout=1)
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()
    assert "could not deregister sum-a (no answer within 1s); its record expires within 5s" in (
        caplog.text
    )
