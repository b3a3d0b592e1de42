"""Transport: put one attempt on the wire to the chosen endpoint, over HTTP(S).

The wire is :mod:`agentmesh.sidecar.http1` (keep-alive HTTP/1.1 on asyncio, parsed by
httptools): a request is prebuilt per (endpoint, capability) up to its per-call headers, so a call
costs one ``bytes.join`` and one write. This is the only layer that knows HTTP; foreign errors
become mesh errors here, split by whether the request can have reached the agent
(``ConnectionFailed``: it cannot, safe to retry; ``ConnectionLost``: it may have run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import ValidationError

from agentmesh.errors import (
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    IdentityMismatch,
    InvalidInput,
    MeshError,
    PayloadTooLarge,
    UntrustedPeer,
    error_for_status,
    error_from_problem,
)
from agentmesh.models import Problem
from agentmesh.registry.index import Target
from agentmesh.security.identity import Caller, SpiffeId
from agentmesh.security.outbound import PeerVerifier
from agentmesh.security.workload import WorkloadIdentity
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.deadline import DEADLINE_HEADER, chunk_deadline, header_ms
from agentmesh.sidecar.http1 import (
    ConnectFailed,
    ConnectionPool,
    Disconnected,
    Limits,
    Response,
    TooLarge,
)

__all__ = ["HttpTransport"]

_log = logging.getLogger("agentmesh.sidecar")
_DEADLINE = DEADLINE_HEADER.encode() + b": %d\r\n"
_ACCEPT_EVENTS = b"accept: text/event-stream\r\n"
_LENGTH = b"content-length: %d\r\n\r\n"
_EVENT_STREAM = b"text/event-stream"


@dataclass(frozen=True, slots=True)
class _Route:
    """Where an (endpoint, capability) pair goes, and its request up to the per-call headers."""

    host: str
    port: int
    https: bool
    head: bytes


class HttpTransport:
    """Keep-alive HTTP client for every endpoint this sidecar talks to."""

    def __init__(
        self, identity: WorkloadIdentity | None = None, *, limits: Limits | None = None
    ) -> None:
        """``identity``: call ``https://`` agents with mutual TLS as this identity (unless its
        mode is ``off``: then ``https://`` endpoints are called in plaintext, which only
        ``permissive`` agents accept). ``limits``: the connection pool's bounds (default: the
        settings' defaults)."""
        self._routes: dict[tuple[str, str], _Route] = {}
        self._tls = identity if identity is not None and identity.enabled else None
        self._verifier = PeerVerifier(self._tls) if self._tls is not None else None
        self.pool: ConnectionPool[Caller] = ConnectionPool(limits=limits, verify=self._verifier)
        self._names: dict[tuple[str, str, str | None], str] = {}
        if self._tls is not None:
            self._tls.on_revoked(self._drop_revoked)

    def _drop_revoked(self, revoked: frozenset[int]) -> None:
        closed = self.pool.close_where(lambda peer: peer is not None and peer.serial in revoked)
        if closed:
            _log.warning("closed %d connection(s) to agents whose certificate was revoked", closed)

    async def close(self) -> None:
        self.pool.close()

    def _route(self, base: str, capability: str) -> _Route:
        key = (base, capability)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) > 4096:
                self._routes.clear()
            url = urlsplit(base)
            https = url.scheme == "https" and self._tls is not None  # mTLS off: plaintext
            host = url.hostname or "127.0.0.1"
            port = url.port or (443 if url.scheme == "https" else 80)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = (
                f"POST {url.path.rstrip('/')}/v1/invoke/{capability} HTTP/1.1\r\n"
                f"host: {authority}\r\ncontent-type: application/json\r\n"
            ).encode("latin-1")
            route = self._routes[key] = _Route(host, port, https, head)
        return route

    def _server_name(self, target: Target) -> str:
        """The TLS server name of a call to ``target``: whom the connection must reach.

        Cached per (trust domain, agent name, claimed identity): the check is per record, not
        per call."""
        tls = self._tls
        assert tls is not None
        assert self._verifier is not None
        record = target.record
        key = (tls.trust_domain, record.name, record.identity)
        sni = self._names.get(key)
        if sni is None:
            expected = SpiffeId.agent(tls.trust_domain, record.name)
            if record.identity is not None and record.identity != expected.uri:
                raise IdentityMismatch(
                    f"{_where(target)}: its record claims the identity {record.identity}, but "
                    f"agent {record.name!r} is {expected}; refusing to call it"
                )
            if len(self._names) > 4096:
                self._names.clear()
            sni = self._names[key] = self._verifier.expect(expected)
        return sni

    async def __call__(self, call: OutboundCall) -> Reply:
        target = call.target
        assert target is not None, "the balance layer sets call.target"
        route = self._route(target.url, call.capability)
        now = asyncio.get_running_loop().time()
        parts = [route.head, _DEADLINE % header_ms(call.deadline, now)]
        if call.stream:
            parts.append(_ACCEPT_EVENTS)
        for name, value in call.headers.items():
            parts.append(_header(name, value, call.capability))
        parts.append(_LENGTH % len(call.body))
        parts.append(call.body)
        context = server_name = None
        if route.https:
            assert self._tls is not None
            server_name = self._server_name(target)
            context = self._tls.client_context()
        elif self._tls is not None and self._tls.mode == "strict":
            raise UntrustedPeer(
                f"{_where(target)}: a plaintext endpoint cannot prove it is agent "
                f"{target.record.name!r}; this sidecar runs mTLS strict "
                "(AGENTMESH_MTLS=permissive calls plaintext agents too)"
            )
        try:
            resp = await self.pool.request(
                route.host,
                route.port,
                b"".join(parts),
                ssl_context=context,
                server_hostname=server_name,
            )
        except ConnectFailed as exc:
            if exc.certificate:
                raise UntrustedPeer(
                    f"{_where(target)}: its certificate failed verification: {exc.reason}"
                ) from exc
            raise ConnectionFailed(f"{_where(target)}: {exc.reason}") from exc
        except Disconnected as exc:
            raise ConnectionLost(f"{_where(target)}: {exc}") from exc
        except MeshError as exc:  # the peer check refused the connection: nothing was sent
            raise type(exc)(f"{_where(target)}: {exc.message}") from exc

        if resp.status != 200:
            raise await _error(resp, _where(target))
        if resp.content_type == _EVENT_STREAM:
            return Reply(target, chunks=_events(resp, call, _where(target)))
        try:
            body = await resp.read()
        except TooLarge as exc:
            raise PayloadTooLarge(f"{_where(target)}: {exc}") from exc
        except Disconnected as exc:
            raise ConnectionLost(f"{_where(target)}: {exc}") from exc
        return Reply(target, body=body)


def _where(target: Target) -> str:
    """How errors name the endpoint (built only when one is raised)."""
    return f"agent {target.instance_id} at {target.url}"


def _header(name: str, value: str, capability: str) -> bytes:
    if "\r" in value or "\n" in value:
        raise InvalidInput(f"call to {capability!r}: header {name} may not contain line breaks")
    try:
        return f"{name}: {value}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"call to {capability!r}: header {name} must be latin-1 text, got {value!r}"
        ) from None


async def _error(resp: Response[Caller], where: str) -> MeshError:
    try:
        text = await resp.read()
    except Disconnected as exc:
        return ConnectionLost(f"{where}: HTTP {resp.status}, then {exc}")
    try:
        problem = Problem.model_validate_json(text)
    except ValidationError:
        snippet = text[:200].decode(errors="replace")
        error = error_for_status(resp.status, f"{where}: HTTP {resp.status}: {snippet}")
    else:
        error = error_from_problem(problem, where=where)
    if error.retry_after is None and (retry_after := resp.header(b"retry-after")):
        try:
            error.retry_after = float(retry_after)
        except ValueError:
            error.retry_after = None
    return error


async def _events(
    resp: Response[Caller], call: OutboundCall, where: str
) -> AsyncGenerator[bytes, None]:
    """Server-sent events → JSON chunks; ``error`` events raise, ``end`` finishes."""
    finished = False
    loop = asyncio.get_running_loop()
    chunks = 0
    limit, gap = chunk_deadline(call, chunks, loop.time())
    try:
        event, data = b"", []
        while True:
            try:
                async with asyncio.timeout_at(limit):
                    line = await resp.readline()
            except TimeoutError as exc:
                if gap is None:
                    what = f"stream not finished within {call.timeout:g}s"
                else:
                    what = f"no chunk within {gap:g}s" + (" of the last" if chunks else "")
                raise DeadlineExceeded(
                    f"capability {call.capability!r} at {where}: {what}"
                ) from exc
            except TooLarge as exc:
                raise PayloadTooLarge(f"{where}: {exc}") from exc
            except Disconnected as exc:
                raise ConnectionLost(f"{where}: stream interrupted: {exc}") from exc
            if not line:
                raise ConnectionLost(f"{where}: stream ended before its end event")
            line = line.rstrip(b"\r\n")
            if line:
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                if name == b"event":
                    event = value
                elif name == b"data":
                    data.append(value)
                continue
            payload = b"\n".join(data)
            if event == b"chunk":
                chunks += 1
                yield payload
                limit, gap = chunk_deadline(call, chunks, loop.time())
            elif event == b"error":
                raise error_from_problem(Problem.model_validate_json(payload), where=where)
            elif event == b"end":
                finished = True
                return
            event, data = b"", []
    finally:
        if finished:
            resp.release()
        else:
            resp.close()
