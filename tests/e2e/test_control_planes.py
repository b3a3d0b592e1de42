"""Two control planes serving one mesh, each signing with its own intermediate CA under one
operator root: stopping one leaves enrolment, agents and the CLI working (real processes)."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agentmesh.control.operator_ca import write_operator_ca

from .support import (
    EXAMPLE_AGENTS,
    READY_TIMEOUT,
    AgentProcess,
    clean_env,
    popen_logged,
    tail,
    terminate_all,
)

CLI_TIMEOUT = 30.0
TRUST_DOMAIN = "agentmesh.local"


class Plane:
    def __init__(self, name: str, nats_url: str, bucket: str, tmp_path: Path, ca: Any) -> None:
        self.workdir = tmp_path / name
        self.workdir.mkdir()
        ready = self.workdir / "control.json"
        self.log = self.workdir / "control.log"
        cert, key = ca
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
                nats_url,
            ],
            self.log,
            clean_env(
                {
                    "AGENTMESH_REGISTRY_BUCKET": bucket,
                    "AGENTMESH_DATA_DIR": str(self.workdir),
                    "AGENTMESH_CA_CERT_FILE": str(cert),
                    "AGENTMESH_CA_KEY_FILE": str(key),
                    "AGENTMESH_TOKEN": ADMIN,
                    "AGENTMESH_HEARTBEAT_INTERVAL": "0.25",
                    "AGENTMESH_LEASE_TTL": "1",
                }
            ),
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"control plane {name} not ready:\n{tail(self.log)}")
            time.sleep(0.02)
        self.url: str = json.loads(ready.read_text())["control_url"]


ADMIN = secrets.token_urlsafe(24)


@pytest.fixture
def planes(nats_url: str, bucket: str, tmp_path: Path) -> Any:
    files = write_operator_ca(tmp_path / "operator-ca", TRUST_DOMAIN, ["one", "two"])
    started = [Plane(n, nats_url, bucket, tmp_path, files[n]) for n in ("one", "two")]
    yield started
    terminate_all(p.proc for p in started)


def _env(planes: list[Plane], tmp_path: Path, join_token: str | None = None) -> dict[str, str]:
    """Both control planes, comma-separated, and nothing of either's data dir."""
    env = {
        "AGENTMESH_CONTROL_URL": ",".join(p.url for p in planes),
        "AGENTMESH_TOKEN": ADMIN,
        "AGENTMESH_DATA_DIR": str(tmp_path / "elsewhere"),
    }
    if join_token is not None:
        env["AGENTMESH_JOIN_TOKEN"] = join_token
    return clean_env(env)


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentmesh",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _token(env: dict[str, str], *who: str) -> str:
    code, out, err = await _cli(env, "token", "create", *who, "--reusable", "-o", "json")
    assert code == 0, err
    token: str = json.loads(out)["token"]
    return token


async def test_either_control_plane_can_stop_without_enrolment_or_the_cli_noticing(
    planes: list[Plane], tmp_path: Path
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

        planes[0].proc.send_signal(signal.SIGTERM)
        assert planes[0].proc.wait(15) == 0, tail(planes[0].log)

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
