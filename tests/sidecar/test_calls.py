"""Calls through the sidecar to in-process agents on real HTTP, on a real NATS registry."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import BaseModel

from agentmesh import (
    Agent,
    CapabilityNotFound,
    DeadlineExceeded,
    InvalidInput,
    InvalidOutput,
    Mesh,
    NoHealthyEndpoints,
    PayloadTooLarge,
    RemoteAgentError,
    capability,
    connect,
)
from agentmesh.errors import ConnectionFailed
from agentmesh.models import AgentRecord
from agentmesh.registry import Lease
from agentmesh.settings import Settings
from tests.mesh_ca import mesh_ca


class Summary(BaseModel):
    text: str
    words: int


@capability(version="1.2.0", tags=["nlp", "en"], idempotent=True)
async def summarize(text: str, max_words: int = 3) -> Summary:
    """Keep the first words."""
    words = text.split()[:max_words]
    return Summary(text=" ".join(words), words=len(words))


@capability
async def whoami(tag: str = "") -> str:
    return tag


@capability
async def boom() -> int:
    raise RuntimeError("kaput")


@capability
async def liar() -> int:
    return "not an int"  # type: ignore[return-value]


@capability
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@capability
async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@capability
async def failing_stream(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
    raise ValueError("ran dry")


@capability
async def echo_stream(tag: str) -> AsyncIterator[str]:
    yield tag


async def test_call_returns_the_validated_output(start_agent, mesh: Mesh):
    await start_agent([summarize], name="summarizer")
    assert await mesh.call("summarize", {"text": "a b c d e"}) == {"text": "a b c", "words": 3}

    class Args(BaseModel):
        text: str
        max_words: int

    assert await mesh.call("summarize", Args(text="x y", max_words=1)) == {"text": "x", "words": 1}


async def test_calls_spread_over_two_replicas(start_agent, settings: Settings):
    # Serial calls under P2C follow measured latency, which a loaded machine skews at will
    # (P2C's preferences are tested with an injected clock in test_balance.py); round robin
    # shows, independent of timing, that both replicas are live targets of one capability.
    a = await start_agent([whoami], name="who")
    b = await start_agent([whoami], name="who")
    async with connect(settings.model_copy(update={"balance": "round_robin"})) as rr:
        served = collections.Counter(
            [(await rr.invoke("whoami", {"tag": str(i)})).instance_id for i in range(40)]
        )
    assert served == {a.instance_id: 20, b.instance_id: 20}


async def test_concurrent_calls_go_to_the_less_busy_replica(start_agent, mesh: Mesh):
    await start_agent([slow], name="slowpoke")
    await start_agent([slow], name="slowpoke")
    results = await asyncio.gather(*(mesh.invoke("slow", {"seconds": 0.2}) for _ in range(10)))
    per_instance = collections.Counter(r.instance_id for r in results)
    assert sorted(per_instance.values()) == [5, 5]  # P2C on in-flight balances exactly here


async def test_invalid_input_is_422_with_pydantics_errors(start_agent, mesh: Mesh):
    agent = await start_agent([summarize], name="summarizer")
    with pytest.raises(InvalidInput) as err:
        await mesh.call("summarize", {"text": 5, "bogus": True})
    assert {e["loc"][-1] for e in err.value.errors or []} == {"text", "bogus"}
    async with httpx.AsyncClient(verify=mesh_ca().client_context()) as client:
        resp = await client.post(f"{agent.endpoint}/v1/invoke/summarize", content=b"{nope")
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "invalid_input"
    assert resp.json()["errors"][0]["type"] == "json_invalid"


async def test_a_header_value_cannot_smuggle_headers_or_requests(start_agent, mesh: Mesh):
    await start_agent([summarize], name="summarizer")
    smuggled = "k1\r\ncontent-length: 0\r\n\r\nPOST /v1/invoke/boom HTTP/1.1"
    with pytest.raises(InvalidInput, match="idempotency-key may not contain line breaks"):
        await mesh.call("summarize", {"text": "a b"}, idempotency_key=smuggled)
    with pytest.raises(InvalidInput, match="must be latin-1 text"):
        await mesh.call("summarize", {"text": "a b"}, idempotency_key="ключ")
    assert await mesh.call("summarize", {"text": "a b"}, idempotency_key="k-1") == {
        "text": "a b",
        "words": 2,
    }


async def test_unknown_capability_suggests_close_names(start_agent, mesh: Mesh):
    await start_agent([summarize], name="summarizer")
    with pytest.raises(CapabilityNotFound, match="'summarise'.*did you mean 'summarize'"):
        await mesh.call("summarise", {"text": "x"})


async def test_version_and_tag_constraints_select_instances(start_agent, mesh: Mesh):
    await start_agent([summarize], name="summarizer")
    assert await mesh.call("summarize", {"text": "a"}, version=">=1.2,<2", tags=["en"])
    with pytest.raises(NoHealthyEndpoints, match="version >=2"):
        await mesh.call("summarize", {"text": "a"}, version=">=2")
    with pytest.raises(NoHealthyEndpoints, match="tags"):
        await mesh.call("summarize", {"text": "a"}, tags=["fr"])


async def test_remote_exceptions_become_remote_agent_error(start_agent, mesh: Mesh):
    await start_agent([boom, liar], name="broken")
    with pytest.raises(RemoteAgentError, match="RuntimeError: kaput") as err:
        await mesh.call("boom")
    assert "broken-" in str(err.value)  # the message names the agent instance
    with pytest.raises(InvalidOutput):
        await mesh.call("liar")


async def test_timeout_stops_the_call_and_cancels_the_remote_work(start_agent, mesh: Mesh):
    agent = await start_agent([slow], name="slowpoke")
    with pytest.raises(DeadlineExceeded, match="within 0.2s"):
        await mesh.call("slow", {"seconds": 5}, timeout=0.2)
    app = agent.agent.app
    assert app is not None
    # The remaining budget travelled with the call: the agent cancelled the work itself.
    for _ in range(100):
        if app.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert app.in_flight == 0


async def test_streaming_yields_chunks_in_order(start_agent, mesh: Mesh):
    await start_agent([count, failing_stream], name="streamer")
    assert [c async for c in mesh.stream("count", {"n": 5})] == [0, 1, 2, 3, 4]
    seen = []
    with pytest.raises(RemoteAgentError, match="ValueError: ran dry"):
        async for chunk in mesh.stream("failing_stream", {"n": 2}):
            seen.append(chunk)
    assert seen == [0, 1]


async def test_a_capability_calls_others_through_its_own_sidecar(start_agent, mesh: Mesh):
    @capability
    async def outer(text: str, mesh: Mesh) -> dict[str, object]:
        inner = await mesh.call("summarize", {"text": text, "max_words": 1})
        return {"inner": inner, "shared": mesh.sidecar is agent.agent.mesh.sidecar}

    await start_agent([summarize], name="summarizer")
    agent = await start_agent([outer], name="outer")
    assert await mesh.call("outer", {"text": "x y"}) == {
        "inner": {"text": "x", "words": 1},
        "shared": True,
    }


async def test_draining_instances_get_no_new_calls(start_agent, mesh: Mesh, wait_until):
    agent = await start_agent([slow], name="slowpoke")
    call = asyncio.create_task(mesh.call("slow", {"seconds": 0.5}))
    await wait_until(lambda: agent.agent.app is not None and agent.agent.app.in_flight == 1)
    agent.agent.stop()  # drains: the in-flight call finishes, new ones are refused
    await wait_until(
        lambda: [t.record.status for t in mesh.sidecar.index.targets("slow")] in (["draining"], [])
    )
    assert await call == "done"
    with pytest.raises((NoHealthyEndpoints, CapabilityNotFound)):
        await mesh.call("slow", {"seconds": 0})
    await asyncio.wait_for(agent.task, 5)
    await wait_until(lambda: not mesh.sidecar.index.targets("slow"))


async def test_large_payloads_cross_tls_both_ways(start_agent, settings, mesh: Mesh):
    await start_agent([whoami], name="mirror")
    big = "ü" * (settings.max_payload_bytes // 3)  # many TLS records each way, multi-byte UTF-8
    assert await mesh.call("whoami", {"tag": big}) == big
    assert await mesh.call("whoami", {"tag": "small after big"}) == "small after big"


async def test_oversized_payload_is_refused_with_413(start_agent, settings, mesh: Mesh):
    await start_agent([summarize], name="summarizer")
    huge = "x" * (settings.max_payload_bytes + 1)
    with pytest.raises(PayloadTooLarge) as caught:
        await mesh.call("summarize", {"text": huge})
    message = str(caught.value)
    assert f"larger than its limit of {settings.max_payload_bytes} bytes" in message, message
    assert "AGENTMESH_MAX_PAYLOAD_BYTES" in message, message


async def test_a_reply_or_a_chunk_over_the_callers_limits_is_payload_too_large(
    start_agent, settings, mesh: Mesh, wait_until
):
    await start_agent([whoami, echo_stream], name="mirror")
    async with connect(settings, max_response_bytes=1000, max_event_line_bytes=1000) as small:
        await wait_until(lambda: bool(small.sidecar.index.targets("echo_stream")))
        with pytest.raises(PayloadTooLarge, match="over 1000 bytes.*AGENTMESH_MAX_RESPONSE_BYTES"):
            await small.call("whoami", {"tag": "x" * 1000})
        with pytest.raises(PayloadTooLarge, match="AGENTMESH_MAX_EVENT_LINE_BYTES"):
            async for _ in small.stream("echo_stream", {"tag": "x" * 1000}):
                pass
        assert await small.call("whoami", {"tag": "fits"}) == "fits"
        assert [c async for c in small.stream("echo_stream", {"tag": "fits"})] == ["fits"]
    assert await mesh.call("whoami", {"tag": "x" * 1000}) == "x" * 1000  # the default limit


async def test_a_dead_endpoint_is_a_connection_failure_naming_it(mesh: Mesh, wait_until):
    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ghost = AgentRecord(
        instance_id="ghost-1",
        name="ghost",
        identity="spiffe://agentmesh.local/agent/ghost",
        endpoint=f"https://127.0.0.1:{port}",
        capabilities=[whoami.spec],
    )
    store = await mesh_ca().store_as(mesh.sidecar.conn, mesh.sidecar.store.bucket, "ghost")
    lease = Lease(store, ghost, interval=0.25, ttl=1)
    await lease.acquire()
    await wait_until(lambda: bool(mesh.sidecar.index.targets("whoami")))
    with pytest.raises(
        ConnectionFailed, match=f"ghost-1 at https://127.0.0.1:{port}: connection refused"
    ):
        await mesh.call("whoami")
    await lease.release()


async def test_a_frozen_replica_is_never_reached_and_calls_move_to_another(
    start_agent, settings, wait_until
):
    # A stopped process's kernel still completes TCP handshakes on its listening socket; its
    # TLS handshake never ends. The connect timeout makes that "never reached" (ConnectionFailed),
    # which even a non-idempotent call retries on another replica.
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)
        await start_agent([whoami], name="mirror")
        async with connect(settings, connect_timeout=0.5, balance="round_robin") as quick:
            ghost = AgentRecord(
                instance_id="mirror-frozen",
                name="mirror",
                identity="spiffe://agentmesh.local/agent/mirror",
                endpoint=f"https://127.0.0.1:{frozen.getsockname()[1]}",
                capabilities=[whoami.spec],
            )
            bucket = quick.sidecar.store.bucket
            store = await mesh_ca().store_as(quick.sidecar.conn, bucket, "mirror")
            lease = Lease(store, ghost, interval=0.25, ttl=1)
            await lease.acquire()
            await wait_until(lambda: len(quick.sidecar.index.targets("whoami")) == 2)
            for tag in "abcd":
                assert await quick.call("whoami", {"tag": tag}) == tag
            await lease.release()
        frozen.setblocking(False)
        frozen.accept()[0].close()  # the frozen replica was tried (else: BlockingIOError)


async def test_agent_serves_probes_metrics_and_card(start_agent, mesh: Mesh):
    agent = await start_agent(
        Agent("summarizer", version="2.0.0", description="Summaries", capabilities=[summarize])
    )
    await mesh.call("summarize", {"text": "a"})
    async with httpx.AsyncClient(
        base_url=agent.endpoint, verify=mesh_ca().client_context()
    ) as client:
        assert (await client.get("/healthz")).json() == {
            "status": "ok",
            "mtls": "strict",
            "identity": "spiffe://agentmesh.local/agent/summarizer",
        }
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert (
            'agentmesh_inbound_requests_total{agent="summarizer",caller="client",capability="summarize",status="200"}'
            in metrics
        )
        card = (await client.get("/.well-known/agent-card.json")).json()
        assert card["name"] == "summarizer"
        assert card["url"] == agent.endpoint
        assert [s["id"] for s in card["skills"]] == ["summarize"]
        assert (await client.get("/nope")).status_code == 404
        assert (await client.delete("/healthz")).headers[
            "content-type"
        ] == "application/problem+json"
