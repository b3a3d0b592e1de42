"""Zero trust for the mesh: identities, the CA's building blocks, mTLS, revocation.

See ``docs/security.md``. The pieces: ``identity`` (SPIFFE IDs, checking a peer certificate),
``pki`` (keys, CSRs, TLS contexts, signed trust bundles), ``store`` (the security KV bucket and
the watch-fed revocation view), ``enrol`` (join tokens, the enrolment client), ``workload`` (a
sidecar's identity and its renewal) and ``outbound`` (the check of who a new outbound connection
reached). The uvicorn protocol that authenticates callers is ``agentmesh.inbound.tls``; the CA
itself is in ``agentmesh.control.ca``.
"""

from agentmesh.security.identity import Caller, SpiffeId

__all__ = ["Caller", "SpiffeId"]
