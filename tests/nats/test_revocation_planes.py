"""Two control planes push the mesh account's revocations to one NATS: an older push never undoes
a newer one (docs/security.md, "Revocation in NATS").

Control plane one runs the embedded NATS and revokes; control plane two shares it (the same NATS
keys and CA, as docs/deploy.md says every control plane holds) and has not read the revocation
list since it started (its own guard tick is an hour away). Its system connection is cut, so it
pushes again when it comes back, while one is stopped (SIGSTOP: nothing repairs what two does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from agentmesh.control.nats_revocations import NatsRevocations
from agentmesh.models import RevocationList
from agentmesh.registry import NatsConnection
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import AUTH_DIR, NatsAuthority, revocations_version
from agentmesh.security.nats_client import signed_by
from tests.control.control_process import ControlProcess, arun_cli
from tests.mesh_ca import mesh_ca
from tests.nats.support import (
    VERDICT,
    Connection,
    ControlPlane,
    NatsUser,
    connect,
    control_cli_env,
    embedded_control,
    enrol,
    mesh_tls,
)

TD = "agentmesh.local"
#: How long the revoked workload keeps knocking while one is stopped, and after (its guard
#: ticks every GUARD seconds then): several ticks of each kind of push.
KNOCKING = 4.0
GUARD = 0.5
#: The name of a control plane's system-account connection (control/nats_revocations.py).
PUSHER = "agentmesh-control-revocations"


@pytest.fixture
def planes(bucket: str, tmp_path: Path) -> Iterator[tuple[ControlProcess, ControlProcess]]:
    ca = mesh_ca().env()
    one = ControlProcess(
        tmp_path / "one",
        {"AGENTMESH_REGISTRY_BUCKET": bucket, "AGENTMESH_STATE_GUARD_INTERVAL": str(GUARD), **ca},
        name="control plane one",
    )
    two: ControlProcess | None = None
    try:
        one.start(timeout=60)
        shutil.copytree(tmp_path / "one" / AUTH_DIR, tmp_path / "two" / AUTH_DIR)
        two = ControlProcess(
            tmp_path / "two",
            {"AGENTMESH_REGISTRY_BUCKET": bucket, "AGENTMESH_STATE_GUARD_INTERVAL": "3600", **ca},
            nats_url=one.info["nats_url"],
            name="control plane two",
        )
        two.start(timeout=60)
        yield one, two
    finally:
        if one.proc is not None and one.proc.poll() is None:
            os.kill(one.proc.pid, signal.SIGCONT)
        if two is not None:
            two.close()
        one.close()


class _System:
    """The system account, as an operator's monitoring would use it: connections, kicks and
    the account JWT the server holds."""

    def __init__(self, data_dir: Path, roots: str) -> None:
        self._authority = NatsAuthority.open(data_dir)
        jwt, key = self._authority.system_user()
        self.user = NatsUser(jwt, key, "_INBOX", roots)
        self.conn = Connection()

    async def request(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await self.conn.nc.request(subject, payload, timeout=VERDICT)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    async def pushers(self) -> tuple[str, list[int]]:
        """The server's id and the cids of the control planes' system connections, oldest first."""
        system = self._authority.system.public
        answer = await self.request(f"$SYS.REQ.ACCOUNT.{system}.CONNZ", {"limit": 1024})
        cids = [c["cid"] for c in answer["data"]["connections"] if c.get("name") == PUSHER]
        return answer["server"]["id"], sorted(cids)

    async def revoked(self) -> set[str]:
        """The user keys the mesh account's JWT on the server revokes."""
        account = self._authority.account.public
        answer = await self.request(f"$SYS.REQ.ACCOUNT.{account}.INFO")
        return set((answer["data"].get("decoded_jwt") or {}).get("nats", {}).get("revocations", {}))


async def _admitted(url: str, user: NatsUser) -> bool:
    """Whether NATS lets ``user`` in (the connection is closed again at once)."""
    try:
        conn = await connect(url, user)
    except nats.errors.Error as exc:
        if "Authorization Violation" in str(exc):
            return False
        raise
    await conn.close()
    return True


async def test_a_control_plane_that_missed_a_revocation_never_readmits_the_workload(
    planes: tuple[ControlProcess, ControlProcess], bucket: str
):
    """One revokes; two, which has not read the list since, pushes when its system connection
    comes back (one stopped meanwhile), and one's guard ticks go on after: the revoked workload
    is refused at every attempt throughout, a bystander keeps its connection. (Before the push
    read the newest list and the server's version, two pushed the JWT it remembered: the
    workload was back in until a guard tick.)"""
    one, two = planes
    assert one.proc is not None
    url = one.info["nats_url"]
    plane = ControlPlane(one.url, url, one.workdir, bucket, one.log)
    victim = await enrol(plane, SpiffeId.agent(TD, "missed-by-two"))
    bystander = await enrol(plane, SpiffeId.agent(TD, "kept-by-both"))
    kept = await connect(url, bystander)
    system = _System(one.workdir, victim.roots)
    await system.conn.connect(url, **system.user.options())
    stopped = False
    try:
        done = await arun_cli(
            "identity", "revoke", "--name", "missed-by-two", env=control_cli_env(plane)
        )
        assert done.returncode == 0, done.stderr
        assert not await _admitted(url, victim)
        server, (_, pusher_two) = await system.pushers()

        os.kill(one.proc.pid, signal.SIGSTOP)  # one is away: nothing but two pushes now
        stopped = True
        kicked = await system.request(f"$SYS.REQ.SERVER.{server}.KICK", {"cid": pusher_two})
        assert "error" not in kicked, kicked
        readmitted: list[str] = []

        async def knock(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if await _admitted(url, victim):
                    readmitted.append(f"stopped={stopped}, revoked: {await system.revoked()}")
                await asyncio.sleep(0.05)

        # Two comes back (a new system connection) and pushes at once: knock meanwhile.
        give_up = time.monotonic() + 30
        while max((await system.pushers())[1]) <= pusher_two:
            assert time.monotonic() < give_up, f"two never came back:\n{two.log.read_text()}"
            await knock(0.1)
        await knock(KNOCKING / 2)
        os.kill(one.proc.pid, signal.SIGCONT)  # one's guard ticks again from here on
        stopped = False
        await knock(KNOCKING / 2)
        assert not readmitted, f"NATS readmitted the revoked workload: {readmitted[:3]}"
        assert await _admitted(url, bystander)
        await kept.nc.flush(timeout=VERDICT)
        assert kept.nc.is_connected
    finally:
        if stopped:
            os.kill(one.proc.pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            await system.conn.close()
        await kept.close()


async def test_a_pusher_never_replaces_a_newer_list_the_server_holds(bucket: str, tmp_path: Path):
    """The rule itself: a pusher whose newest verified list is older than the one the server's
    account JWT names leaves the server's alone (here: one that knows no revocation at all)."""
    with embedded_control(tmp_path, bucket, {"AGENTMESH_STATE_GUARD_INTERVAL": "3600"}) as plane:
        victim = await enrol(plane, SpiffeId.agent(TD, "revoked-first"))
        done = await arun_cli(
            "identity", "revoke", "--name", "revoked-first", env=control_cli_env(plane)
        )
        assert done.returncode == 0, done.stderr
        system = _System(plane.data_dir, victim.roots)
        await system.conn.connect(plane.nats_url, **system.user.options())
        jwt, key = NatsAuthority.open(plane.data_dir).system_user()
        conn = NatsConnection(
            plane.nats_url,
            name=PUSHER,
            credentials=lambda: {"tls": mesh_tls(victim.roots), **signed_by(jwt, key)},
        )
        stale = NatsRevocations(NatsAuthority.open(plane.data_dir), conn)

        async def before_the_revocation() -> tuple[int, RevocationList]:
            return 1, RevocationList()

        try:
            await stale.start(before_the_revocation)
            await stale.push()
            assert victim.key.public in await system.revoked()
            assert not await _admitted(plane.nats_url, victim)
        finally:
            await stale.close()
            await system.conn.close()


def test_every_control_plane_makes_the_same_account_jwt_of_the_same_list(tmp_path: Path):
    """The JWT names its list's version, and is the same bytes from any holder of the keys (a
    server that has it takes another push of it as no change)."""
    one = NatsAuthority.open(tmp_path / "one")
    shutil.copytree(tmp_path / "one" / AUTH_DIR, tmp_path / "two" / AUTH_DIR)
    two = NatsAuthority.open(tmp_path / "two")
    version = 1_796_659_309_123_456
    revoked = {"U" + "A" * 55: 1_796_659_309}
    made = one.account_jwt(revoked, version)
    assert made == two.account_jwt(dict(revoked), version)
    assert revocations_version(made) == version
    assert revocations_version(one.account_jwt(revoked, version + 1)) == version + 1
    assert revocations_version(one.account_jwt()) == 0
