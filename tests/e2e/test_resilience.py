"""Failures of real agent processes: what callers see, and what the agents saw."""

from __future__ import annotations

import asyncio
import collections
import textwrap
from pathlib import Path

import pytest

from agentmesh import AgentUnavailable, ConnectionLost, Mesh

COUNTER = textwrap.dedent(
    """
    import asyncio
    import os
    from pathlib import Path

    from agentmesh import capability

    LEDGER = Path(os.environ["LEDGER"])


    @capability(idempotent=True)
    async def echo(n: int) -> int:
        return n


    @capability
    async def transfer(n: int, hold: float = 0.0) -> int:
        with LEDGER.open("a") as f:
            f.write(f"start {n}\\n")
        await asyncio.sleep(hold)
        with LEDGER.open("a") as f:
            f.write(f"done {n}\\n")
        return n
    """
)

REFUSING = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from agentmesh import AgentUnavailable, capability

    HITS = Path(os.environ["HITS"])


    @capability
    async def busy() -> int:
        with HITS.open("a") as f:
            f.write("x")
        raise AgentUnavailable("no capacity right now")
    """
)

FAILING = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from agentmesh import capability

    HITS = Path(os.environ["HITS"])


    @capability(idempotent=True)
    async def flaky() -> int:
        with HITS.open("a") as f:
            f.write("x")
        raise RuntimeError("always fails")
    """
)


async def test_sigkill_of_one_replica_during_a_steady_stream_fails_no_call(
    mesh: Mesh, spawn_agent, agent_file, tmp_path: Path
) -> None:
    source = agent_file("counter", COUNTER)
    env = {"LEDGER": str(tmp_path / "ledger")}
    victim, survivor = await asyncio.gather(
        spawn_agent(source, env=env), spawn_agent(source, env=env)
    )
    failures: list[BaseException] = []
    served: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def caller() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                served[(await mesh.invoke("echo", {"n": n})).instance_id] += 1
            except Exception as exc:  # every failure is a defect here: record it
                failures.append(exc)
            await asyncio.sleep(0.002)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    await asyncio.sleep(1.0)
    victim.kill()
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*callers)
    assert failures == [], failures[:3]
    assert served[victim.instance_id] > 0
    assert served[survivor.instance_id] > served[victim.instance_id]
    print(
        f"\n{sum(served.values())} calls, 0 failed; retries: {mesh.sidecar.outbound.retry.retries}"
    )


async def test_sigkill_during_a_non_idempotent_call_is_a_clear_error_and_runs_once(
    mesh: Mesh, spawn_agent, agent_file, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    source = agent_file("counter", COUNTER)
    victim = await spawn_agent(source, env={"LEDGER": str(ledger)})
    call = asyncio.create_task(mesh.call("transfer", {"n": 7, "hold": 5}))
    for _ in range(200):
        if ledger.exists() and "start 7" in ledger.read_text():
            break
        await asyncio.sleep(0.01)
    victim.kill()
    with pytest.raises(ConnectionLost, match=rf"{victim.instance_id} at https://127\.0\.0\.1:\d+"):
        await asyncio.wait_for(call, 10)
    assert ledger.read_text().splitlines() == ["start 7"]  # ran once, never retried


async def test_a_failing_endpoint_under_load_sees_retries_within_the_budget(
    mesh: Mesh, spawn_agent, agent_file, tmp_path: Path
) -> None:
    hits = tmp_path / "hits"
    hits.touch()
    await spawn_agent(agent_file("failing", FAILING), env={"HITS": str(hits)})
    calls = 300
    results = await asyncio.gather(
        *(mesh.call("flaky") for _ in range(calls)), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results)
    # RemoteAgentError is never retried: exactly one attempt per call reached the agent.
    assert len(hits.read_text()) == calls


async def test_a_refusing_endpoint_under_load_sees_retries_within_the_budget(
    mesh: Mesh, spawn_agent, agent_file, tmp_path: Path
) -> None:
    hits = tmp_path / "hits"
    hits.touch()
    await spawn_agent(agent_file("refusing", REFUSING), env={"HITS": str(hits)})
    calls = 1000
    # 100 at a time: enough to spend the budget, few enough that on a loaded machine no call
    # waits out the connect timeout for one of the pool's connections (a ConnectionFailed).
    slots = asyncio.Semaphore(100)

    async def call() -> object:
        async with slots:
            return await mesh.call("busy")

    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(call() for _ in range(calls)), return_exceptions=True)
    elapsed = loop.time() - started
    odd = [r for r in results if not isinstance(r, AgentUnavailable)]
    assert not odd, odd[:3]
    attempts = len(hits.read_text())
    # Without a budget 3 attempts per call would reach the agent (3000). The budget allows
    # retries of 20% of the requests plus a floor of 10/s in any 10 s window; a slow machine
    # stretches the calls over more windows, each with its own floor.
    config = mesh.sidecar.outbound.retry.budget("busy").config
    windows = int(elapsed // config.window) + 2  # the one-second buckets' edges: one more
    floor = config.min_per_second * config.window * windows
    assert calls < attempts <= calls + config.ratio * calls + floor, (attempts, elapsed)
    assert mesh.sidecar.outbound.retry.budget("busy").refused > 0
    print(f"\n{calls} calls -> {attempts} attempts reached the agent in {elapsed:.1f}s")
