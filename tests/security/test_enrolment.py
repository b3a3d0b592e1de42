"""The control plane as a real process: admin authentication, enrolment, revocation, rotation.

Its CA is its own (self-managed, created in its data dir on first start), unlike the rest of
the suite's test CA. Agents are real ``agentmesh run`` processes that enrol by themselves, with
the local token file (same data dir) or a join token; clients are ``connect()`` in this process.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from agentmesh import MeshError, UntrustedPeer
from agentmesh.control.security import AdminAuth
from agentmesh.security.pki import load_certs
from tests.control.control_process import control_tls
from tests.e2e.support import clean_env

from .conftest import SpawnJoined, StartControl

pytestmark = pytest.mark.timeout(90)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_admin_api_needs_the_token_and_joining_does_not(
    start_control: StartControl,
) -> None:
    control = start_control()
    data = control.data_dir
    assert mode(data / "admin-token") == 0o600
    assert mode(data / "join-token") == 0o600
    assert mode(data / "ca") == 0o700
    assert all(mode(key) == 0o600 for key in (data / "ca").glob("*.key"))
    assert control.info["mtls"] == "strict"

    good = {"authorization": f"Bearer {control.admin_token}"}
    async with httpx.AsyncClient(
        base_url=control.url, timeout=10, verify=control_tls(control.data_dir)
    ) as http:
        for method, path in (
            ("GET", "/v1/agents"),
            ("GET", "/v1/identities"),
            ("POST", "/v1/tokens"),
            ("POST", "/v1/revocations"),
            ("POST", "/v1/ca/rotate"),
        ):
            for headers in ({}, {"authorization": "Bearer not-the-token"}, {"authorization": "x"}):
                resp = await http.request(method, path, headers=headers, json={})
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.headers["content-type"] == "application/problem+json"
                assert resp.headers["www-authenticate"].startswith("Bearer")
                assert resp.json()["code"] == "unauthenticated"
        assert (await http.get("/v1/agents", headers=good)).status_code == 200
        assert (await http.get("/v1/identities", headers=good)).status_code == 200
        # What a workload needs before it has credentials, and probes, stay open.
        for path in ("/healthz", "/v1/bootstrap", "/v1/trust-bundle", "/openapi.json", "/docs"):
            assert (await http.get(path)).status_code == 200, path
        # /v1/certificates is open to the request, then authenticated by its own token.
        bad_csr = await http.post("/v1/certificates", json={"csr": "nope", "token": "amt1.x.y"})
        assert bad_csr.status_code == 422
        bundle = (await http.get("/v1/trust-bundle")).json()
        assert bundle["trust_domain"] == "agentmesh.local"
        assert len(bundle["roots"]) == 1

    # The CLI reads the token from the data dir; a wrong AGENTMESH_TOKEN is one clear line.
    code, out, err = await control.cli("identity", "list", "-o", "json")
    assert code == 0, err
    listed = {r["spiffe_id"] for r in json.loads(out)}
    assert "spiffe://agentmesh.local/control" in listed
    code, out, err = await control.cli("agents", env=control.env(AGENTMESH_TOKEN="wrong"))
    assert code == 1
    assert "error:" in err
    assert "wrong admin token" in err
    assert "Traceback" not in err


async def test_public_read_opens_reads_only() -> None:
    auth = AdminAuth("s3cret", public_read=True)
    app = FastAPI(dependencies=[Depends(auth)])

    @app.exception_handler(MeshError)
    async def refused(request: Request, exc: MeshError) -> JSONResponse:
        return JSONResponse({"code": exc.code, "detail": exc.message}, status_code=exc.status)

    @app.get("/v1/agents")
    async def agents() -> list[str]:
        return []

    @app.post("/v1/tokens")
    async def tokens() -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        assert (await http.get("/v1/agents")).status_code == 200
        refused_write = await http.post("/v1/tokens")
        assert refused_write.status_code == 401
        assert "admin token" in refused_write.json()["detail"]
    async with httpx.AsyncClient(
        transport=transport, base_url="http://control", cookies={"agentmesh_token": "s3cret"}
    ) as old_way:  # the admin token itself as a cookie: never a credential
        assert (await old_way.post("/v1/tokens")).status_code == 401
    session = {"agentmesh_session": auth.sessions.issue()}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://control", cookies=session
    ) as browser:  # the dashboard's way: a session cookie, from its own pages
        page = {"origin": "http://control"}
        assert (await browser.post("/v1/tokens", headers=page)).status_code == 200


async def test_enrolment_with_join_tokens_and_revocation_of_a_name(
    start_control: StartControl, spawn_joined: SpawnJoined, joined_mesh, wait_until, tmp_path
) -> None:
    control = start_control()
    code, out, err = await control.cli("token", "create", "--agent", "worker", "--ttl", "10m")
    assert code == 0, err
    token = out.split()[0]
    assert token.startswith("amt1.")
    assert "enrols spiffe://agentmesh.local/agent/worker; 1 use(s)" in out

    # Elsewhere (no data dir of the control plane): only the URL and the token.
    remote = {
        "AGENTMESH_CONTROL_URL": control.url,
        "AGENTMESH_DATA_DIR": str(tmp_path / "elsewhere"),
        "AGENTMESH_JOIN_TOKEN": token,
    }
    worker = await spawn_joined(clean_env(remote), name="worker")
    assert worker.endpoint.startswith("https://")

    # Single use: a second enrolment with it is refused; a token for worker cannot enrol other.
    again = await spawn_joined(clean_env(remote), name="worker", ready=False)
    assert await again.wait_exit(20) == 1
    assert "join token is unknown, expired or used up" in again.tail()
    code, out, _ = await control.cli("token", "create", "--agent", "worker", "--reusable")
    other = await spawn_joined(
        clean_env({**remote, "AGENTMESH_JOIN_TOKEN": out.split()[0]}), name="other", ready=False
    )
    assert await other.wait_exit(20) == 1
    assert (
        "enrols spiffe://agentmesh.local/agent/worker, not spiffe://agentmesh.local/agent/other"
        in other.tail()
    )

    # A local client (the control plane's data dir: its token file) calls it over mTLS.
    mesh = await joined_mesh(control)
    await wait_until(lambda: bool(mesh.sidecar.index.targets("echo")), timeout=10)
    assert await mesh.call("echo", {"text": "hello"}) == "hello"

    code, out, err = await control.cli("identity", "list", "-o", "json")
    records = [r for r in json.loads(out) if r["spiffe_id"].endswith("/agent/worker")]
    assert [(r["via"], r["revoked"]) for r in records] == [("token", False)]

    # Revoke the name: callers refuse it within the documented time, and it cannot come back
    # with the local token (older than the revocation) — only with a token made after it.
    code, out, err = await control.cli("identity", "revoke", "worker", "--reason", "test")
    assert code == 0, err
    assert f"revoked {records[0]['serial']}" in out
    started = time.monotonic()

    async def refused() -> bool:
        try:
            await mesh.call("echo", {"text": "x"}, retries=0)
        except UntrustedPeer:
            return True
        return False

    await wait_until(refused, timeout=2.0)
    assert time.monotonic() - started < 2.0

    async def listed_revoked() -> bool:
        # The list reflects the watched revocation set: eventually consistent, like enforcement.
        _, out, _ = await control.cli("identity", "list", "-o", "json")
        flags = [r["revoked"] for r in json.loads(out) if r["spiffe_id"].endswith("/worker")]
        return flags == [True]

    await wait_until(listed_revoked, timeout=5.0)
    worker.terminate()
    await worker.wait_exit(10)
    back = await spawn_joined(control.env(), name="worker", ready=False)
    assert await back.wait_exit(20) == 1
    assert "was revoked at" in back.tail()
    assert "only a token created after that can enrol it again" in back.tail()
    code, out, _ = await control.cli("token", "create", "--agent", "worker")
    readmitted = await spawn_joined(
        clean_env({**remote, "AGENTMESH_JOIN_TOKEN": out.split()[0]}), name="worker"
    )
    await wait_until(
        lambda: readmitted.instance_id in {r.instance_id for r in mesh.sidecar.index.records()},
        timeout=10,
    )
    assert await mesh.call("echo", {"text": "back"}) == "back"


async def test_renewal_and_root_rotation_under_load_fail_no_call(
    start_control: StartControl, spawn_joined: SpawnJoined, joined_mesh, wait_until
) -> None:
    control = start_control(AGENTMESH_CERT_TTL="4")
    await spawn_joined(control.env(AGENTMESH_CERT_TTL="4"), name="echoer")
    mesh = await joined_mesh(control)
    await wait_until(lambda: bool(mesh.sidecar.index.targets("echo")), timeout=10)
    identity = mesh.sidecar.identity
    calls = failures = 0
    errors: list[str] = []
    stop = time.monotonic() + 10.0

    async def steady(n: int) -> None:
        nonlocal calls, failures
        while time.monotonic() < stop:
            try:
                assert await mesh.call("echo", {"text": str(n)}, retries=0) == str(n)
                calls += 1
            except Exception as exc:
                failures += 1
                errors.append(repr(exc))
            await asyncio.sleep(0.01)

    async def rotate() -> tuple[int, str, str]:
        await asyncio.sleep(3.0)
        return await control.cli("ca", "rotate", "--yes")

    *_, rotated = await asyncio.gather(*(steady(n) for n in range(3)), rotate())
    assert rotated[0] == 0, rotated[2]
    assert failures == 0, errors[:5]
    assert calls > 100
    assert identity.renewals >= 3, identity.renewals  # renewed through the control plane
    assert identity.bundle_version == 2
    async with httpx.AsyncClient(
        base_url=control.url, verify=control_tls(control.data_dir)
    ) as http:
        bundle = (await http.get("/v1/trust-bundle")).json()
    assert bundle["version"] == 2
    new_root, old_root = (load_certs(r)[0] for r in bundle["roots"])
    current = identity._certs[0]
    current.verify_directly_issued_by(new_root)  # renewed under the new root
    headers = {"authorization": f"Bearer {control.admin_token}"}
    async with httpx.AsyncClient(
        base_url=control.url, headers=headers, verify=control_tls(control.data_dir)
    ) as http:
        issued = (await http.get("/v1/identities")).json()
    vias = {r["via"] for r in issued if r["spiffe_id"].endswith("/agent/echoer")}
    assert vias == {"token", "renewal"}
    assert old_root != new_root
