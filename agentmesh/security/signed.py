"""Signed mesh state: the one place that decides where a document read from NATS came from.

NATS is storage, not an authority: an operator may run it with loose permissions, and anyone who
can write a bucket could otherwise grant themselves a policy, a token or an identity. So:

- **control-plane state** (the revocation list, the policy set, join-token records) is a
  :class:`~agentmesh.models.SignedState`: the document, a version that only grows, and a
  signature by the mesh CA's signing key. The control plane holds that key anyway (it signs every
  certificate and the trust bundle), every sidecar already trusts it, and a CA certificate
  (CA:true, keyCertSign) is exactly what no workload can hold. The signed bytes name the kind of
  document, so one kind never passes for another, and the verifier rejects a leaf as signer.
- **registry records** are signed by the workload that registers them, with the key of its mesh
  certificate, which the record carries; the certificate must chain to the trust roots and name
  the record's agent, so no workload can publish a record for another.

Each kind has one function here (``revocations``, ``policies``, ``token``, ``record``): readers
call it where state enters from KV (the security view, the policy cache, the registry index, the
issuer), never on the request path. Versions are checked by the reader that keeps the last good
state (it knows the last version it took).

cryptography is imported by this module: only workloads with mTLS on import it.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from pydantic import BaseModel, ValidationError

from agentmesh.models import (
    AgentRecord,
    PolicySet,
    RecordProof,
    RevocationList,
    SignedState,
    StoredToken,
)
from agentmesh.registry.store import record_part
from agentmesh.security.identity import LeafRefused, SpiffeId, check_leaf
from agentmesh.security.pki import (
    PrivateKey,
    check_chain,
    digest_sign,
    digest_verify,
    load_certs,
    pem,
    verify_ca_signature,
)

__all__ = ["Kind", "Refused", "StateTrust", "next_version", "seal_record", "sign_state"]

Kind = Literal["revocations", "policies", "token"]
_M = TypeVar("_M", bound=BaseModel)

_STATE_CONTEXT = b"agentmesh signed state v1\n"
_RECORD_CONTEXT = b"agentmesh registry record v1\n"
#: Verified record certificates remembered (a record re-signed with the same certificate, for
#: a status change, is then one signature check); cleared when full or when the roots change.
_CERT_CACHE = 256
#: Registry values this process has proven (SHA-256 of roots, trust domain and bytes → the signing
#: certificate's expiry), shared by every index in it: several sidecars in one process (an
#: agent and its callers, the demo, benchmarks) check a value once. Cleared when full.
_PROVEN: dict[bytes, float] = {}
_PROVEN_MEMORY = 16_384


class Refused(ValueError):
    """State read from NATS that is not taken; the message says why (for the log)."""


def _state_bytes(kind: str, version: int, payload: str) -> bytes:
    return _STATE_CONTEXT + f"{kind}\n{version}\n".encode() + payload.encode()


def next_version(previous: int) -> int:
    """The version after ``previous``: microseconds since the epoch, or ``previous + 1``.

    Time-based, so a control plane that restarted without memory (or a second one) still
    writes a version above every one already taken, even if the document was deleted from KV.
    """
    return max(previous + 1, time.time_ns() // 1000)


def sign_state(
    kind: Kind,
    version: int,
    document: BaseModel,
    key: PrivateKey,
    signer: x509.Certificate,
    chain: Sequence[x509.Certificate] = (),
) -> SignedState:
    """``document`` signed by a CA's ``key`` (whose certificate is ``signer``)."""
    payload = document.model_dump_json()
    signature = digest_sign(key, _state_bytes(kind, version, payload))
    return SignedState(
        kind=kind,
        version=version,
        payload=payload,
        signer=pem(signer),
        chain=[pem(c) for c in chain],
        signature=base64.b64encode(signature).decode("ascii"),
    )


def seal_record(record: bytes, key: PrivateKey, certs: Sequence[x509.Certificate]) -> bytes:
    """A registry value: the record's JSON, then a line with the workload's proof of it."""
    proof = RecordProof(
        certificate=[pem(c) for c in certs],
        signature=base64.b64encode(digest_sign(key, _RECORD_CONTEXT + record)).decode("ascii"),
    )
    return record + b"\n" + proof.model_dump_json().encode()


class StateTrust:
    """What a workload with mTLS takes from NATS, checked against its current trust roots.

    ``roots`` and ``trust_domain`` are read at each check (the bundle may rotate).
    """

    def __init__(
        self, roots: Callable[[], Sequence[x509.Certificate]], trust_domain: Callable[[], str]
    ) -> None:
        self._roots = roots
        self._trust_domain = trust_domain
        self._certs: dict[str, tuple[x509.Certificate, SpiffeId]] = {}
        self._certs_for: Sequence[x509.Certificate] | None = None
        self._issuers: list[x509.Certificate] = []
        self._roots_key = b""

    # ---- control-plane state -------------------------------------------------------------------

    def revocations(self, data: bytes) -> tuple[int, RevocationList]:
        """The revocation list and its version, if the mesh CA signed it."""
        version, payload = self._open(data, "revocations")
        return version, _parse(RevocationList, payload, "revocation list")

    def policies(self, data: bytes) -> tuple[int, PolicySet]:
        """The policy set and its version, if the mesh CA signed it."""
        version, payload = self._open(data, "policies")
        return version, _parse(PolicySet, payload, "policy set")

    def token(self, data: bytes) -> tuple[int, StoredToken]:
        """A join-token record and its version, if the mesh CA signed it."""
        version, payload = self._open(data, "token")
        return version, _parse(StoredToken, payload, "join-token record")

    def _open(self, data: bytes, kind: Kind) -> tuple[int, str]:
        try:
            state = SignedState.model_validate_json(data)
        except ValidationError as exc:
            raise Refused(f"not a signed {kind} document (unsigned or malformed): {exc}") from None
        if state.kind != kind:
            raise Refused(f"a signed {state.kind} document where {kind} belongs")
        try:
            verify_ca_signature(
                state.signer,
                state.chain,
                state.signature,
                _state_bytes(state.kind, state.version, state.payload),
                self._roots(),
            )
        except ValueError as exc:
            raise Refused(f"{kind} v{state.version} is not signed by the mesh CA: {exc}") from None
        return state.version, state.payload

    # ---- registry records ---------------------------------------------------------------------

    def record(self, key: str, value: bytes, claim: AgentRecord | None = None) -> AgentRecord:
        """The record under ``key`` if the workload it names signed it.

        ``claim`` is the record's JSON in ``value`` already parsed (the registry index parses a
        snapshot's records before verifying them), so it is not parsed twice.

        An agent with mTLS off has no key: its record goes unsigned, and is taken only as what
        it is, a plaintext agent that claims no identity (``mtls: off``, no ``identity``). Only
        callers that accept plaintext ever call it, and an ``https://`` endpoint in it must
        still prove the record's agent name in its handshake.
        """
        body = record_part(value)
        try:
            record = claim if claim is not None else AgentRecord.model_validate_json(body)
        except ValidationError as exc:
            raise Refused(f"malformed registry record: {exc.errors()[:3]}") from None
        if len(body) == len(value):
            if record.identity is not None or record.mtls != "off":
                raise Refused(
                    f"record {key!r} (agent {record.name!r}) is not signed, yet claims mTLS "
                    f"{record.mtls} and identity {record.identity}: only an agent with mTLS off "
                    "registers unsigned"
                )
            return record
        self._refresh_roots()
        domain = self._trust_domain().encode()
        proven = hashlib.sha256(self._roots_key + domain + b"\n" + value).digest()
        until = _PROVEN.get(proven)
        if until is not None and time.time() <= until:
            return record  # this process checked these very bytes against these roots
        try:
            proof = RecordProof.model_validate_json(value[len(body) + 1 :])
            leaf, identity = self._certificate(proof.certificate)
            digest_verify(leaf, base64.b64decode(proof.signature), _RECORD_CONTEXT + body)
        except (ValidationError, ValueError, TypeError, InvalidSignature) as exc:
            raise Refused(
                f"record {key!r} (agent {record.name!r}) has no valid signature: "
                f"{exc or type(exc).__name__}"
            ) from None
        expected = SpiffeId(identity.trust_domain, "agent", record.name)
        if identity != expected or record.identity != identity.uri:
            raise Refused(
                f"record {key!r} claims agent {record.name!r} (identity {record.identity}) but is "
                f"signed by {identity}"
            )
        if len(_PROVEN) >= _PROVEN_MEMORY:
            _PROVEN.clear()
        _PROVEN[proven] = leaf.not_valid_after_utc.timestamp()
        return record

    def _refresh_roots(self) -> None:
        roots = self._roots()
        if roots is not self._certs_for:
            self._certs, self._certs_for = {}, roots
            self._issuers = [r for r in roots if _is_ca(r)]
            self._roots_key = b"".join(sorted(r.fingerprint(hashes.SHA256()) for r in roots))

    def _certificate(self, pems: Sequence[str]) -> tuple[x509.Certificate, SpiffeId]:
        self._refresh_roots()
        roots = self._certs_for or ()
        cached = self._certs.get(pems[0])
        now = datetime.now(UTC)
        if cached is not None:
            if not cached[0].not_valid_before_utc <= now <= cached[0].not_valid_after_utc:
                raise ValueError("the signing certificate is expired")
            return cached
        leaf, *chain = [c for text in pems for c in load_certs(text)]
        try:
            identity = check_leaf(leaf, self._trust_domain()).id  # its validity period too
        except LeafRefused as exc:
            raise ValueError(str(exc)) from None
        if not chain and any(_issued_by(leaf, root) for root in self._issuers):
            pass  # the common case, a leaf straight under a root: one signature check
        else:
            check_chain(leaf, chain, roots, signer_is_ca=False, now=now)
        if len(self._certs) >= _CERT_CACHE:
            self._certs.clear()
        self._certs[pems[0]] = (leaf, identity)
        return leaf, identity


def _parse(model: type[_M], payload: str, what: str) -> _M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise Refused(f"a signed but malformed {what}: {exc}") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        check_chain(cert, (), (cert,), signer_is_ca=True)
    except ValueError:
        return False
    return True


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer`` signed ``leaf``; cryptography compares the names first (in Rust, cheaply)."""
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
