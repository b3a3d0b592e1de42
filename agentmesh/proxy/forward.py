"""Forwarding: a declared capability whose body is an HTTP call to the app on loopback.

:class:`AppCapability` is a :class:`~agentmesh.capability.Capability` to the inbound app, so a
proxied capability gets exactly what a Python one gets (mTLS, access policy, limits, deadlines,
metrics, traces, access log, readiness) from the same code. Only the three steps that touch
the function differ: input is checked against the declared JSON Schema (the app never sees a
request that does not match), the "function" is a POST to the app with what the app needs to
know (remaining budget, verified caller, trace context, call chain), and the output is checked
against the declared output schema.

The wire to the app is the sidecar's own keep-alive HTTP/1.1 client (``sidecar/http1.py``):
the hop must cost well under a millisecond (docs/benchmarks.md, S8).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import jsonschema_rs
import pydantic_core
from opentelemetry import trace
from pydantic import ValidationError

from agentmesh.capability import Capability
from agentmesh.errors import (
    AgentUnavailable,
    ConfigurationError,
    ConnectionLost,
    DeadlineExceeded,
    InvalidInput,
    InvalidOutput,
    MeshError,
    RemoteAgentError,
    error_for_status,
    error_from_problem,
)
from agentmesh.inbound.app import current_peer
from agentmesh.models import Problem
from agentmesh.proxy.manifest import AgentCapability
from agentmesh.sidecar.chain import CHAIN_HEADER, current_chain
from agentmesh.sidecar.deadline import DEADLINE_HEADER, current_deadline
from agentmesh.sidecar.http1 import ConnectFailed, ConnectionPool, Disconnected, Limits, Response
from agentmesh.validation_errors import DEFAULT_MAX_ERRORS

__all__ = ["CALLER_ID_HEADER", "CALLER_NAME_HEADER", "AppCapability", "AppClient"]

#: The caller's SPIFFE ID as the sidecar verified it from the caller's certificate. The app may
#: trust it because only the sidecar reaches the app (it listens on loopback); absent with mTLS
#: off or for a caller without a certificate (permissive mode). Never copied from a request.
CALLER_ID_HEADER = "agentmesh-caller-id"
#: The agent name of that identity (its SPIFFE path's last segment), for convenience.
CALLER_NAME_HEADER = "agentmesh-caller-name"
_EVENT_STREAM = b"text/event-stream"
#: The "arguments" of a forwarded call: the checked body itself, passed on unchanged (the
#: inbound hands parse_input's result to invoke/stream without looking inside).
_RAW = "body"
_PROBLEM = b"application/problem+json"


class AppClient:
    """Keep-alive HTTP to the app on ``host:port`` (plaintext: loopback only)."""

    def __init__(self, host: str, port: int, limits: Limits | None = None) -> None:
        """``limits``: the same bounds as the sidecar's pool to agents (connections, waits,
        reply sizes); default: the settings' defaults."""
        self.host = host
        self.port = port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.pool: ConnectionPool[None] = ConnectionPool(limits=limits)

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def head(self, method: str, path: str) -> bytes:
        """A request up to its per-call headers (built once per route)."""
        return f"{method} {path} HTTP/1.1\r\nhost: {self.authority}\r\n".encode("latin-1")

    async def request(self, data: bytes) -> Response[None]:
        """Send a whole request; app failures become the mesh errors callers already know.

        Not reached (refused, nothing listening): ``AgentUnavailable``, which callers retry
        elsewhere. Lost mid-request: ``ConnectionLost`` (it may have run).
        """
        try:
            return await self.pool.request(self.host, self.port, data)
        except ConnectFailed as exc:
            raise AgentUnavailable(f"the app at {self.url} is not reachable: {exc.reason}") from exc
        except Disconnected as exc:
            raise ConnectionLost(f"the app at {self.url}: {exc}") from exc

    def close(self) -> None:
        self.pool.close()


class AppCapability(Capability[..., Any]):
    """A declared capability served by the app at ``declared.app_path``.

    Built from a manifest entry rather than a Python function, so ``Capability.__init__`` (which
    reads a signature) is not used; everything the inbound app reads is set here.
    """

    def __init__(self, declared: AgentCapability, app: AppClient) -> None:
        self.spec = declared.spec()
        self.name = declared.name
        self.streaming = declared.streaming
        self.injected = {}
        self.declared = declared
        self._app = app
        self._input = jsonschema_rs.validator_for(declared.input)
        self._output = jsonschema_rs.validator_for(declared.output) if declared.output else None
        self._head = app.head("POST", declared.app_path) + (
            b"content-type: application/json\r\n"
            + (b"accept: text/event-stream\r\n" if declared.streaming else b"")
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(
            f"capability {self.name!r} is served by the app at {self._app.url}; call it "
            "through the mesh"
        )

    def __repr__(self) -> str:
        return f"<AppCapability {self.name!r} at {self._app.url}{self.declared.app_path}>"

    def parse_input(self, body: bytes, *, max_errors: int = DEFAULT_MAX_ERRORS) -> dict[str, Any]:
        """The body, if it is JSON that matches the declared input schema; else InvalidInput.

        The errors list has pydantic's shape (``type``, ``loc``, ``msg``), so callers handle a
        proxied capability's 422 like any other, and is bounded the same way (the first
        ``max_errors``, a count of the rest)."""
        try:
            value = pydantic_core.from_json(body or b"{}")
        except ValueError as exc:
            raise InvalidInput(
                f"invalid input for capability {self.name!r}: not JSON: {exc}",
                errors=[{"type": "json_invalid", "loc": [], "msg": str(exc)}],
            ) from exc
        if not self._input.is_valid(value):  # the common case costs one check, no iterator
            errors, total = _schema_errors(self._input, value, max_errors)
            raise InvalidInput(
                f"invalid input for capability {self.name!r}: {total} error(s): "
                + "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:3]),
                errors=errors,
            )
        return {_RAW: body or b"{}"}

    async def invoke(
        self, arguments: Mapping[str, Any], injected: Mapping[str, Any] | None = None
    ) -> Any:
        """POST the validated body to the app; return its JSON body (bytes)."""
        resp = await self._app.request(self._request(arguments[_RAW]))
        if resp.status != 200:
            raise await _app_error(resp, self._where)
        try:
            return await resp.read()
        except Disconnected as exc:
            raise ConnectionLost(f"{self._where}: {exc}") from exc

    def dump_output(self, result: Any) -> bytes:
        body: bytes = result
        self._check_output(body, "returned")
        return body

    def stream(
        self, arguments: Mapping[str, Any], injected: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[bytes, None]:
        return self._relay(arguments[_RAW])

    async def _relay(self, body: bytes) -> AsyncGenerator[bytes, None]:
        """The app's server-sent events, chunk by chunk as they arrive.

        Each event's ``data`` is one JSON chunk; an ``error`` event carries a problem document;
        the end of the response (or an ``end`` event) ends the stream. A plain JSON answer is
        one chunk."""
        resp = await self._app.request(self._request(body))
        finished = False
        try:
            if resp.status != 200:
                raise await _app_error(resp, self._where)
            if resp.content_type != _EVENT_STREAM:
                chunk = await resp.read()
                finished = True
                self._check_output(chunk, "returned")
                yield chunk
                return
            event, data = b"", []
            while True:
                try:
                    line = await resp.readline()
                except Disconnected as exc:
                    raise ConnectionLost(f"{self._where}: stream interrupted: {exc}") from exc
                if line and line not in (b"\n", b"\r\n"):
                    name, _, value = line.rstrip(b"\r\n").partition(b":")
                    value = value.removeprefix(b" ")
                    if name == b"event":
                        event = value
                    elif name == b"data":
                        data.append(value)
                    continue
                # A blank line dispatches the event; the body's end dispatches the last one.
                if data:
                    payload = b"\n".join(data)
                    if event == b"error":
                        raise _problem_error(payload, self._where)
                    if event in (b"", b"chunk", b"message"):
                        self._check_output(payload, "streamed")
                        yield payload
                if not line:
                    finished = True
                    return
                if event == b"end":
                    return
                event, data = b"", []
        finally:
            if finished:
                resp.release()
            else:
                resp.close()

    @property
    def _where(self) -> str:
        return f"capability {self.name!r} at the app {self._app.url}{self.declared.app_path}"

    def _request(self, body: bytes) -> bytes:
        parts = [self._head]
        deadline = current_deadline.get()
        if deadline is not None:
            left = int((deadline - asyncio.get_running_loop().time()) * 1000)
            if left <= 0:
                raise DeadlineExceeded(f"{self._where}: the caller's deadline passed")
            parts.append(b"%s: %d\r\n" % (_DEADLINE, left))
        peer = current_peer.get()
        if peer is not None:
            parts.append(b"%s: %s\r\n" % (_CALLER_ID, peer.spiffe_id.encode("latin-1")))
            parts.append(b"%s: %s\r\n" % (_CALLER_NAME, peer.name.encode("latin-1")))
        chain = current_chain.get()
        if chain:
            parts.append(b"%s: %s\r\n" % (_CHAIN, ",".join(chain).encode("latin-1")))
        context = trace.get_current_span().get_span_context()
        if context.is_valid:  # W3C trace context, formatted here (the generic propagator is slower)
            parts.append(
                b"traceparent: 00-%032x-%016x-%02x\r\n"
                % (context.trace_id, context.span_id, context.trace_flags)
            )
            if context.trace_state:
                state = context.trace_state.to_header().encode("latin-1")
                parts.append(b"tracestate: %s\r\n" % state)
        parts.append(b"content-length: %d\r\n\r\n" % len(body))
        parts.append(body)
        return b"".join(parts)

    def _check_output(self, body: bytes, what: str) -> None:
        try:
            value = pydantic_core.from_json(body)
        except ValueError as exc:
            raise InvalidOutput(f"{self._where} {what} something that is not JSON: {exc}") from exc
        if self._output is None or self._output.is_valid(value):
            return
        errors, total = _schema_errors(self._output, value, DEFAULT_MAX_ERRORS)
        if errors:
            raise InvalidOutput(
                f"{self._where} {what} invalid output: {total} error(s): "
                + "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:3]),
                errors=errors,
            )


_DEADLINE = DEADLINE_HEADER.encode()
_CALLER_ID = CALLER_ID_HEADER.encode()
_CALLER_NAME = CALLER_NAME_HEADER.encode()
_CHAIN = CHAIN_HEADER.encode()


def _schema_errors(
    validator: jsonschema_rs.Validator, value: Any, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` of jsonschema's errors in pydantic's shape (a missing or unexpected
    key is in ``loc``; messages cut short, as they may quote the input), one more entry counting
    the rest, and the total."""
    errors: list[dict[str, Any]] = []
    found = validator.iter_errors(value)
    for error in itertools.islice(found, limit):
        loc: list[Any] = list(error.instance_path)
        kind = error.kind
        if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
            loc.append(kind.property)
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
            loc.extend(kind.unexpected[:1])
        errors.append({"type": kind.name, "loc": loc, "msg": error.message[:200]})
    rest = sum(1 for _ in found)
    if rest:
        errors.append(
            {"type": "too_many_errors", "loc": [], "msg": f"{rest} more error(s) not listed"}
        )
    return errors, len(errors) - (1 if rest else 0) + rest


def _loc(loc: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "input"


def _problem_error(payload: bytes, where: str) -> MeshError:
    try:
        return error_from_problem(Problem.model_validate_json(payload), where=where)
    except ValidationError:
        return RemoteAgentError(f"{where}: {payload[:200].decode(errors='replace')}")


async def _app_error(resp: Response[None], where: str) -> MeshError:
    """The app's error answer as a mesh error (a problem document keeps its code)."""
    try:
        text = await resp.read()
    except Disconnected as exc:
        return ConnectionLost(f"{where}: HTTP {resp.status}, then {exc}")
    if resp.content_type == _PROBLEM:
        return _problem_error(text, where)
    snippet = text[:200].decode(errors="replace")
    if resp.status in (400, 422):
        return InvalidInput(f"{where}: the app refused the input: {snippet}")
    if resp.status == 503:  # the app refused work it has not started: another instance may
        return AgentUnavailable(f"{where}: HTTP 503: {snippet}")
    return error_for_status(resp.status, f"{where}: HTTP {resp.status}: {snippet}")
