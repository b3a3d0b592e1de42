"""Fixtures of the end-to-end suite: agents as real ``python -m agentmesh run`` processes.

See ``support.py`` for how a process is started, found ready and stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from uuid import uuid4

import pytest

from agentmesh import Mesh
from agentmesh.nats_server import NatsServer

from .support import (
    EXAMPLE_AGENTS,
    READY_TIMEOUT,
    VISIBLE_TIMEOUT,
    AgentProcess,
    SharedAgents,
    SpawnAgent,
    clean_env,
    instance_ids,
    mesh_env,
    terminate_all,
)


@pytest.fixture
async def spawn_agent(
    mesh: Mesh,
    nats_url: str,
    bucket: str,
    tmp_path: Path,
    wait_until: Callable[..., Awaitable[float]],
) -> AsyncIterator[SpawnAgent]:
    """``await spawn_agent(file, *run_args, env={...})`` → a registered AgentProcess.

    The process joins the test's NATS and bucket with 0.25 s heartbeats and a 3 s lease;
    ``env`` overrides single variables (None removes one); ``isolated=True`` starts from an
    environment without any ``AGENTMESH_*`` variable instead. ``visible=False`` skips the
    wait for the test's ``mesh`` to see the instance. Gather several spawns to start them in
    parallel.
    """
    started: list[AgentProcess] = []
    numbers = itertools.count(1)

    async def spawn(
        file: Path | str,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        isolated: bool = False,
        visible: bool = True,
        timeout: float = READY_TIMEOUT,
    ) -> AgentProcess:
        file = Path(file)
        full_env = clean_env(env) if isolated else mesh_env(nats_url, bucket, tmp_path, env)
        log = tmp_path / "logs" / f"{file.stem}-{next(numbers)}.log"
        agent = AgentProcess(file, args, full_env, log)
        started.append(agent)
        await agent.wait_ready(timeout)
        if visible:
            try:
                await wait_until(
                    lambda: agent.instance_id in instance_ids(mesh), timeout=VISIBLE_TIMEOUT
                )
            except AssertionError:
                raise AssertionError(
                    f"{agent.instance_id} is not in the test mesh's index within "
                    f"{VISIBLE_TIMEOUT}s (has {sorted(instance_ids(mesh))}):\n{agent.tail()}"
                ) from None
        return agent

    yield spawn
    terminate_all(a.proc for a in started)


@pytest.fixture
def agent_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """``agent_file("name", source)`` writes a small agent module into the test's tmp dir."""

    def write(name: str, source: str) -> Path:
        directory = tmp_path / "agents"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.py"
        path.write_text(source)
        return path

    return write


# --------------------------------------------------------------------------------------
# Two researcher replicas shared by the read-only tests of a class (spawning costs ~1 s of
# CPU per interpreter on two shared cores, so read-only tests do not each pay for it).
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def shared_bucket() -> str:
    return f"t_shared_{uuid4().hex[:12]}"


@pytest.fixture(scope="class")
def shared_researchers(
    nats_server: NatsServer, shared_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedAgents]:
    """Two ``examples/agents/researcher.py`` processes on a bucket of their own."""
    if not nats_server.running:
        nats_server.start()
    directory = tmp_path_factory.mktemp("shared-researchers")
    env = mesh_env(nats_server.url, shared_bucket, directory)
    agents = [
        AgentProcess(EXAMPLE_AGENTS / "researcher.py", [], env, directory / f"researcher-{i}.log")
        for i in (1, 2)
    ]
    try:
        for agent in agents:
            agent.wait_ready_sync()
        yield SharedAgents(shared_bucket, agents)
    finally:
        terminate_all(a.proc for a in agents)
