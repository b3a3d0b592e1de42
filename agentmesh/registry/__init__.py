"""The registry: agent records in NATS JetStream KV, leases, and the watch-fed local index."""

from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.index import LocalIndex, Target
from agentmesh.registry.lease import Lease
from agentmesh.registry.store import RecordConflict, RegistryStore
from agentmesh.registry.view import RegistryView

__all__ = [
    "Lease",
    "LocalIndex",
    "NatsConnection",
    "RecordConflict",
    "RegistryStore",
    "RegistryView",
    "Target",
]
