"""Dashboard sessions: a signed, expiring cookie instead of the admin token, and CSRF checks.

Signing in at ``/ui/login`` with the admin token sets the ``agentmesh_session`` cookie:
``v1.<expiry>.<nonce>.<HMAC-SHA256>``, keyed by a secret derived from the admin token (so every
replica sharing ``AGENTMESH_TOKEN`` accepts it, and replacing the token ends every session). The
cookie never contains the token; it is HttpOnly, SameSite=Strict, ``Secure`` under HTTPS, and
lives ``AGENTMESH_SESSION_TTL`` seconds. Signing out (a POST) forgets the nonce until the cookie
would have expired, on this replica.

A browser sends cookies with requests other sites make it send, so a state-changing request
authorized by the cookie must also come from the control plane's own pages
(:func:`same_origin`): ``Sec-Fetch-Site: same-origin`` or an ``Origin`` equal to the host the
request was sent to. A bearer token is not sent by browsers on their own, so it needs no such
check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SESSION_COOKIE", "BrowserHeaders", "Sessions", "same_origin"]

SESSION_COOKIE = "agentmesh_session"
_VERSION = "v1"
#: Signed-out nonces remembered at most (each only until its cookie would expire anyway).
_MAX_REVOKED = 10_000


def same_origin(request: HTTPConnection, *, require: bool = False) -> bool:
    """Whether a request came from the control plane's own pages (not another site).

    ``require``: a request with neither ``Sec-Fetch-Site`` nor ``Origin`` is refused too (a
    cookie-authorized write: browsers send one of them; other clients use a bearer token)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return site is not None or not require
    if origin == "null":
        return False
    return urlsplit(origin).netloc == request.headers.get("host", "")


class Sessions:
    """Issues and checks session cookies (see the module docstring)."""

    def __init__(
        self, admin_token: str, ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = hmac.new(admin_token.encode(), b"agentmesh session v1", hashlib.sha256).digest()
        self.ttl = ttl
        self._clock = clock
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session cookie value."""
        expiry = int(self._clock() + self.ttl)
        payload = f"{_VERSION}.{expiry}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def valid(self, value: str) -> bool:
        """Signed by us, not expired, not signed out."""
        parsed = self._parse(value)
        if parsed is None:
            return False
        expiry, nonce = parsed
        return expiry > self._clock() and nonce not in self._revoked

    def end(self, value: str) -> None:
        """Sign out: this cookie is refused from now on, even if a copy of it survives."""
        parsed = self._parse(value)
        if parsed is None:
            return
        now = self._clock()
        self._revoked = {n: e for n, e in self._revoked.items() if e > now}
        if len(self._revoked) >= _MAX_REVOKED:  # bounded: the soonest to expire go first
            for nonce in sorted(self._revoked, key=self._revoked.__getitem__)[: _MAX_REVOKED // 10]:
                del self._revoked[nonce]
        self._revoked[parsed[1]] = parsed[0]

    def _parse(self, value: str) -> tuple[float, str] | None:
        payload, _, signature = value.rpartition(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        version, expiry, nonce = [*payload.split("."), "", "", ""][:3]
        if version != _VERSION or not expiry.isdigit():
            return None
        return float(expiry), nonce


#: Pages that load their own scripts and styles inline (FastAPI's API explorers) keep no CSP.
_NO_CSP = ("/docs", "/redoc")
_DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


class BrowserHeaders:
    """ASGI middleware: headers that keep a browser from framing, sniffing or leaking pages.

    ``X-Frame-Options: DENY`` and ``frame-ancestors 'none'`` (no clickjacking of the dashboard),
    ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` (not ``no-referrer``:
    with it a browser sends ``Origin: null`` on form posts, which the CSRF check must refuse),
    and a CSP that allows nothing on responses that do not set their own (the dashboard sets
    one allowing itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = not str(scope.get("path", "")).startswith(_NO_CSP)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if csp and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", _DEFAULT_CSP))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
