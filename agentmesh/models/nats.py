"""The NATS cluster as the control plane reports it (``GET /v1/nats/meta``)."""

from __future__ import annotations

from pydantic import Field

from agentmesh.models._base import Wire

__all__ = ["JetStreamMeta", "MetaPeer"]


class MetaPeer(Wire):
    """A JetStream server of the meta group, as another server sees it."""

    name: str
    current: bool = False
    offline: bool = False


class JetStreamMeta(Wire):
    """The NATS cluster's JetStream meta group (``GET /v1/nats/meta``): the leader that places
    streams (no leader, no new bucket or consumer), as ``server`` reports it with its peers."""

    cluster: str
    leader: str
    server: str
    peers: list[MetaPeer] = Field(default_factory=list)
