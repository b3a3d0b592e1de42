"""The control plane's HTTP API (FastAPI): bootstrap and registry queries under ``/v1``.

It answers registry queries from its own watch-fed index, like any sidecar, so a burst of
``agentmesh find`` costs NATS nothing. Errors are ``application/problem+json`` as everywhere.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from agentmesh._version import __version__
from agentmesh.control.docs import mount_docs
from agentmesh.control.health import HealthBook
from agentmesh.control.limits import BodyLimit, body_problem, truncated, validation_problem
from agentmesh.control.metrics import ControlMetrics
from agentmesh.control.nats_status import nats_router, nats_server_status, with_cluster_urls
from agentmesh.control.policies import policy_router
from agentmesh.control.policyset import PolicySigner
from agentmesh.control.security import ControlSecurity, security_router
from agentmesh.control.sessions import BrowserHeaders
from agentmesh.control.stats import StatsBook, stats_router
from agentmesh.control.ui import dashboard_app
from agentmesh.errors import InvalidInput, MeshError, RouteNotFound
from agentmesh.models import AgentRecord, Bootstrap, CapabilityOffer, EndpointHealth, Problem
from agentmesh.settings import Settings
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["create_app"]

_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
_MESH_ERROR_HEADERS = {
    401: {"www-authenticate": 'Bearer realm="agentmesh"'},
    413: {"connection": "close"},  # a refused body is never read to its end
}


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label filter {pair!r} must look like key=value")
        out[key] = value
    return out


def _problem_response(problem: Problem, *, close: bool = False) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type="application/problem+json",
        headers={"connection": "close"} if close else None,
    )


def create_app(
    sidecar: Sidecar,
    boot: Bootstrap,
    health: HealthBook,
    stats: StatsBook | None = None,
    security: ControlSecurity | None = None,
    policies: PolicySigner | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    """The API; with ``security``, the identity routes and admin authentication on every route
    but the few a joining workload or a probe needs (``agentmesh.control.security``); with
    ``policies``, the policy routes (writes are signed into the policy set).

    Inputs are bounded (``agentmesh.control.limits``: body size, 422 size) and browsers get
    hardening headers (``agentmesh.control.sessions.BrowserHeaders``)."""
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="agentmesh control plane",
        version=__version__,
        description="Identities, policies and registry queries for an agentmesh service mesh.",
        responses={400: _PROBLEM, 401: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM},
        dependencies=[Depends(security.auth)] if security is not None else [],
        docs_url=None,  # mount_docs: served from the package, not a CDN
        redoc_url=None,
    )
    mount_docs(app)
    ControlMetrics(sidecar).install(app)
    if security is not None:
        app.include_router(security_router(security.issuer))
        if security.issuer.nats is not None:
            app.include_router(nats_router(sidecar.conn, security.issuer.nats))
    index = sidecar.index
    stats = stats if stats is not None else StatsBook()
    app.include_router(stats_router(stats))
    auth = security.auth if security is not None else None
    app.mount(
        "/ui", dashboard_app(sidecar, health, stats=stats, api=app, auth=auth, settings=settings)
    )
    if policies is not None:  # writing policies needs the CA, which signs the policy set
        app.include_router(policy_router(sidecar, policies))
    app.add_middleware(BodyLimit, max_bytes=settings.max_control_body_bytes)
    app.add_middleware(BrowserHeaders)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = validation_problem(exc.errors(), settings.max_error_items, request.url.path)
        return _problem_response(problem)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        problem = body_problem(exc, request.url.path)
        if problem is not None:
            # After a refused body the connection is closed: the rest of it is never read.
            return _problem_response(problem, close=problem.status == 413)
        return await http_exception_handler(request, exc)

    @app.exception_handler(MeshError)
    async def _mesh_error(request: Request, exc: MeshError) -> JSONResponse:
        problem = exc.to_problem(instance=request.url.path)
        if problem.errors is not None:
            problem = problem.model_copy(
                update={"errors": truncated(problem.errors, settings.max_error_items)}
            )
        return JSONResponse(
            problem.model_dump(exclude_none=True),
            status_code=exc.status,
            media_type="application/problem+json",
            headers=_MESH_ERROR_HEADERS.get(exc.status),
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, object]:
        """Liveness plus what the control plane sees of NATS and the registry."""
        return {
            "status": "ok",
            "version": __version__,
            "nats": sidecar.conn.connected.is_set(),
            "nats_server": nats_server_status(app, sidecar.conn),
            "agents": len(index.records()),
            "time": time.time(),
        }

    @app.get("/v1/bootstrap", tags=["mesh"])
    async def get_bootstrap() -> Bootstrap:
        """Everything an agent or CLI needs to join, from one URL (NATS: every client URL the
        cluster advertises, so agents reconnect to any node)."""
        return with_cluster_urls(boot, sidecar.conn)

    @app.get("/v1/agents", tags=["registry"])
    async def list_agents(
        name: Annotated[str | None, Query(description="Only instances of this agent")] = None,
    ) -> list[AgentRecord]:
        """Every live agent instance, as the registry holds it."""
        await index.wait_verified(settings.jetstream_wait)
        return [r for r in index.records() if name is None or r.name == name]

    @app.get("/v1/agents/{instance_id}", tags=["registry"], responses={404: _PROBLEM})
    async def get_agent(instance_id: str) -> AgentRecord:
        await index.wait_verified(settings.jetstream_wait)
        for record in index.records():
            if record.instance_id == instance_id:
                return record
        raise RouteNotFound(f"no live agent instance {instance_id!r}")

    @app.get("/v1/endpoints", tags=["registry"])
    async def list_endpoints() -> list[EndpointHealth]:
        """Per live instance: the sidecars whose circuit breakers currently eject it."""
        return health.health(r.instance_id for r in index.records())

    @app.get("/v1/capabilities", tags=["registry"])
    async def list_capabilities(
        name: Annotated[str | None, Query(description="Capability name")] = None,
        version: Annotated[str | None, Query(description="PEP 440 specifier, e.g. >=1.0")] = None,
        tag: Annotated[list[str] | None, Query(description="Required tags (repeatable)")] = None,
        label: Annotated[
            list[str] | None, Query(description="Required agent labels, key=value (repeatable)")
        ] = None,
    ) -> list[CapabilityOffer]:
        """Live offers, with the same filters as ``mesh.registry.find``."""
        await index.wait_verified(settings.jetstream_wait)
        return index.find(name, version=version, tags=tag, labels=_labels(label or []))

    return app
