"""One operator root, one intermediate CA per control plane: several control planes, one mesh.

Every sidecar trusts the root (it is the only root in the trust bundle); each control plane signs
with its own intermediate (``AGENTMESH_CA_CERT_FILE``: the intermediate, then the root;
``AGENTMESH_CA_KEY_FILE``: its key). Certificates issued by either chain to the same root, so
agents enrolled through one control plane call agents enrolled through the other, and a join
token (it pins the root) enrols through any of them. Losing one control plane's machine exposes
only its intermediate, which the operator replaces; the root key stays offline.

``write_operator_ca`` makes such a set for trying it out (``examples/deploy/operator_ca.py``); a
production root usually comes from the organisation's own PKI, with the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from agentmesh.control.ca import ROOT_LIFETIME, ca_certificate
from agentmesh.security.files import write_private
from agentmesh.security.pki import key_pem, new_key, pem

__all__ = ["write_operator_ca"]

INTERMEDIATE_LIFETIME = timedelta(days=365)
"""An intermediate is replaced more often than the root; a year keeps that a yearly chore."""


def write_operator_ca(
    directory: Path, trust_domain: str, planes: Sequence[str]
) -> dict[str, tuple[Path, Path]]:
    """``root.pem`` + ``root.key`` (keep the key offline) and, per control plane ``name``,
    ``<name>.pem`` (its intermediate, then the root) + ``<name>.key`` (0600).

    Returns ``name → (cert file, key file)``: that plane's AGENTMESH_CA_CERT_FILE/KEY_FILE.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    root_key = new_key()
    root = ca_certificate(
        f"agentmesh operator root {trust_domain[:40]}",
        root_key,
        issuer=None,
        path_length=1,  # one level of intermediates: the control planes' CAs
        lifetime=ROOT_LIFETIME,
    )
    write_private(directory / "root.key", key_pem(root_key))
    (directory / "root.pem").write_text(pem(root))
    files: dict[str, tuple[Path, Path]] = {}
    for name in planes:
        key = new_key()
        cert = ca_certificate(
            f"agentmesh control plane {name[:40]}",
            key,
            issuer=(root, root_key),
            path_length=0,  # signs leaves only
            lifetime=INTERMEDIATE_LIFETIME,
        )
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        write_private(key_file, key_pem(key))
        cert_file.write_text(pem(cert) + pem(root))
        files[name] = (cert_file, key_file)
    return files
