"""The dashboard's pages and their live fragments: each fragment polls its own URL under
``/ui/_/`` every ``REFRESH_SECONDS`` (htmx) and swaps itself in place, so a browser without
JavaScript still gets complete pages, only not self-refreshing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentmesh._version import __version__
from agentmesh.control.sessions import same_origin
from agentmesh.control.ui.data import DashboardData
from agentmesh.control.ui.render import Renderer, form, is_fragment, pretty, static_asset
from agentmesh.control.ui.schema import example_for, schema_fields
from agentmesh.control.ui.tryit import TryIt, TryResult

__all__ = ["page_routes"]

_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def page_routes(data: DashboardData, render: Renderer, try_it: TryIt) -> APIRouter:
    router = APIRouter()
    statics = {
        name: (static_asset(name), _STATIC_TYPES[name[name.rfind(".") :]])
        for name in ("htmx.min.js", "dashboard.css")
    }

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in statics:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type = statics[name]
        return Response(
            body,
            media_type=media_type,
            headers={"Cache-Control": f"public, max-age=3600, immutable; v={__version__}"},
        )

    # ---- pages ---------------------------------------------------------------------------------

    @router.get("/")
    async def overview(request: Request) -> HTMLResponse:
        return render(
            request,
            "overview.html",
            summary=data.summary(),
            agents=data.agents(),
            topology=data.topology(),
        )

    @router.get("/agents")
    async def agents(request: Request) -> HTMLResponse:
        return render(request, "agents.html", agents=data.agents())

    @router.get("/capabilities")
    async def capabilities(request: Request) -> HTMLResponse:
        return render(request, "capabilities.html", capabilities=data.capabilities())

    @router.get("/capabilities/{name}")
    async def capability(request: Request, name: str) -> HTMLResponse:
        return _capability_page(request, name, None, None)

    def _capability_page(
        request: Request, name: str, result: TryResult | None, payload: str | None
    ) -> HTMLResponse:
        view = data.capability(name)
        if view is None:
            return render(request, "missing.html", status=404, what=f"capability {name!r}")
        spec = view.spec
        return render(
            request,
            "capability.html",
            cap=view,
            name=name,
            spec=spec,
            inputs=schema_fields(spec.input_schema),
            outputs=schema_fields(spec.output_schema),
            payload=payload if payload is not None else pretty(example_for(spec.input_schema)),
            result=result,
        )

    @router.post("/capabilities/{name}/try")
    async def try_capability(request: Request, name: str) -> Response:
        if not same_origin(request):
            return Response("cross-site request refused", status_code=403, media_type="text/plain")
        fields = await form(request)
        payload = fields.get("payload", "")
        timeout = fields.get("timeout", "").strip()
        version = fields.get("version", "").strip() or None
        result = await try_it(request, name, payload, timeout, version)
        if is_fragment(request):
            return render(request, "_try_result.html", result=result)
        return _capability_page(request, name, result, payload)

    @router.get("/topology")
    async def topology(request: Request) -> HTMLResponse:
        return render(request, "topology.html", topology=data.topology())

    @router.get("/policies")
    async def policies(request: Request) -> HTMLResponse:
        listing = await data.policies(request)
        return render(request, "listing.html", title="Policies", listing=listing)

    @router.get("/identities")
    async def identities(request: Request) -> HTMLResponse:
        listing = await data.identities(request)
        return render(request, "listing.html", title="Identities", listing=listing)

    # ---- live fragments: each re-fetches itself every REFRESH_SECONDS -------------------------

    @router.get("/_/summary")
    async def summary_fragment(request: Request) -> HTMLResponse:
        return render(request, "_summary.html", summary=data.summary())

    @router.get("/_/agents")
    async def agents_fragment(request: Request) -> HTMLResponse:
        return render(request, "_agents.html", agents=data.agents())

    @router.get("/_/capabilities")
    async def capabilities_fragment(request: Request) -> HTMLResponse:
        return render(request, "_capabilities.html", capabilities=data.capabilities())

    @router.get("/_/capabilities/{name}")
    async def offers_fragment(request: Request, name: str) -> HTMLResponse:
        view = data.capability(name)
        return render(request, "_offers.html", cap=view, name=name)

    @router.get("/_/topology")
    async def topology_fragment(request: Request) -> HTMLResponse:
        return render(request, "_topology.html", topology=data.topology())

    @router.get("/{rest:path}")
    async def not_found(request: Request, rest: str) -> Response:
        if rest.endswith("/"):
            return RedirectResponse(f"{request.scope.get('root_path', '')}/{rest.rstrip('/')}")
        return render(request, "missing.html", status=404, what=f"page {request.url.path}")

    return router
