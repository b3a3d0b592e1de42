"""Telemetry of real agent processes: OTLP/HTTP export to a real endpoint, access-log lines."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentmesh import Mesh
from agentmesh.inbound.server import HttpServer, bind
from tests.e2e.support import EXAMPLE_AGENTS


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint: stores every span name it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []  # (service, span name, trace id)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((service, span.name, span.trace_id.hex()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_agents_export_traces_over_otlp_and_log_each_call(
    mesh: Mesh, spawn_agent, wait_until
) -> None:
    receiver = OtlpReceiver()
    server = HttpServer(receiver, bind("127.0.0.1", 0))
    await server.start()
    try:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.port}",
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        agent = await spawn_agent(EXAMPLE_AGENTS / "summarizer.py", env=env)
        for _ in range(3):
            await mesh.call("summarize", {"text": "One. Two. Three.", "max_words": 2})
        await wait_until(
            lambda: sum(1 for s in receiver.spans if s[1] == "execute_tool summarize") >= 3,
            timeout=10,
        )
        assert {s[0] for s in receiver.spans} == {"summarizer"}

        await wait_until(lambda: _access_lines(agent.tail(400)) >= 3, timeout=5)
        line = next(json.loads(raw) for raw in agent.tail(400).splitlines() if raw.startswith("{"))
        assert line["direction"] == "inbound"
        assert line["capability"] == "summarize"
        assert line["status"] == 200
        assert line["caller"] == "client"
        assert len(line["trace_id"]) == 32
        assert line["trace_id"] in {s[2] for s in receiver.spans}
    finally:
        await server.stop()


def _access_lines(log: str) -> int:
    return sum(1 for raw in log.splitlines() if raw.startswith('{"ts"'))
