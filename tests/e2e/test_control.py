"""``agentmesh control`` as a process: its API, agents that join through it, the CLI against it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.control.control_process import ControlProcess, arun_cli, control_tls

from .support import (
    EXAMPLE_AGENTS,
    HEARTBEAT,
    LEASE,
    SpawnAgent,
    clean_env,
    processes_mentioning,
)

StartControl = Callable[..., ControlProcess]


@pytest.fixture
def start_control(bucket: str, tmp_path: Path) -> Iterator[StartControl]:
    """``start_control(nats_url=None | url)`` → a ready control plane on the test's bucket."""
    started: list[ControlProcess] = []

    def start(nats_url: str | None, workdir: Path | None = None) -> ControlProcess:
        workdir = workdir or tmp_path / f"control-{len(started) + 1}"
        env = {
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            # handed to agents in the bootstrap document
            "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "AGENTMESH_LEASE_TTL": str(LEASE),
        }
        control = ControlProcess(workdir, env, nats_url=nats_url)
        started.append(control)
        return control.start()

    yield start
    for control in started:
        control.close()


async def run_cli(
    *args: str, control_url: str, data_dir: Path | None = None
) -> tuple[int, str, str]:
    """``python -m agentmesh ARGS`` with only AGENTMESH_CONTROL_URL (and the control plane's
    data dir, whose tokens it then uses) set: (code, stdout, stderr)."""
    env = {"AGENTMESH_CONTROL_URL": control_url}
    if data_dir is not None:
        env["AGENTMESH_DATA_DIR"] = str(data_dir)
    done = await arun_cli(*args, env=clean_env(env))
    return done.returncode, done.stdout, done.stderr


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

    admin = control.admin_token
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

    control.stop()
    assert "Traceback" not in control.log.read_text()
    assert processes_mentioning(str(workdir)) == [], "the embedded nats-server outlived it"
