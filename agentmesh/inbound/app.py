"""The inbound side: a plain ASGI app that serves an agent's capabilities and probes.

Raw ASGI rather than a framework: this is on every call's path, and five fixed routes need no
router. Errors leave as ``application/problem+json`` (RFC 9457) with a stable ``code``.
Inbound mesh features (identity, authorization, rate limits, fault injection) wrap ``invoke``
as they land.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from packaging.version import Version
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agentmesh.capability import Capability
from agentmesh.errors import (
    AgentUnavailable,
    AuthenticationFailed,
    CapabilityNotFound,
    DeadlineExceeded,
    InvalidInput,
    LoopDetected,
    MeshError,
    RateLimited,
    RemoteAgentError,
    RouteNotFound,
)
from agentmesh.inbound.body import Disconnected, read_body
from agentmesh.inbound.tls import caller_identity
from agentmesh.models import AGENT_NAME_PATTERN
from agentmesh.policy.access import Subject, VerifiedIdentity
from agentmesh.security.identity import Caller
from agentmesh.sidecar.chain import CHAIN_HEADER, current_chain, parse_chain
from agentmesh.sidecar.deadline import DEADLINE_HEADER, bound, current_deadline, from_header
from agentmesh.sidecar.sidecar import Sidecar, serving_sidecar
from agentmesh.telemetry.access import log_call
from agentmesh.telemetry.metrics import (
    INBOUND_IN_FLIGHT,
    INBOUND_LATENCY,
    INBOUND_REQUESTS,
    UNKNOWN_CAPABILITY,
    labelled,
)
from agentmesh.telemetry.stats import StatsCollector
from agentmesh.telemetry.tracing import (
    TRACEPARENT,
    extract,
    trace_id_of,
    tracer,
    unsampled_child,
)
from agentmesh.validation_errors import DEFAULT_MAX_ERRORS

__all__ = ["InboundApp", "current_peer"]

_log = logging.getLogger("agentmesh.agent")
_AGENT_NAME = re.compile(AGENT_NAME_PATTERN)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_INVOKE = "/v1/invoke/"
_JSON = b"application/json"
_PROBLEM = b"application/problem+json"
_DEADLINE = DEADLINE_HEADER.encode()
_CHAIN = CHAIN_HEADER.encode()
_TRACEPARENT = TRACEPARENT.encode()
#: The verified caller of the inbound call being served (None: no mesh certificate). A
#: capability that forwards the call elsewhere (the standalone sidecar's) passes it on.
current_peer: ContextVar[Caller | None] = ContextVar("agentmesh_peer", default=None)
#: Errors a capability body may raise that describe this very call: they keep their status.
#: ``AgentUnavailable`` and ``RateLimited`` let a capability refuse work it has not started
#: (no capacity, an upstream quota), which callers may then retry elsewhere.
_PASS_THROUGH = (
    InvalidInput,
    DeadlineExceeded,
    LoopDetected,
    RemoteAgentError,
    AgentUnavailable,
    RateLimited,
)


class InboundApp:
    """ASGI app: ``POST /v1/invoke/{capability}`` plus health, readiness, metrics, agent card."""

    def __init__(
        self,
        agent: str,
        capabilities: Mapping[str, Capability[..., Any]],
        *,
        max_body: int,
        max_errors: int = DEFAULT_MAX_ERRORS,
        card: Callable[[], bytes],
        injectables: Callable[[], Mapping[type, Any]],
        sidecar: Sidecar | None = None,
        stats: StatsCollector | None = None,
        identify: Callable[[Scope], VerifiedIdentity | None] | None = None,
    ) -> None:
        self.agent = agent
        self.capabilities = dict(capabilities)
        #: Authorization (docs/policies.md): the caller's verified identity (``identify``, from
        #: the mTLS session); with mTLS off, the name it claims in ``agentmesh-caller``.
        self._identify = identify
        self._policies = sidecar.policies if sidecar is not None else None
        self._claims_count = sidecar is None or not sidecar.identity.enabled
        self._subjects = {
            n: Subject(n, Version(c.spec.version), c.spec.tags) for n, c in capabilities.items()
        }
        self._stats = _no_stats if stats is None else stats.inbound_recorder(agent, capabilities)
        self.max_body = max_body
        #: Validation errors listed in a 422 (AGENTMESH_MAX_ERROR_ITEMS; the rest are counted).
        self.max_errors = max_errors
        self._card = card
        self._injectables = injectables
        self._sidecar = sidecar
        #: mTLS (docs/security.md): callers are who their certificate says, checked per request
        #: against the revocation list; in strict mode a caller without one may not invoke.
        self._identity = sidecar.identity if sidecar is not None else None
        mtls = self._identity.mode if self._identity is not None else "off"
        me = self._identity.id if self._identity is not None else None
        self._strict = mtls == "strict"
        self._health = json.dumps(
            {"status": "ok", "mtls": mtls, "identity": str(me) if me else None}
        ).encode()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._in_flight_gauge = INBOUND_IN_FLIGHT.labels(agent)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith(_INVOKE) and method == "POST":
            await self._invoke(path[len(_INVOKE) :], scope, receive, send)
        elif method not in ("GET", "HEAD"):
            await _problem(
                send, RouteNotFound(f"{method} {path}: not a route of agent {self.agent}")
            )
        elif path == "/healthz":
            await _respond(send, 200, self._health)
        elif path == "/readyz":
            ok = self.ready and not self.draining
            state = b"ready" if ok else (b"draining" if self.draining else b"unready")
            await _respond(send, 200 if ok else 503, b'{"status":"' + state + b'"}')
        elif path == "/metrics":
            await _respond(send, 200, generate_latest(), CONTENT_TYPE_LATEST.encode())
        elif path == "/.well-known/agent-card.json":
            await _respond(send, 200, self._card())
        else:
            await _problem(send, RouteNotFound(f"{path}: not a route of agent {self.agent}"))

    async def _invoke(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        cap = self.capabilities.get(name)
        label = name if cap is not None else UNKNOWN_CAPABILITY
        status = 500
        meta = _MeshHeaders(scope, name)
        parent = extract(meta.traceparent) if meta.traceparent else None
        span = unsampled_child(parent) or tracer().start_span(
            f"execute_tool {name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "agentmesh.agent": self.agent,
                "agentmesh.caller": meta.caller,
            },
        )
        trace_id = trace_id_of(span)
        body = out = None
        self.in_flight += 1
        self.idle.clear()
        self._in_flight_gauge.inc()
        # attach/detach rather than trace.use_span: the same context switch without a generator
        # context manager per call (errors are recorded on the span below, as use_span would).
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            self._authenticate(meta.peer)
            if cap is None:
                raise CapabilityNotFound(f"agent {self.agent} has no capability {name!r}")
            if self._policies is not None and not self._policies.open:
                self._authorize(name, scope, meta)
            if self.draining or not self.ready:
                state = "draining" if self.draining else "not ready"
                raise AgentUnavailable(f"agent {self.agent} is {state}; call another instance")
            # The caller's deadline, or the capability's own timeout if that ends first (also
            # when the caller sent none: a plain HTTP client cannot make it run for ever).
            now = asyncio.get_running_loop().time()
            callers = from_header(meta.timeout_ms, now) if meta.timeout_ms is not None else None
            deadline = bound(now, cap.spec.timeout, callers)
            own = cap.spec.timeout if deadline is not None and deadline != callers else None
            body = await read_body(
                scope, receive, self.max_body, who=f"agent {self.agent}", owner="the agent"
            )
            arguments = cap.parse_input(body, max_errors=self.max_errors)
            injected = _inject(cap, self._injectables)
            serving_sidecar.set(self._sidecar)
            current_chain.set(meta.chain)
            current_peer.set(meta.peer)
            if deadline is not None:
                current_deadline.set(deadline)
            if cap.streaming:
                status = await _stream(
                    cap, arguments, injected, _Budget(deadline, own), receive, send, trace_id
                )
            else:
                result = await _run(cap, arguments, injected, _Budget(deadline, own))
                out = cap.dump_output(result)
                await _respond(send, 200, out)
                status = 200
        except Disconnected:
            status = 499
        except MeshError as exc:
            status = exc.status
            exc.trace_id = trace_id
            span.set_status(Status(StatusCode.ERROR, exc.message))
            span.set_attribute("error.type", exc.code)
            await _problem(send, exc)
        finally:
            otel_context.detach(token)
            elapsed = time.perf_counter() - started
            span.set_attribute("http.response.status_code", status)
            span.end()
            self.in_flight -= 1
            self._in_flight_gauge.dec()
            if self.in_flight == 0:
                self.idle.set()
            labelled(INBOUND_REQUESTS, self.agent, meta.caller, label, str(status)).inc()
            labelled(INBOUND_LATENCY, self.agent, label).observe(elapsed)
            self._stats(self.agent, label, status, elapsed, meta.caller, trace_id, body, out)
            log_call(
                "inbound",
                agent=self.agent,
                caller=meta.caller,
                capability=name,
                status=status,
                duration_ms=round(elapsed * 1000, 3),
                trace_id=trace_id,
            )

    def _authenticate(self, peer: Caller | None) -> None:
        """Refuse callers without a live mesh identity (per request: a set lookup)."""
        identity = self._identity
        if identity is None:
            return
        if peer is None:
            if self._strict:
                raise AuthenticationFailed(
                    f"agent {self.agent} requires a mesh client certificate (mTLS strict); "
                    "the caller presented none"
                )
            return
        if peer.serial in identity.revoked:
            raise AuthenticationFailed(
                f"agent {self.agent} refuses {peer.spiffe_id}: its certificate {peer.serial:x} "
                "is revoked"
            )
        if peer.not_after < time.time():
            raise AuthenticationFailed(
                f"agent {self.agent} refuses {peer.spiffe_id}: its certificate has expired"
            )

    def _authorize(self, name: str, scope: Scope, meta: _MeshHeaders) -> None:
        """The authoritative access decision, before the capability or its input is touched."""
        policies = self._policies
        assert policies is not None
        verified = self._identify(scope) if self._identify is not None else None
        if verified is not None:
            caller = policies.verified(verified.spiffe_id)
        elif self._claims_count:
            # mTLS is off: the name the caller claims in agentmesh-caller is all there is.
            claimed = meta.caller if _AGENT_NAME.match(meta.caller) else None
            caller = policies.caller(claimed)
        else:
            caller = policies.caller(None)  # mTLS is on: a header claim counts for nothing
        subject = self._subjects[name]
        decision = policies.authorize(caller, subject)
        if not decision.allowed:
            raise decision.error(caller, subject)


def _no_stats(*args: object) -> None:
    pass


class _Budget(NamedTuple):
    """When a capability's work must stop, and its own timeout if that (not the caller's
    deadline) is what stops it: the error then says which one did."""

    deadline: float | None
    own_timeout: float | None


async def _run(
    cap: Capability[..., Any],
    arguments: dict[str, Any],
    injected: Mapping[str, Any] | None,
    budget: _Budget,
) -> Any:
    try:
        async with asyncio.timeout_at(budget.deadline):
            return await cap.invoke(arguments, injected)
    except Exception as exc:
        raise _as_mesh_error(cap, exc, budget) from exc


async def _stream(
    cap: Capability[..., Any],
    arguments: dict[str, Any],
    injected: Mapping[str, Any] | None,
    budget: _Budget,
    receive: Receive,
    send: Send,
    trace_id: str | None,
) -> int:
    """Send the capability's chunks as server-sent events; return the status to log.

    The generator stops (is closed, which runs its ``finally`` blocks) when the budget passes
    and when the caller goes away: a server keeps accepting ``send`` after a disconnect, so
    only ``receive`` tells, and a watcher task waits on it for the whole stream.
    """
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    task = asyncio.current_task()
    assert task is not None
    watcher = _DisconnectWatcher(receive, task)
    try:
        async with contextlib.aclosing(cap.stream(arguments, injected)) as chunks:
            async with asyncio.timeout_at(budget.deadline):
                async for chunk in chunks:
                    await send(_event(b"chunk", chunk, more=True))
        watcher.finished = True
        await send(_event(b"end", b"{}", more=False))
    except asyncio.CancelledError:
        if not watcher.fired:
            raise
        task.uncancel()
        return 499
    except Exception as exc:
        watcher.finished = True
        error = _as_mesh_error(cap, exc, budget)
        error.trace_id = trace_id
        await send(_event(b"error", error.to_problem().model_dump_json().encode(), more=False))
        return error.status
    finally:
        watcher.stop()
    return 200


class _DisconnectWatcher:
    """Cancel ``task`` when the caller disconnects, unless the stream already finished."""

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.finished = False
        """Set before the last event is sent: a server reports the end of a response as a
        disconnect too, which must not cancel the task."""
        self.fired = False
        self._receive = receive
        self._task = task
        self._watch = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.finished:
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._watch.cancel()


def _as_mesh_error(cap: Capability[..., Any], exc: Exception, budget: _Budget) -> MeshError:
    if isinstance(exc, TimeoutError) and budget.deadline is not None:
        if budget.own_timeout is not None:
            return DeadlineExceeded(
                f"capability {cap.name!r} did not finish within its timeout of "
                f"{budget.own_timeout:g}s; the work was cancelled"
            )
        return DeadlineExceeded(
            f"capability {cap.name!r}: the caller's deadline passed; the work was cancelled"
        )
    if isinstance(exc, _PASS_THROUGH):
        return exc
    _log.warning("capability %r raised %s", cap.name, type(exc).__name__, exc_info=exc)
    return RemoteAgentError(f"capability {cap.name!r} raised {type(exc).__name__}: {exc}")


def _inject(
    cap: Capability[..., Any], injectables: Callable[[], Mapping[type, Any]]
) -> Mapping[str, Any] | None:
    if not cap.injected:
        return None
    available = injectables()
    return {param: available[kind] for param, kind in cap.injected.items()}


class _MeshHeaders:
    """The mesh's request headers, read in one pass over the header list."""

    __slots__ = ("caller", "chain", "peer", "timeout_ms", "traceparent")

    def __init__(self, scope: Scope, capability: str) -> None:
        self.timeout_ms: bytes | None = None
        self.chain: tuple[str, ...] = (capability,)
        #: The caller from this hop's TLS session, never from a header (``agentmesh-caller`` and
        #: the like are ignored): metrics, logs and policy all see the verified identity.
        self.peer = caller_identity(scope)
        self.caller = self.peer.label if self.peer is not None else "-"
        self.traceparent: str | None = None
        for key, value in scope["headers"]:
            if key == _DEADLINE:
                self.timeout_ms = value
            elif key == _TRACEPARENT:
                self.traceparent = value.decode("latin-1")
            elif key == _CHAIN:
                self.chain = parse_chain(value.decode("latin-1"))


def _event(name: bytes, data: bytes, *, more: bool) -> Message:
    return {
        "type": "http.response.body",
        "body": b"event: " + name + b"\ndata: " + data + b"\n\n",
        "more_body": more,
    }


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _problem(send: Send, error: MeshError) -> None:
    await _respond(
        send, error.status, error.to_problem().model_dump_json(exclude_none=True).encode(), _PROBLEM
    )
