"""How a dashboard page is rendered: the Jinja2 templates, their filters, and the headers every
page carries (no caching, a Content-Security-Policy that allows only the control plane itself)."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from agentmesh._version import __version__
from agentmesh.control.sessions import SESSION_COOKIE
from agentmesh.control.ui.data import STATS_WINDOW, DashboardData
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["REFRESH_SECONDS", "Renderer", "form", "is_fragment", "pretty", "static_asset"]

#: How often live fragments re-fetch themselves, in seconds.
REFRESH_SECONDS = 2.0
#: Where the dashboard's pages may load anything from: only the control plane itself.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("agentmesh.control", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def ms(seconds: float | None) -> str:
        if seconds is None:
            return "–"
        if seconds < 0.001:
            return f"{seconds * 1e6:.0f} µs"
        if seconds < 1:
            return f"{seconds * 1000:.3g} ms"
        return f"{seconds:.3g} s"

    def pct(fraction: float | None) -> str:
        if fraction is None:
            return "–"
        if fraction >= 1:
            return "100%"
        if fraction <= 0:
            return "0%"
        return f"{math.floor(fraction * 1000) / 10:.1f}%"

    def rate(rps: float | None) -> str:
        if not rps:
            return "0/s"
        return f"{rps:.3g}/s"

    env.filters.update(ms=ms, pct=pct, rate=rate, pretty=pretty)
    env.globals.update(version=__version__, refresh=REFRESH_SECONDS)
    return env


def static_asset(name: str) -> bytes:
    return files("agentmesh.control").joinpath("static", name).read_bytes()


class Renderer:
    """Renders a template with what every page shows: the mount path, the stats window, whether
    a session is open, and the warning when NATS takes connections without authentication."""

    def __init__(self, data: DashboardData, sidecar: Sidecar, *, sessions: bool) -> None:
        self._env = _environment()
        self._data = data
        self._sidecar = sidecar
        self._sessions = sessions
        self._window = f"last {STATS_WINDOW:.0f} s"

    def __call__(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        html = self._env.get_template(template).render(
            base=request.scope.get("root_path", ""),
            path=request.url.path.rstrip("/") or "/",
            window=self._window,
            data=self._data,
            signed_in=self._sessions and SESSION_COOKIE in request.cookies,
            nats_open=self._sidecar.conn.unauthenticated,
            **context,
        )
        return HTMLResponse(
            html,
            status_code=status,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
        )


def is_fragment(request: Request) -> bool:
    """An htmx request: it wants the fragment to swap in, not the whole page."""
    return request.headers.get("hx-request") == "true"


async def form(request: Request) -> dict[str, str]:
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}
