"""Tracing: the library speaks the OpenTelemetry API; our runtime wires the SDK.

Spans are created through the API tracer, so embedding applications that configure their own
OpenTelemetry SDK get our spans in their traces, and applications that do not pay almost
nothing. ``agentmesh run``/``control``/``demo`` call :func:`setup_tracing`, which installs the SDK
with a ``BatchSpanProcessor`` (never the simple one: export must stay off the request path),
honouring the standard variables (with neither an exporter nor a sampler set, a provider that
only makes ids, see :func:`setup_tracing`):

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over HTTP; ``pip install agentmesh[otlp]``),
  ``console``, or ``none``. Unset: ``otlp`` if ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces
  variant) is set, else ``none``.
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: as the SDK defines them. Unset:
  ``parentbased_traceidratio`` at 10%, so tracing costs little by default and a caller's
  sampling decision is kept across every hop.
- ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``.

Trace ids exist for every call (sampled or not), so access logs and error bodies always name one.
"""

from __future__ import annotations

import logging
import os
import random
import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    TraceState,
)
from opentelemetry.util.types import Attributes

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "extract",
    "inject",
    "setup_tracing",
    "trace_id_of",
    "tracer",
    "unsampled_child",
]

_log = logging.getLogger("agentmesh.telemetry")
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACEPARENT_FORMAT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*"
)
_MAX_TRACEPARENT = 512
_MAX_TRACESTATE = 8192
"""Longer ``traceparent`` and ``tracestate`` values are ignored (the SDK propagator's limits)."""
_DEFAULT_RATIO = 0.1


#: Created once: ``get_tracer`` is slow (it touches the global warnings filters). The API's
#: proxy tracer follows a provider installed later, so creating it at import is safe.
_TRACER = trace.get_tracer("agentmesh")


def tracer() -> Tracer:
    """The agentmesh tracer of whatever provider is installed (a no-op one if none)."""
    return _TRACER


_parent_decides = False
"""True once :func:`setup_tracing` installed a parent-based sampler with the SDK's default rules,
under which a child of an unsampled span is never sampled: :func:`unsampled_child` may then skip
the SDK (sampler, span object, attribute copies) for the ~90 % of calls a 10 % ratio leaves out."""


def unsampled_child(parent: Context | None = None) -> Span | None:
    """A non-recording child of ``parent`` (default: the current span) if the installed sampler
    would certainly drop it, else None (start a real span). The child keeps the trace id and the
    not-sampled flag and has its own span id, exactly what the SDK would create."""
    if not _parent_decides:
        return None
    ctx = trace.get_current_span(parent).get_span_context()
    if not ctx.is_valid or ctx.trace_flags.sampled:
        return None
    return NonRecordingSpan(
        SpanContext(
            ctx.trace_id,
            random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=ctx.trace_flags,
            trace_state=ctx.trace_state,
        )
    )


def inject(headers: dict[str, str], span: Span) -> None:
    """Put ``span``'s context into outgoing headers (W3C ``traceparent``, and ``tracestate`` if
    any), as the SDK's ``TraceContextTextMapPropagator`` writes them, without its generic
    carrier and context machinery: this runs on every traced call."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return
    headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        headers[TRACESTATE] = ctx.trace_state.to_header()


def extract(traceparent: str, tracestate: str | None = None) -> Context | None:
    """The caller's span as a parent context, from W3C trace-context header values; None when
    ``traceparent`` is not a valid one (a new trace starts).

    Read with the rules of the SDK's ``TraceContextTextMapPropagator`` (lower-case hex, no zero
    ids, version ``ff`` refused, nothing after the flags in version ``00``, the length limits),
    without its carrier and getter machinery: this runs on every traced call an agent serves
    (docs/benchmarks.md)."""
    if len(traceparent) > _MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT_FORMAT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    state = None
    if tracestate is not None and len(tracestate) <= _MAX_TRACESTATE:
        state = TraceState.from_header([tracestate])
    parent = SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def trace_id_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def setup_tracing(service_name: str) -> None:
    """Install the tracer provider for this process (idempotent; first call wins).

    With no exporter and no sampler configured (the default), nothing would ever be recorded:
    the SDK would build 10 % of the spans only to drop them. :class:`_IdsOnlyProvider` stands in
    then, and the SDK is not even imported (~10 ms of CPU off an agent's start, goal S7;
    docs/benchmarks.md).
    """
    global _parent_decides
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # installed already: by an earlier call, or by the application embedding us
    configured = os.environ.get("OTEL_TRACES_SAMPLER")
    exporters = _exporters()
    if configured is None and not exporters:
        trace.set_tracer_provider(_IdsOnlyProvider())
        _parent_decides = True  # its rules are the default sampler's
        return

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import (
        ParentBased,
        Sampler,
        TraceIdRatioBased,
    )

    sampler: Sampler | None = None
    if configured is None:
        sampler = ParentBased(TraceIdRatioBased(_DEFAULT_RATIO))
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource, sampler=sampler)
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                _log.warning(
                    "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: "
                    "pip install 'agentmesh[otlp]'; traces are not exported"
                )
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            _log.warning("unknown OTEL_TRACES_EXPORTER %r; traces are not exported", name)
    trace.set_tracer_provider(provider)
    # The SDK builds every ``parentbased_*`` sampler with its default rules for unsampled parents.
    _parent_decides = isinstance(provider.sampler, ParentBased) and (
        configured is None or configured.startswith("parentbased_")
    )


def _exporters() -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (``none`` left out); unset: ``otlp`` if an
    OTLP endpoint is set, else none."""
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    return [n for n in (n.strip() for n in names.split(",")) if n not in ("none", "")]


_SAMPLED_BELOW = round(_DEFAULT_RATIO * 2**64)
"""A new trace is sampled when the low 64 bits of its id are below this (the SDK's
``TraceIdRatioBased`` rule at the default ratio)."""


def _root_sampled(trace_id: int) -> bool:
    """Whether the default sampler samples a new trace with this id."""
    return trace_id & (2**64 - 1) < _SAMPLED_BELOW


class _IdsOnlyTracer(trace.NoOpTracer):
    """Spans that record nothing but carry the ids and sampled flag the SDK's default sampler
    (``parentbased_traceidratio`` at 10 %) would give them: a parent's trace id, state and
    decision, or a new trace sampled by its id. So access logs, error bodies and ``tap`` name a
    trace, and agents downstream that do export keep the decision."""

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: object = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id, sampled, state = (
                parent.trace_id,
                parent.trace_flags.sampled,
                parent.trace_state,
            )
        else:
            trace_id = random.getrandbits(128) or 1
            sampled, state = _root_sampled(trace_id), None
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        span_id = random.getrandbits(64) or 1
        return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))


class _IdsOnlyProvider(trace.NoOpTracerProvider):
    """The provider of :class:`_IdsOnlyTracer`."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Tracer:
        return _IdsOnlyTracer()
