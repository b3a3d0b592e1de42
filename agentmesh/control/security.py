"""The control plane's security API and its admin authentication.

Every route needs the admin token (``Authorization: Bearer <token>``, or the
``agentmesh_token`` cookie for the dashboard in a browser), compared in constant time, except:

- what a joining workload needs before it has any credential: ``/v1/bootstrap``,
  ``/v1/trust-bundle`` (public roots), ``/v1/certificates`` (authenticated by its own join
  token or current certificate);
- ``/healthz`` (probes), ``/metrics`` (counts only; a scraper holding the admin token could
  write), ``/docs`` with its assets and ``/openapi.json`` (the API's shape is not a secret; every
  operation still needs the token);
- with ``AGENTMESH_PUBLIC_READ=true``, every GET (registry, policies, stats): for a trusted
  network or a read-only dashboard. Writes (tokens, revocations, rotation, policies) never.

A failure is a 401 problem document with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import APIRouter, Request

from agentmesh.control.issuer import Issuer
from agentmesh.errors import AuthenticationFailed
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
COOKIE = "agentmesh_token"
_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}


class AdminAuth:
    """FastAPI dependency: the admin token, or one of the documented exceptions."""

    def __init__(self, token: str, *, public_read: bool = False) -> None:
        self._token = token.encode()
        self.public_read = public_read

    async def __call__(self, request: Request) -> None:
        if request.url.path in OPEN_PATHS:
            return
        if self.public_read and request.method in ("GET", "HEAD"):
            return
        presented = _bearer(request.headers.get("authorization")) or request.cookies.get(COOKIE)
        if presented is None:
            raise AuthenticationFailed(
                "the control plane needs its admin token: send 'Authorization: Bearer <token>' "
                "(the CLI reads it from AGENTMESH_TOKEN or the control plane's data dir)"
            )
        if not hmac.compare_digest(presented.encode(), self._token):
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

    @router.post("/v1/ca/rotate")
    async def rotate() -> TrustBundle:
        """New root CA; the bundle keeps the old root until its last leaf has expired, so no
        call fails during the rotation."""
        return await issuer.rotate()

    return router
