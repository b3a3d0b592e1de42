"""Agents as real processes: discovery, balancing, leases, graceful stop, NATS restarts, errors.

Each agent here is ``python -m agentmesh run FILE`` with 0.25 s heartbeats and a 1 s lease
(see ``conftest.py``); the caller is the test's ``mesh`` on the same NATS and bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

import agentmesh
from agentmesh import Mesh
from agentmesh.nats_server import NatsServer
from tests.mesh_ca import mesh_ca

from .support import (
    EXAMPLE_AGENTS,
    EXAMPLES,
    LEASE,
    SHORT_LEASE,
    AgentProcess,
    SharedAgents,
    SpawnAgent,
    instance_ids,
    mesh_env,
)

WaitUntil = Callable[..., Awaitable[float]]
RESEARCHER = EXAMPLE_AGENTS / "researcher.py"
#: For an agent whose lease expiry a test waits for.
EXPIRING = {"AGENTMESH_LEASE_TTL": str(SHORT_LEASE)}


async def served_by(mesh: Mesh, calls: int, capability: str = "research") -> Counter[str]:
    """Make ``calls`` sequential calls; count the serving instance of each."""
    counts: Counter[str] = Counter()
    for i in range(calls):
        result = await mesh.invoke(capability, {"topic": f"mesh {i}", "angle": "agents"})
        assert result.value["facts"], result
        counts[result.instance_id] += 1
    return counts


# --------------------------------------------------------------------------------------
# Read-only tests against two long-lived researcher processes (shared by the class).
# --------------------------------------------------------------------------------------


class TestTwoResearchers:
    @pytest.fixture
    def bucket(self, shared_researchers: SharedAgents) -> str:
        """The test's mesh joins the shared researchers' bucket."""
        return shared_researchers.bucket

    @pytest.fixture
    async def researchers(
        self, shared_researchers: SharedAgents, mesh: Mesh, wait_until: WaitUntil
    ) -> list[AgentProcess]:
        for agent in shared_researchers.agents:
            assert agent.returncode is None, f"{agent} died:\n{agent.tail()}"
        await wait_until(lambda: shared_researchers.instance_ids <= instance_ids(mesh), timeout=10)
        return shared_researchers.agents

    async def test_discovery_finds_both_replicas(
        self, mesh: Mesh, researchers: list[AgentProcess]
    ) -> None:
        offers = await mesh.registry.find("research")
        assert {o.instance_id for o in offers} == {a.instance_id for a in researchers}
        assert len({o.endpoint for o in offers}) == 2
        assert {o.endpoint for o in offers} == {a.endpoint for a in researchers}
        for offer in offers:
            assert offer.agent == "researcher"
            assert offer.status == "serving"
            assert offer.capability.version == "1.0.0"
            assert offer.endpoint.startswith("https://127.0.0.1:")  # mTLS (strict) by default

        assert await mesh.registry.find("research", version=">=2") == []
        assert len(await mesh.registry.find("research", version=">=1.0,<2")) == 2
        assert len(await mesh.registry.find("research", version="1.0.0")) == 2
        assert len(await mesh.registry.find("research", tags=["research"])) == 2
        assert len(await mesh.registry.find("research", tags=["research", "en"])) == 2
        assert await mesh.registry.find("research", tags=["research", "fr"]) == []
        assert await mesh.registry.find("nonexistent") == []

        records = await mesh.registry.agents()
        assert [r.name for r in records] == ["researcher", "researcher"]

    async def test_calls_spread_over_both_replicas(
        self, mesh: Mesh, researchers: list[AgentProcess]
    ) -> None:
        # Five waves of eight concurrent calls: P2C on peak-EWMA latency x in-flight would be
        # within its rights to keep strictly sequential calls on the replica that happened
        # to answer faster; with calls in flight it must spread them.
        counts: Counter[str] = Counter()
        for wave in range(5):
            results = await asyncio.gather(
                *(mesh.invoke("research", {"topic": f"mesh {wave}.{i}"}) for i in range(8))
            )
            counts.update(r.instance_id for r in results)
        print(f"\n40 calls served by: {dict(counts)}")
        assert sum(counts.values()) == 40
        assert set(counts) == {a.instance_id for a in researchers}
        assert all(n >= 5 for n in counts.values()), counts

    async def test_invalid_input_is_422_problem_json(
        self, mesh: Mesh, researchers: list[AgentProcess]
    ) -> None:
        endpoint = researchers[0].endpoint
        async with httpx.AsyncClient(timeout=10, verify=mesh_ca().client_context()) as client:
            resp = await client.post(
                f"{endpoint}/v1/invoke/research", json={"topic": 5, "bogus": 1}
            )
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert problem["code"] == "invalid_input"
        assert problem["status"] == 422
        errors = problem["errors"]
        assert isinstance(errors, list)
        assert errors
        where = {tuple(e["loc"])[-1] for e in errors}
        assert {"topic", "bogus"} <= where, errors

        with pytest.raises(agentmesh.InvalidInput) as info:
            await mesh.call("research", {"topic": 5, "bogus": 1})
        assert info.value.errors, "the pydantic error list travels back to the caller"
        message = str(info.value)
        assert "topic: Input should be a valid string" in message, message
        assert "bogus: Extra inputs are not permitted" in message, message

    async def test_unknown_capability_suggests_a_close_one(
        self, mesh: Mesh, researchers: list[AgentProcess]
    ) -> None:
        with pytest.raises(agentmesh.CapabilityNotFound) as info:
            await mesh.call("reserch", {"topic": "mesh"})
        message = str(info.value)
        assert "reserch" in message
        assert "'research'" in message

    async def test_agent_http_endpoints(self, mesh: Mesh, researchers: list[AgentProcess]) -> None:
        result = await mesh.invoke("research", {"topic": "nats"})
        endpoint = result.endpoint
        tls = mesh_ca().client_context()
        async with httpx.AsyncClient(base_url=endpoint, timeout=10, verify=tls) as client:
            healthz = await client.get("/healthz")
            readyz = await client.get("/readyz")
            metrics = await client.get("/metrics")
            card = await client.get("/.well-known/agent-card.json")
        assert healthz.status_code == 200
        assert readyz.status_code == 200
        assert readyz.json()["status"] == "ready"
        assert metrics.status_code == 200
        assert "agentmesh_inbound_requests_total" in metrics.text
        served = [
            line
            for line in metrics.text.splitlines()
            if line.startswith("agentmesh_inbound_requests_total{")
            and 'capability="research"' in line
            and 'status="200"' in line
        ]
        assert served, metrics.text
        assert card.status_code == 200
        document = card.json()
        assert document["name"] == "researcher"
        assert isinstance(document["skills"], list)
        assert "research" in {s["name"] for s in document["skills"]}


# --------------------------------------------------------------------------------------
# Tests that stop, kill or restart things get processes (and a bucket) of their own.
# --------------------------------------------------------------------------------------


async def test_sigkill_leaves_the_index_within_the_lease(
    mesh: Mesh, spawn_agent: SpawnAgent, wait_until: WaitUntil
) -> None:
    """The victim's short lease ends it; the survivor's longer one keeps it through a stall of
    the loaded machine. The bound leaves 3 s past the 1 s lease for the server's expiry, the
    watch and such a stall: well short of what no expiry (a ghost) would be."""
    victim, survivor = await asyncio.gather(
        spawn_agent(RESEARCHER, env=EXPIRING), spawn_agent(RESEARCHER)
    )

    victim.kill()
    gone = await wait_until(
        lambda: victim.instance_id not in instance_ids(mesh),
        timeout=SHORT_LEASE + 10,
        interval=0.01,
    )
    print(f"\nSIGKILL -> gone from the index: {gone:.3f}s (lease {SHORT_LEASE}s)")
    assert gone < SHORT_LEASE + 3, f"the killed agent stayed {gone:.2f}s (lease {SHORT_LEASE}s)"
    assert survivor.instance_id in instance_ids(mesh)
    assert victim.returncode == -9

    counts = await served_by(mesh, 10)
    assert counts == {survivor.instance_id: 10}


SLEEPER = '''
"""Naps on request; writes a marker file when a nap starts."""
import asyncio
from pathlib import Path

from agentmesh import capability

MARKER = Path({marker!r})


@capability(version="1.0.0")
async def nap(seconds: float) -> str:
    """Sleep, then say so."""
    MARKER.write_text("started")
    await asyncio.sleep(seconds)
    return "rested"
'''


async def test_sigterm_drains_deregisters_and_exits_zero(
    mesh: Mesh,
    spawn_agent: SpawnAgent,
    agent_file: Callable[[str, str], Path],
    tmp_path: Path,
    wait_until: WaitUntil,
) -> None:
    lease = 3  # so that deregistration (prompt) and expiry (>= 2.75 s) cannot be confused
    marker = tmp_path / "nap-started"
    sleeper = await spawn_agent(
        agent_file("sleeper", SLEEPER.format(marker=str(marker))),
        env={"AGENTMESH_LEASE_TTL": str(lease)},
    )
    in_flight = asyncio.create_task(mesh.call("nap", {"seconds": 0.6}))
    await wait_until(marker.exists, timeout=10)

    loop = asyncio.get_running_loop()
    sent = loop.time()
    sleeper.terminate()

    async def left_the_index() -> float:
        return await wait_until(
            lambda: sleeper.instance_id not in instance_ids(mesh), timeout=10, interval=0.01
        )

    gone = asyncio.create_task(left_the_index())
    try:
        code = await sleeper.wait_exit(timeout=10)
        exited = loop.time() - sent
        gone_after = await gone
    finally:
        gone.cancel()
    assert code == 0, sleeper.tail()
    print(
        f"\nSIGTERM -> exit {exited:.3f}s, -> gone from the index {gone_after:.3f}s "
        f"(gone - exit = {gone_after - exited:+.3f}s; lease {lease}s)"
    )
    assert gone_after - exited < 1.0, "deregistered, not expired"
    assert gone_after < lease, "deregistered, not expired"
    assert await asyncio.wait_for(in_flight, timeout=5) == "rested", "the in-flight call drained"
    assert "Traceback" not in sleeper.tail(200)


async def test_rolling_stop_under_load_loses_no_calls(mesh: Mesh, spawn_agent: SpawnAgent) -> None:
    """SIGTERM one of two replicas while four callers keep calling: no call fails."""
    leaving, staying = await asyncio.gather(spawn_agent(RESEARCHER), spawn_agent(RESEARCHER))
    served: Counter[str] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                result = await mesh.invoke("research", {"topic": f"mesh {n}.{i}"}, timeout=5)
                served[result.instance_id] += 1
            except agentmesh.MeshError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.002)

    callers = [asyncio.create_task(caller(n)) for n in range(4)]
    try:
        await asyncio.sleep(0.3)
        before = served.copy()
        leaving.terminate()
        code = await leaving.wait_exit(timeout=10)
        after_exit = served[staying.instance_id]
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), timeout=10)
    print(f"\nrolling stop: served {dict(served)}, failed {len(failures)}")
    assert code == 0, leaving.tail()
    assert failures == [], failures[:5]
    assert before[leaving.instance_id] > 0, before
    assert served[staying.instance_id] > after_exit, "calls continue on the staying replica"


async def test_sigterm_while_nats_is_down_exits_cleanly(
    mesh: Mesh, spawn_agent: SpawnAgent, nats_server: NatsServer, wait_until: WaitUntil
) -> None:
    agent = await spawn_agent(RESEARCHER)
    nats_server.stop()
    try:
        await asyncio.sleep(0.3)  # the agent notices NATS is gone
        loop = asyncio.get_running_loop()
        sent = loop.time()
        agent.terminate()
        code: int | None = None
        with contextlib.suppress(AssertionError):  # bounded; judged below, with the log
            code = await agent.wait_exit(timeout=8)
        took = loop.time() - sent
        if code is None:
            agent.kill()
    finally:
        nats_server.start()
    log = agent.tail(200)
    print(f"\nSIGTERM with NATS down -> exit {code} after {took:.2f}s")
    # It could not deregister, but its lease still ends it: no ghost once NATS is back.
    await wait_until(mesh.sidecar.conn.connected.is_set, timeout=10)
    await wait_until(lambda: agent.instance_id not in instance_ids(mesh), timeout=10)
    assert code == 0, f"exit {code} after {took:.1f}s (None: still running; killed):\n{log}"
    assert "Traceback" not in log, log
    assert took < 2 + 3, f"stopping took {took:.1f}s with a drain grace of 2 s"


async def test_nats_restart_keeps_agents_registered(
    mesh: Mesh, spawn_agent: SpawnAgent, nats_server: NatsServer, wait_until: WaitUntil
) -> None:
    agents = await asyncio.gather(spawn_agent(RESEARCHER), spawn_agent(RESEARCHER))
    expected = {a.instance_id for a in agents}

    nats_server.restart()  # same port, same file store; blocks this loop for a moment

    await wait_until(mesh.sidecar.conn.connected.is_set, timeout=10)
    await wait_until(lambda: expected <= instance_ids(mesh), timeout=10)
    # Heartbeats resumed: after more than a lease, the records are still there.
    await asyncio.sleep(LEASE + 0.5)
    assert expected <= instance_ids(mesh)
    assert set(await served_by(mesh, 10)) <= expected
    for agent in agents:
        assert agent.returncode is None, agent.tail()


async def test_agent_killed_while_nats_is_down_leaves_no_ghost(
    mesh: Mesh, spawn_agent: SpawnAgent, nats_server: NatsServer, wait_until: WaitUntil
) -> None:
    """The victim's lease (short) lapses while NATS is away; the others' (3 s) keep them
    registered through the restart and a stall of the loaded machine."""
    victim, survivor = await asyncio.gather(
        spawn_agent(RESEARCHER, env=EXPIRING), spawn_agent(RESEARCHER)
    )

    nats_server.stop()
    try:
        victim.kill()
        # While NATS is away the data plane keeps the last view and keeps calling.
        assert survivor.instance_id in instance_ids(mesh)
        await asyncio.sleep(SHORT_LEASE + 1.0)
    finally:
        nats_server.start()

    await wait_until(mesh.sidecar.conn.connected.is_set, timeout=10)
    await wait_until(lambda: victim.instance_id not in instance_ids(mesh), timeout=10)
    await wait_until(lambda: survivor.instance_id in instance_ids(mesh), timeout=10)

    newcomer = await spawn_agent(RESEARCHER)  # waits until the mesh sees it
    await asyncio.sleep(LEASE + 0.5)
    live = instance_ids(mesh)
    assert victim.instance_id not in live, "a ghost of the killed agent"
    assert {survivor.instance_id, newcomer.instance_id} <= live
    assert set(await served_by(mesh, 10)) <= {survivor.instance_id, newcomer.instance_id}


async def test_streaming_capability_yields_chunks_in_order(
    mesh: Mesh, spawn_agent: SpawnAgent
) -> None:
    await spawn_agent(EXAMPLE_AGENTS / "writer.py")
    chunks = [c async for c in mesh.stream("draft", {"topic": "x", "paragraphs": 3})]
    assert [c["index"] for c in chunks] == [0, 1, 2]
    assert all("on x" in c["text"] for c in chunks)


async def test_examples_orchestrate_through_real_agents(
    mesh: Mesh, spawn_agent: SpawnAgent, nats_url: str, bucket: str, tmp_path: Path
) -> None:
    await asyncio.gather(
        *(
            spawn_agent(EXAMPLE_AGENTS / name)
            for name in ("researcher.py", "researcher.py", "summarizer.py", "planner.py")
        ),
        spawn_agent(EXAMPLE_AGENTS / "writer.py"),
    )
    assert len(await mesh.registry.agents()) == 5

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "orchestrate.py"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=mesh_env(nats_url, bucket, tmp_path),
        cwd=tmp_path,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    for key in ("summarize_offers:", "research:", "plan:", "draft:", "headline:"):
        assert key in stdout, stdout
    assert "'summary':" in stdout
    assert "researcher-" in stdout
    assert "Traceback" not in stderr


LEDGER_AGENT = '''
"""A capability with a side effect: each call appends one line to a ledger file."""
from pathlib import Path

from agentmesh import capability

LEDGER = Path({ledger!r})


@capability(version="1.0.0")
async def record(entry: str) -> int:
    """Append an entry to the ledger (not idempotent); return the number of lines."""
    with LEDGER.open("a") as out:
        out.write(entry + "\\n")
    return len(LEDGER.read_text().splitlines())
'''


async def test_non_idempotent_calls_run_exactly_once(
    mesh: Mesh, spawn_agent: SpawnAgent, agent_file: Callable[[str, str], Path], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    await spawn_agent(agent_file("ledger", LEDGER_AGENT.format(ledger=str(ledger))))
    results = [await mesh.call("record", {"entry": f"entry-{i}"}) for i in range(5)]
    assert results == [1, 2, 3, 4, 5]
    assert ledger.read_text().splitlines() == [f"entry-{i}" for i in range(5)]

    await asyncio.gather(*(mesh.call("record", {"entry": f"burst-{i}"}) for i in range(5)))
    lines = ledger.read_text().splitlines()
    assert len(lines) == 10
    assert sorted(lines[5:]) == [f"burst-{i}" for i in range(5)]
