"""The one error tree of agentmesh.

Foreign exceptions (httpx, nats, ssl, OS) are converted where they enter the mesh,
with ``raise ... from exc``, so callers catch these classes only. Every message names what
failed. Over HTTP each error travels as ``application/problem+json`` with a stable ``code``
so that a caller in any language can act on it; :func:`error_from_problem` turns it back
into the same class on the calling side.

::

    MeshError                         code              status
    ├── ConfigurationError            configuration     500   the local setup is wrong
    ├── RegistrationError             invalid_registration 400 a record the registry refuses
    ├── CapabilityNotFound            capability_not_found 404 nobody offers it
    ├── RouteNotFound                 not_found         404   no such HTTP path on an agent
    ├── AuthenticationFailed          unauthenticated   401   no or bad credentials (mTLS, tokens)
    ├── PolicyDenied                  policy_denied     403   never retried
    ├── InvalidInput                  invalid_input     422   the function never ran
    ├── Conflict                      conflict          409   valid, but not in this state
    ├── PayloadTooLarge               payload_too_large 413
    ├── DeadlineExceeded              deadline_exceeded 504   the call's budget is spent
    ├── LoopDetected                  loop_detected     508   the call chain is too deep
    ├── RemoteAgentError              remote_error      500   the capability raised
    │   └── InvalidOutput             invalid_output    500   it returned the wrong shape
    └── MeshUnavailable               unavailable       503   the retryable family
        ├── NoHealthyEndpoints        no_healthy_endpoints 503
        ├── ConnectionFailed          connection_failed 503   never reached the agent
        │   └── UntrustedPeer         untrusted_peer    503   we refused the peer's TLS identity
        │       └── IdentityMismatch  identity_mismatch 503   it is not the agent the registry names
        ├── ConnectionLost            connection_lost   503   sent, then lost: it may have run
        ├── AgentUnavailable          agent_unavailable 503   reached, but it refused (draining)
        ├── RateLimited               rate_limited      429   refused before running (Retry-After)
        └── RegistryUnavailable       registry_unavailable 503 NATS or the control plane is gone
"""

from __future__ import annotations

from typing import Any, ClassVar

from agentmesh.models import Problem

__all__ = [
    "AgentUnavailable",
    "AuthenticationFailed",
    "CapabilityNotFound",
    "ConfigurationError",
    "Conflict",
    "ConnectionFailed",
    "ConnectionLost",
    "DeadlineExceeded",
    "IdentityMismatch",
    "InvalidInput",
    "InvalidOutput",
    "LoopDetected",
    "MeshError",
    "MeshUnavailable",
    "NoHealthyEndpoints",
    "PayloadTooLarge",
    "PolicyDenied",
    "RateLimited",
    "RegistrationError",
    "RegistryUnavailable",
    "RemoteAgentError",
    "RouteNotFound",
    "UntrustedPeer",
    "error_for_status",
    "error_from_problem",
]


class MeshError(Exception):
    """Base of every agentmesh error."""

    code: ClassVar[str] = "mesh_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Mesh error"

    def __init__(
        self,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors
        self.retry_after = retry_after
        #: The trace this failure belongs to (set by the sidecar; in problem documents too).
        self.trace_id: str | None = None

    def to_problem(self, instance: str | None = None) -> Problem:
        """The RFC 9457 document for this error."""
        return Problem(
            trace_id=self.trace_id,
            type=f"https://agentmesh.dev/errors/{self.code}",
            title=self.title,
            status=self.status,
            detail=self.message,
            code=self.code,
            instance=instance,
            errors=self.errors,
            retry_after=self.retry_after,
        )


class ConfigurationError(MeshError):
    code = "configuration"
    title = "Configuration error"


class RegistrationError(MeshError):
    code = "invalid_registration"
    status = 400
    title = "Invalid registration"


class CapabilityNotFound(MeshError):
    code = "capability_not_found"
    status = 404
    title = "Capability not found"


class RouteNotFound(MeshError):
    code = "not_found"
    status = 404
    title = "Not found"


class AuthenticationFailed(MeshError):
    """Missing, invalid, expired or revoked credentials: an admin token, a join token, or the
    caller's certificate (a strict agent refusing a caller without a mesh identity)."""

    code = "unauthenticated"
    status = 401
    title = "Authentication failed"


class PolicyDenied(MeshError):
    code = "policy_denied"
    status = 403
    title = "Denied by policy"


class InvalidInput(MeshError):
    code = "invalid_input"
    status = 422
    title = "Invalid input"


class Conflict(MeshError):
    """The request is valid, but not in the state things are in; the message says what to do."""

    code = "conflict"
    status = 409
    title = "Conflict"


class PayloadTooLarge(MeshError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class DeadlineExceeded(MeshError):
    code = "deadline_exceeded"
    status = 504
    title = "Deadline exceeded"


class LoopDetected(MeshError):
    code = "loop_detected"
    status = 508
    title = "Call chain too deep"


class RemoteAgentError(MeshError):
    code = "remote_error"
    status = 500
    title = "The capability failed"


class InvalidOutput(RemoteAgentError):
    code = "invalid_output"
    title = "The capability returned invalid output"


class MeshUnavailable(MeshError):
    code = "unavailable"
    status = 503
    title = "Unavailable"


class NoHealthyEndpoints(MeshUnavailable):
    code = "no_healthy_endpoints"
    title = "No healthy endpoints"


class ConnectionFailed(MeshUnavailable):
    code = "connection_failed"
    title = "Connection failed"


class UntrustedPeer(ConnectionFailed):
    """This sidecar refused to talk to the endpoint: its TLS identity is not acceptable
    (revoked, not a mesh identity, or a plaintext endpoint while mTLS is strict).

    Nothing was sent, so it is a ``ConnectionFailed``: the call may go to another instance, and
    the breaker ejects the untrusted one.
    """

    code = "untrusted_peer"
    title = "Untrusted peer"


class IdentityMismatch(UntrustedPeer):
    """The endpoint proved an identity other than the agent its registry record names: a
    record pointing at another agent's address (or an impostor). Names both identities."""

    code = "identity_mismatch"
    title = "Identity mismatch"


class ConnectionLost(MeshUnavailable):
    code = "connection_lost"
    title = "Connection lost"


class AgentUnavailable(MeshUnavailable):
    code = "agent_unavailable"
    title = "Agent unavailable"


class RateLimited(MeshUnavailable):
    code = "rate_limited"
    status = 429
    title = "Rate limited"


class RegistryUnavailable(MeshUnavailable):
    code = "registry_unavailable"
    title = "Registry unavailable"


def _all_subclasses(cls: type[MeshError]) -> list[type[MeshError]]:
    out: list[type[MeshError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_ERROR_CLASSES: list[type[MeshError]] = [MeshError, *_all_subclasses(MeshError)]
_BY_CODE: dict[str, type[MeshError]] = {c.code: c for c in _ERROR_CLASSES}
#: For problem documents with a code we do not know (a newer peer, another implementation).
_BY_STATUS: dict[int, type[MeshError]] = {
    429: RateLimited,
    502: MeshUnavailable,
    503: MeshUnavailable,
    504: MeshUnavailable,
}


def error_from_problem(problem: Problem, *, where: str) -> MeshError:
    """Rebuild the error a remote sidecar sent; ``where`` names the agent it came from."""
    cls = _BY_CODE.get(problem.code)
    if cls is None:
        cls = _BY_STATUS.get(problem.status, RemoteAgentError)
    detail = problem.detail or problem.title
    error = cls(f"{where}: {detail}", errors=problem.errors, retry_after=problem.retry_after)
    error.trace_id = problem.trace_id
    return error


def error_for_status(status: int, message: str) -> MeshError:
    """The error for an HTTP failure that came without a problem document."""
    return _BY_STATUS.get(status, RemoteAgentError)(message)
