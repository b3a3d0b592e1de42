"""An HTTP request for ``/v1/invoke/{capability}`` → one call through the outbound stack.

Shared by the egress port (apps in any language) and the httpx face (Python code written
against httpx): both speak the agents' own wire shape, so a request means the same thing
whichever door it comes through, and ``Mesh.call`` stays the reference for what a call is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from opentelemetry import context as otel_context

from agentmesh.errors import InvalidInput, MeshError
from agentmesh.registry.index import parse_specifier
from agentmesh.sidecar.call import Handler, OutboundCall, Reply
from agentmesh.sidecar.chain import CHAIN_HEADER, current_chain, parse_chain
from agentmesh.sidecar.deadline import DEADLINE_HEADER
from agentmesh.telemetry.tracing import TRACEPARENT, TRACESTATE, extract

__all__ = [
    "INVOKE_PREFIX",
    "TAGS_HEADER",
    "VERSION_HEADER",
    "Headers",
    "outbound_call",
    "problem_body",
    "send_call",
    "sse_events",
    "wanted_headers",
]

INVOKE_PREFIX = "/v1/invoke/"
#: A version specifier the serving instance must satisfy (``>=1.0,<2``), as ``version=``.
VERSION_HEADER = "agentmesh-version"
#: Comma-separated tags the serving capability must have, as ``tags=``.
TAGS_HEADER = "agentmesh-tags"
_FORWARDED = (DEADLINE_HEADER, "idempotency-key", VERSION_HEADER, TAGS_HEADER, "accept")
_FORWARDED_CONTEXT = (TRACEPARENT, TRACESTATE, CHAIN_HEADER)


Headers = Mapping[str, str]
"""Request headers by lower-case name (one value each)."""


def outbound_call(capability: str, body: bytes, headers: Headers) -> OutboundCall:
    """The call ``Mesh.call``/``Mesh.stream`` would make, with options read from headers.

    ``agentmesh-timeout-ms`` is the total budget (as agents receive it), as ``timeout=``;
    without it the deadline layer picks it as for any call (``sidecar/deadline.py``), never
    more than what is left of an inbound call being served. ``accept: text/event-stream``
    asks for a stream.
    """
    timeout = None
    if DEADLINE_HEADER in headers:
        try:
            timeout = max(int(headers[DEADLINE_HEADER]), 1) / 1000
        except ValueError:
            raise InvalidInput(f"header {DEADLINE_HEADER} must be an integer (ms)") from None
    version = parse_specifier(headers.get(VERSION_HEADER))
    tags = headers.get(TAGS_HEADER)
    call = OutboundCall(
        capability=capability,
        body=body or b"{}",
        timeout=timeout,
        version=version,
        tags=[t.strip() for t in tags.split(",") if t.strip()] if tags else None,
        stream="text/event-stream" in headers.get("accept", ""),
    )
    if key := headers.get("idempotency-key"):
        call.headers["idempotency-key"] = key
        call.idempotent = True
    return call


async def send_call(
    handler: Handler, capability: str, body: bytes, headers: Headers
) -> tuple[OutboundCall, Reply]:
    """Build the call and send it through ``handler`` (the outbound stack).

    The caller's trace context and call chain, when the request carries them (an app passing
    on what its sidecar sent it), are adopted for the call: the outbound span becomes a child
    of the app's inbound span and the loop guard sees the whole chain. Both are reset after,
    so nothing leaks into the caller's context (the httpx face runs in the user's task).
    """
    call = outbound_call(capability, body, headers)
    chain = headers.get(CHAIN_HEADER)
    chain_token = current_chain.set(parse_chain(chain)) if chain else None
    trace_token = None
    if parent := headers.get(TRACEPARENT):
        # An invalid traceparent starts a new trace (the empty context), never a child of
        # whatever span is current here.
        context = extract(parent, headers.get(TRACESTATE)) or otel_context.Context()
        trace_token = otel_context.attach(context)
    try:
        return call, await handler(call)
    finally:
        if trace_token is not None:
            otel_context.detach(trace_token)
        if chain_token is not None:
            current_chain.reset(chain_token)


def problem_body(error: MeshError) -> bytes:
    """The problem+json document in-process callers' errors are built from."""
    return error.to_problem().model_dump_json(exclude_none=True).encode()


async def sse_events(reply: Reply) -> AsyncGenerator[bytes, None]:
    """A reply as the agents' own server-sent events: ``chunk``s, then ``end`` or ``error``."""
    if reply.chunks is None:
        yield b"event: chunk\ndata: " + reply.body + b"\n\n"
        yield b"event: end\ndata: {}\n\n"
        return
    chunks = reply.chunks
    try:
        async for chunk in chunks:
            yield b"event: chunk\ndata: " + chunk + b"\n\n"
    except MeshError as exc:
        yield b"event: error\ndata: " + problem_body(exc) + b"\n\n"
        return
    finally:
        # A reader that stops early (the app hung up) frees the upstream connection now, not
        # whenever the garbage collector finalizes the generator.
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    yield b"event: end\ndata: {}\n\n"


def wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers a call reads, from an ASGI header list."""
    out: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name in _FORWARDED or name in _FORWARDED_CONTEXT:
            out[name] = value.decode("latin-1")
    return out
