"""The mesh on a real three-node NATS cluster (examples/deploy's files, R3 buckets): losing or
stalling any one node loses no call, and registration, deregistration, joining and the CLI keep
working while it is gone. Real processes throughout: nats-servers, a control plane, agents, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import nats.errors
import pytest

from agentmesh import Mesh, Settings, connect
from agentmesh.control.nats_status import mesh_buckets
from agentmesh.nats_server import NatsServer
from agentmesh.policy.store import PolicyStore
from agentmesh.registry import RegistryStore
from agentmesh.registry.cluster import bucket_replicas
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import key_pem, new_key, pem
from agentmesh.security.store import SecurityStore
from tests.control.control_process import ControlProcess, arun_cli
from tests.mesh_ca import TRUST_DOMAIN, mesh_ca
from tests.nats.support import Connection
from tests.nats_cluster import NODES, NatsCluster

from .support import (
    EXAMPLE_AGENTS,
    AgentProcess,
    clean_env,
    terminate_all,
)

#: Leases on a cluster outlive a leader election (4-9 s in nats-server) plus a renewal's timeout:
#: see docs/deploy.md. Heartbeats stay frequent.
LEASE = 15
HEARTBEAT = 1.0
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


class Plane(ControlProcess):
    """One ``agentmesh control`` on the cluster (seeds: every node), signing with the test CA,
    holding the NATS keys the nodes trust (as every control plane of the mesh must)."""

    def __init__(self, cluster: NatsCluster, bucket: str, workdir: Path) -> None:
        cluster.share_keys(workdir)
        env = {
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "AGENTMESH_LEASE_TTL": str(LEASE),
            **mesh_ca().env(),
        }
        super().__init__(workdir, env, nats_url=cluster.seeds)
        self.start()

    def client_env(self) -> dict[str, str]:
        """What agents and the CLI run with: only the control plane's URL (NATS comes from its
        bootstrap: the cluster's URLs), its data dir (admin token) and the test CA."""
        return clean_env(
            {
                "AGENTMESH_CONTROL_URL": self.url,
                "AGENTMESH_DATA_DIR": str(self.workdir),
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
        agent = AgentProcess(EXAMPLE_AGENTS / file, [], self.plane.client_env(), log)
        self.agents.append(agent)
        await agent.wait_ready()
        return agent

    async def cli(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        done = await arun_cli(*args, env={**self.plane.client_env(), **(env or {})})
        return done.returncode, done.stdout, done.stderr

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
        terminate_all(a.proc for a in world.agents)
        world.plane.close()


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
    # The meta leader comes from NATS itself (the control plane asks as the system account);
    # the monitoring endpoints, when named, are read instead.
    monitors = {"AGENTMESH_NATS_MONITOR_URL": ",".join(mesh3.cluster.monitor_urls)}
    for extra in ({}, monitors):
        code, out, err = await mesh3.cli("check", "-o", "json", env=extra)
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
    async with httpx.AsyncClient(headers=mesh3.plane.headers(), verify=mesh3.plane.tls()) as http:
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
        after = await arun_cli("check", "-o", "json", env=plane.client_env())
        row = {c["check"]: c for c in json.loads(after.stdout)}["buckets"]
        assert row["ok"] is True, row
    finally:
        await conn.close()
        if plane is not None:
            plane.close()


async def test_an_outsider_is_refused_by_every_node(cluster: NatsCluster) -> None:
    """nats-py and no credentials: every node requires TLS with its mesh certificate and, even
    to a client trusting the mesh CA, refuses a connection without a user JWT the control
    plane signed."""
    trusting = ssl.create_default_context(cadata="".join(pem(c) for c in mesh_ca().ca.roots))
    for node in NODES:
        port = cluster.client_ports[node]
        with pytest.raises(ssl.SSLError):  # TLS is required; the system's roots do not do
            await Connection().connect(f"nats://127.0.0.1:{port}")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Connection().connect(cluster.url(node), tls=trusting)


def test_a_workload_certificate_cannot_join_the_cluster(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    """A nats-server with an agent's certificate (same CA as the nodes') dialling the routes:
    every node refuses it (route authorization names the nodes' certificates only)."""
    key = new_key()
    cert = mesh_ca().ca.issue(key.public_key(), SpiffeId.agent(TRUST_DOMAIN, "researcher"))
    (tmp_path / "agent.key").write_bytes(key_pem(key))
    (tmp_path / "agent.pem").write_bytes(pem(cert).encode())
    routes = "\n".join(f'    "nats-route://127.0.0.1:{p}"' for p in cluster.route_ports.values())
    (tmp_path / "intruder.conf").write_text(
        "server_name: intruder\nhost: 127.0.0.1\nport: -1\n"
        "cluster {\n  name: agentmesh\n  listen: 127.0.0.1:-1\n"
        f'  tls {{\n    cert_file: "{tmp_path / "agent.pem"}"\n'
        f'    key_file: "{tmp_path / "agent.key"}"\n'
        f'    ca_file: "{cluster.root / "tls" / "mesh-ca.pem"}"\n    timeout: 5\n  }}\n'
        f"  routes: [\n{routes}\n  ]\n}}\n"
    )
    intruder = NatsServer(tmp_path / "log", config=tmp_path / "intruder.conf")
    intruder.start(timeout=30)
    try:
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        refused: set[str] = set()
        while refused != set(NODES) and time.monotonic() < deadline:
            for node in NODES:
                log = cluster.servers[node].log_path.read_text(errors="replace")
                if re.search(r"rid:\d+ - authentication error", log):  # rid: a route
                    refused.add(node)
            time.sleep(0.1)
        assert refused == set(NODES), refused
        for node in NODES:
            routez = cluster.monitor(node, "routez") or {}
            remotes = {r.get("remote_name") for r in routez.get("routes", [])}
            assert "intruder" not in remotes, routez
    finally:
        intruder.stop()
