"""Deadlines and timeouts on real HTTP: what the caller sees, what its breaker counts, and what
the agent stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from packaging.version import Version

from agentmesh import (
    AgentRecord,
    CapabilitySpec,
    DeadlineExceeded,
    Mesh,
    NoHealthyEndpoints,
    capability,
)
from agentmesh._config import TrafficRoute
from agentmesh.registry.index import Target
from agentmesh.sidecar.breaker import Breaker
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.deadline import DeadlineLayer, current_deadline
from tests.flaky import frozen_endpoint
from tests.mesh_ca import mesh_ca

STATE: dict[str, Any] = {}


@capability(timeout=0.3)
async def bounded(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        STATE["bounded cancelled"] = True
        raise
    return "done"


@capability
async def ticker() -> AsyncIterator[int]:
    """Streams for ever, unless whoever reads it goes away."""
    STATE["ticks"] = 0
    try:
        while True:
            yield STATE["ticks"]
            STATE["ticks"] += 1
            await asyncio.sleep(0.01)
    finally:
        STATE["ticker closed"] = True


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    STATE.clear()


# --- inbound: the capability's own timeout, and a caller that goes away ----------------------


async def test_a_capabilitys_own_timeout_holds_when_the_caller_sent_no_deadline(start_agent):
    agent = await start_agent([bounded], name="bounded")
    async with httpx.AsyncClient(verify=mesh_ca().client_context(), timeout=30) as client:
        # A plain HTTP client: no agentmesh-timeout-ms header at all.
        resp = await client.post(f"{agent.endpoint}/v1/invoke/bounded", json={"seconds": 20})
    assert resp.status_code == 504
    problem = resp.json()
    assert problem["code"] == "deadline_exceeded"
    assert "did not finish within its timeout of 0.3s" in problem["detail"]
    assert STATE["bounded cancelled"]


async def test_a_longer_caller_deadline_does_not_extend_the_capabilitys_timeout(
    start_agent, mesh: Mesh
):
    await start_agent([bounded], name="bounded")
    with pytest.raises(DeadlineExceeded, match=r"within its timeout of 0\.3s"):
        await mesh.call("bounded", {"seconds": 20}, timeout=20)
    assert STATE["bounded cancelled"]


async def test_a_stream_stops_when_its_http_caller_disconnects(start_agent, wait_until):
    agent = await start_agent([ticker], name="ticker")
    async with (
        httpx.AsyncClient(verify=mesh_ca().client_context(), timeout=30) as client,
        client.stream("POST", f"{agent.endpoint}/v1/invoke/ticker", json={}) as resp,
    ):
        # No deadline header and no timeout of its own: only the disconnect can stop it.
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        while "event: chunk" not in await anext(lines):
            pass
    await wait_until(lambda: "ticker closed" in STATE, timeout=10)
    ticks = STATE["ticks"]
    await asyncio.sleep(0.1)
    assert STATE["ticks"] == ticks  # closed means stopped: no tick after it


async def test_a_stream_stops_when_the_mesh_caller_stops_reading(
    start_agent, mesh: Mesh, wait_until
):
    await start_agent([ticker], name="ticker")
    async with contextlib.aclosing(mesh.stream("ticker")) as chunks:
        async for chunk in chunks:
            if chunk == 3:
                break
    # The call's 30 s budget is far away: the agent stops because the caller left.
    await wait_until(lambda: "ticker closed" in STATE, timeout=10)


# --- outbound: a timeout is the endpoint's failure ------------------------------------------


def _breaker(mesh: Mesh, instance_id: str) -> Breaker:
    return mesh.sidecar.outbound.endpoints.get(instance_id).breaker


async def test_calls_that_time_out_on_an_endpoint_eject_it(mesh: Mesh, wait_until):
    async with frozen_endpoint(mesh) as frozen_id:
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        for _ in range(5):  # the default threshold: 5 consecutive failures
            with pytest.raises(DeadlineExceeded, match=r"no reply within 0\.1s"):
                await mesh.call("work", timeout=0.1, retries=0)
        assert _breaker(mesh, frozen_id).state == "open"
        with pytest.raises(NoHealthyEndpoints, match="ejected by their circuit breakers"):
            await mesh.call("work", timeout=0.1)


async def test_a_half_open_probe_that_times_out_reopens_the_breaker(mesh: Mesh, wait_until):
    async with frozen_endpoint(mesh) as frozen_id:
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        breaker = _breaker(mesh, frozen_id)
        breaker.force_open(0.05)
        await wait_until(lambda: breaker.state == "half_open")
        with pytest.raises(DeadlineExceeded):
            await mesh.call("work", timeout=0.1, retries=0)
        assert breaker.state == "open"
        assert breaker.ejections == 1  # the probe's failure counted as one more ejection


async def test_a_call_its_caller_cancels_tells_the_breaker_nothing(mesh: Mesh, wait_until):
    async with frozen_endpoint(mesh) as frozen_id:
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        breaker = _breaker(mesh, frozen_id)
        for _ in range(6):  # more than the threshold: none of them counts as a failure
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mesh.call("work", timeout=30), 0.05)
        assert breaker.state == "closed"
        breaker.force_open(0.05)
        await wait_until(lambda: breaker.state == "half_open")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(mesh.call("work", timeout=30), 0.05)
        # Neither closed (it did not answer) nor re-opened (nobody waited for it to): the probe
        # slot is free again for the next call.
        assert breaker.state == "half_open"
        assert breaker.available()


# --- the deadline layer: one place decides the budget -----------------------------------------


def _target(timeout: float | None) -> Target:
    spec = CapabilitySpec(name="cap", input_schema={}, output_schema={}, timeout=timeout)
    record = AgentRecord(
        instance_id="a-1", name="a", endpoint="http://127.0.0.1:1", capabilities=(spec,)
    )
    return Target(record, spec, Version("0.1.0"))


async def _budget(
    *,
    explicit: float | None = None,
    route: float | None = None,
    spec: float | None = None,
    inherited: float | None = None,
) -> float:
    """The budget the deadline layer gives a call, in seconds (``call.timeout`` afterwards)."""
    seen: list[OutboundCall] = []

    async def record(call: OutboundCall) -> Reply:
        seen.append(call)
        return Reply(_target(None))

    call = OutboundCall("cap", b"{}", timeout=explicit)
    call.targets = (_target(spec),)
    if route is not None:
        call.traffic = TrafficRoute(policy="p", timeout=route)
    loop = asyncio.get_running_loop()
    token = current_deadline.set(None if inherited is None else loop.time() + inherited)
    try:
        await DeadlineLayer(record, default_timeout=30.0)(call)
    finally:
        current_deadline.reset(token)
    assert seen[0].timeout is not None
    assert seen[0].deadline == pytest.approx(loop.time() + seen[0].timeout, abs=0.05)
    return seen[0].timeout


async def test_the_budget_is_the_callers_then_the_policys_then_the_capabilitys_then_the_default():
    assert await _budget(explicit=1, route=2, spec=3) == 1
    assert await _budget(route=2, spec=3) == 2
    assert await _budget(spec=3) == 3
    assert await _budget() == 30.0


async def test_no_budget_outlives_the_call_being_served():
    assert await _budget(explicit=10, inherited=2) == pytest.approx(2, abs=0.05)
    assert await _budget(route=10, inherited=2) == pytest.approx(2, abs=0.05)
    assert await _budget(explicit=1, inherited=2) == 1


async def test_a_call_whose_inherited_deadline_has_passed_is_not_sent():
    with pytest.raises(DeadlineExceeded, match="deadline has passed; not sent"):
        await _budget(inherited=-0.1)
