"""``agentmesh.connect()`` and the :class:`Mesh` handle that orchestration code calls through.

A ``Mesh`` is a thin, user-facing face of the process's sidecar. Inside an agent process,
``connect()`` returns a handle on the agent's own sidecar (no second NATS connection); a
capability can also simply declare a parameter of type ``Mesh`` to have it injected.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel

from agentmesh.errors import InvalidInput
from agentmesh.registry.index import parse_specifier
from agentmesh.registry.view import RegistryView
from agentmesh.settings import Settings
from agentmesh.sidecar.bootstrap import bootstrap
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.sidecar import Sidecar, serving_sidecar

if TYPE_CHECKING:
    import httpx

__all__ = ["CallResult", "Mesh", "connect"]


@dataclass(frozen=True, slots=True)
class CallResult:
    """A call's value plus who served it and how long it took (``Mesh.invoke``)."""

    value: Any
    capability: str
    agent: str
    instance_id: str
    endpoint: str
    elapsed: float
    attempts: int = 1


class Mesh:
    """Call capabilities anywhere in the mesh; find who offers what."""

    def __init__(self, sidecar: Sidecar, settings: Settings, *, owner: bool) -> None:
        self._sidecar = sidecar
        self._settings = settings
        self._owner = owner
        self._handler = sidecar.outbound.handler
        #: Listings wait for the first view and its verification as long as a sidecar waits for
        #: its first view (a large registry takes seconds to verify on a busy machine).
        self.registry = RegistryView(sidecar.index, sync_timeout=settings.jetstream_wait)
        self._http: httpx.AsyncClient | None = None

    @property
    def sidecar(self) -> Sidecar:
        return self._sidecar

    async def call(
        self,
        capability: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        version: str | None = None,
        tags: Iterable[str] | None = None,
        labels: dict[str, str] | None = None,
        retries: int | None = None,
        idempotency_key: str | None = None,
        affinity_key: str | None = None,
    ) -> Any:
        """Call ``capability`` with ``payload`` (a dict or pydantic model); return its JSON value.

        ``timeout`` is the total budget in seconds, retries included (default: the capability's
        own timeout, else ``AGENTMESH_CALL_TIMEOUT``); inside a capability it never exceeds what
        is left of the caller's budget. ``version``/``tags``/``labels`` restrict which instances
        may serve. ``retries`` overrides how many retries are allowed (0: none); an
        ``idempotency_key`` vouches that running the call twice is harmless (it travels as the
        ``Idempotency-Key`` header), which lets the mesh retry it like an idempotent capability.
        Calls with the same ``affinity_key`` go to the same instance while it is healthy.
        """
        call = self._outbound(
            capability, payload, timeout, version, tags, labels, retries, idempotency_key
        )
        call.affinity_key = affinity_key
        reply = await self._handler(call)
        return pydantic_core.from_json(reply.body)

    async def invoke(
        self,
        capability: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        version: str | None = None,
        tags: Iterable[str] | None = None,
        labels: dict[str, str] | None = None,
        retries: int | None = None,
        idempotency_key: str | None = None,
        affinity_key: str | None = None,
    ) -> CallResult:
        """Like :meth:`call`, but also says which instance served the call and how long it took."""
        started = time.perf_counter()
        call = self._outbound(
            capability, payload, timeout, version, tags, labels, retries, idempotency_key
        )
        call.affinity_key = affinity_key
        reply: Reply = await self._handler(call)
        record = reply.target.record
        return CallResult(
            value=pydantic_core.from_json(reply.body),
            capability=capability,
            agent=record.name,
            instance_id=record.instance_id,
            endpoint=record.endpoint,
            elapsed=time.perf_counter() - started,
            attempts=call.attempt,
        )

    async def stream(
        self,
        capability: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        first_chunk_timeout: float | None = None,
        chunk_timeout: float | None = None,
        version: str | None = None,
        tags: Iterable[str] | None = None,
        labels: dict[str, str] | None = None,
        affinity_key: str | None = None,
    ) -> AsyncIterator[Any]:
        """Iterate over the chunks of a streaming (async-generator) capability.

        ``timeout`` bounds the whole stream; ``first_chunk_timeout`` the wait for the first
        chunk once the agent answered; ``chunk_timeout`` the gap between two chunks. A stream
        is retried only until the agent answers, never once chunks flow.
        """
        call = self._outbound(capability, payload, timeout, version, tags, labels, None, None)
        call.stream = True
        call.affinity_key = affinity_key
        call.first_chunk_timeout = first_chunk_timeout
        call.chunk_timeout = chunk_timeout
        reply = await self._handler(call)
        if reply.chunks is None:
            yield pydantic_core.from_json(reply.body)
            return
        # Closed here, not left to the garbage collector: closing it closes the connection,
        # which is how the agent learns to stop a stream nobody reads any more.
        async with contextlib.aclosing(reply.chunks) as chunks:
            async for chunk in chunks:
                yield pydantic_core.from_json(chunk)

    def _outbound(
        self,
        capability: str,
        payload: Any,
        timeout: float | None,
        version: str | None,
        tags: Iterable[str] | None,
        labels: dict[str, str] | None,
        retries: int | None,
        idempotency_key: str | None,
    ) -> OutboundCall:
        # The deadline itself is fixed by the deadline layer (sidecar/deadline.py), once the
        # capability's TrafficPolicy and instances are known.
        call = OutboundCall(
            capability=capability,
            body=_encode(payload, capability),
            timeout=timeout,
            version=parse_specifier(version),
            tags=tags,
            labels=labels,
            retries=retries,
        )
        if idempotency_key is not None:
            call.headers["idempotency-key"] = idempotency_key
            call.idempotent = True
        return call

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport that calls capabilities through this mesh (docs/sidecar.md):
        ``POST http://<capability>.mesh/`` or ``POST /v1/invoke/<capability>``."""
        from agentmesh.proxy.transport import MeshTransport

        return MeshTransport(self._sidecar, self._settings)

    @property
    def http(self) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on :meth:`transport` with base URL ``http://mesh``, so
        ``await mesh.http.post("/v1/invoke/summarize", json=...)`` is a mesh call."""
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(transport=self.transport(), base_url="http://mesh")
        return self._http

    async def close(self) -> None:
        """Close the sidecar if this handle owns it (a handle inside an agent does not)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._owner:
            await self._sidecar.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _encode(payload: Any, capability: str) -> bytes:
    if payload is None:
        return b"{}"
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, BaseModel):
        return payload.__pydantic_serializer__.to_json(payload)
    try:
        return pydantic_core.to_json(payload)
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidInput(f"payload for capability {capability!r} is not JSON: {exc}") from exc


class _Connecting:
    """What ``connect()`` returns: await it, or use it as ``async with``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._mesh: Mesh | None = None

    async def _open(self) -> Mesh:
        sidecar = serving_sidecar.get()
        if sidecar is not None:
            return Mesh(sidecar, self._settings, owner=False)
        boot = await bootstrap(self._settings)
        sidecar = Sidecar(boot, self._settings, name=f"client-{socket.gethostname()}-{os.getpid()}")
        await sidecar.start()
        return Mesh(sidecar, self._settings, owner=True)

    def __await__(self) -> Generator[Any, None, Mesh]:
        return self._open().__await__()

    async def __aenter__(self) -> Mesh:
        self._mesh = await self._open()
        return self._mesh

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._mesh is not None:
            await self._mesh.close()


def connect(settings: Settings | None = None, **overrides: Any) -> _Connecting:
    """Join the mesh: ``async with agentmesh.connect() as mesh: ...``.

    Reads ``AGENTMESH_*`` settings (keyword overrides win, e.g. ``control_url=``); by default
    it asks the local control plane where NATS is. Inside an agent process it reuses the
    agent's own sidecar.
    """
    if settings is None:
        settings = Settings(**overrides)
    elif overrides:
        settings = Settings(**{**settings.model_dump(), **overrides})
    return _Connecting(settings)
