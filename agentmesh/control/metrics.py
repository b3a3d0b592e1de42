"""``/metrics`` of the control plane: its API, enrolments, policy changes, registry and NATS.

Agents export their call metrics themselves; this is what only the control plane knows. Counters
live in a registry of this app (two control planes in one test process do not add up), and the
process-wide registry (process and Python collectors, the control plane's own sidecar) is
appended to the same page.

Everything is observed at the HTTP boundary, in one ASGI middleware: a request's route template
(never the raw path, so the label set stays bounded), its status, and for the two kinds of writes
worth counting, what they did: ``POST /v1/certificates`` (an enrolment or a renewal) and policy
writes, whose result (``created``, ``configured``, ``unchanged``, ``deleted``) is read from the
small JSON document they answer with. Registry size and the NATS connection are read when
Prometheus scrapes, so they are never stale.

``/metrics`` needs no admin token, like ``/healthz``: it holds counts, no names of agents or
policies, and a scraper given the admin token could write policies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["ControlMetrics"]

#: Route label of a request no route matched (any path: kept out of the labels).
_UNMATCHED = "(unmatched)"
#: Largest policy-write answer read for its result; a PolicyChange is ~150 bytes.
_MAX_CHANGE_BODY = 4096
_WRITES = frozenset({"POST", "PUT", "DELETE"})


class ControlMetrics:
    """The control plane's metrics and the middleware that records them."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "agentmesh_control_api_requests",
            "Requests to the control plane's API, by method, route template and HTTP status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "agentmesh_control_api_latency_seconds",
            "Time to answer an API request, by route template.",
            ["route"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.certificates = Counter(
            "agentmesh_control_certificate_requests",
            "Enrolments and renewals (POST /v1/certificates): issued, or refused.",
            ["result"],
            registry=self.registry,
        )
        self.policy_changes = Counter(
            "agentmesh_control_policy_changes",
            "Policy writes through this control plane (dry runs excluded), by kind and result "
            "(created, configured, unchanged, deleted).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.registry.register(_MeshState(sidecar))

    def install(self, app: FastAPI) -> None:
        """Record every HTTP request of ``app`` and serve ``GET /metrics`` (no API operation)."""
        app.add_middleware(_Observe, metrics=self)
        app.add_route("/metrics", self.endpoint, methods=["GET"], include_in_schema=False)

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics`` in the Prometheus text format."""
        return Response(
            generate_latest(self.registry) + generate_latest(REGISTRY),
            media_type=CONTENT_TYPE_LATEST,
        )

    def record(
        self, scope: Scope, mounted_at: str, status: int, elapsed: float, body: bytes | None
    ) -> None:
        """Count one answered request. ``mounted_at``: the root path before routing, so that a
        route of a mounted app (the dashboard) is labelled with its mount's prefix."""
        route = getattr(scope.get("route"), "path", None)
        prefix = scope.get("root_path", "")[len(mounted_at) :]
        template = prefix + route if route else _UNMATCHED
        method = scope.get("method", "")
        self.requests.labels(method, template, str(status)).inc()
        self.latency.labels(template).observe(elapsed)
        if template == "/v1/certificates" and method == "POST":
            self.certificates.labels("issued" if status == 200 else "refused").inc()
        elif body is not None and status == 200:
            self._policy_change(body)

    def _policy_change(self, body: bytes) -> None:
        try:
            change: Any = json.loads(body)
        except ValueError:
            return
        if not isinstance(change, dict) or change.get("dry_run"):
            return
        kind, result = change.get("kind"), change.get("result")
        if isinstance(result, str):
            self.policy_changes.labels(kind if isinstance(kind, str) else "", result).inc()


class _Observe:
    """Pure ASGI (no BaseHTTPMiddleware): streaming answers pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: ControlMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        mounted_at = scope.get("root_path", "")
        status = 500
        capture = scope.get("method") in _WRITES and scope.get("path", "").startswith(
            "/v1/policies"
        )
        body = bytearray()

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif capture and message["type"] == "http.response.body":
                # Keep one byte past the bound: an answer that long is no PolicyChange.
                body.extend(message.get("body", b"")[: max(_MAX_CHANGE_BODY + 1 - len(body), 0)])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            whole = bytes(body) if capture and len(body) <= _MAX_CHANGE_BODY else None
            elapsed = time.perf_counter() - started
            self.metrics.record(scope, mounted_at, status, elapsed, whole)


class _MeshState(Collector):
    """Registry size and NATS connection state, read at scrape time."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "agentmesh_control_registry_instances",
            "Live agent instances in the control plane's registry index.",
            value=len(self._sidecar.index.records()),
        )
        yield GaugeMetricFamily(
            "agentmesh_control_nats_connected",
            "1 while the control plane is connected to NATS, else 0.",
            value=1 if self._sidecar.conn.connected.is_set() else 0,
        )
