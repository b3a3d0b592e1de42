"""An operator-run NATS: the documented configuration (examples/deploy/nats-auth.conf) on a real
nats-server, with the operator's own TLS CA; and an open NATS, which still works but is named.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from uuid import uuid4

import nats.errors
import pytest

from agentmesh.security.identity import SpiffeId
from tests.control.control_process import arun_cli, cli_env, control_process
from tests.e2e.support import EXAMPLE_AGENTS, AgentProcess, terminate_all
from tests.nats.support import (
    Connection,
    ControlPlane,
    closed_by_server,
    connect,
    dashboard_says_open,
    enrol,
    operator_nats,
)

TD = "agentmesh.local"


async def test_the_example_deploy_config_runs_a_mesh_with_least_privilege(tmp_path: Path):
    data = tmp_path / "control"
    server, ca_cert = operator_nats(tmp_path, data)
    server.start()  # on 127.0.0.1 and a free port: the flags win over the file's `listen`
    bucket = f"t_{uuid4().hex[:12]}"
    tls_ca = {"AGENTMESH_NATS_TLS_CA_FILE": str(ca_cert)}
    agent: AgentProcess | None = None
    try:
        with control_process(server.url, bucket, data, env=tls_ca) as control_url:
            env = cli_env(
                {
                    "AGENTMESH_CONTROL_URL": control_url,
                    "AGENTMESH_DATA_DIR": str(data),
                    "AGENTMESH_REGISTRY_BUCKET": bucket,
                    **tls_ca,
                }
            )
            agent = AgentProcess(EXAMPLE_AGENTS / "summarizer.py", [], env, tmp_path / "agent.log")
            await agent.wait_ready()
            called = await arun_cli("call", "summarize", '{"text": "one two three"}', env=env)
            assert called.returncode == 0, called.stderr
            assert '"words": 3' in called.stdout
            checked = await arun_cli("check", env=env)
            assert "✔ NATS auth" in checked.stdout, checked.stdout

            control = ControlPlane(control_url, server.url, data, bucket, tmp_path / "x")
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await Connection().connect(server.url, tls=_tls(ca_cert))
            summarizer = await enrol(control, SpiffeId.agent(TD, "summarizer"))
            summarizer.roots = ca_cert.read_text()  # NATS's TLS is the operator's
            conn = await connect(server.url, summarizer)
            try:
                await conn.violation(f"$KV.{bucket}_policies.AccessPolicy.allow-all")
                await conn.violation(f"$KV.{bucket}_security.pub.revoked.1f", b"")
                await conn.violation(f"$KV.{bucket}_security.pub.bundle")
                await conn.violation(f"$KV.{bucket}_security.ca.token.{'0' * 64}")
                await conn.violation(f"$KV.{bucket}.writer.writer-1")
            finally:
                await conn.close()
            # Revocation reaches this NATS too (a claims update from the system account).
            doomed = await enrol(control, SpiffeId.agent(TD, "doomed"))
            doomed.roots = summarizer.roots
            doomed_conn = await connect(server.url, doomed)
            try:
                revoked = await arun_cli("identity", "revoke", "--name", "doomed", env=env)
                assert revoked.returncode == 0, revoked.stderr
                assert await closed_by_server(doomed_conn), doomed_conn.errors
                with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                    await connect(server.url, doomed)
            finally:
                await doomed_conn.close()
    finally:
        if agent is not None:
            terminate_all([agent.proc])
        server.stop()


def _tls(ca_cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_cert))


async def test_an_open_nats_works_and_the_control_plane_says_so(
    nats_url: str, bucket: str, tmp_path: Path
):
    """A trusted private network is the operator's call: everything works on an open NATS,
    and the control plane logs a warning at start (check and dashboard: tests/control)."""
    with control_process(nats_url, bucket, tmp_path) as control_url:
        env = cli_env(
            {
                "AGENTMESH_CONTROL_URL": control_url,
                "AGENTMESH_DATA_DIR": str(tmp_path),
                "AGENTMESH_REGISTRY_BUCKET": bucket,
            }
        )
        agent = AgentProcess(EXAMPLE_AGENTS / "summarizer.py", [], env, tmp_path / "agent.log")
        try:
            await agent.wait_ready()
            called = await arun_cli("call", "summarize", '{"text": "one two"}', env=env)
            assert called.returncode == 0, called.stderr
            checked = await arun_cli("check", env=env)
            assert "✖ NATS auth" in checked.stdout, checked.stdout
            assert await dashboard_says_open(control_url, tmp_path)
        finally:
            terminate_all([agent.proc])
    log = (tmp_path / "control.log").read_text()
    assert "is OPEN: it accepts connections without credentials" in log, log
