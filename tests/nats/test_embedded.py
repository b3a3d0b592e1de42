"""The embedded NATS of ``agentmesh control``: TLS from the mesh CA, and nobody in without a
user JWT the control plane signed at enrolment; each JWT allows only its identity's subjects.

One control plane (a real process, nothing configured but its data dir) serves the module;
each test enrols the identities it needs, as a workload would, and attacks with raw nats-py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import httpx
import nats.errors
import pytest

from agentmesh.errors import RegistryUnavailable
from agentmesh.models import AgentRecord, BreakerEvent, StatsEntry, StatsReport
from agentmesh.registry import NatsConnection
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.natsjwt import USER, NKey
from agentmesh.telemetry.stats import LATENCY_SCHEME
from tests.conftest import WaitUntil
from tests.control.control_process import arun_cli, cli_env, control_tls
from tests.e2e.support import EXAMPLE_AGENTS, EXAMPLES, AgentProcess, terminate_all
from tests.mesh_ca import mesh_ca
from tests.nats.support import (
    VERDICT,
    Connection,
    ControlPlane,
    NatsUser,
    Partition,
    closed_by_server,
    connect,
    control_cli_env,
    control_user,
    dashboard_says_open,
    embedded_control,
    enrol,
    mesh_tls,
)

TD = "agentmesh.local"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with embedded_control(tmp_path_factory.mktemp("embedded"), f"t_{uuid4().hex[:12]}") as cp:
        yield cp


def _buckets(control: ControlPlane) -> tuple[str, str, str]:
    b = control.bucket
    return b, f"{b}_policies", f"{b}_security"


async def test_the_embedded_nats_speaks_tls_with_a_mesh_ca_certificate(control: ControlPlane):
    assert control.nats_url.startswith("tls://127.0.0.1:")
    user = await enrol(control, SpiffeId.client(TD, "tls-check"))
    # Plain TCP without TLS: nats-py upgrades as the server demands, with the system CAs
    # (which do not include the mesh's): refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        await Connection().connect(control.nats_url)
    # The mesh roots, and the host name checked against the server's certificate.
    conn = await connect(control.nats_url, user)
    assert conn.nc.is_connected
    await conn.close()


async def test_an_outsider_without_credentials_is_refused(control: ControlPlane):
    roots = (await enrol(control, SpiffeId.client(TD, "outsider-roots"))).roots
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await Connection().connect(control.nats_url, tls=mesh_tls(roots))


async def test_credentials_from_another_ca_and_account_are_refused(
    control: ControlPlane, tmp_path: Path
):
    """A certificate from another CA (the test suite's) and a JWT from another mesh's account:
    the server takes neither."""
    roots = (await enrol(control, SpiffeId.client(TD, "foreign-roots"))).roots
    tls = mesh_tls(roots)
    foreign = mesh_ca()
    key_file = tmp_path / "foreign.key"
    cert_file = tmp_path / "foreign.pem"
    from agentmesh.security.pki import key_pem, new_key, pem

    key = new_key()
    cert = foreign.ca.issue(key.public_key(), SpiffeId.agent(TD, "summarizer"))
    key_file.write_bytes(key_pem(key))
    cert_file.write_text(pem(cert))
    tls.load_cert_chain(str(cert_file), str(key_file))
    other_mesh = NatsAuthority.open(tmp_path / "other-mesh")
    jwt, user = other_mesh.own_user(SpiffeId(TD, "control"), bucket=control.bucket)
    forged = NatsUser(jwt, user, "_INBOX", roots)
    options = {**forged.options(), "tls": tls}
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await Connection().connect(control.nats_url, **options)


async def test_a_jwt_is_useless_without_its_key(control: ControlPlane):
    """The JWT travels over HTTP at enrolment; the key never does: a copied JWT signed with
    another key over the server's nonce is refused."""
    alpha = await enrol(control, SpiffeId.agent(TD, "alpha"))
    stolen = NatsUser(alpha.jwt, NKey.generate(USER), alpha.inbox, alpha.roots)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(control.nats_url, stolen)


async def test_a_revoked_workload_loses_nats_at_once(
    control: ControlPlane, wait_until: WaitUntil, caplog: pytest.LogCaptureFixture
):
    """``identity revoke`` reaches NATS itself: the mesh account's JWT lists the revoked
    certificate's NATS key, the server closes its open connection and refuses its JWT from then
    on, across a reload of its configuration too; other workloads keep their connections.
    A sidecar's connection says so once, naming the workload and what to do (nats-py does not
    reconnect after that close, so it makes no attempt at all)."""
    victim_id = SpiffeId.agent(TD, "revoked-on-nats")
    victim = await enrol(control, victim_id)
    bystander = await enrol(control, SpiffeId.agent(TD, "kept-on-nats"))
    revoked = await connect(control.nats_url, victim)
    kept = await connect(control.nats_url, bystander)
    sidecar = NatsConnection(
        control.nats_url,
        name="revoked-1",
        credentials=victim.options,
        identity=lambda: victim_id.uri,
    )
    await sidecar.connect()
    try:
        done = await arun_cli(
            "identity", "revoke", "--name", "revoked-on-nats", env=control_cli_env(control)
        )
        assert done.returncode == 0, done.stderr
        assert await closed_by_server(revoked), revoked.errors
        # Logged as nats-py's close ends (its closed callback), after the client says closed.
        await wait_until(lambda: "closed the connection of" in caplog.text, timeout=VERDICT)
        assert sidecar.client.is_closed
        closes = [m for r in caplog.records if "closed the connection" in (m := r.getMessage())]
        assert len(closes) == 1, caplog.text
        assert f"revoked-1 ({victim_id.uri})" in closes[0]
        assert "revoked or expired, and no reconnect follows" in closes[0]
        assert "agentmesh token create" in closes[0]
        # Started again with the same credentials: refused at once, saying what to do.
        again = NatsConnection(control.nats_url, name="revoked-2", credentials=victim.options)
        with pytest.raises(RegistryUnavailable, match="revoked or expired: re-enrol it"):
            await again.connect()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(control.nats_url, victim)
        # A reload (the embedded server's TLS renewal does one) starts from the configuration
        # file, which carries the revocations too.
        log = control.data_dir / "nats" / "nats-server.log"
        pid = int(re.findall(r"^\[(\d+)\] ", log.read_text(), re.MULTILINE)[-1])  # the running one
        reloads = log.read_text().count("Reloaded server configuration")
        os.kill(pid, signal.SIGHUP)
        await wait_until(
            lambda: log.read_text().count("Reloaded server configuration") > reloads,
            timeout=VERDICT,
        )
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(control.nats_url, victim)
        await kept.nc.flush(timeout=VERDICT)
        assert kept.nc.is_connected
    finally:
        await sidecar.close()
        await revoked.close()
        await kept.close()


async def test_a_workload_revoked_while_away_backs_off_says_why_and_recovers_when_re_enrolled(
    control: ControlPlane, wait_until: WaitUntil, caplog: pytest.LogCaptureFixture
):
    """Revoked while cut off from NATS, a workload's reconnects are refused ("Authorization
    Violation"): one ERROR naming it and what to do, then attempts at doubling pauses instead
    of 4 a second for ever; a bystander keeps its connection; re-enrolled with a token made
    after the revocation, it is admitted again at once."""
    caplog.set_level(logging.INFO, logger="agentmesh.registry")
    victim_id = SpiffeId.agent(TD, "away-when-revoked")
    users = [await enrol(control, victim_id)]
    kept = await connect(control.nats_url, await enrol(control, SpiffeId.agent(TD, "stays")))
    port = urlsplit(control.nats_url).port
    assert port is not None
    partition = Partition(port)
    url = f"tls://127.0.0.1:{await partition.start()}"
    victim = NatsConnection(
        url,
        name="away-1",
        reconnect_wait=0.25,
        refused_wait_max=30,
        credentials=lambda: {
            **users[0].options(),
            # Read at each connect, as a sidecar's enrolled credentials are.
            "user_jwt_cb": lambda: users[-1].options()["user_jwt_cb"](),
            "signature_cb": lambda nonce: users[-1].options()["signature_cb"](nonce),
        },
        identity=lambda: victim_id.uri,
    )
    await victim.connect()
    try:
        partition.cut()
        await wait_until(lambda: not victim.connected.is_set(), timeout=VERDICT)
        done = await arun_cli(
            "identity", "revoke", "--name", "away-when-revoked", env=control_cli_env(control)
        )
        assert done.returncode == 0, done.stderr
        partition.connections = 0
        partition.restore()
        # Pauses of 0.25, 0.5, 1, 2, 4 s (each plus nats-py's own 0.25 s): at most 5 attempts
        # fit in 8 s however fast the machine; a reconnect loop without them makes over 20.
        await asyncio.sleep(8)
        attempts = partition.connections
        assert 2 <= attempts <= 5, f"{attempts} connect attempts in 8 s"
        assert not victim.connected.is_set()
        refusals = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and "refused" in r.getMessage()
        ]
        assert len(refusals) == 1, refusals
        assert victim_id.uri in refusals[0]
        assert "revoked or expired" in refusals[0]
        assert "agentmesh token create" in refusals[0]
        await kept.nc.flush(timeout=VERDICT)
        assert kept.nc.is_connected
        created = await arun_cli(
            "token",
            "create",
            "--agent",
            "away-when-revoked",
            "-o",
            "json",
            env=control_cli_env(control),
        )
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        users.append(await enrol(control, victim_id, token))
        victim.credentials_renewed()  # as the identity's renewal loop does after enrolling
        await wait_until(victim.connected.is_set, timeout=VERDICT)
        assert victim.refusals == 0
        assert f"admits away-1 ({victim_id.uri}) again" in caplog.text
    finally:
        await victim.close()
        await kept.close()
        await partition.close()


def _report(reporter: str, agent: str, capability: str = "echo") -> bytes:
    at = datetime.now(UTC)
    entry = StatsEntry(
        direction="inbound", agent=agent, capability=capability, status="200", count=7, total=0.7
    )
    report = StatsReport(
        reporter=reporter, scheme=LATENCY_SCHEME, start=at, end=at, entries=[entry]
    )
    return report.model_dump_json().encode()


async def test_stats_and_breaker_events_are_taken_only_as_their_publishers_own(
    control: ControlPlane,
):
    """NATS lets an agent publish only on its own telemetry subjects; what it says there must be
    its own too. Reports and breaker events naming another agent (or an instance of another
    agent whose name starts with its own) are dropped, with one log line however many come."""
    bucket, own = control.bucket, "mallory-0123abcd"
    mallory = await connect(control.nats_url, await enrol(control, SpiffeId.agent(TD, "mallory")))
    kv = await mallory.nc.jetstream().key_value(bucket)
    # Its own instance in the registry (unsigned, plaintext: taken as such), for /v1/endpoints.
    record = AgentRecord(
        instance_id=own, name="mallory", endpoint="http://127.0.0.1:9", capabilities=()
    )
    await kv.put(f"mallory.{own}", record.model_dump_json().encode())
    forged_reports = [
        _report("victim-0123abcd", "victim"),  # another agent's instance and numbers
        _report(own, "victim"),  # its own instance, another agent's numbers
        _report("mallory-b-0123abcd", "mallory"),  # an instance of agent "mallory-b"
    ]
    forged_event = BreakerEvent(observer="victim-0123abcd", instance_id=own, state="open")
    honest_event = BreakerEvent(observer=own, instance_id=own, state="half_open")
    try:
        for _ in range(5):
            for forged in forged_reports:
                await mallory.nc.publish(f"agentmesh.stats.{bucket}.mallory", forged)
            await mallory.nc.publish(
                f"agentmesh.breaker.{bucket}.mallory", forged_event.model_dump_json().encode()
            )
        # Then its own: once they are counted, everything before them was read.
        await mallory.nc.publish(f"agentmesh.stats.{bucket}.mallory", _report(own, "mallory"))
        await mallory.nc.publish(
            f"agentmesh.breaker.{bucket}.mallory", honest_event.model_dump_json().encode()
        )
        await mallory.nc.flush(timeout=VERDICT)
        token = (control.data_dir / "admin-token").read_text().strip()
        async with httpx.AsyncClient(
            base_url=control.url,
            verify=control_tls(control.data_dir),
            headers={"authorization": f"Bearer {token}"},
            timeout=VERDICT,
        ) as http:
            for _ in range(100):
                rows = (await http.get("/v1/stats", params={"window": 300})).json()
                endpoints = (await http.get("/v1/endpoints")).json()
                health = next((e for e in endpoints if e["instance_id"] == own), None)
                if any(r["name"] == "mallory" for r in rows) and health and health["probing_by"]:
                    break
                await asyncio.sleep(0.1)
        assert [(r["name"], r["requests"]) for r in rows] == [("mallory", 7)], rows
        assert health == {"instance_id": own, "ejected_by": [], "probing_by": [own]}, endpoints
        dropped = [line for line in control.log.read_text().splitlines() if "dropped a " in line]
        assert len(dropped) == 1, dropped  # 20 forgeries, one line
        assert "only 'mallory''s own may be published there" in dropped[0]
    finally:
        await kv.delete(f"mallory.{own}")
        await mallory.close()


async def test_an_agent_writes_its_own_records_and_nothing_else(control: ControlPlane):
    registry, policies, security = _buckets(control)
    alpha = await connect(control.nats_url, await enrol(control, SpiffeId.agent(TD, "alpha")))
    try:
        js = alpha.nc.jetstream()
        kv = await js.key_value(registry)
        # Its own records: create, renew, delete (the lease's three writes).
        revision = await kv.create("alpha.alpha-1", b"{}")
        revision = await kv.update("alpha.alpha-1", b"{}", last=revision)
        await kv.delete("alpha.alpha-1", last=revision)
        # Anything else is refused by the server itself.
        await alpha.violation(f"$KV.{registry}.beta.beta-1")  # another agent's record
        await alpha.violation(f"$KV.{registry}.beta.beta-1", b"", **{"KV-Operation": "DEL"})
        await alpha.violation(f"$KV.{registry}.alpha")  # not under alpha.>
        await alpha.violation(f"$KV.{policies}.AccessPolicy.allow-all")
        await alpha.violation(f"$KV.{security}.pub.bundle")
        await alpha.violation(f"$KV.{security}.pub.revoked.1f2e3d", b"", **{"KV-Operation": "DEL"})
        await alpha.violation(
            f"$KV.{security}.ca.block.agent.alpha", b"", **{"KV-Operation": "DEL"}
        )
        await alpha.violation(f"$KV.{security}.ca.token.{'0' * 64}")
        await alpha.violation(f"$KV.{security}.ca.issued.1f2e3d", b"", **{"KV-Operation": "PURGE"})
        # Nor through the JetStream API: purging, deleting messages or whole buckets.
        await alpha.violation(f"$JS.API.STREAM.PURGE.KV_{security}")
        await alpha.violation(f"$JS.API.STREAM.MSG.DELETE.KV_{security}")
        await alpha.violation(f"$JS.API.STREAM.DELETE.KV_{policies}")
        await alpha.violation(f"$JS.API.STREAM.UPDATE.KV_{registry}")
        # Nor others' telemetry or replies.
        await alpha.violation(f"agentmesh.stats.{registry}.beta")
        await alpha.violation(f"agentmesh.breaker.{registry}.control")
        await alpha.violation("_INBOX.agent.beta.abc")
    finally:
        await alpha.close()


async def test_members_read_what_they_need_and_not_others_replies(control: ControlPlane):
    registry, policies, security = _buckets(control)
    carol = await connect(control.nats_url, await enrol(control, SpiffeId.client(TD, "carol")))
    try:
        js = carol.nc.jetstream()
        for bucket in (registry, policies):
            kv = await js.key_value(bucket)
            watcher = await kv.watchall()  # an ordered consumer: the index's and the cache's way
            await asyncio.wait_for(watcher.updates(), VERDICT)
            await watcher.stop()
        view = await (await js.key_value(security)).watch("pub.>")
        bundle = await asyncio.wait_for(view.updates(), VERDICT)
        assert bundle is not None
        assert bundle.key == "pub.bundle"
        await view.stop()
        # Subscribing to others' reply subjects (the control plane's included) is refused.
        await carol.nc.subscribe("_INBOX.>")
        await carol.nc.flush(timeout=VERDICT)
        await asyncio.sleep(0.5)
        assert any("permissions violation for subscription" in e for e in carol.errors)
    finally:
        await carol.close()


async def test_issued_certificates_and_token_state_are_the_control_planes_alone(
    control: ControlPlane,
):
    """Members read the trust bundle and revocations (``_security``) and nothing of the CA's
    own records: those live in ``_ca``, a stream their credentials cannot touch in any way."""
    _, _, security = _buckets(control)
    private = f"{control.bucket}_ca"
    admin = await connect(control.nats_url, control_user(control))
    mallory = await connect(control.nats_url, await enrol(control, SpiffeId.agent(TD, "nosy")))
    try:
        # The control plane keeps its records there: the local join token, the issued certificates.
        records = await (await admin.nc.jetstream().key_value(private)).keys()
        assert any(k.startswith("ca.token.") for k in records), records
        assert any(k.startswith("ca.issued.") for k in records), records
        # The bucket every member reads holds none of them any more.
        kv = await mallory.nc.jetstream().key_value(security)
        public = await kv.keys()
        assert "pub.bundle" in public
        assert [k for k in public if not k.startswith("pub.")] == []
        # And no way into the control plane's own: info, gets, consumers.
        stream = f"KV_{private}"
        await mallory.violation(f"$JS.API.STREAM.INFO.{stream}", b"")
        await mallory.violation(f"$JS.API.STREAM.MSG.GET.{stream}", b'{"last_by_subj": "x"}')
        await mallory.violation(f"$JS.API.DIRECT.GET.{stream}", b'{"last_by_subj": "x"}')
        await mallory.violation(f"$JS.API.DIRECT.GET.{stream}.$KV.{private}.{records[0]}", b"")
        await mallory.violation(f"$JS.API.CONSUMER.CREATE.{stream}", b"{}")
        await mallory.violation(f"$JS.API.CONSUMER.CREATE.{stream}.c1.$KV.{private}.>", b"{}")
    finally:
        await mallory.close()
        await admin.close()


async def test_clients_read_only(control: ControlPlane):
    registry, policies, security = _buckets(control)
    carol = await connect(control.nats_url, await enrol(control, SpiffeId.client(TD, "carol")))
    try:
        await carol.violation(f"$KV.{registry}.carol.carol-1")
        await carol.violation(f"$KV.{registry}.alpha.alpha-1")
        await carol.violation(f"$KV.{policies}.AccessPolicy.allow-all")
        await carol.violation(f"$KV.{security}.pub.bundle")
        await carol.violation(f"agentmesh.stats.{registry}.alpha")
    finally:
        await carol.close()


async def test_a_consumer_cannot_deliver_into_another_bucket(control: ControlPlane):
    """JetStream lets a reader create push consumers that deliver to any subject: delivering
    one's own record into the policies bucket's subject does not store a policy."""
    registry, policies, _ = _buckets(control)
    alpha = await connect(control.nats_url, await enrol(control, SpiffeId.agent(TD, "alpha")))
    admin = await connect(control.nats_url, control_user(control))
    try:
        kv = await alpha.nc.jetstream().key_value(registry)
        await kv.put("alpha.alpha-2", b'{"kind": "AccessPolicy", "forged": true}')
        reply = await alpha.nc.request(
            f"$JS.API.CONSUMER.CREATE.KV_{registry}",
            (
                '{"stream_name": "KV_%s", "config": {"deliver_subject": "$KV.%s.forged", '
                '"filter_subject": "$KV.%s.alpha.alpha-2", "ack_policy": "none", '
                '"deliver_policy": "last_per_subject"}}'
            )
            .replace("%s", registry, 1)
            .replace("%s", policies, 1)
            .replace("%s", registry, 1)
            .encode(),
            timeout=VERDICT,
        )
        assert b'"error"' not in reply.data, reply.data  # the consumer exists and delivers
        await asyncio.sleep(1.0)
        policy_kv = await admin.nc.jetstream().key_value(policies)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await policy_kv.get("forged")
    finally:
        await alpha.close()
        await admin.close()


async def test_check_says_the_embedded_nats_requires_credentials(control: ControlPlane):
    done = await arun_cli("check", env=control_cli_env(control))
    assert "✔ NATS auth" in done.stdout, done.stdout
    assert "TLS, credentials required" in done.stdout, done.stdout
    assert "OPEN" not in done.stdout
    assert not await dashboard_says_open(control.url, control.data_dir)


async def test_credentials_and_the_server_certificate_renew_without_losing_the_mesh(
    tmp_path: Path,
):
    """8-second certificates: an agent's JWT expires with each one (the server would close its
    connection, and nats-py would give up), so the agent reconnects with the JWT of each renewed
    certificate; the embedded server's own certificate is renewed and reloaded every 4 s. The
    agent stays registered and callable throughout, with zero configuration."""
    bucket = f"t_{uuid4().hex[:12]}"
    with embedded_control(tmp_path, bucket, {"AGENTMESH_CERT_TTL": "8"}) as control:
        env = cli_env(
            {
                "AGENTMESH_CONTROL_URL": control.url,
                "AGENTMESH_DATA_DIR": str(control.data_dir),
                "AGENTMESH_REGISTRY_BUCKET": bucket,
            }
        )
        agent = AgentProcess(
            EXAMPLE_AGENTS / "summarizer.py", ["--log-level", "info"], env, tmp_path / "agent.log"
        )
        try:
            await agent.wait_ready()
            for _ in range(3):  # spans two certificate (and JWT) lifetimes
                await asyncio.sleep(5)
                called = await arun_cli("call", "summarize", '{"text": "a b"}', env=env)
                assert called.returncode == 0, called.stderr + agent.tail()
            assert agent.returncode is None, agent.tail()
        finally:
            terminate_all([agent.proc])
        log = agent.tail(1000)
        assert log.count("reconnected to NATS") >= 2, log
        assert "closed this connection for good" not in log, log
        server_log = (control.data_dir / "nats" / "nats-server.log").read_text()
        assert server_log.count("Reloaded server configuration") >= 2, server_log[-2000:]


async def test_tap_works_through_the_permissions(control: ControlPlane, tmp_path: Path):
    """``agentmesh tap`` (a client) announces, the agent answers once and publishes its calls:
    each a permission of its own, on the embedded NATS."""
    env = cli_env(
        {
            "AGENTMESH_CONTROL_URL": control.url,
            "AGENTMESH_DATA_DIR": str(control.data_dir),
            "AGENTMESH_REGISTRY_BUCKET": control.bucket,
        }
    )
    agent = AgentProcess(EXAMPLE_AGENTS / "summarizer.py", [], env, tmp_path / "agent.log")
    tap: asyncio.subprocess.Process | None = None
    try:
        await agent.wait_ready()
        err = tmp_path / "tap.err"
        with err.open("wb") as stderr:
            tap = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "agentmesh", "tap", "summarize", "--max", "1"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        banner = f"tapping 'summarize' on 1 instance(s): {agent.instance_id}"
        for _ in range(400):
            if banner in err.read_text() or tap.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert banner in err.read_text(), err.read_text()
        called = await arun_cli("call", "summarize", '{"text": "tapped"}', env=env)
        assert called.returncode == 0, called.stderr
        out, _ = await asyncio.wait_for(tap.communicate(), 20)
        assert tap.returncode == 0, err.read_text()
        assert f"client -> {agent.instance_id}  200" in out.decode(), out
        # `call` reused the certificate `tap` got, and with it the NATS key its JWT is for.
        cached = [json.loads(p.read_text()) for p in (control.data_dir / "client-certs").iterdir()]
        assert cached
        assert all(c["issued"]["nats_jwt"] and c["nats_seed"] for c in cached)
    finally:
        if tap is not None and tap.returncode is None:
            tap.kill()
            await tap.wait()
        terminate_all([agent.proc])


async def test_a_workload_without_mesh_credentials_gets_one_clear_error(control: ControlPlane):
    """``AGENTMESH_MTLS=off`` opts out of identities, and so of NATS credentials: refused at
    once (not after a timeout), with what to do."""
    env = cli_env(
        {
            "AGENTMESH_CONTROL_URL": control.url,
            "AGENTMESH_DATA_DIR": str(control.data_dir),
            "AGENTMESH_REGISTRY_BUCKET": control.bucket,
            "AGENTMESH_MTLS": "off",
        }
    )
    done = await arun_cli("call", "summarize", "{}", env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"NATS at {control.nats_url}: cannot connect" in lines[0]
    assert "AGENTMESH_MTLS must not be off" in lines[0]


async def test_policies_survive_the_switch_to_an_authenticated_nats(tmp_path: Path):
    """Data dirs from before NATS authentication: JetStream kept the buckets under the open
    server's account; the secured server finds them under the mesh's (moved once)."""
    bucket = f"t_{uuid4().hex[:12]}"
    env = cli_env({"AGENTMESH_DATA_DIR": str(tmp_path), "AGENTMESH_REGISTRY_BUCKET": bucket})
    policy = EXAMPLES / "policies" / "access.yaml"
    with embedded_control(tmp_path, bucket, {"AGENTMESH_MTLS": "off"}) as before:
        assert before.nats_url.startswith("nats://")  # the open server, as before
        applied = await arun_cli(
            "apply", "-f", str(policy), env={**env, "AGENTMESH_CONTROL_URL": before.url}
        )
        assert applied.returncode == 0, applied.stderr
    with embedded_control(tmp_path, bucket) as after:
        assert after.nats_url.startswith("tls://")
        listed = await arun_cli(
            "get", "policies", "-o", "json", env={**env, "AGENTMESH_CONTROL_URL": after.url}
        )
        assert listed.returncode == 0, listed.stderr
        assert "summarize-access" in listed.stdout, listed.stdout
