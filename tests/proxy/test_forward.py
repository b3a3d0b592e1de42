"""The standalone sidecar's forwarding, in-process: a real sidecar, a real HTTP app, real mTLS.

The app is a small ASGI app on uvicorn (``HttpServer``) that records what reaches it, so each
test can say exactly what the app saw. The Node.js app and real processes are in
``tests/e2e/test_sidecar.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentmesh import (
    AgentUnavailable,
    ConfigurationError,
    DeadlineExceeded,
    InvalidInput,
    InvalidOutput,
    Mesh,
    RemoteAgentError,
    Settings,
)
from agentmesh.inbound.server import HttpServer, bind
from agentmesh.proxy.card import fetch_card
from agentmesh.proxy.forward import CALLER_ID_HEADER, CALLER_NAME_HEADER, AppCapability, AppClient
from agentmesh.proxy.manifest import manifest_from_card, parse_agent_manifest
from agentmesh.proxy.runner import SidecarProxy
from agentmesh.sidecar.call import OutboundCall
from agentmesh.sidecar.deadline import DEADLINE_HEADER
from tests.policy.conftest import ControlProcess, control, run_cli

__all__ = ["control"]  # a fixture: `agentmesh agents` needs a control plane

OBJECT = {"type": "object"}
#: An A2A agent card as an agentmesh agent publishes one: its skills are its capabilities.
CARD = {
    "protocolVersion": "0.3.0",
    "name": "Card App",
    "description": "an app described by its card",
    "url": "",
    "version": "2.1.0",
    "skills": [
        {
            "id": "echo",
            "name": "echo",
            "description": "Echo.",
            "tags": ["t"],
            "outputModes": ["application/json"],
        },
        {"id": "stream", "name": "stream", "outputModes": ["text/event-stream"]},
    ],
}


class RecordingApp:
    """An app whose answers are chosen by path; ``seen`` is every request that reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.up = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if path == "/healthz":
            await _send(send, 200 if self.up else 503, b"{}")
            return
        self.seen.append((path, headers, body))
        if path == "/.well-known/agent-card.json":
            await _send(send, 200, json.dumps(CARD).encode())
            return
        if path in ("/echo", "/v1/invoke/echo"):
            await _send(send, 200, json.dumps({"got": json.loads(body)}).encode())
        elif path == "/bad-output":
            await _send(send, 200, b'{"wrong": 1}')
        elif path == "/not-json":
            await _send(send, 200, b"oops", b"text/plain")
        elif path == "/crash":
            await _send(send, 500, b"Traceback: boom", b"text/plain")
        elif path == "/problem":
            problem = {"title": "No", "status": 409, "code": "invalid_input", "detail": "taken"}
            await _send(send, 422, json.dumps(problem).encode(), b"application/problem+json")
        elif path == "/busy":
            await _send(send, 503, b"queue full", b"text/plain")
        elif path == "/slow":
            await asyncio.sleep(5)
            await _send(send, 200, b"{}")
        elif path == "/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for event in (
                b'data: {"n": 1}\n\n',
                b'event: chunk\ndata: {"n": 2}\n\n',
                b'event: error\ndata: {"title": "x", "status": 500, "code": "remote_error", '
                b'"detail": "ran out"}\n\n',
            ):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def _send(send: Any, status: int, body: bytes, kind: bytes = b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _manifest() -> dict[str, Any]:
    def cap(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "path": f"/{name.replace('_', '-')}", **extra}

    return {
        "apiVersion": "agentmesh.dev/v1",
        "kind": "Agent",
        "metadata": {"name": "pyapp"},
        "spec": {
            "capabilities": [
                cap(
                    "echo",
                    input={
                        "type": "object",
                        "properties": {"text": {"type": "string"}},
                        "required": ["text"],
                    },
                ),
                cap("bad_output", output={"type": "object", "required": ["ok"]}),
                cap("not_json"),
                cap("crash"),
                cap("problem"),
                cap("slow"),
                cap("busy"),
                cap("stream", streaming=True, output=OBJECT),
            ]
        },
    }


@pytest.fixture
async def app() -> AsyncIterator[tuple[RecordingApp, HttpServer]]:
    recording = RecordingApp()
    server = HttpServer(recording, bind("127.0.0.1", 0), graceful=1.0)
    await server.start()
    yield recording, server
    await server.stop()


@pytest.fixture
async def proxy(
    app: tuple[RecordingApp, HttpServer], settings: Settings, mesh: Mesh, wait_until: Any
) -> AsyncIterator[SidecarProxy]:
    _, server = app
    sidecar = SidecarProxy(
        parse_agent_manifest(_manifest()),
        settings=settings,
        app_url=f"http://127.0.0.1:{server.port}",
        app_health="/healthz",
        egress_port=0,
    )
    ready = asyncio.Event()
    task = asyncio.create_task(sidecar.serve(on_ready=lambda _: ready.set(), handle_signals=False))
    await asyncio.wait_for(ready.wait(), 20)
    instance = sidecar.agent.instance_id
    await wait_until(
        lambda: any(r.instance_id == instance for r in mesh.sidecar.index.records()), timeout=15
    )
    yield sidecar
    sidecar.stop()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 10)


async def test_the_app_gets_the_verified_caller_and_budget_never_a_claimed_identity(
    proxy: SidecarProxy, app: tuple[RecordingApp, HttpServer], mesh: Mesh
) -> None:
    recording, _ = app
    assert await mesh.call("echo", {"text": "hi"}, timeout=7) == {"got": {"text": "hi"}}
    [(path, headers, body)] = recording.seen
    assert path == "/echo"
    assert json.loads(body) == {"text": "hi"}
    identity = mesh.sidecar.identity.id
    assert identity is not None
    assert headers[CALLER_ID_HEADER] == identity.uri
    assert headers[CALLER_NAME_HEADER] == identity.name
    assert 0 < int(headers[DEADLINE_HEADER]) <= 7000
    assert headers["content-type"] == "application/json"

    # Headers a caller sends are never copied to the app: a claimed identity goes nowhere.
    loop = asyncio.get_running_loop()
    call = OutboundCall(
        capability="echo",
        body=b'{"text": "x"}',
        deadline=loop.time() + 5,
        timeout=5,
        headers={CALLER_ID_HEADER: "spiffe://agentmesh.local/agent/root"},
    )
    await mesh.sidecar.outbound.handler(call)
    assert recording.seen[-1][1][CALLER_ID_HEADER] == identity.uri


async def test_what_the_app_answers_is_checked_and_its_failures_keep_their_meaning(
    proxy: SidecarProxy, app: tuple[RecordingApp, HttpServer], mesh: Mesh
) -> None:
    with pytest.raises(InvalidOutput, match=r"returned invalid output: 1 error\(s\): ok: "):
        await mesh.call("bad_output")
    with pytest.raises(InvalidOutput, match="not JSON"):
        await mesh.call("not_json")
    with pytest.raises(RemoteAgentError, match="HTTP 500: Traceback: boom") as crash:
        await mesh.call("crash")
    assert crash.value.code == "remote_error"
    with pytest.raises(InvalidInput, match="taken"):  # the app's problem keeps its code
        await mesh.call("problem")
    with pytest.raises(InvalidInput, match='text: "text" is a required property'):
        await mesh.call("echo", {})
    # A 503 means the app refused work it had not started: retryable elsewhere.
    with pytest.raises(AgentUnavailable, match="HTTP 503: queue full"):
        await mesh.call("busy", retries=0)
    seen = [p for p, _, _ in app[0].seen]
    assert seen == ["/bad-output", "/not-json", "/crash", "/problem", "/busy"]


async def test_the_callers_deadline_bounds_the_apps_work(
    proxy: SidecarProxy, app: tuple[RecordingApp, HttpServer], mesh: Mesh
) -> None:
    with pytest.raises(DeadlineExceeded):
        await mesh.call("slow", timeout=0.5, retries=0)
    [(_, headers, _)] = app[0].seen
    assert int(headers[DEADLINE_HEADER]) <= 500


async def test_a_stream_relays_chunks_then_the_apps_error(proxy: SidecarProxy, mesh: Mesh) -> None:
    chunks = []
    with pytest.raises(RemoteAgentError, match="ran out"):
        async for chunk in mesh.stream("stream"):
            chunks.append(chunk)
    assert chunks == [{"n": 1}, {"n": 2}]


async def test_an_app_that_is_gone_is_out_of_rotation_until_it_is_healthy_again(
    proxy: SidecarProxy, app: tuple[RecordingApp, HttpServer], mesh: Mesh, wait_until: Any
) -> None:
    recording, _ = app
    instance = proxy.agent.instance_id

    def status() -> str:
        [record] = [r for r in mesh.sidecar.index.records() if r.instance_id == instance]
        return record.status

    recording.up = False  # its health check fails: out of rotation
    await wait_until(lambda: status() == "unready", timeout=15)
    recording.up = True
    await wait_until(lambda: status() == "serving", timeout=15)


async def test_an_app_not_listening_refuses_calls_as_unavailable() -> None:
    """Nothing reached the app, so the caller may safely try another instance (retryable)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    [declared] = parse_agent_manifest(
        {
            "apiVersion": "agentmesh.dev/v1",
            "kind": "Agent",
            "metadata": {"name": "gone"},
            "spec": {"capabilities": [{"name": "echo"}]},
        }
    ).spec.capabilities
    client = AppClient("127.0.0.1", port)
    capability = AppCapability(declared, client)
    try:
        with pytest.raises(AgentUnavailable, match=f"the app at http://127.0.0.1:{port} is not"):
            await capability.invoke(capability.parse_input(b"{}"))
    finally:
        client.close()


async def test_agents_lists_a_sidecar_proxied_agent_with_its_marker(
    proxy: SidecarProxy, control: ControlProcess
) -> None:
    code, out, err = await run_cli("agents", control=control)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if proxy.agent.instance_id in line]
    assert "pyapp (sidecar)" in row
    code, out, err = await run_cli("agents", "-o", "json", control=control)
    assert code == 0, err
    [record] = [r for r in json.loads(out) if r["instance_id"] == proxy.agent.instance_id]
    assert record["labels"]["agentmesh.dev/sidecar"] == "true"


async def test_a_busy_egress_port_is_one_clear_error(settings: Settings) -> None:
    """Two sidecars on one host with the default egress port: the second says what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sidecar = SidecarProxy(
            parse_agent_manifest(_manifest()),
            settings=settings,
            app_url="http://127.0.0.1:9",
            egress_port=port,
        )
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}.*--egress-port"):
            await sidecar.serve(handle_signals=False)


async def test_an_a2a_card_is_enough_to_front_an_app_that_serves_the_agents_paths(
    app: tuple[RecordingApp, HttpServer], settings: Settings, mesh: Mesh, wait_until: Any
) -> None:
    recording, server = app
    url = f"http://127.0.0.1:{server.port}/.well-known/agent-card.json"
    declared = manifest_from_card(await asyncio.to_thread(fetch_card, url), url)
    assert declared.metadata.name == "card-app"
    assert [(c.name, c.version, c.streaming, c.app_path) for c in declared.spec.capabilities] == [
        ("echo", "2.1.0", False, "/v1/invoke/echo"),
        ("stream", "2.1.0", True, "/v1/invoke/stream"),
    ]
    sidecar = SidecarProxy(
        declared, settings=settings, app_url=f"http://127.0.0.1:{server.port}", egress_port=0
    )
    ready = asyncio.Event()
    task = asyncio.create_task(sidecar.serve(on_ready=lambda _: ready.set(), handle_signals=False))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        await wait_until(lambda: bool(mesh.sidecar.index.targets("echo")), timeout=15)
        assert await mesh.call("echo", {"any": ["json"]}) == {"got": {"any": ["json"]}}
        assert recording.seen[-1][0] == "/v1/invoke/echo"
    finally:
        sidecar.stop()
        await asyncio.wait_for(task, 10)


def test_a_card_that_is_not_one_names_the_source_and_field() -> None:
    with pytest.raises(InvalidInput, match=r"^card\.json: card field skills\[0\]\.id: "):
        manifest_from_card({"name": "x", "skills": [{"id": "not an id"}]}, "card.json")
    with pytest.raises(InvalidInput, match="not an A2A agent card"):
        manifest_from_card({"name": "x"}, "card.json")
    with pytest.raises(
        ConfigurationError, match="cannot read the agent card at http://127.0.0.1:9/"
    ):
        fetch_card("http://127.0.0.1:9/card")
