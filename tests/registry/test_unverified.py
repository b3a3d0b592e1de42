"""A snapshot's signed records wait unverified, and nothing uses one before it verifies.

A new sidecar parses its first view at once and verifies it lazily (``registry/index.py``). What
must hold throughout: a record is resolved, listed or counted only once verified; a forged one
(signed by another agent, unsigned but claiming an identity, tampered) never is, and is logged; a
bad value never evicts a verified record; a decision that needs every record of an agent (a
caller's labels) verifies them first; the waiting room is bounded. Real nats-server, records
signed with the test CA's certificates; forgeries are written over the test's own connection,
which may write anything (an operator-run NATS with loose permissions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from agentmesh import AgentRecord, CapabilitySpec
from agentmesh.policy.cache import PolicyCache
from agentmesh.policy.store import PolicyStore
from agentmesh.registry import LocalIndex, NatsConnection, RegistryStore, RegistryView
from agentmesh.security.signed import StateTrust
from tests.mesh_ca import TRUST_DOMAIN, mesh_ca

ECHO = CapabilitySpec(name="echo", input_schema={}, output_schema={}, version="1.0.0")
LEGIT = 12


def record(instance: str, *, name: str = "echoer", endpoint: str = "https://10.0.0.1:1") -> bytes:
    return (
        AgentRecord(
            instance_id=instance,
            name=name,
            identity=f"spiffe://{TRUST_DOMAIN}/agent/{name}",
            mtls="strict",
            endpoint=endpoint,
            labels={"team": "red"},
            capabilities=(ECHO,),
        )
        .model_dump_json()
        .encode()
    )


def key(instance: str, name: str = "echoer") -> str:
    return f"{name}.{instance}"


def signed(instance: str, *, by: str = "echoer", **fields: str) -> bytes:
    """``record(instance)`` sealed with a fresh mesh certificate of agent ``by``."""
    return mesh_ca().sealer(by)(record(instance, **fields))


def forgeries() -> dict[str, bytes]:
    """Three records claiming agent ``echoer`` that no ``echoer`` signed."""
    body = record("echoer-tampered")
    good = signed("echoer-tampered")
    return {
        key("echoer-mallory"): signed("echoer-mallory", by="mallory"),
        key("echoer-unsigned"): record("echoer-unsigned"),
        key("echoer-tampered"): body.replace(b"10.0.0.1", b"6.6.6.6") + good[len(body) :],
    }


def trust() -> StateTrust:
    roots = mesh_ca().ca.roots
    return StateTrust(lambda: roots, lambda: TRUST_DOMAIN)


@dataclass
class Observed:
    """What an index showed at each change: records listed and targets resolved."""

    index: LocalIndex
    listed: list[set[str]] = field(default_factory=list)
    endpoints: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.index.on_change(self.look)

    def look(self) -> None:
        self.listed.append({r.instance_id for r in self.index.records()})
        self.endpoints |= {t.url for t in self.index.targets("echo")}
        self.endpoints |= {r.endpoint for r in self.index.records()}

    def ever_listed(self) -> set[str]:
        return set().union(*self.listed)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


@pytest.fixture
async def kv(nats_url: str, bucket: str) -> AsyncIterator[RegistryStore]:
    """The registry bucket over a connection that may write anything."""
    conn = NatsConnection(nats_url, name="forger")
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    yield store
    await conn.close()


@pytest.fixture
async def new_index(
    nats_url: str, bucket: str
) -> AsyncIterator[Callable[..., asyncio.Future[LocalIndex]]]:
    """Start LocalIndex(trust, **options) on its own connection, as a new sidecar does."""
    started: list[tuple[NatsConnection, LocalIndex]] = []

    async def start(**options: int) -> LocalIndex:
        conn = NatsConnection(nats_url, name="new-sidecar")
        await conn.connect()
        store = RegistryStore(conn, bucket)
        await store.open()
        index = LocalIndex(trust(), **options)
        started.append((conn, index))
        index.start(store, conn)
        return index

    yield start  # type: ignore[misc]
    for conn, index in started:
        await index.stop()
        await conn.close()


async def put_all(kv: RegistryStore, values: dict[str, bytes]) -> None:
    for k, v in values.items():
        await kv.kv.put(k, v)


# ---- a new sidecar's first view --------------------------------------------------------------


async def test_a_first_view_is_used_only_as_far_as_it_is_verified(
    kv: RegistryStore, new_index, nats_url: str, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.registry")
    legit = {key(f"echoer-{i:02d}"): signed(f"echoer-{i:02d}") for i in range(LEGIT)}
    await put_all(kv, {**legit, **forgeries()})
    index: LocalIndex = await new_index(verify_batch=2)
    seen = Observed(index)
    view = RegistryView(index, sync_timeout=30)
    kv_conn = NatsConnection(nats_url, name="never-connected")  # the cache's store stays unused

    await index.wait_synced(30)
    # The view went in unverified: at its first change, nothing was listed yet.
    assert seen.listed[0] == set()
    # A call now verifies (a batch of) what it resolves, and resolves nothing else.
    resolved = {t.instance_id for t in index.targets("echo")}
    assert resolved
    assert resolved <= {f"echoer-{i:02d}" for i in range(LEGIT)}
    # A policy decision about caller "echoer" sees the labels of every one of its records,
    # verified (a missing instance could escape a deny rule, or widen an allow rule).
    policies = PolicyCache(PolicyStore(kv_conn, "unused"), index)
    caller = policies.verified(f"spiffe://{TRUST_DOMAIN}/agent/echoer")
    assert caller.labels == ({"team": "red"},) * LEGIT
    # Listings wait for the whole view to be verified.
    assert {r.instance_id for r in await view.agents()} == {f"echoer-{i:02d}" for i in range(LEGIT)}
    assert len(await view.find("echo")) == LEGIT
    assert index.verified.is_set()

    assert seen.ever_listed() == {f"echoer-{i:02d}" for i in range(LEGIT)}
    assert all(url == "https://10.0.0.1:1" for url in seen.endpoints)
    assert logged(caplog, f"but is signed by spiffe://{TRUST_DOMAIN}/agent/mallory")
    assert logged(caplog, "'echoer.echoer-unsigned' (agent 'echoer') is not signed")
    assert logged(caplog, "'echoer.echoer-tampered' (agent 'echoer') has no valid signature")


async def test_without_room_to_wait_a_first_view_is_verified_as_it_arrives(
    kv: RegistryStore, new_index
) -> None:
    legit = {key(f"echoer-{i:02d}"): signed(f"echoer-{i:02d}") for i in range(LEGIT)}
    await put_all(kv, {**legit, **forgeries()})
    room = 3 * len(next(iter(legit.values())))
    bounded: LocalIndex = await new_index(unverified_bytes=room)
    seen_bounded = Observed(bounded)
    none: LocalIndex = await new_index(unverified_bytes=0)
    seen_none = Observed(none)
    for index in (bounded, none):
        await index.wait_verified(30)
    # Room for about three values: the rest were verified on arrival. None: every one was.
    assert LEGIT - 4 <= len(seen_bounded.listed[0]) < LEGIT
    assert seen_none.listed[0] == {f"echoer-{i:02d}" for i in range(LEGIT)}
    assert seen_none.ever_listed() == seen_bounded.ever_listed() == seen_none.listed[0]


# ---- updates: a bad value never evicts a verified record ----------------------------------------


async def test_a_bad_value_never_evicts_a_verified_record_live_or_in_a_new_view(
    kv: RegistryStore, nats_url: str, bucket: str, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.registry")

    def by_mallory() -> int:
        text = f"record '{k}' claims agent 'echoer' (identity spiffe://{TRUST_DOMAIN}/agent/echoer)"
        return sum(text in r.getMessage() for r in caplog.records)

    k = key("echoer-01")
    await kv.kv.put(k, signed("echoer-01", endpoint="https://10.0.0.1:1"))
    conn = NatsConnection(nats_url, name="sidecar")
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    index = LocalIndex(trust())
    seen = Observed(index)
    try:
        index.start(store, conn)
        await index.wait_verified(30)
        assert [r.endpoint for r in index.records()] == ["https://10.0.0.1:1"]

        # Live: a value signed by another agent, refused on arrival.
        await kv.kv.put(k, signed("echoer-01", by="mallory", endpoint="https://6.6.6.6:1"))
        for _ in range(1000):
            if by_mallory():
                break
            await asyncio.sleep(0.01)
        assert by_mallory() == 1
        assert [r.endpoint for r in index.records()] == ["https://10.0.0.1:1"]

        # A new view (the index was away meanwhile) with another such value: it waits, fails,
        # and the verified record stays. Then a good new value takes over, once verified.
        for value, endpoint, refusals in (
            (signed("echoer-01", by="mallory", endpoint="https://6.6.6.7:1"), "10.0.0.1", 2),
            (signed("echoer-01", endpoint="https://10.0.0.2:1"), "10.0.0.2", 2),
        ):
            await index.stop()
            await kv.kv.put(k, value)
            index.synced.clear()
            index.start(store, conn)
            await index.wait_verified(30)
            assert [r.endpoint for r in index.records()] == [f"https://{endpoint}:1"]
            assert by_mallory() == refusals
    finally:
        await index.stop()
        await conn.close()
    assert seen.endpoints == {"https://10.0.0.1:1", "https://10.0.0.2:1"}
    assert all(len(listed) <= 1 for listed in seen.listed)


# ---- watch events meeting records that still wait ------------------------------------------------


async def test_events_on_waiting_records_decide_as_if_verified_in_order(new_index) -> None:
    """Fed by hand after a real start, so the waiting room is observed between steps."""
    index: LocalIndex = await new_index(verify_batch=1)
    await index.wait_verified(30)
    seen = Observed(index)
    values = {key(f"echoer-{i}"): signed(f"echoer-{i}") for i in range(4)}
    index.replace(values)
    assert index.records() == []
    assert not index.verified.is_set()

    index.apply(key("echoer-0"), values[key("echoer-0")])  # a renewal of the waiting bytes
    index.apply(key("echoer-1"), None)  # deleted before it was verified: never shown
    index.apply(key("echoer-2"), signed("echoer-2", by="mallory"))  # bad: the waiting one holds
    assert {r.instance_id for r in index.records()} == {"echoer-2"}
    index.apply(key("echoer-3"), signed("echoer-3", endpoint="https://10.0.0.3:1"))  # newer
    assert {(r.instance_id, r.endpoint) for r in index.records()} == {
        ("echoer-2", "https://10.0.0.1:1"),
        ("echoer-3", "https://10.0.0.3:1"),
    }
    await index.wait_verified(30)
    assert {r.instance_id for r in index.records()} == {"echoer-0", "echoer-2", "echoer-3"}
    assert "echoer-1" not in seen.ever_listed()


class _Crashing(StateTrust):
    """Verification with a bug for one key (an exception that is not a refusal)."""

    def record(self, key: str, value: bytes, claim: AgentRecord | None = None) -> AgentRecord:
        if key == "echoer.echoer-bug":
            raise RuntimeError("a bug in verification")
        return super().record(key, value, claim)


async def test_a_bug_in_verification_refuses_the_record_loudly_and_the_rest_go_on(
    nats_url: str, bucket: str, caplog
) -> None:
    conn = NatsConnection(nats_url, name="sidecar")
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    roots = mesh_ca().ca.roots
    index = LocalIndex(_Crashing(lambda: roots, lambda: TRUST_DOMAIN))
    try:
        index.start(store, conn)
        await index.wait_verified(30)
        values = {key(i): signed(i) for i in ("echoer-a", "echoer-bug", "echoer-b")}
        index.replace(values)
        await index.wait_verified(30)
        assert {r.instance_id for r in index.records()} == {"echoer-a", "echoer-b"}
        assert logged(caplog, "could not verify registry record 'echoer.echoer-bug'")
    finally:
        await index.stop()
        await conn.close()


async def test_a_forged_key_first_in_a_view_does_not_hide_the_real_record_of_its_instance(
    new_index,
) -> None:
    index: LocalIndex = await new_index()
    await index.wait_verified(30)
    forged = mesh_ca().sealer("eve")(record("echoer-x", name="mallory"))
    index.replace({key("echoer-x", "mallory"): forged, key("echoer-x"): signed("echoer-x")})
    await index.wait_verified(30)
    assert [(r.name, r.instance_id) for r in index.records()] == [("echoer", "echoer-x")]
