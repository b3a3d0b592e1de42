"""Join tokens and the enrolment client.

A join token is ``amt1.<pin>.<secret>``:

- ``secret``: 32 random bytes (base64url). The control plane stores only its SHA-256, in KV,
  with the identity it may enrol, an expiry and a number of uses (single-use by default;
  ``--uses N`` or ``--reusable`` for replicas). Spending a use is compare-and-set, so two
  enrolments cannot share a single-use token.
- ``pin``: the first 128 bits of the SHA-256 of a root CA certificate. Before it sends the token
  anywhere, a joining sidecar checks that the control plane's trust bundle contains the pinned
  root *and* is signed by it, and then verifies the control plane's HTTPS certificate against
  those roots (``agentmesh.security.control_trust``): a control plane (or anything on the path)
  that cannot show that root never sees the token, and cannot hand out a bundle of its own.

Renewal never uses the token: the sidecar proves possession of its current key (a signature over
the new CSR and a timestamp) and the CA checks the current certificate (its own, unexpired, not
revoked, same identity). A replayed renewal only yields a certificate for a key the attacker
does not have.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pydantic import ValidationError

from agentmesh.errors import (
    AuthenticationFailed,
    ConfigurationError,
    MeshError,
    RegistryUnavailable,
    error_from_problem,
)
from agentmesh.models import (
    CertificateRequest,
    IssuedCertificate,
    Problem,
    RenewalProof,
    TrustBundle,
)
from agentmesh.security.control_trust import control_error, guard_cleartext
from agentmesh.security.pki import PrivateKey, fingerprint, load_certs, pem, verify_bundle

__all__ = [
    "PIN_HEX",
    "RemoteIssuer",
    "check_pinned",
    "format_token",
    "new_token",
    "parse_token",
    "renewal_payload",
    "renewal_proof",
    "token_digest",
]

_PREFIX = "amt1"
PIN_HEX = 32


def new_token(root: x509.Certificate) -> tuple[str, str]:
    """A fresh token pinned to ``root``: (the token, the digest to store)."""
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    return format_token(fingerprint(root)[:PIN_HEX], secret), token_digest(secret)


def format_token(pin: str, secret: str) -> str:
    return f"{_PREFIX}.{pin}.{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """(pin, secret) of a join token; AuthenticationFailed if it is not one."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != _PREFIX or len(parts[1]) != PIN_HEX or not parts[2]:
        raise AuthenticationFailed(
            "that is not an agentmesh join token (amt1.<pin>.<secret>); "
            "create one with `agentmesh token create`"
        )
    return parts[1], parts[2]


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def renewal_payload(csr_der: bytes, timestamp: datetime) -> bytes:
    return (
        b"agentmesh-renewal\n"
        + hashlib.sha256(csr_der).hexdigest().encode("ascii")
        + b"\n"
        + timestamp.isoformat().encode("ascii")
    )


def renewal_proof(
    key: PrivateKey, certs: list[x509.Certificate], csr: x509.CertificateSigningRequest
) -> RenewalProof:
    """Proof that we hold the key of our current certificate, bound to the new CSR."""
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    now = datetime.now(UTC)
    payload = renewal_payload(csr.public_bytes(serialization.Encoding.DER), now)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return RenewalProof(
        certificate="".join(pem(c) for c in certs),
        timestamp=now,
        signature=base64.b64encode(signature).decode("ascii"),
    )


def _pinned(bundle: TrustBundle, pin: str) -> x509.Certificate:
    for text in bundle.roots:
        for root in load_certs(text):
            if hmac.compare_digest(fingerprint(root)[:PIN_HEX], pin):
                return root
    raise AuthenticationFailed(
        "the control plane's trust bundle does not contain the CA this join token was made "
        "for (a different control plane, or the CA was rotated since): create a new token"
    )


def check_pinned(bundle: TrustBundle, pin: str, where: str) -> x509.Certificate:
    """The pinned root, if ``bundle`` holds it and is signed by it; AuthenticationFailed if not."""
    root = _pinned(bundle, pin)
    try:
        verify_bundle(bundle, [root])
    except ValueError as exc:
        raise AuthenticationFailed(f"control plane at {where}: {exc}; refusing to enrol") from None
    return root


class RemoteIssuer:
    """Enrol with, and renew through, the control plane's ``/v1/certificates``.

    ``verify``: what its HTTPS certificate must chain to (``control_trust.control_verify``)."""

    def __init__(
        self, control_url: str, token: str | None, *, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.control_url = control_url.rstrip("/")
        self._token = token
        self._verify = verify
        self._pin: str | None = None
        if token is not None:
            self._pin, _ = parse_token(token)
            guard_cleartext(self.control_url, sends_token=True)

    async def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        import httpx  # only a sidecar that enrols remotely needs an HTTP client

        url = f"{self.control_url}{path}"
        try:
            async with httpx.AsyncClient(verify=self._verify, timeout=10.0) as client:
                resp = await client.request(
                    method, url, content=body, headers={"content-type": "application/json"}
                )
        except httpx.HTTPError as exc:
            raise control_error(exc, self.control_url) from exc
        data, status = resp.content, resp.status_code
        if status != 200:
            try:
                problem = Problem.model_validate_json(data)
            except ValidationError:
                raise RegistryUnavailable(
                    f"control plane at {self.control_url}{path}: HTTP {status}"
                ) from None
            raise error_from_problem(problem, where=f"control plane at {self.control_url}")
        return data

    async def trust_bundle(self) -> TrustBundle:
        """The control plane's bundle, checked against the token's pin."""
        data = await self._request("GET", "/v1/trust-bundle")
        try:
            bundle = TrustBundle.model_validate_json(data)
        except ValidationError as exc:
            raise RegistryUnavailable(
                f"control plane at {self.control_url} sent an unreadable trust bundle"
            ) from exc
        if self._pin is not None:
            check_pinned(bundle, self._pin, self.control_url)
        return bundle

    async def issue(self, request: CertificateRequest) -> IssuedCertificate:
        if request.renewal is None:
            if self._token is None:
                raise ConfigurationError("enrolment needs a join token")
            request = request.model_copy(update={"token": self._token})
        data = await self._request("POST", "/v1/certificates", request.model_dump_json().encode())
        try:
            return IssuedCertificate.model_validate_json(data)
        except ValidationError as exc:
            raise MeshError(
                f"control plane at {self.control_url} sent an unreadable certificate"
            ) from exc
