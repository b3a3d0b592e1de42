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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import nats.errors
import pytest

from agentmesh.control.ca import write_root_ca
from agentmesh.control.kept import KEPT_REVOCATIONS, STATE_DIR
from agentmesh.control.nats_revocations import revoked_keys
from agentmesh.models import Revocation, RevocationList
from agentmesh.nats_server import NatsServer
from agentmesh.registry import NatsConnection
from agentmesh.security.files import ROOTS_FILE
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.natsjwt import USER, NKey
from agentmesh.security.pki import pem
from tests.control.control_process import arun_cli, cli_env, control_process, run_cli
from tests.mesh_ca import mesh_ca
from tests.nats.support import (
    VERDICT,
    Connection,
    ControlPlane,
    NatsUser,
    enrol,
    nats_config,
    operator_nats,
)

TD = "agentmesh.local"
VICTIM = "revoked-before-restart"
#: Generous on a loaded machine, and far below an hour-long guard interval: the victim is
#: refused again within this many seconds of the restart or reload.
BOUND = 20.0
#: How long the victim keeps knocking after its first refusal.
KNOCKING = 3.0
_RELOADED = "Reloaded server configuration"
#: Pause between two knocks.
_PAUSE = 0.05

#: (monotonic time the knock started, its outcome).
Outcome = tuple[float, str]


async def _knock(url: str, user: NatsUser) -> str:
    """One connection attempt: "admitted", "refused" (the credentials) or "unreachable".

    A closed port is found with a plain TCP connect first: nats-py takes seconds to give up on
    one, and the victim must knock as soon as the restarted server listens.
    """
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return "unreachable"
    writer.close()
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
    """Knock until ``stop``, recording when each knock started and its outcome. Not cancelled: nats-py's
    connect may swallow a cancellation."""
    while not stop.is_set():
        started = time.monotonic()
        outcomes.append((started, await _knock(url, user)))
        await asyncio.sleep(_PAUSE)


async def _reloaded(server: NatsServer) -> None:
    """SIGHUP, and return once the server's log says it reloaded (it does so asynchronously: a
    knock started before then may still meet the configuration it had)."""
    reloads = server.log_path.read_text().count(_RELOADED)
    server.reload()
    deadline = time.monotonic() + BOUND
    while server.log_path.read_text().count(_RELOADED) == reloads:
        assert time.monotonic() < deadline, f"no reload in {BOUND}s: {server.log_path}"
        await asyncio.sleep(0.02)


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
    ("event", "guard", "reconfigured"),
    [
        # The guard tick is an hour away: what refuses the victim again is the push made when
        # the control plane's system connection comes back.
        ("restart", 3600.0, False),
        # The connection stays: what refuses the victim again is the next guard tick.
        ("reload", 1.0, False),
        # `agentmesh nats-config` written again after the revocation: the restarted server
        # refuses the victim from its first connection on, before any push.
        ("restart", 3600.0, True),
    ],
    ids=["restart", "reload", "restart-after-nats-config"],
)
async def test_a_restarted_or_reloaded_operator_run_nats_refuses_a_revoked_workload_again(
    tmp_path: Path,
    bucket: str,
    event: str,
    guard: float,
    reconfigured: bool,
    caplog: pytest.LogCaptureFixture,
):
    """After a restart (stop, start on the same port and configuration) or a reload (SIGHUP) of
    the operator's server, the revoked workload is refused within BOUND and at every attempt
    from its first refusal on; before that it may be admitted when the server's accounts file
    was written before the revocation, never when it was written after. A bystander's
    reconnecting connection comes back and works.
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
            if reconfigured:
                nats_config(data, tmp_path / "etc-nats")

            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            knocking = asyncio.create_task(_knocking(server.url, victim, outcomes, stop))
            try:
                if event == "restart":
                    server.stop()
                    await server.start_async()
                else:
                    await _reloaded(server)
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
            if reconfigured:
                admitted = [round(t - since, 2) for t, o in outcomes if o == "admitted"]
                assert not admitted, f"admitted at {admitted} (s after the restart)"

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


def test_nats_config_preloads_the_kept_revocations_and_refuses_a_list_it_cannot_verify(
    tmp_path: Path,
):
    """`agentmesh nats-config` writes the mesh account with the revocations of the list the
    control plane keeps in its data dir (the same JWT a push carries); a kept list that does not
    verify against the roots there is an error naming it, never a file without revocations."""
    ca = mesh_ca().ca
    data = tmp_path / "data"
    (data / STATE_DIR).mkdir(parents=True)
    (data / ROOTS_FILE).write_text("".join(pem(c) for c in ca.roots))
    key = NKey.generate(USER).public
    now = datetime.now(UTC)
    listed = RevocationList(
        revoked=[
            Revocation(
                serial="1f", not_after=now + timedelta(hours=1), revoked_at=now, nats_key=key
            )
        ]
    )
    version = 1_796_659_309_123_456
    signed = ca.sign_state("revocations", version, listed)
    (data / STATE_DIR / KEPT_REVOCATIONS).write_text(signed.model_dump_json())
    made = run_cli("nats-config", "--data-dir", str(data), env=cli_env())
    assert made.returncode == 0, made.stderr
    expected = NatsAuthority.open(data).account_jwt(revoked_keys(listed), version)
    assert f'"{expected}"' in made.stdout

    other, _ = write_root_ca(tmp_path / "other", TD)
    (data / ROOTS_FILE).write_text(other.read_text())
    refused = run_cli("nats-config", "--data-dir", str(data), env=cli_env())
    assert refused.returncode != 0
    assert str(data / STATE_DIR / KEPT_REVOCATIONS) in refused.stderr, refused.stderr
    assert "cannot be verified" in refused.stderr
