"""Instrumenting outbound calls: spans, metrics and access logs.

Two layers. ``ObserveLayer`` is outermost: one CLIENT span per logical call (retries included) whose
context travels downstream as ``traceparent`` with every attempt, so the SERVER span of each agent
an attempt reached is its child; the caller-side golden metrics and one access-log line.
``AttemptLayer`` sits just above the transport and records each failed attempt as an event on that
span (which instance, why), so a retried call shows every attempt. Not a span per attempt: every
traced call would pay for a second span (its creation, then its export; docs/benchmarks.md) to say
what an event on the call's span says when an attempt fails and the span's own attributes say when
none does. Attribute names follow the OpenTelemetry GenAI conventions where they fit
(``gen_ai.operation.name``, ``gen_ai.tool.name``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from agentmesh.errors import CapabilityNotFound, MeshError
from agentmesh.sidecar.call import Handler, OutboundCall, Reply
from agentmesh.telemetry.access import log_call
from agentmesh.telemetry.metrics import (
    OUTBOUND_IN_FLIGHT,
    OUTBOUND_LATENCY,
    OUTBOUND_REQUESTS,
    UNKNOWN_CAPABILITY,
    labelled,
)
from agentmesh.telemetry.stats import StatsCollector
from agentmesh.telemetry.tracing import inject, trace_id_of, tracer, unsampled_child

__all__ = ["ATTEMPT_FAILED", "CALLER_HEADER", "AttemptLayer", "ObserveLayer"]

#: The calling agent's name, as it claims it: informational only. Receivers ignore it; the caller
#: is the verified identity of the TLS peer (``agentmesh.inbound.tls.caller_identity``).
CALLER_HEADER = "agentmesh-caller"
#: The name of the span event a failed attempt leaves on its call's CLIENT span.
ATTEMPT_FAILED = "attempt failed"


class ObserveLayer:
    def __init__(self, inner: Handler, *, caller: str, stats: StatsCollector | None = None) -> None:
        self._inner = inner
        self.caller = caller
        self._stats = stats.outbound if stats is not None else _no_stats
        self._in_flight = OUTBOUND_IN_FLIGHT.labels(caller)

    async def __call__(self, call: OutboundCall) -> Reply:
        started = time.perf_counter()
        span = unsampled_child() or tracer().start_span(
            f"execute_tool {call.capability}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": call.capability,
                "agentmesh.caller": self.caller,
            },
        )
        call.headers[CALLER_HEADER] = self.caller
        inject(call.headers, span)
        self._in_flight.inc()
        # attach/detach rather than trace.use_span: the same context switch without a generator
        # context manager per call (_finish records errors on the span, as use_span would).
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            reply = await self._inner(call)
        except BaseException as exc:
            self._finish(call, span, started, exc)
            raise
        finally:
            otel_context.detach(token)
        if reply.chunks is None:
            self._finish(call, span, started, None)
        else:
            reply.chunks = self._finish_after(reply.chunks, call, span, started)
        return reply

    async def _finish_after(
        self, chunks: AsyncGenerator[bytes, None], call: OutboundCall, span: Span, started: float
    ) -> AsyncGenerator[bytes, None]:
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(call, span, started, error)

    def _finish(
        self, call: OutboundCall, span: Span, started: float, error: BaseException | None
    ) -> None:
        elapsed = time.perf_counter() - started
        self._in_flight.dec()
        target = call.target
        callee = target.record.name if target is not None else "-"
        status = "ok"
        trace_id = trace_id_of(span)
        if error is not None:
            status = error.code if isinstance(error, MeshError) else type(error).__name__
            if isinstance(error, MeshError):
                error.trace_id = trace_id
        if span.is_recording():  # one locked update of the SDK span, none for unsampled calls
            attributes: dict[str, str | int] = {"agentmesh.attempts": call.attempt}
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, str(error)))
                attributes["error.type"] = status
            if target is not None:
                attributes["agentmesh.callee"] = callee
                attributes["agentmesh.callee.instance"] = target.instance_id
                attributes["agentmesh.capability.version"] = target.spec.version
            span.set_attributes(attributes)
        span.end()
        label = UNKNOWN_CAPABILITY if isinstance(error, CapabilityNotFound) else call.capability
        labelled(OUTBOUND_REQUESTS, self.caller, label, callee, status).inc()
        labelled(OUTBOUND_LATENCY, label, callee).observe(elapsed)
        self._stats(self.caller, label, callee, error is None, elapsed)
        log_call(
            "outbound",
            caller=self.caller,
            capability=call.capability,
            callee=callee,
            instance=target.instance_id if target is not None else None,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            attempts=call.attempt,
            trace_id=trace_id,
        )


def _no_stats(caller: str, capability: str, callee: str, ok: bool, elapsed: float) -> None:
    pass


class AttemptLayer:
    """A failed attempt becomes an event on the call's span (when the call is sampled)."""

    def __init__(self, inner: Handler) -> None:
        self._inner = inner

    async def __call__(self, call: OutboundCall) -> Reply:
        try:
            return await self._inner(call)
        except BaseException as exc:
            span = trace.get_current_span()
            if span.is_recording():
                attributes: dict[str, str | int] = {
                    "agentmesh.attempt": call.attempt,
                    "error.type": exc.code if isinstance(exc, MeshError) else type(exc).__name__,
                    "exception.message": str(exc),
                }
                if (target := call.target) is not None:
                    attributes["agentmesh.callee.instance"] = target.instance_id
                    attributes["server.address"] = target.url
                span.add_event(ATTEMPT_FAILED, attributes)
            raise
