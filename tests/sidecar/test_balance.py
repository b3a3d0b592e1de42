"""The balancer's choice and the endpoint states it reads, at unit level (no network)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agentmesh import AgentRecord, CapabilitySpec
from agentmesh.errors import NoHealthyEndpoints
from agentmesh.models import AgentStatus
from agentmesh.policy.traffic import TrafficRoute
from agentmesh.registry.index import LocalIndex, Target
from agentmesh.sidecar.balance import BalanceLayer
from agentmesh.sidecar.breaker import BreakerConfig
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.endpoints import Endpoints


def record(i: int, status: AgentStatus = "serving", capability: str = "cap") -> bytes:
    spec = CapabilitySpec(name=capability, input_schema={}, output_schema={})
    return (
        AgentRecord(
            instance_id=f"a-{i}",
            name="a",
            endpoint=f"http://127.0.0.1:{8000 + i}",
            capabilities=(spec,),
            status=status,
        )
        .model_dump_json()
        .encode()
    )


def index_of(n: int, **statuses: AgentStatus) -> LocalIndex:
    """``n`` instances of "cap" (keys ``a.a-<i>``); ``statuses`` by instance (``a_3="draining"``)."""
    index = LocalIndex()
    index.replace({f"a.a-{i}": record(i, statuses.get(f"a_{i}", "serving")) for i in range(n)})
    return index


async def _unused(call: OutboundCall) -> Reply:
    raise AssertionError("choose only")


def choose_many(
    balance: BalanceLayer,
    targets: tuple[Target, ...],
    times: int = 400,
    traffic: TrafficRoute | None = None,
) -> Counter[str]:
    chosen: Counter[str] = Counter()
    for _ in range(times):
        call = OutboundCall("cap", b"{}", deadline=0.0, timeout=1.0, traffic=traffic)
        call.targets = targets
        chosen[balance.choose(call).instance_id] += 1
    return chosen


def test_target_copies_instance_id_and_serving_from_its_record() -> None:
    index = index_of(2, a_1="draining")
    first, second = index.targets("cap")
    assert (first.instance_id, first.serving) == ("a-0", True)
    assert (second.instance_id, second.serving) == ("a-1", False)
    assert first.url == "http://127.0.0.1:8000"


def test_states_are_made_ahead_of_calls_and_dropped_as_instances_leave() -> None:
    index = index_of(3)
    index.apply("a.b-0", record(0, capability="other").replace(b"a-0", b"b-0"))
    endpoints = Endpoints(index)
    assert endpoints._ready == {}  # nothing called yet
    endpoints.candidates("cap", index.targets("cap"))
    assert set(endpoints._ready) == {"a-0", "a-1", "a-2"}  # every instance at the first call
    index.apply("a.a-5", record(5))
    assert "a-5" in endpoints._ready  # a new instance of a called capability: as it arrives
    assert endpoints.states == {}  # made, but not yet considered by the balancer
    ready = endpoints.get("a-1")
    assert endpoints.get("a-1") is ready
    assert set(endpoints.states) == {"a-1"}
    index.apply("a.a-1", None)
    index.apply("a.a-3", record(3))
    assert endpoints.states == {}
    assert endpoints.get("a-1") is not ready  # a state for an id the index no longer has
    assert endpoints.get("a-3").counted


def test_the_ejection_cap_counts_only_endpoints_the_balancer_considered() -> None:
    index = index_of(20)
    endpoints = Endpoints(index)
    endpoints.get("a-0").breaker.force_open(60)
    # Two considered, one ejected: 1 < max(1, floor(0.5 * 2)) is false, so no further ejection.
    endpoints.get("a-1")
    assert not endpoints.may_eject(0.5)


def test_endpoint_state_closed_follows_its_breaker() -> None:
    seen: list[tuple[str, str, str]] = []
    endpoints = Endpoints(index_of(1), on_breaker_change=lambda *change: seen.append(change))
    state = endpoints.get("a-0")
    assert state.closed
    state.breaker.force_open(60)
    assert not state.closed
    state.breaker.reset()
    assert state.closed
    endpoints.breaker("a-0", BreakerConfig(consecutive_failures=1)).force_open(60)
    assert state.closed  # a TrafficPolicy's breaker is not the endpoint's own
    assert seen == [
        ("a-0", "closed", "open"),
        ("a-0", "open", "closed"),
        ("a-0", "closed", "open"),
    ]


def test_sampled_p2c_skips_instances_that_are_not_serving_or_are_ejected() -> None:
    index = index_of(12, a_0="draining", a_1="unready", a_2="draining")
    endpoints = Endpoints(index)
    for i in (3, 4, 5):
        endpoints.get(f"a-{i}").breaker.force_open(60)
    balance = BalanceLayer(_unused, endpoints, rng=random.Random(1))
    chosen = choose_many(balance, index.targets("cap"))
    assert set(chosen) == {f"a-{i}" for i in range(6, 12)}
    # Only drawn serving endpoints are counted (draining ones are never considered).
    assert not {"a-0", "a-1", "a-2"} & set(endpoints.states)


def test_sampled_p2c_prefers_the_cheaper_endpoint() -> None:
    index = index_of(10)
    endpoints = Endpoints(index)
    for i in range(9):
        endpoints.get(f"a-{i}").in_flight = 50
    balance = BalanceLayer(_unused, endpoints, rng=random.Random(2))
    chosen = choose_many(balance, index.targets("cap"), times=1000)
    # a-9 is chosen whenever it is one of the two drawn: about 2/10 of the calls.
    assert 120 < chosen["a-9"] < 300
    assert max(n for i, n in chosen.items() if i != "a-9") < chosen["a-9"]


def test_sampled_p2c_on_a_filtered_subset_and_with_a_policy_breaker() -> None:
    index = index_of(20)
    endpoints = Endpoints(index)
    subset = index.targets("cap")[:10]  # as a version constraint or a split leaves them
    strict = BreakerConfig(consecutive_failures=1)
    endpoints.breaker("a-0", strict).force_open(60)
    balance = BalanceLayer(_unused, endpoints, rng=random.Random(3))
    route = TrafficRoute(policy="p", breaker=strict)
    chosen = choose_many(balance, subset, traffic=route)
    assert set(chosen) == {t.instance_id for t in subset} - {"a-0"}
    # The default breaker of a-0 is closed: without the policy it is chosen again.
    assert "a-0" in choose_many(balance, subset)


def test_candidates_follow_index_changes() -> None:
    index = index_of(10)
    endpoints = Endpoints(index)
    serving, states = endpoints.candidates("cap", index.targets("cap"))
    assert [s.instance_id for s in states] == [t.instance_id for t in serving]
    assert endpoints.candidates("cap", index.targets("cap"))[1] is states
    index.apply("a.a-4", record(4, "draining"))
    serving, states = endpoints.candidates("cap", index.targets("cap"))
    assert "a-4" not in {t.instance_id for t in serving}
    assert len(states) == 9


def test_every_instance_draining_is_still_reported_as_such() -> None:
    draining: dict[str, AgentStatus] = {f"a_{i}": "draining" for i in range(10)}
    index = index_of(10, **draining)
    balance = BalanceLayer(_unused, Endpoints(index))
    call = OutboundCall("cap", b"{}", deadline=0.0, timeout=1.0)
    call.targets = index.targets("cap")
    with pytest.raises(NoHealthyEndpoints, match="all 10 instance"):
        balance.choose(call)
