"""Signing in to the dashboard: the admin token, once, for a session cookie.

A browser without the token or a session is sent to ``/ui/login`` (htmx requests through
``HX-Redirect``) instead of getting a 401 document. The page checks the token with the control
plane's own ``AdminAuth`` and starts a session (``agentmesh.control.sessions``: a signed,
expiring cookie, never the token), which the API accepts too; signing out is a POST. Both are
refused cross-site (``Origin``/``Sec-Fetch-Site``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentmesh.control.security import AdminAuth
from agentmesh.control.sessions import SESSION_COOKIE, same_origin
from agentmesh.control.ui.render import Renderer, form
from agentmesh.errors import AuthenticationFailed, RateLimited

__all__ = ["SignIn", "guard", "sign_in_routes", "to_sign_in"]

#: Paths of the dashboard that answer without the admin token.
_OPEN = ("/login", "/logout", "/static/")


class SignIn(Exception):
    """The request needs the admin token: send the browser to the sign-in page."""


def guard(auth: AdminAuth | None) -> Callable[[Request], Awaitable[None]]:
    """The dependency every dashboard route runs: the admin check, except on the open paths.
    Without ``auth`` the dashboard is open."""

    async def check(request: Request) -> None:
        if auth is None:
            return
        tail = request.url.path[len(request.scope.get("root_path", "")) :]
        if tail.startswith(_OPEN):
            return
        try:
            await auth(request)
        except AuthenticationFailed as exc:
            raise SignIn(str(exc)) from exc

    return check


async def to_sign_in(request: Request, exc: Exception) -> Response:
    """The :class:`SignIn` handler: to the sign-in page, coming back to this page after."""
    base = request.scope.get("root_path", "")
    page = request.url.path
    if request.headers.get("hx-request") == "true":
        current = urlsplit(request.headers.get("hx-current-url", "")).path
        page = current or base + "/"
    target = f"{base}/login?{urlencode({'next': page})}"
    if request.headers.get("hx-request") == "true":
        # htmx follows HX-Redirect whatever the status: the whole page goes to sign in.
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _next(request: Request, value: str | None) -> str:
    """Where to go after signing in: a dashboard page, never another site."""
    base: str = request.scope.get("root_path", "")
    if value and value.startswith(base + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return base + "/"


def sign_in_routes(render: Renderer, auth: AdminAuth | None) -> APIRouter:
    router = APIRouter()

    @router.get("/login")
    async def login_page(request: Request, next: str | None = None) -> HTMLResponse:
        return render(request, "login.html", next=_next(request, next), error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await form(request)
        target = _next(request, fields.get("next"))
        token = fields.get("token", "").strip()
        response = RedirectResponse(target, status_code=303)
        if auth is None:
            return response
        if not same_origin(request):
            return Response("cross-site request refused", 403, media_type="text/plain")
        source = request.client.host if request.client else "unknown"
        try:
            if not token:
                raise AuthenticationFailed("enter the admin token")
            auth.check_token(token, source)
        except (AuthenticationFailed, RateLimited) as exc:
            return render(request, "login.html", status=exc.status, next=target, error=str(exc))
        response.set_cookie(
            SESSION_COOKIE,
            auth.sessions.issue(),
            max_age=int(auth.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        if not same_origin(request, require=True):
            return Response("cross-site request refused", 403, media_type="text/plain")
        response = RedirectResponse(f"{request.scope.get('root_path', '')}/login", 303)
        session = request.cookies.get(SESSION_COOKIE)
        if auth is not None and session is not None:
            auth.sessions.end(session)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=request.url.scheme == "https", httponly=True
        )
        return response

    return router
