"""Transport: put one attempt on the wire to the chosen endpoint, over HTTP(S).

aiohttp rather than httpx's default transport on the hot path: httpcore's pool collapses under
concurrency (DESIGN §7: ~500 calls/s at 16 in flight against ~6,600 for aiohttp on the same
server). This is the only layer that knows HTTP; foreign errors become mesh errors here, split by
whether the request can have reached the agent (``ConnectionFailed``: it cannot, safe to retry;
``ConnectionLost``: it may have run).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import ValidationError

from agentmesh.errors import (
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    IdentityMismatch,
    MeshError,
    UntrustedPeer,
    error_for_status,
    error_from_problem,
)
from agentmesh.models import AgentRecord, Problem
from agentmesh.security.identity import SpiffeId
from agentmesh.security.outbound import MeshConnector, PeerRefused
from agentmesh.security.workload import WorkloadIdentity
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.deadline import DEADLINE_HEADER

__all__ = ["HttpTransport"]

_JSON = "application/json"
_log = logging.getLogger("agentmesh.sidecar")


class HttpTransport:
    """Keep-alive HTTP client for every endpoint this sidecar talks to."""

    def __init__(self, identity: WorkloadIdentity | None = None) -> None:
        """``identity``: call ``https://`` agents with mutual TLS as this identity (unless its
        mode is ``off``: then ``https://`` endpoints are called in plaintext, which only
        ``permissive`` agents accept)."""
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], str] = {}
        self._tls = identity if identity is not None and identity.enabled else None
        self._connector: MeshConnector | None = None
        self._expected: dict[str, SpiffeId] = {}
        if self._tls is not None:
            self._tls.on_revoked(self._drop_revoked)

    def _drop_revoked(self, revoked: frozenset[int]) -> None:
        if self._connector is not None and (closed := self._connector.drop_revoked(revoked)):
            _log.warning("closed %d connection(s) to agents whose certificate was revoked", closed)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            options: dict[str, Any] = {"limit": 0, "limit_per_host": 0, "keepalive_timeout": 30}
            connector: aiohttp.TCPConnector
            if self._tls is not None:
                connector = self._connector = MeshConnector(self._tls, **options)
            else:
                connector = aiohttp.TCPConnector(**options)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, base: str, capability: str) -> str:
        key = (base, capability)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            if self._tls is None and base.startswith("https://"):
                base = "http://" + base.removeprefix("https://")  # mTLS off: plaintext
            url = self._urls[key] = f"{base}/v1/invoke/{capability}"
        return url

    def _peer(self, record: AgentRecord, where: str) -> dict[str, Any]:
        """TLS options of a call to ``record``: our context, and whom we must reach."""
        tls = self._tls
        if not record.endpoint.startswith("https://"):
            if tls is not None and tls.mode == "strict":
                raise UntrustedPeer(
                    f"{where}: a plaintext endpoint cannot prove it is agent {record.name!r}; "
                    "this sidecar runs mTLS strict (AGENTMESH_MTLS=permissive calls plaintext "
                    "agents too)"
                )
            return {}
        if tls is None:
            return {}
        expected = self._expected.get(record.name)
        if expected is None or expected.trust_domain != tls.trust_domain:
            expected = self._expected[record.name] = SpiffeId.agent(tls.trust_domain, record.name)
        if record.identity is not None and record.identity != expected.uri:
            raise IdentityMismatch(
                f"{where}: its record claims the identity {record.identity}, but agent "
                f"{record.name!r} is {expected}; refusing to call it"
            )
        self._client()
        assert self._connector is not None
        return {"ssl": tls.client_context(), "server_hostname": self._connector.expect(expected)}

    async def __call__(self, call: OutboundCall) -> Reply:
        target = call.target
        assert target is not None, "the balance layer sets call.target"
        where = f"agent {target.instance_id} at {target.url}"
        remaining_ms = int((call.deadline - asyncio.get_running_loop().time()) * 1000)
        headers = {"content-type": _JSON, DEADLINE_HEADER: str(max(remaining_ms, 1))}
        if call.stream:
            headers["accept"] = "text/event-stream"
        if call.headers:
            headers.update(call.headers)
        tls = self._peer(target.record, where)
        try:
            resp = await self._client().post(
                self._url(target.url, call.capability), data=call.body, headers=headers, **tls
            )
        except PeerRefused as exc:
            raise type(exc.error)(f"{where}: {exc.error.message}") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
            raise UntrustedPeer(f"{where}: its certificate failed verification: {reason}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionFailed(f"{where}: {_reason(exc)}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"{where}: {_reason(exc)}") from exc

        if resp.status != 200:
            try:
                raise await _error(resp, where)
            finally:
                resp.release()
        if resp.content_type == "text/event-stream":
            return Reply(target, chunks=_events(resp, call, where))
        try:
            body = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"{where}: {_reason(exc)}") from exc
        return Reply(target, body=body)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake failed: {getattr(exc.os_error, 'reason', None) or exc.os_error}"
    if (
        isinstance(exc, aiohttp.ClientConnectorError)
        and isinstance(exc.ssl, ssl.SSLContext)
        and not isinstance(exc.os_error, ConnectionRefusedError)
    ):
        return (
            "TLS handshake failed: the agent closed the connection (it refused this sidecar's "
            "certificate or has no mesh identity in our trust domain; its log says why)"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection refused ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the agent before it replied"
    return str(exc) or type(exc).__name__


async def _error(resp: aiohttp.ClientResponse, where: str) -> MeshError:
    text = await resp.read()
    try:
        problem = Problem.model_validate_json(text)
    except ValidationError:
        snippet = text[:200].decode(errors="replace")
        error = error_for_status(resp.status, f"{where}: HTTP {resp.status}: {snippet}")
    else:
        error = error_from_problem(problem, where=where)
    if error.retry_after is None and (retry_after := resp.headers.get("retry-after")):
        try:
            error.retry_after = float(retry_after)
        except ValueError:
            error.retry_after = None
    return error


async def _events(
    resp: aiohttp.ClientResponse, call: OutboundCall, where: str
) -> AsyncIterator[bytes]:
    """Server-sent events → JSON chunks; ``error`` events raise, ``end`` finishes."""
    finished = False
    loop = asyncio.get_running_loop()
    chunks = 0
    try:
        event, data = b"", []
        while True:
            limit, what = call.deadline, f"stream not finished within {call.timeout:g}s"
            gap = call.chunk_timeout if chunks else call.first_chunk_timeout
            if gap is not None and loop.time() + gap < limit:
                limit = loop.time() + gap
                what = f"no chunk within {gap:g}s" + (" of the last" if chunks else "")
            try:
                async with asyncio.timeout_at(limit):
                    line = await resp.content.readline()
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"capability {call.capability!r} at {where}: {what}"
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise ConnectionLost(f"{where}: stream interrupted: {_reason(exc)}") from exc
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
