"""agentmesh: a service mesh for AI agents.

Decorate functions with :func:`capability`, serve them with :class:`Agent` (or
``agentmesh run``), and call them from anywhere with :func:`connect`.
"""

from agentmesh._version import __version__
from agentmesh.agent import Agent
from agentmesh.capability import Capability, capability
from agentmesh.errors import (
    AgentUnavailable,
    AuthenticationFailed,
    CapabilityNotFound,
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    IdentityMismatch,
    InvalidInput,
    InvalidOutput,
    LoopDetected,
    MeshError,
    MeshUnavailable,
    NoHealthyEndpoints,
    PayloadTooLarge,
    PolicyDenied,
    RateLimited,
    RegistrationError,
    RegistryUnavailable,
    RemoteAgentError,
    RouteNotFound,
    UntrustedPeer,
)
from agentmesh.mesh import CallResult, Mesh, connect
from agentmesh.models import (
    AccessPolicy,
    AgentRecord,
    Bootstrap,
    CapabilityOffer,
    CapabilitySpec,
    Problem,
    TrafficPolicy,
)
from agentmesh.settings import Settings

__all__ = [
    "AccessPolicy",
    "Agent",
    "AgentRecord",
    "AgentUnavailable",
    "AuthenticationFailed",
    "Bootstrap",
    "CallResult",
    "Capability",
    "CapabilityNotFound",
    "CapabilityOffer",
    "CapabilitySpec",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionLost",
    "DeadlineExceeded",
    "IdentityMismatch",
    "InvalidInput",
    "InvalidOutput",
    "LoopDetected",
    "Mesh",
    "MeshError",
    "MeshUnavailable",
    "NoHealthyEndpoints",
    "PayloadTooLarge",
    "PolicyDenied",
    "Problem",
    "RateLimited",
    "RegistrationError",
    "RegistryUnavailable",
    "RemoteAgentError",
    "RouteNotFound",
    "Settings",
    "TrafficPolicy",
    "UntrustedPeer",
    "__version__",
    "capability",
    "connect",
]
