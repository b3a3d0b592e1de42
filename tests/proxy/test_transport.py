"""The httpx face: httpx code calling capabilities through the mesh's outbound stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from agentmesh import CapabilityNotFound, InvalidInput, Mesh, MeshError, capability
from agentmesh.sidecar.deadline import DEADLINE_HEADER


@capability(version="1.2.0", tags=["nlp"])
async def summarize(text: str, max_words: int = 3) -> dict[str, object]:
    words = text.split()[:max_words]
    return {"text": " ".join(words), "words": len(words)}


@capability
async def count(to: int) -> AsyncIterator[int]:
    for i in range(1, to + 1):
        yield i


@capability
async def dawdle() -> str:
    await asyncio.sleep(5)
    return "late"


@pytest.fixture
async def agent(start_agent):
    return await start_agent([summarize, count, dawdle], name="words")


async def test_mesh_http_posts_are_mesh_calls(agent, mesh: Mesh) -> None:
    payload = {"text": "one two three four", "max_words": 2}
    response = await mesh.http.post("/v1/invoke/summarize", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == await mesh.call("summarize", payload)

    # The capability as a host name, with any httpx client on the transport.
    async with httpx.AsyncClient(transport=mesh.transport()) as client:
        by_host = await client.post("http://summarize.mesh/", json=payload)
    assert by_host.json() == {"text": "one two", "words": 2}


async def test_errors_are_the_problem_documents_of_mesh_call(agent, mesh: Mesh) -> None:
    missing = await mesh.http.post("/v1/invoke/nope", json={})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    with pytest.raises(CapabilityNotFound) as error:
        await mesh.call("nope", {})
    assert missing.json()["code"] == error.value.code
    assert missing.json()["detail"] == error.value.message
    with pytest.raises(httpx.HTTPStatusError):
        missing.raise_for_status()

    invalid = await mesh.http.post("/v1/invoke/summarize", json={"text": 1})
    with pytest.raises(InvalidInput) as bad:
        await mesh.call("summarize", {"text": 1})
    assert invalid.status_code == 422
    assert invalid.json()["errors"] == bad.value.errors

    late = await mesh.http.post("/v1/invoke/dawdle", headers={DEADLINE_HEADER: "200"})
    assert late.status_code == 504
    assert late.json()["code"] == "deadline_exceeded"

    wrong = await mesh.http.get("/v1/invoke/summarize")
    assert wrong.status_code == 404
    assert "called with POST" in wrong.json()["detail"]
    elsewhere = await mesh.http.post("/v2/other", json={})
    assert elsewhere.status_code == 404
    assert "http://<capability>.mesh/" in elsewhere.json()["detail"]


async def test_a_stream_arrives_as_server_sent_events(agent, mesh: Mesh) -> None:
    async with mesh.http.stream("POST", "/v1/invoke/count", json={"to": 3}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events == ["data: 1", "data: 2", "data: 3", "data: {}"]


async def test_version_and_tag_constraints_travel_as_headers(agent, mesh: Mesh) -> None:
    payload = {"text": "one two"}
    fits = await mesh.http.post(
        "/v1/invoke/summarize",
        json=payload,
        headers={"agentmesh-version": ">=1.2,<2", "agentmesh-tags": "nlp"},
    )
    assert fits.status_code == 200
    for headers in ({"agentmesh-version": ">=2"}, {"agentmesh-tags": "nlp,fr"}):
        refused = await mesh.http.post("/v1/invoke/summarize", json=payload, headers=headers)
        with pytest.raises(MeshError) as error:
            await mesh.call(
                "summarize",
                payload,
                version=headers.get("agentmesh-version"),
                tags=headers.get("agentmesh-tags", "").split(",")
                if "agentmesh-tags" in headers
                else None,
            )
        assert refused.status_code == error.value.status
        assert refused.json()["code"] == error.value.code
    bad = await mesh.http.post(
        "/v1/invoke/summarize", json=payload, headers={"agentmesh-version": "one"}
    )
    assert bad.status_code == 422
    assert "not a PEP 440 specifier" in bad.json()["detail"]
