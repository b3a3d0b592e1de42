"""Infrastructure restarts never need an agent restart: the control plane with its embedded NATS
restarted, its NATS moved to another port, its nats-server killed (real processes throughout)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agentmesh.control.nats_supervisor import stable_port
from tests.control.control_process import ControlProcess, arun_cli

from .support import (
    EXAMPLE_AGENTS,
    HEARTBEAT,
    SHORT_LEASE,
    AgentProcess,
    clean_env,
    terminate_all,
)

RECOVERY_TIMEOUT = 30.0  # generous: shared cores; the recovery itself takes about a second


class Control(ControlProcess):
    """``agentmesh control`` with its embedded NATS on a fixed port and data dir, restartable
    as an operator would."""

    def __init__(self, workdir: Path, bucket: str) -> None:
        env = {
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            # Short: the records the agents left expire during a restart, so being listed again
            # means they re-registered (a stall that lapses one is recovered the same way).
            "AGENTMESH_LEASE_TTL": str(SHORT_LEASE),
        }
        # A port the kernel never gives an outgoing connection, so the restart can bind it again.
        super().__init__(workdir, env, port=stable_port())

    def agent_env(self) -> dict[str, str]:
        """Only the control plane's URL and data dir (its join token), as on its machine; the
        agents re-ask it for NATS after 1 s without NATS."""
        return clean_env(
            {
                "AGENTMESH_CONTROL_URL": f"https://127.0.0.1:{self.port}",
                "AGENTMESH_DATA_DIR": str(self.workdir),
                "AGENTMESH_NATS_REBOOTSTRAP_AFTER": "1",
            }
        )


@pytest.fixture
def control(tmp_path: Path, bucket: str) -> Iterator[Control]:
    plane = Control(tmp_path / "control", bucket)
    yield plane
    plane.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    terminate_all(a.proc for a in started)


async def _cli(control: Control, *args: str) -> tuple[int, str, str]:
    done = await arun_cli(*args, env=control.agent_env())
    return done.returncode, done.stdout, done.stderr


async def _start_agents(control: Control, agents: list[AgentProcess], tmp_path: Path) -> None:
    for n, file in enumerate(("researcher.py", "summarizer.py")):
        log = tmp_path / "logs" / f"{file}-{n}.log"
        agents.append(AgentProcess(EXAMPLE_AGENTS / file, [], control.agent_env(), log))
    await asyncio.gather(*(a.wait_ready() for a in agents))


async def _listed(control: Control, agents: list[AgentProcess]) -> bool:
    async with httpx.AsyncClient(
        base_url=control.url, headers=control.headers(), verify=control.tls()
    ) as http:
        try:
            resp = await http.get("/v1/agents", timeout=5)
        except httpx.HTTPError:
            return False
    if resp.status_code != 200:
        return False
    return {a.instance_id for a in agents} <= {r["instance_id"] for r in resp.json()}


async def _recovered(
    control: Control,
    agents: list[AgentProcess],
    wait_until: Callable[..., Awaitable[float]],
) -> float:
    """Seconds until every agent is listed again; then a CLI call through the mesh works.

    The listing alone can be satisfied early by the records the agents left before the restart
    (their leases had not expired yet), so the call is tried until the agents have
    re-registered, within the same bound.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_TIMEOUT
    took = await wait_until(lambda: _listed(control, agents), timeout=RECOVERY_TIMEOUT)
    while True:
        code, out, err = await _cli(control, "call", "research", '{"topic":"restart"}')
        if code == 0 or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert code == 0, err
    assert json.loads(out)["topic"] == "restart"
    assert all(a.returncode is None for a in agents), "an agent exited"
    return took


async def test_restarting_control_with_its_embedded_nats_needs_no_agent_restart(
    control: Control,
    agents: list[AgentProcess],
    tmp_path: Path,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    control.start()
    nats_url = control.info["nats_url"]
    await _start_agents(control, agents, tmp_path)
    assert await _listed(control, agents)

    control.stop()
    control.start()
    assert control.info["nats_url"] == nats_url, "the embedded NATS came back elsewhere"
    took = await _recovered(control, agents, wait_until)
    print(f"agents listed again {took:.2f}s after the control plane was back")


async def test_agents_follow_the_embedded_nats_to_a_new_port(
    control: Control,
    agents: list[AgentProcess],
    tmp_path: Path,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    control.start()
    old_url = control.info["nats_url"]
    await _start_agents(control, agents, tmp_path)

    control.stop()
    control.start(AGENTMESH_EMBEDDED_NATS_PORT=str(stable_port()))
    assert control.info["nats_url"] != old_url
    await _recovered(control, agents, wait_until)
    for agent in agents:
        assert "NATS moved: following the control plane" in agent.log.read_text(), agent.tail()


async def test_a_killed_embedded_nats_is_restarted_and_agents_recover(
    control: Control,
    agents: list[AgentProcess],
    tmp_path: Path,
    wait_until: Callable[..., Awaitable[float]],
) -> None:
    control.start()
    await _start_agents(control, agents, tmp_path)
    async with httpx.AsyncClient(
        base_url=control.url, headers=control.headers(), verify=control.tls()
    ) as http:
        before = (await http.get("/healthz")).json()["nats_server"]
        assert before["mode"] == "embedded"
        assert before["state"] == "running"
        assert before["restarts"] == 0

        os.kill(before["pid"], signal.SIGKILL)

        async def restarted() -> bool:
            now = (await http.get("/healthz")).json()["nats_server"]
            return bool(now["state"] == "running" and now["restarts"] == 1)

        await wait_until(restarted, timeout=RECOVERY_TIMEOUT)
        after = (await http.get("/healthz")).json()
        dashboard = (await http.get("/ui/_/summary", headers={"hx-request": "true"})).text
    assert 'data-stat="nats">running<' in dashboard, dashboard
    assert "restarted 1× (last: signal 9)" in dashboard, dashboard
    assert after["nats_server"]["pid"] != before["pid"]
    assert after["nats_server"]["last_exit"] == "signal 9"
    assert after["nats_server"]["url"] == before["url"]
    await _recovered(control, agents, wait_until)
    log = (control.workdir / "control.log").read_text()
    assert "died (signal 9); restart 1 of at most" in log, log

    _, out, _ = await _cli(control, "check", "-o", "json")
    checks = {c["check"]: c for c in json.loads(out)}
    assert checks["NATS"]["ok"] is True, checks
    assert "embedded, running, restarted 1 time" in checks["NATS"]["detail"], checks["NATS"]
