"""mTLS between real sidecars: agents on real HTTPS, certificates from a real CA, real NATS.

Every agent and client here runs in this process (the suite's ``settings``: strict mTLS, the
test CA). Certificates the mesh must refuse are forged with the CA's real key (``forge.py``) and
presented by a real client, raw (httpx) or as a sidecar's own identity (``present``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from agentmesh import (
    Agent,
    AuthenticationFailed,
    ConnectionFailed,
    IdentityMismatch,
    Mesh,
    Settings,
    UntrustedPeer,
    capability,
    connect,
)
from agentmesh.control.ca import CertificateAuthority, write_root_ca
from agentmesh.control.issuer import Issuer
from agentmesh.inbound.server import HttpServer, bind
from agentmesh.models import AgentRecord, RevocationRequest
from agentmesh.registry import Lease
from agentmesh.security.pki import PrivateKey, client_context
from tests.conftest import StartAgent, WaitUntil
from tests.mesh_ca import mesh_ca

from .forge import TD, forge

pytestmark = pytest.mark.timeout(60)

#: docs/security.md: "every sidecar refuses a revoked certificate within 2 seconds" (the KV watch
#: delivers in milliseconds; the bound leaves room for two busy shared cores).
REVOCATION_BOUND = 2.0


@capability(idempotent=False)
async def echo(text: str = "") -> str:
    return text


@capability
async def summarize(text: str = "") -> str:
    return text[:5]


async def present(mesh: Mesh, key: PrivateKey, cert: x509.Certificate) -> None:
    """Make ``mesh``'s sidecar present ``cert`` on its next new connections (and trust ours)."""
    identity = mesh.sidecar.identity
    identity._key, identity._certs = key, [cert]
    identity._rebuild()
    await mesh.sidecar.transport.close()  # new connections, new certificate


@contextlib.asynccontextmanager
async def serving(
    agent: Agent, settings: Settings, mesh: Mesh, wait_until: WaitUntil
) -> AsyncIterator[Agent]:
    """An agent with settings of its own (another mTLS mode), visible to ``mesh``."""
    ready = asyncio.Event()
    task = asyncio.create_task(
        agent.serve(settings=settings, on_ready=lambda _: ready.set(), handle_signals=False)
    )
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    instance = agent.instance_id
    await wait_until(lambda: any(r.instance_id == instance for r in mesh.sidecar.index.records()))
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)


def inbound(caller: str) -> float:
    labels = {"agent": "echoer", "caller": caller, "capability": "echo", "status": "200"}
    return REGISTRY.get_sample_value("agentmesh_inbound_requests_total", labels) or 0.0


# ---- who may connect --------------------------------------------------------------------------


async def test_strict_refuses_plaintext_and_invoke_without_a_certificate(
    start_agent: StartAgent, mesh: Mesh, settings: Settings
) -> None:
    agent = await start_agent([echo], name="echoer")
    assert agent.endpoint.startswith("https://127.0.0.1:")
    plain = agent.endpoint.replace("https://", "http://")
    async with httpx.AsyncClient(timeout=5) as http:
        for path in ("/v1/invoke/echo", "/healthz"):
            resp = (
                await http.post(f"{plain}{path}")
                if "invoke" in path
                else await http.get(f"{plain}{path}")
            )
            assert resp.status_code == 401
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.json()["code"] == "unauthenticated"
            assert "accepts only mutual TLS" in resp.json()["detail"]

    # TLS without a client certificate: probes answer, capabilities do not.
    anonymous = client_context(None, [], mesh_ca().ca.roots)
    async with httpx.AsyncClient(base_url=agent.endpoint, verify=anonymous, timeout=5) as http:
        health = (await http.get("/healthz")).json()
        assert health == {
            "status": "ok",
            "mtls": "strict",
            "identity": "spiffe://agentmesh.local/agent/echoer",
        }
        refused = await http.post("/v1/invoke/echo", json={"text": "x"})
        assert refused.status_code == 401
        assert "requires a mesh client certificate" in refused.json()["detail"]

    # A sidecar with mTLS off calls in plaintext: the strict agent refuses, clearly, at once.
    async with connect(settings, mtls="off") as plaintext:
        with pytest.raises(AuthenticationFailed, match="accepts only mutual TLS"):
            await plaintext.call("echo", {"text": "x"})
    assert await mesh.call("echo", {"text": "ok"}) == "ok"


@pytest.mark.parametrize(
    ("flaw", "logged"),
    [
        ("another CA", "client certificate refused: unable to get local issuer certificate"),
        ("expired", "client certificate refused: certificate has expired"),
        ("two URI SANs", "has 2 URI SANs"),
        ("a CA certificate as leaf", "is a CA certificate used as a leaf"),
    ],
)
async def test_invalid_client_certificates_fail_the_handshake_with_a_clear_log_line(
    flaw: str,
    logged: str,
    start_agent: StartAgent,
    mesh: Mesh,
    settings: Settings,
    tmp_path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.security")
    agent = await start_agent([echo], name="echoer")
    ours = mesh_ca().ca
    now = datetime.now(UTC)
    if flaw == "another CA":
        other = CertificateAuthority.from_files(*write_root_ca(tmp_path / "other", TD), TD, 600)
        key, cert = forge(other._key, other.signer)
    elif flaw == "expired":
        key, cert = forge(
            ours._key,
            ours.signer,
            not_before=now - timedelta(hours=2),
            not_after=now - timedelta(hours=1),
        )
    elif flaw == "two URI SANs":
        key, cert = forge(
            ours._key, ours.signer, uris=(f"spiffe://{TD}/agent/a", f"spiffe://{TD}/agent/b")
        )
    else:
        key, cert = forge(ours._key, ours.signer, ca=True)

    # A raw client: the TLS handshake itself fails.
    tls = client_context(key, [cert], ours.roots)
    async with httpx.AsyncClient(verify=tls, timeout=5) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"{agent.endpoint}/v1/invoke/echo", json={"text": "x"})
    assert any(logged in r.getMessage() and "echoer" in r.getMessage() for r in caplog.records)

    # A sidecar presenting it: ConnectionFailed (never reached, nothing ran), naming the agent.
    async with connect(settings) as forger:
        await present(forger, key, cert)
        with pytest.raises(ConnectionFailed, match=rf"{agent.instance_id} at https://.*TLS"):
            await forger.call("echo", {"text": "x"}, retries=0)
    assert await mesh.call("echo", {"text": "still fine"}) == "still fine"


async def test_a_spoofed_caller_header_has_no_effect(start_agent: StartAgent, mesh: Mesh) -> None:
    agent = await start_agent([echo], name="echoer")
    before_client, before_spoof = inbound("client"), inbound("planner")
    tls = mesh_ca().client_context("tests")
    async with httpx.AsyncClient(verify=tls, timeout=5) as http:
        resp = await http.post(
            f"{agent.endpoint}/v1/invoke/echo",
            json={"text": "hi"},
            headers={"agentmesh-caller": "planner"},
        )
    assert resp.status_code == 200
    assert inbound("client") - before_client == 1  # who the certificate says
    assert inbound("planner") - before_spoof == 0  # not who the header claims


# ---- whom a caller talks to -----------------------------------------------------------------


async def test_a_registry_record_cannot_send_calls_to_another_agent(
    start_agent: StartAgent, mesh: Mesh, wait_until: WaitUntil
) -> None:
    echoer = await start_agent([echo], name="echoer")
    # A record signed by summarizer's own key (its owner, or a thief of it), pointing at
    # someone else's address: the registry takes it, the caller's TLS check does not.
    impostor = AgentRecord(
        instance_id="summarizer-feed",
        name="summarizer",
        identity=f"spiffe://{TD}/agent/summarizer",
        endpoint=echoer.endpoint,  # someone else's address
        capabilities=(summarize.spec,),
    )
    store = await mesh_ca().store_as(mesh.sidecar.conn, mesh.sidecar.store.bucket, "summarizer")
    lease = Lease(store, impostor, interval=0.25, ttl=1)
    await lease.acquire()
    try:
        await wait_until(lambda: bool(mesh.sidecar.index.targets("summarize")))
        with pytest.raises(IdentityMismatch) as err:
            await mesh.call("summarize", {"text": "secret"}, retries=0)
        message = str(err.value)
        assert "spiffe://agentmesh.local/agent/echoer" in message
        assert "'summarizer'" in message
        assert "spiffe://agentmesh.local/agent/summarizer" in message
        assert isinstance(err.value, ConnectionFailed)  # nothing was sent
    finally:
        await lease.release()


async def test_strict_callers_refuse_plaintext_agents_permissive_ones_accept_both(
    mesh: Mesh, settings: Settings, wait_until: WaitUntil
) -> None:
    plain = Agent("plain", capabilities=[echo])
    async with serving(plain, settings.model_copy(update={"mtls": "off"}), mesh, wait_until):
        assert plain.endpoint is not None
        assert plain.endpoint.startswith("http://")
        with pytest.raises(UntrustedPeer, match="plaintext endpoint cannot prove"):
            await mesh.call("echo", retries=0)
        async with connect(settings, mtls="permissive") as permissive:
            assert await permissive.call("echo", {"text": "p"}) == "p"

    migrating = Agent("migrating", capabilities=[summarize])
    permissive_settings = settings.model_copy(update={"mtls": "permissive"})
    async with serving(migrating, permissive_settings, mesh, wait_until):
        assert migrating.endpoint is not None
        assert migrating.endpoint.startswith("https://")
        assert await mesh.call("summarize", {"text": "mutual tls"}) == "mutua"
        async with connect(settings, mtls="off") as plaintext:
            assert await plaintext.call("summarize", {"text": "plain text"}) == "plain"
        async with httpx.AsyncClient(timeout=5) as http:
            health = await http.get(migrating.endpoint.replace("https", "http") + "/healthz")
        assert health.json()["mtls"] == "permissive"


# ---- revocation -----------------------------------------------------------------------------


async def test_revoked_callers_and_agents_are_refused_within_the_documented_time(
    start_agent: StartAgent, mesh: Mesh, settings: Settings, wait_until: WaitUntil
) -> None:
    await start_agent([echo], name="echoer")
    issuer = Issuer(mesh_ca().ca, mesh.sidecar.identity.store)  # what the control plane runs
    async with connect(settings, client_name="mallory") as mallory:
        assert await mallory.call("echo", {"text": "before"}) == "before"  # a pooled connection
        serial = f"{mallory.sidecar.identity.serial:x}"
        revoked = await issuer.revoke(RevocationRequest(target=f"0x{serial}", reason="key leaked"))
        assert [r.spiffe_id for r in revoked.revoked] == [f"spiffe://{TD}/client/mallory"]
        started = time.monotonic()

        async def refused() -> bool:
            try:
                await mallory.call("echo", {"text": "after"}, retries=0)
            except AuthenticationFailed as exc:
                reasons.append(str(exc))
                return True
            return False

        reasons: list[str] = []
        await wait_until(refused, timeout=REVOCATION_BOUND)
        assert time.monotonic() - started < REVOCATION_BOUND
        assert f"certificate {serial} is revoked" in reasons[0]
    assert await mesh.call("echo", {"text": "others fine"}) == "others fine"

    # Revoking the agent (by name): callers stop calling it, pooled connections included.
    started = time.monotonic()
    await issuer.revoke(RevocationRequest(target="echoer"))

    async def avoided() -> bool:
        try:
            await mesh.call("echo", {"text": "x"}, retries=0)
        except UntrustedPeer as exc:
            reasons.append(str(exc))
            return True
        return False

    reasons.clear()
    await wait_until(avoided, timeout=REVOCATION_BOUND)
    assert time.monotonic() - started < REVOCATION_BOUND
    assert "is revoked" in reasons[0]


# ---- renewal ---------------------------------------------------------------------------------


async def test_certificates_renew_under_load_without_a_single_failed_call(
    mesh: Mesh, settings: Settings, wait_until: WaitUntil
) -> None:
    short = settings.model_copy(update={"cert_ttl": 4.0})
    agent = Agent("echoer", capabilities=[echo])
    async with serving(agent, short, mesh, wait_until), connect(short) as caller:
        server = agent.mesh.sidecar.identity if agent.mesh else None
        assert server is not None
        client = caller.sidecar.identity
        first = (server.serial, client.serial)
        calls = failures = 0
        stop = time.monotonic() + 9.0
        server_leaves: set[int] = set()

        async def steady(n: int) -> None:
            nonlocal calls, failures
            while time.monotonic() < stop:
                try:
                    assert await caller.call("echo", {"text": str(n)}, retries=0) == str(n)
                    calls += 1
                    pool = caller.sidecar.transport.pool
                    server_leaves.update(c.peer.serial for c in pool.connections if c.peer)
                except Exception:
                    failures += 1
                await asyncio.sleep(0.005)

        await asyncio.gather(*(steady(n) for n in range(4)))
        assert failures == 0, f"{failures} of {calls + failures} calls failed across renewals"
        assert calls > 200
        assert server.renewals >= 2, server.renewals
        assert client.renewals >= 2, client.renewals
        assert server.serial != first[0]
        assert client.serial != first[1]
        # New connections carried the new certificates: the caller met several server leaves.
        assert len(server_leaves) >= 2, server_leaves
    assert agent.identity == "spiffe://agentmesh.local/agent/echoer"


# ---- the agent's connection handling: one write per turn, TLS through memory BIOs ------------


def _echo_request(text: str) -> bytes:
    body = b'{"text": "' + text.encode() + b'"}'
    return (
        b"POST /v1/invoke/echo HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


async def _responses(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    bodies = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if b"content-length" in line
        )
        bodies.append(await reader.readexactly(length))
    return bodies


@pytest.mark.parametrize("mtls", ["off", "strict"])
async def test_pipelined_requests_get_their_responses_in_order(
    mtls: str, settings: Settings, mesh: Mesh, wait_until: WaitUntil
) -> None:
    agent = Agent("echoer", capabilities=[echo])
    own = settings.model_copy(update={"mtls": mtls})
    async with serving(agent, own, mesh, wait_until):
        assert agent.endpoint is not None
        port = int(agent.endpoint.rsplit(":", 1)[1])
        tls = mesh_ca().client_context() if mtls == "strict" else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        try:
            # Three requests in one write: the responses, written a turn at a time and
            # coalesced per turn, must come back whole and in order.
            writer.write(b"".join(_echo_request(f"r{i}") for i in range(3)))
            await writer.drain()
            assert await _responses(reader, 3) == [b'"r0"', b'"r1"', b'"r2"']
        finally:
            writer.close()


async def test_garbage_after_the_handshake_drops_that_connection_only(
    start_agent: StartAgent, mesh: Mesh
) -> None:
    agent = await start_agent([echo], name="echoer")
    port = int(agent.endpoint.rsplit(":", 1)[1])

    def handshake_then_garbage() -> bytes:
        context = mesh_ca().client_context()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            tls = context.wrap_socket(plain, server_hostname="echoer.agent.agentmesh.local")
            # The same connection without the TLS layer: a record with a bad MAC under it.
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                raw.settimeout(5)
                raw.sendall(b"\x17\x03\x03\x00\x05hello")
                try:
                    return raw.recv(100)  # b"" once the agent drops the connection
                except ConnectionResetError:
                    return b""
                finally:
                    tls.close()

    assert await asyncio.to_thread(handshake_then_garbage) == b""
    assert await mesh.call("echo", {"text": "still serving"}) == "still serving"


@pytest.mark.parametrize("mtls", ["off", "strict"])
async def test_a_response_written_faster_than_it_is_read_is_held_back(mtls: str) -> None:
    # uvicorn pauses an app whose writes the client does not read; the agent's transport holds a
    # turn's writes back to coalesce them, which must not keep them from the socket (and from
    # that flow control) while an app writes megabytes without yielding.
    chunk, count = b"x" * 65536, 512
    received: list[int] = [0]
    seen: list[int] = []  # what the client had received, at each of the app's writes

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(count):
            seen.append(received[0])
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    tls = dataclasses.replace(mesh_ca().server_tls("echoer"), mode=mtls)
    server = HttpServer(app, bind("127.0.0.1", 0), tls=tls)
    await server.start()
    try:
        client = mesh_ca().client_context() if mtls == "strict" else None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client)
        try:
            writer.write(b"POST / HTTP/1.1\r\nhost: agent\r\ncontent-length: 0\r\n\r\n")
            async with asyncio.timeout(30):
                while not (data := await reader.read(1 << 20)).endswith(b"0\r\n\r\n"):
                    assert data
                    received[0] += len(data)
        finally:
            writer.close()
    finally:
        await server.stop()
    assert len(seen) == count
    # 32 MB cannot fit the socket buffers: the app waited for the client to read.
    assert seen[-1] > 0


async def test_a_client_close_notify_is_answered_and_ends_the_connection() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"{}"})

    server = HttpServer(app, bind("127.0.0.1", 0), tls=mesh_ca().server_tls("echoer"))
    await server.start()

    def request_then_close_notify() -> tuple[bytes, bytes]:
        context = mesh_ca().client_context()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            tls = context.wrap_socket(plain, server_hostname="echoer.agent.agentmesh.local")
            tls.sendall(b"POST / HTTP/1.1\r\nhost: agent\r\ncontent-length: 0\r\n\r\n")
            reply = tls.recv(1000)
            # Sends ours, then waits for the agent's close_notify (as asyncio's TLS does, for up
            # to 30 s): the agent must answer, not keep the connection for its keep-alive.
            after = tls.unwrap().recv(100)
            return reply, after

    try:
        reply, after = await asyncio.to_thread(request_then_close_notify)
    finally:
        await server.stop()
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"{}")
    assert after == b""  # and then the TCP close
