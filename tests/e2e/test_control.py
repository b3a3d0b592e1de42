"""``agentmesh control`` as a process: its API, agents that join through it, the CLI against it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.control.control_process import control_tls

from .support import (
    EXAMPLE_AGENTS,
    HEARTBEAT,
    LEASE,
    READY_TIMEOUT,
    SpawnAgent,
    clean_env,
    popen_logged,
    processes_mentioning,
    tail,
    terminate_all,
)

CLI_TIMEOUT = 30.0


class ControlProcess:
    """``python -m agentmesh control --port 0 --ready-file F [...]``, ready when F appears."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / "control.json"
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
                str(self.ready_file),
                *args,
            ],
            self.log,
            env,
        )
        self.info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        url: str = self.info["control_url"]
        return url

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"control plane exited with {self.proc.returncode}:\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"control plane not ready in {timeout}s:\n{tail(self.log)}")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())


StartControl = Callable[..., ControlProcess]


def admin_token(control: ControlProcess) -> str:
    """The control plane's admin token, from the file it wrote into its data dir (0600)."""
    return Path(control.info["admin_token_file"]).read_text().strip()


@pytest.fixture
def start_control(bucket: str, tmp_path: Path) -> Iterator[StartControl]:
    """``start_control(nats_url=None | url)`` → a ready control plane on the test's bucket."""
    started: list[ControlProcess] = []

    def start(nats_url: str | None, workdir: Path | None = None) -> ControlProcess:
        workdir = workdir or tmp_path / f"control-{len(started) + 1}"
        env = clean_env(
            {
                "AGENTMESH_REGISTRY_BUCKET": bucket,
                "AGENTMESH_DATA_DIR": str(workdir),
                # handed to agents in the bootstrap document
                "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
                "AGENTMESH_LEASE_TTL": str(LEASE),
            }
        )
        args = ["--nats-url", nats_url] if nats_url else []
        control = ControlProcess(args, env, workdir)
        started.append(control)
        control.wait_ready()
        return control

    yield start
    terminate_all(c.proc for c in started)


async def run_cli(
    *args: str, control_url: str, data_dir: Path | None = None
) -> tuple[int, str, str]:
    """``python -m agentmesh ARGS`` with only AGENTMESH_CONTROL_URL (and the control plane's
    data dir, whose tokens it then uses) set: (code, stdout, stderr)."""
    env = {"AGENTMESH_CONTROL_URL": control_url}
    if data_dir is not None:
        env["AGENTMESH_DATA_DIR"] = str(data_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentmesh",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_agents_join_through_the_control_plane_and_the_cli_works(
    nats_url: str, start_control: StartControl, spawn_agent: SpawnAgent, wait_until
) -> None:
    control = start_control(nats_url)
    assert control.info["nats_url"] == nats_url
    assert control.info["embedded_nats"] is None

    # Only AGENTMESH_CONTROL_URL and the control plane's data dir, as on one machine: the agent
    # learns NATS and the bucket from /v1/bootstrap, and enrols (mTLS) with the local join token.
    workdir = Path(control.info["join_token_file"]).parent
    agent = await spawn_agent(
        EXAMPLE_AGENTS / "researcher.py",
        isolated=True,
        env={"AGENTMESH_CONTROL_URL": control.url, "AGENTMESH_DATA_DIR": str(workdir)},
        visible=False,  # the test's mesh runs on the suite's CA, this agent on the control plane's
    )
    assert agent.endpoint.startswith("https://")

    admin = admin_token(control)
    async with httpx.AsyncClient(
        base_url=control.url,
        timeout=10,
        headers={"authorization": f"Bearer {admin}"},
        verify=control_tls(workdir),
    ) as client:

        async def listed() -> bool:
            return bool((await client.get("/v1/agents")).json())

        await wait_until(listed, timeout=10)
        boot = (await client.get("/v1/bootstrap")).json()
        assert boot["nats_url"] == nats_url
        agents = await client.get("/v1/agents")
        capabilities = await client.get(
            "/v1/capabilities", params={"name": "research", "tag": "research"}
        )
        none = await client.get("/v1/capabilities", params={"name": "research", "version": ">=2"})
        healthz = await client.get("/healthz")
        docs = await client.get("/docs")
        openapi = await client.get("/openapi.json")
        bad_label = await client.get("/v1/capabilities", params={"label": "nolabel"})

    assert agents.status_code == 200
    assert [a["instance_id"] for a in agents.json()] == [agent.instance_id]
    assert capabilities.status_code == 200
    assert [(o["instance_id"], o["endpoint"]) for o in capabilities.json()] == [
        (agent.instance_id, agent.endpoint)
    ]
    assert none.json() == []
    assert healthz.status_code == 200
    assert healthz.json()["nats"] is True
    assert healthz.json()["agents"] == 1
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert openapi.status_code == 200
    paths = openapi.json()["paths"]
    for path in ("/v1/bootstrap", "/v1/agents", "/v1/capabilities"):
        assert path in paths, sorted(paths)
    assert bad_label.status_code == 422
    assert bad_label.headers["content-type"].startswith("application/problem+json")
    assert bad_label.json()["code"] == "invalid_input"

    (a_code, a_out, a_err), (f_code, f_out, f_err), (c_code, c_out, c_err) = await asyncio.gather(
        run_cli("agents", "-o", "json", control_url=control.url, data_dir=workdir),
        run_cli("find", "research", "-o", "json", control_url=control.url, data_dir=workdir),
        run_cli("call", "research", '{"topic":"mesh"}', control_url=control.url, data_dir=workdir),
    )
    assert a_code == 0, a_err
    assert [r["instance_id"] for r in json.loads(a_out)] == [agent.instance_id]
    assert f_code == 0, f_err
    offers = json.loads(f_out)
    assert [o["instance_id"] for o in offers] == [agent.instance_id]
    assert offers[0]["capability"]["name"] == "research"
    assert c_code == 0, c_err
    result = json.loads(c_out)
    assert result["topic"] == "mesh"
    assert result["facts"]
    for err in (a_err, f_err, c_err):
        assert "Traceback" not in err


def test_control_plane_runs_and_stops_its_embedded_nats(
    start_control: StartControl, tmp_path: Path
) -> None:
    workdir = tmp_path / "embedded"
    control = start_control(None, workdir)
    store = workdir / "nats"
    assert control.info["embedded_nats"] == str(store)
    assert control.info["nats_url"].startswith("tls://127.0.0.1:")
    assert control.info["nats_auth"] == "required"

    nats_servers = [p for p in processes_mentioning(str(store)) if "nats-server" in p]
    assert len(nats_servers) == 1, nats_servers
    healthz = httpx.get(f"{control.url}/healthz", timeout=10, verify=control_tls(workdir))
    assert healthz.status_code == 200
    assert healthz.json()["nats"] is True

    control.proc.send_signal(signal.SIGTERM)
    try:
        code = control.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"control plane did not stop on SIGTERM:\n{tail(control.log)}")
    assert code == 0, tail(control.log)
    assert "Traceback" not in control.log.read_text()
    assert processes_mentioning(str(workdir)) == [], "the embedded nats-server outlived it"
