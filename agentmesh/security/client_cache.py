"""A client's certificate kept between runs, so that each CLI command does not enrol anew.

Every ``agentmesh call`` (and every script's ``connect()``) used to enrol a fresh client identity:
thirty commands left thirty ``client/<user>`` certificates in the CA's records. Now the client's
key and the CA's whole answer (:class:`IssuedCertificate`: certificate, chain, trust bundle, and
whatever else enrolment hands out) are kept in
``<data dir>/client-certs/<name>-<mesh>.json`` (0600, directory 0700) and reused while more than
half of the certificate's lifetime is left, the point where sidecars renew theirs too. The NATS
user JWT that came with the certificate is bound to an NKEY of the client's: its seed is kept
alongside the certificate's key.

The file name carries a digest of where certificates come from (the CA file and lifetime, else
the control plane's URL), the NATS URL and the registry bucket, so two meshes sharing a data dir
never swap certificates. The cache is trusted as far as the data dir is: the join token it would
otherwise enrol with lies next to it, with the same mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agentmesh.models import IssuedCertificate, TrustBundle
from agentmesh.security.files import check_private, write_private
from agentmesh.security.identity import LeafRefused, SpiffeId, check_leaf
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from cryptography import x509

    from agentmesh.security.pki import PrivateKey

__all__ = ["CachedIdentity", "cache_path", "discard", "load", "save"]

#: Reuse a cached certificate while more than this share of its lifetime is left.
_REUSE_WHILE_LEFT = 0.5


@dataclass(frozen=True, slots=True)
class CachedIdentity:
    key: PrivateKey
    issued: IssuedCertificate
    certs: list[x509.Certificate]
    """The issued leaf, then its chain (parsed from ``issued``)."""
    issued_at: float
    nats_seed: str | None = None
    """Seed of the NKEY ``issued.nats_jwt`` was signed for."""

    @property
    def bundle(self) -> TrustBundle:
        return self.issued.trust_bundle


def cache_path(settings: Settings, name: str) -> Path:
    """Where the client ``name``'s certificate for this mesh is kept."""
    # With the CA's files this process issues for itself, with its own cert_ttl: a certificate
    # issued under another lifetime is another configuration's.
    source = (
        f"{settings.ca_cert_file}|{settings.cert_ttl}"
        if settings.ca_cert_file
        else settings.control_url
    )
    mesh = f"{source}|{settings.nats_url or ''}|{settings.registry_bucket}"
    digest = hashlib.sha256(mesh.encode()).hexdigest()[:16]
    return settings.data_dir / "client-certs" / f"{name}-{digest}.json"


def load(path: Path, name: str, now: float | None = None) -> CachedIdentity | None:
    """The cached identity of client ``name`` if it is whole, its own, and fresh enough; else None.

    Anything unexpected (a missing, corrupt or foreign file) means "enrol as if there were none".
    """
    from agentmesh.security.pki import load_certs, load_key, same_public_key

    check_private(path)  # it holds a private key: one others could read is refused, not used
    try:
        data = json.loads(path.read_bytes())
        issued = IssuedCertificate.model_validate(data["issued"])
        key = load_key(data["key"].encode())
        certs = [c for text in (issued.certificate, *issued.chain) for c in load_certs(text)]
        issued_at = float(data["issued_at"])
        nats_seed = data.get("nats_seed")
        if issued.nats_jwt is not None and not isinstance(nats_seed, str):
            return None  # a JWT without its key is useless
        if nats_seed is not None:
            from agentmesh.security.natsjwt import NKey

            NKey.from_seed(nats_seed)  # ValueError: not one
        leaf = certs[0]
        domain = issued.trust_bundle.trust_domain
        if check_leaf(leaf, domain).id != SpiffeId(domain, "client", name):
            return None
        if not same_public_key(leaf.public_key(), key.public_key()):
            return None
    except (OSError, ValueError, KeyError, TypeError, IndexError, ValidationError, LeafRefused):
        return None
    not_after = leaf.not_valid_after_utc.timestamp()
    now = time.time() if now is None else now
    if not_after - now <= (not_after - issued_at) * _REUSE_WHILE_LEFT:
        return None
    return CachedIdentity(key, issued, certs, issued_at, nats_seed)


def save(
    path: Path,
    key: PrivateKey,
    issued: IssuedCertificate,
    issued_at: float,
    nats_seed: str | None = None,
) -> None:
    """Keep a freshly issued identity for the next run (atomically, readable by this user only)."""
    from agentmesh.security.pki import key_pem

    data = {
        "key": key_pem(key).decode("ascii"),
        "issued": issued.model_dump(mode="json"),
        "issued_at": issued_at,
        "nats_seed": nats_seed,
    }
    write_private(path, json.dumps(data).encode())


def discard(path: Path) -> None:
    """Forget a cached identity (revoked, or from another CA)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
