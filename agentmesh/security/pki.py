"""X.509 building blocks shared by the CA and the sidecars: keys, CSRs, TLS contexts, bundles.

TLS profile (both directions): TLS 1.2 exactly, ECDHE with AES-GCM or ChaCha20, no session
tickets, the peer's chain verified against the trust bundle by OpenSSL, no host name checks
(mesh identities are URI SANs, checked by :func:`agentmesh.security.identity.check_leaf`).

Why TLS 1.2 and not 1.3: Python has no certificate-verify callback, so the mesh checks what
OpenSSL does not (exactly one URI SAN, no CA certificate as a leaf, the trust domain) right after
OpenSSL accepted the chain. In TLS 1.2 the server has not sent its ``Finished`` yet at that
moment, so refusing there is a *handshake* failure for the caller: it provably never sent its
request (``ConnectionFailed``, safe to retry elsewhere). In TLS 1.3 the client finishes its
handshake before the server has even looked at the client certificate, so every refusal would
look like a connection lost after sending, which a caller cannot tell from a crash.

Private keys never touch a disk: they are handed to OpenSSL through an anonymous in-memory file
(``memfd_create``), or, where that does not exist, a 0600 file that is deleted at once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from agentmesh.models import BundleSignature, TrustBundle

__all__ = [
    "PrivateKey",
    "bundle_payload",
    "check_chain",
    "client_context",
    "digest_sign",
    "digest_verify",
    "fingerprint",
    "key_pem",
    "load_certs",
    "load_key",
    "new_csr",
    "new_key",
    "pem",
    "same_public_key",
    "server_context",
    "sign_bundle",
    "verify_bundle",
    "verify_ca_signature",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key (the mesh's only key type for the keys it makes)."""
    return ec.generate_private_key(ec.SECP256R1())


def new_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> x509.CertificateSigningRequest:
    """A CSR whose only identity is ``spiffe_id`` (the CA copies nothing else from it)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentmesh")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certs(data: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in order."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    return x509.load_pem_x509_certificates(raw)


def load_key(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported CA key type {type(key).__name__}; use EC or RSA")
    return key


def same_public_key(a: object, b: object) -> bool:
    """Whether two public keys are the same key (compared as SubjectPublicKeyInfo DER)."""

    def spki(key: object) -> bytes:
        public_bytes = getattr(key, "public_bytes", None)
        if public_bytes is None:
            return b""
        data: bytes = public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data

    return bool(spki(a)) and spki(a) == spki(b)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex (what tokens pin)."""
    return cert.fingerprint(hashes.SHA256()).hex()


# ---- TLS contexts ---------------------------------------------------------------------------


def _base(purpose: int, roots: Sequence[x509.Certificate]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata="".join(pem(c) for c in roots))
    return ctx


def server_context(
    key: PrivateKey, certs: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> ssl.SSLContext:
    """Serve as ``certs[0]``; verify any client certificate against ``roots``.

    Client certificates are *optional* at the TLS layer (a presented one must verify, or the
    handshake fails): probes and Prometheus may connect without one, and the inbound refuses
    ``/v1/invoke`` to a caller without an identity in strict mode.
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, roots)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, key, certs)
    return ctx


def client_context(
    key: PrivateKey | None,
    certs: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> ssl.SSLContext:
    """Present ``certs[0]`` (unless ``key`` is None); require a server chain to ``roots``."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, roots)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if key is not None:
        _load_chain(ctx, key, certs)
    return ctx


def _load_chain(ctx: ssl.SSLContext, key: PrivateKey, certs: Sequence[x509.Certificate]) -> None:
    data = key_pem(key) + "".join(pem(c) for c in certs).encode("ascii")
    with _secret_file(data) as path:
        ctx.load_cert_chain(path)


@contextlib.contextmanager
def _secret_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, gone when the block ends."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("agentmesh-credential", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="agentmesh-", suffix=".pem")  # 0600 by construction
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# ---- signed trust bundles ---------------------------------------------------------------------


def bundle_payload(bundle: TrustBundle) -> bytes:
    """The bytes a bundle's signatures cover: everything but the signatures."""
    return (
        bundle.model_copy(update={"signatures": []})
        .model_dump_json(exclude={"signatures"})
        .encode()
    )


def digest_sign(key: PrivateKey, data: bytes) -> bytes:
    """A SHA-256 signature by ``key`` (ECDSA deterministic per RFC 6979, or RSA PKCS#1 v1.5).

    Deterministic, so the same bytes signed twice are the same bytes (a lease renewal then
    rewrites an identical record, which watchers skip).
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def digest_verify(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    """Raises InvalidSignature unless ``cert``'s key signed ``data`` (SHA-256)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature(f"unsupported signer key {type(public).__name__}")


def sign_bundle(
    bundle: TrustBundle,
    key: PrivateKey,
    signer: x509.Certificate,
    chain: Iterable[x509.Certificate] = (),
) -> TrustBundle:
    """``bundle`` with one more signature, by ``key`` (whose certificate is ``signer``)."""
    signature = BundleSignature(
        signer=pem(signer),
        chain=[pem(c) for c in chain],
        signature=base64.b64encode(digest_sign(key, bundle_payload(bundle))).decode("ascii"),
    )
    return bundle.model_copy(update={"signatures": [*bundle.signatures, signature]})


def verify_bundle(bundle: TrustBundle, trusted: Sequence[x509.Certificate]) -> None:
    """Accept ``bundle`` only if a CA we already trust (a root, or a CA under one) signed it.

    This is what keeps a writer of the NATS KV bucket from slipping its own root into every
    sidecar: a new root reaches sidecars only inside a bundle signed by the old one (rotation).
    The signer must be a CA certificate (CA:true, keyCertSign): an ordinary leaf chaining to a
    trusted root is no authority over roots. Raises ValueError saying why a bundle is refused.
    """
    payload = bundle_payload(bundle)
    problems: list[str] = []
    for sig in bundle.signatures:
        try:
            verify_ca_signature(sig.signer, sig.chain, sig.signature, payload, trusted)
            return
        except ValueError as exc:
            problems.append(str(exc) or type(exc).__name__)
    detail = "; ".join(problems) if problems else "it has no signature"
    raise ValueError(f"trust bundle v{bundle.version} is not signed by a trusted CA: {detail}")


def verify_ca_signature(
    signer_pem: str,
    chain_pems: Sequence[str],
    signature: str,
    payload: bytes,
    trusted: Sequence[x509.Certificate],
) -> x509.Certificate:
    """The signer, if it is a CA chaining to ``trusted`` and its key signed ``payload``.

    Raises ValueError saying why not (the signer is no CA, does not chain, is expired, or the
    signature does not match).
    """
    try:
        signer, *chain = load_certs(signer_pem) + [c for p in chain_pems for c in load_certs(p)]
        check_chain(signer, chain, trusted, signer_is_ca=True)
        digest_verify(signer, base64.b64decode(signature), payload)
    except (InvalidSignature, TypeError) as exc:
        raise ValueError(f"bad signature: {exc or type(exc).__name__}") from exc
    return signer


def check_chain(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    trusted: Sequence[x509.Certificate],
    *,
    signer_is_ca: bool,
    now: datetime | None = None,
) -> None:
    """Raises ValueError unless ``cert`` chains to ``trusted`` through ``chain``, all valid now.

    Every certificate that vouches for another on the way (and ``cert`` itself when
    ``signer_is_ca``) must be a CA: CA:true with keyCertSign.
    """
    now = now or datetime.now(UTC)
    by_fingerprint = {fingerprint(r): r for r in trusted}
    if signer_is_ca:
        _require_ca(cert)
    current = cert
    for candidate in [*chain, None]:
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise ValueError(f"signer {current.subject.rfc4514_string()} is expired")
        if fingerprint(current) in by_fingerprint:
            return
        for root in trusted:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                _require_ca(root)
                current.verify_directly_issued_by(root)
                return
        if candidate is None:
            break
        _require_ca(candidate)
        try:
            current.verify_directly_issued_by(candidate)
        except (TypeError, InvalidSignature) as exc:
            raise ValueError(
                f"{current.subject.rfc4514_string()} is not issued by "
                f"{candidate.subject.rfc4514_string()}"
            ) from exc
        current = candidate
    raise ValueError(f"signer {cert.subject.rfc4514_string()} does not chain to a trusted root")


def _require_ca(cert: x509.Certificate) -> None:
    """A certificate may vouch for others only if it is a CA: CA:true and keyCertSign.

    (Without a KeyUsage extension every usage is allowed, as RFC 5280 says; without
    BasicConstraints a certificate is never a CA.)
    """
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        cert_sign = cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        cert_sign = True
    if not is_ca or not cert_sign:
        raise ValueError(
            f"signer {cert.subject.rfc4514_string()} is not a CA certificate "
            "(CA:true with keyCertSign)"
        )


def sha256_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode("ascii").rstrip("=")
