"""The standalone sidecar with a real Node.js app: inbound, egress, health, isolation.

Every sidecar here is ``python -m agentmesh sidecar`` on the test's NATS and bucket with mTLS
strict (0.25 s heartbeats, 3 s lease); the app is ``examples/polyglot/app.js``. These tests need
``node``; they are skipped only where it is not installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from agentmesh import (
    CapabilityNotFound,
    InvalidInput,
    Mesh,
    MeshError,
    NoHealthyEndpoints,
    PayloadTooLarge,
    PolicyDenied,
    RemoteAgentError,
)
from agentmesh.control.policies import apply_policy
from agentmesh.proxy import SIDECAR_LABEL
from tests.mesh_ca import mesh_ca
from tests.policy.conftest import access_policy, call_unchecked, sources_for

from .sidecar_support import (
    APP,
    NODE,
    NodeApp,
    SidecarProcess,
    free_port,
    healthy,
    needs_node,
    served,
)
from .support import EXAMPLE_AGENTS, SpawnAgent, instance_ids, mesh_env, terminate_all

pytestmark = needs_node

WaitUntil = Callable[..., Awaitable[float]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]
#: An upper bound for what a heartbeat or a lease (3 s here) settles, generous for two shared
#: cores under other test suites' load: these tests check the outcome, not how fast it came.
SETTLE = 15.0
TEXT = "The mesh carries every call. Agents in any language join it. Node is one of them."


@pytest.fixture
async def start_sidecar(
    mesh: Mesh, nats_url: str, bucket: str, tmp_path: Path, wait_until: WaitUntil
) -> AsyncIterator[StartSidecar]:
    """``await start_sidecar(*args, env=...)`` → a registered sidecar the test's mesh sees."""
    started: list[SidecarProcess] = []

    async def start(
        *args: str, env: Mapping[str, str | None] | None = None, egress_port: int = 0
    ) -> SidecarProcess:
        log = tmp_path / "logs" / f"sidecar-{len(started) + 1}.log"
        sidecar = SidecarProcess(
            ["--egress-port", str(egress_port), *args],
            mesh_env(nats_url, bucket, tmp_path, env),
            log,
        )
        started.append(sidecar)
        await sidecar.wait_ready()
        await wait_until(lambda: sidecar.instance_id in instance_ids(mesh), timeout=SETTLE)
        return sidecar

    yield start
    terminate_all(s.proc for s in started)


@pytest.fixture
def start_app(nats_url: str, bucket: str, tmp_path: Path) -> Iterator[Callable[..., NodeApp]]:
    """``start_app(port, egress_url)`` → the example app as the test's own process."""
    apps: list[NodeApp] = []

    def start(port: int, egress_url: str) -> NodeApp:
        app = NodeApp(
            port,
            egress_url,
            tmp_path / "logs" / f"app-{len(apps) + 1}.log",
            mesh_env(nats_url, bucket, tmp_path),
        )
        apps.append(app)
        return app

    yield start
    terminate_all(a.proc for a in apps)


def _child_app() -> tuple[str, ...]:
    assert NODE is not None
    return ("--app-health", "/healthz", "--", NODE, str(APP))


async def test_node_agent_is_found_and_called_with_mtls_and_streams(
    mesh: Mesh, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(*_child_app())

    offers = await mesh.registry.find("shout")
    assert [o.instance_id for o in offers] == [sidecar.instance_id]
    assert offers[0].endpoint == sidecar.endpoint
    assert sidecar.endpoint.startswith("https://127.0.0.1:")  # mTLS strict, like any agent
    [record] = [r for r in mesh.sidecar.index.records() if r.instance_id == sidecar.instance_id]
    assert record.name == "headliner"
    assert record.labels[SIDECAR_LABEL] == "true"
    assert record.labels["language"] == "javascript"
    assert record.identity == "spiffe://agentmesh.local/agent/headliner"
    assert record.mtls == "strict"
    assert {c.name for c in record.capabilities} == {"shout", "countdown", "headline"}

    # The app learns the caller's identity as the sidecar verified it from its certificate.
    identity = mesh.sidecar.identity.id
    assert identity is not None
    assert await mesh.call("shout", {"text": "hello mesh"}) == {
        "text": "HELLO MESH",
        "caller": identity.uri,
    }
    # A caller without a mesh certificate never gets through (strict), let alone to the app.
    async with httpx.AsyncClient() as plain:
        refused = await plain.post(
            sidecar.endpoint.replace("https://", "http://") + "/v1/invoke/shout",
            json={"text": "x"},
        )
    assert refused.status_code == 401
    assert served(sidecar.app_url) == {"/shout": 1}

    chunks = [c async for c in mesh.stream("countdown", {"start": 3, "interval_ms": 0})]
    assert chunks == [{"n": 3}, {"n": 2}, {"n": 1}]


async def test_a_stream_passes_through_chunk_by_chunk(
    mesh: Mesh, start_sidecar: StartSidecar
) -> None:
    """The app would need 60 s for the whole stream; the call may take 20: only a sidecar that
    forwards each chunk as it comes (never buffering the stream) delivers the first in time."""
    await start_sidecar(*_child_app())
    stream = mesh.stream("countdown", {"start": 60, "interval_ms": 1000}, timeout=20)
    try:
        assert await anext(stream) == {"n": 60}
        assert await anext(stream) == {"n": 59}
    finally:
        await stream.aclose()


async def test_python_calls_node_which_calls_python_in_one_trace(
    mesh: Mesh,
    start_sidecar: StartSidecar,
    spawn_agent: SpawnAgent,
    agent_file: Callable[[str, str], Path],
    wait_until: WaitUntil,
) -> None:
    source = (
        "from agentmesh import Mesh, capability\n\n"
        "@capability\n"
        "async def front_page(text: str, mesh: Mesh) -> dict:\n"
        "    return await mesh.call('headline', {'text': text, 'max_words': 6})\n"
    )
    caller, summarizer = await asyncio.gather(
        spawn_agent(agent_file("editor", source)),
        spawn_agent(EXAMPLE_AGENTS / "summarizer.py"),
    )
    sidecar = await start_sidecar(*_child_app())

    out = await mesh.call("front_page", {"text": TEXT})
    assert out["headline"] == "The mesh carries every call"
    assert out["words"] == 5
    trace_id = out["traceparent"].split("-")[1]  # what the Node app received

    def lines(log: str) -> list[dict[str, object]]:
        return [json.loads(raw) for raw in log.splitlines() if raw.startswith('{"ts"')]

    def hops() -> set[tuple[str, str, str]]:
        found = set()
        for name, log in (
            ("editor", caller.tail(200)),
            ("headliner", sidecar.tail(200)),
            ("summarizer", summarizer.tail(200)),
        ):
            for line in lines(log):
                if line["trace_id"] == trace_id:
                    found.add((name, str(line["direction"]), str(line["capability"])))
        return found

    expected = {
        ("editor", "inbound", "front_page"),
        ("editor", "outbound", "headline"),
        ("headliner", "inbound", "headline"),
        ("headliner", "outbound", "summarize"),  # the app's call, through the egress
        ("summarizer", "inbound", "summarize"),
    }
    await wait_until(lambda: hops() >= expected, timeout=SETTLE)
    assert served(sidecar.app_url) == {"/headline": 1}


async def test_egress_errors_are_the_problem_documents_in_process_callers_see(
    mesh: Mesh, start_sidecar: StartSidecar, spawn_agent: SpawnAgent
) -> None:
    await spawn_agent(EXAMPLE_AGENTS / "summarizer.py")
    sidecar = await start_sidecar(*_child_app())
    async with httpx.AsyncClient(base_url=sidecar.egress_url) as app:
        ok = await app.post("/v1/invoke/summarize", json={"text": TEXT, "max_words": 3})
        assert ok.status_code == 200
        assert ok.json() == await mesh.call("summarize", {"text": TEXT, "max_words": 3})

        missing = await app.post("/v1/invoke/nope", json={})
        with pytest.raises(CapabilityNotFound) as in_process:
            await mesh.call("nope", {})
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == in_process.value.code == "capability_not_found"
        assert missing.json()["detail"] == in_process.value.message

        invalid = await app.post("/v1/invoke/summarize", json={"text": 3})
        with pytest.raises(InvalidInput) as bad:
            await mesh.call("summarize", {"text": 3})
        assert invalid.status_code == 422
        assert invalid.json()["code"] == "invalid_input"
        assert invalid.json()["errors"] == bad.value.errors

        # An error the app passes on reaches its own caller with the same code.
        with pytest.raises(InvalidInput):
            await mesh.call("headline", {"text": "x", "max_words": 0})

        # Streaming through the egress: the agents' own server-sent events.
        async with app.stream(
            "POST", "/v1/invoke/countdown", json={"start": 2, "interval_ms": 0}
        ) as events:
            assert events.headers["content-type"] == "text/event-stream"
            body = (await events.aread()).decode()
    assert body.split("\n\n")[:3] == [
        'event: chunk\ndata: {"n":2}',
        'event: chunk\ndata: {"n":1}',
        "event: end\ndata: {}",
    ]


async def test_access_policy_denies_before_the_app_sees_the_request(
    mesh: Mesh, start_sidecar: StartSidecar, settings, wait_until: WaitUntil
) -> None:
    sidecar = await start_sidecar(*_child_app())
    assert await mesh.call("shout", {"text": "allowed"}) == {
        "text": "ALLOWED",
        "caller": mesh.sidecar.identity.id.uri if mesh.sidecar.identity.id else None,
    }
    await apply_policy(
        mesh_ca().policy_signer(mesh.sidecar.policies.store),
        access_policy(
            "shout-access",
            {
                "name": "only-planner-shouts",
                "action": "allow",
                "sources": sources_for("planner"),
                "targets": [{"capability": "shout"}],
            },
        ),
    )
    await wait_until(
        lambda: "shout-access" in mesh.sidecar.policies.snapshot.policies, timeout=SETTLE
    )

    denials: list[PolicyDenied] = []

    async def refused() -> bool:
        try:
            await call_unchecked(mesh, settings, "shout")  # skips the sender's own check
        except PolicyDenied as exc:
            denials.append(exc)
            return True
        except InvalidInput:
            return False  # the sidecar has not seen the policy yet (and "{}" never reaches the app)
        return False

    await wait_until(refused, timeout=SETTLE)
    assert "rule 'only-planner-shouts'" in str(denials[0])
    assert f"at {sidecar.endpoint}" in str(denials[0])  # the receiving sidecar decided
    assert served(sidecar.app_url) == {"/shout": 1}  # only the call before the policy


async def test_invalid_and_oversized_requests_never_reach_the_app(
    mesh: Mesh, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(*_child_app(), env={"AGENTMESH_MAX_PAYLOAD_BYTES": "4096"})

    with pytest.raises(InvalidInput) as invalid:
        await mesh.call("shout", {"txt": "typo"})
    assert invalid.value.status == 422
    assert {tuple(e["loc"]) for e in invalid.value.errors} == {("txt",), ("text",)}
    assert "'txt' was unexpected" in str(invalid.value)

    with pytest.raises(InvalidInput):
        await mesh.call("countdown", {"start": 1000})  # maximum: 100
    with pytest.raises(PayloadTooLarge):
        await mesh.call("shout", {"text": "x" * 5000})
    with pytest.raises(InvalidInput):
        await mesh.call("shout", b"not json")
    # The app's own calls have the same bound at its egress, and the 413 names the setting.
    async with httpx.AsyncClient(base_url=sidecar.egress_url) as app:
        too_big = await app.post("/v1/invoke/shout", json={"text": "x" * 5000})
    assert too_big.status_code == 413
    assert too_big.json()["code"] == "payload_too_large"
    assert (
        "limit of 4096 bytes (AGENTMESH_MAX_PAYLOAD_BYTES of the sidecar)"
        in (too_big.json()["detail"])
    )

    assert served(sidecar.app_url) == {}
    assert await mesh.call("shout", {"text": "fine"}) == {
        "text": "FINE",
        "caller": mesh.sidecar.identity.id.uri if mesh.sidecar.identity.id else None,
    }
    assert served(sidecar.app_url) == {"/shout": 1}


async def test_app_killed_goes_out_of_rotation_and_comes_back_without_a_sidecar_restart(
    mesh: Mesh, start_sidecar: StartSidecar, start_app, wait_until: WaitUntil
) -> None:
    port, egress = free_port(), free_port()
    app = start_app(port, f"http://127.0.0.1:{egress}")
    await app.wait_up()
    sidecar = await start_sidecar("--app", app.url, "--app-health", "/healthz", egress_port=egress)

    def status() -> str | None:
        for record in mesh.sidecar.index.records():
            if record.instance_id == sidecar.instance_id:
                return record.status
        return None

    assert status() == "serving"
    assert (await mesh.call("shout", {"text": "a"}))["text"] == "A"

    app.kill()
    await wait_until(lambda: status() == "unready", timeout=SETTLE)
    with pytest.raises(NoHealthyEndpoints, match="unready"):
        await mesh.call("shout", {"text": "b"}, timeout=2)
    assert sidecar.proc.poll() is None, f"the sidecar died with its app:\n{sidecar.tail()}"

    app = start_app(port, f"http://127.0.0.1:{egress}")
    await app.wait_up()
    await wait_until(lambda: status() == "serving", timeout=SETTLE)
    assert (await mesh.call("shout", {"text": "c"}))["text"] == "C"
    assert sidecar.proc.poll() is None


async def test_sidecar_killed_its_record_leaves_and_the_app_keeps_running(
    mesh: Mesh, start_sidecar: StartSidecar, start_app, wait_until: WaitUntil
) -> None:
    port, egress = free_port(), free_port()
    app = start_app(port, f"http://127.0.0.1:{egress}")
    await app.wait_up()
    sidecar = await start_sidecar("--app", app.url, egress_port=egress)

    sidecar.proc.kill()
    await sidecar.wait_exit()
    await wait_until(lambda: sidecar.instance_id not in instance_ids(mesh), timeout=SETTLE)
    assert app.proc.poll() is None
    assert await asyncio.to_thread(healthy, app.url)


async def test_a_child_app_crash_is_restarted_and_sigterm_stops_both_in_order(
    mesh: Mesh, start_sidecar: StartSidecar, wait_until: WaitUntil
) -> None:
    sidecar = await start_sidecar(*_child_app())
    first = sidecar.app_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: sidecar.app_pid() not in (None, first), timeout=SETTLE)
    assert "exited with code -9; restarting it in" in sidecar.tail()
    # SIGHUP is the app's: passed on (Node's default for it is to exit), then restarted again.
    second = sidecar.app_pid()
    sidecar.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: sidecar.app_pid() not in (None, second), timeout=SETTLE)
    assert "exited with code -1; restarting it in" in sidecar.tail()
    assert sidecar.proc.poll() is None

    async def answers() -> bool:
        try:
            return bool((await mesh.call("shout", {"text": "again"}, timeout=2))["text"] == "AGAIN")
        except MeshError:
            return False

    await wait_until(answers, timeout=15, interval=0.1)
    assert sidecar.proc.poll() is None

    app = sidecar.app_pid()
    sidecar.proc.terminate()
    assert await sidecar.wait_exit(timeout=15) == 0
    log = sidecar.tail(60)
    assert "headliner app: SIGTERM, closing" in log  # the app got its SIGTERM
    assert "deregistered" in log
    assert log.index("deregistered") < log.index("headliner app: SIGTERM")  # drained first
    assert app is not None
    with pytest.raises(ProcessLookupError):
        os.kill(app, 0)  # the sidecar stopped and reaped the app it started
    await wait_until(lambda: sidecar.instance_id not in instance_ids(mesh), timeout=SETTLE)


async def test_the_apps_calls_carry_the_apps_identity_and_policy_applies_to_them(
    mesh: Mesh, start_sidecar: StartSidecar, spawn_agent: SpawnAgent, wait_until: WaitUntil
) -> None:
    await spawn_agent(EXAMPLE_AGENTS / "summarizer.py")
    sidecar = await start_sidecar(*_child_app())
    assert (await mesh.call("headline", {"text": TEXT}))["words"] > 0
    await apply_policy(
        mesh_ca().policy_signer(mesh.sidecar.policies.store),
        access_policy(
            "no-node-summaries",
            {
                "name": "headliner-may-not-summarize",
                "action": "deny",
                "sources": [{"spiffe": "spiffe://agentmesh.local/agent/headliner"}],
                "targets": [{"capability": "summarize"}],
            },
        ),
    )

    async def egress_denied() -> bool:
        async with httpx.AsyncClient(base_url=sidecar.egress_url) as app:
            answer = await app.post("/v1/invoke/summarize", json={"text": TEXT})
        return answer.status_code == 403 and answer.json()["code"] == "policy_denied"

    await wait_until(egress_denied, timeout=SETTLE)
    # The app passes the problem on; its caller sees what a Python agent's nested call gives:
    # the capability failed because of that denial (403 is about the caller's own call).
    with pytest.raises(RemoteAgentError, match="raised PolicyDenied: .*headliner-may-not-summ"):
        await mesh.call("headline", {"text": TEXT})
    # The test's own client is not the app: it may still summarize.
    assert (await mesh.call("summarize", {"text": TEXT}))["words"] > 0


async def test_a_child_app_gets_its_port_and_egress_and_none_of_the_sidecars_secrets(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    dump = tmp_path / "app-env.txt"
    sidecar = await start_sidecar(
        "--app-health", "/healthz", "--", "sh", "-c", f"env > {dump}; exec {NODE} {APP}"
    )
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert sidecar.app_url == f"http://127.0.0.1:{env['AGENTMESH_APP_PORT']}"
    assert env["AGENTMESH_EGRESS_URL"] == sidecar.egress_url
    assert sorted(k for k in env if k.startswith("AGENTMESH_")) == [
        "AGENTMESH_APP_PORT",
        "AGENTMESH_EGRESS_URL",
    ]
