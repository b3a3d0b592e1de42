"""An agent: a set of capabilities served over HTTP by one process, plus its sidecar.

Lifecycle: serve (bind, so the real port is known) → register (lease) → heartbeat → on
SIGTERM/SIGINT drain (mark the record draining, finish in-flight calls within the grace
period) → deregister → exit. Registering only after the socket is bound means no caller is
ever sent to a port that is not listening yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from agentmesh.capability import Capability, capability, is_capability
from agentmesh.errors import ConfigurationError, RegistrationError
from agentmesh.inbound.app import InboundApp
from agentmesh.inbound.server import HttpServer, bind, signals
from agentmesh.inbound.tls import InboundLimits, caller_identity
from agentmesh.mesh import Mesh
from agentmesh.models import AgentRecord, AgentStatus
from agentmesh.registry.lease import Lease
from agentmesh.settings import Settings
from agentmesh.sidecar.bootstrap import bootstrap
from agentmesh.sidecar.sidecar import Sidecar
from agentmesh.telemetry.access import setup_access_log
from agentmesh.telemetry.tracing import setup_tracing

__all__ = ["Agent"]

_log = logging.getLogger("agentmesh.agent")


class Agent:
    """A named set of capabilities. ``Agent("summarizer", capabilities=[summarize]).run()``."""

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.1.0",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        capabilities: Iterable[Capability[..., Any]] = (),
        readiness: Callable[[], bool | Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.description = description
        self.labels = dict(labels or {})
        self.capabilities: dict[str, Capability[..., Any]] = {}
        for cap in capabilities:
            self.add(cap)
        self.instance_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.identity: str | None = None
        self.mtls: Literal["strict", "permissive", "off"] = "off"
        self.started_at = datetime.now(UTC)
        self._check_record("http://127.0.0.1:1")
        self.endpoint: str | None = None
        self.mesh: Mesh | None = None
        self.app: InboundApp | None = None
        self._stop = asyncio.Event()
        self._lease: Lease | None = None
        self._readiness = readiness
        self._ready_override: bool | None = None

    def add(self, cap: Capability[..., Any]) -> Capability[..., Any]:
        if not is_capability(cap):
            raise ConfigurationError(
                f"agent {self.name}: {cap!r} is not a capability; decorate it with @capability"
            )
        if cap.name in self.capabilities:
            raise ConfigurationError(f"agent {self.name}: two capabilities named {cap.name!r}")
        self.capabilities[cap.name] = cap
        return cap

    def capability(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@agent.capability`` — decorate and add in one step (same options as @capability)."""

        def wrap(f: Callable[..., Any]) -> Capability[..., Any]:
            return self.add(capability(f, **options))

        return wrap(fn) if fn is not None else wrap

    def record(self, endpoint: str, status: AgentStatus = "serving") -> AgentRecord:
        return self._check_record(endpoint, status)

    def _check_record(self, endpoint: str, status: AgentStatus = "serving") -> AgentRecord:
        try:
            return AgentRecord.model_validate(
                {
                    "instance_id": self.instance_id,
                    "name": self.name,
                    "version": self.version,
                    "endpoint": endpoint,
                    "capabilities": [c.spec for c in self.capabilities.values()],
                    "labels": self.labels,
                    "status": status,
                    "identity": self.identity,
                    "mtls": self.mtls,
                    "started_at": self.started_at,
                }
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()
            )
            raise RegistrationError(f"agent {self.name!r} cannot register: {problems}") from exc

    def agent_card(self) -> bytes:
        """An A2A agent card generated from the capability specs."""
        card = {
            "protocolVersion": "0.3.0",
            "name": self.name,
            "description": self.description or f"agentmesh agent {self.name}",
            "url": self.endpoint or "",
            "version": self.version,
            "provider": {"organization": "agentmesh", "url": "https://agentmesh.dev"},
            "capabilities": {
                "streaming": any(c.streaming for c in self.capabilities.values()),
                "pushNotifications": False,
            },
            "defaultInputModes": ["application/json"],
            "defaultOutputModes": ["application/json"],
            "skills": [
                {
                    "id": c.name,
                    "name": c.name,
                    "description": c.spec.description or c.name,
                    "tags": list(c.spec.tags),
                    "inputModes": ["application/json"],
                    "outputModes": ["text/event-stream" if c.streaming else "application/json"],
                }
                for c in self.capabilities.values()
            ],
        }
        return json.dumps(card).encode()

    def set_ready(self, ready: bool | None) -> None:
        """Take the agent out of rotation (False) or back (True); None defers to ``readiness``.

        Callers stop sending new calls within a heartbeat; calls in flight finish.
        """
        self._ready_override = ready

    async def _is_ready(self) -> bool:
        if self._ready_override is not None:
            return self._ready_override
        if self._readiness is None:
            return True
        try:
            result = self._readiness()
            return bool(await result) if inspect.isawaitable(result) else bool(result)
        except Exception:
            _log.exception("readiness check of %s failed", self.name)
            return False

    async def _watch_readiness(self, app: InboundApp, interval: float) -> None:
        """Publish readiness changes in the record, so callers route around an unready agent."""
        assert self._lease is not None
        assert self.endpoint is not None
        while True:
            ready = await self._is_ready()
            if ready != app.ready and not app.draining:
                app.ready = ready
                status: AgentStatus = "serving" if ready else "unready"
                _log.info("agent %s is now %s", self.instance_id, status)
                try:
                    await self._lease.update(self.record(self.endpoint, status))
                except Exception as exc:
                    _log.warning("could not publish readiness of %s: %s", self.instance_id, exc)
            await asyncio.sleep(interval)

    def stop(self) -> None:
        """Ask a serving agent to drain and stop (what SIGTERM does)."""
        self._stop.set()

    def run(
        self, *, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None
    ) -> None:
        """Serve until SIGTERM/SIGINT: the blocking entry point for scripts.

        As the process's runtime, it also wires tracing (``OTEL_*``) and access logs.
        """
        settings = settings or Settings()
        setup_tracing(self.name)
        setup_access_log(settings.access_log)
        asyncio.run(self.serve(host=host, port=port, settings=settings))

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: Settings | None = None,
        on_ready: Callable[[Agent], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Serve, register and heartbeat until stopped; then drain and deregister."""
        settings = settings or Settings()
        if not self.capabilities:
            raise ConfigurationError(f"agent {self.name}: no capabilities to serve")
        self.started_at = datetime.now(UTC)
        self._stop = asyncio.Event()
        if settings.zone and "zone" not in self.labels:
            self.labels["zone"] = settings.zone
        sock = bind(host, port)
        try:
            boot = await bootstrap(settings)
            sidecar = Sidecar(boot, settings, name=self.instance_id, caller=self.name)
            await sidecar.start()
        except BaseException:
            sock.close()
            raise
        self.mesh = Mesh(sidecar, settings, owner=False)
        app = self.app = InboundApp(
            self.name,
            self.capabilities,
            max_body=settings.max_payload_bytes,
            max_errors=settings.max_error_items,
            card=self.agent_card,
            sidecar=sidecar,
            injectables=lambda: {Mesh: self.mesh},
            stats=sidecar.stats,
            identify=caller_identity,
        )
        workload = sidecar.identity
        #: The SPIFFE ID this agent proves with its certificate (None with mTLS off).
        self.identity = str(workload.id) if workload.enabled and workload.id else None
        self.mtls = workload.mode if workload.enabled else "off"
        server = HttpServer(
            app,
            sock,
            graceful=max(settings.drain_grace, 1.0),
            tls=workload,
            owner=self.name,
            limits=InboundLimits.of(settings),
        )
        try:
            await server.start()
            self.endpoint = _endpoint(
                host, server.port, settings.advertise_host, "https" if server.tls else "http"
            )
            self._lease = Lease(
                sidecar.store,
                self.record(self.endpoint),
                interval=boot.heartbeat_interval,
                ttl=boot.lease_ttl,
            )
            app.ready = await self._is_ready()
            self._lease.record = self.record(self.endpoint, "serving" if app.ready else "unready")
            await self._lease.acquire()
            readiness = asyncio.create_task(self._watch_readiness(app, boot.heartbeat_interval / 2))
            _log.info("agent %s serving at %s", self.instance_id, self.endpoint)
            if on_ready is not None:
                on_ready(self)
            with signals(self._stop.set, enabled=handle_signals):
                stopped = asyncio.create_task(self._stop.wait())
                await asyncio.wait({stopped, server.task}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            readiness.cancel()
            await self._drain(app, settings.drain_grace)
        finally:
            await server.stop()
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.release()
            await sidecar.close()
            self.app = None

    async def _drain(self, app: InboundApp, grace: float) -> None:
        app.draining = True
        assert self._lease is not None
        assert self.endpoint is not None
        if self._lease.reachable:
            try:
                async with asyncio.timeout(2.0):
                    await self._lease.update(self.record(self.endpoint, "draining"))
            except Exception as exc:
                _log.warning("could not mark %s draining: %s", self.instance_id, exc or "timeout")
        try:
            async with asyncio.timeout(grace):
                await app.idle.wait()
        except TimeoutError:
            _log.warning(
                "%s: %d call(s) still running after %gs grace", self.name, app.in_flight, grace
            )
        if await self._lease.release():
            _log.info("agent %s deregistered", self.instance_id)


def _endpoint(host: str, port: int, advertise: str | None, scheme: str = "http") -> str:
    if advertise:
        name = advertise
    elif host in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
    else:
        name = host
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return f"{scheme}://{name}:{port}"
