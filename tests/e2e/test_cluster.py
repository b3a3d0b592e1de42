"""The mesh on a real three-node NATS cluster (examples/deploy's files, R3 buckets): losing or
stalling any one node loses no call, and registration, deregistration, joining and the CLI keep
working while it is gone. Real processes throughout: nats-servers, a control plane, agents, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentmesh import Mesh, Settings, connect
from agentmesh.control.nats_status import mesh_buckets
from agentmesh.policy.store import PolicyStore
from agentmesh.registry import RegistryStore
from agentmesh.registry.cluster import bucket_replicas
from agentmesh.security.store import SecurityStore
from tests.control.control_process import arun_cli, control_tls
from tests.mesh_ca import mesh_ca
from tests.nats_cluster import NODES, NatsCluster

from .support import (
    EXAMPLE_AGENTS,
    READY_TIMEOUT,
    AgentProcess,
    clean_env,
    popen_logged,
    tail,
    terminate_all,
)

#: Leases on a cluster outlive a leader election (4-9 s in nats-server) plus a renewal's timeout:
#: see docs/deploy.md. Heartbeats stay frequent.
LEASE = 15
HEARTBEAT = 1.0
CLI_TIMEOUT = 30.0
VISIBLE_TIMEOUT = 30.0
CALL_PERIOD = 0.02


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    root = tmp_path_factory.mktemp("cluster")
    cluster = NatsCluster(root, root / "mesh", mesh_ca().env())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    """The module's cluster with every node up (an earlier test may have killed one)."""
    nats_cluster.start()
    return nats_cluster


class Plane:
    """One ``agentmesh control`` on the cluster (seeds: every node), signing with the test CA."""

    def __init__(self, cluster: NatsCluster, bucket: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cluster.share_keys(workdir)
        self.workdir = workdir
        self.monitors = ",".join(cluster.monitor_urls)
        ready = workdir / "control.json"
        self.log = workdir / "control.log"
        self.proc = popen_logged(
            [
                sys.executable,
                "-m",
                "agentmesh",
                "control",
                "--port",
                "0",
                "--ready-file",
                str(ready),
                "--nats-url",
                cluster.seeds,
            ],
            self.log,
            clean_env(
                {
                    "AGENTMESH_REGISTRY_BUCKET": bucket,
                    "AGENTMESH_DATA_DIR": str(workdir),
                    "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
                    "AGENTMESH_LEASE_TTL": str(LEASE),
                    **mesh_ca().env(),
                }
            ),
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"control plane not ready:\n{tail(self.log)}")
            time.sleep(0.02)
        self.info: dict[str, Any] = json.loads(ready.read_text())
        self.url: str = self.info["control_url"]

    def headers(self) -> dict[str, str]:
        token = Path(self.info["admin_token_file"]).read_text().strip()
        return {"authorization": f"Bearer {token}"}

    def env(self) -> dict[str, str]:
        """What agents and the CLI run with: only the control plane's URL (NATS comes from its
        bootstrap: the cluster's URLs), its data dir (admin token) and the test CA."""
        return clean_env(
            {
                "AGENTMESH_CONTROL_URL": self.url,
                "AGENTMESH_DATA_DIR": str(self.workdir),
                "AGENTMESH_NATS_MONITOR_URL": self.monitors,
                **mesh_ca().env(),
            }
        )


class Mesh3:
    """The control plane, agents and a steady caller of one test."""

    def __init__(self, cluster: NatsCluster, bucket: str, tmp_path: Path) -> None:
        self.cluster = cluster
        self.bucket = bucket
        self.tmp_path = tmp_path
        self.plane = Plane(cluster, bucket, tmp_path / "control")
        self.agents: list[AgentProcess] = []
        self.calls = 0
        self.failures: list[str] = []

    async def agent(self, file: str = "researcher.py") -> AgentProcess:
        log = self.tmp_path / "logs" / f"{file}-{len(self.agents)}.log"
        agent = AgentProcess(EXAMPLE_AGENTS / file, [], self.plane.env(), log)
        self.agents.append(agent)
        await agent.wait_ready()
        return agent

    async def cli(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentmesh",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.plane.env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def listed(self) -> set[str]:
        code, out, err = await self.cli("agents", "-o", "json")
        assert code == 0, err
        return {r["instance_id"] for r in json.loads(out)}

    async def steady_calls(self, mesh: Mesh, stop: asyncio.Event) -> None:
        """One call every CALL_PERIOD until ``stop``; every failure is recorded."""
        while not stop.is_set():
            try:
                out = await mesh.call("research", {"topic": "cluster"})
                assert out["topic"] == "cluster", out
            except Exception as exc:
                self.failures.append(f"{time.monotonic():.2f} {type(exc).__name__}: {exc}")
            self.calls += 1
            await asyncio.sleep(CALL_PERIOD)


@pytest.fixture
async def mesh3(cluster: NatsCluster, bucket: str, tmp_path: Path) -> AsyncIterator[Mesh3]:
    world = Mesh3(cluster, bucket, tmp_path)
    try:
        yield world
    finally:
        terminate_all([a.proc for a in world.agents] + [world.plane.proc])


@contextlib.asynccontextmanager
async def _caller(world: Mesh3) -> AsyncIterator[Mesh]:
    """A Mesh joined through the control plane (bootstrap: the cluster's URLs) making steady
    calls for the duration of the block."""
    settings = Settings(control_url=world.plane.url, data_dir=world.plane.workdir)
    async with connect(settings) as mesh:
        stop = asyncio.Event()
        calling = asyncio.create_task(world.steady_calls(mesh, stop))
        try:
            yield mesh
        finally:
            stop.set()
            await calling


async def _registry_leader(world: Mesh3, mesh: Mesh) -> str:
    """The node leading the registry bucket's RAFT group (the worst node to lose)."""
    info = await bucket_replicas(mesh.sidecar.conn.client, world.bucket)
    assert info.replicas == 3, info
    return info.leader.removeprefix("nats-")


async def _while_a_node_is_gone(
    world: Mesh3,
    mesh: Mesh,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    """Registration, deregistration, a joining agent and the CLI, all with a node gone."""
    leaving = world.agents[0]
    joining = await world.agent("researcher.py")  # registers on the two remaining nodes
    await wait_until(
        lambda: joining.instance_id in {r.instance_id for r in mesh.sidecar.index.records()},
        timeout=VISIBLE_TIMEOUT,
    )
    # Callable: the steady caller's balancer sends it calls.
    await wait_until(
        lambda: '"direction":"inbound"' in joining.log.read_text(), timeout=VISIBLE_TIMEOUT
    )
    leaving.terminate()  # drains, then deletes its record
    assert await leaving.wait_exit(30) == 0, leaving.tail()

    async def deregistered() -> bool:
        return leaving.instance_id not in await world.listed()

    await wait_until(deregistered, timeout=VISIBLE_TIMEOUT, interval=0.2)
    listed = await world.listed()
    assert joining.instance_id in listed, listed
    code, out, err = await world.cli("call", "research", '{"topic":"cli"}')
    assert code == 0, err
    assert json.loads(out)["topic"] == "cli"
    code, out, err = await world.cli("find", "research", "-o", "json")
    assert code == 0, err
    assert joining.instance_id in {o["instance_id"] for o in json.loads(out)}


@pytest.mark.parametrize("which", ["registry leader", "a follower"])
async def test_killing_a_node_loses_no_call(
    mesh3: Mesh3,
    which: str,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    await asyncio.gather(mesh3.agent(), mesh3.agent("summarizer.py"))
    async with _caller(mesh3) as mesh:
        await wait_until(lambda: mesh3.calls > 20, timeout=VISIBLE_TIMEOUT)
        leader = await _registry_leader(mesh3, mesh)
        node = leader if which == "registry leader" else next(n for n in NODES if n != leader)
        mesh3.cluster.kill(node)
        await _while_a_node_is_gone(mesh3, mesh, wait_until)
        mesh3.cluster.start()  # the node comes back and catches up
        before = mesh3.calls
        await wait_until(lambda: mesh3.calls > before + 20, timeout=VISIBLE_TIMEOUT)
    assert mesh3.failures == [], mesh3.failures[:5]
    assert mesh3.calls > 100


async def test_a_node_stalled_for_ten_seconds_loses_no_call(
    mesh3: Mesh3,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    await mesh3.agent()
    async with _caller(mesh3) as mesh:
        await wait_until(lambda: mesh3.calls > 20, timeout=VISIBLE_TIMEOUT)
        node = await _registry_leader(mesh3, mesh)
        pid = mesh3.cluster.pause(node)
        # The node hangs for 10 s (a stalled VM) while agents join and leave and the CLI runs.
        resume = asyncio.get_running_loop().call_later(10, mesh3.cluster.resume, pid)
        try:
            await _while_a_node_is_gone(mesh3, mesh, wait_until)
        finally:
            resume.cancel()
            mesh3.cluster.resume(pid)
        mesh3.cluster.wait_formed()
        before = mesh3.calls
        await wait_until(lambda: mesh3.calls > before + 20, timeout=VISIBLE_TIMEOUT)
    assert mesh3.failures == [], mesh3.failures[:5]


async def test_bootstrap_hands_out_every_node_and_check_shows_the_cluster(
    mesh3: Mesh3,
) -> None:
    code, out, err = await mesh3.cli("check", "-o", "json")
    checks = {c["check"]: c for c in json.loads(out)}
    assert code == 0, out + err
    assert [c for c in checks.values() if c["ok"] is False] == [], out
    assert checks["NATS auth"]["detail"].startswith("TLS, credentials required"), checks
    cluster = checks["NATS cluster"]
    assert cluster["ok"] is True, cluster
    for node in NODES:
        assert f"nats-{node}" in cluster["detail"], cluster
    assert f"meta leader {mesh3.cluster.meta_leader()}" in cluster["detail"], cluster
    buckets = checks["buckets"]
    assert buckets["ok"] is True, buckets
    assert f"{mesh3.bucket}: R3, leader nats-" in buckets["detail"], buckets
    async with httpx.AsyncClient(
        headers=mesh3.plane.headers(), verify=control_tls(mesh3.plane.workdir)
    ) as http:
        boot = (await http.get(f"{mesh3.plane.url}/v1/bootstrap", timeout=10)).json()
    assert sorted(boot["nats_url"].split(",")) == sorted(mesh3.cluster.urls)


async def test_buckets_with_fewer_replicas_are_reported_and_raised(
    cluster: NatsCluster,
    bucket: str,
    tmp_path: Path,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    # Buckets made with one replica, as by a process with AGENTMESH_KV_REPLICAS=1 (or before the
    # cluster grew).
    conn = await cluster.connection(bucket, kv_replicas=1)
    plane: Plane | None = None
    try:
        buckets = mesh_buckets(bucket)
        await RegistryStore(conn, buckets[0]).open()
        await PolicyStore(conn, buckets[1]).open()
        await SecurityStore(conn, buckets[2]).open()
        env = cluster.env(
            {"AGENTMESH_REGISTRY_BUCKET": bucket, "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9"}
        )
        before = await arun_cli("check", "-o", "json", env=env)
        row = {c["check"]: c for c in json.loads(before.stdout)}["buckets"]
        assert row["ok"] is False, row
        assert f"{bucket}: R1, leader nats-" in row["detail"], row
        assert "3 replica(s)" in row["hint"], row

        plane = Plane(cluster, bucket, tmp_path / "control")

        async def raised() -> bool:
            infos = [await bucket_replicas(conn.client, b) for b in buckets]
            return all(i.replicas == 3 for i in infos)

        await wait_until(raised, timeout=VISIBLE_TIMEOUT, interval=0.2)
        log = plane.log.read_text()
        for name in buckets:
            assert f"bucket {name} had 1 replica(s); raised to 3" in log, log
        after = await arun_cli("check", "-o", "json", env=plane.env())
        row = {c["check"]: c for c in json.loads(after.stdout)}["buckets"]
        assert row["ok"] is True, row
    finally:
        await conn.close()
        if plane is not None:
            terminate_all([plane.proc])
