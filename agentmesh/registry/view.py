"""The read side of the registry that users see as ``mesh.registry``.

Queries answer from the local index (no network); they only wait, once, for the index's
initial view and for every record in it to be verified, so that a query right after
``connect()`` neither sees an empty mesh nor a part of it.
"""

from __future__ import annotations

from collections.abc import Iterable

from agentmesh.models import AgentRecord, CapabilityOffer
from agentmesh.registry.index import LocalIndex

__all__ = ["RegistryView"]


class RegistryView:
    """``find`` capabilities and list ``agents`` from the sidecar's local index."""

    def __init__(self, index: LocalIndex, *, sync_timeout: float) -> None:
        self._index = index
        self._sync_timeout = sync_timeout

    async def find(
        self,
        capability: str | None = None,
        *,
        version: str | None = None,
        tags: Iterable[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[CapabilityOffer]:
        """Live offers of ``capability`` (all capabilities if None) matching every filter.

        ``version`` is a PEP 440 specifier on the capability's version (``">=1.0,<2"``; a bare
        ``"1.2.0"`` means exactly that); ``tags`` must all be present; ``labels`` must all match.
        """
        await self._index.wait_verified(self._sync_timeout)
        return self._index.find(capability, version=version, tags=tags, labels=labels)

    async def agents(self) -> list[AgentRecord]:
        """Every live agent instance, sorted by name then instance id."""
        await self._index.wait_verified(self._sync_timeout)
        return self._index.records()
