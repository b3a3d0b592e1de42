"""Traces, metrics and error bodies of calls through in-process agents on real HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from agentmesh import Mesh, RemoteAgentError, capability
from tests.flaky import flaky_endpoint, work
from tests.mesh_ca import mesh_ca
from tests.promtool import check_metrics

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def _provider() -> TracerProvider:
    """One SDK provider per test process (OpenTelemetry allows setting it once)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        current.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        return current
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    return provider


@pytest.fixture
def spans(_provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@capability
async def c_step() -> str:
    return "c"


@capability
async def b_step(mesh: Mesh) -> str:
    return await mesh.call("c_step") + "b"


@capability
async def a_step(mesh: Mesh) -> str:
    return await mesh.call("b_step") + "a"


@capability
async def boom() -> int:
    raise RuntimeError("kaput")


def by_name(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_chain_of_three_agents_is_one_trace(start_agent, mesh: Mesh, spans, wait_until):
    await start_agent([c_step], name="agent-c")
    await start_agent([b_step], name="agent-b")
    await start_agent([a_step], name="agent-a")
    spans.clear()
    assert await mesh.call("a_step") == "cba"
    await wait_until(lambda: len(spans.get_finished_spans()) >= 6)
    finished = list(spans.get_finished_spans())
    assert len({s.context.trace_id for s in finished}) == 1

    assert len(finished) == 6, [s.name for s in finished]  # one CLIENT and one SERVER per hop
    parent = None
    for hop in ("a_step", "b_step", "c_step"):
        client = by_name(finished, f"execute_tool {hop}", SpanKind.CLIENT)
        server = by_name(finished, f"execute_tool {hop}", SpanKind.SERVER)
        assert parent_of(client) == parent
        assert parent_of(server) == client.context.span_id
        assert client.attributes["gen_ai.tool.name"] == hop
        assert client.attributes["agentmesh.attempts"] == 1
        assert not client.events
        assert server.attributes["agentmesh.agent"] == f"agent-{hop[0]}"
        parent = server.context.span_id


async def test_a_retried_call_shows_each_failed_attempt_on_its_span(
    start_agent, mesh: Mesh, spans, wait_until
):
    healthy = await start_agent([work], name="worker")
    async with flaky_endpoint(mesh) as (flaky, flaky_id):
        await wait_until(lambda: len(mesh.sidecar.index.targets("work")) == 2)
        # The balancer picks at random: call until one call tried the failing replica first.
        for _ in range(100):
            spans.clear()
            result = await mesh.invoke("work")
            if result.attempts > 1:
                break
        assert result.attempts == 2, "no call tried the failing replica first in 100 calls"
        assert result.instance_id == healthy.instance_id
    finished = list(spans.get_finished_spans())
    client = by_name(finished, "execute_tool work", SpanKind.CLIENT)
    server = by_name(finished, "execute_tool work", SpanKind.SERVER)
    assert client.attributes["agentmesh.attempts"] == 2
    assert client.attributes["agentmesh.callee.instance"] == healthy.instance_id
    assert parent_of(server) == client.context.span_id  # the attempt that reached the worker
    [event] = client.events
    assert event.name == "attempt failed"
    assert event.attributes["agentmesh.attempt"] == 1
    assert event.attributes["agentmesh.callee.instance"] == flaky_id
    assert event.attributes["server.address"].startswith("https://127.0.0.1:")
    assert event.attributes["error.type"] == "unavailable"
    assert "503" in event.attributes["exception.message"]
    assert flaky.hits >= 1


async def test_error_bodies_and_errors_carry_the_trace_id(start_agent, mesh: Mesh, spans):
    agent = await start_agent([boom], name="broken")
    with pytest.raises(RemoteAgentError) as err:
        await mesh.call("boom")
    client = by_name(list(spans.get_finished_spans()), "execute_tool boom", SpanKind.CLIENT)
    assert err.value.trace_id == format(client.context.trace_id, "032x")
    async with httpx.AsyncClient(verify=mesh_ca().client_context()) as http:
        resp = await http.post(f"{agent.endpoint}/v1/invoke/boom", content=b"{}")
    assert resp.status_code == 500
    assert len(resp.json()["trace_id"]) == 32


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_exactly_the_calls_made(start_agent, mesh: Mesh):
    agent = await start_agent([c_step], name="counted")
    out = {"caller": "client", "capability": "c_step", "callee": "counted", "status": "ok"}
    inb = {"agent": "counted", "caller": "client", "capability": "c_step", "status": "200"}
    before_out = sample("agentmesh_outbound_requests_total", out)
    before_in = sample("agentmesh_inbound_requests_total", inb)
    for _ in range(7):
        await mesh.call("c_step")
    assert sample("agentmesh_outbound_requests_total", out) - before_out == 7
    assert sample("agentmesh_inbound_requests_total", inb) - before_in == 7

    async with httpx.AsyncClient(verify=mesh_ca().client_context()) as http:
        exposition = (await http.get(f"{agent.endpoint}/metrics")).text
    assert "agentmesh_outbound_latency_seconds_bucket" in exposition
    assert "agentmesh_breaker_state" in exposition or "agentmesh_breaker_transitions" in exposition
    await asyncio.to_thread(check_metrics, exposition)


# ---- unsampled calls skip the SDK ------------------------------------------------------------

UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_child_of_an_unsampled_parent_is_what_the_sdk_would_make(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentmesh.telemetry import tracing

    monkeypatch.setattr(tracing, "_parent_decides", True)
    child = tracing.unsampled_child(tracing.extract(UNSAMPLED))
    assert child is not None
    assert not child.is_recording()
    ctx = child.get_span_context()
    assert format(ctx.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert ctx.span_id not in (0, 0xB7AD6B7169203331)
    assert not ctx.trace_flags.sampled
    assert not ctx.is_remote
    # Sampled parents, no parent at all: the SDK's sampler decides.
    assert tracing.unsampled_child(tracing.extract(SAMPLED)) is None
    assert tracing.unsampled_child(None) is None
    monkeypatch.setattr(tracing, "_parent_decides", False)
    assert tracing.unsampled_child(tracing.extract(UNSAMPLED)) is None


@pytest.mark.parametrize(
    "traceparent",
    [
        SAMPLED,
        UNSAMPLED,
        f"  {SAMPLED}\t",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future-fields",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # v00 has no more
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short span id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
        "0x-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "0" * 500,
        "",
        "garbage",
    ],
)
@pytest.mark.parametrize("tracestate", [None, "vendor=a,other=b", "x" * 9000, "not a list"])
def test_trace_context_is_read_and_written_as_the_sdk_propagator_does(
    traceparent: str, tracestate: str | None
) -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from agentmesh.telemetry import tracing

    propagator = TraceContextTextMapPropagator()
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    theirs = trace.get_current_span(propagator.extract(carrier)).get_span_context()
    context = tracing.extract(traceparent, tracestate)
    ours = trace.get_current_span(context).get_span_context()
    assert (context is not None) == theirs.is_valid
    assert ours == theirs  # ids, flags, remote and trace state
    written: dict[str, str] = {}
    tracing.inject(written, trace.NonRecordingSpan(ours))
    expected: dict[str, str] = {}
    propagator.inject(expected, trace.set_span_in_context(trace.NonRecordingSpan(theirs)))
    assert written == expected


@pytest.mark.parametrize(
    ("sampler", "shortcut"),
    [
        (None, True),
        ("parentbased_traceidratio", True),
        ("always_on", False),
        ("traceidratio", False),
    ],
)
def test_the_shortcut_is_on_only_under_a_parent_based_sampler(
    sampler: str | None, shortcut: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if sampler is not None:
        env["OTEL_TRACES_SAMPLER"] = sampler
    code = (
        "from agentmesh.telemetry import tracing; tracing.setup_tracing('t'); "
        "print(tracing._parent_decides)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == str(shortcut)


# ---- nothing configured: ids without the SDK ---------------------------------------------------


def _setup_tracing_in_fresh_process(code: str, **otel: str) -> str:
    """Run ``setup_tracing`` and then ``code`` in a new interpreter with only ``otel`` of the
    ``OTEL_*`` variables; its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    setup = "from agentmesh.telemetry import tracing; tracing.setup_tracing('t')\n"
    out = subprocess.run(
        [sys.executable, "-c", setup + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_without_an_exporter_or_sampler_spans_carry_ids_and_the_sdk_stays_unloaded() -> None:
    code = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "t = tracing.tracer()\n"
        "root = t.start_span('root')\n"
        f"child = t.start_span('child', context=tracing.extract({SAMPLED!r}))\n"
        "with t.start_as_current_span('current') as current:\n"
        "    inner = t.start_span('inner').get_span_context()\n"
        "r, c = root.get_span_context(), child.get_span_context()\n"
        "print('opentelemetry.sdk' in sys.modules, tracing._parent_decides,\n"
        "      r.is_valid, root.is_recording(), r.trace_flags.sampled == tracing._root_sampled(r.trace_id),\n"
        "      format(c.trace_id, '032x'), c.span_id != 0xB7AD6B7169203331, c.trace_flags.sampled,\n"
        "      inner.trace_id == current.get_span_context().trace_id, not inner.is_remote)"
    )
    out = _setup_tracing_in_fresh_process(code)
    assert out.split() == [
        "False",  # no SDK
        "True",  # unsampled children skip the tracer, as under the default sampler
        "True",  # a root span has ids (logs and error bodies name its trace)
        "False",  # and records nothing: there is nowhere to export it
        "True",  # sampled or not as the SDK's default sampler would decide
        "0af7651916cd43dd8448eb211c80319c",  # a caller's trace continues
        "True",  # under a span id of its own
        "True",  # with the caller's decision
        "True",  # the current span is the parent of spans started inside it
        "True",
    ]


def test_new_traces_are_sampled_as_the_sdks_default_sampler_samples_them() -> None:
    import random

    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    from agentmesh.telemetry import tracing

    sampler = TraceIdRatioBased(0.1)
    ids = [random.getrandbits(128) for _ in range(2000)]
    ids += [sampler.bound - 1, sampler.bound, sampler.bound + 1, (2**64) * 7 + sampler.bound - 1]
    for trace_id in ids:
        sdk = sampler.should_sample(None, trace_id, "call").decision.is_sampled()
        assert tracing._root_sampled(trace_id) == sdk, hex(trace_id)
    assert 100 < sum(map(tracing._root_sampled, ids[:2000])) < 300  # about 10 %, not none or all


@pytest.mark.parametrize(
    "otel",
    [
        {"OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        {"OTEL_TRACES_SAMPLER": "always_on"},
    ],
)
def test_an_exporter_or_a_sampler_installs_the_sdk(otel: dict[str, str]) -> None:
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "print(isinstance(trace.get_tracer_provider(), TracerProvider))"
    )
    assert _setup_tracing_in_fresh_process(code, **otel) == "True"
