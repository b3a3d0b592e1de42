"""Resilience through real HTTP and a real registry: breakers, balancing, deadlines, loops."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import pytest

from agentmesh import (
    Agent,
    DeadlineExceeded,
    LoopDetected,
    Mesh,
    Settings,
    capability,
    connect,
)
from tests.flaky import flaky_endpoint, work


async def test_breaker_ejects_a_failing_endpoint_probes_it_and_readmits_it(
    start_agent, mesh: Mesh, wait_until
):
    healthy = await start_agent([work], name="worker")
    async with flaky_endpoint(mesh) as (flaky, flaky_id):
        await wait_until(lambda: len(mesh.sidecar.index.targets("work")) == 2)
        served = collections.Counter([(await mesh.invoke("work")).instance_id for _ in range(60)])
        # Every call succeeded: failures on the flaky endpoint were retried on the healthy one.
        assert served[healthy.instance_id] == 60
        breaker = mesh.sidecar.outbound.endpoints.get(flaky_id).breaker
        assert breaker.state in ("open", "half_open")
        hits_when_ejected = flaky.hits
        assert 5 <= hits_when_ejected <= 10  # ejected after 5 consecutive failures (+ probes)

        flaky.failing = False  # it recovers: after the ejection a probe succeeds and closes it
        await wait_until(lambda: breaker.available(), timeout=5)

        async def flaky_serves_again() -> bool:
            result = await mesh.invoke("work")
            return result.instance_id == flaky_id

        await wait_until(flaky_serves_again, timeout=5)
        assert breaker.state == "closed"


async def test_all_endpoints_ejected_is_a_clear_error(mesh: Mesh, wait_until):
    from agentmesh import MeshUnavailable, NoHealthyEndpoints

    async with flaky_endpoint(mesh) as (flaky, _):
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        for _ in range(3):
            with pytest.raises(MeshUnavailable):
                await mesh.call("work", retries=1)
        with pytest.raises(NoHealthyEndpoints, match="ejected by their circuit breakers"):
            await mesh.call("work")
        assert flaky.hits <= 6


async def test_traffic_shifts_away_from_a_slow_replica(start_agent, mesh: Mesh):
    @capability(idempotent=True)
    async def job(delay: float = 0.0) -> str:
        return "fast"

    @capability(name="job", idempotent=True)
    async def slow_job(delay: float = 0.0) -> str:
        await asyncio.sleep(0.05)
        return "slow"

    await start_agent([job], name="fast")
    await start_agent([slow_job], name="slow")
    results: list[str] = []

    async def client() -> None:
        for _ in range(30):
            results.append(await mesh.call("job"))

    await asyncio.gather(*(client() for _ in range(4)))
    counts = collections.Counter(results)
    assert counts["fast"] >= 3 * counts["slow"], counts


async def test_affinity_sticks_to_one_instance_and_moves_when_it_dies(
    start_agent, mesh: Mesh, wait_until
):
    agents = [await start_agent([work], name="worker") for _ in range(3)]
    owners = {
        key: {(await mesh.invoke("work", affinity_key=key)).instance_id for _ in range(10)}
        for key in ("conv-1", "conv-2", "conv-3", "conv-4")
    }
    assert all(len(o) == 1 for o in owners.values())  # each key sticks to one instance
    first = next(iter(owners["conv-1"]))
    victim = next(a for a in agents if a.instance_id == first)
    await victim.stop()
    await wait_until(lambda: len(mesh.sidecar.index.targets("work")) == 2)
    moved = {(await mesh.invoke("work", affinity_key="conv-1")).instance_id for _ in range(10)}
    assert len(moved) == 1
    assert moved != {first}
    # Keys that lived elsewhere did not move (rendezvous hashing).
    for key, owner in owners.items():
        if owner != {first}:
            assert {(await mesh.invoke("work", affinity_key=key)).instance_id} == owner


async def test_a_deadline_stops_work_down_a_chain(start_agent, mesh: Mesh, wait_until):
    state: dict[str, Any] = {"cancelled": False, "finished": False}

    @capability
    async def c_step() -> str:
        try:
            await asyncio.sleep(5)
            state["finished"] = True
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return "c"

    @capability
    async def b_step(mesh: Mesh) -> str:
        return await mesh.call("c_step") + "b"

    @capability
    async def a_step(mesh: Mesh) -> str:
        return await mesh.call("b_step") + "a"

    await start_agent([c_step], name="c")
    await start_agent([b_step], name="b")
    await start_agent([a_step], name="a")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await mesh.call("a_step", timeout=0.3)
    assert loop.time() - started < 0.6
    await wait_until(lambda: state["cancelled"], timeout=1)
    assert not state["finished"]


async def test_a_loop_is_refused_with_the_chain_named(start_agent, mesh: Mesh):
    @capability
    async def ping(n: int, mesh: Mesh) -> int:
        return await mesh.call("pong", {"n": n + 1})

    @capability
    async def pong(n: int, mesh: Mesh) -> int:
        return await mesh.call("ping", {"n": n + 1})

    await start_agent([ping, pong], name="echo")
    with pytest.raises(
        Exception, match=r"17 hops exceeds the limit of 16: ping → pong → ping"
    ) as err:
        await mesh.call("ping", {"n": 0})
    assert isinstance(err.value, LoopDetected) or "LoopDetected" in str(err.value)


async def test_unready_agents_get_no_new_calls_until_ready_again(
    start_agent, settings: Settings, wait_until
):
    # Round robin, so that "a gets calls again" does not depend on latencies a loaded machine
    # skews (P2C would rightly shun a replica whose first call was slow).
    a = await start_agent([work], name="worker")
    b = await start_agent([work], name="worker")
    async with connect(settings.model_copy(update={"balance": "round_robin"})) as mesh:
        a.agent.set_ready(False)
        await wait_until(
            lambda: (
                {t.record.status for t in mesh.sidecar.index.targets("work")}
                == {"serving", "unready"}
            )
        )
        served = {(await mesh.invoke("work")).instance_id for _ in range(20)}
        assert served == {b.instance_id}
        a.agent.set_ready(None)
        await wait_until(
            lambda: {t.record.status for t in mesh.sidecar.index.targets("work")} == {"serving"}
        )
        served = {(await mesh.invoke("work")).instance_id for _ in range(40)}
    assert served == {a.instance_id, b.instance_id}


async def test_zone_preference_with_failover(settings: Settings, mesh: Mesh, wait_until):
    agents = []
    tasks = []
    for zone in ("a", "b"):
        agent = Agent("zoned", labels={"zone": zone}, capabilities=[work])
        ready = asyncio.Event()
        tasks.append(
            asyncio.create_task(
                agent.serve(
                    settings=settings, on_ready=lambda _, r=ready: r.set(), handle_signals=False
                )
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        agents.append(agent)
    try:
        async with connect(settings, zone="a") as local:
            await wait_until(lambda: len(local.sidecar.index.targets("work")) == 2)
            served = {(await local.invoke("work")).instance_id for _ in range(20)}
            assert served == {agents[0].instance_id}
            agents[0].stop()
            await asyncio.wait_for(tasks[0], 10)
            await wait_until(lambda: len(local.sidecar.index.targets("work")) == 1)
            assert (await local.invoke("work")).instance_id == agents[1].instance_id
    finally:
        for agent, task in zip(agents, tasks, strict=True):
            agent.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
