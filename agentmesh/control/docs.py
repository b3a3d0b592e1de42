"""``/docs``: Swagger UI served from the installed package, so it works without the internet.

FastAPI's default page loads Swagger UI from a CDN: on an air-gapped machine, behind a strict
proxy, or on a laptop on a train, ``/docs`` was a blank page. The assets come from the
``swagger-ui-bundle-v2`` wheel (Swagger UI 5, which reads the OpenAPI 3.1 FastAPI writes) and are
served under ``/docs/static``. ReDoc has no such package, so ``/redoc`` is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from agentmesh.errors import ConfigurationError

__all__ = ["ASSETS", "mount_docs"]

#: Where the Swagger UI assets are served.
ASSETS = "/docs/static"


def mount_docs(app: FastAPI) -> None:
    """Add ``/docs`` and its assets to an app created with ``docs_url=None``.

    Plain Starlette routes, not API routes: the page is no operation of the API (it stays out of
    the OpenAPI document) and, like the document itself, needs no admin token.
    """
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError as exc:  # an environment installed before the dependency was added
        raise ConfigurationError(
            "the control plane's /docs needs the swagger-ui-bundle-v2 package (a dependency of "
            "agentmesh): pip install -e . (or pip install swagger-ui-bundle-v2)"
        ) from exc

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} — API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        )

    app.add_route("/docs", docs, include_in_schema=False)
