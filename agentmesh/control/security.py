"""The control plane's security API and its admin authentication.

Every route needs the admin token (``Authorization: Bearer <token>``, compared in constant time)
or, from a browser, a dashboard session cookie (``agentmesh.control.sessions``: signed, expiring,
never the token itself; a state-changing request it authorizes must come from the control
plane's own pages), except:

- what a joining workload needs before it has any credential: ``/v1/bootstrap``,
  ``/v1/trust-bundle`` (public roots), ``/v1/certificates`` (authenticated by its own join
  token or current certificate);
- ``/healthz`` (probes), ``/metrics`` (counts only; a scraper holding the admin token could
  write), ``/docs`` with its assets and ``/openapi.json`` (the API's shape is not a secret; every
  operation still needs the token);
- with ``AGENTMESH_PUBLIC_READ=true``, every GET (registry, policies, stats): for a trusted
  network or a read-only dashboard. Writes (tokens, revocations, rotation, policies) never.

A failure is a 401 problem document with ``WWW-Authenticate: Bearer``; failed attempts are
logged and limited per source address (``agentmesh.control.limits.FailureLimiter``: 429 past
the limit); a cross-site write with the cookie is a 403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import APIRouter, Request

from agentmesh.control.issuer import Issuer
from agentmesh.control.limits import FailureLimiter
from agentmesh.control.sessions import SESSION_COOKIE, Sessions, same_origin
from agentmesh.errors import AuthenticationFailed, PolicyDenied
from agentmesh.models import (
    CertificateRequest,
    IdentityRecord,
    IssuedCertificate,
    JoinToken,
    JoinTokenRequest,
    Problem,
    Revocation,
    RevocationRequest,
    RevocationResult,
    TrustBundle,
)
from agentmesh.settings import Settings

__all__ = ["OPEN_PATHS", "AdminAuth", "ControlSecurity", "security_router"]

#: Paths that never need the admin token (see the module docstring for why).
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/v1/bootstrap",
        "/v1/trust-bundle",
        "/v1/certificates",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)
COOKIE = SESSION_COOKIE
_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULTS = Settings.model_fields


class AdminAuth:
    """FastAPI dependency: the admin token or a session, or one of the documented exceptions."""

    def __init__(
        self,
        token: str,
        *,
        public_read: bool = False,
        session_ttl: float = _DEFAULTS["session_ttl"].default,
        failures_per_minute: int = _DEFAULTS["auth_failures_per_minute"].default,
    ) -> None:
        self._token = token.encode()
        self.public_read = public_read
        self.sessions = Sessions(token, session_ttl)
        self.limiter = FailureLimiter(failures_per_minute)

    async def __call__(self, request: Request) -> None:
        if request.url.path in OPEN_PATHS:
            return
        if self.public_read and request.method in ("GET", "HEAD"):
            return
        source = request.client.host if request.client else "unknown"
        bearer = _bearer(request.headers.get("authorization"))
        if bearer is not None:
            self.check_token(bearer, source)
            return
        session = request.cookies.get(SESSION_COOKIE)
        if session is None:
            raise AuthenticationFailed(
                "the control plane needs its admin token: send 'Authorization: Bearer <token>' "
                "(the CLI reads it from AGENTMESH_TOKEN or the control plane's data dir)"
            )
        self.limiter.check(source)
        if not self.sessions.valid(session):
            self.limiter.failed(source, "invalid or expired session cookie")
            raise AuthenticationFailed("the dashboard session has expired: sign in again")
        if request.method not in _SAFE_METHODS and not same_origin(request, require=True):
            raise PolicyDenied(
                f"cross-site request refused: a {request.method} authorized by the session "
                "cookie must come from the control plane's own pages (Origin)"
            )

    def check_token(self, token: str, source: str) -> None:
        """The admin token, or AuthenticationFailed (RateLimited past the failure limit)."""
        self.limiter.check(source)
        if not hmac.compare_digest(token.encode(), self._token):
            self.limiter.failed(source, "wrong admin token")
            raise AuthenticationFailed("wrong admin token")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


@dataclass(frozen=True, slots=True)
class ControlSecurity:
    """What ``create_app`` needs for the security API and its authentication."""

    issuer: Issuer
    auth: AdminAuth


def security_router(issuer: Issuer) -> APIRouter:
    router = APIRouter(tags=["identity"], responses={401: _PROBLEM, 403: _PROBLEM})

    @router.get("/v1/trust-bundle")
    async def trust_bundle() -> TrustBundle:
        """The CA roots every sidecar trusts, signed (open: joining workloads pin it)."""
        return issuer.ca.bundle

    @router.post("/v1/certificates")
    async def certificates(request: CertificateRequest) -> IssuedCertificate:
        """Sign a CSR: with a join token (enrolment) or a proof by the current key (renewal)."""
        return await issuer.certificate(request)

    @router.post("/v1/tokens")
    async def create_token(request: JoinTokenRequest) -> JoinToken:
        """A join token for one agent (or client) name; the secret is shown only here."""
        return await issuer.create_token(request)

    @router.get("/v1/identities")
    async def identities() -> list[IdentityRecord]:
        """Every certificate issued and not yet expired, with its revocation state."""
        return await issuer.identities()

    @router.get("/v1/revocations")
    async def revocations() -> list[Revocation]:
        """The revocations in force (the signed list; entries leave it after their expiry)."""
        return sorted((await issuer.revocation_list()).revoked, key=lambda r: r.revoked_at)

    @router.post("/v1/revocations")
    async def revoke(request: RevocationRequest) -> RevocationResult:
        """Revoke a certificate (serial, with or without a record of its issuance) or an
        identity (agent name or SPIFFE ID): every sidecar refuses it within about a second; a
        revoked name cannot re-enrol with an older token. ``kind`` says what ``target`` is; an
        ambiguous target (``cafe``: a serial or a name?) is refused."""
        return await issuer.revoke(request)

    @router.post("/v1/ca/rotate", responses={409: _PROBLEM})
    async def rotate() -> TrustBundle:
        """New root CA; the bundle keeps the old root until its last leaf has expired, so no
        call fails during the rotation. 409 with an operator-supplied CA: rotating it is the
        operator's job."""
        return await issuer.rotate()

    return router
