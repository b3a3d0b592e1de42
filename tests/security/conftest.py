"""A real control plane (its own self-managed CA), agents that enrol with it, and its CLI."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentmesh import Mesh, Settings, connect
from tests.control.control_process import ControlProcess, arun_cli
from tests.e2e.support import (
    AgentProcess,
    clean_env,
    terminate_all,
)

ECHO_AGENT = """
from agentmesh import capability

@capability
async def echo(text: str = "") -> str:
    return text
"""


class Control(ControlProcess):
    """``python -m agentmesh control`` on the test's NATS and bucket, with a fresh data dir.

    Its own registry record gets a 10 s lease (not 1 s): no test here is about that record
    expiring, and on a loaded 2-core machine a 1 s lease ran out between two renewals of a live
    control plane, which then dropped out of the registry and re-registered mid-test.
    """

    def __init__(self, nats_url: str, bucket: str, workdir: Path, env: Mapping[str, str]) -> None:
        self.data_dir = workdir / "data"
        settings = {
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_LEASE_TTL": "10",
            **env,
        }
        super().__init__(self.data_dir, settings, nats_url=nats_url)
        self.start()

    def env(self, **extra: str) -> dict[str, str]:
        """A local process: the control plane's URL and data dir (its tokens), nothing else."""
        return clean_env(
            {
                "AGENTMESH_CONTROL_URL": self.url,
                "AGENTMESH_DATA_DIR": str(self.data_dir),
                **extra,
            }
        )

    def settings(self, **overrides: Any) -> Settings:
        """Settings of an in-process client of this mesh (not the suite's test CA)."""
        return Settings(
            control_url=self.url,
            data_dir=self.data_dir,
            ca_cert_file=None,
            ca_key_file=None,
            **overrides,
        )

    async def cli(self, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        done = await arun_cli(*args, env=env if env is not None else self.env())
        return done.returncode, done.stdout, done.stderr


StartControl = Callable[..., Control]


@pytest.fixture
def start_control(nats_url: str, bucket: str, tmp_path: Path) -> Iterator[StartControl]:
    started: list[Control] = []
    numbers = itertools.count(1)

    def start(**env: str) -> Control:
        control = Control(nats_url, bucket, tmp_path / f"control-{next(numbers)}", env)
        started.append(control)
        return control

    yield start
    for control in started:
        control.close()


SpawnJoined = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
async def spawn_joined(tmp_path: Path) -> AsyncIterator[SpawnJoined]:
    """``await spawn_joined(env, name=...)``: an echo agent process that enrols by itself."""
    source = tmp_path / "echo_agent.py"
    source.write_text(ECHO_AGENT)
    started: list[AgentProcess] = []
    numbers = itertools.count(1)

    async def spawn(
        env: Mapping[str, str], *, name: str = "echoer", ready: bool = True
    ) -> AgentProcess:
        log = tmp_path / "logs" / f"{name}-{next(numbers)}.log"
        agent = AgentProcess(source, ["--name", name], env, log)
        started.append(agent)
        if ready:
            await agent.wait_ready()
        return agent

    yield spawn
    terminate_all(a.proc for a in started)


@pytest.fixture
async def joined_mesh() -> AsyncIterator[Callable[[Control], Awaitable[Mesh]]]:
    opened: list[Mesh] = []

    async def open_mesh(control: Control, **overrides: Any) -> Mesh:
        mesh = await connect(control.settings(**overrides))
        opened.append(mesh)
        return mesh

    yield open_mesh
    for mesh in opened:
        await mesh.close()
