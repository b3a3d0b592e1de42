"""The control plane's HTTPS: a server certificate from the mesh CA, kept current.

The certificate names the control plane (``spiffe://<td>/control``) and the hosts it is reached
by (``AGENTMESH_CONTROL_HOSTS``, plus localhost, the loopback addresses, this machine's name and
the bind address), so clients verify it like any web server's: chain to the mesh root and host
name. It is re-issued, for every *new* connection, at half its lifetime, or when the root it
chains to has left the trust bundle. A root rotation alone does not re-issue it: clients that
still trust only the old root (a CLI that read ``roots.pem`` before, a pinned file) keep
verifying it until it is renewed under the new root, by which time they have had half a
certificate lifetime to learn the new bundle. The bundle's roots are written to ``roots.pem`` in
the data dir whenever it changes, where local processes find them
(``agentmesh.security.control_trust``).

The server is the agents' own uvicorn protocol (``agentmesh.inbound.tls``), so the control
plane has the same bounds on handshakes, request heads and idle connections; a plaintext request
is refused with a 401 problem document naming the https:// URL. ``--insecure-http`` (mode
``off``) serves plain HTTP instead, for development only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from agentmesh.control.ca import CertificateAuthority
from agentmesh.security.files import ROOTS_FILE, write_public
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import new_key, pem, web_server_context

__all__ = ["PLAINTEXT_REFUSAL", "ControlTLS", "control_hosts"]

#: What a plaintext request to an HTTPS control plane is told (a 401 problem document).
PLAINTEXT_REFUSAL = (
    "the {owner} serves HTTPS only: plaintext refused (use its https:// URL; tokens never "
    "travel in clear)"
)

_log = logging.getLogger("agentmesh.control")


def control_hosts(bind_host: str, configured: str) -> list[str]:
    """The names the certificate carries: the configured ones, this machine's, loopback."""
    hosts = [h.strip() for h in configured.split(",") if h.strip()]
    hosts += ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if bind_host not in ("", "0.0.0.0", "::"):
        hosts.append(bind_host)
    return list(dict.fromkeys(hosts))


class ControlTLS:
    """``ServerTLS`` for the control plane (see the module docstring)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        hosts: Iterable[str],
        data_dir: Path,
        *,
        insecure: bool = False,
    ) -> None:
        self.ca = ca
        self.hosts = list(hosts)
        self._roots_file = data_dir / ROOTS_FILE
        self.mode: Literal["strict", "permissive", "off"] = "off" if insecure else "strict"
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0
        self._bundle_version = -1
        self._anchor = ""
        if not insecure:
            self.server_context()

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def roots_file(self) -> Path:
        return self._roots_file

    def server_context(self) -> ssl.SSLContext:
        """The context for the next connection; a fresh certificate when one is due."""
        bundle = self.ca.bundle
        if bundle.version != self._bundle_version:
            write_public(self._roots_file, "".join(bundle.roots).encode("ascii"))
            self._bundle_version = bundle.version
        if (
            self._context is None
            or time.time() >= self._renew_at
            or self._anchor not in bundle.roots
        ):
            self._context = self._issue()
        return self._context

    def _issue(self) -> ssl.SSLContext:
        key = new_key()
        leaf = self.ca.issue(
            key.public_key(), SpiffeId(self.ca.trust_domain, "control"), hosts=self.hosts
        )
        issued = leaf.not_valid_before_utc.timestamp()
        self._renew_at = issued + (leaf.not_valid_after_utc.timestamp() - issued) / 2
        _log.info("control plane HTTPS certificate %x for %s", leaf.serial_number, self.hosts)
        signer = self.ca.signer
        intermediates = [] if signer.issuer == signer.subject else [signer]
        chain = [leaf, *intermediates, *self.ca.chain]
        # The root it chains to: the signer itself, or the root the operator's chain ends with.
        top = chain[-1]
        root = next((r for r in self.ca.roots if r.subject == top.issuer), top)
        self._anchor = pem(root)
        return web_server_context(key, chain)
