"""agentmesh: a service mesh for AI agents.

Decorate functions with :func:`capability`, serve them with :class:`Agent` (or
``agentmesh run``), and call them from anywhere with :func:`connect`.
"""

from agentmesh._version import __version__
from agentmesh.agent import Agent
from agentmesh.capability import Capability, capability
from agentmesh.errors import (
    AgentUnavailable,
    CapabilityNotFound,
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
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
)
from agentmesh.mesh import CallResult, Mesh, connect
from agentmesh.models import AgentRecord, Bootstrap, CapabilityOffer, CapabilitySpec, Problem
from agentmesh.settings import Settings

__all__ = [
    "Agent",
    "AgentRecord",
    "AgentUnavailable",
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
    "__version__",
    "capability",
    "connect",
]
