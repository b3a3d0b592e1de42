"""Shared fixtures of the test suite, one section per subsystem."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from agentmesh import Agent, Capability, Mesh, Settings, connect
from agentmesh.nats_server import NatsServer
from tests.mesh_ca import mesh_ca
from tests.stacks import all_stacks

# mTLS is on in every test: any Settings() this process builds (fixtures of other suites too)
# issues certificates from the process's test CA. Child processes get it from mesh_env().
os.environ.update(mesh_ca().env())


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item) -> Iterator[None]:
    """A test that hits pytest-timeout reports every asyncio task's await chain too."""
    yield
    fail = signal.getsignal(signal.SIGALRM)
    if not callable(fail):  # the thread method (not in the main thread): stacks only
        return

    def report_then_fail(signum: int, frame: Any) -> None:
        item.add_report_section("timeout", "stacks", all_stacks())
        fail(signum, frame)

    signal.signal(signal.SIGALRM, report_then_fail)


# --------------------------------------------------------------------------------------
# NATS: one real nats-server per session (per xdist worker), a fresh KV bucket per test.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A running JetStream server on an ephemeral port, shared by the session's tests.

    Started here, in the main thread, so its parent-death signal is tied to the session.
    """
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The shared server's URL, restarted first if an earlier test stopped it."""
    if not nats_server.running:
        nats_server.start()
    return nats_server.url


@pytest.fixture
def bucket() -> str:
    """A registry bucket name no other test uses, so tests share the server, not state."""
    return f"t_{uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------
# Mesh: settings on the test bucket, in-process agents on real HTTP, a connected Mesh.
# --------------------------------------------------------------------------------------


@pytest.fixture
def settings(nats_url: str, bucket: str, tmp_path: Path) -> Settings:
    """Leases renewed every 0.25 s that expire 5 s after the last renewal.

    Nothing here waits for an agent's record to expire (a stopping agent deregisters; the
    expiry tests hold their own 1 s ``Lease``), so the TTL only has to outlast a stall of this
    process or of nats-server on a loaded machine: with 1 s a 0.75 s stall dropped live agents.

    mTLS is on (strict, the default): sidecars issue their certificates from the process's
    test CA (``tests/mesh_ca.py``).
    """
    ca = mesh_ca()
    return Settings(
        ca_cert_file=ca.cert_file,
        ca_key_file=ca.key_file,
        nats_url=nats_url,
        registry_bucket=bucket,
        heartbeat_interval=0.25,
        lease_ttl=5,
        drain_grace=2.0,
        data_dir=tmp_path,
        control_url="http://127.0.0.1:9",
    )


class RunningAgent:
    """An Agent serving in a task of the test's event loop."""

    def __init__(self, agent: Agent, task: asyncio.Task[None]) -> None:
        self.agent = agent
        self.task = task

    @property
    def endpoint(self) -> str:
        assert self.agent.endpoint is not None
        return self.agent.endpoint

    @property
    def instance_id(self) -> str:
        return self.agent.instance_id

    async def stop(self) -> None:
        """Graceful stop, as SIGTERM would do: drain, deregister, return."""
        self.agent.stop()
        await asyncio.wait_for(self.task, timeout=10)


StartAgent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def start_agent(settings: Settings, mesh: Mesh) -> AsyncIterator[StartAgent]:
    """``await start_agent(agent)`` (or a list of capabilities and a name) → RunningAgent.

    Returns once the test's ``mesh`` sees the new instance in its index, so a call right
    after it cannot race the registry watch.
    """
    running: list[RunningAgent] = []

    async def start(
        agent: Agent | Sequence[Capability[..., Any]],
        name: str = "agent",
        **options: Any,
    ) -> RunningAgent:
        if not isinstance(agent, Agent):
            agent = Agent(name, capabilities=agent, **options)
        ready = asyncio.Event()
        task = asyncio.create_task(
            agent.serve(settings=settings, on_ready=lambda _: ready.set(), handle_signals=False)
        )
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiter.cancel()
            task.result()
        assert ready.is_set(), "agent did not become ready within 10 s"
        instance = agent.instance_id
        await _wait_until(
            lambda: any(r.instance_id == instance for r in mesh.sidecar.index.records())
        )
        handle = RunningAgent(agent, task)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if not handle.task.done():
            handle.agent.stop()
    for handle in running:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(handle.task, timeout=10)


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[Mesh]:
    async with connect(settings) as m:
        yield m


async def _wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02
) -> float:
    """Poll until ``predicate`` holds; return the seconds it took; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


WaitUntil = Callable[..., Awaitable[float]]


@pytest.fixture
def wait_until() -> WaitUntil:
    """``await wait_until(lambda: cond, timeout=5)``: poll a sync or async predicate."""
    return _wait_until
