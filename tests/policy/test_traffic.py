"""Traffic policies read by the resilience layers: timeouts, retries, breaker, balance, splits."""

from __future__ import annotations

import asyncio
import collections
import itertools

import pytest

from agentmesh import (
    AgentUnavailable,
    ConnectionLost,
    DeadlineExceeded,
    MeshUnavailable,
    NoHealthyEndpoints,
    capability,
)
from tests.flaky import flaky_endpoint

from .conftest import traffic_policy, until_applied

HITS: collections.Counter[str] = collections.Counter()


def summarizer(version: str):
    @capability(name="summarize", version=version, idempotent=True)
    async def summarize_version(text: str = "") -> str:
        return version

    return summarize_version


@capability(idempotent=True)
async def slow(delay: float = 0.0) -> str:
    HITS["slow"] += 1
    await asyncio.sleep(delay)
    return "done"


@capability
async def busy() -> str:
    HITS["busy"] += 1
    raise AgentUnavailable("no capacity right now")


@capability
async def whoami() -> str:
    return "me"


@pytest.fixture(autouse=True)
def _reset_hits():
    HITS.clear()


async def test_a_canary_split_sends_the_weighted_share(start_agent, apply, mesh, wait_until):
    await start_agent([summarizer("1.4.0")], name="summarizer-v1")
    await start_agent([summarizer("2.0.0")], name="summarizer-v2")
    await apply(
        traffic_policy(
            "summarize-canary",
            "summarize",
            subsets=[
                {"name": "stable", "version": ">=1,<2", "weight": 90},
                {"name": "canary", "version": ">=2,<3", "weight": 10},
            ],
        )
    )
    await until_applied(wait_until, mesh, present=("summarize-canary",))
    served = collections.Counter([await mesh.call("summarize") for _ in range(200)])
    assert sum(served.values()) == 200
    assert abs(served["2.0.0"] - 20) <= 6, served  # 10% of 200, within a tolerance
    # A caller that pins a version is not overridden by the split.
    pinned = {await mesh.call("summarize", version=">=2") for _ in range(10)}
    assert pinned == {"2.0.0"}


async def test_a_traffic_policy_timeout_replaces_the_default(start_agent, apply, mesh, wait_until):
    await start_agent([slow], name="sloth")
    await apply(traffic_policy("slow-timeout", "slow", timeout=0.3))
    await until_applied(wait_until, mesh, present=("slow-timeout",))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded, match=r"no reply within 0\.3s"):
        await mesh.call("slow", {"delay": 3})
    assert loop.time() - started < 1.5
    # An explicit timeout of the caller still wins over the policy.
    assert await mesh.call("slow", {"delay": 0.5}, timeout=5) == "done"


async def test_a_traffic_policy_sets_retry_attempts_and_per_try_timeout(
    start_agent, apply, mesh, wait_until
):
    await start_agent([busy, slow], name="busybody")
    with pytest.raises(AgentUnavailable, match="after 3 attempts"):
        await mesh.call("busy")
    assert HITS["busy"] == 3  # the sidecar's default

    await apply(traffic_policy("busy-retry", "busy", retry={"attempts": 5, "backoff": 0}))
    await until_applied(wait_until, mesh, present=("busy-retry",))
    HITS.clear()
    with pytest.raises(AgentUnavailable, match="after 5 attempts"):
        await mesh.call("busy")
    assert HITS["busy"] == 5
    HITS.clear()
    with pytest.raises(AgentUnavailable):
        await mesh.call("busy", retries=0)  # the caller's explicit choice wins
    assert HITS["busy"] == 1

    await apply(
        traffic_policy("slow-attempts", "slow", retry={"attempts": 2, "per_try_timeout": 0.2})
    )
    await until_applied(wait_until, mesh, present=("slow-attempts",))
    with pytest.raises(ConnectionLost, match=r"per-try timeout of 0\.2s.*after 2 attempts"):
        await mesh.call("slow", {"delay": 2}, timeout=5)
    assert HITS["slow"] == 2


async def test_a_traffic_policy_sets_breaker_thresholds_for_its_capability_only(
    apply, mesh, wait_until
):
    async with flaky_endpoint(mesh) as (_flaky, flaky_id):
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        await apply(traffic_policy("work-breaker", "work", breaker={"consecutive_failures": 1}))
        await until_applied(wait_until, mesh, present=("work-breaker",))
        with pytest.raises(MeshUnavailable):
            await mesh.call("work", retries=0)
        # One failure ejected the endpoint for "work" (the default needs 5)...
        with pytest.raises(NoHealthyEndpoints, match="ejected by their circuit breakers"):
            await mesh.call("work", retries=0)
        # ...while the endpoint's default breaker, for capabilities without the policy, is not.
        assert mesh.sidecar.outbound.endpoints.get(flaky_id).breaker.state == "closed"


async def test_a_traffic_policy_sets_the_balancing_strategy(start_agent, apply, mesh, wait_until):
    await start_agent([whoami], name="twin-a")
    await start_agent([whoami], name="twin-b")
    await apply(traffic_policy("whoami-rr", "whoami", balance="round_robin"))
    await until_applied(wait_until, mesh, present=("whoami-rr",))
    served = [(await mesh.invoke("whoami")).instance_id for _ in range(8)]
    assert len(set(served)) == 2
    assert all(a != b for a, b in itertools.pairwise(served)), served
