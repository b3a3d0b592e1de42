"""Two control planes serving one mesh, each signing with its own intermediate CA under one
operator root, on the example's secured 3-node NATS cluster: stopping one leaves enrolment,
agents and the CLI working (real processes; agents enrol with join tokens and get their NATS
credentials from whichever control plane answers)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentmesh.control.operator_ca import write_operator_ca
from tests.control.control_process import ControlProcess, arun_cli
from tests.nats_cluster import NatsCluster

from .support import EXAMPLE_AGENTS, AgentProcess, clean_env, terminate_all

TRUST_DOMAIN = "agentmesh.local"
ADMIN = secrets.token_urlsafe(24)


def _plane(name: str, cluster: NatsCluster, bucket: str, tmp_path: Path) -> ControlProcess:
    """Control plane ``name`` on the cluster, with its own intermediate CA and the NATS keys
    the nodes trust (docs/deploy.md: every control plane holds the same)."""
    workdir = tmp_path / name
    cluster.share_keys(workdir)
    env = {
        "AGENTMESH_REGISTRY_BUCKET": bucket,
        "AGENTMESH_CA_CERT_FILE": str(tmp_path / "operator-ca" / f"{name}.pem"),
        "AGENTMESH_CA_KEY_FILE": str(tmp_path / "operator-ca" / f"{name}.key"),
        "AGENTMESH_TOKEN": ADMIN,
        "AGENTMESH_HEARTBEAT_INTERVAL": "1",
        "AGENTMESH_LEASE_TTL": "15",
    }
    return ControlProcess(workdir, env, nats_url=cluster.seeds, name=f"control plane {name}")


@pytest.fixture
def planes(bucket: str, tmp_path: Path) -> Iterator[list[ControlProcess]]:
    """Two control planes on the example's secured 3-node cluster, whose node certificates
    come from control plane one's intermediate (``agentmesh nats-config`` run on its machine)."""
    files = write_operator_ca(tmp_path / "operator-ca", TRUST_DOMAIN, ["one", "two"])
    cert, key = files["one"]
    ca_env = {"AGENTMESH_CA_CERT_FILE": str(cert), "AGENTMESH_CA_KEY_FILE": str(key)}
    cluster = NatsCluster(tmp_path / "cluster", tmp_path / "one", ca_env)
    started: list[ControlProcess] = []
    try:
        cluster.start()
        started += [_plane(n, cluster, bucket, tmp_path) for n in ("one", "two")]
        for plane in started:
            plane.start()
        yield started
    finally:
        for plane in started:
            plane.close()
        cluster.stop()


def _env(
    planes: list[ControlProcess], tmp_path: Path, join_token: str | None = None
) -> dict[str, str]:
    """Both control planes, comma-separated, and nothing of either's data dir."""
    env = {
        "AGENTMESH_CONTROL_URL": ",".join(p.url for p in planes),
        "AGENTMESH_TOKEN": ADMIN,
        "AGENTMESH_DATA_DIR": str(tmp_path / "elsewhere"),
        # The operator's root: what both control planes' HTTPS certificates chain to (a join
        # token's pin would do for agents; the admin CLI has none).
        "AGENTMESH_CONTROL_CA_FILE": str(tmp_path / "operator-ca" / "root.pem"),
    }
    if join_token is not None:
        env["AGENTMESH_JOIN_TOKEN"] = join_token
    return clean_env(env)


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = await arun_cli(*args, env=env)
    return done.returncode, done.stdout, done.stderr


async def _token(env: dict[str, str], *who: str) -> str:
    code, out, err = await _cli(env, "token", "create", *who, "--reusable", "-o", "json")
    assert code == 0, err
    token: str = json.loads(out)["token"]
    return token


async def test_either_control_plane_can_stop_without_enrolment_or_the_cli_noticing(
    planes: list[ControlProcess], tmp_path: Path
) -> None:
    env = _env(planes, tmp_path)
    researcher_token = await _token(env, "--agent", "researcher")
    summarizer_token = await _token(env, "--agent", "summarizer")
    client_token = await _token(env, "--client", "ops")
    started: list[AgentProcess] = []
    try:
        first = AgentProcess(
            EXAMPLE_AGENTS / "researcher.py",
            [],
            _env(planes, tmp_path, researcher_token),
            tmp_path / "logs" / "researcher.log",
        )
        started.append(first)
        await first.wait_ready()  # enrolled through control plane one (the first listed)

        planes[0].stop()

        second = AgentProcess(
            EXAMPLE_AGENTS / "summarizer.py",
            [],
            _env(planes, tmp_path, summarizer_token),
            tmp_path / "logs" / "summarizer.log",
        )
        started.append(second)
        await second.wait_ready()  # enrolled through control plane two: one refused connect

        client_env = {**_env(planes, tmp_path, client_token), "AGENTMESH_CLIENT_NAME": "ops"}
        code, out, err = await _cli(client_env, "agents", "-o", "json")
        assert code == 0, err
        listed = {r["instance_id"]: r for r in json.loads(out)}
        assert set(listed) == {first.instance_id, second.instance_id}
        assert all(r["mtls"] == "strict" for r in listed.values()), listed
        # The client (enrolled through two) calls both agents: certificates from both
        # intermediates chain to the one root every sidecar trusts.
        code, out, err = await _cli(client_env, "call", "research", '{"topic":"planes"}')
        assert code == 0, err
        assert json.loads(out)["topic"] == "planes"
        code, out, err = await _cli(client_env, "call", "summarize", '{"text":"a b c d"}')
        assert code == 0, err
        code, out, err = await _cli(client_env, "check", "-o", "json")
        checks = {c["check"]: c for c in json.loads(out)}
        assert checks["control plane"]["ok"] is True, checks
        assert planes[1].url in checks["control plane"]["detail"], checks
    finally:
        terminate_all(a.proc for a in started)
    for agent in started:
        assert "Traceback" not in agent.log.read_text(), agent.tail()
