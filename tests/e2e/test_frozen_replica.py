"""A replica that hangs (SIGSTOP: its kernel still accepts, nothing ever answers), with the
default settings: idempotent calls stuck on it move to the other replica within their budget,
and the timeouts eject it like any other failure."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap

from agentmesh import Mesh
from agentmesh.sidecar.call import OutboundCall
from tests.freeze import freeze

ECHO = textwrap.dedent(
    """
    from agentmesh import capability


    @capability(idempotent=True)
    async def echo(n: int) -> int:
        return n
    """
)


def _key_for(mesh: Mesh, instance_id: str) -> str:
    """An affinity key whose first choice is ``instance_id``: the call's first attempt goes
    there, whatever the balancer would otherwise pick."""
    balance = mesh.sidecar.outbound.balance
    for n in range(1000):
        call = OutboundCall("echo", b"{}", affinity_key=f"k{n}")
        call.targets = mesh.sidecar.index.targets("echo")
        if balance.choose(call).instance_id == instance_id:
            return f"k{n}"
    raise AssertionError(f"no affinity key picks {instance_id}")


async def test_calls_stuck_on_a_sigstopped_replica_are_retried_on_the_other(
    mesh: Mesh, spawn_agent, agent_file
) -> None:
    source = agent_file("echo", ECHO)
    # A long lease: the frozen replica stays registered (its heartbeats stop with it), so the
    # callers keep choosing it and only the timeouts can tell them it is gone.
    env = {"AGENTMESH_LEASE_TTL": "120"}
    frozen, survivor = await asyncio.gather(
        spawn_agent(source, env=env), spawn_agent(source, env=env)
    )
    key = _key_for(mesh, frozen.instance_id)
    # Calls before it freezes leave kept-alive connections to it in the pool: a request on one
    # of them is sent and then waits, where a new connection would fail at the connect
    # timeout (sidecar/http1.py) and be retried anyway. Only the per-try timeout ends the wait.
    warm = await asyncio.gather(
        *(mesh.invoke("echo", {"n": n}, affinity_key=key) for n in range(5))
    )
    assert {r.instance_id for r in warm} == {frozen.instance_id}
    freeze(frozen.pid)
    try:
        # The default settings: a 30 s budget, of which one attempt may spend half. Five
        # calls, each first sent to the frozen replica: the breaker's default threshold.
        results = await asyncio.gather(
            *(mesh.invoke("echo", {"n": n}, affinity_key=key) for n in range(5))
        )
        assert [r.value for r in results] == list(range(5))
        assert {r.instance_id for r in results} == {survivor.instance_id}
        assert {r.attempts for r in results} == {2}
        # Five timeouts in a row ejected it, as five refused connections would have (the
        # ejection count, not the state: a 1 s ejection may be over by the time we look).
        breaker = mesh.sidecar.outbound.endpoints.get(frozen.instance_id).breaker
        assert breaker.ejections == 1
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
