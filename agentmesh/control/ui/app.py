"""The dashboard as its own small ASGI app, mounted at ``/ui`` by ``create_app``: its own app so
that a browser without the admin token gets a sign-in page rather than a 401 document."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp

from agentmesh.control.health import HealthBook
from agentmesh.control.security import AdminAuth
from agentmesh.control.stats import StatsBook
from agentmesh.control.ui.auth import SignIn, guard, sign_in_routes, to_sign_in
from agentmesh.control.ui.data import DashboardData
from agentmesh.control.ui.render import Renderer
from agentmesh.control.ui.routes import page_routes
from agentmesh.control.ui.tryit import TryIt
from agentmesh.errors import MeshError
from agentmesh.settings import Settings
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["dashboard_app"]


def dashboard_app(
    sidecar: Sidecar,
    health: HealthBook,
    *,
    stats: StatsBook | None = None,
    api: ASGIApp | None = None,
    auth: AdminAuth | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    """The dashboard, to mount at ``/ui``: ``app.mount("/ui", dashboard_app(...))``.

    ``api`` is the control plane's own app (policies and identities are read from it);
    ``auth`` is its admin check (``AdminAuth``): without a valid token or session the pages
    send the browser to ``/ui/login``, which starts a session (a signed cookie that the API
    accepts too). Without ``auth`` the dashboard is open.
    """
    data = DashboardData(sidecar, health, stats, api=api)
    render = Renderer(data, sidecar, sessions=auth is not None)
    app = FastAPI(
        title="agentmesh dashboard",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(guard(auth))],
    )

    @app.exception_handler(MeshError)
    async def _refused(request: Request, exc: MeshError) -> Response:
        """A cross-site write (403) or too many failed sign-ins (429), as the API says it."""
        return Response(
            exc.to_problem(instance=request.url.path).model_dump_json(exclude_none=True),
            status_code=exc.status,
            media_type="application/problem+json",
        )

    app.add_exception_handler(SignIn, to_sign_in)
    # Signing in first: the pages end with a catch-all route (the "missing" page).
    app.include_router(sign_in_routes(render, auth))
    app.include_router(page_routes(data, render, TryIt(sidecar, settings)))
    return app
