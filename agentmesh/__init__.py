"""agentmesh: a service mesh for AI agents.

Decorate functions with :func:`capability`, serve them with :class:`Agent` (or
``agentmesh run``), and call them from anywhere with :func:`connect`.

The public names are imported on first use (module ``__getattr__``): ``python -m agentmesh``
then does the heavy imports from ``agentmesh/__main__.py``, which makes start-up cheaper (see
there). ``capability`` is the exception: it is also the name of a submodule, which the import
system would bind here in its place when first imported, so it is imported now.
"""

import importlib
import typing

# First of all: nats-py without its eager aiohttp import (see agentmesh/_nats.py).
from agentmesh import _nats as _nats
from agentmesh._version import __version__
from agentmesh.capability import Capability, capability

if typing.TYPE_CHECKING:
    from agentmesh.agent import Agent
    from agentmesh.errors import (
        AgentUnavailable,
        AuthenticationFailed,
        CapabilityNotFound,
        ConfigurationError,
        Conflict,
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


#: Public name → the module that defines it (imported when the name is first used).
_WHERE: dict[str, str] = {
    "AccessPolicy": "agentmesh.models",
    "Agent": "agentmesh.agent",
    "AgentRecord": "agentmesh.models",
    "AgentUnavailable": "agentmesh.errors",
    "AuthenticationFailed": "agentmesh.errors",
    "Bootstrap": "agentmesh.models",
    "CallResult": "agentmesh.mesh",
    "CapabilityNotFound": "agentmesh.errors",
    "CapabilityOffer": "agentmesh.models",
    "CapabilitySpec": "agentmesh.models",
    "ConfigurationError": "agentmesh.errors",
    "Conflict": "agentmesh.errors",
    "ConnectionFailed": "agentmesh.errors",
    "ConnectionLost": "agentmesh.errors",
    "DeadlineExceeded": "agentmesh.errors",
    "IdentityMismatch": "agentmesh.errors",
    "InvalidInput": "agentmesh.errors",
    "InvalidOutput": "agentmesh.errors",
    "LoopDetected": "agentmesh.errors",
    "Mesh": "agentmesh.mesh",
    "MeshError": "agentmesh.errors",
    "MeshUnavailable": "agentmesh.errors",
    "NoHealthyEndpoints": "agentmesh.errors",
    "PayloadTooLarge": "agentmesh.errors",
    "PolicyDenied": "agentmesh.errors",
    "Problem": "agentmesh.models",
    "RateLimited": "agentmesh.errors",
    "RegistrationError": "agentmesh.errors",
    "RegistryUnavailable": "agentmesh.errors",
    "RemoteAgentError": "agentmesh.errors",
    "RouteNotFound": "agentmesh.errors",
    "Settings": "agentmesh.settings",
    "TrafficPolicy": "agentmesh.models",
    "UntrustedPeer": "agentmesh.errors",
    "connect": "agentmesh.mesh",
}

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
    "Conflict",
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


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, and keep the name here from then on."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'agentmesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
