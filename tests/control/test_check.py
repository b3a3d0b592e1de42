"""``agentmesh check`` against a real control process and real nats-servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agentmesh import Agent, Mesh, Settings, capability
from agentmesh.nats_server import NatsServer
from tests.control.control_process import arun_cli, cli_env, control_process, run_cli


@capability
async def ping() -> str:
    return "pong"


def marks(stdout: str) -> dict[str, str]:
    """check name → its mark (✔, ✖ or ·), from the lines that carry one."""
    found = {}
    for line in stdout.splitlines():
        if line[:1] in ("✔", "✖", "·"):
            name = line[2:].split("  ")[0].strip()
            found[name] = line[0]
    return found


async def test_a_healthy_mesh_on_an_open_nats_fails_only_the_nats_auth_check(
    start_agent, nats_url: str, bucket: str, tmp_path: Path
):
    """The shared test NATS takes anyone: ``check`` says so loudly (and exits 1); every other
    check passes. The same on the embedded NATS passes all: tests/nats/test_embedded.py."""
    await start_agent([ping], name="pinger")
    with control_process(nats_url, bucket, tmp_path) as control_url:
        # The CLI finds the admin token in the control plane's data dir, as on one machine.
        env = cli_env({"AGENTMESH_CONTROL_URL": control_url, "AGENTMESH_DATA_DIR": str(tmp_path)})
        done = await arun_cli("check", env=env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert marks(done.stdout) == {
            "control plane": "✔",
            "NATS": "✔",
            "NATS auth": "✖",
            "JetStream": "✔",
            "registry": "✔",
            "NATS cluster": "·",  # a single server: nothing to say about a cluster
            "buckets": "✔",
            "clock": "✔",
            "identities": "✔",
            "mTLS": "✔",
        }, done.stdout
        assert f"bucket {bucket!r}: 1 agent instance(s)" in done.stdout, done.stdout

        assert "OPEN: NATS accepts connections without credentials" in done.stdout

        as_json = await arun_cli("check", "-o", "json", env=env)
        assert as_json.returncode == 1, as_json.stderr
        checks = {c["check"]: c for c in json.loads(as_json.stdout)}
        assert checks["NATS"]["ok"] is True
        assert checks["NATS"]["detail"].startswith(nats_url)
        assert checks["identities"]["ok"] is True
        assert checks["mTLS"]["detail"] == "all 1 instance(s) strict"
        assert checks["NATS cluster"]["detail"] == f"a single server ({nats_url})"
        assert f"{bucket}: R1, leader " in checks["buckets"]["detail"]


async def test_a_stopped_nats_fails_the_check(tmp_path: Path, bucket: str):
    nats = NatsServer(tmp_path / "nats")
    nats.start()
    try:
        with control_process(nats.url, bucket, tmp_path) as control_url:
            nats.stop()
            env = {"AGENTMESH_CONTROL_URL": control_url, "AGENTMESH_DATA_DIR": str(tmp_path)}
            done = await arun_cli("check", env=cli_env(env))
    finally:
        if nats.running:
            nats.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    found = marks(done.stdout)
    assert found["control plane"] == "✔"
    assert found["NATS"] == "✖"
    assert found["JetStream"] == "·"
    assert found["registry"] == "·"
    nats_line = next(line for line in done.stdout.splitlines() if line.startswith("✖ NATS"))
    assert nats.url in nats_line
    assert "connection refused" in nats_line
    assert "→ start nats-server" in done.stdout


def test_no_control_plane_and_no_nats_is_one_clear_failure(tmp_path: Path):
    done = run_cli("check", env=cli_env({"AGENTMESH_CONTROL_URL": "http://127.0.0.1:9"}))
    assert done.returncode == 1, done.stdout + done.stderr
    found = marks(done.stdout)
    assert found["control plane"] == "✖"
    assert set(found.values()) == {"✖", "·"}
    assert "→ start it with `agentmesh control`" in done.stdout
    assert done.stderr == ""


async def test_permissive_agents_are_reported(
    settings: Settings, mesh: Mesh, nats_url: str, bucket: str, tmp_path: Path, wait_until
):
    lax = Agent("lax", capabilities=[ping])
    ready = asyncio.Event()
    serving = asyncio.create_task(
        lax.serve(
            settings=Settings(**{**settings.model_dump(), "mtls": "permissive"}),
            on_ready=lambda _: ready.set(),
            handle_signals=False,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        with control_process(nats_url, bucket, tmp_path) as control_url:
            env = cli_env(
                {"AGENTMESH_CONTROL_URL": control_url, "AGENTMESH_DATA_DIR": str(tmp_path)}
            )
            done = await arun_cli("check", env=env)
            assert marks(done.stdout)["mTLS"] == "·", done.stdout
            assert f"{lax.instance_id} (permissive)" in done.stdout, done.stdout
            assert "AGENTMESH_MTLS=strict" in done.stdout
    finally:
        lax.stop()
        await asyncio.wait_for(serving, 10)
