"""An operator-run NATS restarted or reloaded under a control plane learns the revocations again
(docs/security.md, "Revocation in NATS").

The server runs the example configuration with the accounts file `agentmesh nats-config` wrote
(a MEMORY resolver preloaded from it), so a restarted or reloaded server starts from that file:
without the revocations the control plane pushed at runtime. A revoked workload knocks all the
while (a new connection every few tens of milliseconds) and every outcome is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import nats.errors
import pytest

from agentmesh.registry import NatsConnection
from agentmesh.security.identity import SpiffeId
from tests.control.control_process import arun_cli, cli_env, control_process
from tests.nats.support import (
    VERDICT,
    Connection,
    ControlPlane,
    NatsUser,
    enrol,
    operator_nats,
)

TD = "agentmesh.local"
VICTIM = "revoked-before-restart"
#: Generous on a loaded machine, and far below an hour-long guard interval: the victim is
#: refused again within this many seconds of the restart or reload.
BOUND = 20.0
#: How long the victim keeps knocking after its first refusal.
KNOCKING = 3.0
#: Pause between two knocks.
_PAUSE = 0.05

Outcome = tuple[float, str]


async def _knock(url: str, user: NatsUser) -> str:
    """One connection attempt: "admitted", "refused" (the credentials) or "unreachable"."""
    try:
        conn = await Connection().connect(url, **user.options())
    except nats.errors.Error as exc:
        if "Authorization Violation" in str(exc):
            return "refused"
        return "unreachable"
    except OSError:
        return "unreachable"
    await conn.close()
    return "admitted"


async def _knocking(url: str, user: NatsUser, outcomes: list[Outcome], stop: asyncio.Event) -> None:
    """Knock until ``stop``, recording (monotonic time, outcome). Not cancelled: nats-py's
    connect may swallow a cancellation."""
    while not stop.is_set():
        outcomes.append((time.monotonic(), await _knock(url, user)))
        await asyncio.sleep(_PAUSE)


async def _answers(conn: NatsConnection, subject: str) -> bytes:
    """``conn``'s first answer to ``subject`` within BOUND (JetStream may be recovering)."""
    deadline = time.monotonic() + BOUND
    while True:
        try:
            reply = await conn.client.request(subject, b"", timeout=VERDICT)
        except nats.errors.Error:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        return reply.data


@pytest.mark.parametrize(
    ("event", "guard"),
    [
        # The guard tick is an hour away: what refuses the victim again is the push made when
        # the control plane's system connection comes back.
        ("restart", 3600.0),
        # The connection stays: what refuses the victim again is the next guard tick.
        ("reload", 1.0),
    ],
)
async def test_a_restarted_or_reloaded_operator_run_nats_refuses_a_revoked_workload_again(
    tmp_path: Path, bucket: str, event: str, guard: float, caplog: pytest.LogCaptureFixture
):
    """After a restart (stop, start on the same port and configuration) or a reload (SIGHUP) of
    the operator's server, the revoked workload is refused within BOUND and at every attempt
    from its first refusal on; before that it may be admitted (the server's configuration was
    written before the revocation). A bystander's reconnecting connection comes back and works.
    """
    caplog.set_level(logging.DEBUG, logger="agentmesh.registry")
    data = tmp_path / "control"
    server, ca_cert = operator_nats(tmp_path, data)
    server.start()
    env = {
        "AGENTMESH_NATS_TLS_CA_FILE": str(ca_cert),
        "AGENTMESH_STATE_GUARD_INTERVAL": str(guard),
    }
    bystander_conn: NatsConnection | None = None
    try:
        with control_process(server.url, bucket, data, env=env) as control_url:
            control = ControlPlane(control_url, server.url, data, bucket, data / "control.log")
            victim = await enrol(control, SpiffeId.agent(TD, VICTIM))
            bystander = await enrol(control, SpiffeId.agent(TD, "stays-through-restart"))
            victim.roots = bystander.roots = ca_cert.read_text()  # NATS's TLS is the operator's
            bystander_conn = NatsConnection(
                server.url, name="bystander", credentials=bystander.options
            )
            await bystander_conn.connect()
            cli = cli_env(
                {
                    "AGENTMESH_CONTROL_URL": control_url,
                    "AGENTMESH_DATA_DIR": str(data),
                    "AGENTMESH_REGISTRY_BUCKET": bucket,
                }
            )
            revoked = await arun_cli("identity", "revoke", "--name", VICTIM, env=cli)
            assert revoked.returncode == 0, revoked.stderr
            assert await _knock(server.url, victim) == "refused"

            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            knocking = asyncio.create_task(_knocking(server.url, victim, outcomes, stop))
            try:
                if event == "restart":
                    server.stop()
                    await server.start_async()
                else:
                    server.reload()
                since = time.monotonic()
                await _refused_for(outcomes, since)
            finally:
                stop.set()
                await knocking
            after = [(round(t - since, 2), o) for t, o in outcomes if t >= since]
            refusals = [t for t, o in after if o == "refused"]
            assert refusals, f"never refused within {BOUND}s of the {event}: {after}"
            first = refusals[0]
            assert first < BOUND, after
            readmitted = [t for t, o in after if o == "admitted" and t > first]
            assert not readmitted, f"admitted again after its first refusal: {after}"
            assert after[-1][0] - first >= KNOCKING, f"refused first at {first}: {after}"

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(bystander_conn.connected.wait(), BOUND)
            assert bystander_conn.connected.is_set(), caplog.text
            stream = f"$JS.API.STREAM.INFO.KV_{bucket}"
            answer = await _answers(bystander_conn, stream)
            assert b'"error"' not in answer, answer
    finally:
        if bystander_conn is not None:
            await bystander_conn.close()
        server.stop()


async def _refused_for(outcomes: list[Outcome], since: float) -> None:
    """Wait until the victim's outcomes after ``since`` span KNOCKING seconds from its first
    refusal (or BOUND has passed without one)."""
    deadline = since + BOUND + KNOCKING
    while time.monotonic() < deadline:
        refused = [t for t, o in outcomes if t >= since and o == "refused"]
        if refused and outcomes[-1][0] - refused[0] >= KNOCKING:
            return
        await asyncio.sleep(0.1)
