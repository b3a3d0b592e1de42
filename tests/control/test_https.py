"""The control plane's edge (docs/security.md): HTTPS, sessions and CSRF, bounded inputs, files.

Each test runs ``python -m agentmesh control`` as a real process (on the suite's test CA, or its
own self-managed CA where the test needs one: a rotation, a foreign root) and attacks it as issue
12's table did, over real TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from agentmesh import AuthenticationFailed, Settings
from agentmesh.control.operator_ca import write_operator_ca
from agentmesh.errors import ConfigurationError
from agentmesh.security.control_trust import control_verify, guard_cleartext
from agentmesh.security.enrol import format_token
from agentmesh.security.pki import fingerprint, pem
from agentmesh.sidecar.bootstrap import bootstrap
from tests.control.control_process import (
    CLI_TIMEOUT,
    arun_cli,
    cli_env,
    control_process,
    control_tls,
    run_cli,
)
from tests.e2e.support import processes_mentioning
from tests.mesh_ca import TRUST_DOMAIN, mesh_ca

MiB = 1024 * 1024


def _pid_of_control(data_dir: Path) -> int:
    found = [p for p in processes_mentioning(str(data_dir)) if " control " in p]
    assert len(found) == 1, found
    return int(found[0].split(":")[0])


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> None:
    """Start a new peak RSS (``VmHWM``) measurement: Linux's clear_refs, 5."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _raw(url: str, tls: ssl.SSLContext, request: bytes) -> bytes:
    """Send ``request`` as is over TLS; everything the server answers before it closes."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=tls)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def _admin(data_dir: Path) -> dict[str, str]:
    return {"authorization": f"Bearer {(data_dir / 'admin-token').read_text().strip()}"}


async def _stream_body(url: str, tls: ssl.SSLContext, total: int) -> bytes:
    """POST ``total`` bytes, chunked (no Content-Length), until the server answers; its answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=tls)

    async def answer() -> bytes:
        try:
            return await reader.read()
        except (ConnectionError, ssl.SSLError):
            return b""

    answered = asyncio.create_task(answer())
    writer.write(
        b"POST /v1/certificates HTTP/1.1\r\nhost: control\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n" % MiB + b"a" * MiB + b"\r\n"
    sent = 0
    try:
        while sent < total and not answered.done():
            writer.write(chunk)
            await writer.drain()
            sent += MiB
    except (ConnectionError, ssl.SSLError):
        pass
    got = await asyncio.wait_for(answered, 30)
    writer.close()
    return got


async def test_https_only_and_bounded_inputs(nats_url: str, bucket: str, tmp_path: Path):
    with control_process(nats_url, bucket, tmp_path) as url:
        assert url.startswith("https://127.0.0.1:")
        tls = control_tls(tmp_path)
        # Plaintext HTTP is refused, with a pointer to the https:// URL; nothing is served.
        async with httpx.AsyncClient(timeout=10) as clear:
            plain = await clear.get(url.replace("https://", "http://") + "/v1/bootstrap")
        assert plain.status_code == 401
        assert "serves HTTPS only: plaintext refused" in plain.json()["detail"]
        async with httpx.AsyncClient(base_url=url, verify=tls, timeout=30) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200
            # Browser hardening on every answer.
            assert health.headers["x-frame-options"] == "DENY"
            assert health.headers["x-content-type-options"] == "nosniff"
            assert "frame-ancestors 'none'" in health.headers["content-security-policy"]

            # A declared oversized body: 413 at once, from its Content-Length, nothing sent.
            declared = await _raw(
                url,
                tls,
                b"POST /v1/certificates HTTP/1.1\r\nhost: control\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (300 * MiB),
            )
            assert declared.startswith(b"HTTP/1.1 413 "), declared[:200]
            assert b"AGENTMESH_MAX_CONTROL_BODY_BYTES" in declared

            # A body that is not UTF-8: 422, not 500.
            utf8 = await http.post(
                "/v1/certificates",
                content=b'{"csr": "\xff\xfe"}',
                headers={"content-type": "application/json"},
            )
            assert utf8.status_code == 422
            assert utf8.json()["code"] == "invalid_input"
            assert "not valid UTF-8" in utf8.json()["detail"]

            # A 422 is bounded and never echoes the body: 50,000 unknown keys and a 300 KB
            # string give the first 20 errors and a count.
            junk = {f"k{i}": 1 for i in range(50_000)}
            bad = await http.post("/v1/certificates", json={"csr": "A" * 300_000, **junk})
            assert bad.status_code == 422
            assert len(bad.content) < 16 * 1024, len(bad.content)
            assert b"AAAA" not in bad.content
            errors = bad.json()["errors"]
            assert len(errors) == 21
            assert errors[-1]["type"] == "too_many_errors"
            assert "input" not in errors[0]
            # Every error list is bounded, the policy validator's too: 100 broken rules.
            rules = [{"name": f"r{i}", "action": "maybe"} for i in range(100)]
            policy = {
                "apiVersion": "agentmesh.dev/v1",
                "kind": "AccessPolicy",
                "metadata": {"name": "broken"},
                "spec": {"rules": rules},
            }
            refused = await http.post("/v1/policies", json=policy, headers=_admin(tmp_path))
            assert refused.status_code == 422
            listed = refused.json()["errors"]
            assert len(listed) == 21
            assert listed[-1]["type"] == "too_many_errors"

        # 300 MiB streamed with no Content-Length (issue 12: RSS 94 → 1492 MiB): refused once
        # the limit (1 MiB) is passed; the control plane's memory stays bounded.
        pid = _pid_of_control(tmp_path)
        before = _rss(pid)
        _reset_peak(pid)
        answer = await _stream_body(url, tls, 300 * MiB)
        peak = _rss(pid, "VmHWM")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert peak - before < 64 * MiB, (before, peak)
        async with httpx.AsyncClient(base_url=url, verify=tls, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200


async def test_sessions_are_signed_cookies_and_csrf_is_refused(
    nats_url: str, bucket: str, tmp_path: Path
):
    with control_process(nats_url, bucket, tmp_path) as url:
        token = (tmp_path / "admin-token").read_text().strip()
        origin = f"https://{urlsplit(url).netloc}"
        async with httpx.AsyncClient(base_url=url, verify=control_tls(tmp_path)) as http:
            signed = await http.post("/ui/login", data={"token": token})
            assert signed.status_code == 303
            cookie = signed.headers["set-cookie"]
            session = http.cookies["agentmesh_session"]
            assert token not in cookie  # the cookie is not the admin token
            assert session != token
            assert "Secure" in cookie  # HTTPS
            assert "HttpOnly" in cookie
            # The admin token as a cookie (the old dashboard's) is no credential any more.
            async with httpx.AsyncClient(
                base_url=url, verify=control_tls(tmp_path), cookies={"agentmesh_token": token}
            ) as old:
                assert (await old.get("/v1/identities")).status_code == 401

            # Reads with the session work.
            assert (await http.get("/v1/identities")).status_code == 200
            # Issue 12's CSRF: a text/plain POST to /v1/policies and an empty POST to
            # /v1/ca/rotate from another origin on 127.0.0.1, with the session cookie.
            elsewhere = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-site"}
            policy = await http.post(
                "/v1/policies",
                content=b'{"apiVersion": "agentmesh.dev/v1"}',
                headers={"content-type": "text/plain", **elsewhere},
            )
            assert policy.status_code == 403
            assert "cross-site request refused" in policy.json()["detail"]
            rotate = await http.post("/v1/ca/rotate", headers=elsewhere)
            assert rotate.status_code == 403
            # A cookie-authorized write that says nothing of its origin is refused too.
            assert (await http.post("/v1/ca/rotate")).status_code == 403
            # From the control plane's own pages it is an ordinary admin action.
            own = await http.post(
                "/v1/tokens", json={"agent": "worker"}, headers={"origin": origin}
            )
            assert own.status_code == 200, own.text
            # A bearer token is not something a browser sends on its own: no Origin needed.
            http.cookies.clear()
            bearer = await http.post(
                "/v1/tokens", json={"agent": "worker"}, headers=_admin(tmp_path)
            )
            assert bearer.status_code == 200
            bundle = (await http.get("/v1/trust-bundle")).json()
            assert bundle["version"] == 1  # no rotation happened


async def test_failed_authentications_are_rate_limited_and_logged(
    nats_url: str, bucket: str, tmp_path: Path
):
    with control_process(nats_url, bucket, tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, verify=control_tls(tmp_path)) as http:
            for n in range(10):
                wrong = await http.get(
                    "/v1/identities", headers={"authorization": f"Bearer guess-{n}"}
                )
                assert wrong.status_code == 401
            limited = await http.get("/v1/identities", headers={"authorization": "Bearer more"})
            assert limited.status_code == 429
            assert limited.json()["code"] == "rate_limited"
            assert "AGENTMESH_AUTH_FAILURES_PER_MINUTE=10" in limited.json()["detail"]
            assert 1 <= limited.json()["retry_after"] <= 60
            # The source is limited whatever it sends, the right token included, and the
            # sign-in form says so too.
            right = await http.get("/v1/identities", headers=_admin(tmp_path))
            assert right.status_code == 429
            form = await http.post("/ui/login", data={"token": "guess"})
            assert form.status_code == 429
            assert "too many failed authentications" in form.text
        log = (tmp_path / "control.log").read_text()
        assert log.count("failed admin authentication from 127.0.0.1: wrong admin token") == 10


async def test_clients_refuse_a_control_plane_outside_their_trust(
    nats_url: str, bucket: str, tmp_path: Path
):
    foreign = tmp_path / "foreign"  # another mesh's root: the suite's test CA
    foreign.mkdir()
    (foreign / "roots.pem").write_text("".join(pem(r) for r in mesh_ca().ca.roots))
    data = tmp_path / "control"
    data.mkdir()
    with control_process(nats_url, bucket, data, own_ca=True) as url:
        # The CLI: its data dir's roots are another mesh's.
        done = await arun_cli(
            "agents",
            env=cli_env(
                {
                    "AGENTMESH_CONTROL_URL": url,
                    "AGENTMESH_DATA_DIR": str(foreign),
                    "AGENTMESH_TOKEN": "never-sent",
                }
            ),
        )
        assert done.returncode == 1
        assert "its certificate is not trusted" in done.stderr, done.stderr
        assert "never-sent" not in (data / "control.log").read_text()
        # The same CLI on the control plane's machine needs no flag at all.
        local = await arun_cli(
            "agents", env=cli_env({"AGENTMESH_CONTROL_URL": url, "AGENTMESH_DATA_DIR": str(data)})
        )
        assert local.returncode == 0, local.stderr

        # An agent's bootstrap, with roots from the data dir or an explicit file.
        settings = Settings(control_url=url, data_dir=foreign)
        with pytest.raises(AuthenticationFailed, match="not trusted"):
            await bootstrap(settings)
        pinned_elsewhere = Settings(
            control_url=url,
            data_dir=tmp_path / "empty",
            join_token=format_token(fingerprint(mesh_ca().ca.roots[0])[:32], "secret"),
        )
        # A join token pins the root: this control plane cannot show it, so it never sees
        # the token.
        with pytest.raises(AuthenticationFailed, match="does not contain the CA this join token"):
            await control_verify(pinned_elsewhere)
        nothing = Settings(control_url=url, data_dir=tmp_path / "empty")
        with pytest.raises(ConfigurationError, match="no root to trust"):
            await control_verify(nothing)

        # A real agent process with the foreign roots stops at start-up, naming the reason.
        agent_file = tmp_path / "lonely.py"
        agent_file.write_text(
            "from agentmesh import capability\n\n@capability\nasync def hi() -> str:\n"
            "    return 'hi'\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentmesh",
            "run",
            str(agent_file),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=cli_env(
                {
                    "AGENTMESH_CONTROL_URL": url,
                    "AGENTMESH_DATA_DIR": str(foreign),
                    "AGENTMESH_REGISTRY_BUCKET": bucket,
                }
            ),
        )
        out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
        assert proc.returncode != 0
        assert "its certificate is not trusted" in out.decode(), out.decode()


def test_tokens_never_travel_in_clear_to_another_host():
    with pytest.raises(ConfigurationError, match="refusing to send a token over plain HTTP"):
        guard_cleartext("http://10.1.2.3:7700", sends_token=True)
    guard_cleartext("http://127.0.0.1:7700", sends_token=True)  # this machine: development
    guard_cleartext("https://10.1.2.3:7700", sends_token=True)


def test_insecure_http_is_explicit_and_warns(nats_url: str, bucket: str, tmp_path: Path):
    data = tmp_path / "fresh" / "data"  # created by the control plane
    ready = tmp_path / "ready.json"
    log = tmp_path / "insecure.log"
    env = cli_env({"AGENTMESH_REGISTRY_BUCKET": bucket, "AGENTMESH_DATA_DIR": str(data)})
    args = ["control", "--port", "0", "--nats-url", nats_url, "--ready-file", str(ready)]
    args.append("--insecure-http")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentmesh", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(1000):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert ready.exists(), log.read_text()
        url = json.loads(ready.read_text())["control_url"]
        assert url.startswith("http://")
        assert "--insecure-http" in log.read_text()
        assert "for development only" in log.read_text()
        # The data dir it made is private (issue 12: a fresh ~/.agentmesh was 0755).
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600
        local = cli_env({"AGENTMESH_CONTROL_URL": url, "AGENTMESH_DATA_DIR": str(data)})
        done = run_cli("agents", env=local)
        assert done.returncode == 0, done.stderr
        # A token file other users can read is refused, naming it.
        os.chmod(data / "admin-token", 0o644)
        loose = run_cli("agents", env=local)
        assert loose.returncode == 1
        assert f"{data / 'admin-token'} is accessible to other users (mode 0644)" in loose.stderr
    finally:
        proc.terminate()
        proc.wait(15)
    # ... and so is the control plane's start.
    again = run_cli(*args, env=env)
    assert again.returncode == 1
    assert "admin-token is accessible to other users" in again.stdout + again.stderr


async def test_the_https_certificate_outlives_a_root_rotation(
    nats_url: str, bucket: str, tmp_path: Path
):
    with control_process(nats_url, bucket, tmp_path, own_ca=True) as url:
        before = control_tls(tmp_path)  # a client that read roots.pem before the rotation
        async with httpx.AsyncClient(base_url=url, verify=before, timeout=30) as http:
            rotated = await http.post("/v1/ca/rotate", headers=_admin(tmp_path))
            assert rotated.status_code == 200, rotated.text
            assert len(rotated.json()["roots"]) == 2
        async with httpx.AsyncClient(base_url=url, verify=before, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
        assert (tmp_path / "roots.pem").read_text().count("BEGIN CERTIFICATE") == 2


async def test_rotating_an_operator_supplied_intermediate_is_a_409_saying_whose_job_it_is(
    nats_url: str, bucket: str, tmp_path: Path
):
    """The control plane holds no key of the operator's root, so it cannot rotate: a clear
    problem (was a 500), the bundle untouched, and the CLI says what to do."""
    cert, key = write_operator_ca(tmp_path / "operator-ca", TRUST_DOMAIN, ["one"])["one"]
    env = {"AGENTMESH_CA_CERT_FILE": str(cert), "AGENTMESH_CA_KEY_FILE": str(key)}
    with control_process(nats_url, bucket, tmp_path, env) as url:
        async with httpx.AsyncClient(
            base_url=url, verify=control_tls(tmp_path), timeout=30
        ) as http:
            before = (await http.get("/v1/trust-bundle")).json()
            refused = await http.post("/v1/ca/rotate", headers=_admin(tmp_path))
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            problem = refused.json()
            assert problem["code"] == "conflict"
            assert "operator-supplied CA (AGENTMESH_CA_CERT_FILE)" in problem["detail"]
            assert "docs/deploy.md" in problem["detail"]
            assert (await http.get("/v1/trust-bundle")).json() == before
        local = cli_env({"AGENTMESH_CONTROL_URL": url, "AGENTMESH_DATA_DIR": str(tmp_path)})
        done = await arun_cli("ca", "rotate", "--yes", env=local)
        assert done.returncode == 1, done.stdout
        assert "Rotating it is the operator's job" in done.stderr, done.stderr
